"""tvm: model.tvm.so, an Apache TVM 0.27 Relax library for the target (tvm_build.py). CUDA kernels are
compiled at export into a fatbin, Jetson host code is cross-linked for aarch64; CPU libraries built for this
machine's architecture are checked against PyTorch like the ONNX model. On GPU targets the layers
rsp.kernels' cost model marks sparse call rsp's BSR CUDA kernels, linked into the library (--sparse-kernels
auto); on CPU targets those the CPU cost model marks sparse call rsp's CPU sparse kernels (rsp.kernels.cpu,
compiled for the target's mcpu). "host" links the CUDA kernels' CPU emulator into a CPU library instead, a
correctness path that runs the GPU code's linkage here; the manifest's "kernels" records plan and symbols.

Verify runs the library in the Relax VM here (backend tvm), or on a device through TVM's RPC server
(backend tvm-rpc, --rpc HOST:PORT): the same file, uploaded and timed there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import Backend, Exported, ExportJob, Format, compare_logits, register

TVM_FILE = "model.tvm.so"
TVM_PARITY_IMAGES = 64


def sparse_kernel_kind(target, mode: str) -> str | None:
    """Which of rsp's kernels the TVM library links: "cuda", "host" (emulator), "cpu", or None (off)."""
    if mode == "off":
        return None
    if mode == "host":
        return "host"
    return target.sparse_kernels[0] if target.sparse_kernels else None


def planned_kernel_layers(plan: dict, state: dict, kind: str | None) -> tuple[dict, list[str]]:
    """({layer: weight} that run in rsp's kernels, the names of those that run rsp's dense CPU kernel) for
    the TVM build, from a kernel plan (rsp.export.kernel_plan)."""
    dense = [r["layer"] for r in plan["layers"] if r.get("dense_kernel") == "rsp-dense"] if kind == "cpu" else []
    sparse = {r["layer"]: state[f"{r['layer']}.weight"] for r in plan["layers"] if r["kernel"] == "sparse" or r["layer"] in dense}
    return sparse, dense


def record_linked(kernels: dict, info: dict | None, mode: str, why_not: str) -> dict:
    """The plan after the TVM build: which layers call rsp's kernels, their symbols and the object's hash."""
    linked = {ll["layer"]: ll for ll in (info or {}).get("layers", [])}
    not_linked = (info or {}).get("not_linked", {})
    for r in kernels["layers"]:
        if r["layer"] in linked:
            r.update(linked=True, symbol=linked[r["layer"]]["symbol"])
        elif r["kernel"] == "sparse":
            r.update(linked=False, not_linked_reason=not_linked.get(r["layer"], why_not))
    kernels["linked"] = bool(linked)
    kernels["linked_layers"] = [{"layer": ll["layer"], "symbol": ll["symbol"], "op": ll["op"],
                                 "kernel_mode": ll["kernel_mode"], "fused": ll.get("fused", [])} for ll in linked.values()]
    kernels["object"] = (info or {}).get("object")
    if linked and kernels.get("planner") == "rsp.kernels.cpu.plan_cpu_layers":
        kernels["note"] = (f"{TVM_FILE} calls rsp's CPU sparse kernels ({kernels.get('cpu')}; rsp's dense kernel for a "
                           "layer planned dense) for the linked layers, with what follows each (BatchNorm folded, bias, "
                           "residual, ReLU, max pool: linked_layers[*].fused) inside the kernel, and TVM's kernels "
                           "for the rest")
    elif linked and mode == "host":
        kernels["note"] = (f"{TVM_FILE} calls the host emulator of rsp's BSR kernels for the linked layers "
                           "(--sparse-kernels host: a correctness path for testing the linkage, not a fast one) "
                           "and TVM's kernels for the rest")
    elif linked:
        kernels["note"] = (f"{TVM_FILE} calls rsp's BSR CUDA kernels (R.call_dps_packed, TVM FFI) for the linked "
                           "layers and TVM's kernels for the rest")
    else:
        kernels["note"] = f"the plan; {TVM_FILE} runs TVM's kernels only ({why_not})"
    return kernels


@contextlib.contextmanager
def _tuning_progress(target, cache: Path | None, trials: int):
    """On a terminal, while MetaSchedule tunes: a bar of the candidates measured so far (the lines it
    appends to its tuning-record file in the cache), against the trials asked for."""
    from ..progress import LineCounter, StepProgress, show_progress

    if not trials or not show_progress():
        yield
        return
    from ..tvm_build import default_tune_cache

    records = (cache or default_tune_cache(target)) / "database_tuning_record.json"
    with StepProgress(f"tvm tuning {target.name}", total=trials) as progress:
        progress.step("MetaSchedule: candidates measured (cached trials are reused without measuring)")
        with LineCounter(records, progress.set_completed):
            yield


def _target_gpu_api(manifest: dict) -> str | None:
    registry = (manifest.get("target") or {}).get("registry") or {}
    # bundles exported before targets declared `gpu:` have only their cuda section
    return registry.get("gpu") or ("cuda" if registry.get("cuda") else None)


def _library_batch(manifest: dict) -> int:
    return int(((manifest.get("input") or {}).get("batch") or {}).get("tvm") or 1)


def dense_tvm_schedule(manifest: dict) -> dict:
    """How verify builds the dense original for a TVM bundle: with the bundle's own tuning budget where it was
    tuned (MetaSchedule on this machine, the bundle's records reused where its cache is here), so that the
    speed-up compares tuned with tuned, not a tuned bundle with untuned dense code."""
    from ..targets import get_target

    target = get_target((manifest.get("target") or {}).get("name") or "x86-cpu")
    tuning = ((manifest.get("artifacts") or {}).get("tvm") or {}).get("tuning") or {}
    trials = int(tuning.get("trials_requested") or 0)
    out = {"target": target.name, "tune_trials": 0, "schedule": "default (untuned)", "bundle_tune_trials": trials}
    if trials and not target.gpu_api and target.native:
        cache = Path(tuning["cache"]) if tuning.get("cache") and Path(tuning["cache"]).is_dir() else None
        out.update(tune_trials=trials, schedule="meta_schedule", tune_cache=str(cache) if cache else None)
    elif trials:
        out["note"] = "the bundle was tuned, but tuning needs the target's own CPU: the dense original is untuned"
    return out


def _dense_library(dense, chw, tmp: Path, manifest: dict, batch: int) -> tuple[Path, dict]:
    """The dense original built for the bundle's target (once per run: tvm and tvm-rpc share it), and how."""
    from ..targets import get_target
    from ..tvm_build import build

    how = dense_tvm_schedule(manifest)
    path = Path(tmp) / f"dense.{how['target']}.b{batch}.tvm.so"
    if not path.is_file():
        cache = Path(how["tune_cache"]) if how.get("tune_cache") else None
        build(dense, chw, get_target(how["target"]), path, batch=batch, tune_trials=how["tune_trials"],
              tune_cache=cache, log=lambda *_: None)
    return path, how


@register
class Tvm(Format):
    name = "tvm"
    export_help = "an Apache TVM library compiled for the target, with rsp's sparse kernels linked in"
    verify_help = "the TVM library in the Relax VM here"
    files = (TVM_FILE,)
    priority = 20

    def check_export_options(self, opts, selected: bool) -> str | None:
        if selected:
            return None
        if opts.sparse_kernels == "host":
            return "--sparse-kernels host links kernels into the TVM library: add --format tvm"
        if opts.tune_trials:
            return "--tune-trials tunes the TVM library: add --format tvm"
        return None

    def missing_tools(self) -> str | None:
        from ..tvm_build import TVMBuildError, require_tvm

        try:
            require_tvm()
        except TVMBuildError as exc:
            return str(exc)
        return None

    def input_batch(self, opts):
        return opts.batch

    def export(self, job: ExportJob) -> Exported:
        from .. import tvm_build

        opts, target, mode = job.opts, job.target, job.opts.sparse_kernels
        output, log = job.output, job.log
        cache = Path(opts.tune_cache) if opts.tune_cache else None
        kind = sparse_kernel_kind(target, mode)
        sparse, dense = planned_kernel_layers(job.kernels, job.state, kind)
        with _tuning_progress(target, cache, opts.tune_trials):
            result = tvm_build.build(job.model, job.chw, target, output / TVM_FILE, batch=opts.batch, nvcc=opts.nvcc,
                                     tune_trials=opts.tune_trials, tune_cache=cache, log=log,
                                     sparse_layers=sparse if kind else None, sparse_mode=kind or "cuda",
                                     dense_layers=dense)
        if kind is None:
            why_not = "--sparse-kernels off"
        elif job.kernels.get("planner") is None:  # no plan: every layer says why
            why_not = job.kernels["layers"][0]["reason"] if job.kernels["layers"] else "no conv/linear layer"
        else:
            why_not = "no layer is planned sparse" if not sparse else "not linked"
        record_linked(job.kernels, result.info.get("sparse_kernels"), mode, why_not)
        latency = {}
        if not target.gpu_api and target.native:
            # the library runs one static batch per call, untuned CPU code slowly (0.3 s per image for an
            # untuned VGG-16): 64 real images are plenty to catch a wrong kernel
            x_np = job.images.numpy()
            n = min(len(x_np), TVM_PARITY_IMAGES)
            out = tvm_build.run_library(output / TVM_FILE, x_np[:n], opts.batch)
            parity = {**compare_logits(job.reference[:n], out, opts.tolerance, "fp32"), "runtime": "tvm relax VM, CPU",
                      "images": {**job.image_info, "n": n}}
            key, onnx_key = "tvm_cpu_batch_%d_s" % opts.batch, "onnxruntime_cpu_batch_%d_s" % opts.batch
            latency[key] = tvm_build.time_library(output / TVM_FILE, opts.batch, job.chw)
            log(f"tvm: {TVM_FILE} parity max |diff| {parity['max_abs_err']:.2e}; {latency[key] * 1e3:.3f} ms/batch "
                + (f"(onnxruntime {job.latency[onnx_key] * 1e3:.3f} ms)" if onnx_key in job.latency else ""))
        else:
            parity = {"passed": None, "status": "not run",
                      "reason": f"the library is for {target.triple}" + (f" + CUDA {','.join(target.cuda_arch)}"
                                                                         if target.gpu_api == "cuda" else "")
                      + "; `rsp verify` checks it on the device"}
            log(f"tvm: {TVM_FILE} for {target.triple} ({result.info['library']['elf_machine']})"
                + (f", SASS {','.join(result.info['library']['sass'])}, no CUDA source" if target.gpu_api == "cuda" else ""))
        return Exported([TVM_FILE], result.info, parity, latency)

    def not_exported(self, job: ExportJob) -> None:
        record_linked(job.kernels, None, job.opts.sparse_kernels, "no TVM library in this bundle")

    def runtime(self, bundle, manifest, chw, opts, log):
        from ..runtimes import tvm_runtime

        device = "cuda" if _target_gpu_api(manifest) == "cuda" else "cpu"
        return tvm_runtime(Path(bundle) / TVM_FILE, chw, _library_batch(manifest), device=device)

    def dense_twin(self, dense, chw, tmp, runtime, manifest, opts, log):
        from ..runtimes import tvm_runtime

        path, how = _dense_library(dense, chw, tmp, manifest, runtime.batches[0])
        out = tvm_runtime(path, chw, runtime.batches[0], "tvm-dense", device=runtime.info.get("device", "cpu").split(":")[0])
        out.info["build"] = how
        return out


@register
class TvmRpc(Backend):
    """The bundle's TVM library on a remote device (a Jetson running `python -m tvm.exec.rpc_server`)."""

    name = "tvm-rpc"
    format = "tvm"
    verify_help = "the TVM library on a device's TVM RPC server (--rpc)"
    priority = 21
    by_default = False  # runs where --rpc says
    remote = True

    def requested(self, opts) -> bool:
        return bool(opts.rpc)

    def check_verify_options(self, opts, asked: list[str]) -> str | None:
        if opts.rpc_key and not opts.rpc:
            return "--rpc-key needs --rpc (the tracker's HOST:PORT)"
        if self.name in asked and not opts.rpc:
            return "the tvm-rpc backend needs --rpc HOST:PORT (the device's TVM RPC server)"
        return None

    def runtime(self, bundle, manifest, chw, opts, log):
        from ..runtimes import RuntimeUnavailable, rpc_session, tvm_rpc_runtime

        path = Path(bundle) / TVM_FILE
        if not path.is_file():
            raise RuntimeUnavailable(f"{path} not found: export with --format tvm")
        session = rpc_session(opts.rpc, opts.rpc_key)
        device = "cuda" if _target_gpu_api(manifest) == "cuda" else "cpu"
        out = tvm_rpc_runtime(session, opts.rpc, path, chw, _library_batch(manifest), device)
        if opts.rpc_key:
            out.info["rpc_key"] = opts.rpc_key
        where = out.info.get("remote_device_name") or out.info["device"]
        log(f"tvm-rpc: {TVM_FILE} runs on {opts.rpc} ({where})")
        return out

    def dense_twin(self, dense, chw, tmp, runtime, manifest, opts, log):
        path, how = _dense_library(dense, chw, tmp, manifest, runtime.batches[0])
        out = runtime.load_other(path, "tvm-rpc-dense")
        out.info["build"] = how
        return out

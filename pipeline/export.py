"""rsp export: a train or structure folder -> a deployable bundle for a registry target (rsp.targets).

Formats (the target's defaults unless --format says otherwise):
  onnx      model.onnx: the (shrunk) model, fp32 or fp16, opset >= 17, dynamic batch, sparsity in its metadata;
            onnxruntime logits are checked against PyTorch on real test images as part of the command
  tvm       model.tvm.so: Apache TVM 0.27 Relax library for the target (tvm_build.py); CUDA kernels are
            compiled here into a fatbin, Jetson host code is cross-linked for aarch64; CPU libraries built
            for this machine's architecture are checked against PyTorch like the ONNX model. On GPU targets
            the layers rsp.kernels' cost model marks sparse call rsp's BSR CUDA kernels, linked into the
            library (--sparse-kernels auto); on CPU targets those the CPU cost model marks sparse call rsp's
            CPU sparse kernels (rsp.kernels.cpu, compiled for the target's mcpu). "host" links the CUDA
            kernels' CPU emulator into a CPU library instead, a correctness path that runs the GPU code's
            linkage here; manifest "kernels" records plan and symbols
  tensorrt  TensorRT engines must be built on the device that runs them: the bundle carries the ONNX model,
            tensorrt.json (precision, 2:4 layers, shapes) and the matching trtexec command; `rsp verify`
            builds and caches the engine where the tensorrt package and a GPU are present
            (build_tensorrt_engine below)
The bundle keeps the train-folder contract (model.safetensors + model kwargs: rsp.load_model works on it) so
that verification attacks exactly the exported numbers. manifest.json (stage "export") is written last.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .artifacts import (MANIFEST, MODEL_FILE, ArtifactError, atomic_write_bytes, atomic_write_text, build_model,
                        check_files, load_tensors, lock_folder, read_manifest, require_complete, save_tensors,
                        sha256_file, write_manifest)
from .latency import median_call_seconds
from .runtimes import onnx_session, run_onnx
from .targets import FORMATS, PRECISIONS, TRT_PRECISIONS, Target, get_target

ONNX_FILE = "model.onnx"
TVM_FILE = "model.tvm.so"
TRT_FILE = "tensorrt.json"
CALIBRATION_FILE = "calibration.safetensors"
MIN_OPSET = 17
TVM_PARITY_IMAGES = 64
SPARSE_KERNEL_MODES = ("auto", "off", "host")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
SOURCE_STAGES = ("train", "structure")


class ExportError(ArtifactError):
    """Bad export options or source folder: one line, exit code 2."""


class ParityError(RuntimeError):
    """An exported artifact disagrees with PyTorch beyond tolerance: exit code 1 (the bundle is kept, its
    manifest says status "parity_failed")."""


@dataclass
class ExportOptions:
    target: str
    formats: list[str] | None = None  # None: the target's defaults
    precision: str | None = None  # ONNX numbers: fp32 | fp16 (None: the target's)
    trt_precision: str | None = None  # fp32 | fp16 | int8 (None: the target's)
    opset: int = MIN_OPSET
    batch: int = 1  # static batch of the TVM library
    tune_trials: int = 0
    tune_cache: str | None = None
    nvcc: str | None = None
    data_dir: str | None = None
    parity_images: int = 256
    tolerance: float = 1e-4  # fp32 max |logit difference|
    threads: int | None = None
    # rsp's sparse kernels in the TVM library: auto (for the layers the cost model marks sparse: the CUDA
    # kernels on GPU targets, the CPU kernels on CPU targets), off, host (the CUDA kernels' CPU emulator in a
    # CPU library: tests the GPU code's linkage; correct, not fast)
    sparse_kernels: str = "auto"
    force_sparse: tuple[str, ...] = ()  # layers run sparse whatever the cost model says (tests, experiments)


# --- helpers ------------------------------------------------------------------------------------------


def _check_source(source: Path) -> dict:
    manifest = read_manifest(source)
    if manifest["stage"] not in SOURCE_STAGES:
        raise ExportError(f"{source} is a {manifest['stage']!r} folder; rsp export reads a train or structure folder")
    require_complete(source, manifest)
    if "model.safetensors" not in manifest.get("files", {}):
        raise ExportError(f"{source}/manifest.json lists no {MODEL_FILE}")
    bad = check_files(source, manifest)
    if bad:
        raise ArtifactError(f"{source}: {bad[0]}")
    return manifest


def _formats(opts: ExportOptions, target: Target) -> list[str]:
    formats = list(dict.fromkeys(opts.formats or target.formats))
    for f in formats:
        if f not in FORMATS:
            raise ExportError(f"unknown format {f!r}; formats: {', '.join(FORMATS)}")
    if "tensorrt" in formats and not target.tensorrt:
        raise ExportError(f"target {target.name} has no NVIDIA GPU: the tensorrt format needs one")
    return formats


def _parity_images(manifest: dict, opts: ExportOptions) -> tuple[torch.Tensor, dict]:
    """The first N test images of the run's data set, float NCHW in [0, 1] (what the model takes)."""
    from .data import load_run_dataset, to_float

    ds = manifest.get("dataset") or {}
    name = ds.get("dataset", "digits")
    splits = load_run_dataset(ds, opts.data_dir)  # --data-dir, RSP_DATA_DIR or where the run was trained
    x = to_float(splits.test_x[: opts.parity_images])
    return x, {"dataset": name, "split": "test", "n": len(x), "first": 0}


def _chw(manifest: dict, model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int, int]:
    shape = (manifest.get("input") or {}).get("shape")
    if shape and len(shape) == 3:
        return tuple(int(v) for v in shape)
    return tuple(images.shape[1:])


def _compare(ref: np.ndarray, out: np.ndarray, tol: float, precision: str) -> dict:
    err = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    # fp16 has an 11-bit significand: ~1e-3 relative per operation; judge it relative to the logit scale
    limit = tol if precision == "fp32" else 1e-2 * max(1.0, scale)
    return {"max_abs_err": float(err.max()) if err.size else 0.0, "mean_abs_err": float(err.mean()) if err.size else 0.0,
            "tolerance": limit, "criterion": "max |logit difference| <= tolerance" + ("" if precision == "fp32" else
                                                                                        " (1e-2 x max(1, max |logit|) for fp16)"),
            "argmax_agreement": float((ref.argmax(1) == out.argmax(1)).mean()) if ref.size else 1.0,
            "max_abs_logit": scale, "passed": bool(err.size == 0 or err.max() <= limit)}


def _layer_names(model: torch.nn.Module) -> list[str]:
    from .sparse import sparsifiable_layers

    return [n for n, _ in sparsifiable_layers(model)]


def _trt_24_layers(state: dict, names: list[str]) -> dict[str, bool]:
    """Which layers TensorRT would run as 2:4 sparse: it wants 2 zeros in every 4 consecutive *input channels*
    for each (output channel, kernel position): the grouping `rsp structure --nm 2:4` projects onto."""
    out = {}
    for n in names:
        w = state[f"{n}.weight"]
        w = w.permute(0, 2, 3, 1) if w.dim() == 4 else w  # (K, R, S, C): input channels innermost
        c = w.shape[-1]
        out[n] = bool(c % 4 == 0 and ((w.reshape(-1, 4) != 0).sum(1) <= 2).all())
    return out


def _kernels_module(name: str):
    """A module of rsp.kernels, or None where it cannot be imported: export must not depend on the kernels."""
    import importlib

    try:
        return importlib.import_module(f".kernels.{name}", __package__)
    except Exception:
        return None


def _planner():
    """rsp.kernels' per-layer GPU planner (costmodel.plan_model), if available."""
    return getattr(_kernels_module("costmodel"), "plan_model", None)


def _cpu_planner():
    """rsp.kernels.cpu (plan_cpu_layers and its CPU figures), if available."""
    return _kernels_module("cpu")


def time_dense_library(specs: dict, batch: int) -> dict[str, float]:
    """Microseconds per call of each layer shape ({layer: LayerSpec}) in PyTorch's dense F.conv2d / F.linear
    (oneDNN on x86) on one thread: the dense library the CPU plan compares rsp's kernels with."""
    import torch.nn.functional as F

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, spec in specs.items():
                w = torch.randn(*spec.weight_shape, generator=g)
                x = torch.rand(*spec.input_shape(batch), generator=g)
                if len(spec.weight_shape) == 4:
                    fn = lambda x=x, w=w, spec=spec: F.conv2d(x, w, None, spec.stride, spec.padding, spec.dilation)
                else:
                    fn = lambda x=x, w=w: F.linear(x, w)
                out[name] = median_call_seconds(fn, repeat=5, min_s=0.004) * 1e6
    finally:
        torch.set_num_threads(old)
    return out


def planned_kernel_layers(plan: dict, state: dict, kind: str | None) -> tuple[dict, list[str]]:
    """({layer: weight} that run in rsp's kernels, the names of those that run rsp's dense CPU kernel) for
    the TVM build, from a kernel plan (kernel_plan)."""
    dense = [r["layer"] for r in plan["layers"] if r.get("dense_kernel") == "rsp-dense"] if kind == "cpu" else []
    sparse = {r["layer"]: state[f"{r['layer']}.weight"] for r in plan["layers"] if r["kernel"] == "sparse" or r["layer"] in dense}
    return sparse, dense


def kernel_plan(model: torch.nn.Module, chw, target: Target, state: dict, names: list[str], batch: int, *,
                mode: str = "auto", force_sparse=(), tuned: bool = False) -> dict:
    """Per-layer kernel choice for the manifest. GPU targets (and mode "host", for the GPU its emulator stands
    in for, sm_87): rsp.kernels.costmodel.plan_model(model, input_shape, arch=, batch=). CPU targets in mode
    "auto": rsp.kernels.cpu.plan_cpu_layers for the target's mcpu, against a dense library (oneDNN timed on
    this machine where the target is this kind of CPU, else the recorded figures); a layer that is not sparse
    runs rsp's dense kernel (or, tuned, TVM's tuned schedule). Otherwise "dense" with the reason.
    force_sparse marks layers sparse whatever the estimate ("forced"). "linked" stays False here: the TVM
    build links the kernels and export records which (_record_linked)."""
    kind = sparse_kernel_kind(target, "host" if mode == "host" else "auto")  # planned even where linking is off
    arch = target.cuda_arch[0] if kind == "cuda" else ("sm_87" if kind == "host" else None)
    result = None
    reason = None if kind else f"target {target.name} runs none of rsp's sparse kernels"
    if kind == "cpu":
        cpu = _cpu_planner()
        if cpu is None:
            reason = "rsp.kernels.cpu is not available"
        elif target.mcpu not in cpu.CPUS:
            reason = f"no CPU kernel figures for mcpu {target.mcpu!r} (known: {', '.join(cpu.CPUS)})"
        else:
            try:
                from .kernels.costmodel import layer_geometry

                weights = {f"{n}.weight": state[f"{n}.weight"] for n in names}  # module order
                # the dense library is timed here when the library runs on this kind of CPU
                measure = target.native
                plan = cpu.plan_cpu_layers(weights, layer_geometry(model, (batch, *chw)), batch=batch, cpu=target.mcpu,
                                           dense_baseline="library", measure=time_dense_library if measure else None,
                                           dense_fallback=None if tuned else "rsp-dense")
                result = {"planner": "rsp.kernels.cpu.plan_cpu_layers", "cpu": target.mcpu, "dense_baseline": "library",
                          "dense_measured": measure, "dense_fallback": "tuned TVM" if tuned else "rsp-dense",
                          "layers": [{"layer": k, **v} for k, v in plan.items()]}
            except Exception as exc:
                reason = f"rsp.kernels.cpu.plan_cpu_layers failed ({type(exc).__name__}: {str(exc)[:120]})"
    elif kind:
        plan = _planner()
        if plan is None:
            reason = "rsp.kernels.costmodel.plan_model is not available"
        else:
            try:
                try:
                    rows = plan(model, (batch, *chw), arch=arch, batch=batch)
                except TypeError:
                    rows = plan(model, (batch, *chw))
                if isinstance(rows, dict):
                    rows = [{"layer": k, **dict(v)} for k, v in rows.items()]
                rows = [dict(r) for r in rows]
                for r in rows:
                    r.setdefault("layer", r.get("name"))
                if rows and all(r.get("layer") and "kernel" in r for r in rows):
                    result = {"planner": "rsp.kernels.costmodel.plan_model", "arch": arch, "layers": rows}
                else:
                    reason = "rsp.kernels.costmodel.plan_model returned no per-layer choice"
            except Exception as exc:
                reason = f"rsp.kernels.costmodel.plan_model failed ({type(exc).__name__}: {str(exc)[:120]})"
    if result is None:
        layers = []
        for n in names:
            w = state[f"{n}.weight"]
            layers.append({"layer": n, "shape": list(w.shape), "density": float((w != 0).float().mean()),
                           "kernel": "dense", "reason": reason})
        result = {"planner": None, "layers": layers}
    forced = set(force_sparse or ())
    for r in result["layers"]:
        if r["layer"] in forced and r["kernel"] != "sparse":
            r.update(kernel="sparse", forced=True)
    result.update(linked=False, mode=mode)
    return result


def sparse_kernel_kind(target: Target, mode: str) -> str | None:
    """Which of rsp's kernels the TVM library links: "cuda", "host" (emulator), "cpu", or None (off)."""
    if mode == "off":
        return None
    if mode == "host":
        return "host"
    return target.sparse_kernels[0] if target.sparse_kernels else None


def _record_linked(kernels: dict, info: dict | None, mode: str, why_not: str) -> dict:
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
        kernels["note"] = (f"model.tvm.so calls rsp's CPU sparse kernels ({kernels.get('cpu')}; rsp's dense kernel for a "
                           "layer planned dense) for the linked layers, with what follows each (BatchNorm folded, bias, "
                           "residual, ReLU, max pool: linked_layers[*].fused) inside the kernel, and TVM's kernels "
                           "for the rest")
    elif linked and mode == "host":
        kernels["note"] = ("model.tvm.so calls the host emulator of rsp's BSR kernels for the linked layers "
                           "(--sparse-kernels host: a correctness path for testing the linkage, not a fast one) "
                           "and TVM's kernels for the rest")
    elif linked:
        kernels["note"] = ("model.tvm.so calls rsp's BSR CUDA kernels (R.call_dps_packed, TVM FFI) for the linked "
                           "layers and TVM's kernels for the rest")
    else:
        kernels["note"] = f"the plan; model.tvm.so runs TVM's kernels only ({why_not})"
    return kernels


# --- ONNX ---------------------------------------------------------------------------------------------


def export_onnx(model: torch.nn.Module, chw, precision: str, opset: int, metadata: dict[str, str]) -> bytes:
    """ONNX bytes of the model with a dynamic batch axis, checked by onnx.checker."""
    import copy

    import onnx

    model = copy.deepcopy(model).eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    model = model.to(dtype)
    example = torch.rand(2, *chw, dtype=dtype)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # TorchScript-based exporter (dynamo=False): the dynamo one needs onnxscript, a dependency rsp avoids
        torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "rsp", __version__
    data = proto.SerializeToString()
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    return data


def onnx_summary(data: bytes) -> dict:
    """Opset, I/O shapes and the measured sparsity of the Conv/Gemm weights inside an ONNX model."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load_from_string(data)
    inits = {i.name: i for i in proto.graph.initializer}
    zeros = total = 0
    for node in proto.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            zeros += int((w == 0).sum())
            total += w.size

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return {"opset": opset, "inputs": {v.name: dims(v) for v in proto.graph.input if v.name not in inits},
            "outputs": {v.name: dims(v) for v in proto.graph.output},
            "weight_sparsity": zeros / total if total else 0.0, "nodes": len(proto.graph.node),
            "metadata": {p.key: p.value for p in proto.metadata_props}}


# --- TensorRT -----------------------------------------------------------------------------------------


def tensorrt_settings(target: Target, precision: str, chw, trt24: dict[str, bool], onnx_file: str) -> dict:
    trt = target.tensorrt or {}
    opt, mx = int(trt.get("opt_batch", 1)), int(trt.get("max_batch", 8))
    shape = "x".join(str(v) for v in chw)
    engine = f"model.{target.name}.{precision}.engine"
    sparse = sorted(n for n, ok in trt24.items() if ok)
    cmd = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine={engine}",
           f"--minShapes={INPUT_NAME}:1x{shape}", f"--optShapes={INPUT_NAME}:{opt}x{shape}",
           f"--maxShapes={INPUT_NAME}:{mx}x{shape}", f"--memPoolSize=workspace:{int(trt.get('workspace_mib', 1024))}"]
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "int8":
        cmd += ["--int8", "--fp16"]  # fp16 fallback for layers without int8 kernels
    if sparse:
        cmd.append("--sparsity=enable")
    if trt.get("dla"):
        cmd += ["--useDLACore=0", "--allowGPUFallback"]
    return {"onnx": onnx_file, "engine": engine, "precision": precision, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "shapes": {"min": [1, *chw], "opt": [opt, *chw], "max": [mx, *chw]},
            "workspace_mib": int(trt.get("workspace_mib", 1024)), "dla": bool(trt.get("dla")),
            "sparsity": bool(sparse), "sparse_2_4_layers": sparse,
            "sparsity_rule": "TensorRT uses 2:4 sparse tensor cores where every 4 consecutive input channels of a "
                             "(output channel, kernel position) hold at most 2 non-zeros",
            "calibration": CALIBRATION_FILE if precision == "int8" else None,
            "trtexec": " ".join(cmd),
            "note": ("int8 from trtexec without a calibration cache uses placeholder scales (timing only); "
                     "build_tensorrt_engine calibrates with calibration.safetensors" if precision == "int8" else
                     "build the engine on the device that runs it (TensorRT engines are not portable)")}


def build_tensorrt_engine(bundle: str | Path, cache_dir: str | Path | None = None, log=print) -> Path:
    """Build (or reuse) the TensorRT engine of an export bundle on this machine, with its tensorrt.json
    settings and calibration images: rsp.runtimes.build_tensorrt_engine (the builder verify uses), cached
    under cache_dir (default BUNDLE/engines). Needs the tensorrt package and an NVIDIA GPU."""
    from .runtimes import build_tensorrt_engine as build_engine

    bundle = Path(bundle)
    read_manifest(bundle, stage="export")
    settings = json.loads((bundle / TRT_FILE).read_text())
    calibration = (load_tensors(bundle / settings["calibration"])["images"]
                   if settings.get("calibration") else None)
    return build_engine(bundle / settings["onnx"], settings, Path(cache_dir) if cache_dir else bundle / "engines",
                        calibration, log)


@contextlib.contextmanager
def _tuning_progress(target: Target, cache: Path | None, trials: int):
    """On a terminal, while MetaSchedule tunes: a bar of the candidates measured so far (the lines it
    appends to its tuning-record file in the cache), against the trials asked for."""
    from .progress import LineCounter, StepProgress, show_progress

    if not trials or not show_progress():
        yield
        return
    from .tvm_build import default_tune_cache

    records = (cache or default_tune_cache(target)) / "database_tuning_record.json"
    with StepProgress(f"tvm tuning {target.name}", total=trials) as progress:
        progress.step("MetaSchedule: candidates measured (cached trials are reused without measuring)")
        with LineCounter(records, progress.set_completed):
            yield


# --- the stage ----------------------------------------------------------------------------------------


def check_tools(formats, tune_trials: int) -> None:
    """What the formats need is installed, and --tune-trials has a TVM library to tune: one line before any
    work (rsp export, and rsp pipeline before it trains)."""
    if "tvm" in formats:
        from .tvm_build import require_tvm

        require_tvm()
    elif tune_trials:
        raise ExportError("--tune-trials tunes the TVM library: add --format tvm")
    if any(f in formats for f in ("onnx", "tensorrt")):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise ExportError(f"the onnx format needs onnx and onnxruntime (pip install 'rsp[export]'): {exc}") from None


def run(source: str | Path, output: str | Path, opts: ExportOptions, log=print) -> dict:
    source, output = Path(source), Path(output)
    t0 = time.perf_counter()
    target = get_target(opts.target)
    formats = _formats(opts, target)
    precision = opts.precision or target.precision
    if precision not in PRECISIONS:
        raise ExportError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    trt_precision = opts.trt_precision or (target.tensorrt or {}).get("precision", "fp16")
    if trt_precision not in TRT_PRECISIONS:
        raise ExportError(f"--trt-precision must be one of {', '.join(TRT_PRECISIONS)}, got {trt_precision!r}")
    if opts.opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET}, got {opts.opset}")
    if opts.parity_images < 1:
        raise ExportError(f"--parity-images must be >= 1, got {opts.parity_images}")
    if opts.batch < 1 or opts.tune_trials < 0:
        raise ExportError("--batch must be >= 1 and --tune-trials >= 0")
    mode = opts.sparse_kernels
    if mode not in SPARSE_KERNEL_MODES:
        raise ExportError(f"--sparse-kernels must be one of {', '.join(SPARSE_KERNEL_MODES)}, got {mode!r}")
    if mode == "host" and target.gpu_api:
        raise ExportError(f"--sparse-kernels host links the CPU emulator of rsp's kernels into a CPU library; target "
                          f"{target.name} has a GPU (use auto for its CUDA kernels, or off)")
    if mode == "host" and "tvm" not in formats:
        raise ExportError("--sparse-kernels host links kernels into the TVM library: add --format tvm")
    if opts.force_sparse and mode == "off":
        raise ExportError("force_sparse needs --sparse-kernels auto or host")
    check_tools(formats, opts.tune_trials)
    manifest = _check_source(source)
    if output.resolve() == source.resolve():
        raise ExportError("--output must differ from the source folder")
    if (output / MANIFEST).is_file():
        raise ExportError(f"{output} already holds an rsp folder: choose another --output")
    if opts.threads:
        torch.set_num_threads(opts.threads)

    model = build_model(manifest)
    state = load_tensors(source / MODEL_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{source / MODEL_FILE} does not fit model {manifest['model']['name']}: "
                            f"{str(exc).strip().splitlines()[-1]}") from None
    model.eval()
    images, image_info = _parity_images(manifest, opts)
    chw = _chw(manifest, model, images)
    if tuple(images.shape[1:]) != tuple(chw):
        raise ExportError(f"test images are {tuple(images.shape[1:])} but the manifest's input is {tuple(chw)}")
    with torch.no_grad():
        reference = model(images).numpy()
    names = _layer_names(model)
    unknown = [n for n in (opts.force_sparse or ()) if n not in names]
    if unknown:
        raise ExportError(f"force_sparse: unknown layer {unknown[0]!r}; layers: {', '.join(names)}")
    kernels = kernel_plan(model, chw, target, state, names, opts.batch, mode=mode, force_sparse=opts.force_sparse,
                          tuned=opts.tune_trials > 0)
    bad = [r for r in kernels["layers"] if r.get("forced") and r.get("reason")]
    if bad:
        raise ExportError(f"cannot run layer {bad[0]['layer']} sparse: {bad[0]['reason']}")
    from .sparse import layer_report

    layers, sparsity = layer_report(state, names)
    _held = lock_folder(output, new=True)  # the one writer of output until run() returns
    files = [MODEL_FILE]
    # the exact reference numbers, byte for byte: verify attacks what was exported
    atomic_write_bytes(output / MODEL_FILE, (source / MODEL_FILE).read_bytes())
    artifacts, parity, latency = {}, {}, {}
    source_sha = sha256_file(source / MANIFEST)
    x_np = images.numpy()

    if "onnx" in formats or "tensorrt" in formats:
        t = time.perf_counter()
        meta = {"rsp.version": __version__, "rsp.model": json.dumps(manifest["model"]), "rsp.sparsity": f"{sparsity:.6f}",
                "rsp.layers": json.dumps([{k: r[k] for k in ("name", "nonzero", "numel")} for r in layers]),
                "rsp.input": json.dumps({"shape": ["batch", *chw], "range": [0.0, 1.0], "layout": "NCHW"}),
                "rsp.normalization": json.dumps(manifest.get("normalization") or {"inside_model": True}),
                "rsp.target": target.name, "rsp.precision": precision, "rsp.source_manifest_sha256": source_sha}
        data = export_onnx(model, chw, precision, opts.opset, meta)
        atomic_write_bytes(output / ONNX_FILE, data)
        files.append(ONNX_FILE)
        summary = onnx_summary(data)
        session = onnx_session(data, opts.threads)
        out = run_onnx(session, x_np)
        one = run_onnx(session, x_np[:1])  # a second batch size: the batch axis really is dynamic
        parity["onnx"] = {**_compare(reference, out, opts.tolerance, precision), "runtime": "onnxruntime CPU",
                          "batch_1_max_abs_err": float(np.abs(one - reference[:1]).max()), "images": image_info}
        parity["onnx"]["passed"] &= parity["onnx"]["batch_1_max_abs_err"] <= parity["onnx"]["tolerance"]
        latency["onnxruntime_cpu_batch_%d_s" % opts.batch] = median_call_seconds(lambda: run_onnx(session, x_np[: opts.batch]))
        artifacts["onnx"] = {"file": ONNX_FILE, "precision": precision, "opset": summary["opset"],
                             "dynamic_batch": True, "input": INPUT_NAME, "output": OUTPUT_NAME,
                             "inputs": summary["inputs"], "outputs": summary["outputs"], "nodes": summary["nodes"],
                             "weight_sparsity": summary["weight_sparsity"], "checker": "onnx.checker full_check passed",
                             "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
                             "note": "BatchNorm is folded into the convolutions; zeros stay zeros",
                             "time_s": round(time.perf_counter() - t, 2)}
        log(f"onnx: {ONNX_FILE} opset {summary['opset']} {precision}, weight sparsity {summary['weight_sparsity']:.4f}, "
            f"parity max |diff| {parity['onnx']['max_abs_err']:.2e} on {len(x_np)} images")

    if "tvm" in formats:
        from . import tvm_build

        cache = Path(opts.tune_cache) if opts.tune_cache else None
        kind = sparse_kernel_kind(target, mode)
        sparse, dense = planned_kernel_layers(kernels, state, kind)
        with _tuning_progress(target, cache, opts.tune_trials):
            result = tvm_build.build(model, chw, target, output / TVM_FILE, batch=opts.batch, nvcc=opts.nvcc,
                                     tune_trials=opts.tune_trials, tune_cache=cache, log=log,
                                     sparse_layers=sparse if kind else None, sparse_mode=kind or "cuda",
                                     dense_layers=dense)
        files.append(TVM_FILE)
        artifacts["tvm"] = result.info
        if kind is None:
            why_not = "--sparse-kernels off"
        elif kernels.get("planner") is None:  # no plan: every layer says why
            why_not = kernels["layers"][0]["reason"] if kernels["layers"] else "no conv/linear layer"
        else:
            why_not = "no layer is planned sparse" if not sparse else "not linked"
        _record_linked(kernels, result.info.get("sparse_kernels"), mode, why_not)
        if not target.gpu_api and target.native:
            # the library runs one static batch per call, untuned CPU code slowly (0.3 s per image for an
            # untuned VGG-16): 64 real images are plenty to catch a wrong kernel
            n = min(len(x_np), TVM_PARITY_IMAGES)
            out = tvm_build.run_library(output / TVM_FILE, x_np[:n], opts.batch)
            parity["tvm"] = {**_compare(reference[:n], out, opts.tolerance, "fp32"), "runtime": "tvm relax VM, CPU",
                             "images": {**image_info, "n": n}}
            latency["tvm_cpu_batch_%d_s" % opts.batch] = tvm_build.time_library(output / TVM_FILE, opts.batch, chw)
            log(f"tvm: {TVM_FILE} parity max |diff| {parity['tvm']['max_abs_err']:.2e}; "
                f"{latency['tvm_cpu_batch_%d_s' % opts.batch] * 1e3:.3f} ms/batch "
                + (f"(onnxruntime {latency['onnxruntime_cpu_batch_%d_s' % opts.batch] * 1e3:.3f} ms)"
                   if "onnxruntime_cpu_batch_%d_s" % opts.batch in latency else ""))
        else:
            parity["tvm"] = {"passed": None, "status": "not run",
                             "reason": f"the library is for {target.triple}" + (f" + CUDA {','.join(target.cuda_arch)}"
                                                                                if target.gpu_api == "cuda" else "")
                             + "; `rsp verify` checks it on the device"}
            log(f"tvm: {TVM_FILE} for {target.triple} ({result.info['library']['elf_machine']})"
                + (f", SASS {','.join(result.info['library']['sass'])}, no CUDA source" if target.gpu_api == "cuda" else ""))

    if "tvm" not in formats:
        _record_linked(kernels, None, mode, "no TVM library in this bundle")
    trt24 = _trt_24_layers(state, names)
    if "tensorrt" in formats:
        settings = tensorrt_settings(target, trt_precision, chw, trt24, ONNX_FILE)
        atomic_write_text(output / TRT_FILE, json.dumps(settings, indent=1) + "\n")
        files.append(TRT_FILE)
        if trt_precision == "int8":
            save_tensors(output / CALIBRATION_FILE, {"images": (images[:512] * 255).round().to(torch.uint8)},
                         metadata={"layout": "NCHW uint8; divide by 255 for the model's [0, 1] input"})
            files.append(CALIBRATION_FILE)
        artifacts["tensorrt"] = {"settings": TRT_FILE, "trtexec": settings["trtexec"], "precision": trt_precision,
                                 "sparse_2_4_layers": settings["sparse_2_4_layers"], "engine_built": False,
                                 "reason": "engines are built on the device (rsp verify; tensorrt package + GPU)"}
        log(f"tensorrt: {TRT_FILE} ({trt_precision}{', 2:4 sparse layers' if settings['sparsity'] else ''}): "
            f"{settings['trtexec']}")

    checked = [p["passed"] for p in parity.values() if p.get("passed") is not None]
    out_manifest = {
        "stage": "export",
        "status": "complete" if all(checked) else "parity_failed",
        "rsp_version": __version__,
        "model": manifest["model"],
        "dense_reference": manifest.get("dense_reference") or manifest["model"],
        "source": {"path": str(source), "stage": manifest["stage"], "manifest_sha256": source_sha},
        **{k: manifest[k] for k in ("dataset", "normalization", "objective", "attack", "method", "target_sparsity")
           if k in manifest},
        "input": {**(manifest.get("input") or {}), "shape": list(chw), "range": [0.0, 1.0], "layout": "NCHW",
                  "batch": {"onnx": "dynamic" if "onnx" in artifacts else None,
                            "tvm": opts.batch if "tvm" in artifacts else None},
                  "normalization_inside_model": True},
        "sparsity": sparsity,
        "layers": [{**r, "trt_2_4": trt24[r["name"][: -len(".weight")]]} for r in layers],
        "metrics": manifest.get("metrics"),
        "target": {"name": target.name, "description": target.description, "registry": target.as_dict()},
        "formats": formats,
        "artifacts": artifacts,
        "parity": parity,
        "latency_here": {k: round(v, 7) for k, v in latency.items()} | {"machine": os.uname().machine,
                                                                        "threads": torch.get_num_threads()},
        "kernels": kernels,
        "export": {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.__dict__.items()},
                   "time_s": round(time.perf_counter() - t0, 2)},
    }
    written = write_manifest(output, out_manifest, files)
    # the file hashes in the manifest prove integrity, not origin: this one hash pins the whole bundle
    log(f"manifest sha256 {sha256_file(output / MANIFEST)} ({output / MANIFEST}): "
        "rsp verify --expect-sha256 with it refuses any other bundle")
    failed = [f"{k} max |diff| {v['max_abs_err']:.3g} > {v['tolerance']:.3g}" for k, v in parity.items()
              if v.get("passed") is False]
    if failed:
        raise ParityError(f"parity check failed: {'; '.join(failed)} (bundle kept in {output}, status parity_failed)")
    return written

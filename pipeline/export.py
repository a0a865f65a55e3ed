"""rsp export: a train or structure folder -> a deployable bundle for a registry target (rsp.targets).

The formats (the target's defaults unless --format says otherwise) are plugins, one module each in
rsp.formats (the registry; `rsp export --help` lists them): each writes its files and checks its logits against PyTorch on real test
images where its runtime runs here. The bundle keeps the train-folder contract (model.safetensors + model
kwargs: rsp.load_model works on it) so that verification attacks exactly the exported numbers. The kernel
plan (which layers run rsp's sparse kernels) is made here for every bundle; the format that links the
kernels records which it linked. manifest.json (stage "export") is written last.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .artifacts import (MANIFEST, MODEL_FILE, ArtifactError, StageOutput, atomic_write_bytes, build_model,
                        check_files, check_new_output, load_tensors, read_manifest, require_complete, sha256_file)
from .formats import ExportJob, formats as registered_formats
from .formats.onnx import MIN_OPSET, export_onnx  # noqa: F401  (export_onnx: rsp.export's name for it, bench uses it)
from .formats.tensorrt import build_engine as build_tensorrt_engine  # noqa: F401  (the public name)
from .formats.tensorrt import trt_24_layers as _trt_24_layers  # noqa: F401  (tests use the old name)
from .formats.tvm import planned_kernel_layers, sparse_kernel_kind  # noqa: F401  (bench uses them from here)
from .latency import median_call_seconds
from .targets import PRECISIONS, TRT_PRECISIONS, Target, get_target

SPARSE_KERNEL_MODES = ("auto", "off", "host")
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
    registry = registered_formats()
    formats = list(dict.fromkeys(opts.formats or target.formats))
    for f in formats:
        if f not in registry:
            raise ExportError(f"unknown format {f!r}; formats: {', '.join(registry)}")
        why_not = registry[f].unsupported(target)
        if why_not:
            raise ExportError(why_not)
    return formats


def _with_requirements(formats: list[str]) -> list[str]:
    """The formats to export, in registry order: those asked for and the formats their files build on."""
    registry = registered_formats()
    wanted, todo = set(), list(formats)
    while todo:
        f = todo.pop()
        if f not in wanted:
            wanted.add(f)
            todo += registry[f].requires
    return [f for f in registry if f in wanted]


def _parity_images(manifest: dict, opts: ExportOptions) -> tuple[torch.Tensor, dict]:
    """The first N test images of the run's data set, float NCHW in [0, 1] (what the model takes)."""
    from .artifacts import SourceRun
    from .data import load_run_dataset, to_float

    source = SourceRun.of(manifest)
    splits = load_run_dataset(source.dataset, opts.data_dir)  # --data-dir, RSP_DATA_DIR or where the run was trained
    x = to_float(splits.test_x[: opts.parity_images])
    return x, {"dataset": source.dataset_name, "split": "test", "n": len(x), "first": 0}


def _chw(manifest: dict, model: torch.nn.Module, images: torch.Tensor) -> tuple[int, int, int]:
    shape = (manifest.get("input") or {}).get("shape")
    if shape and len(shape) == 3:
        return tuple(int(v) for v in shape)
    return tuple(images.shape[1:])


def _layer_names(model: torch.nn.Module) -> list[str]:
    from .sparse import sparsifiable_layers

    return [n for n, _ in sparsifiable_layers(model)]


def _kernels_module(name: str):
    """A module of rsp.kernels, or None where a dependency it imports is missing: export must not depend on the
    kernels. Any other failure (a broken kernels module) is raised, not planned around as "dense"."""
    import importlib

    try:
        return importlib.import_module(f".kernels.{name}", __package__)
    except ImportError:
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


def kernel_plan(model: torch.nn.Module, chw, target: Target, state: dict, names: list[str], batch: int, *,
                mode: str = "auto", force_sparse=(), tuned: bool = False) -> dict:
    """Per-layer kernel choice for the manifest. GPU targets (and mode "host", for the GPU its emulator stands
    in for, sm_87): rsp.kernels.costmodel.plan_model(model, input_shape, arch=, batch=). CPU targets in mode
    "auto": rsp.kernels.cpu.plan_cpu_layers for the target's mcpu, against a dense library (oneDNN timed on
    this machine where the target is this kind of CPU, else the recorded figures); a layer that is not sparse
    runs rsp's dense kernel (or, tuned, TVM's tuned schedule). Otherwise "dense" with the reason.
    force_sparse marks layers sparse whatever the estimate ("forced"). "linked" stays False here: the TVM
    build links the kernels and records which (rsp.formats.tvm.record_linked)."""
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


# --- the stage ----------------------------------------------------------------------------------------


def check_tools(formats, opts: ExportOptions) -> None:
    """What the formats need is installed, and each format-only option has its format: one line before any
    work (rsp export, and rsp pipeline before it trains)."""
    exported = _with_requirements(list(formats))
    for name, fmt in registered_formats().items():
        problem = fmt.check_export_options(opts, name in exported)
        if problem:
            raise ExportError(problem)
    for name in exported:
        missing = registered_formats()[name].missing_tools()
        if missing:
            raise ExportError(missing)


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
    if opts.force_sparse and mode == "off":
        raise ExportError("force_sparse needs --sparse-kernels auto or host")
    check_tools(formats, opts)
    manifest = _check_source(source)
    check_new_output(output, source)
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
    held = StageOutput.open(output)  # the one writer of output until it is sealed
    files = [MODEL_FILE]
    # the exact reference numbers, byte for byte: verify attacks what was exported
    atomic_write_bytes(output / MODEL_FILE, (source / MODEL_FILE).read_bytes())
    source_sha = sha256_file(source / MANIFEST)
    registry = registered_formats()
    job = ExportJob(model=model, chw=chw, state=state, names=names, target=target, opts=opts, precision=precision,
                    trt_precision=trt_precision, output=output, source=manifest, source_sha256=source_sha,
                    layers=layers, sparsity=sparsity, images=images, reference=reference, image_info=image_info,
                    kernels=kernels, log=log)
    artifacts, parity = {}, {}
    exported = _with_requirements(formats)
    for name, fmt in registry.items():
        if name not in exported:
            fmt.not_exported(job)
            continue
        result = fmt.export(job)
        files += result.files
        artifacts[name] = result.info
        if result.parity is not None:
            parity[name] = result.parity
        job.latency.update(result.latency)
    notes: dict[str, dict] = {}
    for fmt in registry.values():
        for layer, facts in fmt.layer_notes(state, names).items():
            notes.setdefault(layer, {}).update(facts)

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
                  "batch": {name: fmt.input_batch(opts) if name in artifacts else None
                            for name, fmt in registry.items() if fmt.input_batch(opts) is not None},
                  "normalization_inside_model": True},
        "sparsity": sparsity,
        "layers": [{**r, **notes.get(r["name"][: -len(".weight")], {})} for r in layers],
        "metrics": manifest.get("metrics"),
        "target": {"name": target.name, "description": target.description, "registry": target.as_dict()},
        "formats": formats,
        "artifacts": artifacts,
        "parity": parity,
        "latency_here": {k: round(v, 7) for k, v in job.latency.items()} | {"machine": os.uname().machine,
                                                                        "threads": torch.get_num_threads()},
        "kernels": kernels,
        "export": {"options": {k: list(v) if isinstance(v, tuple) else v for k, v in opts.__dict__.items()},
                   "time_s": round(time.perf_counter() - t0, 2)},
    }
    written = held.seal(out_manifest, files)
    # the file hashes in the manifest prove integrity, not origin: this one hash pins the whole bundle
    log(f"manifest sha256 {sha256_file(output / MANIFEST)} ({output / MANIFEST}): "
        "rsp verify --expect-sha256 with it refuses any other bundle")
    failed = [f"{k} max |diff| {v['max_abs_err']:.3g} > {v['tolerance']:.3g}" for k, v in parity.items()
              if v.get("passed") is False]
    if failed:
        raise ParityError(f"parity check failed: {'; '.join(failed)} (bundle kept in {output}, status parity_failed)")
    return written

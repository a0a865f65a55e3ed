"""tensorrt: TensorRT engines must be built on the device that runs them: the bundle carries the ONNX model,
tensorrt.json (precision, 2:4 layers, shapes) and the matching trtexec command, and for int8 the calibration
images; `rsp verify` builds and caches the engine where the tensorrt package and a GPU are present."""

from __future__ import annotations

import json
from pathlib import Path

from . import Exported, ExportJob, Format, register
from .onnx import INPUT_NAME, ONNX_FILE, OUTPUT_NAME, dense_onnx

TRT_FILE = "tensorrt.json"
CALIBRATION_FILE = "calibration.safetensors"
CALIBRATION_IMAGES = 512


def trt_24_layers(state: dict, names: list[str]) -> dict[str, bool]:
    """Which layers TensorRT would run as 2:4 sparse: it wants 2 zeros in every 4 consecutive *input channels*
    for each (output channel, kernel position): the grouping `rsp structure --nm 2:4` projects onto."""
    out = {}
    for n in names:
        w = state[f"{n}.weight"]
        w = w.permute(0, 2, 3, 1) if w.dim() == 4 else w  # (K, R, S, C): input channels innermost
        c = w.shape[-1]
        out[n] = bool(c % 4 == 0 and ((w.reshape(-1, 4) != 0).sum(1) <= 2).all())
    return out


def tensorrt_settings(target, precision: str, chw, trt24: dict[str, bool], onnx_file: str) -> dict:
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
                     f"build_tensorrt_engine calibrates with {CALIBRATION_FILE}" if precision == "int8" else
                     "build the engine on the device that runs it (TensorRT engines are not portable)")}


def build_engine(bundle: str | Path, cache_dir: str | Path | None = None, log=print) -> Path:
    """Build (or reuse) the TensorRT engine of an export bundle on this machine, with its tensorrt.json
    settings and calibration images: rsp.runtimes.build_tensorrt_engine (the builder verify uses), cached
    under cache_dir (default BUNDLE/engines). Needs the tensorrt package and an NVIDIA GPU."""
    from ..artifacts import load_tensors, read_manifest
    from ..runtimes import build_tensorrt_engine

    bundle = Path(bundle)
    read_manifest(bundle, stage="export")
    settings = json.loads((bundle / TRT_FILE).read_text())
    calibration = (load_tensors(bundle / settings["calibration"])["images"]
                   if settings.get("calibration") else None)
    return build_tensorrt_engine(bundle / settings["onnx"], settings, Path(cache_dir) if cache_dir else bundle / "engines",
                                 calibration, log)


@register
class TensorRT(Format):
    name = "tensorrt"
    export_help = "TensorRT build settings for the ONNX model (the engine is built on the device by rsp verify)"
    verify_help = "a TensorRT engine built and cached on this GPU"
    files = (TRT_FILE, CALIBRATION_FILE)
    requires = ("onnx",)  # the engine is built from the bundle's ONNX model
    priority = 30
    dense_runtime_name = "tensorrt"

    def unsupported(self, target) -> str | None:
        if not target.tensorrt:
            return f"target {target.name} has no NVIDIA GPU: the tensorrt format needs one"
        return None

    def layer_notes(self, state: dict, names: list[str]) -> dict[str, dict]:
        return {n: {"trt_2_4": ok} for n, ok in trt_24_layers(state, names).items()}

    def export(self, job: ExportJob) -> Exported:
        import torch

        from ..artifacts import atomic_write_text, save_tensors

        settings = tensorrt_settings(job.target, job.trt_precision, job.chw, trt_24_layers(job.state, job.names), ONNX_FILE)
        atomic_write_text(job.output / TRT_FILE, json.dumps(settings, indent=1) + "\n")
        files = [TRT_FILE]
        if job.trt_precision == "int8":
            save_tensors(job.output / CALIBRATION_FILE,
                         {"images": (job.images[:CALIBRATION_IMAGES] * 255).round().to(torch.uint8)},
                         metadata={"layout": "NCHW uint8; divide by 255 for the model's [0, 1] input"})
            files.append(CALIBRATION_FILE)
        info = {"settings": TRT_FILE, "trtexec": settings["trtexec"], "precision": job.trt_precision,
                "sparse_2_4_layers": settings["sparse_2_4_layers"], "engine_built": False,
                "reason": "engines are built on the device (rsp verify; tensorrt package + GPU)"}
        job.log(f"tensorrt: {TRT_FILE} ({job.trt_precision}{', 2:4 sparse layers' if settings['sparsity'] else ''}): "
                f"{settings['trtexec']}")
        return Exported(files, info)

    def runtime(self, bundle, manifest, chw, opts, log):
        """Build (or reuse) the engine of the bundle's ONNX with its tensorrt.json settings, cached in OUTPUT/engines."""
        from ..artifacts import load_tensors
        from ..runtimes import RuntimeUnavailable, build_tensorrt_engine, tensorrt_missing, tensorrt_runtime

        bundle = Path(bundle)
        if not (bundle / TRT_FILE).is_file():
            raise RuntimeUnavailable(f"{bundle / TRT_FILE} not found: export with --format tensorrt")
        missing = tensorrt_missing()
        if missing:
            raise RuntimeUnavailable(f"a TensorRT engine is built on the GPU that runs it; this machine has {missing}")
        settings = json.loads((bundle / TRT_FILE).read_text())
        calib = None
        if settings.get("calibration"):
            calib = load_tensors(bundle / settings["calibration"])["images"].float() / 255
        cache = Path(opts.output) / "engines"

        def other(onnx_path: Path, label: str):  # the dense original: same settings, no 2:4 layers
            s = {**settings, "onnx": onnx_path.name, "engine": f"dense.{settings['engine']}", "sparsity": False,
                 "sparse_2_4_layers": []}
            return tensorrt_runtime(build_tensorrt_engine(onnx_path, s, cache, calib, log), s, chw, label)

        try:
            engine = build_tensorrt_engine(bundle / settings["onnx"], settings, cache, calib, log)
            return tensorrt_runtime(engine, settings, chw, load_other=other)
        except RuntimeUnavailable:
            raise
        except Exception as exc:  # TensorRT's own failures (out of memory, an unsupported layer): one line
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise RuntimeUnavailable(f"TensorRT could not build or load the engine ({reason})") from None

    def dense_twin(self, dense, chw, tmp, runtime, manifest, opts, log):
        # the ONNX numbers the bundle has (the onnx backend's twin stays fp32)
        precision = ((manifest.get("artifacts") or {}).get("onnx") or {}).get("precision", "fp32")
        return runtime.load_other(dense_onnx(dense, chw, tmp, precision), "tensorrt-dense")

    def dense_runtime(self, dense, chw, tmp, runtimes, opts):
        if self.name not in runtimes:  # an engine is only built where the bundle's own one runs
            return None
        return runtimes[self.name].load_other(dense_onnx(dense, chw, tmp, "fp32"), self.name)

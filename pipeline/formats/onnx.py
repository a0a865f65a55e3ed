"""onnx: model.onnx, the (shrunk) model, fp32 or fp16, opset >= 17, dynamic batch, sparsity in its metadata;
onnxruntime logits are checked against PyTorch on real test images as part of the export. Verify runs it
on onnxruntime (CUDA first where present); onnxruntime on CPU is also a dense runtime verify times the dense
original on."""

from __future__ import annotations

import io
import json
import time
import warnings
from pathlib import Path

from . import Exported, ExportJob, Format, compare_logits, register

ONNX_FILE = "model.onnx"
MIN_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model, chw, precision: str, opset: int, metadata: dict[str, str]) -> bytes:
    """ONNX bytes of the model with a dynamic batch axis, checked by onnx.checker."""
    import copy

    import onnx
    import torch

    from .. import __version__
    from ..artifacts import ArtifactError

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
        raise ArtifactError(f"the exported ONNX model fails onnx.checker: {str(exc).splitlines()[0]}") from None
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


def dense_onnx(dense, chw, tmp: Path, precision: str) -> Path:
    """The dense original as ONNX under tmp (written once per verify run: the runtimes that take it share it)."""
    path = Path(tmp) / f"dense.{precision}.onnx"
    if not path.is_file():
        path.write_bytes(export_onnx(dense, chw, precision, MIN_OPSET, {}))
    return path


@register
class Onnx(Format):
    name = "onnx"
    export_help = "the ONNX model (dynamic batch), checked against PyTorch with onnxruntime"
    verify_help = "onnxruntime (CUDA first where present)"
    files = (ONNX_FILE,)
    priority = 10
    same_dense_runtime = "onnxruntime"
    dense_runtime_name = "onnxruntime"

    def missing_tools(self) -> str | None:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return f"the onnx format needs onnx and onnxruntime (pip install 'rsp[export]'): {exc}"
        return None

    def input_batch(self, opts):
        return "dynamic"

    def export(self, job: ExportJob) -> Exported:
        import numpy as np
        import torch

        from .. import __version__
        from ..artifacts import atomic_write_bytes
        from ..latency import median_call_seconds
        from ..runtimes import onnx_session, run_onnx

        t = time.perf_counter()
        opts, chw, manifest = job.opts, job.chw, job.source
        meta = {"rsp.version": __version__, "rsp.model": json.dumps(manifest["model"]),
                "rsp.sparsity": f"{job.sparsity:.6f}",
                "rsp.layers": json.dumps([{k: r[k] for k in ("name", "nonzero", "numel")} for r in job.layers]),
                "rsp.input": json.dumps({"shape": ["batch", *chw], "range": [0.0, 1.0], "layout": "NCHW"}),
                "rsp.normalization": json.dumps(manifest.get("normalization") or {"inside_model": True}),
                "rsp.target": job.target.name, "rsp.precision": job.precision,
                "rsp.source_manifest_sha256": job.source_sha256}
        data = export_onnx(job.model, chw, job.precision, opts.opset, meta)
        atomic_write_bytes(job.output / ONNX_FILE, data)
        summary = onnx_summary(data)
        session = onnx_session(data, opts.threads)
        x_np, reference = job.images.numpy(), job.reference
        out = run_onnx(session, x_np)
        one = run_onnx(session, x_np[:1])  # a second batch size: the batch axis really is dynamic
        parity = {**compare_logits(reference, out, opts.tolerance, job.precision), "runtime": "onnxruntime CPU",
                  "batch_1_max_abs_err": float(np.abs(one - reference[:1]).max()), "images": job.image_info}
        parity["passed"] &= parity["batch_1_max_abs_err"] <= parity["tolerance"]
        latency = {"onnxruntime_cpu_batch_%d_s" % opts.batch:
                   median_call_seconds(lambda: run_onnx(session, x_np[: opts.batch]))}
        info = {"file": ONNX_FILE, "precision": job.precision, "opset": summary["opset"],
                "dynamic_batch": True, "input": INPUT_NAME, "output": OUTPUT_NAME,
                "inputs": summary["inputs"], "outputs": summary["outputs"], "nodes": summary["nodes"],
                "weight_sparsity": summary["weight_sparsity"], "checker": "onnx.checker full_check passed",
                "exporter": f"torch.onnx (TorchScript) {torch.__version__}",
                "note": "BatchNorm is folded into the convolutions; zeros stay zeros",
                "time_s": round(time.perf_counter() - t, 2)}
        job.log(f"onnx: {ONNX_FILE} opset {summary['opset']} {job.precision}, weight sparsity "
                f"{summary['weight_sparsity']:.4f}, parity max |diff| {parity['max_abs_err']:.2e} on {len(x_np)} images")
        return Exported([ONNX_FILE], info, parity, latency)

    def runtime(self, bundle, manifest, chw, opts, log):
        from ..runtimes import onnx_runtime

        return onnx_runtime(Path(bundle) / ONNX_FILE, chw, opts.threads)

    def dense_twin(self, dense, chw, tmp, runtime, manifest, opts, log):
        from ..runtimes import onnx_runtime

        return onnx_runtime(dense_onnx(dense, chw, tmp, "fp32"), chw, opts.threads, "onnx-dense")

    def dense_runtime(self, dense, chw, tmp, runtimes, opts):
        from ..runtimes import onnx_runtime

        return onnx_runtime(dense_onnx(dense, chw, tmp, "fp32"), chw, opts.threads, "onnxruntime")

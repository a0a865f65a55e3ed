"""The runtimes an rsp folder can be evaluated on: the PyTorch twin, onnxruntime, the TVM Relax VM.

Each gives `predict(x) -> logits` (float NCHW in [0, 1], any batch, torch tensors in and out) and
`timer(batch) -> callable returning seconds` for latency. verify attacks the PyTorch twin (white-box)
and runs the adversarial examples through the others: what ships is what is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import ArtifactError
from .latency import cuda_event_timer, wall_timer

ONNX_FILE = "model.onnx"
TVM_FILE = "model.tvm.so"


class RuntimeUnavailable(ArtifactError):
    """The folder lacks the artifact, or this machine lacks the runtime for it (exit 2)."""


@dataclass
class Runtime:
    name: str
    predict: Callable[[torch.Tensor], torch.Tensor]
    make_timer: Callable[[int], Callable[[], float]]
    info: dict = field(default_factory=dict)
    batches: tuple[int, ...] | None = None  # None: any batch; else the static batches it was built for


def torch_runtime(model: torch.nn.Module, chw: tuple[int, int, int], device: str = "cpu", label: str = "torch") -> Runtime:
    dev = torch.device(device)
    model = model.to(dev).eval()

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([model(x[i: i + 256].to(dev)).float().cpu() for i in range(0, len(x), 256)])

    def make_timer(batch: int):
        x = torch.rand(batch, *chw, device=dev)

        @torch.no_grad()
        def run():
            model(x)

        return cuda_event_timer(run) if dev.type == "cuda" else wall_timer(run)

    info = {"runtime": f"torch {torch.__version__}", "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}
    return Runtime(label, predict, make_timer, info)


def onnx_session(data: bytes | str, threads: int | None = None, gpu: bool = False):
    """An onnxruntime session from a file path or the model bytes (CPU; CUDA first when gpu and available)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads or torch.get_num_threads()
    so.log_severity_level = 3
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(data, sess_options=so, providers=providers)


def run_onnx(session, x: np.ndarray) -> np.ndarray:
    """Logits (float32) of a session for float images x; an fp16 model gets fp16 input."""
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    return session.run(None, {session.get_inputs()[0].name: x.astype(dtype)})[0].astype(np.float32)


def onnx_runtime(path: Path, chw: tuple[int, int, int], threads: int | None = None, label: str = "onnx") -> Runtime:
    if not Path(path).is_file():
        raise RuntimeUnavailable(f"{path} not found: export with --format onnx")
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeUnavailable("the onnx backend needs onnxruntime: pip install 'rsp[export]'") from None
    sess = onnx_session(str(path), threads, gpu=True)
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32

    def predict(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().cpu().numpy()
        return torch.cat([torch.from_numpy(run_onnx(sess, xs[i: i + 256])) for i in range(0, len(xs), 256)])

    def make_timer(batch: int):
        feed = {inp.name: np.random.default_rng(0).random((batch, *chw), dtype=np.float32).astype(dtype)}
        return wall_timer(lambda: sess.run(None, feed))

    info = {"runtime": f"onnxruntime {ort.__version__}", "providers": sess.get_providers(), "file": str(path)}
    return Runtime(label, predict, make_timer, info)


def tvm_runtime(path: Path, chw: tuple[int, int, int], batch: int, label: str = "tvm") -> Runtime:
    if not Path(path).is_file():
        raise RuntimeUnavailable(f"{path} not found: export with --format tvm")
    try:
        import tvm
        from tvm import relax
    except ImportError:
        raise RuntimeUnavailable("the tvm backend needs apache-tvm 0.27: pip install 'rsp[export]'") from None
    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as exc:  # a library for another machine (aarch64, CUDA) cannot load here
        raise RuntimeUnavailable(f"cannot load {path} on this machine ({str(exc).splitlines()[0][:160]}); "
                                 "run verify on the target device") from None
    dev = tvm.cpu()
    vm = relax.VirtualMachine(lib, dev)

    def run_batch(xb: np.ndarray) -> np.ndarray:
        res = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(xb, dtype=np.float32)))
        res = res[0] if not hasattr(res, "numpy") else res
        return res.numpy()

    def predict(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().cpu().numpy().astype(np.float32)
        outs = []
        for i in range(0, len(xs), batch):  # static batch: pad the last chunk
            chunk = xs[i: i + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(run_batch(chunk)[:n])
        return torch.from_numpy(np.concatenate(outs))

    def make_timer(b: int):
        if b != batch:
            raise RuntimeUnavailable(f"the TVM library was built for batch {batch}")
        x = tvm.runtime.tensor(np.zeros((batch, *chw), np.float32))
        return wall_timer(lambda: vm["main"](x))

    return Runtime(label, predict, make_timer, {"runtime": f"tvm {tvm.__version__} relax VM", "device": "cpu",
                                                "file": str(path)}, batches=(batch,))

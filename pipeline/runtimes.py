"""The runtimes an rsp folder can be evaluated on: the PyTorch twin, onnxruntime, the TVM Relax VM (here or
on a remote device through TVM's RPC server), a TensorRT engine built on this GPU.

Each gives `predict(x) -> logits` (float NCHW in [0, 1], any batch, torch tensors in and out) and
`timer(batch) -> callable returning seconds` for latency. verify attacks the PyTorch twin (white-box)
and runs the adversarial examples through the others: what ships is what is scored.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import ArtifactError, atomic_write_bytes, sha256_file
from .latency import cuda_event_timer, wall_timer

# a TVM RPC server serves one client at a time and leaves the others unanswered
RPC_SILENT = "the host is down or firewalled, or its server is busy with another client: a tracker queues clients"
RPC_CONNECT_TIMEOUT_S = float(os.environ.get("RSP_RPC_TIMEOUT_S", "30"))  # connect and handshake


class RuntimeUnavailable(ArtifactError):
    """The folder lacks the artifact, or this machine lacks the runtime for it (exit 2)."""


@dataclass
class Runtime:
    name: str
    predict: Callable[[torch.Tensor], torch.Tensor]
    make_timer: Callable[[int], Callable[[], float]]
    info: dict = field(default_factory=dict)
    batches: tuple[int, ...] | None = None  # None: any batch; else the static batches it was built for
    # the same runtime with the same settings for another artifact file (verify's dense original); None: n/a
    load_other: Callable[[Path, str], "Runtime"] | None = None
    # releases what the runtime holds on a device (an RPC session: the Python server serves one client at a time)
    close: Callable[[], None] | None = None


def _reason(exc: BaseException) -> str:
    """The informative line of an exception (TVM's RPC errors start with a generic header line)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith("File ")]
    useful = [ln for ln in lines if not ln.endswith(":")]
    return ((useful or lines or [type(exc).__name__])[0])[:200]


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


def _tvm():
    try:
        import tvm
        from tvm import relax  # noqa: F401
    except ImportError:
        raise RuntimeUnavailable("the tvm backend needs apache-tvm 0.27: pip install 'rsp[export]'") from None
    return tvm


def _static_batches(run_batch: Callable[[np.ndarray], np.ndarray], batch: int):
    """predict() for a library built for one static batch: feed chunks, pad the last one."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        xs = x.detach().cpu().numpy().astype(np.float32)
        outs = []
        for i in range(0, len(xs), batch):
            chunk = xs[i: i + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(run_batch(np.ascontiguousarray(chunk))[:n])
        return torch.from_numpy(np.concatenate(outs))

    return predict


def _vm_device_timer(vm, dev, x, name: str) -> Callable[[], float]:
    """TVM's own timer on the device (one measured call per tick; TVM adds one untimed warm-up call): no
    RPC round trip or host transfer is counted, and GPU work is timed on the device."""
    vm.save_function("main", name, x, include_return=False)
    evaluator = vm.time_evaluator(name, dev, number=1, repeat=1)
    return lambda: float(evaluator().mean)


def tvm_runtime(path: Path, chw: tuple[int, int, int], batch: int, label: str = "tvm", device: str = "cpu") -> Runtime:
    """The Relax VM on this machine; device "cuda" for a library with CUDA kernels (a GPU box, a Jetson)."""
    if not Path(path).is_file():
        raise RuntimeUnavailable(f"{path} not found: export with --format tvm")
    tvm = _tvm()
    from tvm import relax

    dev = tvm.cuda(0) if device == "cuda" else tvm.cpu()
    if not dev.exist:
        raise RuntimeUnavailable(f"{path} has CUDA kernels: TVM sees no CUDA GPU here (no GPU, or a driver older "
                                 "than the CUDA the TVM runtime links); use --rpc to a device")
    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as exc:  # a library for another machine (aarch64, CUDA) cannot load here
        raise RuntimeUnavailable(f"cannot load {path} on this machine ({str(exc).splitlines()[0][:160]}); "
                                 "run verify on the target device") from None
    vm = relax.VirtualMachine(lib, dev)

    def run_batch(xb: np.ndarray) -> np.ndarray:
        res = vm["main"](tvm.runtime.tensor(xb, device=dev))
        res = res[0] if not hasattr(res, "numpy") else res
        return res.numpy()

    def make_timer(b: int):
        if b != batch:
            raise RuntimeUnavailable(f"the TVM library was built for batch {batch}")
        x = tvm.runtime.tensor(np.zeros((batch, *chw), np.float32), device=dev)
        if device == "cuda":
            return _vm_device_timer(vm, dev, x, f"rsp_timed_{b}")
        return wall_timer(lambda: vm["main"](x))

    info = {"runtime": f"tvm {tvm.__version__} relax VM", "device": "cuda:0" if device == "cuda" else "cpu",
            "file": str(path)}
    return Runtime(label, _static_batches(run_batch, batch), make_timer, info, batches=(batch,))


# --- TVM over RPC (a Jetson running `python -m tvm.exec.rpc_server`) ----------------------------------


# Threads left blocked inside TVM's C++ connect. The interpreter aborts at exit while one is still in C++
# ("terminate called without an active exception"), so the CLI ends the process with os._exit instead.
ABANDONED_THREADS: list[threading.Thread] = []


def _with_timeout(fn, seconds: float, what: str, why: str = ""):
    """fn() in a daemon thread: TVM's blocking connect has no timeout, and a server busy with another client
    never answers the handshake. On time-out the thread is abandoned (verify exits right after)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        ABANDONED_THREADS.append(t)
        raise RuntimeUnavailable(f"{what}: no answer within {seconds:.0f} s{why}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _reachable(host: str, port: int, timeout: float, what: str, hint: str) -> None:
    """A plain TCP connect with a time-out first: an unreachable or firewalled host fails here, in Python,
    instead of in a C++ connect that cannot be interrupted."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:  # a busy server's backlog (TVM listens with 1) is full too: SYNs go unanswered
        raise RuntimeUnavailable(f"{what}: no answer within {timeout:.0f} s ({RPC_SILENT})") from None
    except OSError as exc:
        raise RuntimeUnavailable(f"{what} ({exc.strerror or exc}); {hint}") from None


def _is_tracker(host: str, port: int, timeout: float) -> bool:
    """Speak the first word of the tracker protocol. A TVM tracker echoes its magic number; the Python RPC
    server closes the connection on any other word."""
    from tvm.rpc import base

    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        reply = sock.recv(4)
    return len(reply) == 4 and struct.unpack("<i", reply)[0] == base.RPC_TRACKER_MAGIC


# A key no server holds, ending in a blank line: a TVM RPC server answers it with RPC_CODE_MISMATCH and
# closes (no session starts); a line-based server (HTTP) answers its "request"; an SSH server its banner.
_PROBE_KEY = "rsp-probe\r\n\r\n"


def _check_rpc_server(host: str, port: int, address: str, timeout: float) -> None:
    """Raise when what listens on HOST:PORT is not a TVM RPC server: a non-TVM server is named as such, not
    reported as a host that is down. A silent peer (a TVM server busy with another client, or a server that
    waits for something else) fails here too, in Python, without entering TVM's uninterruptible connect."""
    from tvm.rpc import base

    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(struct.pack("<ii", base.RPC_MAGIC, len(_PROBE_KEY)) + _PROBE_KEY.encode())
            reply = sock.recv(64)
    except TimeoutError:
        raise RuntimeUnavailable(f"cannot connect to the TVM RPC server at {address}: no answer within {timeout:.0f} s "
                                 "to the handshake (the host is up: a TVM RPC server busy with another client, a "
                                 "tracker queues clients; or not a TVM RPC server)") from None
    except OSError:
        return  # reset or refused mid-probe: TVM's own connect below says what it finds
    if len(reply) >= 4 and struct.unpack("<i", reply[:4])[0] == base.RPC_CODE_MISMATCH:
        return  # a TVM RPC server, free: the real connect follows
    if reply:
        shown = reply[:24].decode("ascii", errors="replace").splitlines()[0] if reply[:1].isascii() else reply[:8].hex()
        raise RuntimeUnavailable(f"{address} is not a TVM RPC server: it answered the handshake with {shown!r} "
                                 "(another service on that port?)")


def rpc_session(address: str, key: str | None = None, timeout: float = RPC_CONNECT_TIMEOUT_S):
    """An RPC session with a device: its server at HOST:PORT, or through the tracker at HOST:PORT with key."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RuntimeUnavailable(f"--rpc must be HOST:PORT (e.g. 192.168.1.20:9090), got {address!r}")
    host, port = host.strip("[]"), int(port)
    _tvm()
    from tvm import rpc

    where = f"the TVM RPC {'tracker' if key else 'server'} at {address}"
    hint = ("start it on the device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port " + str(port)
            if not key else "start it with python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port " + str(port))
    _reachable(host, port, timeout, f"cannot connect to {where}", hint)
    try:
        if not key:
            _check_rpc_server(host, port, address, timeout)
            # the Python server serves one client at a time: a busy one accepts and then never answers
            return _with_timeout(lambda: rpc.connect(host, port), timeout, f"cannot connect to {where}",
                                 f" ({RPC_SILENT})")
        if not _is_tracker(host, port, timeout):
            raise RuntimeUnavailable(f"{address} is not a TVM RPC tracker (drop --rpc-key to connect to a server)")
        tracker = rpc.connect_tracker(host, port)
        queues = tracker.summary().get("queue_info", {})
        if key not in queues:
            raise RuntimeUnavailable(f"the tracker at {address} has no device with key {key!r} "
                                     f"(registered: {', '.join(sorted(queues)) or 'none'})")
        return tracker.request(key, max_retry=1)  # waits while every such device is busy
    except RuntimeUnavailable:
        raise
    except Exception as exc:
        raise RuntimeUnavailable(f"cannot connect to {where} ({_reason(exc)}); {hint}") from None


def tvm_rpc_runtime(session, address: str, path: Path, chw: tuple[int, int, int], batch: int, device: str = "cpu",
                    label: str = "tvm-rpc", upload_as: str | None = None) -> Runtime:
    """The Relax VM of a library uploaded to the remote device (as upload_as, default its own file name);
    latency by TVM's timer on the device."""
    if not Path(path).is_file():
        raise RuntimeUnavailable(f"{path} not found: export with --format tvm")
    tvm = _tvm()
    from tvm import relax

    try:
        dev = session.cuda(0) if device == "cuda" else session.cpu(0)
        if not dev.exist:
            raise RuntimeUnavailable(f"the device at {address} has no {device} device for {Path(path).name}")
        upload_as = upload_as or Path(path).name
        session.upload(str(path), upload_as)
        vm = relax.VirtualMachine(session.load_module(upload_as), dev)
    except RuntimeUnavailable:
        raise
    except Exception as exc:
        raise RuntimeUnavailable(f"the device at {address} cannot run {path} ({_reason(exc)}): "
                                 "was the bundle exported for its CPU and GPU?") from None

    # everything that keeps the connection open lives here, so close() can let it go
    held = {"vm": vm, "dev": dev, "session": session}
    del vm, dev

    def _held():
        if not held:
            raise RuntimeUnavailable(f"the RPC runtime {label} for {address} was closed")
        return held["vm"], held["dev"]

    def run_batch(xb: np.ndarray) -> np.ndarray:
        vm, dev = _held()
        # the stateful calls: a tuple result cannot travel back over RPC, its fields can
        vm.set_input("main", tvm.runtime.tensor(xb, device=dev))
        vm.invoke_stateful("main")
        out = vm.get_outputs("main")
        while isinstance(out, (tuple, list)):
            out = out[0]
        return out.numpy()

    def make_timer(b: int):
        if b != batch:
            raise RuntimeUnavailable(f"the TVM library was built for batch {batch}")
        vm, dev = _held()
        x = tvm.runtime.tensor(np.zeros((batch, *chw), np.float32), device=dev)
        return _vm_device_timer(vm, dev, x, f"rsp_timed_{b}")

    info = {"runtime": f"tvm {tvm.__version__} relax VM over RPC", "rpc": address, "device": f"remote {device}:0",
            "file": str(path), "timer": "TVM time_evaluator on the remote device"}
    try:  # best effort: what the remote says about itself
        if device == "cuda":
            info["remote_device_name"] = held["dev"].device_name
        info["remote_triple"] = session.get_function("target.llvm_get_system_triple")()
        info["remote_cpu"] = session.get_function("target.llvm_get_system_cpu")()
    except Exception:  # a runtime-only TVM on the device has no LLVM functions
        pass

    def other(p: Path, lab: str) -> Runtime:
        _held()
        return tvm_rpc_runtime(held["session"], address, p, chw, batch, device, lab, upload_as=f"{lab}.tvm.so")

    return Runtime(label, _static_batches(run_batch, batch), make_timer, info, batches=(batch,), load_other=other,
                   close=held.clear)


def close_runtimes(runtimes) -> None:
    """Release every runtime's device resources, then collect: a session kept only by a reference cycle (an
    exception's traceback, a closure) would otherwise stay open until some later collection, and a
    single-client RPC server would refuse the next verify in this process."""
    closed = False
    for rt in runtimes:
        if rt is not None and rt.close is not None:
            rt.close()
            closed = True
    if closed:
        import gc

        gc.collect()


# --- TensorRT (engines are built on the device that runs them) ----------------------------------------


def tensorrt_missing() -> str | None:
    """Why no TensorRT engine can be built or run here (None: it can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "no tensorrt package (NVIDIA's wheels, or JetPack's python3-libnvinfer)"
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def _calibrator(trt, images: torch.Tensor, batch: int):
    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.batches = [images[i: i + batch].float().cuda().contiguous()
                            for i in range(0, len(images) - batch + 1, batch)]
            self.i = 0

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self.i >= len(self.batches):
                return None  # calibration done
            self.i += 1
            return [int(self.batches[self.i - 1].data_ptr())]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    return Calibrator()


def build_tensorrt_engine(onnx_path: Path, settings: dict, cache_dir: Path, calibration: torch.Tensor | None = None,
                          log=print) -> Path:
    """The engine of an ONNX model with export's settings (the tensorrt format's), built on this GPU or reused from
    cache_dir. Key: sha256 of the ONNX file, the settings, the TensorRT version and the GPU name."""
    import tensorrt as trt

    gpu = torch.cuda.get_device_name()
    key = hashlib.sha256(json.dumps([sha256_file(onnx_path), settings, trt.__version__, gpu], sort_keys=True).encode())
    path = Path(cache_dir) / f"{Path(settings['engine']).stem}.{key.hexdigest()[:16]}.engine"
    if path.is_file():
        log(f"tensorrt: reusing {path}")
        return path
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)  # TensorRT 8 needs it; 10 ignores it
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        raise RuntimeUnavailable(f"TensorRT cannot parse {onnx_path}: {parser.get_error(0)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings["workspace_mib"]) << 20)
    if settings["precision"] in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: fp16 for the layers without int8 kernels
    if settings.get("sparsity"):
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)  # trtexec --sparsity=enable: 2:4 layers on sparse tensor cores
    if settings.get("dla"):
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = 0
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()  # dynamic batch: min 1, opt opt_batch, max max_batch
    profile.set_shape(settings["input"], *(tuple(settings["shapes"][k]) for k in ("min", "opt", "max")))
    config.add_optimization_profile(profile)
    if settings["precision"] == "int8":
        if calibration is None:
            raise RuntimeUnavailable("an int8 TensorRT engine needs the bundle's calibration images")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, calibration, int(settings["shapes"]["opt"][0]))
        config.set_calibration_profile(profile)
    t = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeUnavailable(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write_bytes(path, bytes(serialized))
    log(f"tensorrt: built {path} in {time.perf_counter() - t:.1f} s on {gpu} (TensorRT {trt.__version__})")
    return path


def tensorrt_runtime(engine_path: Path, settings: dict, chw: tuple[int, int, int], label: str = "tensorrt",
                     load_other: Callable[[Path, str], Runtime] | None = None) -> Runtime:
    """A TensorRT engine on torch CUDA tensors (execute_async_v3 on the current stream; CUDA-event timer)."""
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeUnavailable(f"TensorRT {trt.__version__} cannot load {engine_path}")
    inp, out = settings["input"], settings["output"]
    dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
    in_dt, out_dt = dtypes[engine.get_tensor_dtype(inp)], dtypes[engine.get_tensor_dtype(out)]
    lo, hi = int(settings["shapes"]["min"][0]), int(settings["shapes"]["max"][0])
    dev = torch.device("cuda")
    bound: dict[int, tuple] = {}

    def bind(b: int):
        """An execution context with its own input/output buffers for batch b (a few sizes only)."""
        if b not in bound:
            ctx = engine.create_execution_context()
            x = torch.zeros(b, *chw, dtype=in_dt, device=dev)
            ctx.set_input_shape(inp, tuple(x.shape))
            y = torch.empty(tuple(ctx.get_tensor_shape(out)), dtype=out_dt, device=dev)
            ctx.set_tensor_address(inp, x.data_ptr())
            ctx.set_tensor_address(out, y.data_ptr())
            bound[b] = (ctx, x, y)
        return bound[b]

    def execute(ctx) -> None:
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {engine_path}")

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i in range(0, len(x), hi):
            chunk = x[i: i + hi]
            n = len(chunk)
            b = min(hi, max(lo, 1 << (n - 1).bit_length()))  # powers of two: few contexts, little padding
            ctx, xb, yb = bind(b)
            xb.zero_()
            xb[:n].copy_(chunk.to(dev, in_dt))
            execute(ctx)
            outs.append(yb[:n].float().cpu())  # .cpu() waits for the stream
        return torch.cat(outs)

    def make_timer(b: int):
        if not lo <= b <= hi:
            raise RuntimeUnavailable(f"the TensorRT engine takes batches {lo}..{hi}")
        ctx, xb, _ = bind(b)
        xb.uniform_()
        return cuda_event_timer(lambda: execute(ctx))  # inputs stay on the GPU: no host transfer is timed

    info = {"runtime": f"tensorrt {trt.__version__}", "device": torch.cuda.get_device_name(), "engine": str(engine_path),
            "precision": settings["precision"], "sparse_2_4": bool(settings.get("sparsity")), "batches": [lo, hi],
            "cuda": torch.version.cuda, "timer": "CUDA events"}
    return Runtime(label, predict, make_timer, info, batches=tuple(range(lo, hi + 1)), load_other=load_other)

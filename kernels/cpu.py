"""Sparse (and dense) convolution and linear kernels for CPUs, generated per layer, and when they pay.

A layer's unit (``generate_cpu``) holds its non-zeros as constants (CSR rows of the GEMM view, per
non-zero its absolute offset in the packed input of a fixed per-layer chunk layout, the values as exact
hex floats) and instantiates the direct sparse convolution of ``cpu_kernels.h`` for the layer's geometry
(``rsp_cpu::run<L>``, a constexpr layer): vectorised over output pixels (8 floats per vector, images of a
batch stacked), one broadcast and NV loads + FMAs per non-zero, no im2col, zeros never touched. What the
model does around the layer is fused (``Epilogue``: + bias of a folded BatchNorm, + residual, ReLU, 2x2 max
pool; prologue: the input normalisation, a global average pool), so a TVM library is a chain of these
kernels. ``dense=True`` builds rsp's dense kernel for a layer where sparsity does not pay (4 output rows
share each load; the weights a byte string, not a literal per value). The unit has the host symbols of
the CUDA units (``NAME_host(x, y, batch)``, ``NAME_run(x, r, y, batch)``, ``NAME_info``, with
``-DRSP_TVM_FFI`` the packed function ``NAME(x, y)`` or ``NAME(x, r, y)`` on CPU tensors), so ctypes
(``load_cpu_layer``), the Relax rewrite (``relax_link``) and ``export_library`` take it.

Unlike ``build_host`` (the CUDA kernels' emulator: ``-O1``, no FMA contraction, for bit-exact checks)
this is built to be fast (``cpu_flags``): ``-O3`` for the target's CPU (``-march=x86-64-v3`` for x86-cpu,
``-mcpu=cortex-a76`` for arm64-cpu) with FMA contraction, so its results differ from a dense convolution
by rounding only.

Threads: loaded by ctypes a call runs on the calling thread (what ``bench/kernels.py`` times against
one-thread oneDNN); inside a TVM library, layers with enough work spread their output rows over rsp's own
spinning pool (``cpu_kernels.h``: TVM's parallel launch measured slower than one thread here). The cost
model is per core either way.

``estimate_cpu`` / ``plan_cpu_layers`` choose per layer: sparse when the estimated time of this kernel
beats the dense alternative by ``min_speedup``. The dense library it is compared with (oneDNN) is timed on
this machine at export where the target is this kind of CPU (``plan_cpu_layers(measure=...)``, rsp.export.time_dense_library), else taken from the
recorded ``CPU`` figures (``dense_eff`` of the FMA peak); what a layer runs when sparse does not pay is rsp's
dense kernel (its own estimate: compute- or weight-stream-bound, ``estimate_cpu``), or TVM's schedule in a
tuned build.
``sparse_nz_vectors_per_ns`` is calibrated with ``bench/kernels.py --device cpu`` (Intel Xeon, AVX2 code,
2026-12-01): about 1.2 (non-zero x 8-lane vector) updates per ns, memory-bound on the layers' packed inputs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .codegen import HEADER_FILE, KernelSource, LayerSpec, layer_arrays
from .costmodel import plan_spec, weight_layers

CPU_HEADER_FILE = Path(__file__).with_name("cpu_kernels.h")
LANES = 8


@dataclass(frozen=True)
class CPU:
    """What the CPU cost model needs of a core (it estimates one thread for both candidates)."""

    name: str
    clock_ghz: float
    fma_lanes_per_cycle: int  # fp32 FMAs per cycle per core (2 x 8 for two AVX2 FMA ports)
    march: tuple[str, ...]  # compiler flags selecting the ISA
    # calibrated on the machine named in the module docstring with bench/kernels.py --device cpu
    sparse_nz_vectors_per_ns: float = 1.2  # (non-zero, 8-lane vector) updates per ns in the inner loop
    dense_eff: float = 0.6  # share of the FMA peak a dense conv library (oneDNN, one thread) reaches
    # TVM's untuned default x86 schedule: the dense VGG-16 (width 0.25) library ran 20.7 ms per image here,
    # 48x onnxruntime's 0.43 ms, i.e. ~2 % of the peak
    untuned_tvm_eff: float = 0.02
    pack_ns_per_value: float = 0.6  # input packing (padding, phase split) per input value
    store_ns_per_value: float = 0.3  # writing a grid row and keeping its real outputs, per grid value
    call_us: float = 2.0  # per call: scratch set-up, offset table
    # rsp's dense kernel (generate_cpu(dense=True)): (weight, 8-lane vector) updates per ns where it computes,
    # and the rate at which it streams weights it uses once (a 1-vector grid: a linear layer or a 2x2 map at
    # batch 1 reads 2-9 MB of weights per call); bench/kernels.py's `<layer>/dense/b<batch>` rows measure it
    dense_w_vectors_per_ns: float = 6.0
    weight_stream_gbps: float = 12.0


CPUS = {
    "x86-64-v3": CPU("x86-64-v3", 3.0, 16, ("-march=x86-64-v3",)),
    # Jetson Orin's Cortex-A78AE: two 128-bit NEON FMA pipes (8 fp32 FMAs per cycle); the sparse rate is an
    # estimate (half of x86's, an 8-float vector being two NEON registers) until measured on a board
    "cortex-a78ae": CPU("cortex-a78ae", 2.2, 8, ("-mcpu=cortex-a78ae",), sparse_nz_vectors_per_ns=0.9,
                        dense_w_vectors_per_ns=3.0),
    # Raspberry Pi 5 / RK3588: two 128-bit NEON FMA pipes at 2.4 GHz; estimated like the A78AE until measured
    "cortex-a76": CPU("cortex-a76", 2.4, 8, ("-mcpu=cortex-a76",), sparse_nz_vectors_per_ns=0.9,
                      dense_w_vectors_per_ns=3.0),
}


def get_cpu(name: str | None) -> CPU:
    if name in CPUS:
        return CPUS[name]
    raise ValueError(f"no CPU cost figures for {name!r}; known: {', '.join(CPUS)}")


def cpu_flags(cpu: str) -> list[str]:
    """Compiler flags of the CPU kernels for ``cpu`` (``CPUS``)."""
    # no memset/memcpy idiom calls: the kernels' short row loops are cheaper inline (cpu_kernels.h, pack)
    return ["-O3", "-std=c++17", "-ffp-contract=fast", "-fno-tree-loop-distribute-patterns", *get_cpu(cpu).march]


def _header() -> str:
    return HEADER_FILE.read_text() + "\n" + CPU_HEADER_FILE.read_text()


def _grid(spec: LayerSpec) -> tuple[int, int, int, int]:
    """(Hs, Ws, SH, SW): the stride-phase plane of one image and the strides."""
    (h, w), (ph, pw), (sh, sw) = spec.in_hw, spec.padding, spec.stride
    return -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw), sh, sw


def _hexf(v: float) -> str:
    return "0.0f" if v == 0 else f"{float(v).hex()}f"


def _int_array(name: str, values, per_line: int = 24) -> list[str]:
    vals = [str(int(v)) for v in values] or ["0"]
    body = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return [f"static constexpr int {name}[] = {{"] + [f"  {b}," for b in body] + ["};"]


def _float_array(name: str, values, per_line: int = 8) -> list[str]:
    vals = [_hexf(v) for v in values] or ["0.0f"]
    body = [", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line)]
    return [f"static constexpr float {name}[] = {{"] + [f"  {b}," for b in body] + ["};"]


# Packed input per chunk of images: about the per-core L2 of current x86 and Arm cores (every non-zero re-reads
# the chunk, so a chunk that spills to L3 runs 2-3x slower).
CHUNK_BYTES = 256 << 10
POOLS = (0, 2)


@dataclass(frozen=True)
class Epilogue:
    """What a CPU kernel does to a convolution's output row before writing it: + bias (a folded BatchNorm's
    shift), + a residual input of the convolution's output shape, ReLU, then a 2x2 / stride-2 max pool."""

    relu: bool = False
    residual: bool = False
    pool: int = 0  # 0 or 2

    def as_dict(self) -> dict:
        return {"relu": self.relu, "residual": self.residual, "pool": self.pool}


def output_shape(spec: LayerSpec, batch: int, epilogue: Epilogue = Epilogue()) -> tuple[int, ...]:
    """The kernel's output: the layer's, halved (floor) per spatial axis by a fused pool."""
    shape = spec.output_shape(batch)
    if epilogue.pool:
        if len(shape) != 4:
            raise ValueError("a fused max pool needs a convolution")
        shape = (*shape[:2], shape[2] // 2, shape[3] // 2)
    return shape


def chunk_layout(spec: LayerSpec, batch: int | None = None) -> tuple[int, int, int]:
    """(images per chunk, floats per phase plane, read slack): the packed layout the offsets are baked for.

    A chunk holds as many images as fit in CHUNK_BYTES, and no more than ``batch`` (the batch the kernel is
    built for; a larger batch runs in several chunks): the planes lie back to back, so the packed input is
    no larger than the data. The slack is a zeroed tail after the last plane that its vectors read into."""
    (kh, kw), (dh, dw) = spec.kernel, spec.dilation
    hs, ws, sh, sw = _grid(spec)
    per_img = hs * ws
    planes = spec.in_channels * sh * sw
    slack = ((kh - 1) * dh // sh) * ws + (kw - 1) * dw // sw + LANES
    chunk = max(1, CHUNK_BYTES // (planes * per_img * 4))
    if batch is not None:
        chunk = max(1, min(chunk, int(batch)))
    while chunk > 1 and planes * chunk * per_img + slack >= 2 ** 31:
        chunk //= 2
    if planes * chunk * per_img + slack >= 2 ** 31:
        raise ValueError(f"an input of {spec.in_channels}x{spec.in_hw[0]}x{spec.in_hw[1]} is too large for the CPU "
                         "kernels' 32-bit offsets")
    return chunk, chunk * per_img, slack


def generate_cpu(spec: LayerSpec, weight: torch.Tensor, bias: torch.Tensor | None = None, *, relu: bool = False,
                 residual: bool = False, pool: int = 0, normalize: tuple | None = None, gap: tuple[int, int] | None = None,
                 dense: bool = False, batch: int | None = None, label: str = "") -> KernelSource:
    """The C++ unit of one layer's CPU kernel (``KernelSource.mode == "cpu"``), with its fused epilogue:
    + bias, + residual input (``NAME(x, r, y)``), ReLU, 2x2 max pool (``pool=2``); and prologue: the input
    normalisation ``normalize=(mean, std)`` ((x - mean[c]) / std[c], then the zero padding), or for a linear
    layer ``gap=(H, W)``: its input is the (N, C, H, W) map whose spatial mean it takes.

    dense: every weight is used, zeros included (a layer where sparsity does not pay): 4 output rows share
    each input load; the weights are a byte string in the unit (not one literal per value), so the code
    does not grow with them.

    batch: the batch the kernel will mostly run (the artifact's); the packed layout holds no more images
    than that (any batch still runs, in chunks)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    epi = Epilogue(bool(relu), bool(residual), int(pool))
    sub = div = None
    if normalize is not None:
        sub, div = (np.asarray(v, dtype=np.float32).reshape(-1) for v in normalize)
        if sub.shape != (spec.in_channels,) or div.shape != (spec.in_channels,) or not (div != 0).all():
            raise ValueError(f"normalize needs {spec.in_channels} means and non-zero stds")
    if gap is not None:
        gap = (int(gap[0]), int(gap[1]))
        if spec.in_hw != (1, 1) or spec.kernel != (1, 1) or min(gap) < 1:
            raise ValueError("gap is the prologue of a linear layer, with a map of at least 1x1")
    w, b = layer_arrays(spec, weight.detach(), bias)
    m, k = w.shape
    (kh, kw), (dh, dw) = spec.kernel, spec.dilation
    hs, ws, sh, sw = _grid(spec)
    if pool and min(spec.out_hw) < 2:
        raise ValueError(f"a 2x2 pool needs at least a 2x2 output, the layer has {spec.out_hw}")
    chunk, stride, slack = chunk_layout(spec, batch)
    # dense: every GEMM column of every row (row_ptr[m] = m * K); the offsets are those of the K columns
    rows, cols = (np.repeat(np.arange(m), k), np.arange(k)) if dense else np.nonzero(w)  # row-major: CSR order
    c, tap = np.divmod(cols, kh * kw)
    ry, rx = (tap // kw) * dh, (tap % kw) * dw
    plane = (c * sh + ry % sh) * sw + rx % sw
    aoff = plane.astype(np.int64) * stride + (ry // sh) * ws + rx // sw
    row_ptr = np.arange(m + 1) * k if dense else np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))])

    prologue = {"normalize": normalize is not None, "gap": list(gap) if gap else None}
    digest = hashlib.sha256(json.dumps({"spec": spec.as_dict(), "epilogue": epi.as_dict(), "prologue": prologue,
                                        "kind": "cpu", "dense": bool(dense), "chunk": chunk}).encode())
    for extra in (sub, div):
        if extra is not None:
            digest.update(extra.view(np.uint32).tobytes())
    digest.update(np.ascontiguousarray(w).view(np.uint32).tobytes())
    if b is not None:
        digest.update(np.ascontiguousarray(b).view(np.uint32).tobytes())
    digest.update(_header().encode())
    tag = "".join(ch if ch.isalnum() else "_" for ch in label)
    name = f"rsp_cpu_{tag}_{digest.hexdigest()[:12]}" if label else f"rsp_cpu_layer_{digest.hexdigest()[:12]}"
    oh, ow = spec.out_hw
    lines = [f"// generated by rsp.kernels.cpu: {name}", f"// {json.dumps(spec.as_dict())}", _header(),
             f"namespace {name}_ns {{"]
    lines += _int_array("row_ptr", row_ptr)
    if dense:
        groups = -(-m // 4)
        packed = np.zeros((groups * 4, k), dtype=np.float32)
        packed[:m] = w
        packed = np.ascontiguousarray(packed.reshape(groups, 4, k).transpose(0, 2, 1))  # [g][k][4]
        lines += _int_array("aoff", [0]) + _int_array("koff", aoff) + _float_array("val", [0.0])
        # octal escapes: exactly three digits each, so no escape runs into the next byte
        blob = "".join(f"\\{b:03o}" for b in packed.tobytes())
        lines += [f'alignas(64) static const char dense_weights[] = "{blob}";']
    else:
        lines += _int_array("aoff", aoff)
        lines += _float_array("val", w[rows, cols])
    if b is not None:
        lines += _float_array("bias", b)
    if sub is not None:
        lines += _float_array("in_sub", sub) + _float_array("in_div", div)
    ch, (h, wd), (ph, pw) = spec.in_channels, spec.in_hw, spec.padding
    # constexpr: the kernel templates (rsp_cpu::run<L>) are compiled for this layer's geometry, so the short
    # loops of a small map (packing 2x2 rows, a 3-vector grid) are unrolled and the shape checks fold away
    lines += [f"static constexpr rsp_cpu::Layer L = {{{ch}, {h}, {wd}, {m}, {oh}, {ow}, {sh}, {sw}, {ph}, {pw}, {hs}, {ws}, "
              f"{chunk}, {stride}LL, {slack}, row_ptr, aoff, val, {'bias' if b is not None else 'nullptr'}, "
              f"{'true' if epi.relu else 'false'}, {'true' if epi.residual else 'false'}, {epi.pool}, "
              f"{'in_sub, in_div' if sub is not None else 'nullptr, nullptr'}, {gap[0] if gap else 0}, {gap[1] if gap else 0}, "
              f"{'true' if dense else 'false'}, {k if dense else 0}, {'koff' if dense else 'nullptr'}, {(kh - 1) * dh // sh}, \"{name}\"}};",
              f"}}  // namespace {name}_ns"]
    nnz = int((w != 0).sum())
    info = json.dumps({"name": name, "mode": "cpu", "nnz": nnz, "dense": bool(dense), "epilogue": epi.as_dict(), "prologue": prologue,
                       "bias": b is not None, "spec": spec.as_dict()})
    per_x, per_r = ch * (gap[0] * gap[1] if gap else h * wd), m * oh * ow
    per_y = int(np.prod(output_shape(spec, 1, epi)))
    lines += [f'extern "C" const char* {name}_info(void) {{ return {json.dumps(info)}; }}',
              f'extern "C" int {name}_run(const float* x, const float* r, float* y, int batch) {{',
              f"  return rsp_cpu::run<{name}_ns::L>(x, r, y, batch{f', {name}_ns::dense_weights' if dense else ''});",
              "}",
              f'extern "C" int {name}_host(const float* x, float* y, int batch) {{ return {name}_run(x, nullptr, y, batch); }}',
              "#ifdef RSP_TVM_FFI",
              (f"RSP_DEFINE_TVM_FFI_CPU_RESIDUAL({name}, {name}_run, {per_x}LL, {per_r}LL, {per_y}LL)" if epi.residual
               else f"RSP_DEFINE_TVM_FFI_CPU({name}, {name}_run, {per_x}LL, {per_y}LL)"),
              "#endif", ""]
    src = "\n".join(lines)
    stats = {"nnz": nnz, "density": nnz / w.size if w.size else 0.0, "dense": bool(dense),
             "grid_per_image": hs * ws, "chunk": chunk,
             "epilogue": epi.as_dict(), "prologue": prologue, "bias": b is not None, "source_bytes": len(src)}
    return KernelSource(name=name, source=src, spec=spec, mode="cpu", rows_per_thread=1, groups=m, relu=epi.relu,
                        stats=stats)


def kernel_epilogue(ks: KernelSource) -> Epilogue:
    e = ks.stats.get("epilogue") or {}
    return Epilogue(bool(e.get("relu", ks.relu)), bool(e.get("residual", False)), int(e.get("pool", 0)))


def build_cpu(sources: KernelSource | Sequence[KernelSource] | str, *, cpu: str = "x86-64-v3", kind: str = "so",
              tvm_ffi: bool = False, cxx: str | None = None, cache_dir=None, timeout: float | None = 1800) -> Path:
    """Compile CPU kernel units for ``cpu`` (``CPUS``; ``cxx`` a cross compiler for another machine)."""
    from .build import build_cxx

    return build_cxx(sources, cpu_flags(cpu), kind=kind, tvm_ffi=tvm_ffi, cxx=cxx, cache_dir=cache_dir, timeout=timeout,
                     what=f"CPU sparse kernels ({cpu})", suffix="cpu")


class CpuLayer:
    """A compiled CPU kernel through ctypes: ``y = layer(x)``, or ``layer(x, residual=r)`` (on the calling thread)."""

    def __init__(self, lib_path: Path, ks: KernelSource):
        import ctypes

        self.path, self.kernel, self.spec = Path(lib_path), ks, ks.spec
        self.epilogue = kernel_epilogue(ks)
        self._lib = ctypes.CDLL(str(self.path))
        self._fn = getattr(self._lib, f"{ks.name}_run")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        name, spec, n = self.kernel.name, self.spec, x.shape[0] if x.dim() else 0
        gap = (self.kernel.stats.get("prologue") or {}).get("gap")
        x_shape = (n, spec.in_channels, *gap) if gap else spec.input_shape(n)
        for what, t, shape in (("x", x, x_shape), ("residual", residual, spec.output_shape(n))):
            if t is None:
                continue
            if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or tuple(t.shape) != shape:
                raise ValueError(f"{name}: {what} must be a contiguous float32 CPU tensor of shape {shape}")
        if self.epilogue.residual and residual is None:
            raise ValueError(f"{name}: this layer adds a residual input: pass residual=")
        if residual is not None and not self.epilogue.residual:
            raise ValueError(f"{name}: this layer takes no residual input")
        shape = output_shape(spec, n, self.epilogue)
        if out is None:
            out = torch.empty(shape, dtype=torch.float32)
        elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"{name}: out must be a contiguous float32 {shape}")
        rc = self._fn(x.data_ptr(), residual.data_ptr() if residual is not None else None, out.data_ptr(), n)
        if rc != 0:
            raise RuntimeError(f"{name}: CPU kernel failed ({rc})")
        return out


def load_cpu_layer(ks: KernelSource, *, cpu: str = "x86-64-v3", lib=None, cache_dir=None) -> CpuLayer:
    """A callable layer on CPU tensors: ``y = layer(x)`` (ctypes; builds or reuses the .so)."""
    return CpuLayer(Path(lib) if lib else build_cpu(ks, cpu=cpu, cache_dir=cache_dir), ks)


# --- when sparse pays -----------------------------------------------------------------------------


DENSE_BASELINES = ("library", "tvm-untuned")


def _grid_vectors(spec: LayerSpec, batch: int) -> int:
    """8-lane vectors one output row takes over all chunks of a batch, as rsp_cpu::run computes them."""
    hs, ws, _, _ = _grid(spec)
    oh, ow = spec.out_hw
    chunk, _, _ = chunk_layout(spec, batch)
    total, left = 0, batch
    while left > 0:
        nb = min(chunk, left)
        total += -(-((nb - 1) * hs * ws + (oh - 1) * ws + ow) // LANES)
        left -= nb
    return total


def estimate_cpu(spec: LayerSpec, nnz: int, batch: int = 1, cpu: str | CPU = "x86-64-v3", *,
                 dense_baseline: str = "library", dense_us: float | None = None) -> dict:
    """Estimated microseconds of a dense convolution and of this kernel on one core, and dense/sparse.

    dense_baseline: what the layer would otherwise run: "library" (oneDNN, or a tuned TVM schedule) or
    "tvm-untuned" (TVM's default CPU schedule). dense_us: the library timed on this machine; the faster of it
    and the recorded figure is the library's ("dense_source" says which: a tiny layer timed through PyTorch
    is mostly dispatch, which the artifact would not pay). rsp_dense_us: rsp's own dense kernel (every weight
    of the 4-row groups over the grid vectors, or streaming the weights once where that takes longer)."""
    c = cpu if isinstance(cpu, CPU) else get_cpu(cpu)
    if dense_baseline not in DENSE_BASELINES:
        raise ValueError(f"dense_baseline must be one of {', '.join(DENSE_BASELINES)}, got {dense_baseline!r}")
    m, k = spec.gemm_shape
    macs_per_us = 2.0 * c.fma_lanes_per_cycle * c.clock_ghz * 1e3 / (2.0 * m * k * spec.pixels(batch))
    library, source = 1.0 / (macs_per_us * c.dense_eff), "recorded"
    if dense_us is not None and dense_us < library:
        library, source = dense_us, "measured"
    dense = library if dense_baseline == "library" else 1.0 / (macs_per_us * c.untuned_tvm_eff)
    vectors = _grid_vectors(spec, batch)
    compute = nnz * vectors / (c.sparse_nz_vectors_per_ns * 1e3)
    pack = spec.in_channels * spec.in_hw[0] * spec.in_hw[1] * batch * c.pack_ns_per_value / 1e3
    out = m * vectors * LANES * c.store_ns_per_value / 1e3
    sparse = c.call_us + compute + pack + out
    weights = -(-m // 4) * 4 * k
    rsp_dense = c.call_us + pack + out + max(weights * vectors / (c.dense_w_vectors_per_ns * 1e3),
                                             weights * 4 / (c.weight_stream_gbps * 1e3))
    return {"dense_us": dense, "sparse_us": sparse, "rsp_dense_us": rsp_dense,
            "speedup": dense / sparse, "dense_source": source if dense_baseline == "library" else "recorded"}


def plan_cpu_layers(state: dict[str, torch.Tensor], geometry: dict[str, dict], *, batch: int = 1,
                    cpu: str = "x86-64-v3", min_speedup: float = 1.1, dense_baseline: str = "library",
                    measure: Callable[[dict[str, LayerSpec], int], dict[str, float]] | None = None,
                    dense_fallback: str | None = "rsp-dense") -> dict[str, dict]:
    """The per-layer plan on a CPU target, in the format of ``costmodel.plan_layers``.

    Each layer is compared with a good dense library for its shape (``measure(specs, batch)``: microseconds
    per layer of a dense library timed on this machine, one thread, e.g. rsp.export's PyTorch/oneDNN timing;
    else, or where the recorded figure is faster, the CPU's recorded figures), or with TVM's untuned schedule
    (``dense_baseline="tvm-untuned"``). What runs if the layer is not sparse: ``dense_fallback`` "rsp-dense"
    (rsp's dense kernel, 0.3-1.3x oneDNN by shape and many times TVM's untuned code), or None (the layer stays a
    TVM operator: a tuned build, whose schedule is taken to be as fast as the library). A layer runs the
    sparse kernel only where its estimate beats that alternative by ``min_speedup``. Each row says what was
    chosen and why, with the library's figure beside it."""
    plan: dict[str, dict] = {}
    specs: dict[str, LayerSpec] = {}
    nnz: dict[str, int] = {}
    for name, w in weight_layers(state):
        nnz[name] = int((w != 0).sum())
        entry: dict = {"shape": list(w.shape), "density": nnz[name] / w.numel() if w.numel() else 0.0, "cpu": cpu}
        spec = plan_spec(w, geometry.get(name, {}), entry)
        plan[name] = entry
        if spec is not None:
            specs[name] = spec
    measured = measure(specs, batch) if measure is not None and dense_baseline == "library" else {}
    rsp_dense = dense_baseline == "library" and dense_fallback == "rsp-dense"
    for name, spec in specs.items():
        entry = plan[name]
        e = estimate_cpu(spec, nnz[name], batch, cpu, dense_baseline=dense_baseline, dense_us=measured.get(name))
        if dense_baseline == "tvm-untuned":
            source = "TVM's untuned schedule (recorded figure)"
        elif e["dense_source"] == "measured":
            source = "measured here: torch F.conv2d/F.linear (oneDNN), 1 thread"
        else:
            source = (f"recorded {cpu} figure: a dense library at {get_cpu(cpu).dense_eff:.0%} of the FMA peak"
                      + (f" (faster than the {measured[name]:.1f} us timed here through PyTorch)" if name in measured else ""))
        if rsp_dense:
            alt, alt_name = e["rsp_dense_us"], "rsp's dense kernel"
        else:
            alt, alt_name = e["dense_us"], ("TVM's untuned schedule" if dense_baseline == "tvm-untuned"
                                             else "the tuned TVM schedule (taken as the library's speed)")
        sparse = e["sparse_us"] * min_speedup <= alt
        why = (f"sparse kernel {e['sparse_us']:.1f} us (estimate) vs {alt_name} {alt:.1f} us; dense library "
               f"{e['dense_us']:.1f} us ({source}): ")
        if sparse:
            why += f"sparse, {e['dense_us'] / e['sparse_us']:.2f}x the library"
        else:
            why += f"sparse does not beat {alt_name} by {min_speedup:g}x: dense"
        if min(alt, e["sparse_us"]) > e["dense_us"] * 1.05:
            why += "; the dense library would be faster on this layer than anything the artifact runs (--tune-trials)"
        entry.update({"kernel": "sparse" if sparse else "dense", "block": [1, 1], "dense_baseline": dense_baseline,
                      "dense_source": source, "block_density": entry["density"],
                      "est_speedup": e["dense_us"] / e["sparse_us"],
                      "est_us": {"dense": e["dense_us"], "sparse": e["sparse_us"], "alternative": alt,
                                 "rsp_dense": e["rsp_dense_us"]},
                      "alternative": alt_name, "why": why})
        if not sparse and rsp_dense:
            entry["dense_kernel"] = "rsp-dense"
    return plan

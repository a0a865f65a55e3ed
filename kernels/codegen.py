"""CUDA C++ for one conv/linear layer, specialised to its sparsity pattern and weights.

The weights are constants at export time, so the kernel is generated for them (as SparseRT does):

- ``specialized`` (default where the code stays small): straight-line code per group of output
  channels. For every GEMM column that any channel of the group reads, one input load, then one
  ``fmaf`` per non-zero weight of that column, the weight an immediate operand of the instruction.
  No row pointers, column indices or weight values are loaded at run time; zeros inside a BSR block cost
  nothing. Weights as FFMA immediates rather than ``__constant__`` memory or a device buffer: the
  constant bank holds 64 KB per module (a 99 %-sparse 512x512x3x3 layer alone has 94 KB of weights),
  and a device buffer costs one load per weight (uniform across the warp, but still an instruction and a
  latency on the critical path), while an immediate costs nothing beyond the FMA that uses it: the
  instruction stream *is* the weight stream, shared by every warp of the group through the instruction
  cache. Padding costs no predicate per load either: each of the KH*KW taps gets a pointer, into the
  image when the tap is inside it for this pixel, else into a zero buffer the size of one image, and
  every load is ``LDG [tap pointer + c*H*W]``. Channels are grouped ``rows_per_thread`` at a time so that
  each loaded input feeds all the group's channels that read it (input reuse; ``auto_rows_per_thread``
  trades it against parallelism); a warp's lanes are consecutive output pixels, so loads and stores are
  coalesced and the whole warp follows one code path. Each group is its own ``__noinline__`` function
  (ptxas time grows much faster than linearly with one function's size: one 47k-statement switch ran
  for over 10 minutes, 512 small functions build in under a minute).
- ``generic`` (fallback where the specialised code would exceed ``max_statements``): the BSR arrays
  (row_ptr, col_idx, block values, per-column input offsets) are baked into the unit as ``__device__``
  constants and walked at run time, one block row per grid row.

Either way the unit defines (``NAME`` = ``KernelSource.name``)::

    extern "C" int NAME(const float* x, float* y, int batch, cudaStream_t stream);   // CUDA build
    extern "C" int NAME_host(const float* x, float* y, int batch);                   // host (g++) build
    extern "C" const char* NAME_info(void);                                          // JSON of the layer

``x`` is NCHW (linear: N x in) float32 contiguous, ``y`` N x O x OH x OW (linear: N x out); NAME returns
the ``cudaError_t`` of the launch (0: launched). Compiled with ``-DRSP_TVM_FFI`` the unit also exports
the TVM FFI packed function ``NAME(x: Tensor, y: Tensor) -> None`` (see ``rsp.kernels``): on CUDA tensors
in the nvcc build, on CPU tensors (running ``NAME_host``) in the host build.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bsr import BSR, block_density, from_bsr, gemm_matrix, to_bsr

HEADER_FILE = Path(__file__).with_name("bsr_kernels.cuh")
CUDA_MAX_TAPS = 63  # kernel taps per pixel: the geometry's tap-validity mask is one 64-bit word
THREADS = 128  # threads per block for large pixel counts (the launcher uses fewer, a multiple of 32, below)
# Specialised code above this many statements (loads + FMAs) falls back to the generic (data-driven BSR)
# kernel. Measured here (nvcc 13, sm_87, one layer per unit): 12.7k statements compile in 10 s, 54k in 34 s,
# while a generic unit takes 6-10 s at any size; a ResNet-18 at 95 % with a 120k cap spent 278 s in nvcc.
# About 16 bytes of SASS per statement: 16k statements are ~256 KB of code per layer, beyond which the
# instruction cache (128 KB L1.5 per SM on Orin) favours the generic kernel's small loop anyway.
DEFAULT_MAX_STATEMENTS = 16_000
# Streaming multiprocessors per target (for the batch-1 parallelism heuristic of rows_per_thread).
SM_COUNT = {"sm_72": 8, "sm_75": 40, "sm_80": 108, "sm_86": 84, "sm_87": 16, "sm_89": 128, "sm_90": 132}


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


@dataclass(frozen=True)
class LayerSpec:
    """What a kernel computes: a conv2d (NCHW) or a linear layer (a 1x1 conv of a 1x1 image)."""

    kind: str  # "conv2d" | "linear"
    out_channels: int
    in_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)

    def __post_init__(self):
        if self.kind not in ("conv2d", "linear"):
            raise ValueError(f"kind must be 'conv2d' or 'linear', got {self.kind!r}")
        oh, ow = self.out_hw
        if oh <= 0 or ow <= 0:
            raise ValueError(f"empty output for {self}")

    @property
    def out_hw(self) -> tuple[int, int]:
        (h, w), (kh, kw) = self.in_hw, self.kernel
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return self.out_channels, self.in_channels
        return self.out_channels, self.in_channels, *self.kernel

    @property
    def gemm_shape(self) -> tuple[int, int]:
        """(M, K) of the GEMM view: out x (in*kh*kw)."""
        return self.out_channels, self.in_channels * self.kernel[0] * self.kernel[1]

    def pixels(self, batch: int = 1) -> int:
        """Output pixels (GEMM N) for a batch."""
        oh, ow = self.out_hw
        return batch * oh * ow

    def input_shape(self, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.in_channels) if self.kind == "linear" else (batch, self.in_channels, *self.in_hw)

    def output_shape(self, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.out_channels) if self.kind == "linear" else (batch, self.out_channels, *self.out_hw)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "out_channels": self.out_channels, "in_channels": self.in_channels,
                "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "in_hw": list(self.in_hw), "out_hw": list(self.out_hw)}


def conv_spec(weight_shape, in_hw, stride=1, padding=0, dilation=1) -> LayerSpec:
    """The spec of a conv2d with an OIHW weight of this shape on an input of in_hw = (H, W)."""
    o, i, kh, kw = (int(v) for v in weight_shape)
    return LayerSpec("conv2d", o, i, (kh, kw), _pair(stride), _pair(padding), _pair(dilation), _pair(in_hw))


def linear_spec(weight_shape) -> LayerSpec:
    o, i = (int(v) for v in weight_shape)
    return LayerSpec("linear", o, i)


@dataclass
class KernelSource:
    """One generated layer kernel: the CUDA/C++ text and what a caller needs to launch it."""

    name: str  # C symbol of the launcher; also the TVM FFI function name
    source: str
    spec: LayerSpec
    mode: str  # "specialized" | "generic"
    rows_per_thread: int  # output channels per thread (specialised group / BSR block rows)
    groups: int  # grid rows (blockIdx.y)
    relu: bool
    stats: dict = field(default_factory=dict)

    @property
    def symbols(self) -> dict:
        return {"launch": self.name, "kernel": f"{self.name}_kernel", "host": f"{self.name}_host",
                "info": f"{self.name}_info", "tvm_ffi": self.name, "tvm_ffi_symbol": f"__tvm_ffi_{self.name}"}

    def launch_config(self, batch: int) -> tuple[tuple[int, int], int]:
        """((grid.x, grid.y), threads) the launcher uses for this batch."""
        npix = self.spec.pixels(batch)
        threads = THREADS if npix >= THREADS else -(-npix // 32) * 32
        return (-(-npix // threads), self.groups), threads

    def info(self) -> dict:
        return {"name": self.name, "mode": self.mode, "rows_per_thread": self.rows_per_thread, "groups": self.groups,
                "relu": self.relu, "spec": self.spec.as_dict(), "stats": self.stats}


def _f32_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _flit(v: float) -> str:
    """A float32 value as an exact C hex-float literal."""
    v = float(np.float32(v))
    if not np.isfinite(v):
        raise ValueError(f"non-finite weight {v!r} cannot be compiled into a kernel")
    return float.hex(v) + "f"


def _ident(s: str) -> str:
    s = re.sub(r"[^0-9A-Za-z_]", "_", s).strip("_")
    return s[:40] or "layer"


def _header() -> str:
    return HEADER_FILE.read_text()


def _geometry_type(spec: LayerSpec) -> str:
    (h, w), (oh, ow), (kh, kw) = spec.in_hw, spec.out_hw, spec.kernel
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    if kh * kw > CUDA_MAX_TAPS:
        raise ValueError(f"kernels with more than {CUDA_MAX_TAPS} taps are not supported ({kh}x{kw})")
    return (f"RspConv<{spec.in_channels}, {h}, {w}, {spec.out_channels}, {oh}, {ow}, {kh}, {kw}, "
            f"{sh}, {sw}, {ph}, {pw}, {dh}, {dw}>")


def _column_offsets(spec: LayerSpec, kp: int) -> tuple[np.ndarray, np.ndarray]:
    """For every GEMM column k < kp: the input offset relative to Pixel::base and the tap bit."""
    (h, w), (kh, kw), (dh, dw) = spec.in_hw, spec.kernel, spec.dilation
    k = np.arange(kp)
    c, tap = k // (kh * kw), k % (kh * kw)
    i, j = tap // kw, tap % kw
    off = c * h * w + i * dh * w + j * dw
    bit = tap.copy()
    k_real = spec.gemm_shape[1]
    off[k_real:] = 0
    bit[k_real:] = kh * kw  # never a valid tap: padding columns of a ragged last block read nothing
    return off.astype(np.int64), bit.astype(np.int64)


def auto_rows_per_thread(spec: LayerSpec, arch: str = "sm_87", batch: int = 1, weight: torch.Tensor | None = None,
                         choices=(1, 2, 4, 8, 16)) -> int:
    """Output channels per thread of the specialised kernel, for a batch (default 1: the edge case).

    More channels per thread reuse each loaded input for more FMAs (fewer statements in all) but leave
    fewer, longer threads. With S(g) the statements (loads + FMAs) per pixel, the kernel takes about
    max(S(g) / groups(g), S(g) * warps_per_group / (4 * SMs)) statement times: the longest thread when
    the GPU has room for every warp, the total work over the SMs' 4 schedulers when it does not. The g
    with the least (the larger on ties) is chosen. Without the weight, S(g) is taken as constant (no
    reuse: unstructured sparsity), which picks the most parallel g up to 8."""
    sms = SM_COUNT.get(arch, 132)
    wpg = -(-spec.pixels(batch) // 32)
    m = spec.out_channels
    best = None
    for g in choices:
        if weight is None and g > 8:
            continue
        work = specialized_statements(weight, g) if weight is not None else 1.0
        t = max(work / -(-m // g), work * wpg / (4.0 * sms))
        if best is None or t <= best[0] * (1 + 1e-9):
            best = (t, g)
    return best[1]


def _emit_specialized(spec: LayerSpec, w: np.ndarray, bias: np.ndarray | None, relu: bool, g: int,
                      lines: list[str]) -> dict:
    """One (non-inlined) function per group of g output channels, then tile() that dispatches on the
    group: many small functions keep ptxas time near linear; the call costs a few instructions a thread."""
    m, k = w.shape
    (h, wd), (kh, kw), (dh, dw) = spec.in_hw, spec.kernel, spec.dilation
    khw = kh * kw
    padded = spec.kind == "conv2d" and (spec.padding[0] > 0 or spec.padding[1] > 0)
    ohw = spec.out_hw[0] * spec.out_hw[1]
    groups = -(-m // g)
    loads = fmas = 0
    # Input of column k = (c, tap): x[n, c] at base + tap offset. Padding without predicates: each tap gets a
    # pointer, to the pixel's window when the tap is inside the image, else to a zero buffer as large as
    # one image, so every load is a single LDG [tap pointer + c*H*W] (no mask test, no select).
    lines.append(f"RSP_ZERO_BUFFER({spec.in_channels * h * wd})" if padded else "")
    for gi in range(groups):
        r0, r1 = gi * g, min(m, (gi + 1) * g)
        sub = w[r0:r1]
        cols = np.flatnonzero((sub != 0).any(0))
        lines.append(f"RSP_GROUP_FN void group{gi}(const float* __restrict__ xb, float* __restrict__ yb, int base, "
                     "G::mask_t vm) {")
        lines.append("  (void)vm; (void)base; (void)xb;")
        for t in sorted({int(kk) % khw for kk in cols}):
            toff = (t // kw) * dh * wd + (t % kw) * dw
            if padded:
                lines.append(f"  const float* __restrict__ t{t} = (vm & ((G::mask_t)1 << {t})) ? xb + (base + {toff}) "
                             ": rsp_zeros;")
            else:
                lines.append(f"  const float* __restrict__ t{t} = xb + (base + {toff});")
        for r in range(r1 - r0):
            init = _flit(bias[r0 + r]) if bias is not None else "0.0f"
            lines.append(f"  float a{r} = {init};")
        for kk in cols:
            rows = np.flatnonzero(sub[:, kk])
            c, t = divmod(int(kk), khw)
            body = " ".join(f"a{r} = fmaf(v, {_flit(sub[r, kk])}, a{r});" for r in rows)
            lines.append(f"  {{ const float v = RSP_LDG(t{t} + {c * h * wd}); {body} }}")
            loads += 1
            fmas += len(rows)
        for r in range(r1 - r0):
            val = f"fmaxf(a{r}, 0.0f)" if relu else f"a{r}"
            lines.append(f"  yb[{(r0 + r) * ohw}LL] = {val};")
        lines.append("}")
    lines += ["RSP_HD void tile(int group, int pix, const float* __restrict__ x, float* __restrict__ y) {",
              "  const G::Pixel p = G::pixel(pix);",
              "  const float* __restrict__ xb = x + p.xoff;",
              "  float* __restrict__ yb = y + p.yoff;",
              "  switch (group) {"]
    lines += [f"  case {gi}: group{gi}(xb, yb, p.base, p.valid); return;" for gi in range(groups)]
    lines += ["  default: return;", "  }", "}"]
    return {"loads_per_pixel": loads, "fmas_per_pixel": fmas, "statements": loads + fmas}


def _c_array(ctype: str, name: str, values, per_line: int = 16) -> list[str]:
    vals = [str(int(v)) if ctype != "unsigned" else f"{int(v):#x}u" for v in values]
    if not vals:
        vals = ["0"]  # a zero-size array is not valid C++; never read
    out = [f"RSP_CONST_ARRAY {ctype} {name}[{len(vals)}] = {{"]
    for s in range(0, len(vals), per_line):
        out.append("  " + ", ".join(vals[s:s + per_line]) + ",")
    out.append("};")
    return out


def specialized_statements(w: torch.Tensor, rows_per_thread: int) -> int:
    """Loads + FMAs per output pixel of the specialised kernel for this weight (its code size driver)."""
    g = gemm_matrix(w) != 0
    m, k = g.shape
    pad = -m % rows_per_thread
    if pad:
        g = torch.cat([g, g.new_zeros(pad, k)])
    cols = g.reshape(-1, rows_per_thread, k).any(1).sum().item()
    return int(cols + g.sum().item())


GENERIC_BLOCKS = ((4, 1), (8, 1), (16, 1), (2, 2), (4, 4), (8, 4))


def generic_block(w: torch.Tensor, blocks=GENERIC_BLOCKS) -> tuple[int, int]:
    """The block of the generic kernel for this weight: least padded work, each stored block costing its
    R*C FMAs plus C input loads (each shared by R rows) weighted 4x (the load units' rate)."""
    best = None
    for r, c in blocks:
        cost = block_density(w, (r, c)) * r * c * (1.0 + 4.0 / r)
        if best is None or cost < best[0]:
            best = (cost, (r, c))
    return best[1]


def layer_arrays(spec: LayerSpec, dense: torch.Tensor, bias: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The float32 GEMM view (out x in*kh*kw) of a layer's weight and its bias, checked against the spec."""
    if tuple(dense.shape) != tuple(spec.weight_shape):
        raise ValueError(f"weight shape {tuple(dense.shape)} does not match the layer {spec.weight_shape}")
    w = gemm_matrix(dense).to(torch.float32).cpu().numpy()
    b = None if bias is None else bias.detach().to(torch.float32).cpu().numpy().reshape(-1)
    if b is not None and b.shape[0] != spec.out_channels:
        raise ValueError(f"bias has {b.shape[0]} values, the layer {spec.out_channels} outputs")
    return w, b


def generate(spec: LayerSpec, weight: torch.Tensor | BSR, bias: torch.Tensor | None = None, *, relu: bool = False,
             label: str = "", mode: str = "auto", rows_per_thread: int | None = None, block=None,
             arch: str = "sm_87", max_statements: int = DEFAULT_MAX_STATEMENTS) -> KernelSource:
    """The CUDA/C++ unit for one layer.

    weight: the dense weight (spec.weight_shape) or its BSR. mode: "specialized", "generic" or "auto"
    (specialised unless its code exceeds max_statements). rows_per_thread: output channels per thread of
    the specialised kernel (default: ``auto_rows_per_thread``). block: the BSR block of the generic kernel
    (default: the BSR's own block, else ``generic_block``). relu fuses a ReLU.
    """
    if isinstance(weight, BSR):
        bsr_in = weight
        dense = from_bsr(weight)
    else:
        bsr_in = None
        dense = weight.detach()
    w, b = layer_arrays(spec, dense, bias)
    if mode not in ("auto", "specialized", "generic"):
        raise ValueError(f"mode must be auto, specialized or generic, got {mode!r}")
    g = int(rows_per_thread or auto_rows_per_thread(spec, arch, weight=dense))
    if mode == "auto":
        mode = "specialized" if specialized_statements(dense, g) <= max_statements else "generic"
    if mode == "generic":
        if block is None and bsr_in is None:
            block = generic_block(dense)
        bsr = bsr_in if (bsr_in is not None and block is None) else to_bsr(dense, block)
        g = bsr.block[0]

    digest = hashlib.sha256()
    digest.update(json.dumps({"spec": spec.as_dict(), "mode": mode, "g": g, "relu": relu,
                              "block": list(bsr.block) if mode == "generic" else None}).encode())
    digest.update(_f32_bits(w).tobytes())
    if b is not None:
        digest.update(_f32_bits(b).tobytes())
    digest.update(_header().encode())
    name = f"rsp_{_ident(label)}_{digest.hexdigest()[:12]}" if label else f"rsp_layer_{digest.hexdigest()[:12]}"

    m, k = w.shape
    oh, ow = spec.out_hw
    lines = [f"// generated by rsp.kernels.codegen: {name} ({mode})",
             f"// {json.dumps(spec.as_dict())}",
             _header(),
             f"namespace {name}_ns {{",
             f"typedef {_geometry_type(spec)} G;"]
    stats: dict = {"nnz": int(np.count_nonzero(w)), "density": float(np.count_nonzero(w)) / w.size}
    if mode == "specialized":
        groups = -(-m // g)
        stats.update(_emit_specialized(spec, w, b, relu, g, lines))
    else:
        r, cb = bsr.block
        groups = bsr.grid[0]
        kp = bsr.padded_shape[1]
        off, bit = _column_offsets(spec, kp)
        vals = bsr.values.to(torch.float32).cpu().numpy()
        lines += _c_array("int", "row_ptr", bsr.row_ptr.tolist())
        lines += _c_array("int", "col_idx", bsr.col_idx.tolist())
        lines += _c_array("unsigned", "vals", _f32_bits(vals).reshape(-1).tolist(), per_line=8)
        lines += _c_array("int", "koff", off.tolist())
        lines += _c_array("unsigned char", "kbit", bit.tolist())
        if b is not None:
            lines += _c_array("unsigned", "bias", _f32_bits(b).tolist(), per_line=8)
        lines += ["RSP_HD void tile(int group, int pix, const float* __restrict__ x, float* __restrict__ y) {",
                  f"  rsp_bsr_generic_tile<G, {r}, {cb}, {'true' if relu else 'false'}>(group, pix, x, y, row_ptr, "
                  f"col_idx, vals, koff, kbit, {'bias' if b is not None else '(const unsigned*)0'});",
                  "}"]
        stats.update({"block": [r, cb], "nnzb": bsr.nnzb, "block_density": bsr.block_density,
                      "loads_per_pixel": bsr.nnzb * cb, "fmas_per_pixel": bsr.nnzb * r * cb,
                      "statements": 0, "weight_bytes": int(vals.size * 4 + (bsr.nnzb + groups + 1) * 4)})
    lines.append(f"}}  // namespace {name}_ns")

    info = json.dumps({"name": name, "mode": mode, "rows_per_thread": g, "groups": groups, "relu": relu,
                       "spec": spec.as_dict()})
    per_x, per_y = _per_sample(spec)
    lines += [
        f'extern "C" const char* {name}_info(void) {{ return {json.dumps(info)}; }}',
        "#ifdef __CUDACC__",
        f'extern "C" __global__ void __launch_bounds__({THREADS}) {name}_kernel(const float* __restrict__ x, '
        "float* __restrict__ y, int npix) {",
        "  const int pix = blockIdx.x * blockDim.x + threadIdx.x;",
        "  if (pix >= npix) return;",
        f"  {name}_ns::tile(blockIdx.y, pix, x, y);",
        "}",
        f'extern "C" int {name}(const float* x, float* y, int batch, cudaStream_t stream) {{',
        "  if (batch <= 0) return 0;",
        f"  const long long npix = (long long)batch * {oh * ow};",
        "  if (npix > 0x7fffffffLL) return (int)cudaErrorInvalidValue;",
        f"  const int threads = npix >= {THREADS} ? {THREADS} : (int)((npix + 31) / 32) * 32;",
        f"  const dim3 grid((unsigned)((npix + threads - 1) / threads), {groups}u);",
        f"  {name}_kernel<<<grid, threads, 0, stream>>>(x, y, (int)npix);",
        "  return (int)cudaGetLastError();",
        "}",
        "#ifdef RSP_TVM_FFI",
        f"RSP_DEFINE_TVM_FFI({name}, {name}, {per_x}LL, {per_y}LL)",
        "#endif",
        "#else",
        f'extern "C" int {name}_host(const float* x, float* y, int batch) {{',
        f"  const long long npix = (long long)batch * {oh * ow};",
        f"  for (int group = 0; group < {groups}; ++group)",
        f"    for (long long pix = 0; pix < npix; ++pix) {name}_ns::tile(group, (int)pix, x, y);",
        "  return 0;",
        "}",
        "#ifdef RSP_TVM_FFI",
        f"RSP_DEFINE_TVM_FFI_HOST({name}, {name}_host, {per_x}LL, {per_y}LL)",
        "#endif",
        "#endif",
        "",
    ]
    src = "\n".join(lines)
    stats["source_bytes"] = len(src)
    return KernelSource(name=name, source=src, spec=spec, mode=mode, rows_per_thread=g, groups=groups, relu=relu,
                        stats=stats)


def _per_sample(spec: LayerSpec) -> tuple[int, int]:
    """Values per sample of a layer's input x and output y (what the TVM FFI entry point checks)."""
    oh, ow = spec.out_hw
    return spec.in_channels * spec.in_hw[0] * spec.in_hw[1], spec.out_channels * oh * ow


def ffi_unit(sources: list[KernelSource]) -> str:
    """The TVM FFI entry points of several CUDA layers as one unit, to compile once with -DRSP_TVM_FFI: each
    layer's own unit is then compiled without the TVM FFI headers, which cost about 4 of the 5 s of a small
    layer's nvcc. Each entry point calls the layer's launch function ``NAME(x, y, batch, stream)`` (defined
    by the layer's unit, joined at link time) with the checks and the stream of ``RSP_DEFINE_TVM_FFI``."""
    seen = {s.name: s for s in sources}
    lines = [_header(), "#ifndef RSP_TVM_FFI", "#error \"the TVM FFI unit is compiled with -DRSP_TVM_FFI\"", "#endif"]
    for name, s in seen.items():
        per_x, per_y = _per_sample(s.spec)
        lines += [f'extern "C" int {name}(const float* x, float* y, int batch, cudaStream_t stream);',
                  f"RSP_DEFINE_TVM_FFI({name}, {name}, {per_x}LL, {per_y}LL)"]
    return "\n".join(lines) + "\n"


def combine(sources: list[KernelSource]) -> str:
    """One translation unit holding several layers (the shared header is include-guarded; a layer that
    appears twice, same name hence same source, is emitted once)."""
    seen: dict[str, str] = {}
    for s in sources:
        seen.setdefault(s.name, s.source)
    return "\n".join(seen.values())

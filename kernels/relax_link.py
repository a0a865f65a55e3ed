"""Link rsp's BSR kernels into a TVM artifact: a Relax rewrite plus the kernel object to link.

``link_sparse_layers(mod, layers)`` takes the Relax module of ``tvm_build.relax_module`` (weights bound as
constants) and replaces every ``R.nn.conv2d`` / linear ``R.matmul`` whose weight constant *is* one of
``layers`` (same shape and exactly the same float32 values) by ``R.call_dps_packed("<kernel>", (x,), out)``;
bias, BatchNorm, ReLU and everything else stay TVM operators. The kernel is generated from the call itself
(weight constant, strides, padding, dilation, input shape), so the matching only decides *which* calls
run sparse: a wrong match could only cost speed, never change numbers. Linear layers appear as
``matmul(x, permute_dims(W))`` (torch's importer) or ``matmul(x, W.T)`` (a folded constant); both match.

``kernel_object(kernels, "cuda"|"host", ...)`` compiles the generated units with the TVM FFI entry points
(``RSP_DEFINE_TVM_FFI`` / ``RSP_DEFINE_TVM_FFI_HOST``) and returns the object and the linker options for
``export_library(..., options=...)``: nvcc for the target's archs, SASS only (ccbin = the cross compiler
of a Jetson, linked against the device's libcudart.so.<major>), or g++ for the host emulator (tensors on
the CPU: the linkage tested end to end without a GPU; a correctness path, not a fast one).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .codegen import CUDA_MAX_TAPS, KernelSource, LayerSpec, conv_spec, ffi_unit, generate, linear_spec

CONV2D, MATMUL, PERMUTE = "relax.nn.conv2d", "relax.matmul", "relax.permute_dims"
HOST_ARCH = "sm_87"  # the plan (and kernel shape) the host emulator stands in for on a CPU target


@dataclass
class LinkedLayer:
    layer: str
    op: str  # "conv2d" | "linear"
    kernel: KernelSource
    fused: list = field(default_factory=list)  # the operators after the layer that the kernel computes

    def as_dict(self) -> dict:
        ks = self.kernel
        return {"layer": self.layer, "symbol": ks.name, "tvm_ffi_symbol": f"__tvm_ffi_{ks.name}", "op": self.op,
                "kernel_mode": ks.mode + ("-dense" if ks.stats.get("dense") else ""), "rows_per_thread": ks.rows_per_thread, "nnz": ks.stats.get("nnz"),
                "fused": list(self.fused),
                "spec": ks.spec.as_dict()}


@dataclass
class LinkResult:
    mod: object  # the rewritten tvm.IRModule
    linked: list[LinkedLayer] = field(default_factory=list)
    not_linked: dict[str, str] = field(default_factory=dict)  # requested layer -> why it stays a TVM op

    @property
    def kernels(self) -> list[KernelSource]:
        return list({ll.kernel.name: ll.kernel for ll in self.linked}.values())

    @property
    def symbols(self) -> dict[str, str]:
        return {ll.layer: ll.kernel.name for ll in self.linked}


def _key(w: np.ndarray) -> tuple:
    w = np.ascontiguousarray(w, dtype=np.float32)
    return tuple(w.shape), hashlib.sha256(w.tobytes()).hexdigest()


def _const_array(expr, bindings: dict):
    """The numpy value of a relax constant (or of a var bound to one), else None."""
    from tvm.ir.expr import GenericConst

    if expr in bindings:
        expr = bindings[expr]
    if isinstance(expr, GenericConst):
        return expr.value.numpy()
    return None


def _static_shape(ty) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in ty.shape.values)
    except (AttributeError, TypeError, ValueError):
        return None


def _f32(ty) -> bool:
    return str(getattr(ty, "dtype", "")) == "float32"


def _conv(call, bindings, max_taps: int | None = CUDA_MAX_TAPS) -> tuple[np.ndarray | None, LayerSpec | None, str]:
    """(OIHW weight, spec, "") of a conv2d call the kernels can run, else (weight or None, None, reason).
    max_taps: the CUDA kernels' limit (a 64-bit tap mask per pixel); the CPU kernels have none (None)."""
    w = _const_array(call.args[1], bindings)
    if w is None:
        return None, None, "the weight is not a constant"
    a = call.attrs
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return w, None, f"layout {a.data_layout}/{a.kernel_layout}/{a.out_layout} (the kernels take NCHW/OIHW)"
    if int(a.groups) != 1:
        return w, None, "grouped convolution"
    xs, ys = _static_shape(call.args[0].ty), _static_shape(call.ty)
    if xs is None or ys is None or len(xs) != 4 or w.ndim != 4 or w.dtype != np.float32:
        return w, None, "not a static-shape float32 NCHW convolution"
    if not (_f32(call.args[0].ty) and _f32(call.ty)):
        return w, None, "not float32"
    pad = [int(v) for v in a.padding]
    if len(pad) == 4:
        if pad[0] != pad[2] or pad[1] != pad[3]:
            return w, None, f"asymmetric padding {pad}"
        pad = pad[:2]
    pad = pad * 2 if len(pad) == 1 else pad
    if max_taps is not None and w.shape[2] * w.shape[3] > max_taps:
        return w, None, f"more than {max_taps} taps"
    try:
        spec = conv_spec(w.shape, xs[2:], [int(v) for v in a.strides], pad, [int(v) for v in a.dilation])
    except ValueError as exc:
        return w, None, str(exc)
    if spec.input_shape(xs[0]) != xs or spec.output_shape(xs[0]) != ys:
        return w, None, f"shapes {xs} -> {ys} do not fit the layer"
    return w, spec, ""


def _linear(call, bindings) -> tuple[np.ndarray | None, LayerSpec | None, str]:
    """((out, in) weight, spec, "") of x @ W.T with a constant W, else (weight or None, None, reason)."""
    rhs = call.args[1]
    value = bindings.get(rhs, rhs)
    w = None
    if getattr(getattr(value, "op", None), "name", "") == PERMUTE:
        axes = value.attrs.axes
        src = _const_array(value.args[0], bindings)
        if src is not None and src.ndim == 2 and (axes is None or [int(v) for v in axes] == [1, 0]):
            w = src  # matmul(x, permute_dims(W)): W is (out, in)
    else:
        t = _const_array(rhs, bindings)
        if t is not None and t.ndim == 2:
            w = np.ascontiguousarray(t.T)  # matmul(x, W.T) with W.T folded into the constant
    if w is None:
        return None, None, "the weight is not a constant"
    xs, ys = _static_shape(call.args[0].ty), _static_shape(call.ty)
    if xs is None or ys is None or len(xs) != 2 or w.dtype != np.float32 or not (_f32(call.args[0].ty) and _f32(call.ty)):
        return w, None, "not a static-shape float32 (batch, features) matmul"
    spec = linear_spec(w.shape)
    if spec.input_shape(xs[0]) != xs or spec.output_shape(xs[0]) != ys:
        return w, None, f"shapes {xs} -> {ys} do not fit the layer"
    return w, spec, ""


BATCH_NORM, ADD, RELU, MAX_POOL = "relax.nn.batch_norm", "relax.add", "relax.nn.relu", "relax.nn.max_pool2d"
# what each kernel family can fuse after its convolution / matmul, in this order
FUSIBLE = {"cpu": ("batch_norm", "bias", "residual", "relu", "pool"), "cuda": ("batch_norm", "bias", "relu")}
SUBTRACT, DIVIDE, MEAN, RESHAPE = "relax.subtract", "relax.divide", "relax.mean", "relax.reshape"


def _op(value) -> str:
    """The operator name of a relax Call ("" for anything else)."""
    return getattr(getattr(value, "op", None), "name", "")


def _vars_in(e):
    """The relax Vars an expression reads, with repeats (DataflowVars included)."""
    from tvm import relax

    if isinstance(e, relax.Var):
        yield e
    elif isinstance(e, relax.Call):
        for a in e.args:
            yield from _vars_in(a)
    elif isinstance(e, relax.Tuple):
        for f in e.fields:
            yield from _vars_in(f)
    elif isinstance(e, relax.TupleGetItem):
        yield from _vars_in(e.tuple_value)


def _var_uses(func) -> dict:
    """How often each relax Var is referenced in ``func``'s bindings and its body."""
    uses: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            for v in _vars_in(b.value):
                uses[v] = uses.get(v, 0) + 1
    for v in _vars_in(func.body.body):
        uses[v] = uses.get(v, 0) + 1
    return uses


@dataclass
class _Chain:
    """A conv/matmul and the operators after it that its kernel computes: folded BatchNorm, bias, residual,
    ReLU, 2x2 max pool. ``end`` is the binding value the fused kernel call replaces."""

    layer: str
    op: str
    call: object
    weight: np.ndarray
    spec: LayerSpec
    end: object = None
    bias: np.ndarray | None = None
    residual: object = None  # the relax Var added before the ReLU
    relu: bool = False
    pool: int = 0
    fused: list = field(default_factory=list)
    input: object = None  # the kernel's input: the layer's, or what a fused prologue reads
    normalize: tuple | None = None  # (mean, std) of the model's input normalisation
    gap: tuple | None = None  # (H, W) of a global average pool before a linear layer


def _channel_constant(expr, bindings, m: int, op: str) -> np.ndarray | None:
    """The (M,) values of a per-output-channel constant ((1, M, 1, 1) / (M, 1, 1) for a conv, (M,) / (1, M) for
    a linear layer), else None."""
    c = _const_array(expr, bindings)
    if c is None or c.dtype != np.float32 or c.size != m:
        return None
    ok = (c.shape in ((1, m, 1, 1), (m, 1, 1)) if op == "conv2d" else c.shape in ((m,), (1, m)))
    return c.reshape(m).astype(np.float64) if ok else None


def _grow_chain(ch: _Chain, var, bindings: dict, users: dict, uses: dict, allowed, claimed: set) -> None:
    """Extend the chain from ``var`` (the conv's result) over its single-use consumers, in FUSIBLE order.
    A binding already in another chain (``claimed``: a residual add that the other branch's layer took) ends
    the chain; the bindings this chain takes are added to ``claimed``."""
    from tvm import relax

    m = ch.spec.out_channels
    shape = _static_shape(var.ty)

    def only_user(v):
        if uses.get(v, 0) != 1 or len(users.get(v, [])) != 1 or users[v][0][0] in claimed:
            return None, None
        return users[v][0]

    stage = 0
    steps = list(allowed)
    while True:
        nxt, value = only_user(var)
        if nxt is None or not isinstance(value, relax.Call):
            return
        name = _op(value)
        done = False
        for i in range(stage, len(steps)):
            step = steps[i]
            if step == "batch_norm" and name == BATCH_NORM and ch.op == "conv2d" and not ch.fused and value.args[0].same_as(var):
                a = value.attrs
                params = [_const_array(e, bindings) for e in value.args[1:5]]
                get, g_value = only_user(nxt)
                if (int(a.axis) != 1 or bool(a.training) or any(p is None or p.shape != (m,) for p in params)
                        or get is None or not isinstance(g_value, relax.TupleGetItem) or int(g_value.index) != 0):
                    return
                gamma, beta, mean, var_ = [p.astype(np.float64) for p in params]
                scale = (gamma if bool(a.scale) else 1.0) / np.sqrt(var_ + float(a.epsilon))
                ch.weight = (ch.weight.astype(np.float64) * scale.reshape(-1, *[1] * (ch.weight.ndim - 1))).astype(np.float32)
                ch.bias = (beta if bool(a.center) else 0.0) - mean * scale
                ch.fused.append("batch_norm")
                claimed.add(nxt)  # the BatchNorm tuple; its item (the new var) is claimed below
                ch.end, var, stage, done = g_value, get, i + 1, True
            elif step in ("bias", "residual") and name == ADD:
                other = value.args[1] if value.args[0].same_as(var) else value.args[0] if value.args[1].same_as(var) else None
                if other is None:
                    return
                c = _channel_constant(other, bindings, m, ch.op)
                if step == "bias" and c is not None:
                    ch.bias = c if ch.bias is None else ch.bias + c
                elif (step == "residual" and c is None and isinstance(other, relax.Var) and not other.same_as(var)
                      and _static_shape(other.ty) == shape and _f32(other.ty)):
                    ch.residual = other
                else:
                    continue
                ch.fused.append(step)
                ch.end, var, stage, done = value, nxt, i + 1, True
            elif step == "relu" and name == RELU:
                ch.relu = True
                ch.fused.append("relu")
                ch.end, var, stage, done = value, nxt, i + 1, True
            elif step == "pool" and name == MAX_POOL and ch.op == "conv2d":
                a = value.attrs
                if ([int(v) for v in a.pool_size] != [2, 2] or [int(v) for v in a.strides] != [2, 2]
                        or [int(v) for v in a.dilation] != [1, 1] or any(int(v) for v in a.padding) or bool(a.ceil_mode)
                        or str(a.layout) != "NCHW" or str(a.out_layout) != "NCHW" or min(ch.spec.out_hw) < 2):
                    return
                ch.pool = 2
                ch.fused.append("pool")
                ch.end, var, stage, done = value, nxt, i + 1, True
            if done:
                claimed.add(var)
                break
        if not done or stage >= len(steps):
            return


def _grow_prologue(ch: _Chain, bindings: dict, uses: dict) -> None:
    """What the CPU kernel can read instead of its input: the model input before its normalisation
    ((x - mean) / std with per-channel constants), or the map before a global average pool (mean over H, W,
    then a reshape to (N, C)) for a linear layer."""
    from tvm import relax

    a = ch.call.args[0]
    if not isinstance(a, relax.Var) or uses.get(a, 0) != 1 or a not in bindings:
        return
    va = bindings[a]
    c = ch.spec.in_channels
    if ch.op == "conv2d" and _op(va) == DIVIDE and isinstance(va.args[0], relax.Var):
        b = va.args[0]
        vb = bindings.get(b)
        std = _const_array(va.args[1], bindings)
        if vb is None or uses.get(b, 0) != 1 or _op(vb) != SUBTRACT or std is None:
            return
        mean = _const_array(vb.args[1], bindings)
        x = vb.args[0]
        want = (1, c, 1, 1)
        if (mean is None or mean.shape != want or std.shape != want or mean.dtype != np.float32 or std.dtype != np.float32
                or not (std != 0).all() or not isinstance(x, relax.Var) or _static_shape(x.ty) != _static_shape(a.ty)):
            return
        ch.normalize, ch.input = (mean.reshape(-1), std.reshape(-1)), x
        ch.fused.insert(0, "normalize")
    elif ch.op == "linear":
        mean_value, src = va, a
        if _op(va) == RESHAPE and isinstance(va.args[0], relax.Var):
            src = va.args[0]
            mean_value = bindings.get(src)
            if mean_value is None or uses.get(src, 0) != 1:
                return
        if _op(mean_value) != MEAN or not isinstance(mean_value.args[0], relax.Var):
            return
        x = mean_value.args[0]
        xs = _static_shape(x.ty)
        axes = mean_value.attrs.axis
        if xs is None or len(xs) != 4 or xs[1] != c or not _f32(x.ty) or axes is None:
            return
        # the matmul reads (N, C): the reshape's output, or the mean's own without keepdims
        if sorted(int(v) % 4 for v in axes) != [2, 3] or _static_shape(a.ty) != (xs[0], c):
            return
        ch.gap, ch.input = (xs[2], xs[3]), x
        ch.fused.insert(0, "global_avg_pool")


def link_sparse_layers(mod, layers: dict[str, torch.Tensor], *, arch: str = HOST_ARCH, func: str = "main",
                       kind: str = "cuda", fuse: bool = True, dense=(), **generate_kwargs) -> LinkResult:
    """Replace the conv2d/linear calls of ``layers`` ({name: weight}) in ``mod[func]`` by calls of their
    generated kernels (``R.call_dps_packed``). Layers with equal weights are matched in the given order.
    kind "cuda": the BSR units of ``codegen`` (for a GPU, or their host emulator); "cpu": ``cpu.generate_cpu``
    (the layers named in ``dense`` as rsp's dense CPU kernel).

    fuse: the kernel also computes what follows the layer where that is its only consumer (``FUSIBLE``):
    an inference BatchNorm folded into the weights (w * gamma / sqrt(var + eps): zeros stay zeros) and the
    bias, a bias add, and for the CPU kernels a residual add, the ReLU and a 2x2 max pool, so no tensor
    travels between TVM operators in between. The canonicalised module (tuple lookups of max_pool2d's
    (values, indices) pair resolved, dead bindings removed) is rewritten."""
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"kind must be 'cuda' or 'cpu', got {kind!r}")
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    dense_set = set(dense)
    if dense_set and kind != "cpu":
        raise ValueError("dense layers are rsp's CPU kernels: kind must be 'cpu'")
    wanted: dict[tuple, list[str]] = {}
    for name, w in layers.items():
        wanted.setdefault(_key(w.detach().to(torch.float32).cpu().numpy()), []).append(name)
    shapes = {k[0] for k in wanted}
    if fuse:
        mod = relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))
    result = LinkResult(mod)
    bindings: dict = {}
    users: dict = {}
    order = []
    f = mod[func]
    for block in f.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
                order.append(b)
    uses = _var_uses(f)
    for b in order:  # each var's consumers, one entry per consuming binding
        for v in dict.fromkeys(_vars_in(b.value)):
            users.setdefault(v, []).append((b.var, b.value))

    chains: dict = {}  # chain end (binding value) -> _Chain
    claimed: set = set()  # binding vars some chain computes
    for b in order:
        call = b.value
        name = _op(call)
        if not isinstance(call, relax.Call) or name not in (CONV2D, MATMUL):
            continue
        w, spec, reason = (_conv(call, bindings, None if kind == "cpu" else CUDA_MAX_TAPS) if name == CONV2D
                           else _linear(call, bindings))
        if w is None or tuple(w.shape) not in shapes:
            continue
        queue = wanted.get(_key(w))
        if not queue:
            continue
        layer = queue.pop(0)
        if spec is None:
            result.not_linked[layer] = reason
            continue
        ch = _Chain(layer, "conv2d" if name == CONV2D else "linear", call, np.array(w, dtype=np.float32), spec, end=call)
        if fuse:
            claimed.add(b.var)
            _grow_chain(ch, b.var, bindings, users, uses, FUSIBLE[kind], claimed)
            if kind == "cpu":
                _grow_prologue(ch, bindings, uses)
        chains[ch.end] = ch

    @mutator
    class Rewriter(PyExprMutator):
        def visit_tuple_getitem_(self, op):  # a chain that ends in a folded BatchNorm's result
            ch = chains.get(op)
            return super().visit_tuple_getitem_(op) if ch is None else self._fused(ch, op)

        def visit_call_(self, call):
            ch = chains.get(call)
            if ch is None:
                return super().visit_call_(call)
            return self._fused(ch, call)

        def _fused(self, ch, call):
            wt = torch.from_numpy(ch.weight)
            bias = None if ch.bias is None else torch.from_numpy(ch.bias.astype(np.float32))
            if kind == "cpu":
                from .cpu import generate_cpu

                ks = generate_cpu(ch.spec, wt, bias, relu=ch.relu, residual=ch.residual is not None, pool=ch.pool,
                                  normalize=ch.normalize, gap=ch.gap, dense=ch.layer in dense_set,
                                  batch=_static_shape(ch.call.ty)[0], label=ch.layer)
            else:
                ks = generate(ch.spec, wt, bias, relu=ch.relu, label=ch.layer, arch=arch, **generate_kwargs)
            result.linked.append(LinkedLayer(ch.layer, ch.op, ks, list(ch.fused)))
            args = [self.visit_expr(ch.input if ch.input is not None else ch.call.args[0])]
            if ch.residual is not None:
                args.append(self.visit_expr(ch.residual))
            return relax.call_dps_packed(ks.name, relax.Tuple(args), call.ty)

    rw = Rewriter(mod)
    rw.builder_.update_func(mod.get_global_var(func), rw.visit_expr(f))
    new = rw.builder_.finalize()
    if result.linked:
        new = relax.transform.DeadCodeElimination()(new)  # the fused operators, replaced linear weights' transposes
    if relax.analysis.well_formed(new) is False:
        raise RuntimeError("the Relax rewrite for rsp's sparse kernels produced an ill-formed module")
    result.mod = new
    for names in wanted.values():
        for layer in names:
            result.not_linked.setdefault(layer, "no conv2d/matmul with this weight in the Relax module")
    return result


def _parallel_cuda_objects(kernels: list[KernelSource], archs: list[str], *, nvcc, cross_cxx, cache_dir) -> Path:
    """One object holding every kernel: each layer is compiled on its own (nvcc processes in parallel, each
    unit content-addressed in the kernel cache, so an unchanged layer is never compiled again) without the
    TVM FFI headers, their entry points once in one more unit (``codegen.ffi_unit``), then the objects are
    joined by a relocatable link (``-r`` through the target's compiler driver)."""
    import concurrent.futures as cf
    import os
    import shutil

    from .build import KernelBuildError, compile_kernels, default_cache_dir
    from .toolchain import run_tool

    kernels = list({ks.name: ks for ks in kernels}.values())

    def one(unit):  # the entry points' unit is the string, compiled first (it is the slowest)
        return compile_kernels(unit, archs, "obj", tvm_ffi=isinstance(unit, str), nvcc=nvcc, ccbin=cross_cxx,
                               ptx=False, cache_dir=cache_dir)

    units = [ffi_unit(kernels), *kernels]
    workers = max(1, min(len(units), os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(max_workers=workers) as ex:
        objs = list(ex.map(one, units))
    key = hashlib.sha256("\0".join(hashlib.sha256(Path(o).read_bytes()).hexdigest() for o in objs).encode()).hexdigest()[:20]
    out = (Path(cache_dir) if cache_dir else default_cache_dir()) / key / f"rsp_model_{len(objs)}_tvm.o"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    cxx = cross_cxx or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise KernelBuildError("no C++ compiler to join the kernels' objects (g++)")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:  # a relocatable link through the target's compiler driver (it knows its own ld)
        run_tool([cxx, "-r", "-nostdlib", "-o", str(tmp), *map(str, objs)],
                 f"{Path(cxx).name} -r (joining the kernels' objects)", log_path=out.parent / f"{out.name}.log",
                 timeout=600)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def kernel_object(kernels: list[KernelSource], mode: str, *, archs=(), nvcc: str | None = None,
                  cross_cxx: str | None = None, cxx: str | None = None, cache_dir=None, cpu: str = "x86-64-v3") -> dict:
    """Compile ``kernels`` with their TVM FFI entry points and return {"path", "options", "info"}: the object
    and the ``export_library(options=...)`` that link it. mode "cuda": nvcc for ``archs``, SASS only
    (``cross_cxx``: the host compiler of another CPU, e.g. aarch64-linux-gnu-g++); "host": g++, the emulator;
    "cpu": the fast CPU kernels of ``rsp.kernels.cpu`` for ``cpu`` (``cxx``: a cross compiler)."""
    from .build import build_host, tvm_link_options
    from .toolchain import find_nvcc, nvcc_info, require_nvcc

    if not kernels:
        raise ValueError("no kernels to link")
    if mode == "cuda":
        obj = _parallel_cuda_objects(kernels, list(archs), nvcc=nvcc, cross_cxx=cross_cxx, cache_dir=cache_dir)
        options = tvm_link_options(obj, nvcc, cross_cxx=cross_cxx, stub_dir=cache_dir)
        cudart = ("static (libcudart_static.a)" if "-lcudart_static" in options else
                  f"shared: the device's libcudart.so.{nvcc_info(require_nvcc(nvcc)).major} (DT_NEEDED; a link-time "
                  "stub stood in here)")
        exe = find_nvcc(nvcc)
        info = {"compiler": f"nvcc {nvcc_info(exe).build}" if exe else "nvcc (cached build)", "arch": list(archs), "sass_only": True,
                "host_compiler": cross_cxx, "cudart": cudart}
    elif mode == "host":
        obj = build_host(kernels, kind="obj", tvm_ffi=True, cxx=cxx, cache_dir=cache_dir)
        options = [str(obj)]
        info = {"compiler": Path(cxx).name if cxx else "g++ (host emulator)",
                "note": "host emulator: CPU tensors, a correctness path, not a fast one"}
    elif mode == "cpu":
        from .cpu import build_cpu, cpu_flags

        obj = build_cpu(kernels, cpu=cpu, kind="obj", tvm_ffi=True, cxx=cxx, cache_dir=cache_dir)
        options = [str(obj)]
        info = {"compiler": Path(cxx).name if cxx else "g++", "cpu": cpu, "flags": cpu_flags(cpu),
                "note": "rsp's CPU sparse kernels (direct convolution over the non-zeros; large layers run their "
                        "output rows on TVM's thread pool)"}
    else:
        raise ValueError(f"mode must be 'cuda', 'host' or 'cpu', got {mode!r}")
    obj = Path(obj)
    info.update({"file": obj.name, "kind": "obj", "sha256": hashlib.sha256(obj.read_bytes()).hexdigest(), "cache_key": obj.parent.name,
                 "bytes": obj.stat().st_size, "symbols": [ks.name for ks in kernels]})
    return {"path": obj, "options": options, "info": info}

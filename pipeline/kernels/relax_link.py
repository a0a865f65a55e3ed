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

from .codegen import CUDA_MAX_TAPS, KernelSource, LayerSpec, conv_spec, generate, linear_spec

CONV2D, MATMUL, PERMUTE = "relax.nn.conv2d", "relax.matmul", "relax.permute_dims"
HOST_ARCH = "sm_87"  # the plan (and kernel shape) the host emulator stands in for on a CPU target


@dataclass
class LinkedLayer:
    layer: str
    op: str  # "conv2d" | "linear"
    kernel: KernelSource

    def as_dict(self) -> dict:
        ks = self.kernel
        return {"layer": self.layer, "symbol": ks.name, "tvm_ffi_symbol": f"__tvm_ffi_{ks.name}", "op": self.op,
                "kernel_mode": ks.mode, "rows_per_thread": ks.rows_per_thread, "nnz": ks.stats.get("nnz"),
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


def link_sparse_layers(mod, layers: dict[str, torch.Tensor], *, arch: str = HOST_ARCH, func: str = "main",
                       kind: str = "cuda", **generate_kwargs) -> LinkResult:
    """Replace the conv2d/linear calls of ``layers`` ({name: weight}) in ``mod[func]`` by calls of their
    generated kernels (``R.call_dps_packed``). Layers with equal weights are matched in the given order.
    kind "cuda": the BSR units of ``codegen`` (for a GPU, or their host emulator); "cpu": ``cpu.generate_cpu``."""
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"kind must be 'cuda' or 'cpu', got {kind!r}")
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    wanted: dict[tuple, list[str]] = {}
    for name, w in layers.items():
        wanted.setdefault(_key(w.detach().to(torch.float32).cpu().numpy()), []).append(name)
    shapes = {k[0] for k in wanted}
    result = LinkResult(mod)
    bindings: dict = {}
    f = mod[func]
    for block in f.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            name = getattr(call.op, "name", "")
            if name not in (CONV2D, MATMUL):
                return super().visit_call_(call)
            w, spec, reason = (_conv(call, bindings, None if kind == "cpu" else CUDA_MAX_TAPS) if name == CONV2D
                               else _linear(call, bindings))
            if w is None or tuple(w.shape) not in shapes:
                return super().visit_call_(call)
            queue = wanted.get(_key(w))
            if not queue:
                return super().visit_call_(call)
            layer = queue.pop(0)
            if spec is None:
                result.not_linked[layer] = reason
                return super().visit_call_(call)
            wt = torch.from_numpy(np.array(w, dtype=np.float32))
            if kind == "cpu":
                from .cpu import generate_cpu

                ks = generate_cpu(spec, wt, None, label=layer)
            else:
                ks = generate(spec, wt, None, label=layer, arch=arch, **generate_kwargs)
            result.linked.append(LinkedLayer(layer, "conv2d" if name == CONV2D else "linear", ks))
            x = self.visit_expr(call.args[0])
            return relax.call_dps_packed(ks.name, relax.Tuple([x]), call.ty)

    rw = Rewriter(mod)
    rw.builder_.update_func(mod.get_global_var(func), rw.visit_expr(f))
    new = rw.builder_.finalize()
    if result.linked:
        new = relax.transform.DeadCodeElimination()(new)  # the permute_dims of replaced linear weights
    if relax.analysis.well_formed(new) is False:
        raise RuntimeError("the Relax rewrite for rsp's sparse kernels produced an ill-formed module")
    result.mod = new
    for names in wanted.values():
        for layer in names:
            result.not_linked.setdefault(layer, "no conv2d/matmul with this weight in the Relax module")
    return result


def kernel_object(kernels: list[KernelSource], mode: str, *, archs=(), nvcc: str | None = None,
                  cross_cxx: str | None = None, cxx: str | None = None, cache_dir=None, cpu: str = "x86-64-v3") -> dict:
    """Compile ``kernels`` with their TVM FFI entry points and return {"path", "options", "info"}: the object
    and the ``export_library(options=...)`` that link it. mode "cuda": nvcc for ``archs``, SASS only
    (``cross_cxx``: the host compiler of another CPU, e.g. aarch64-linux-gnu-g++); "host": g++, the emulator;
    "cpu": the fast CPU kernels of ``rsp.kernels.cpu`` for ``cpu`` (``cxx``: a cross compiler)."""
    from .build import build_host, compile_kernels, cuda_major, find_nvcc, nvcc_version, tvm_link_options

    if not kernels:
        raise ValueError("no kernels to link")
    if mode == "cuda":
        obj = compile_kernels(kernels, list(archs), "obj", tvm_ffi=True, nvcc=nvcc, ccbin=cross_cxx, ptx=False,
                              cache_dir=cache_dir)
        options = tvm_link_options(obj, nvcc, cross_cxx=cross_cxx, stub_dir=cache_dir)
        cudart = ("static (libcudart_static.a)" if "-lcudart_static" in options else
                  f"shared: the device's libcudart.so.{cuda_major(nvcc)} (DT_NEEDED; a link-time stub stood in here)")
        exe = find_nvcc(nvcc)
        info = {"compiler": f"nvcc {nvcc_version(exe)}" if exe else "nvcc (cached build)", "arch": list(archs), "sass_only": True,
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

"""Block-sparse (BSR) convolution and linear kernels for rsp's very sparse networks.

TVM and Relax no longer have sparse operators, so rsp brings its own. The weights are constants at
export time, so each layer's kernel is generated for its sparsity pattern and values (``codegen``):
straight-line CUDA with the weights as FMA immediates and no index loads (SparseRT-style), or, where that
code would be too large, a generic BSR kernel over arrays baked into the unit.

Modules:

- ``bsr``: the BSR format (``to_bsr``, ``from_bsr``, ``block_density``) and the plain-torch reference
  (``bsr_conv2d``, ``bsr_linear``: im2col + block GEMM over the stored blocks only).
- ``codegen``: ``LayerSpec`` (``conv_spec``, ``linear_spec``) and ``generate(spec, weight_or_bsr, bias)``
  -> ``KernelSource`` (the .cu text, its symbol ``name``, launch geometry, statistics).
- ``toolchain`` (shared with ``rsp.tvm_build``): nvcc (``require_nvcc`` honours ``--nvcc``, ``$RSP_NVCC``,
  ``$CUDA_HOME``, PATH; ``find_nvcc``: the same or None), ``nvcc_info``, ``compile_fatbin``, the ELF and
  fatbin readers (``elf_machine``, ``parse_fatbins``, ``inspect_device_code``: fatbin/cubin contents, no
  cuobjdump needed); every failure a one-line ``ToolchainError`` (= ``KernelBuildError``).
- ``build``: ``compile_kernels(sources, arch="sm_87"|"sm_90"|[...], kind="fatbin"|"cubin"|"ptx"|"obj"|"so",
  tvm_ffi=False)`` with nvcc into a content-addressed cache (``$RSP_KERNEL_CACHE``, default
  ``~/.cache/rsp/kernels``), ``load_layer(ks, "cuda"|"cpu")`` (ctypes; "cpu" runs the same unit compiled by g++: the host emulator),
  ``tvm_link_options``.
- ``costmodel``: ``estimate``, ``choose_kernel(shape, block_density, batch, arch, ...)`` -> "sparse" |
  "dense", ``plan_layers(state_dict, geometry, ...)`` / ``plan_model(model, input_shape, ...)`` -> the
  per-layer plan {kernel, block, block_density, est_speedup, ...} for the export manifest.
- ``cpu``: rsp's kernels for CPUs: ``generate_cpu(spec, weight, bias, relu=, residual=, pool=, normalize=,
  gap=, dense=)`` (a C++ unit with the layer's CSR baked in: direct convolution vectorised over output
  pixels, with the fused epilogue and prologue; ``dense=True``: rsp's dense kernel), ``build_cpu`` (``-O3``
  for a target CPU), ``load_cpu_layer`` (ctypes), ``estimate_cpu`` /
  ``plan_cpu_layers`` (the CPU plan against the best dense alternative; what ``rsp export
  --sparse-kernels auto`` uses on CPU targets).
- ``relax_link`` (imports TVM when called): ``link_sparse_layers(mod, {layer: weight})`` rewrites a Relax
  module's conv2d/linear calls of those layers into ``R.call_dps_packed`` of their generated kernels, with
  what follows each layer fused into it (``FUSIBLE``: the BatchNorm folded into weights and bias, bias,
  and for the CPU kernels residual add, ReLU, 2x2 max pool, input normalisation, global average pool);
  ``kernel_object(kernels, "cuda"|"host"|"cpu", ...)`` compiles them for ``export_library(options=...)``.
  ``tvm_build.build(sparse_layers=...)`` / ``rsp export --sparse-kernels`` use both.

Symbols of a generated unit (``NAME = KernelSource.name`` = ``rsp_<label>_<12 hex of the content hash>``):

``extern "C" int NAME(const float* x, float* y, int batch, cudaStream_t stream)``
    CUDA build (``kind="so"``/``"obj"``): launches on ``stream``; returns the ``cudaError_t`` of the
    launch. x: N x C x H x W (linear: N x in), y: N x O x OH x OW (linear: N x out), float32, contiguous,
    on the current device. PyTorch: ``load_layer(ks)(x)`` (torch's current stream).
``extern "C" int NAME_host(const float* x, float* y, int batch)``
    host build (``build_host``): the same tiles in a loop on the CPU, bit-identical arithmetic
    (``build_host(..., kind="obj", tvm_ffi=True)`` adds the TVM FFI function ``NAME`` on CPU tensors).
``extern "C" const char* NAME_info(void)``
    JSON: name, mode, rows_per_thread, groups, relu, layer spec.
TVM FFI packed function ``NAME(x: Tensor, y: Tensor) -> None`` (``compile_kernels(..., kind="obj", tvm_ffi=True)``)
    exported as the C symbol ``__tvm_ffi_NAME`` (``TVM_FFI_DLL_EXPORT_TYPED_FUNC``: the library module of
    an artifact linked with ``export_library(path, options=tvm_link_options(obj))`` finds it by name)
    and registered as the global function ``NAME`` when the library loads (override allowed). Arguments
    are destination-passing: x the input, y the preallocated output (float32, contiguous, CUDA); the
    stream is ``TVMFFIEnvGetStream(kDLCUDA, x.device_id)``. From Relax (apache-tvm 0.27)::

        y = R.call_dps_packed("NAME", (x,), out_ty=R.Tensor((n, o, oh, ow), "float32"))
        # or: bb.emit(relax.call_dps_packed("NAME", (x,), relax.TensorType((n, o, oh, ow), "float32")))
        ex = tvm.compile(mod, target=...)
        ex.export_library("model.so", options=tvm_link_options(compile_kernels(layers, arch, "obj", tvm_ffi=True)))

    ``tests/test_kernels.py::test_relax_call_dps_packed`` builds exactly this (target llvm, no GPU) and
    checks that the Relax VM reaches the kernel's entry point.

Everything but launching on a GPU runs here without one: the reference, code generation, nvcc builds for
sm_87/sm_90, the host emulator and the cost model (``tests/test_kernels.py``).
"""

from .bsr import BSR, DEFAULT_BLOCKS, block_density, bsr_conv2d, bsr_linear, bsr_matmul, from_bsr, to_bsr
from .build import KernelBuildError, compile_kernels, load_layer, tvm_link_options
from .codegen import KernelSource, LayerSpec, conv_spec, generate, linear_spec
from .costmodel import choose_kernel, estimate, layer_geometry, plan_layers, plan_model
from .toolchain import ToolchainError, find_nvcc, inspect_device_code, require_nvcc

__all__ = [
    "BSR", "DEFAULT_BLOCKS", "KernelBuildError", "KernelSource", "LayerSpec", "ToolchainError", "block_density",
    "bsr_conv2d", "bsr_linear", "bsr_matmul", "choose_kernel", "compile_kernels", "conv_spec", "estimate",
    "find_nvcc", "from_bsr", "generate", "inspect_device_code", "layer_geometry", "linear_spec", "load_layer",
    "plan_layers", "plan_model", "require_nvcc", "to_bsr", "tvm_link_options",
]

"""Compile generated kernels with nvcc (or the host emulator with g++) into a content-addressed cache
and call the layers from PyTorch through ctypes. Finding nvcc, running it and reading device code back
(``inspect_device_code``) is ``toolchain``'s, shared with the TVM build.

Artifacts (``compile_kernels(kind=...)``):

- ``cubin``: one ELF for one arch (``nvcc -cubin``); ``ptx``: the PTX text;
- ``fatbin``: SASS for every requested arch plus PTX of the newest (JIT for later GPUs; ``ptx=False``:
  SASS only, as rsp's TVM artifacts link them);
- ``obj``: a position-independent host object with the fatbin embedded and the C launchers
  (``-DRSP_TVM_FFI`` adds the TVM FFI packed functions): what ``export_library(..., options=[obj])``
  links into a TVM artifact (add ``tvm_link_options()``; for a Jetson ``ccbin=aarch64-linux-gnu-g++``
  and ``tvm_link_options(obj, cross_cxx=...)``, which links a libcudart stub where the toolkit has no
  aarch64 CUDA runtime);
- ``build_host(..., kind="obj", tvm_ffi=True)``: the host emulator's object with the same TVM FFI
  functions on CPU tensors (an x86 TVM artifact that exercises the linkage here);
- ``so``: a shared library with the C launchers and the CUDA runtime linked statically, loaded with
  ctypes by ``load_layer`` (the "callable from PyTorch" path: no torch extension build).

The cache key is the SHA-256 of the source, the arch list, the kind and the flags; a cached file is
reused when it was built by the same nvcc version as the local one, or when there is no local nvcc
(copy ``$RSP_KERNEL_CACHE`` to a GPU machine that has no toolkit). Builds write to a temporary name and rename, so concurrent builds of the
same key are harmless. nvcc errors surface as ``KernelBuildError`` with one line (the first error) and
the path of the full log.

The toolkit must not be newer than what the GPU's driver supports (a CUDA 13 build does not load on a
CUDA 12 driver; JetPack 6 on Jetson Orin ships CUDA 12.x): build on, or for, the target's toolkit
(``nvcc=`` or ``RSP_NVCC``; ``ccbin=`` for a cross host compiler such as aarch64-linux-gnu-g++).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .codegen import KernelSource, LayerSpec, combine
# FATBIN_MAGIC and inspect_device_code are re-exported: rsp.kernels.build has always offered them
from .toolchain import (FATBIN_MAGIC, ToolchainError, compiler_machine, cuda_library_dir, elf_symbols,  # noqa: F401
                        find_nvcc, gencode_flags, inspect_device_code, nvcc_info, require_archs, require_nvcc,
                        run_tool, toolkit_root)

KINDS = ("fatbin", "cubin", "ptx", "obj", "so")
_CUDA_ERRORS = {1: "cudaErrorInvalidValue", 2: "cudaErrorMemoryAllocation", 3: "cudaErrorInitializationError",
                35: "cudaErrorInsufficientDriver (the toolkit is newer than the driver)", 98: "cudaErrorInvalidDeviceFunction",
                100: "cudaErrorNoDevice", 209: "cudaErrorNoKernelImageForDevice (no SASS/PTX for this GPU)",
                222: "cudaErrorUnsupportedPtxVersion (the toolkit is newer than the driver)",
                400: "cudaErrorInvalidResourceHandle (stream of another context?)", 700: "cudaErrorIllegalAddress"}

# nvcc / g++ failed, or no compiler was found (one line): the toolchain's error, under the name rsp.kernels exports
KernelBuildError = ToolchainError


def default_cache_dir() -> Path:
    return Path(os.environ.get("RSP_KERNEL_CACHE") or Path.home() / ".cache" / "rsp" / "kernels")


def tvm_ffi_include_dirs() -> list[str]:
    """Include folders of the installed tvm_ffi wheel (tvm/ffi/*.h and dlpack/dlpack.h)."""
    try:
        import tvm_ffi.libinfo as li

        dirs = [li.find_include_path(), li.find_dlpack_include_path()]
    except Exception:  # noqa: BLE001 - older/newer layouts: fall back to the package folder
        try:
            import tvm_ffi
        except ImportError as e:
            raise KernelBuildError("the TVM FFI variant needs the tvm_ffi package (pip install 'rsp[export]')") from e
        dirs = [str(Path(tvm_ffi.__file__).parent / "include")]
    return [d for d in dict.fromkeys(dirs) if d and Path(d).is_dir()]


def _is_cross(cxx: str | None) -> bool:
    return bool(cxx) and not compiler_machine(cxx).startswith(os.uname().machine)


def _cross_target_dirs(machine: str) -> tuple[str, ...]:
    """CUDA's targets/ sub-folders for a host triple (Jetson cross packages: aarch64-linux; Arm servers and
    CUDA 13's unified Arm toolkit: sbsa-linux)."""
    return ("aarch64-linux", "sbsa-linux") if machine.startswith("aarch64") else (f"{machine.split('-')[0]}-linux",)


def _cross_flags(nvcc: str | None, ccbin: str | None) -> list[str]:
    """nvcc with -ccbin for another CPU looks for the CUDA headers in targets/<that cpu>/include; without the
    toolkit's cross package that folder is absent: the headers are CPU-neutral, so use the toolkit's own."""
    if not _is_cross(ccbin):
        return []
    root = toolkit_root(nvcc)
    if root is None or any((root / "targets" / d / "include").is_dir() for d in _cross_target_dirs(compiler_machine(ccbin))):
        return []
    return [f"-I{root / 'include'}"] if (root / "include").is_dir() else []


def tvm_link_options(obj: str | Path | None = None, nvcc: str | None = None, *, cross_cxx: str | None = None,
                     stub_dir: str | Path | None = None) -> list[str]:
    """Linker options for ``export_library(path, options=...)`` of a TVM artifact that embeds an ``obj``
    built with ``tvm_ffi=True``: the object, the CUDA runtime (static: no libcudart.so needed on the
    device) and its system libraries. libtvm_ffi symbols resolve from the process that loads the artifact
    (tvm_ffi / the TVM runtime).

    cross_cxx (e.g. aarch64-linux-gnu-g++ for a Jetson): the CUDA runtime of that CPU. The toolkit's cross
    package (targets/aarch64-linux or sbsa-linux) provides libcudart_static.a; without it the artifact is
    linked against a stub carrying libcudart.so.<major>'s name and symbol version (``cudart_stub``), so it
    needs the device's own libcudart.so.<major> (JetPack's; the TVM CUDA runtime loads it anyway)."""
    opts = [str(obj)] if obj else []
    if _is_cross(cross_cxx):
        root = toolkit_root(nvcc)
        for d in _cross_target_dirs(compiler_machine(cross_cxx)):
            lib = root / "targets" / d / "lib" if root else None
            if lib is not None and (lib / "libcudart_static.a").is_file():
                return opts + [f"-L{lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
        if obj is None:
            raise KernelBuildError("linking against a libcudart stub needs the kernel object (its CUDA symbols)")
        stub = cudart_stub(obj, cross_cxx, nvcc, stub_dir)
        return opts + [f"-L{stub.parent}", "-lcudart"]
    lib = cuda_library_dir(nvcc)
    return opts + ([f"-L{lib}"] if lib else []) + ["-lcudart_static", "-ldl", "-lrt", "-lpthread"]


def cudart_stub(obj: str | Path, cxx: str, nvcc: str | None = None, stub_dir: str | Path | None = None) -> Path:
    """A link-time stand-in for the CUDA runtime of another CPU: a shared library named libcudart.so whose
    SONAME (libcudart.so.<major>) and symbol version match NVIDIA's, defining (as empty functions) the
    CUDA runtime symbols ``obj`` needs. The artifact records DT_NEEDED libcudart.so.<major> and binds to the
    device's real library at load time; the stub itself never ships."""
    syms = sorted(n for n in elf_symbols(Path(obj).read_bytes(), undefined=True) if re.match(r"_*cuda", n))
    major = nvcc_info(require_nvcc(nvcc)).major
    soname = f"libcudart.so.{major}"
    key = hashlib.sha256("\0".join([cxx, compiler_machine(cxx), soname, *syms]).encode()).hexdigest()[:20]
    folder = (Path(stub_dir) if stub_dir else default_cache_dir()) / f"cudart-stub-{key}"
    out = folder / "libcudart.so"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    src, ver = folder / "stub.c", folder / "stub.map"
    _atomic_write(src, "".join(f"void {n}(void) {{}}\n" for n in syms) or "void rsp_cudart_stub(void) {}\n")
    _atomic_write(ver, f"{soname} {{ global: *; }};\n")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        run_tool([cxx, "-x", "c", "-shared", "-fPIC", "-o", str(tmp), f"-Wl,-soname,{soname}",
                  f"-Wl,--version-script,{ver}", str(src)], f"{Path(cxx).name} (libcudart stub)",
                 log_path=folder / "stub.log", timeout=300)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _archs(arch) -> list[str]:
    items = [arch] if isinstance(arch, (str, int)) else list(arch)
    out = []
    for a in items:
        a = str(a).strip().lower().replace("compute_", "sm_")
        if not a.startswith("sm_"):
            a = "sm_" + a.replace(".", "")
        if not re.fullmatch(r"sm_[0-9]{2,3}[af]?", a):
            raise ValueError(f"bad arch {a!r} (expected e.g. 'sm_87' or 'sm_90')")
        out.append(a)
    if not out:
        raise ValueError("no arch given")
    return list(dict.fromkeys(out))


def _source_of(sources) -> tuple[str, str]:
    """(source text, a label for file names)."""
    if isinstance(sources, str):
        return sources, "unit"
    if isinstance(sources, KernelSource):
        return sources.source, sources.name
    sources = list(sources)
    if not sources:
        raise ValueError("no kernels to compile")
    return combine(sources), (sources[0].name if len(sources) == 1 else f"rsp_model_{len(sources)}")


def compile_kernels(sources: KernelSource | Sequence[KernelSource] | str, arch="sm_87", kind: str = "so", *,
                    tvm_ffi: bool = False, cache_dir: str | Path | None = None, nvcc: str | None = None,
                    ccbin: str | None = None, ptx: bool = True, extra_flags: Iterable[str] = (),
                    timeout: float | None = 1800) -> Path:
    """Compile one or several generated layers with nvcc into ``cache_dir/<key>/<name>.<kind>``.

    arch: "sm_87", "sm_90" or a list of them (fatbin/obj/so; cubin and ptx take one). kind: fatbin, cubin,
    ptx, obj or so. tvm_ffi: add the TVM FFI packed functions (obj/so; needs the tvm_ffi headers).
    ccbin: the host compiler (a cross compiler such as aarch64-linux-gnu-g++ for a Jetson's host code).
    ptx: also embed the newest arch's PTX (fatbin/obj/so; False: SASS only, nothing to JIT on the device).
    Returns the path of the artifact (reused from the cache when the key matches).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    archs = _archs(arch)
    if kind in ("cubin", "ptx") and len(archs) != 1:
        raise ValueError(f"a {kind} holds one arch, got {archs}")
    if tvm_ffi and kind not in ("obj", "so"):
        raise ValueError("the TVM FFI variant is host code: kind must be 'obj' or 'so'")
    exe = find_nvcc(nvcc)
    src, label = _source_of(sources)
    flags = ["-O3", "-std=c++17", *extra_flags]
    if kind in ("obj", "so"):
        flags += ["-Xcompiler", "-fPIC"]
    if ccbin:
        flags += ["-ccbin", ccbin]
    if tvm_ffi:
        flags += ["-DRSP_TVM_FFI"] + [f"-I{d}" for d in tvm_ffi_include_dirs()]
    # The key leaves the nvcc version out so a cache built on one machine serves another without nvcc
    # (a GPU box, say); the version is kept beside the artifact and a different local nvcc rebuilds.
    key = hashlib.sha256("\0".join([src, ",".join(archs), kind, *flags, *([] if ptx else ["sass-only"])]).encode()
                         ).hexdigest()[:20]
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = root / key
    out = folder / f"{label}{'_tvm' if tvm_ffi else ''}.{'o' if kind == 'obj' else kind}"
    stamp = out.with_name(out.name + ".nvcc")
    if out.is_file() and (exe is None or (stamp.is_file() and stamp.read_text() == nvcc_info(exe).build)):
        return out
    if exe is None:
        raise KernelBuildError("nvcc not found (set RSP_NVCC or CUDA_HOME, or put nvcc on PATH) and no cached build")
    require_archs(exe, archs)
    folder.mkdir(parents=True, exist_ok=True)
    cu = folder / f"{label}.cu"
    if not cu.is_file():
        _atomic_write(cu, src)
    if kind in ("cubin", "ptx"):
        target = [f"-{kind}", f"-arch={archs[0]}"]
    else:
        target = gencode_flags(archs, ptx) + {"fatbin": ["-fatbin"], "obj": ["-c"], "so": ["-shared"]}[kind]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # the toolkit's include folder for a cross ccbin is machine-specific: out of the cache key
    cmd = [exe, *target, *flags, *_cross_flags(exe, ccbin), "-o", str(tmp), str(cu)]
    try:
        run_tool(cmd, f"nvcc ({','.join(archs)}, {kind}) for {label}", log_path=folder / f"{out.name}.log", timeout=timeout)
        os.replace(tmp, out)
        _atomic_write(stamp, nvcc_info(exe).build)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def build_host(sources: KernelSource | Sequence[KernelSource] | str, *, cache_dir: str | Path | None = None,
               cxx: str | None = None, opt: str = "-O1", kind: str = "so", tvm_ffi: bool = False,
               timeout: float | None = 1800) -> Path:
    """The host emulator: the same generated unit compiled as plain C++ (g++) whose ``NAME_host(x, y, batch)``
    runs every (group, pixel) tile of the CUDA grid in a loop on the CPU.

    kind "so": a shared library (``load_layer(ks, "cpu")``); "obj": a position-independent object for
    ``export_library(..., options=[obj])``. tvm_ffi adds the TVM FFI packed functions ``NAME(x, y)`` on CPU
    tensors (``RSP_DEFINE_TVM_FFI_HOST``): the CPU stand-in for the CUDA kernels in a TVM artifact, a
    correctness path (tests, parity), not a fast one."""
    if kind not in ("so", "obj"):
        raise ValueError(f"the host emulator is built as 'so' or 'obj', got {kind!r}")
    flags = [opt, "-std=c++17", "-ffp-contract=off"]
    return build_cxx(sources, flags, kind=kind, tvm_ffi=tvm_ffi, cxx=cxx, cache_dir=cache_dir, timeout=timeout,
                     what="host emulator", suffix="host")


def build_cxx(sources: KernelSource | Sequence[KernelSource] | str, flags: Sequence[str], *, kind: str = "so",
              tvm_ffi: bool = False, cxx: str | None = None, cache_dir: str | Path | None = None,
              timeout: float | None = 1800, what: str = "C++ kernels", suffix: str = "cpu") -> Path:
    """Compile a generated unit with a C++ compiler (g++ by default, or ``cxx``, e.g. a cross compiler) into
    the content-addressed cache: kind "so" (ctypes) or "obj" (``export_library(options=[obj])``)."""
    if kind not in ("so", "obj"):
        raise ValueError(f"C++ kernels are built as 'so' or 'obj', got {kind!r}")
    exe = cxx or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not exe:
        raise KernelBuildError(f"no C++ compiler found for the {what} (g++/c++/clang++)")
    src, label = _source_of(sources)
    flags = [*flags, "-shared" if kind == "so" else "-c", "-fPIC"]
    if tvm_ffi:
        flags += ["-DRSP_TVM_FFI"] + [f"-I{d}" for d in tvm_ffi_include_dirs()]
    key = hashlib.sha256("\0".join([src, exe, *flags, suffix]).encode()).hexdigest()[:20]
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / key
    out = folder / f"{label}_{suffix}{'_tvm' if tvm_ffi else ''}.{'o' if kind == 'obj' else 'so'}"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    cpp = folder / f"{label}_{suffix}.cpp"
    _atomic_write(cpp, src)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        run_tool([exe, *flags, "-o", str(tmp), str(cpp)], f"{Path(exe).name} ({what}) for {label}",
                 log_path=folder / f"{suffix}.log", timeout=timeout)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Calling a layer from PyTorch.


class _Layer:
    def __init__(self, lib_path: Path, ks: KernelSource, symbol: str, argtypes):
        self.path = Path(lib_path)
        self.kernel = ks
        self.spec: LayerSpec = ks.spec
        self._lib = ctypes.CDLL(str(self.path))
        self._fn = getattr(self._lib, symbol)
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = argtypes

    def _check(self, x: torch.Tensor, out: torch.Tensor | None, device_type: str) -> torch.Tensor:
        spec = self.spec
        if x.device.type != device_type:
            raise ValueError(f"{self.kernel.name}: x must be on {device_type}, got {x.device}")
        if x.dtype != torch.float32:
            raise TypeError(f"{self.kernel.name}: x must be float32, got {x.dtype}")
        want = spec.input_shape(x.shape[0] if x.dim() else 0)
        if tuple(x.shape) != want:
            raise ValueError(f"{self.kernel.name}: x must be {want}, got {tuple(x.shape)}")
        if not x.is_contiguous():
            raise ValueError(f"{self.kernel.name}: x must be contiguous (NCHW)")
        shape = spec.output_shape(x.shape[0])
        if out is None:
            return torch.empty(shape, dtype=torch.float32, device=x.device)
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.device != x.device:
            raise ValueError(f"{self.kernel.name}: out must be a contiguous float32 {shape} on {x.device}")
        return out


class CudaLayer(_Layer):
    """A compiled layer on the GPU: ``y = layer(x)`` launches on torch's current CUDA stream."""

    def __init__(self, lib_path: Path, ks: KernelSource):
        super().__init__(lib_path, ks, ks.name, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self._check(x, out, "cuda")
        with torch.cuda.device(x.device):
            stream = torch.cuda.current_stream(x.device).cuda_stream
            rc = self._fn(x.data_ptr(), y.data_ptr(), x.shape[0], stream)
        if rc != 0:
            raise RuntimeError(f"{self.kernel.name}: CUDA launch failed with error {rc} ({_CUDA_ERRORS.get(rc, 'see cudaError_t')})")
        return y


class HostLayer(_Layer):
    """The host emulator of a layer: the generated tiles run on the CPU (tests without a GPU)."""

    def __init__(self, lib_path: Path, ks: KernelSource):
        super().__init__(lib_path, ks, f"{ks.name}_host", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self._check(x, out, "cpu")
        self._fn(x.data_ptr(), y.data_ptr(), x.shape[0])
        return y


def local_arch(device=None) -> str:
    """sm_XY of a CUDA device (needs torch with CUDA)."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def load_layer(ks: KernelSource, device: str = "cuda", *, arch: str | None = None, lib: str | Path | None = None,
               cache_dir: str | Path | None = None, nvcc: str | None = None) -> CudaLayer | HostLayer:
    """A callable layer: device "cuda" builds (or reuses) the .so for ``arch`` (default: the local GPU's),
    device "cpu" the host emulator. ``lib`` reuses a library built elsewhere (e.g. holding many layers)."""
    if device == "cpu":
        return HostLayer(Path(lib) if lib else build_host(ks, cache_dir=cache_dir), ks)
    if lib is None:
        lib = compile_kernels(ks, arch or local_arch(), "so", cache_dir=cache_dir, nvcc=nvcc)
    return CudaLayer(Path(lib), ks)

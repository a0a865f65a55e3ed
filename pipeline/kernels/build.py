"""Compile generated kernels with nvcc (or the host emulator with g++) into a content-addressed cache,
check that the result is real device code, and call the layers from PyTorch through ctypes.

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
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .codegen import KernelSource, LayerSpec, combine

KINDS = ("fatbin", "cubin", "ptx", "obj", "so")
FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190
_CUDA_ERRORS = {1: "cudaErrorInvalidValue", 2: "cudaErrorMemoryAllocation", 3: "cudaErrorInitializationError",
                35: "cudaErrorInsufficientDriver (the toolkit is newer than the driver)", 98: "cudaErrorInvalidDeviceFunction",
                100: "cudaErrorNoDevice", 209: "cudaErrorNoKernelImageForDevice (no SASS/PTX for this GPU)",
                222: "cudaErrorUnsupportedPtxVersion (the toolkit is newer than the driver)",
                400: "cudaErrorInvalidResourceHandle (stream of another context?)", 700: "cudaErrorIllegalAddress"}


class KernelBuildError(RuntimeError):
    """nvcc / g++ failed, or no compiler was found. The message is one line."""


def find_nvcc(nvcc: str | None = None) -> str | None:
    """nvcc from the argument, $RSP_NVCC, $CUDA_HOME/bin, PATH or /usr/local/cuda/bin, else None."""
    cands = [nvcc, os.environ.get("RSP_NVCC")]
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(str(Path(os.environ[env]) / "bin" / "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"release ([0-9.]+), (V[0-9.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1] if out.strip() else "unknown"


@functools.lru_cache(maxsize=None)
def nvcc_archs(nvcc: str) -> tuple[str, ...]:
    """The real archs this nvcc can build SASS for (``nvcc --list-gpu-code``)."""
    r = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    return tuple(a for a in r.stdout.split() if a.startswith("sm_"))


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


@functools.lru_cache(maxsize=None)
def cuda_library_dir(nvcc: str | None = None) -> Path | None:
    """The folder holding libcudart_static.a of nvcc's toolkit (nvcc --dryrun names it; nvcc may be a wrapper)."""
    exe = find_nvcc(nvcc)
    cands: list[Path] = []
    if exe:
        r = subprocess.run([exe, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                           text=True, timeout=60)
        for m in re.finditer(r'-L"?([^"\s]+)"?', r.stdout + r.stderr):
            cands.append(Path(m.group(1)))
        cands.append(Path(exe).resolve().parent.parent / "lib64")
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "lib64")
    cands.append(Path("/usr/local/cuda/lib64"))
    for c in cands:
        if (c / "libcudart_static.a").is_file():
            return c.resolve()
    return None


@functools.lru_cache(maxsize=None)
def toolkit_root(nvcc: str | None = None) -> Path | None:
    """The CUDA toolkit folder of nvcc (its TOP in `nvcc --dryrun`: nvcc may be a wrapper script)."""
    exe = find_nvcc(nvcc)
    if not exe:
        return None
    r = subprocess.run([exe, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"^#\$ TOP=(.+)$", r.stdout + r.stderr, re.MULTILINE)
    root = Path(m.group(1).strip()).resolve() if m else Path(exe).resolve().parent.parent
    return root if root.is_dir() else None


@functools.lru_cache(maxsize=None)
def compiler_machine(cxx: str) -> str:
    """The target triple of a host compiler (``g++ -dumpmachine``), e.g. aarch64-linux-gnu."""
    try:
        return subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError as e:
        raise KernelBuildError(f"cannot run the host compiler {cxx}: {e}") from None


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


def cuda_major(nvcc: str | None = None) -> int:
    exe = find_nvcc(nvcc)
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout if exe else ""
    m = re.search(r"release (\d+)\.", out)
    if not m:
        raise KernelBuildError("cannot read the CUDA version of nvcc (`nvcc --version`)")
    return int(m.group(1))


def elf_symbols(path: str | Path, undefined: bool = False) -> list[str]:
    """Names in the symbol tables (.symtab and .dynsym) of an ELF64 file: defined ones, or only the
    undefined ones."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names: list[str] = []
    for _, typ, _, _, off, size, link, _, _, entsize in secs:
        if typ not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        stroff = secs[link][4]
        for j in range(1, size // entsize):
            st_name, _, _, shndx = struct.unpack_from("<IBBH", data, off + j * entsize)
            if st_name and (shndx == 0) == undefined:
                names.append(data[stroff + st_name: data.index(b"\0", stroff + st_name)].decode(errors="replace"))
    return list(dict.fromkeys(names))


def cudart_stub(obj: str | Path, cxx: str, nvcc: str | None = None, stub_dir: str | Path | None = None) -> Path:
    """A link-time stand-in for the CUDA runtime of another CPU: a shared library named libcudart.so whose
    SONAME (libcudart.so.<major>) and symbol version match NVIDIA's, defining (as empty functions) the
    CUDA runtime symbols ``obj`` needs. The artifact records DT_NEEDED libcudart.so.<major> and binds to the
    device's real library at load time; the stub itself never ships."""
    syms = sorted(n for n in elf_symbols(obj, undefined=True) if re.match(r"_*cuda", n))
    major = cuda_major(nvcc)
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
        _run([cxx, "-x", "c", "-shared", "-fPIC", "-o", str(tmp), f"-Wl,-soname,{soname}",
              f"-Wl,--version-script,{ver}", str(src)], folder / "stub.log", f"{Path(cxx).name} (libcudart stub)", 300)
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


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return re.sub(r"\s+", " ", line).strip()[:300]
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def _run(cmd: list[str], log_path: Path, what: str, timeout: float | None) -> None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise KernelBuildError(f"{what} timed out after {timeout:.0f} s") from e
    except OSError as e:
        raise KernelBuildError(f"{what} could not start: {e}") from e
    if r.returncode != 0:
        log_path.write_text(" ".join(cmd) + "\n\n" + r.stdout + r.stderr)
        raise KernelBuildError(f"{what} failed: {_first_error(r.stderr + r.stdout)} (full log: {log_path})")


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
    if out.is_file() and (exe is None or (stamp.is_file() and stamp.read_text() == nvcc_version(exe))):
        return out
    if exe is None:
        raise KernelBuildError("nvcc not found (set RSP_NVCC or CUDA_HOME, or put nvcc on PATH) and no cached build")
    known = nvcc_archs(exe)
    missing = [a for a in archs if known and a not in known and a.rstrip("af") not in known]
    if missing:
        raise KernelBuildError(f"nvcc {nvcc_version(exe)} cannot build {', '.join(missing)} "
                               f"(it supports {known[0]}..{known[-1]}); use a toolkit that does (RSP_NVCC)")
    folder.mkdir(parents=True, exist_ok=True)
    cu = folder / f"{label}.cu"
    if not cu.is_file():
        _atomic_write(cu, src)
    if kind in ("cubin", "ptx"):
        target = [f"-{kind}", f"-arch={archs[0]}"]
    else:
        target = []
        for a in archs:
            target += ["-gencode", f"arch=compute_{a[3:]},code={a}"]
        if ptx:
            newest = max(archs, key=lambda a: int(re.sub(r"[^0-9]", "", a)))[3:]
            target += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
        target += {"fatbin": ["-fatbin"], "obj": ["-c"], "so": ["-shared"]}[kind]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    # the toolkit's include folder for a cross ccbin is machine-specific: out of the cache key
    cmd = [exe, *target, *flags, *_cross_flags(exe, ccbin), "-o", str(tmp), str(cu)]
    try:
        _run(cmd, folder / f"{out.name}.log", f"nvcc ({','.join(archs)}, {kind}) for {label}", timeout)
        os.replace(tmp, out)
        _atomic_write(stamp, nvcc_version(exe))
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
        _run([exe, *flags, "-o", str(tmp), str(cpp)], folder / f"{suffix}.log", f"{Path(exe).name} ({what}) for {label}",
             timeout)
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
# Is it device code?


def _elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 image."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strtab = sh(shstrndx)
    names = data[strtab[4]:strtab[4] + strtab[5]]
    out = {}
    for i in range(shnum):
        name_off, typ, _, _, off, size = sh(i)[:6]
        name = names[name_off:names.index(b"\0", name_off)].decode(errors="replace")
        out[name] = b"" if typ == 8 else data[off:off + size]  # SHT_NOBITS has no contents
    return out


def fatbin_entries(blob: bytes) -> list[dict]:
    """The entries of a fatbin image (magic 0xBA55ED50): [{kind: 'elf'|'ptx', sm: 87, size}, ...].

    Layout: a 16-byte header (magic u32, version u16, header size u16, payload size u64), then entries,
    each with a header (kind u16: 1 PTX, 2 ELF; version u16; header size u32; payload size u64; ...;
    sm version u32 at offset 28) followed by its payload.
    """
    magic, _version, hsize, fsize = struct.unpack_from("<IHHQ", blob, 0)
    if magic != FATBIN_MAGIC:
        raise ValueError(f"not a fatbin (magic {magic:#x})")
    entries, pos, end = [], hsize, hsize + fsize
    while pos + 32 <= min(end, len(blob)):
        kind, _, ehsize, psize = struct.unpack_from("<HHIQ", blob, pos)
        sm, = struct.unpack_from("<I", blob, pos + 28)
        entries.append({"kind": {1: "ptx", 2: "elf"}.get(kind, str(kind)), "sm": sm, "size": psize})
        pos += ehsize + psize
    return entries


def inspect_device_code(path: str | Path) -> dict:
    """What device code a built artifact holds, read from its bytes (no cuobjdump needed).

    Returns {"format": "cubin"|"fatbin"|"host+fatbin", "sass": [87, 90, ...], "ptx": [...]}; raises
    ValueError where the file holds no device code.
    """
    data = Path(path).read_bytes()
    if data[:4] == struct.pack("<I", FATBIN_MAGIC):
        ents = fatbin_entries(data)
        fmt = "fatbin"
    elif data[:4] == b"\x7fELF":
        e_machine, = struct.unpack_from("<H", data, 0x12)
        if e_machine == EM_CUDA:
            e_flags, = struct.unpack_from("<I", data, 0x30)
            # The SM is in e_flags: bits 8..15 from ELF ABI version 8 (e_ident[8]; CUDA 12.8+), else bits 0..7.
            sm = (e_flags >> 8) & 0xFF if data[8] >= 8 else e_flags & 0xFF
            return {"format": "cubin", "sass": [sm], "ptx": []}
        secs = _elf_sections(data)
        blob = secs.get(".nv_fatbin") or secs.get(".nvFatBinSegment")
        if not blob or struct.unpack_from("<I", blob, 0)[0] != FATBIN_MAGIC:
            raise ValueError(f"{path}: host ELF without an embedded fatbin")
        ents = []
        pos = 0
        while pos + 16 <= len(blob):  # one fatbin per translation unit, 8-byte aligned, one after another
            magic, _, hsize, fsize = struct.unpack_from("<IHHQ", blob, pos)
            if magic != FATBIN_MAGIC:
                pos += 8
                continue
            ents += fatbin_entries(blob[pos:pos + hsize + fsize])
            pos += hsize + fsize
        fmt = "host+fatbin"
    else:
        raise ValueError(f"{path}: neither ELF nor fatbin")
    sass = sorted({e["sm"] for e in ents if e["kind"] == "elf"})
    ptx = sorted({e["sm"] for e in ents if e["kind"] == "ptx"})
    if not sass and not ptx:
        raise ValueError(f"{path}: fatbin without entries")
    return {"format": fmt, "sass": sass, "ptx": ptx}


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

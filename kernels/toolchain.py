"""The CUDA toolchain and the binary formats rsp checks: nvcc, fatbins and ELF files, in one place.

Both the kernels (``build.py``) and the TVM build (``rsp/tvm_build.py``) use this module, so they find the
same nvcc, compile with the same ``-gencode`` flags and read device code the same way. It imports only the
standard library.

nvcc: the one the caller names (``--nvcc``, ``nvcc=``: a path or a name on PATH), else the first executable
of ``$RSP_NVCC``, ``$CUDA_HOME/bin/nvcc``, ``$CUDA_PATH/bin/nvcc``, nvcc on PATH, ``/usr/local/cuda/bin/nvcc``.

Errors: every failure raises ``ToolchainError`` (or a subclass) with a one-line message: ``NvccNotFoundError``
where there is no nvcc, ``BinaryFormatError`` (also a ValueError) for bytes that are not the ELF or fatbin
expected. Callers that can do without catch them: ``find_nvcc`` is ``require_nvcc`` answering None (a cached
kernel build needs no nvcc), ``inspect_library`` records a non-ELF file as such.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190
ELF_MACHINES = {62: "x86_64", 183: "aarch64", EM_CUDA: "cuda"}


class ToolchainError(RuntimeError):
    """A compiler is missing or failed, or a binary is not what it should be. The message is one line."""


class NvccNotFoundError(ToolchainError):
    """No nvcc where it was looked for."""


class BinaryFormatError(ToolchainError, ValueError):
    """Bytes that are not the ELF / fatbin expected."""


# --- nvcc ----------------------------------------------------------------------------------------


def require_nvcc(nvcc: str | None = None) -> str:
    """The nvcc to use (see the module docstring for the search order); raises NvccNotFoundError."""
    if nvcc:
        found = shutil.which(nvcc)
        if not found:
            raise NvccNotFoundError(f"nvcc not found at {nvcc}")
        return found
    cands = [os.environ.get("RSP_NVCC")]
    cands += [str(Path(os.environ[env]) / "bin" / "nvcc") for env in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(env)]
    for cand in [*cands, "nvcc", "/usr/local/cuda/bin/nvcc"]:
        found = cand and shutil.which(cand)
        if found:
            return found
    raise NvccNotFoundError("nvcc not found (install a CUDA toolkit, set RSP_NVCC or CUDA_HOME, or put nvcc on PATH)")


def find_nvcc(nvcc: str | None = None) -> str | None:
    """require_nvcc, or None where there is no nvcc."""
    try:
        return require_nvcc(nvcc)
    except NvccNotFoundError:
        return None


@dataclass(frozen=True)
class NvccInfo:
    path: str
    release: str  # the CUDA version, "13.0"
    build: str  # nvcc's own build, "V13.0.48": what a cached kernel build is stamped with

    @property
    def major(self) -> int:
        return int(self.release.split(".")[0])


def _nvcc_output(nvcc: str, *args: str) -> str:
    try:
        return subprocess.run([nvcc, *args], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolchainError(f"cannot run {nvcc}: {exc}") from None


@functools.lru_cache(maxsize=None)
def nvcc_info(nvcc: str) -> NvccInfo:
    m = re.search(r"release (\d+)\.(\d+), (V[0-9.]+)", _nvcc_output(nvcc, "--version"))
    if not m:
        raise ToolchainError(f"cannot read the CUDA version from `{nvcc} --version`")
    return NvccInfo(nvcc, f"{m.group(1)}.{m.group(2)}", m.group(3))


def nvcc_version(nvcc: str) -> str:
    """The CUDA release of nvcc, e.g. "13.0"."""
    return nvcc_info(nvcc).release


@functools.lru_cache(maxsize=None)
def nvcc_archs(nvcc: str) -> tuple[str, ...]:
    """The real archs nvcc builds SASS for (``nvcc --list-gpu-code``; empty where it cannot list them)."""
    return tuple(a for a in _nvcc_output(nvcc, "--list-gpu-code").split() if a.startswith("sm_"))


def require_archs(nvcc: str, archs: Iterable[str]) -> None:
    """Raise unless nvcc builds SASS for every arch (an arch-specific sm_90a counts as sm_90)."""
    known = nvcc_archs(nvcc)
    missing = [a for a in archs if known and a not in known and a.rstrip("af") not in known]
    if missing:
        raise ToolchainError(f"{nvcc} (CUDA {nvcc_version(nvcc)}) cannot compile for {','.join(missing)} "
                             f"(it supports {known[0]}..{known[-1]}); use a toolkit that does (--nvcc or RSP_NVCC)")


def gencode_flags(archs: Sequence[str], ptx: bool = False) -> list[str]:
    """nvcc flags for SASS of each sm_XY, plus the newest arch's PTX where ptx (JIT for later GPUs)."""
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a[3:]},code={a}"]
    if ptx:
        newest = max(archs, key=lambda a: int(re.sub(r"[^0-9]", "", a)))[3:]
        flags += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    return flags


def first_error(log: str) -> str:
    """The first line of a compiler log that says error (else its last line), whitespace squeezed."""
    for line in log.splitlines():
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return re.sub(r"\s+", " ", line).strip()[:300]
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def run_tool(cmd: list[str], what: str, *, log_path: Path | None = None, timeout: float | None = None) -> None:
    """Run a compiler; a failure raises ToolchainError with its first error (and where the full log is)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"{what} timed out after {timeout:.0f} s") from None
    except OSError as exc:
        raise ToolchainError(f"{what} could not start: {exc}") from None
    if r.returncode != 0:
        where = ""
        if log_path is not None:
            log_path.write_text(" ".join(cmd) + "\n\n" + r.stdout + r.stderr)
            where = f" (full log: {log_path})"
        raise ToolchainError(f"{what} failed: {first_error(r.stderr + r.stdout)}{where}")


def compile_fatbin(source: str, archs: Sequence[str], nvcc: str, flags: Sequence[str] = (), *,
                   what: str = "nvcc") -> bytes:
    """``nvcc --fatbin`` of a CUDA source: SASS for each sm_XY and no PTX (nothing left to JIT on the device)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rsp-nvcc-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(source)
        run_tool([nvcc, "--fatbin", *gencode_flags(archs), *flags, "-o", str(out), str(src)],
                 f"{what} ({','.join(archs)})")
        return out.read_bytes()


def _dryrun(exe: str) -> str:
    r = subprocess.run([exe, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True,
                       text=True, timeout=60)
    return r.stdout + r.stderr


@functools.lru_cache(maxsize=None)
def toolkit_root(nvcc: str | None = None) -> Path | None:
    """The CUDA toolkit folder of nvcc (its TOP in `nvcc --dryrun`: nvcc may be a wrapper script); None
    without nvcc."""
    exe = find_nvcc(nvcc)
    if not exe:
        return None
    m = re.search(r"^#\$ TOP=(.+)$", _dryrun(exe), re.MULTILINE)
    root = Path(m.group(1).strip()).resolve() if m else Path(exe).resolve().parent.parent
    return root if root.is_dir() else None


@functools.lru_cache(maxsize=None)
def cuda_library_dir(nvcc: str | None = None) -> Path | None:
    """The folder holding libcudart_static.a of nvcc's toolkit (nvcc --dryrun names it); None where absent."""
    exe = find_nvcc(nvcc)
    cands: list[Path] = []
    if exe:
        cands += [Path(m.group(1)) for m in re.finditer(r'-L"?([^"\s]+)"?', _dryrun(exe))]
        cands.append(Path(exe).resolve().parent.parent / "lib64")
    cands += [Path(os.environ[env]) / "lib64" for env in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(env)]
    cands.append(Path("/usr/local/cuda/lib64"))
    for c in cands:
        if (c / "libcudart_static.a").is_file():
            return c.resolve()
    return None


@functools.lru_cache(maxsize=None)
def compiler_machine(cxx: str) -> str:
    """The target triple of a host compiler (``g++ -dumpmachine``), e.g. aarch64-linux-gnu."""
    try:
        return subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError as exc:
        raise ToolchainError(f"cannot run the host compiler {cxx}: {exc}") from None


# --- ELF -----------------------------------------------------------------------------------------


def elf_machine(data: bytes) -> str:
    """The machine of an ELF image: x86_64, aarch64, cuda (a cubin), or the e_machine number."""
    if data[:4] != b"\x7fELF":
        raise BinaryFormatError("not an ELF file")
    (machine,) = struct.unpack_from("<H", data, 18)
    return ELF_MACHINES.get(machine, str(machine))


def _elf_section_table(data: bytes) -> list[tuple]:
    """(sh_name, sh_type, sh_flags, sh_addr, sh_offset, sh_size, sh_link, sh_info, sh_addralign, sh_entsize) of
    every section of a little-endian ELF64 image (any machine: no binutils needed)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BinaryFormatError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    return [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]


def _cstr(data: bytes, off: int) -> str:
    return data[off: data.index(b"\0", off)].decode(errors="replace")


def elf_sections(data: bytes) -> dict[str, bytes]:
    """Section name -> contents of a little-endian ELF64 image."""
    secs = _elf_section_table(data)
    shstrndx, = struct.unpack_from("<H", data, 0x3E)
    names = secs[shstrndx][4]
    return {_cstr(data, names + s[0]): b"" if s[1] == 8 else data[s[4]: s[4] + s[5]]  # SHT_NOBITS: no contents
            for s in secs}


def _symbols(data: bytes, types: tuple[int, ...]):
    """(name, section index, value, size) of every named symbol in the symbol tables of these types."""
    secs = _elf_section_table(data)
    for _, typ, _, _, off, size, link, _, _, entsize in secs:
        if typ not in types or not entsize:
            continue
        for j in range(1, size // entsize):
            st_name, _, _, shndx, value, st_size = struct.unpack_from("<IBBHQQ", data, off + j * entsize)
            if st_name:
                yield _cstr(data, secs[link][4] + st_name), shndx, value, st_size


SHT_SYMTAB, SHT_DYNSYM, SHT_DYNAMIC = 2, 11, 6


def elf_symbols(data: bytes, undefined: bool = False) -> list[str]:
    """Names in the symbol tables (.symtab and .dynsym): the defined ones, or only the undefined ones."""
    return list(dict.fromkeys(n for n, shndx, _, _ in _symbols(data, (SHT_SYMTAB, SHT_DYNSYM))
                              if (shndx == 0) == undefined))


def elf_symbol_bytes(data: bytes, symbol: str) -> bytes | None:
    """The bytes of a defined symbol (None: not defined, or in a section without file contents)."""
    secs = _elf_section_table(data)
    for name, shndx, value, size in _symbols(data, (SHT_SYMTAB, SHT_DYNSYM)):
        if name != symbol or not 0 < shndx < len(secs):
            continue
        sec = secs[shndx]
        if sec[1] == 8:  # SHT_NOBITS
            return None
        start = sec[4] + (value - sec[3])
        return data[start: start + size]
    return None


def elf_dynamic(data: bytes) -> tuple[list[str], list[str]]:
    """(DT_NEEDED libraries, defined dynamic symbols) of a shared object."""
    needed = []
    secs = _elf_section_table(data)
    for _, typ, _, _, off, size, link, _, _, entsize in secs:
        if typ == SHT_DYNAMIC and entsize:
            for j in range(size // entsize):
                tag, val = struct.unpack_from("<qQ", data, off + j * entsize)
                if tag == 1:  # DT_NEEDED
                    needed.append(_cstr(data, secs[link][4] + val))
    return needed, [n for n, shndx, _, _ in _symbols(data, (SHT_DYNSYM,)) if shndx]


# --- fatbins -------------------------------------------------------------------------------------


def fatbin_entries(data: bytes, offset: int = 0) -> tuple[list[dict], int]:
    """The entries of the fatbin container at `offset` and the offset where the container ends.

    Layout: a 16-byte header (magic 0xBA55ED50 u32, version u16, header size u16, payload size u64), then
    entries, each a header (kind u16: 1 PTX, 2 ELF; version u16; header size u32; payload size u64; ...; the
    SM number u32 at byte 28) and its payload. Entry: {kind: "elf" (SASS) | "ptx", sm, size}, and for SASS
    elf_machine / elf_sm read from the entry's own ELF header (e_machine 190 = EM_CUDA; the SM is in bits
    8-15 of e_flags from ELF ABI version 8 (e_ident[8], CUDA 12.8+), bits 0-7 before).
    """
    if len(data) < offset + 16:
        raise BinaryFormatError("truncated fatbin header")
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", data, offset)
    if magic != FATBIN_MAGIC:
        raise BinaryFormatError(f"not a fatbin (magic {magic:#x})")
    pos, end = offset + hsize, offset + hsize + fsize
    if end > len(data):
        raise BinaryFormatError("truncated fatbin")
    entries = []
    while pos + 32 <= end:
        kind, _, ehsize, psize = struct.unpack_from("<HHIQ", data, pos)
        sm, = struct.unpack_from("<I", data, pos + 28)
        entry = {"kind": {1: "ptx", 2: "elf"}.get(kind, str(kind)), "sm": sm, "size": psize}
        payload = data[pos + ehsize: pos + ehsize + psize]
        if kind == 2 and payload[:4] == b"\x7fELF" and len(payload) >= 52:
            (flags,) = struct.unpack_from("<I", payload, 48)
            entry["elf_machine"] = elf_machine(payload)
            entry["elf_sm"] = (flags >> 8) & 0xFF if payload[8] >= 8 else flags & 0xFF
        entries.append(entry)
        pos += ehsize + psize
    return entries, end


def parse_fatbins(data: bytes) -> list[dict]:
    """Every fatbin container in `data` (found by its magic): [{offset, bytes, entries}]."""
    found, start = [], 0
    magic = struct.pack("<I", FATBIN_MAGIC)
    while (i := data.find(magic, start)) >= 0:
        try:
            entries, end = fatbin_entries(data, i)
        except (BinaryFormatError, struct.error):  # the magic's bytes inside something else
            start = i + 4
            continue
        found.append({"offset": i, "bytes": end - i, "entries": entries})
        start = end
    return found


def sass_and_ptx(entries: Iterable[dict]) -> tuple[list[int], list[int]]:
    """(SM numbers with SASS, SM numbers with PTX) of fatbin entries, sorted."""
    entries = list(entries)
    return (sorted({e["sm"] for e in entries if e["kind"] == "elf"}),
            sorted({e["sm"] for e in entries if e["kind"] == "ptx"}))


def check_sass_only(sass: Iterable[str], ptx: bool, archs: Iterable[str], what: str) -> None:
    """Raise unless device code read back (its sm_XY with SASS, whether it holds PTX) is SASS for exactly
    these archs, with no PTX left to JIT on the device."""
    found, want = sorted(set(sass)), sorted(set(archs))
    if found != want or ptx:
        raise ToolchainError(f"{what} are not SASS for exactly {','.join(want)} (found SASS {found}, PTX: {ptx})")


def inspect_device_code(path: str | Path) -> dict:
    """What device code a built artifact holds, read from its bytes (no cuobjdump needed).

    Returns {"format": "cubin"|"fatbin"|"host+fatbin", "sass": [87, 90, ...], "ptx": [...]}; raises
    BinaryFormatError (a ValueError) where the file holds no device code.
    """
    data = Path(path).read_bytes()
    if data[:4] == struct.pack("<I", FATBIN_MAGIC):
        entries, fmt = fatbin_entries(data)[0], "fatbin"
    elif data[:4] == b"\x7fELF":
        if elf_machine(data) == "cuda":
            e_flags, = struct.unpack_from("<I", data, 0x30)
            sm = (e_flags >> 8) & 0xFF if data[8] >= 8 else e_flags & 0xFF
            return {"format": "cubin", "sass": [sm], "ptx": []}
        secs = elf_sections(data)
        blob = secs.get(".nv_fatbin") or secs.get(".nvFatBinSegment")
        if not blob or struct.unpack_from("<I", blob, 0)[0] != FATBIN_MAGIC:
            raise BinaryFormatError(f"{path}: host ELF without an embedded fatbin")
        # one fatbin per translation unit, one after another
        entries, fmt = [e for f in parse_fatbins(blob) for e in f["entries"]], "host+fatbin"
    else:
        raise BinaryFormatError(f"{path}: neither ELF nor fatbin")
    sass, ptx = sass_and_ptx(entries)
    if not sass and not ptx:
        raise BinaryFormatError(f"{path}: fatbin without entries")
    return {"format": fmt, "sass": sass, "ptx": ptx}

"""Apache TVM 0.27 (Relax) builds for `rsp export --format tvm`. Optional: imports TVM only when called.

Flow: torch.export -> relax.frontend.torch.from_exported_program -> tvm.compile for the registry target
(CUDA kernels scheduled by dlight's defaults, CPU code optionally tuned with MetaSchedule) ->
export_library, cross-linked with the target's compiler (aarch64-linux-gnu-g++ for a Jetson).

Precompiled CUDA. TVM 0.27 keeps the CUDA *source* of the kernels in the library when it is built on a
machine without a CUDA driver (its codegen returns a "fallback" CUDA module with fmt "cuda"), and the
device runtime compiles that source at load time, which needs NVRTC or nvcc there. rsp instead compiles
the source here with nvcc into a fatbin holding SASS for the target's architectures and swaps it into
the serialized module blob (export_library's fpack_imports hook), which is linked into the shared object
as the symbol TVM's loader reads (`__tvm_ffi__library_bin`), so the device needs only TVM's runtime and
the CUDA driver. The blob layout is TVM 0.27's; the parser below checks every length and refuses anything
else instead of writing a broken library. inspect_library reads a built library back the same way. Finding
and running nvcc and reading fatbins and ELF files is rsp.kernels.toolchain's, shared with rsp's kernels.

rsp's sparse kernels. build(sparse_layers=...) rewrites the Relax module so that the layers the plan marks
sparse call rsp's BSR kernels (R.call_dps_packed; kernels/relax_link.py) and links their object, compiled
with the TVM FFI entry points, into the library (export_library(options=[obj, ...])): the library module
finds each kernel through its exported __tvm_ffi_<name> symbol. GPU targets link the CUDA kernels (SASS
only, for the target's archs); a CPU target can link their host emulator instead (a correctness path).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import ArtifactError
from .kernels import toolchain
# nvcc_version is re-exported (rsp.tvm_build has always offered it); nvcc, fatbins and ELF files are the toolchain's
from .kernels.toolchain import (BinaryFormatError, ToolchainError, check_sass_only, elf_dynamic,  # noqa: F401
                                elf_machine, elf_sections, elf_symbol_bytes, nvcc_version, parse_fatbins)
from .targets import Target

TVM_VERSION = "0.27"
# nvcc flags TVM itself uses for its kernels (half/bfloat16 operators), minus --use_fast_math: rsp's parity
# promise is about exact float32 arithmetic, and approximate division/rsqrt would break it on the device.
NVCC_FLAGS = ["-O3", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda"]


class TVMBuildError(ArtifactError):
    """Something the TVM build needs is missing or wrong: one line, exit code 2."""


class TVMCompileError(RuntimeError):
    """TVM itself failed on a valid request (an internal error): one line, exit code 1."""


def require_tvm():
    try:
        import tvm  # noqa: F401
        from tvm import relax  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything on import
        raise TVMBuildError(f"the TVM library (export --format tvm, verify --backend tvm) needs Apache TVM {TVM_VERSION} (pip install 'rsp[export]'): "
                            f"cannot import tvm ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not tvm.__version__.startswith(TVM_VERSION):
        raise TVMBuildError(f"the TVM library needs Apache TVM {TVM_VERSION}, found {tvm.__version__}")
    return tvm


def _plain(value):
    """tvm_ffi Map/Array -> plain dict/list (a Target's export() is not JSON-ready)."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return [_plain(v) for v in value]
    return value


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def target_config(target: Target) -> dict:
    """The TVM target of a registry entry as a JSON dict (TVM 0.27 targets are dicts, not '-arch=' strings)."""
    tvm = require_tvm()
    if "tag" in target.tvm:
        try:
            base = _plain(tvm.target.Target(target.tvm["tag"]).export())
        except Exception as exc:
            raise TVMBuildError(f"TVM has no target tag {target.tvm['tag']!r}: {str(exc).splitlines()[0]}") from None
    else:
        base = dict(target.tvm["target"])
    cfg = _merge(base, target.tvm.get("override") or {})

    def clean(d: dict) -> dict:
        # the tag's derived feature.* flags belong to its mcpu: drop them so TVM derives them from ours
        return {k: v for k, v in d.items() if k != "tag" and not k.startswith("feature.")}

    cfg = clean(cfg)
    if isinstance(cfg.get("host"), dict):
        cfg["host"] = clean(cfg["host"])
    return cfg


def tvm_target(target: Target):
    tvm = require_tvm()
    return tvm.target.Target(target_config(target))


# --- import --------------------------------------------------------------------------------------


def relax_module(model: torch.nn.Module, batch: int, chw: tuple[int, int, int]):
    """Relax IRModule of the eval-mode model for a static batch (weights bound as constants)."""
    require_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    import warnings

    example = torch.zeros(batch, *chw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own LeafSpec deprecation noise
        exported = torch.export.export(model.eval(), (example,))
        return from_exported_program(exported, keep_params_as_input=False)


# --- CUDA: nvcc -> fatbin, swapped into the library blob ------------------------------------------


def compile_fatbin(source: str, archs: tuple[str, ...], nvcc: str) -> bytes:
    """nvcc --fatbin of TVM's kernels, SASS for each sm_XY (no PTX: nothing is left to JIT on the device)."""
    try:
        return toolchain.compile_fatbin(source, archs, nvcc, NVCC_FLAGS, what="nvcc on TVM's kernels")
    except ToolchainError as exc:
        raise TVMBuildError(str(exc)) from None


class _Reader:
    def __init__(self, data: bytes, what: str):
        self.data, self.pos, self.what = data, 0, what

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise TVMBuildError(f"unexpected {self.what} layout (not TVM {TVM_VERSION}'s): truncated at byte {self.pos}")

    def u64(self) -> int:
        self.need(8)
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def raw(self, n: int) -> bytes:
        self.need(n)
        out = self.data[self.pos: self.pos + n]
        self.pos += n
        return out

    def blob(self) -> bytes:
        return self.raw(self.u64())

    def str(self) -> str:
        return self.blob().decode("utf-8", errors="replace")


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def _blob(b: bytes) -> bytes:
    return _u64(len(b)) + b


def _cuda_module_parts(data: bytes) -> tuple[str, bytes, bytes]:
    """Split a serialized CUDA module (TVM 0.27: fmt, function table, code) -> (fmt, table bytes, code)."""
    r = _Reader(data, "CUDA module")
    fmt = r.str()
    start = r.pos
    for _ in range(r.u64()):  # Map<String, FunctionInfo>
        r.str()  # key
        r.str()  # FunctionInfo.name
        r.raw(4 * r.u64())  # arg_types: DLDataType (code, bits, lanes)
        for _ in range(r.u64()):  # launch_param_tags
            r.str()
        r.raw(4 * r.u64())  # arg_extra_tags (int32)
    table = data[start: r.pos]
    code = r.blob()
    if r.pos != len(data):
        raise TVMBuildError(f"unexpected CUDA module layout (not TVM {TVM_VERSION}'s): {len(data) - r.pos} trailing bytes")
    return fmt, table, code


def replace_cuda_source(blob: bytes, compile_source: Callable[[str], bytes]) -> tuple[bytes, list[dict]]:
    """Rewrite a `__tvm_ffi__library_bin` blob so that every CUDA module holding source holds a fatbin."""
    r = _Reader(blob, "library blob")
    size = r.u64()
    if size != len(blob) - 8:
        raise TVMBuildError(f"unexpected library blob layout (not TVM {TVM_VERSION}'s): size field {size} != {len(blob) - 8}")
    row_ptr = [r.u64() for _ in range(r.u64())]
    child = [r.u64() for _ in range(r.u64())]
    body = _u64(len(row_ptr)) + b"".join(map(_u64, row_ptr)) + _u64(len(child)) + b"".join(map(_u64, child))
    swapped = []
    for _ in range(max(0, len(row_ptr) - 1)):
        kind = r.str()
        body += _blob(kind.encode())
        if kind == "_lib":  # the host library itself: no payload
            continue
        payload = r.blob()
        if kind == "cuda":
            fmt, table, code = _cuda_module_parts(payload)
            if fmt == "cuda":
                fatbin = compile_source(code.decode("utf-8"))
                payload = _blob(b"fatbin") + table + _blob(fatbin)
                swapped.append({"source_bytes": len(code), "fatbin_bytes": len(fatbin)})
        body += _blob(payload)
    if r.pos != len(blob):
        raise TVMBuildError(f"unexpected library blob layout (not TVM {TVM_VERSION}'s): {len(blob) - r.pos} trailing bytes")
    return _u64(len(body)) + body, swapped


def _incbin_source(symbol: str, blob_path: str) -> str:
    """Assembly that defines `symbol` as the bytes of `blob_path`. TVM's C packer spells the blob (the
    model's weights included) as a hex array, 5 bytes of C per byte: 300 MB of C for a VGG-16; .incbin
    lets the assembler copy the file as is. GNU as reads this for x86-64 and AArch64 alike."""
    return (f"\t.section .rodata\n\t.global {symbol}\n\t.type {symbol}, STT_OBJECT\n\t.balign 16\n{symbol}:\n"
            f"\t.incbin \"{blob_path}\"\n\t.size {symbol}, . - {symbol}\n"
            "\t.section .note.GNU-stack,\"\",%progbits\n")


def blob_packer(rewrite: Callable[[bytes], bytes]) -> Callable:
    """An export_library(fpack_imports=...) hook that links TVM's serialized imports after `rewrite`."""

    def fpack(mod, is_system_lib, prefix, workspace_dir):
        import tvm_ffi

        if is_system_lib or prefix:
            raise TVMBuildError("system-lib TVM builds are not supported by rsp's packer")
        blob = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()
        blob_path = os.path.abspath(os.path.join(workspace_dir, "devc.bin"))
        Path(blob_path).write_bytes(rewrite(blob))
        path = os.path.join(workspace_dir, "devc.S")
        Path(path).write_text(_incbin_source(BLOB_SYMBOL, blob_path))
        return path

    return fpack


def fatbin_packer(archs: tuple[str, ...], nvcc: str, report: list) -> Callable:
    """blob_packer with every CUDA module's source replaced by an nvcc-compiled fatbin."""

    def rewrite(blob: bytes) -> bytes:
        new_blob, swapped = replace_cuda_source(blob, lambda src: compile_fatbin(src, archs, nvcc))
        if not swapped:
            raise TVMBuildError("the TVM build holds no CUDA source to compile (was the library already compiled?)")
        report.extend(swapped)
        return new_blob

    return blob_packer(rewrite)


# --- inspecting a built library ------------------------------------------------------------------


CUDA_SOURCE_MARKERS = (b'extern "C" __global__', b"__launch_bounds__(")
BLOB_SYMBOL = "__tvm_ffi__library_bin"


def blob_modules(blob: bytes) -> list[dict]:
    """The modules serialized in a library blob: kind, and for CUDA modules their format and code."""
    r = _Reader(blob, "library blob")
    r.u64()
    row_ptr = [r.u64() for _ in range(r.u64())]
    r.raw(8 * r.u64())
    out = []
    for _ in range(max(0, len(row_ptr) - 1)):
        kind = r.str()
        entry = {"kind": kind}
        if kind != "_lib":
            payload = r.blob()
            entry["bytes"] = len(payload)
            if kind == "cuda":
                fmt, _, code = _cuda_module_parts(payload)
                entry.update(fmt=fmt, code_bytes=len(code), fatbins=parse_fatbins(code) if fmt == "fatbin" else [])
        out.append(entry)
    if r.pos != len(blob):
        raise TVMBuildError(f"unexpected library blob layout (not TVM {TVM_VERSION}'s): {len(blob) - r.pos} trailing bytes")
    return out


def inspect_library(path: str | Path) -> dict:
    """What a TVM library holds: its ELF machine, its serialized modules (read from the
    __tvm_ffi__library_bin symbol), the SASS architectures of its fatbins and whether CUDA source is left;
    and what linked objects brought in (rsp's kernels): the TVM FFI functions it exports (``__tvm_ffi_NAME``),
    the SASS/PTX of the fatbins in its .nv_fatbin section, and the shared libraries it needs."""
    data = Path(path).read_bytes()
    try:
        machine = elf_machine(data)
    except BinaryFormatError:
        machine = "not-elf"
    try:
        blob, (needed, dynsyms) = elf_symbol_bytes(data, BLOB_SYMBOL), elf_dynamic(data)
        nv = elf_sections(data).get(".nv_fatbin")
    except BinaryFormatError:  # not an ELF64 file: nothing of TVM's in it
        blob, needed, dynsyms, nv = None, [], [], None
    modules = blob_modules(blob) if blob else []
    cuda = [m for m in modules if m["kind"] == "cuda"]
    entries = [e for m in cuda for f in m.get("fatbins", []) for e in f["entries"]]
    kentries = [e for f in parse_fatbins(nv or b"") for e in f["entries"]]
    return {"elf_machine": machine, "modules": [m["kind"] for m in modules],
            "cuda_modules": [{"fmt": m["fmt"], "code_bytes": m["code_bytes"]} for m in cuda],
            "sass": sorted({f"sm_{e['sm']}" for e in entries if e["kind"] == "elf"}),
            "ptx": any(e["kind"] == "ptx" for e in entries),
            "cuda_source": any(m["fmt"] == "cuda" for m in cuda) or any(s in data for s in CUDA_SOURCE_MARKERS),
            "tvm_ffi_functions": sorted(n[len("__tvm_ffi_"):] for n in dynsyms
                                        if n.startswith("__tvm_ffi_") and not n.startswith("__tvm_ffi__")),
            "linked_sass": sorted({f"sm_{e['sm']}" for e in kentries if e["kind"] == "elf"}),
            "linked_ptx": any(e["kind"] == "ptx" for e in kentries), "needed": needed}


# --- MetaSchedule tuning (CPU) ---------------------------------------------------------------------


def _fast_tvmscript_import() -> None:
    """Importing tvm.s_tir.tensor_intrin (MetaSchedule does) parses ~250 TVMScript functions, each calling
    inspect.stack(); for every frame whose file is a pseudo-file ("<ast>" from TVMScript's own evaluator,
    "<frozen importlib._bootstrap>", "<string>", ...) inspect.getmodule() scans all of sys.modules (thousands
    once torch is loaded) and finds nothing, which makes the import take 20-70 s. Mapping those names in
    inspect's cache to a module name that does not exist gives the same answer (None) as a dict hit."""
    import inspect
    import sys

    names = {"<ast>", "<string>", "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"}
    frame = sys._getframe()
    while frame is not None:
        names.add(frame.f_code.co_filename)
        frame = frame.f_back
    for name in names:
        if name.startswith("<") and name.endswith(">"):
            inspect.modulesbyfile.setdefault(name, "<rsp: not a module>")


def _in_process_builder():
    """MetaSchedule's LocalBuilder starts a fresh process pool for every batch, and each worker re-imports
    tvm and tensor_intrin (30-60 s per batch on a 2-core machine, longer than its 30 s timeout). Building a
    candidate is a 30 ms LLVM compile, so rsp builds candidates here; measuring still runs in LocalRunner's
    worker process."""
    from tvm.driver import build as tvm_build
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs):
            results = []
            for item in build_inputs:
                try:
                    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(item.mod)
                    results.append(ms.builder.BuilderResult(default_export(tvm_build(mod, target=item.target)), None))
                except Exception as exc:  # a candidate that does not build is a failed trial, not a failed export
                    results.append(ms.builder.BuilderResult(None, f"{type(exc).__name__}: {exc}"))
            return results

    return InProcessBuilder()


@dataclass
class TuneResult:
    database: object
    info: dict = field(default_factory=dict)


def tune(mod, target, trials: int, cache_dir: Path, log=print, seed: int = 0) -> TuneResult | None:
    """Tune every task of `mod` with MetaSchedule, reusing the records cached in `cache_dir`.

    The cache is MetaSchedule's own JSON database (records keyed by workload, so they serve any model that
    shares a layer shape) plus rsp-tuning.json, which remembers how many trials each (target, task set)
    already had: asking again for no more trials than that reuses the records without measuring anything.
    """
    import tvm_ffi
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    _fast_tvmscript_import()
    t0 = time.perf_counter()
    with target:
        lowered = relax.pipeline.zero_pipeline()(mod)
    tasks = ms.relax_integration.extract_tasks(lowered, target, {})
    if not tasks:  # every operator runs in rsp's kernels
        log("tvm: nothing for MetaSchedule to tune (every operator runs in rsp's kernels)")
        return None
    cache_dir.mkdir(parents=True, exist_ok=True)
    task_hashes = sorted(str(tvm_ffi.structural_hash(t.dispatched[0])) for t in tasks)
    key = hashlib.sha256(json.dumps([str(target), task_hashes]).encode()).hexdigest()[:16]
    ledger_path = cache_dir / "rsp-tuning.json"
    try:
        ledger = json.loads(ledger_path.read_text())
    except (OSError, json.JSONDecodeError):
        ledger = {}
    done = int(ledger.get(key, {}).get("trials", 0))
    todo = max(0, trials - done)
    try:
        import xgboost  # noqa: F401

        cost_model = "xgb"
    except ImportError:  # xgboost is a 200 MB wheel; random ranking is fine for the small budgets used here
        cost_model = "random"
    if todo:
        per_task = max(1, math.ceil(todo / max(1, len(tasks))))
        log(f"tvm: tuning {len(tasks)} tasks, {todo} trials (cache {cache_dir}, cost model {cost_model}; "
            f"MetaSchedule logs in {cache_dir / 'logs'})")
        import logging

        # MetaSchedule gives its stdout handler the logger's current level and logs everything to files:
        # WARNING keeps rsp's stdout to its one summary line
        logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
        database = ms.relax_integration.tune_relax(
            lowered, {}, target, str(cache_dir), max_trials_global=todo, max_trials_per_task=per_task,
            num_trials_per_iter=min(per_task, 64), builder=_in_process_builder(), cost_model=cost_model,
            # a population of ~8 candidates per measured trial: MetaSchedule's default 512 spends minutes of
            # (single-threaded, cost-model-free) search per task on the small budgets used for edge models
            strategy=ms.search_strategy.EvolutionarySearch(population_size=min(512, max(32, 8 * per_task)),
                                                           init_min_unmeasured=min(50, max(8, per_task)),
                                                           genetic_num_iters=2),
            seed=seed)
        ledger[key] = {"trials": done + todo, "target": str(target), "tasks": len(tasks),
                       "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
        from .artifacts import write_json

        write_json(ledger_path, ledger)
    else:
        log(f"tvm: reusing {done} cached tuning trials from {cache_dir}")
        database = ms.database.JSONDatabase(work_dir=str(cache_dir), module_equality="structural")
    return TuneResult(database, {"trials_requested": trials, "trials_run": todo, "trials_reused": min(done, trials),
                                 "tasks": len(tasks), "cache": str(cache_dir), "key": key, "cost_model": cost_model,
                                 "strategy": "evolutionary", "time_s": round(time.perf_counter() - t0, 2)})


# --- the build --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keep_cuda_source(enabled: bool = True):
    """Where a CUDA driver is present, TVM 0.27's codegen JIT-compiles the kernels at build time (NVRTC by
    default, for *this* machine's GPU) instead of keeping their source; its TVM_COMPILE_FORCE_FALLBACK
    switch keeps the source on any machine, so nvcc always compiles it for the target's architectures."""
    if not enabled:
        yield
        return
    old = os.environ.get("TVM_COMPILE_FORCE_FALLBACK")
    os.environ["TVM_COMPILE_FORCE_FALLBACK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TVM_COMPILE_FORCE_FALLBACK", None)
        else:
            os.environ["TVM_COMPILE_FORCE_FALLBACK"] = old


@dataclass
class BuildResult:
    info: dict


def build(model: torch.nn.Module, chw: tuple[int, int, int], target: Target, out_file: Path, *, batch: int = 1,
          nvcc: str | None = None, tune_trials: int = 0, tune_cache: Path | None = None,
          sparse_layers: dict[str, torch.Tensor] | None = None, sparse_mode: str = "cuda", dense_layers=(),
          log=print) -> BuildResult:
    """Compile `model` for `target` into the shared library `out_file` (written atomically).

    sparse_layers ({layer: weight}): run these layers with rsp's BSR kernels instead of TVM's (the Relax
    rewrite of kernels.relax_link; the kernel object is linked into the library). sparse_mode "cuda": the
    CUDA kernels (a GPU target); "host": their CPU emulator (a CPU target: tests the linkage, not fast);
    "cpu": rsp's CPU sparse kernels (a CPU target, compiled for its mcpu). dense_layers: those of
    sparse_layers that run rsp's dense CPU kernel instead (mode "cpu" only)."""
    tvm = require_tvm()
    from tvm.support import cc

    from .artifacts import atomic_write_bytes

    if batch < 1:
        raise TVMBuildError(f"--batch must be >= 1, got {batch}")
    if sparse_layers and sparse_mode not in ("cuda", "host", "cpu"):
        raise TVMBuildError(f"sparse kernel mode must be cuda, host or cpu, got {sparse_mode!r}")
    cuda = target.gpu_api == "cuda"  # the only GPU API rsp's registry accepts
    # the host emulator stands in for the CUDA kernels in a library whose code all runs on the CPU
    if sparse_layers and sparse_mode not in target.sparse_kernels and not (sparse_mode == "host" and not cuda):
        raise TVMBuildError(f"target {target.name} " + ("has a GPU: link the CUDA kernels, not the host emulator"
                                                        if cuda else f"does not run rsp's {sparse_mode} kernels "
                                                        f"(its sparse_kernels: {', '.join(target.sparse_kernels) or 'none'}"
                                                        "; the host emulator links into CPU libraries)"))
    nvcc_info = None
    if cuda:
        try:
            nvcc = toolchain.require_nvcc(nvcc)
            info = toolchain.nvcc_info(nvcc)
            if target.cuda_toolkit_max_major and info.major > target.cuda_toolkit_max_major:
                raise TVMBuildError(f"target {target.name} ({','.join(target.cuda_arch)}) needs a CUDA <= "
                                    f"{target.cuda_toolkit_max_major} toolkit; {nvcc} is CUDA {info.release} (pass --nvcc)")
            toolchain.require_archs(nvcc, target.cuda_arch)
        except ToolchainError as exc:
            raise TVMBuildError(f"{exc} (the TVM build of a CUDA target compiles its kernels here)") from None
        nvcc_info = {"path": nvcc, "version": info.release, "major": info.major}
    if tune_trials:
        if target.gpu_api or not target.native:
            raise TVMBuildError(f"--tune-trials measures candidates on this {os.uname().machine} machine: it works "
                                f"for CPU targets of the same architecture, not {target.name}")
    fcompile = None
    if not target.native:
        compiler = target.linker
        if not compiler or not shutil.which(compiler):
            raise TVMBuildError(f"cross compiler {compiler or '?'} for {target.triple} not found: install "
                                f"g++-{target.triple} (scripts/setup.sh)")
        fcompile = cc.cross_compiler(compiler)

    t0 = time.perf_counter()
    config = target_config(target)
    if tune_trials and "num-cores" not in config:
        import psutil  # MetaSchedule sizes its parallel loops by the cores it measures on

        config["num-cores"] = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    tgt = tvm.target.Target(config)
    tuning = None
    link = None
    try:
        mod = relax_module(model, batch, chw)
        if sparse_layers:
            from .kernels.relax_link import HOST_ARCH, link_sparse_layers

            link = link_sparse_layers(mod, sparse_layers, arch=target.cuda_arch[0] if sparse_mode == "cuda" else HOST_ARCH,
                                      kind="cpu" if sparse_mode == "cpu" else "cuda",
                                      dense=dense_layers if sparse_mode == "cpu" else ())
            mod = link.mod
            what = {"cuda": "CUDA", "host": "host emulator", "cpu": f"CPU ({target.mcpu})"}[sparse_mode]
            log(f"tvm: {len(link.linked)} layer(s) call rsp's {what} "
                f"kernels: {', '.join(link.symbols) or '-'}"
                + (f"; not linked: {', '.join(f'{k} ({v})' for k, v in link.not_linked.items())}" if link.not_linked else ""))
        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        if tune_trials:
            from tvm import relax
            from tvm.s_tir import meta_schedule as ms

            mod = relax.transform.DecomposeOpsForInference()(mod)
            result = tune(mod, tgt, tune_trials, tune_cache or default_tune_cache(target), log=log)
            if result is None:
                tuning = {"trials_requested": tune_trials, "trials_run": 0, "trials_reused": 0, "tasks": 0,
                          "note": "every operator runs in rsp's kernels: nothing for MetaSchedule to tune"}
                executable = tvm.compile(mod, target=tgt)
            else:
                tuning = result.info
                executable = ms.relax_integration.compile_relax(result.database, mod, tgt, None)
        else:
            with _keep_cuda_source(cuda):
                executable = tvm.compile(mod, target=tgt)
    except (TVMBuildError, KeyboardInterrupt):
        raise
    except Exception as exc:  # TVM's errors carry C++ stacks: keep the message, drop the rest
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise TVMCompileError(f"TVM failed to {'tune' if tune_trials else 'compile'} {target.name}: "
                              f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}") from exc
    t_compile = time.perf_counter() - t1
    t2 = time.perf_counter()
    swapped: list = []
    kwargs = {}
    if cuda:
        kwargs["fpack_imports"] = fatbin_packer(target.cuda_arch, nvcc_info["path"], swapped)
    elif not target.native:
        # TVM packs the module blob with LLVM for the first LLVM module's triple; when every operator runs in
        # rsp's kernels there is none and it would emit a host (x86) object: assemble it for the target instead
        kwargs["fpack_imports"] = blob_packer(lambda blob: blob)
    kernels_info = None
    if link is not None and link.linked:
        from .kernels.build import KernelBuildError
        from .kernels.relax_link import kernel_object

        try:
            obj = kernel_object(link.kernels, sparse_mode, archs=target.cuda_arch,
                                nvcc=nvcc_info["path"] if nvcc_info else None, cross_cxx=target.linker,
                                cxx=target.linker, cpu=target.mcpu)
        except KernelBuildError as exc:
            raise TVMBuildError(f"building rsp's sparse kernels failed: {exc}") from None
        kwargs["options"] = obj["options"]
        kernels_info = {"mode": sparse_mode, "layers": [ll.as_dict() for ll in link.linked],
                        "not_linked": link.not_linked, "object": obj["info"],
                        "time_s": round(time.perf_counter() - t2, 2)}
    elif link is not None:
        kernels_info = {"mode": sparse_mode, "layers": [], "not_linked": link.not_linked, "object": None}
    with tempfile.TemporaryDirectory(prefix="rsp-tvm-") as tmp:
        lib = Path(tmp) / out_file.name
        try:
            executable.export_library(str(lib), fcompile=fcompile, **kwargs)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            why = next((ln for ln in lines if "error" in ln.lower() and "Command line" not in ln), lines[-1] if lines else "")
            raise TVMBuildError(f"linking the TVM library failed: {why.strip()[:300]}") from None
        atomic_write_bytes(out_file, lib.read_bytes())
    t_link = time.perf_counter() - t2
    lib_info = inspect_library(out_file)
    info = {
        "file": out_file.name, "tvm_version": tvm.__version__, "target": config,
        "host_triple": target.triple, "importer": "relax.frontend.torch.from_exported_program",
        "batch": batch, "input_shape": [batch, *chw], "dtype": "float32", "entry": "main",
        "schedule": ("meta_schedule" if tuning and tuning.get("tasks") else ("dlight default GPU rules" if cuda else "default (untuned)")),
        "tuning": tuning, "library": lib_info,
        "time_s": {"import": round(t_import, 2), "compile": round(t_compile, 2), "link": round(t_link, 2)},
    }
    if cuda:
        if lib_info["cuda_source"]:
            raise TVMBuildError("the library still holds CUDA source, not only the compiled "
                                f"{','.join(target.cuda_arch)} kernels")
        _check_sass(lib_info["sass"], lib_info["ptx"], target.cuda_arch, "TVM's kernels in the library")
        info["cuda"] = cuda_requirements(target, nvcc_info, swapped)
    if kernels_info is not None:
        missing = [ll["symbol"] for ll in kernels_info["layers"] if ll["symbol"] not in lib_info["tvm_ffi_functions"]]
        if missing:
            raise TVMBuildError(f"the library does not export rsp's kernels {', '.join(missing)} (__tvm_ffi_<name>)")
        if kernels_info["layers"] and cuda:
            _check_sass(lib_info["linked_sass"], lib_info["linked_ptx"], target.cuda_arch, "rsp's kernels in the library")
        info["sparse_kernels"] = kernels_info
        if cuda and kernels_info["layers"] and "-lcudart" in kwargs.get("options", []):
            info["cuda"]["device_needs"].append(
                f"libcudart.so.{nvcc_info['major']} on the loader path (rsp's kernels link the device's CUDA runtime)")
    return BuildResult(info)


def _check_sass(sass: list[str], ptx: bool, archs, what: str) -> None:
    try:
        check_sass_only(sass, ptx, archs, what)
    except ToolchainError as exc:
        raise TVMBuildError(str(exc)) from None


def cuda_requirements(target: Target, nvcc_info: dict, swapped: list) -> dict:
    """What the device must have to load the library: recorded in the export manifest."""
    major = nvcc_info["major"]
    jetson = target.family == "jetson"  # JetPack's CUDA versions
    needs = [f"NVIDIA driver for CUDA >= {major}.0"
             + (" (JetPack 7 / L4T r38 or newer)" if jetson and major >= 13 else ""),
             f"TVM {TVM_VERSION} runtime for {target.triple.split('-')[0]} built with CUDA (libtvm_runtime, "
             f"libtvm_runtime_cuda, libtvm_ffi) linked to CUDA {major} (the apache-tvm {TVM_VERSION} wheel's "
             f"runtime links libcudart.so.13)"]
    note = ("JetPack 6 ships CUDA 12.x: for it, export with --nvcc from a CUDA 12 toolkit and use a TVM runtime "
            "built against CUDA 12" if jetson and major >= 13 else "")
    return {"arch": list(target.cuda_arch), "format": "fatbin", "sass_only": True, "nvcc": nvcc_info["version"],
            "cuda_major": major, "kernels_compiled_here": True, "device_needs": needs,
            "device_does_not_need": ["nvcc", "NVRTC (cuda-bindings)", "a C++ compiler"], "note": note,
            "modules": swapped}


def default_tune_cache(target: Target) -> Path:
    base = Path(os.environ.get("RSP_CACHE", Path.home() / ".cache" / "rsp"))
    return base / "tvm-tuning" / target.name


# --- running a library here (parity) ---------------------------------------------------------------


def run_library(path: str | Path, x: np.ndarray, batch: int) -> np.ndarray:
    """Logits of a CPU library for images `x` (N, C, H, W), fed in static batches (the last one padded)."""
    from .runtimes import tvm_runtime

    require_tvm()
    return tvm_runtime(Path(path), tuple(x.shape[1:]), batch).predict(torch.from_numpy(np.asarray(x, np.float32))).numpy()


def time_library(path: str | Path, batch: int, chw, repeat: int = 5) -> float:
    """Median seconds per call of a CPU library (TVM's own timer; each repeat runs >= 100 ms)."""
    tvm = require_tvm()
    from tvm import relax

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    x = tvm.runtime.tensor(np.zeros((batch, *chw), dtype=np.float32))
    return float(vm.time_evaluator("main", tvm.cpu(), number=1, repeat=repeat, min_repeat_ms=100)(x).median)

"""Deployment targets for `rsp export`: one small declarative YAML per device.

Each file names the CPU (LLVM triple, mcpu, the cross compiler that links its host code elsewhere), the GPU
(`gpu: cuda` and the `cuda:` architectures; neither for a CPU-only target), which of rsp's sparse kernels
its library links (`sparse_kernels: [cuda]` or `[cpu]`; the first is what `--sparse-kernels auto` picks),
the TVM target (one of TVM's own tags where it has one, plus overrides where the tag is wrong), the default
formats, the precision of the ONNX/TVM numbers and the TensorRT build options. A board may belong to a
family (`family: jetson`): the family's name is an alias that resolves to the board rsp runs on when it
runs on one of the family's boards (`boards:` lists their /proc/device-tree/model names), else to the
member marked `family_default: true`. The machine rsp runs on is the target whose `boards:` names its
board, else the target of its CPU marked `host_default: true` (x86-cpu on x86-64).

Code asks a target what it can do (`target.gpu_api == "cuda"`, `target.sparse_kernels`, `target.family`,
`target.native`, `target.linker`), never what it is called. Adding a board is adding a YAML file: the
registry reads every `*.yaml` in `target_dirs()`, this folder and then each folder of `$RSP_TARGETS_PATH`
(os.pathsep-separated; a target name may be defined only once), and notices files added or changed while
the process runs. A bad file is refused with one line naming it. The registry only reads and checks the
files; building a `tvm.target.Target` from an entry happens in tvm_build.py, so this module imports
neither TVM nor torch.
"""

from __future__ import annotations

import copy
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..artifacts import ArtifactError
from ..formats import format_names

PRECISIONS = ("fp32", "fp16")
TRT_PRECISIONS = ("fp32", "fp16", "int8")


def __getattr__(name: str):
    # FORMATS: the format registry's names when asked (rsp.formats), so a format registered later is listed
    if name == "FORMATS":
        return format_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class UnknownTargetError(ArtifactError):
    """A target name that is not in the registry: one line listing the known ones, exit code 2."""


GPU_APIS = ("cuda",)  # what tvm_build compiles GPU code with; rsp.kernels has CUDA kernels
SPARSE_KERNELS = ("cuda", "cpu")  # rsp's own kernels (rsp.kernels, rsp.kernels.cpu)
TARGETS_PATH_ENV = "RSP_TARGETS_PATH"
# platform.machine() spellings of the CPU architectures of target triples
_MACHINES = {"AMD64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def host_machine() -> str:
    """The CPU architecture rsp runs on, spelled as in target triples (x86_64, aarch64)."""
    machine = platform.machine()
    return _MACHINES.get(machine, machine)


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    triple: str  # LLVM/GNU triple of the host CPU, e.g. aarch64-linux-gnu
    mcpu: str
    cross_compiler: str | None  # links the host code on another CPU; None: only ever built on its own CPU
    cuda_arch: tuple[str, ...]  # ("sm_87",); empty for a CPU-only target
    cuda_toolkit_max_major: int | None  # e.g. 12 for sm_72, which CUDA 13 no longer compiles
    tvm: dict  # {"tag": ..., "override": {...}} or {"target": {...}}
    formats: tuple[str, ...]
    precision: str
    tensorrt: dict | None
    gpu_api: str | None = None  # "cuda"; None: a CPU-only target
    sparse_kernels: tuple[str, ...] = ()  # rsp's kernels its library links; the first is --sparse-kernels auto's
    family: str | None = None  # e.g. "jetson": the family name is an alias (see aliases())
    family_default: bool = False  # what the alias means off the family's boards
    boards: tuple[str, ...] = ()  # /proc/device-tree/model names of the boards this target is
    host_default: bool = False  # the target of a machine with this CPU whose board no target names
    source: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    @property
    def has_cuda(self) -> bool:
        """gpu_api == "cuda", under the name tests and older callers read."""
        return self.gpu_api == "cuda"

    @property
    def native(self) -> bool:
        """Whether rsp runs on this target's kind of CPU: its host code links, runs and tunes here."""
        return self.arch == host_machine()

    @property
    def linker(self) -> str | None:
        """The compiler that links the host code here: the cross compiler off the target's CPU, else None
        (this machine's)."""
        return None if self.native else self.cross_compiler

    def is_board(self, board: str) -> bool:
        """Whether a /proc/device-tree/model name is one of this target's boards."""
        return any(b.lower() in board.lower() for b in self.boards)

    def as_dict(self) -> dict[str, Any]:
        """The entry as written in its YAML file (recorded in export manifests)."""
        return copy.deepcopy(self.source)


def _names(value: Any, what: str, bad) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise bad(f"{what} must be a list of names")
    return tuple(value)


def _parse(doc: Any, filename: str) -> Target:
    def bad(msg: str) -> ArtifactError:
        return ArtifactError(f"target file {filename}: {msg}")

    if not isinstance(doc, dict):
        raise bad("not a mapping")
    try:
        name, cpu = str(doc["name"]), doc["cpu"]
        tvm = doc.get("tvm") or {}
        if not isinstance(cpu, dict) or "triple" not in cpu:
            raise bad("cpu.triple is required")
        if not isinstance(tvm, dict) or not ({"tag", "target"} & set(tvm)):
            raise bad("tvm needs a tag (TVM's own name) or a target dict")
        cuda = doc.get("cuda") or {}
        formats = tuple(doc.get("formats") or ("onnx",))
        for f in formats:
            if f not in format_names():
                raise bad(f"unknown format {f!r}")
        precision = str(doc.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}")
        trt = doc.get("tensorrt")
        if trt is not None and str(trt.get("precision", "fp16")) not in TRT_PRECISIONS:
            raise bad(f"tensorrt.precision must be one of {', '.join(TRT_PRECISIONS)}")
        if "tensorrt" in formats and (trt is None or not cuda):
            raise bad("the tensorrt format needs a cuda arch and a tensorrt section")
        gpu_api = doc.get("gpu")
        if gpu_api is not None and gpu_api not in GPU_APIS:
            raise bad(f"gpu must be one of {', '.join(GPU_APIS)} (or absent: no GPU)")
        if not isinstance(cuda, dict):
            raise bad("cuda must be a mapping (arch, toolkit_max_major)")
        cuda_arch = _names(cuda.get("arch", []), "cuda.arch", bad)
        if (gpu_api == "cuda") != bool(cuda_arch):
            raise bad("gpu: cuda and a cuda.arch list go together")
        if not all(re.fullmatch(r"sm_[0-9]{2,3}[af]?", a) for a in cuda_arch):
            raise bad("cuda.arch entries are sm_XY names, e.g. sm_87")
        toolkit_max = cuda.get("toolkit_max_major")
        if toolkit_max is not None and (not isinstance(toolkit_max, int) or isinstance(toolkit_max, bool)):
            raise bad("cuda.toolkit_max_major must be a CUDA major version (an integer)")
        kernels = _names(doc.get("sparse_kernels") or [], "sparse_kernels", bad)
        for k in kernels:
            if k not in SPARSE_KERNELS:
                raise bad(f"unknown sparse kernels {k!r} (known: {', '.join(SPARSE_KERNELS)})")
        if "cuda" in kernels and gpu_api != "cuda":
            raise bad("sparse_kernels cuda needs gpu: cuda")
        family = doc.get("family")
        boards = doc.get("boards") or ()
        if family is not None and not isinstance(family, str):
            raise bad("family must be a name")
        if not isinstance(boards, (list, tuple)) or not all(isinstance(b, str) and b for b in boards):
            raise bad("boards must be a list of board model names")
        if doc.get("family_default") and not family:
            raise bad("family_default needs a family")
        return Target(
            name=name, description=str(doc.get("description", "")), triple=str(cpu["triple"]),
            mcpu=str(cpu.get("mcpu", "")), cross_compiler=cpu.get("cross_compiler"), cuda_arch=cuda_arch,
            cuda_toolkit_max_major=toolkit_max, tvm=dict(tvm), formats=formats,
            precision=precision, tensorrt=dict(trt) if trt else None, family=family,
            family_default=bool(doc.get("family_default")), boards=tuple(boards), gpu_api=gpu_api,
            sparse_kernels=kernels, host_default=bool(doc.get("host_default")), source=doc)
    except KeyError as exc:
        raise bad(f"missing key {exc}") from None


def target_dirs() -> list[Path]:
    """The folders the registry reads: this package's, then each of $RSP_TARGETS_PATH."""
    extra = [Path(d) for d in os.environ.get(TARGETS_PATH_ENV, "").split(os.pathsep) if d]
    for d in extra:
        if not d.is_dir():
            raise ArtifactError(f"{TARGETS_PATH_ENV}: {d} is not a folder")
    return [Path(__file__).parent, *extra]


def _target_files() -> list[Path]:
    return [f for d in target_dirs() for f in sorted(d.glob("*.yaml"), key=lambda p: p.name)]


def _load(files: list[Path]) -> dict[str, Target]:
    out: dict[str, Target] = {}
    where: dict[str, Path] = {}
    for path in files:
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"target file {path}: cannot read it ({first})") from None
        target = _parse(doc, str(path))
        if target.name != path.stem:
            raise ArtifactError(f"target file {path} names target {target.name!r}; the file name must match")
        if target.name in out:
            raise ArtifactError(f"target {target.name!r} is defined twice: {where[target.name]} and {path}")
        out[target.name], where[target.name] = target, path
    for family in {t.family for t in out.values() if t.family}:
        if family in out:
            raise ArtifactError(f"target family {family!r} has the name of a target")
        defaults = [t.name for t in out.values() if t.family == family and t.family_default]
        if len(defaults) != 1:
            raise ArtifactError(f"target family {family!r} needs exactly one member with family_default: true, "
                                f"has {len(defaults)}")
    for arch in {t.arch for t in out.values()}:
        defaults = [t.name for t in out.values() if t.arch == arch and t.host_default]
        if len(defaults) > 1:
            raise ArtifactError(f"targets {', '.join(defaults)} are all host_default for {arch}: at most one may be")
    return out


_LOADED: tuple[tuple, dict[str, Target]] | None = None


def targets() -> dict[str, Target]:
    """Every registry target by name; read again when a file in target_dirs() is added, removed or changed."""
    global _LOADED
    files = _target_files()
    key = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if _LOADED is None or _LOADED[0] != key:
        _LOADED = (key, _load(files))
    return _LOADED[1]


def target_names() -> list[str]:
    return sorted(targets())


def aliases() -> dict[str, str]:
    """Family name -> the member it stands for off the family's boards (`family_default: true`)."""
    return {t.family: t.name for t in targets().values() if t.family and t.family_default}


# What a Jetson (any ARM board with a device tree) calls itself, e.g. "NVIDIA Jetson Orin Nano Developer Kit".
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def host_board() -> str | None:
    """This machine's board model name from the device tree, or None (x86, containers without it)."""
    try:
        return DEVICE_TREE_MODEL.read_bytes().rstrip(b"\x00").decode(errors="replace").strip() or None
    except OSError:
        return None


def board_target(board: str | None, family: str | None = None) -> Target | None:
    """The registry target whose `boards` names the board (optionally only within a family)."""
    if not board:
        return None
    for t in targets().values():
        if (family is None or t.family == family) and t.is_board(board):
            return t
    return None


def resolve_target(name: str) -> tuple[Target, str | None]:
    """A target name or family alias -> (the target, why an alias meant it; None for a plain name)."""
    reg = targets()
    if name in reg:
        return reg[name], None
    if name in aliases():
        board = host_board()
        here = board_target(board, family=name)
        if here is not None:
            return here, f"{name} = {here.name}, the board rsp runs on ({board})"
        member = reg[aliases()[name]]
        return member, f"{name} = {member.name}, the {name} family's default (on one of its boards: that board)"
    known = ", ".join(target_names())
    alias_text = ", ".join(f"{a} ({m})" for a, m in sorted(aliases().items()))
    raise UnknownTargetError(f"unknown target {name!r}; available targets: {known}"
                             + (f"; aliases: {alias_text}" if alias_text else "") + " (rsp export --list-targets)")


def get_target(name: str) -> Target:
    """A registry target by name or family alias (see resolve_target)."""
    return resolve_target(name)[0]


def host_target_name() -> str:
    """The registry target of the machine rsp runs on (the default of `rsp pipeline --target`): the one whose
    `boards` names this board, else the `host_default` target of this CPU."""
    machine = host_machine()
    board = host_board()
    here = board_target(board)
    if here is not None and here.native:
        return here.name
    for t in targets().values():
        if t.host_default and t.native:
            return t.name
    raise ArtifactError(f"no default export target for this {machine} host"
                        + (f" ({board})" if board else "") + f"; pass --target (one of {', '.join(target_names())})")


def describe(target: Target) -> str:
    """One line per target for `rsp export --list-targets`."""
    tvm = target.tvm.get("tag") or target.tvm.get("target", {}).get("kind", "?")
    cuda = ",".join(target.cuda_arch) or "-"
    note = f"  [needs a CUDA <= {target.cuda_toolkit_max_major} toolkit: --nvcc]" if target.cuda_toolkit_max_major else ""
    trt = f" trt={target.tensorrt['precision']}" if target.tensorrt else ""
    return (f"{target.name:<18} {target.triple:<18} cuda={cuda:<13} tvm={tvm:<28} "
            f"formats={','.join(target.formats)} precision={target.precision}{trt} "
            f"sparse={','.join(target.sparse_kernels) or '-'}{note}")


def describe_aliases() -> list[str]:
    """One line per family alias for `rsp export --list-targets`."""
    out = []
    for family, default in sorted(aliases().items()):
        members = [t.name for t in targets().values() if t.family == family]
        out.append(f"{family:<18} alias: the {family} board rsp runs on ({', '.join(members)}), "
                   f"elsewhere {default}")
    return out


__all__ = ["FORMATS", "GPU_APIS", "PRECISIONS", "SPARSE_KERNELS", "TARGETS_PATH_ENV", "TRT_PRECISIONS", "Target",
           "UnknownTargetError", "aliases", "board_target", "describe", "describe_aliases", "get_target",
           "host_board", "host_machine", "host_target_name", "resolve_target", "target_dirs", "target_names",
           "targets"]

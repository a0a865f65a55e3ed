"""Deployment targets for `rsp export`: one small declarative YAML per device in this folder.

Each file names the CPU (LLVM triple, mcpu, the cross compiler that links its host code), the CUDA
architectures (none for a CPU-only target), the TVM target (one of TVM's own tags where it has one, plus
overrides where the tag is wrong), the default formats, the precision of the ONNX/TVM numbers and the
TensorRT build options. A board may belong to a family (`family: jetson`): the family's name is an alias
that resolves to the board rsp runs on when it runs on one of the family's boards (`boards:` lists their
/proc/device-tree/model names), else to the member marked `family_default: true`. The registry only reads and checks the files; building a `tvm.target.Target`
from an entry happens in tvm_build.py, so this module imports neither TVM nor torch.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass, field
from importlib import resources
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


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    triple: str  # LLVM/GNU triple of the host CPU, e.g. aarch64-linux-gnu
    mcpu: str
    cross_compiler: str | None  # None: the host code is linked with this machine's compiler
    cuda_arch: tuple[str, ...]  # ("sm_87",); empty for a CPU-only target
    cuda_toolkit_max_major: int | None  # e.g. 12 for sm_72, which CUDA 13 no longer compiles
    tvm: dict  # {"tag": ..., "override": {...}} or {"target": {...}}
    formats: tuple[str, ...]
    precision: str
    tensorrt: dict | None
    family: str | None = None  # e.g. "jetson": the family name is an alias (see aliases())
    family_default: bool = False  # what the alias means off the family's boards
    boards: tuple[str, ...] = ()  # /proc/device-tree/model names of the boards this target is
    source: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    @property
    def has_cuda(self) -> bool:
        return bool(self.cuda_arch)

    def as_dict(self) -> dict[str, Any]:
        """The entry as written in its YAML file (recorded in export manifests)."""
        return copy.deepcopy(self.source)


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
            mcpu=str(cpu.get("mcpu", "")), cross_compiler=cpu.get("cross_compiler"),
            cuda_arch=tuple(str(a) for a in cuda.get("arch", ())),
            cuda_toolkit_max_major=cuda.get("toolkit_max_major"), tvm=dict(tvm), formats=formats,
            precision=precision, tensorrt=dict(trt) if trt else None, family=family,
            family_default=bool(doc.get("family_default")), boards=tuple(boards), source=doc)
    except KeyError as exc:
        raise bad(f"missing key {exc}") from None


def _load_all() -> dict[str, Target]:
    out = {}
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".yaml"):
            continue
        target = _parse(yaml.safe_load(entry.read_text()), entry.name)
        if target.name != entry.name[: -len(".yaml")]:
            raise ArtifactError(f"target file {entry.name} names target {target.name!r}; the file name must match")
        out[target.name] = target
    for family in {t.family for t in out.values() if t.family}:
        if family in out:
            raise ArtifactError(f"target family {family!r} has the name of a target")
        defaults = [t.name for t in out.values() if t.family == family and t.family_default]
        if len(defaults) != 1:
            raise ArtifactError(f"target family {family!r} needs exactly one member with family_default: true, "
                                f"has {len(defaults)}")
    return out


_TARGETS: dict[str, Target] | None = None


def targets() -> dict[str, Target]:
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = _load_all()
    return _TARGETS


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
        if (family is None or t.family == family) and any(b.lower() in board.lower() for b in t.boards):
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
    """The registry target of the machine rsp runs on (the default of `rsp pipeline --target`)."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        return "x86-cpu"
    board = host_board()
    here = board_target(board)
    if here is not None:
        return here.name
    raise ArtifactError(f"no default export target for this {machine} host"
                        + (f" ({board})" if board else "") + f"; pass --target (one of {', '.join(target_names())})")


def describe(target: Target) -> str:
    """One line per target for `rsp export --list-targets`."""
    tvm = target.tvm.get("tag") or target.tvm.get("target", {}).get("kind", "?")
    cuda = ",".join(target.cuda_arch) or "-"
    note = f"  [needs a CUDA <= {target.cuda_toolkit_max_major} toolkit: --nvcc]" if target.cuda_toolkit_max_major else ""
    trt = f" trt={target.tensorrt['precision']}" if target.tensorrt else ""
    return (f"{target.name:<18} {target.triple:<18} cuda={cuda:<13} tvm={tvm:<28} "
            f"formats={','.join(target.formats)} precision={target.precision}{trt}{note}")


def describe_aliases() -> list[str]:
    """One line per family alias for `rsp export --list-targets`."""
    out = []
    for family, default in sorted(aliases().items()):
        members = [t.name for t in targets().values() if t.family == family]
        out.append(f"{family:<18} alias: the {family} board rsp runs on ({', '.join(members)}), "
                   f"elsewhere {default}")
    return out


__all__ = ["FORMATS", "PRECISIONS", "TRT_PRECISIONS", "Target", "UnknownTargetError", "aliases", "board_target",
           "describe", "describe_aliases", "get_target", "host_board", "host_target_name", "resolve_target",
           "target_names", "targets"]

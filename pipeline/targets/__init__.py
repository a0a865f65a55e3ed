"""Deployment targets for `rsp export`: one small declarative YAML per device in this folder.

Each file names the CPU (LLVM triple, mcpu, the cross compiler that links its host code), the CUDA
architectures (none for a CPU-only target), the TVM target (one of TVM's own tags where it has one, plus
overrides where the tag is wrong), the default formats, the precision of the ONNX/TVM numbers and the
TensorRT build options. The registry only reads and checks the files; building a `tvm.target.Target`
from an entry happens in tvm_build.py, so this module imports neither TVM nor torch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from ..artifacts import ArtifactError

FORMATS = ("onnx", "tvm", "tensorrt")
PRECISIONS = ("fp32", "fp16")
TRT_PRECISIONS = ("fp32", "fp16", "int8")


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
            if f not in FORMATS:
                raise bad(f"unknown format {f!r}")
        precision = str(doc.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise bad(f"precision must be one of {', '.join(PRECISIONS)}")
        trt = doc.get("tensorrt")
        if trt is not None and str(trt.get("precision", "fp16")) not in TRT_PRECISIONS:
            raise bad(f"tensorrt.precision must be one of {', '.join(TRT_PRECISIONS)}")
        if "tensorrt" in formats and (trt is None or not cuda):
            raise bad("the tensorrt format needs a cuda arch and a tensorrt section")
        return Target(
            name=name, description=str(doc.get("description", "")), triple=str(cpu["triple"]),
            mcpu=str(cpu.get("mcpu", "")), cross_compiler=cpu.get("cross_compiler"),
            cuda_arch=tuple(str(a) for a in cuda.get("arch", ())),
            cuda_toolkit_max_major=cuda.get("toolkit_max_major"), tvm=dict(tvm), formats=formats,
            precision=precision, tensorrt=dict(trt) if trt else None, source=doc)
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
    return out


_TARGETS: dict[str, Target] | None = None


def targets() -> dict[str, Target]:
    global _TARGETS
    if _TARGETS is None:
        _TARGETS = _load_all()
    return _TARGETS


def target_names() -> list[str]:
    return sorted(targets())


def get_target(name: str) -> Target:
    try:
        return targets()[name]
    except KeyError:
        raise UnknownTargetError(f"unknown target {name!r}; available targets: {', '.join(target_names())} "
                                 "(rsp export --list-targets)") from None


def describe(target: Target) -> str:
    """One line per target for `rsp export --list-targets`."""
    tvm = target.tvm.get("tag") or target.tvm.get("target", {}).get("kind", "?")
    cuda = ",".join(target.cuda_arch) or "-"
    note = f"  [needs a CUDA <= {target.cuda_toolkit_max_major} toolkit: --nvcc]" if target.cuda_toolkit_max_major else ""
    trt = f" trt={target.tensorrt['precision']}" if target.tensorrt else ""
    return (f"{target.name:<18} {target.triple:<18} cuda={cuda:<13} tvm={tvm:<28} "
            f"formats={','.join(target.formats)} precision={target.precision}{trt}{note}")


__all__ = ["FORMATS", "PRECISIONS", "TRT_PRECISIONS", "Target", "UnknownTargetError", "describe", "get_target",
           "target_names", "targets"]

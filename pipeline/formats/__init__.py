"""Bundle formats (what `rsp export` writes) and the backends that run them (what `rsp verify` opens).

One module per format in this package, each registering its classes with `@register`: a new format is one
new module, found here (pkgutil), or a class registered from anywhere before the command runs. A `Format`
owns its bundle file names, the targets it applies to, its export and its runtime; a further `Backend` of a
format is another way to run the same files (the TVM library over RPC on a device).

The registry imports no heavy library: the CLI reads its names and help texts at start-up; each format
imports torch, onnx, TVM or TensorRT inside the methods that need them.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class Backend:
    """A way verify runs a bundle: `runtime` opens it, `dense_twin` opens the dense original on the same runtime."""

    name: str = ""
    format: str = ""  # the format whose files it runs (a Format: its own name)
    verify_help: str = ""  # what runs it, for `rsp verify --help`
    priority: int = 100  # order of the registry: export order, and verify's preference (the first that runs is scored)
    by_default: bool = True  # opened when the bundle holds its format and no --backend is given
    remote: bool = False  # runs on another machine: timed there, without this machine's dense runtimes beside it
    same_dense_runtime: str | None = None  # its dense twin is that dense runtime (timed once, as that one)

    def requested(self, opts) -> bool:
        """Whether another verify option asks for this backend (--rpc): it runs first and is the one scored."""
        return False

    def check_verify_options(self, opts, asked: list[str]) -> str | None:
        """What is wrong with verify's options for this backend (None: nothing); asked: the --backend names."""
        return None

    def runtime(self, bundle: Path, manifest: dict, chw: tuple[int, int, int], opts, log):
        """The rsp.runtimes.Runtime of the bundle's files; RuntimeUnavailable where it cannot run here."""
        from ..runtimes import RuntimeUnavailable

        raise RuntimeUnavailable(f"rsp verify has no runtime for {self.name}")

    def dense_twin(self, dense, chw, tmp: Path, runtime, manifest: dict, opts, log):
        """The dense original (an nn.Module) on this runtime with the same settings, its files under tmp; None: n/a."""
        return None


@dataclass
class ExportJob:
    """What a format's export works from: the model, its reference logits and the stage's settings."""

    model: Any  # the eval-mode nn.Module
    chw: tuple[int, int, int]
    state: dict  # its weights (model.safetensors)
    names: list[str]  # its conv/linear layers
    target: Any  # rsp.targets.Target
    opts: Any  # rsp.export.ExportOptions
    precision: str  # of the ONNX/TVM numbers
    trt_precision: str
    output: Path  # the bundle folder
    source: dict  # the source folder's manifest
    source_sha256: str
    layers: list[dict]  # per-layer sparsity (rsp.sparse.layer_report)
    sparsity: float
    images: Any  # parity images, torch NCHW in [0, 1]
    reference: Any  # PyTorch logits of the images (numpy)
    image_info: dict
    kernels: dict  # the kernel plan (export.kernel_plan); the format that links rsp's kernels records which
    latency: dict = field(default_factory=dict)  # seconds measured by the formats exported before this one
    log: Callable[[str], None] = print


@dataclass
class Exported:
    """What a format's export wrote and found: its files, its manifest entry, its parity check and timings."""

    files: list[str]
    info: dict  # manifest "artifacts"[format]
    parity: dict | None = None  # manifest "parity"[format]: passed True/False, or None with the reason it did not run
    latency: dict = field(default_factory=dict)  # seconds, manifest "latency_here"


class Format(Backend):
    """A bundle format: its files, the targets it applies to, its export, and (as a Backend) its runtime."""

    export_help: str = ""  # what it writes, for `rsp export --help`
    files: tuple[str, ...] = ()  # every file it may write into a bundle; the first is the one verify looks for
    requires: tuple[str, ...] = ()  # formats whose files it builds on: exported with it
    dense_runtime_name: str | None = None  # the dense runtime it offers verify's speed comparison (dense_runtime)

    def unsupported(self, target) -> str | None:
        """Why the format cannot be exported for target (None: it can)."""
        return None

    def check_export_options(self, opts, selected: bool) -> str | None:
        """What is wrong with export's options for this format (None: nothing). Asked of every format, selected
        or not, so that an option only this format uses can say which --format it needs."""
        return None

    def missing_tools(self) -> str | None:
        """What this machine lacks to export the format (None: nothing)."""
        return None

    def input_batch(self, opts):
        """The batch its artifact takes, for the manifest's input.batch ("dynamic", a number); None: no entry."""
        return None

    def layer_notes(self, state: dict, names: list[str]) -> dict[str, dict]:
        """Per-layer facts for the manifest's layers, {layer: {key: value}}, recorded whatever the bundle holds."""
        return {}

    def export(self, job: ExportJob) -> Exported:
        raise NotImplementedError

    def not_exported(self, job: ExportJob) -> None:
        """Called for each format the bundle does not hold: what it records in the job's kernel plan then."""

    def present(self, bundle: Path) -> bool:
        return (Path(bundle) / self.files[0]).is_file()

    def dense_runtime(self, dense, chw, tmp: Path, runtimes: dict, opts):
        """The dense original on the runtime `dense_runtime_name` as a user would run it instead of the artifact
        (verify's speed comparison); runtimes: the bundle's, opened; None where there is none here."""
        return None


_FORMATS: dict[str, Format] = {}
_BACKENDS: dict[str, Backend] = {}


def register(cls):
    """Class decorator: registers a Format (as a format and a backend) or a Backend under its `name`."""
    entry = cls()
    if not entry.name:
        raise ValueError(f"{cls.__name__} has no name")
    if isinstance(entry, Format):
        entry.format = entry.name  # a format's own backend runs its own files
        _FORMATS[entry.name] = entry
    _BACKENDS[entry.name] = entry
    return cls


def _load_all() -> None:
    # each module registers its formats on import: a new format is one new module in this package
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def _ordered(entries: dict) -> list:
    return sorted(entries.values(), key=lambda e: e.priority)  # stable: same priority keeps registration order


def formats() -> dict[str, Format]:
    """The registered formats in registry order."""
    _load_all()
    return {f.name: f for f in _ordered(_FORMATS)}


def backends() -> dict[str, Backend]:
    """The registered backends (every format, and the further backends) in registry order."""
    _load_all()
    return {b.name: b for b in _ordered(_BACKENDS)}


def format_names() -> tuple[str, ...]:
    return tuple(formats())


def backend_names() -> tuple[str, ...]:
    return tuple(backends())


def bundle_files() -> tuple[str, ...]:
    """Every file name a format may write into a bundle."""
    return tuple(f for fmt in formats().values() for f in fmt.files)


def compare_logits(ref, out, tol: float, precision: str) -> dict:
    """Parity of an artifact's logits with PyTorch's (numpy arrays) for the manifest."""
    import numpy as np

    err = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    # fp16 has an 11-bit significand: ~1e-3 relative per operation; judge it relative to the logit scale
    limit = tol if precision == "fp32" else 1e-2 * max(1.0, scale)
    return {"max_abs_err": float(err.max()) if err.size else 0.0, "mean_abs_err": float(err.mean()) if err.size else 0.0,
            "tolerance": limit, "criterion": "max |logit difference| <= tolerance" + ("" if precision == "fp32" else
                                                                                        " (1e-2 x max(1, max |logit|) for fp16)"),
            "argmax_agreement": float((ref.argmax(1) == out.argmax(1)).mean()) if ref.size else 1.0,
            "max_abs_logit": scale, "passed": bool(err.size == 0 or err.max() <= limit)}


__all__ = ["Backend", "ExportJob", "Exported", "Format", "backend_names", "backends", "bundle_files", "compare_logits",
           "format_names", "formats", "register"]

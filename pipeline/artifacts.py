"""Stage folders: the one reader/writer every rsp stage uses.

A stage folder (train, structure, export, verify) holds
  manifest.json      what the folder is: stage, model {name, kwargs}, dataset, metrics, files {name: sha256}
  model.safetensors  plain weights of the registry model named in the manifest (exact zeros where pruned)
  ...                stage-specific files, each listed with its sha256 in manifest["files"]
No pickles anywhere: weights are safetensors, metadata JSON/YAML. Every write goes to a temporary
file in the same folder and is renamed into place, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A folder or file that is not what a stage needs: one line, exit code 2."""


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line durably (metrics.jsonl). A torn last line is dropped by read_jsonl."""
    with open(path, "a") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill: everything from here on is not committed
    return out


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata=metadata))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"missing weights file {p}")
    try:
        return load_file(str(p), device=str(device))
    except Exception as exc:
        raise ArtifactError(f"cannot read {p}: {exc}") from None


def tensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path, manifest: dict, files: list[str]) -> dict:
    """Hash the listed files and write manifest.json last, so a complete manifest means a complete folder."""
    folder = Path(folder)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {name: sha256_file(folder / name) for name in files if (folder / name).is_file()}
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path, stage: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder} is not a folder")
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an rsp run folder (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or "stage" not in manifest or "model" not in manifest:
        raise ArtifactError(f"{path} is not an rsp manifest (needs 'stage' and 'model')")
    if stage is not None and manifest["stage"] != stage:
        raise ArtifactError(f"{folder} is a {manifest['stage']!r} folder, expected {stage!r}")
    return manifest


def check_files(folder: str | Path, manifest: dict) -> list[str]:
    """Problems with the files a manifest lists: missing or changed since it was written."""
    folder = Path(folder)
    problems = []
    for name, digest in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(p) != digest:
            problems.append(f"{name} changed (sha256 differs from the manifest)")
    return problems


def build_model(manifest: dict) -> torch.nn.Module:
    from .models import create_model

    spec = manifest["model"]
    try:
        return create_model(spec["name"], **spec.get("kwargs", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot build model {spec.get('name')!r} from the manifest: {exc}") from None


def load_model(folder: str | Path, device: str | torch.device = "cpu", check: bool = True) -> torch.nn.Module:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if check and MODEL_FILE in manifest.get("files", {}):
        bad = [p for p in check_files(folder, manifest) if p.startswith(MODEL_FILE)]
        if bad:
            raise ArtifactError(f"{folder}: {bad[0]}")
    model = build_model(manifest)
    state = load_tensors(folder / MODEL_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ArtifactError(f"{folder / MODEL_FILE} does not fit model {manifest['model']['name']}: "
                            f"{first[1].strip() if len(first) > 1 else first[0]}") from None
    return model.to(device).eval()

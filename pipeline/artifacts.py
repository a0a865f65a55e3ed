"""Stage folders: the one reader/writer every rsp stage uses.

A stage folder (train, structure, export, verify) holds
  manifest.json      what the folder is: stage, model {name, kwargs}, dataset, metrics, files {name: sha256}
  model.safetensors  plain weights of the registry model named in the manifest (exact zeros where pruned)
  ...                stage-specific files, each listed with its sha256 in manifest["files"]
No pickles anywhere: weights are safetensors, metadata JSON/YAML. Every write goes to a temporary
file in the same folder and is renamed into place, so a crash never leaves a half-written file.
An output folder has one writer: lock_folder() holds it (a flock on .rsp-lock, which names the holder).
A later stage opens its source with read_source() (SourceRun: the manifest typed, rsp train's defaults where
it is silent) and its output with check_new_output() and StageOutput (held from open() to seal()).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
LOCK_FILE = ".rsp-lock"
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


def tensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors file of `tensors`, in memory (so a caller can hash what it is about to write)."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(flat, metadata=metadata)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, tensors_bytes(tensors, metadata))


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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | Path, manifest: dict, files: list[str] | dict[str, str]) -> dict:
    """Hash the listed files and write manifest.json last, so a complete manifest means a complete folder.

    files: the names to hash, or {name: sha256} from a caller that hashed the bytes it wrote."""
    folder = Path(folder)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    if isinstance(files, dict):
        manifest["files"] = dict(files)
    else:
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
    max_bytes = 16 << 20  # a manifest is kilobytes (a VGG-16 export's ~100 KB): never parse an unbounded file
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ArtifactError(f"{path} is larger than {max_bytes} bytes: not an rsp manifest")
        manifest = json.loads(data.decode("utf-8"))
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from None
    except RecursionError:  # [[[[... deeper than the JSON decoder's stack
        raise ArtifactError(f"{path} is not an rsp manifest (nested too deeply)") from None
    if not isinstance(manifest, dict) or "stage" not in manifest or "model" not in manifest:
        raise ArtifactError(f"{path} is not an rsp manifest (needs 'stage' and 'model')")
    # the fields stages index into: a wrong kind here would otherwise surface later as a traceback
    model, files = manifest["model"], manifest.get("files", {})
    not_mapping = [k for k in ("dataset", "input", "attack", "gates", "target", "artifacts", "metrics", "dense_reference",
                               "source") if manifest.get(k) is not None and not isinstance(manifest[k], dict)]
    shape = (manifest["input"].get("shape") or []) if isinstance(manifest.get("input"), dict) else []
    wrong = next((why for bad, why in (
        (not isinstance(manifest["stage"], str), "'stage' must be text"),
        (not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("kwargs", {}), dict)),
         "'model' must be {name: text, kwargs: mapping}"),
        (not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())), "'files' must map names to sha256"),
        (bool(not_mapping), f"'{(not_mapping or [''])[0]}' must be a mapping"),
        (not (isinstance(shape, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)),
         "'input.shape' must be a list of positive integers"),
    ) if bad), None)
    if wrong:
        raise ArtifactError(f"{path} is not an rsp manifest ({wrong})")
    if stage is not None and manifest["stage"] != stage:
        raise ArtifactError(f"{folder} is a {manifest['stage']!r} folder, expected {stage!r}")
    return manifest


def require_complete(folder: str | Path, manifest: dict) -> None:
    """Every stage reads only sealed folders: a run still training (or killed mid-run) holds weights that are
    not yet the selected ones, and files that may be mid-rewrite."""
    status = manifest.get("status", "complete")
    if status == "complete":
        return
    hint = (f"finish it, or continue it with rsp train --resume -o {folder}"
            if manifest.get("stage") == "train" and status == "running" else "finish or resume the run first")
    raise ArtifactError(f"{folder} is not complete (status {status!r}): {hint}")


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


def load_complete_model(folder: str | Path, device: str | torch.device = "cpu") -> tuple[dict, torch.nn.Module]:
    """A sealed stage folder's manifest and its plain registry model (model.safetensors checked against the
    manifest's sha256): the one way a stage that only reads weights (rsp compare) opens a folder."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    require_complete(folder, manifest)
    return manifest, load_model(folder, device=device)


# --- a later stage's source folder ------------------------------------------------------------------


@dataclass(frozen=True)
class SourceAttack:
    """The attack a run was trained against (manifest "attack")."""
    eps: float
    step_size: float
    steps: int
    beta: float  # TRADES/MART/RST robust-loss weight (recorded as null for the objectives without one)


@dataclass(frozen=True)
class SourceRun:
    """What a later stage reads from a source folder's manifest, typed. A field the manifest does not record
    is rsp train's default for it (config.TrainConfig), so no stage restates a default."""
    manifest: dict
    folder: Path | None
    objective: str
    attack: SourceAttack
    dataset: dict  # manifest "dataset" as recorded: what data.load_run_dataset reads
    dataset_name: str

    @classmethod
    def of(cls, manifest: dict, folder: str | Path | None = None) -> SourceRun:
        from .config import TrainConfig

        att = manifest.get("attack") or {}
        attack = SourceAttack(eps=att.get("eps", TrainConfig.eps), step_size=att.get("step_size", TrainConfig.attack_step_size),
                              steps=att.get("steps", TrainConfig.attack_steps), beta=att.get("beta") or TrainConfig.beta)
        dataset = manifest.get("dataset") or {}
        return cls(manifest=manifest, folder=None if folder is None else Path(folder),
                   objective=manifest.get("objective", TrainConfig.objective), attack=attack, dataset=dataset,
                   dataset_name=dataset.get("dataset") or TrainConfig.dataset)


def read_source(folder: str | Path) -> SourceRun:
    """A sealed stage folder whose files are the ones its manifest lists: how a stage opens its source."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    require_complete(folder, manifest)
    bad = check_files(folder, manifest)
    if bad:
        raise ArtifactError(f"{folder}: {bad[0]}")
    return SourceRun.of(manifest, folder)


# --- a stage's output folder -------------------------------------------------------------------------


def check_new_output(output: str | Path, source: str | Path) -> None:
    """Refuse, before any work, an --output that is the source folder or already holds an rsp folder."""
    output = Path(output)
    if output.resolve() == Path(source).resolve():
        raise ArtifactError("--output must differ from the source folder")
    if (output / MANIFEST).is_file():
        raise ArtifactError(f"{output} already holds an rsp folder: choose another --output")


class StageOutput:
    """A stage's new output folder, held by this process (lock_folder(new=True)) from open() until seal()
    writes its manifest last: a folder with a manifest is a complete one."""

    def __init__(self, folder: Path, lock: FolderLock):
        self.folder, self._lock = folder, lock

    @classmethod
    def open(cls, folder: str | Path) -> StageOutput:
        folder = Path(folder)
        return cls(folder, lock_folder(folder, new=True))

    def seal(self, manifest: dict, files: list[str] | dict[str, str]) -> dict:
        try:
            return write_manifest(self.folder, manifest, files)
        finally:
            self._lock.release()


# --- one writer per folder ---------------------------------------------------------------------------


class FolderBusyError(ArtifactError):
    """Another process holds the folder: one line naming it, exit code 2."""


def rsp_bookkeeping(name: str) -> bool:
    """Entries rsp leaves in a folder besides its files: hidden .rsp* names (the lock, the pipeline's stage
    marker) and atomic_write_bytes' temporaries (.NAME.XXXXXXXX.tmp, left only by a kill mid-write)."""
    return name.startswith(".rsp") or (name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3)


class FolderLock:
    """This process is the one writer of a folder until release(), or until it dies: the kernel drops a
    flock with its holder, so the lock file a killed run leaves behind is stale and simply taken over."""

    def __init__(self, folder: Path, fd: int, created: Path | None):
        self.folder = folder
        # released when dropped or at exit too, so a stage that returns or raises never keeps its folder
        self._finalizer = weakref.finalize(self, _unlock, fd, folder / LOCK_FILE, folder, created)

    def release(self) -> None:
        self._finalizer()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_folder(folder: str | Path, new: bool = False) -> FolderLock:
    """Make this process the only writer of `folder` (created if missing), or fail at once naming the holder.

    new: also refuse a folder that already holds a manifest; checked under the lock, so of two runs started
    together only one can pass."""
    import fcntl  # POSIX only, like the rest of rsp's tool chain

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ArtifactError(f"{folder} exists and is not a folder")
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(os.pread(fd, 4096, 0))
            os.close(fd)
            raise FolderBusyError(f"{folder} is in use by another rsp process ({holder}): wait for it to finish, "
                                  "or choose another output folder") from None
        except OSError:  # a file system without flock (some network mounts): trust a live pid on this host
            holder = _holder(os.pread(fd, 4096, 0))
            if holder and holder.get("host") == socket.gethostname() and holder.get("pid") != os.getpid() \
                    and _pid_alive(holder.get("pid")):
                os.close(fd)
                raise FolderBusyError(f"{folder} is in use by another rsp process ({_holder_text(holder)}): wait "
                                      "for it to finish, or choose another output folder") from None
        try:  # the holder may have removed the file between our open and our lock: then lock the new one
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    lock = FolderLock(folder, fd, created)
    if new and (folder / MANIFEST).is_file():
        lock.release()
        raise ArtifactError(f"{folder} already holds an rsp folder: choose another output folder")
    return lock


def _holder(data: bytes) -> dict | None:
    try:
        holder = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _holder_text(data: bytes | dict | None) -> str:
    holder = _holder(data) if isinstance(data, bytes) else data
    if not holder:  # it has locked but not yet written its name
        return "pid unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlock(fd: int, path: Path, folder: Path, created: Path | None) -> None:
    try:
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            os.unlink(path)  # still holding the lock: a process waiting on this file re-checks it (lock_folder)
    except OSError:
        pass
    os.close(fd)
    if created is None:
        return
    # folders the lock created and nothing was written into (a run refused on bad input) leave no trace
    for p in [folder, *folder.parents]:
        try:
            p.rmdir()
        except OSError:
            return
        if p == created:
            return

"""The folder of one rsp train run: what it holds, how it is taken, and how each generation is written.

Every write is one generation (RunFolder.commit): manifest.json first announces the sha256 of the files about
to be written ("files_next"), then each is written atomically, then manifest.json lists them. After a crash
anywhere, each file is the listed one or the announced one, and --resume tells either from a damaged file.
The folder is held by one process (artifacts.lock_folder) and rsp train writes only into a new or empty
folder, or (--resume) into its own run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .artifacts import (MANIFEST, MODEL_FILE, ArtifactError, FolderLock, append_line, atomic_write_bytes,
                        atomic_write_text, load_tensors, lock_folder, read_jsonl, read_manifest, rsp_bookkeeping,
                        sha256_bytes, sha256_file, tensors_bytes, tensors_metadata, write_manifest)
from .config import ConfigError, TrainConfig

STATE_FILE = "train_state.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUPERSEDED_METRICS_FILE = "metrics.superseded.jsonl"
# what rsp train writes (a torn temporary of one of these is left only by a kill mid-write)
RUN_FILES = (MANIFEST, MODEL_FILE, STATE_FILE, CONFIG_FILE, METRICS_FILE, SUPERSEDED_METRICS_FILE)


class RunFolder:
    """Rank 0's handle on the run folder: take() it, commit() generations of files, keep metrics.jsonl."""

    def __init__(self, folder: str | Path, log=print):
        self.path, self.log = Path(folder), log
        self.lock: FolderLock | None = None
        self.status: str | None = None  # of the run found there (resume)
        self.manifest: dict | None = None  # the last one written (or found)
        self.files: dict[str, str] = {}  # name -> sha256 of each file as it is now: what the next manifest lists

    def release(self) -> None:
        """Let go of the folder; its files stay as the last commit left them."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def take(self, resume: bool, cfg: TrainConfig) -> str:
        """Hold the folder and decide from what it holds: "new" (start a run) or "resume". Refuses, before
        anything is written, a folder that holds anything else, or a run trained with another config."""
        self.lock = lock_folder(self.path)
        for p in self.path.glob(".*.tmp"):  # torn temporaries of a killed run: ours, and no one else writes here
            if p.name.startswith(tuple(f".{name}." for name in RUN_FILES)):
                p.unlink(missing_ok=True)
        state_path = self.path / STATE_FILE
        has_manifest = (self.path / MANIFEST).is_file()
        if not resume:
            if has_manifest or state_path.is_file():
                raise ConfigError(f"{self.path} already holds a run: pass --resume to continue it, or choose another --output")
            foreign = sorted(p.name for p in self.path.iterdir() if not rsp_bookkeeping(p.name))
            if foreign:
                shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
                raise ConfigError(f"{self.path} is not empty and holds no rsp run ({shown}): rsp train writes only "
                                  "into a new or empty folder; choose another --output")
            return "new"
        if not has_manifest:
            if state_path.is_file():
                raise ArtifactError(f"cannot resume {self.path}: {STATE_FILE} has no {MANIFEST} to check it against")
            raise ArtifactError(f"{self.path} holds no run to resume (no {MANIFEST}): start one without --resume")
        manifest = read_manifest(self.path, stage="train")
        listed, announced = manifest.get("files", {}), manifest.get("files_next")
        announced = announced if isinstance(announced, dict) else {}
        if not state_path.is_file():
            if STATE_FILE in listed:
                raise ArtifactError(f"cannot resume {self.path}: {STATE_FILE} is missing (its {MANIFEST} lists it); "
                                    "nothing was changed")
            # killed before its first checkpoint landed: nothing was committed, so starting over loses nothing
            self.log(f"{self.path} has no checkpoint yet: starting its run from the beginning")
            return "new"
        self._check_same_config(cfg)
        digest = sha256_file(state_path)
        if digest not in (listed.get(STATE_FILE), announced.get(STATE_FILE)):
            raise ArtifactError(f"cannot resume {self.path}: {STATE_FILE} does not match its {MANIFEST} (sha256 "
                                "differs): the checkpoint is damaged; nothing was changed")
        self.status = manifest.get("status")
        self.manifest = {k: v for k, v in manifest.items() if k != "files_next"}
        # the files as they are now (each the listed or the announced generation): what the next announcement lists
        self.files = {name: sha256_file(self.path / name) for name in {**listed, **announced}
                      if name != STATE_FILE and (self.path / name).is_file()}
        self.files[STATE_FILE] = digest
        return "resume"

    def _check_same_config(self, cfg: TrainConfig) -> None:
        import yaml

        from .config import read_text_file, safe_yaml

        try:  # bounded like every file rsp reads: a config.yaml cannot expand or hang the resume
            saved = safe_yaml(read_text_file(self.path / CONFIG_FILE, "config file"))
        except (OSError, yaml.YAMLError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise ConfigError(f"{self.path / CONFIG_FILE} is missing or unreadable: cannot resume")
        theirs = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}).comparable()
        ours = cfg.comparable()
        diff = sorted(k for k in ours if ours[k] != theirs.get(k))
        if diff:
            k = diff[0]
            raise ConfigError(f"cannot resume {self.path}: it was trained with {k}={theirs.get(k)!r}, "
                              f"not {ours[k]!r} ({len(diff)} option(s) differ)")

    def commit(self, blobs: dict[str, bytes], manifest: Callable[[], dict]) -> dict:
        """Write one generation of files: announce their sha256 in manifest.json ("files_next", status
        running), write each atomically, then write manifest(), listing them."""
        announced = {name: sha256_bytes(data) for name, data in blobs.items()}
        base = self.manifest or manifest()
        write_manifest(self.path, {**base, "status": "running", "files_next": announced}, self.files)
        for name, data in blobs.items():
            atomic_write_bytes(self.path / name, data)
        self.files.update(announced)
        self.manifest = write_manifest(self.path, manifest(), self.files)
        return self.manifest

    # --- the checkpoint ------------------------------------------------------------------------------

    def save_checkpoint(self, state: dict[str, torch.Tensor], meta: dict[str, str], selected: dict | None,
                        record: dict | None, manifest: Callable[[], dict]) -> None:
        """Commit the training state (and the selected plain weights), then append the epoch's metrics line:
        a line in metrics.jsonl describes a checkpoint on disk."""
        blobs = {STATE_FILE: tensors_bytes(state, metadata=meta)}
        if selected is not None:
            blobs[MODEL_FILE] = tensors_bytes(selected)
        self.commit(blobs, manifest)
        if record is not None:
            append_line(self.path / METRICS_FILE, json.dumps(record))

    def checkpoint_meta(self) -> dict[str, str]:
        path = self.path / STATE_FILE
        try:
            return tensors_metadata(path)
        except Exception as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from None

    def checkpoint_tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        return load_tensors(self.path / STATE_FILE, device=device)

    def has_checkpoint(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def repair_metrics(self, epoch: int, record: dict | None) -> None:
        """metrics.jsonl keeps one line per finished epoch whose checkpoint landed, as an uninterrupted run
        writes it. Lines the resumed run does not continue from (a --max-steps stop's evaluation, epochs past
        the checkpoint at `epoch`) move to metrics.superseded.jsonl, never deleted; a kill between checkpoint
        and line is repaired from the checkpoint's `record`."""
        path = self.path / METRICS_FILE
        lines = read_jsonl(path)
        past = [r for r in lines if r.get("partial") or r.get("epoch", 0) > epoch]
        kept = [r for r in lines if not (r.get("partial") or r.get("epoch", 0) > epoch)]
        if record and not record.get("partial") and len(kept) < epoch:
            kept.append(record)
        if past:  # first the copy, then the rewrite: a kill in between duplicates a line, never loses one
            moved = self.path / SUPERSEDED_METRICS_FILE
            have = {json.dumps(r, sort_keys=True) for r in read_jsonl(moved)}
            for r in past:
                if json.dumps(r, sort_keys=True) not in have:
                    append_line(moved, json.dumps(r))
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if not path.is_file() or path.read_text() != text:  # also drops a line torn by a kill
            atomic_write_text(path, text)

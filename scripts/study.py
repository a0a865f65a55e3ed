"""What the study scripts share (methods_table.py, paper_table.py, rewiring_table.py): rows of rsp commands run
to completion, resumably and a few at a time, and read back from the folders they wrote.

A row is a list of stages: train, then export and verify where it has them, then any further stages (e.g. rsp
structure), each a (folder, command) pair. A stage whose folder is finished is skipped, so running a script again
resumes an interrupted study; a half-done `rsp train` continues with --resume. Rows are independent and run
`jobs` at a time; the stages of one row always run in order.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

RSP = [sys.executable, "-m", "rsp.cli"]


@dataclass
class Row:
    run: Path  # the row's folder: train/, export/, verify/ and log.txt below it
    train: list[str]
    export: list[str] | None = None  # None: the row has no such stage
    verify: list[str] | None = None
    labels: dict = field(default_factory=dict)  # what the table groups by (method, objective, seed, ...)
    # further stages after train/export/verify: (folder below run, rsp command); done when the folder's
    # manifest.json says complete
    stages: list[tuple[str, list[str]]] = field(default_factory=list)

    def commands(self) -> list[str]:
        cmds = [c for c in (self.train, self.export, self.verify) if c is not None] + [c for _, c in self.stages]
        return ["rsp " + " ".join(shlex.quote(c) for c in cmd) for cmd in cmds]


def done(folder: Path, name: str = "manifest.json") -> bool:
    f = folder / name
    if not f.is_file():
        return False
    try:
        data = json.loads(f.read_text())
    except ValueError:
        return False
    return data.get("status", "complete") == "complete"


def run_command(cmd: list[str], dry: bool, log: Path | None) -> int:
    line = " ".join(shlex.quote(c) for c in cmd)
    sys.stderr.write(f"$ {line}\n")  # one write: threads do not interleave within a line
    sys.stderr.flush()
    if dry:
        return 0
    with open(log, "a") if log else subprocess.DEVNULL as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode


def advance(row: Row, dry: bool) -> int:
    """Run the stages of one row that are not finished yet (train resumes a half-done run)."""
    log = None if dry else row.run / "log.txt"
    if log:
        row.run.mkdir(parents=True, exist_ok=True)
    rc = 0
    if row.verify is not None and not row.stages and (row.run / "verify" / "verify.json").is_file():
        return 0  # finished: verify.json and the train manifest are all a table reads, so archived records resume
    if not done(row.run / "train"):
        # a started run (its manifest is there) resumes; rsp train starts over one killed before its first
        # checkpoint, so a row interrupted that early does not stop at "already holds a run"
        resume = ["--resume"] if (row.run / "train" / "manifest.json").is_file() else []
        rc = run_command(RSP + row.train + resume, dry, log)
    if rc == 0 and row.export is not None and not done(row.run / "export"):
        rc = run_command(RSP + row.export, dry, log)
    if rc == 0 and row.verify is not None and not (row.run / "verify" / "verify.json").is_file():
        rc = run_command(RSP + row.verify, dry, log)
        rc = 0 if rc in (0, 1) else rc  # 1: a gate or sanity check failed; the figures still stand
    for folder, cmd in row.stages:
        if rc == 0 and not done(row.run / folder):
            rc = run_command(RSP + cmd, dry, log)
    return rc


def run_rows(rows: list[Row], jobs: int, dry: bool, report_only: bool) -> list[int]:
    """Exit code per row; `report_only` runs nothing (every code 0)."""
    if report_only:
        return [0] * len(rows)
    # rows are independent: N at a time (one GPU holds many small runs; a 2-core CPU gains little)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda r: advance(r, dry), rows))


def results(row: Row) -> dict | None:
    """The figures a finished row recorded (train manifest + verify.json), None if it has not finished."""
    vfile, mfile = row.run / "verify" / "verify.json", row.run / "train" / "manifest.json"
    if not (vfile.is_file() and mfile.is_file()):
        return None
    v, m = json.loads(vfile.read_text()), json.loads(mfile.read_text())
    metrics = m.get("metrics", {})
    return {"sparsity": m["sparsity"], "clean_acc": v["clean_acc"], "robust_acc": v["robust_acc"],
            "unreliable": v.get("unreliable"), "n_examples": v.get("n_examples"),
            "sanity_run": bool(v.get("sanity", {}).get("checks")), "preset": v.get("preset"),
            "latent_vulnerability": (v.get("latent_vulnerability") or {}).get("vulnerability"),  # ANP-VS measure
            "train_time_s": m["training"]["time_s"], "val_robust_acc": metrics.get("val_robust_acc"),
            "val_clean_acc": metrics.get("val_clean_acc"), "selected_epoch": metrics.get("epoch"),
            "selected_collapsed": metrics.get("selected_collapsed"),
            "unit_sparsity": m.get("method_config", {}).get("unit_sparsity"),  # ANP-VS: units pruned / gated
            "phases": ", ".join(f"{p['name']} {p['steps']}" for p in m.get("method_config", {}).get("phases", []))}


def model_config(row_dir: Path, model_kwargs: str | None, write: bool) -> list[str]:
    """`--config FILE` flags carrying the model kwargs (a YAML mapping), the file written when `write`."""
    if not model_kwargs:
        return []
    cfg = row_dir / "model.yaml"
    if write:
        row_dir.mkdir(parents=True, exist_ok=True)
        cfg.write_text(f"model_kwargs: {model_kwargs}\n")
    return ["--config", str(cfg)]


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def footer(records: list[dict], name, label) -> list[str]:
    """The lines every study table ends with: the rows still missing (first six, with why) and each row's
    commands. `name(record)` is a row's short id (its folder's name), `label(record)` how the commands list
    calls it."""
    missing = [r for r in records if "error" in r]
    out = []
    if missing:
        out += ["", f"{len(missing)} of {len(records)} runs missing: "
                + "; ".join(f"{name(r)}: {r['error']}" for r in missing[:6]) + (" ..." if len(missing) > 6 else "")]
    out += ["", "Commands, per run:", ""]
    out += [f"- {label(r)}: `" + "` && `".join(r["commands"]) + "`" for r in records]
    return out

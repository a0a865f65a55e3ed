"""rsp pipeline: train -> structure -> export -> verify into DIR/{train,structure,export,verify}.

Each stage's folder is complete when its manifest says so (manifest.json is written last, atomically), so
an interrupted pipeline resumes where it stopped: finished stages are kept, an interrupted training run
continues from its last checkpoint (bit for bit on CPU), and a stage that died half-way is rebuilt.

What the pipeline removes, and only that: in a stage folder that it created itself (it holds the pipeline's
marker, written before the stage starts) and that has no manifest, the files that stage writes (by name)
and rsp's temporary files. A stage folder it did not create, or one holding anything else, is refused
(exit 2) before anything is removed or trained. Nothing a finished stage wrote is touched again.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from .artifacts import MANIFEST, MODEL_FILE, ArtifactError
from .formats import bundle_files

STAGES = ("train", "structure", "export", "verify")

# Written by the pipeline into a stage folder it creates, before the stage runs, and left there: the proof that
# the folder and the stage's files in it are rsp's, should its manifest ever be missing (a kill, a deletion).
MARKER = ".rsp-pipeline-stage"

# The names each stage writes into its folder (glob patterns), besides manifest.json: what a half-written
# stage folder may hold. The tensorboard/ folder is written by train after its first checkpoint.
STAGE_FILES = {
    "train": (MODEL_FILE, "train_state.safetensors", "config.yaml", "metrics.jsonl", "metrics.superseded.jsonl",
              "tensorboard"),
    "structure": (MODEL_FILE, "analysis.json", "config.yaml", "report.md", "weights_*.png"),
    "export": (MODEL_FILE, *bundle_files()),
}
# artifacts.atomic_write_bytes' temporary files (.NAME.XXXXXXXX.tmp), left only by a kill mid-write
TEMP_FILE = ".*.tmp"
# rsp's own dot-files in a folder it writes: the marker above, the one-writer lock (.rsp-lock); as
# artifacts.rsp_bookkeeping counts them
RSP_DOTFILES = ".rsp*"


def host_target() -> str:
    """The registry target of the machine we run on."""
    from .targets import host_target_name

    return host_target_name()


def check_options(structure_opts, export_opts, verify_opts) -> None:
    """Every stage's options, before training starts: bad input fails in seconds, not after the training.

    The same checks the stages make on their own options (each stage checks again when it runs)."""
    from . import structure as structure_stage
    from .export import MIN_OPSET, ExportError, _formats, check_tools
    from .targets import get_target
    from .verify import GATES, VerifyError, resolve_evaluation

    s = structure_opts
    if s.k < 0:
        raise structure_stage.StructureError(f"--k must be >= 0, got {s.k}")
    if s.finetune < 0 or s.finetune_lr <= 0:
        raise structure_stage.StructureError("--finetune must be >= 0 epochs and --finetune-lr > 0")
    structure_stage.parse_nm(s.nm)
    for b in ([s.prune_block] if s.prune_block else []) + list(s.blocks):
        structure_stage.parse_block(b)

    e = export_opts
    target = get_target(e.target)
    formats = _formats(e, target)
    if e.opset < MIN_OPSET:
        raise ExportError(f"--opset must be >= {MIN_OPSET}, got {e.opset}")
    if e.batch < 1 or e.tune_trials < 0:
        raise ExportError("--batch must be >= 1 and --tune-trials >= 0")
    check_tools(formats, e)

    v = verify_opts
    unknown_gates = [g for g in v.gates if g not in GATES]
    if unknown_gates:
        raise VerifyError(f"unknown gate {unknown_gates[0]!r}")
    resolve_evaluation(v)  # preset, attacks, budgets


def _complete(folder: Path) -> bool:
    p = folder / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("status") == "complete"
    except json.JSONDecodeError:
        return False


def _foreign_entries(folder: Path, stage: str) -> list[str]:
    """What in a stage folder without a manifest rsp cannot prove it wrote (sorted names)."""
    if not (folder / MARKER).is_file():  # not created by the pipeline: every entry is the user's
        return sorted(p.name for p in folder.iterdir())
    ours = STAGE_FILES.get(stage, ()) + (RSP_DOTFILES, TEMP_FILE)
    return sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatchcase(p.name, pat) for pat in ours))


def check_folders(out: Path) -> None:
    """Refuse, before anything is removed or trained, stage folders that are not the pipeline's to rebuild."""
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--output {out} exists and is not a folder")
    for stage in STAGES[:3]:
        folder = out / stage
        if folder.exists() and not folder.is_dir():
            raise ArtifactError(f"{folder} exists and is not a folder: move it away or choose another --output")
        if not folder.is_dir() or (folder / MANIFEST).is_file():
            continue
        _refuse_foreign(folder, stage)


def _refuse_foreign(folder: Path, stage: str) -> None:
    foreign = _foreign_entries(folder, stage)
    if not foreign:
        return
    shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
    if (folder / MARKER).is_file():
        raise ArtifactError(f"{folder} (a {stage} stage that did not finish) also holds files rsp did not write "
                            f"({shown}): move them away or choose another --output; nothing was removed")
    raise ArtifactError(f"{folder} is not an rsp stage folder (no {MANIFEST}) and holds {shown}: move it away "
                        "or choose another --output; nothing was removed")


def _fresh(folder: Path, stage: str) -> None:
    """Make `folder` an empty stage folder carrying the pipeline's marker, removing only what rsp wrote there
    (check_folders has refused anything else)."""
    if folder.is_dir():
        _refuse_foreign(folder, stage)  # again: the folder may have changed since check_folders
        for entry in folder.iterdir():
            if entry.name != MARKER:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"stage": stage, "written_by": "rsp pipeline", "pid": os.getpid()}) + "\n")


def run(output: str | Path, train_cfg, structure_opts, export_opts, verify_opts, log=print) -> dict:
    from . import export as export_stage, structure as structure_stage, train as train_stage, verify as verify_stage

    out = Path(output)
    check_options(structure_opts, export_opts, verify_opts)
    check_folders(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {s: out / s for s in STAGES}
    done = {}

    if _complete(dirs["train"]):
        log(f"[1/4] train: {dirs['train']} is complete, kept")
    else:
        resume = (dirs["train"] / MANIFEST).is_file()
        if not resume:
            _fresh(dirs["train"], "train")
        log(f"[1/4] train -> {dirs['train']}" + (" (resuming)" if resume else ""))
        train_stage.run(train_cfg, dirs["train"], resume=resume, log=log)
    done["train"] = json.loads((dirs["train"] / MANIFEST).read_text())

    for i, (stage, module, opts) in enumerate((("structure", structure_stage, structure_opts),
                                              ("export", export_stage, export_opts)), start=2):
        if _complete(dirs[stage]):
            log(f"[{i}/4] {stage}: {dirs[stage]} is complete, kept")
        else:
            if (dirs[stage] / MANIFEST).is_file():  # e.g. an export whose parity failed: do not hide it
                raise ArtifactError(f"{dirs[stage]} holds an unfinished {stage} (status "
                                    f"{json.loads((dirs[stage] / MANIFEST).read_text()).get('status')}); "
                                    "inspect it, remove it, and run again")
            _fresh(dirs[stage], stage)
            log(f"[{i}/4] {stage} -> {dirs[stage]}")
            module.run(dirs["train" if stage == "structure" else "structure"], dirs[stage], opts, log=log)
        done[stage] = json.loads((dirs[stage] / MANIFEST).read_text())

    log(f"[4/4] verify -> {dirs['verify']}")
    verify_opts.output = str(dirs["verify"])
    result = verify_stage.run(dirs["export"], verify_opts, log=log)
    return {"stages": {k: str(v) for k, v in dirs.items()}, "verify": result}

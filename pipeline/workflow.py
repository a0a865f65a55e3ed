"""rsp pipeline: train -> structure -> export -> verify into DIR/{train,structure,export,verify}.

Each stage's folder is complete when its manifest says so (manifest.json is written last, atomically), so
an interrupted pipeline resumes where it stopped: finished stages are kept, an interrupted training run
continues from its last checkpoint (bit for bit on CPU), and a stage that died half-way (a folder with no
manifest) is rebuilt. Nothing a finished stage wrote is touched again.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

from .artifacts import ArtifactError, MANIFEST

STAGES = ("train", "structure", "export", "verify")


def host_target() -> str:
    """The registry target of the machine we run on."""
    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        return "x86-cpu"
    if machine == "aarch64" and Path("/etc/nv_tegra_release").is_file():
        return "jetson-agx-orin"
    raise ArtifactError(f"no default export target for a {machine} host; pass --target")


def _complete(folder: Path) -> bool:
    p = folder / MANIFEST
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("status") == "complete"
    except json.JSONDecodeError:
        return False


def _fresh(folder: Path) -> None:
    """A stage folder left half-written (no manifest) is rebuilt; one with a manifest is never deleted."""
    if folder.exists() and not (folder / MANIFEST).exists():
        shutil.rmtree(folder)


def run(output: str | Path, train_cfg, structure_opts, export_opts, verify_opts, log=print) -> dict:
    from . import export as export_stage, structure as structure_stage, train as train_stage, verify as verify_stage

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    dirs = {s: out / s for s in STAGES}
    done = {}

    if _complete(dirs["train"]):
        log(f"[1/4] train: {dirs['train']} is complete, kept")
    else:
        resume = (dirs["train"] / MANIFEST).is_file()
        if not resume:
            _fresh(dirs["train"])
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
            _fresh(dirs[stage])
            log(f"[{i}/4] {stage} -> {dirs[stage]}")
            module.run(dirs["train" if stage == "structure" else "structure"], dirs[stage], opts, log=log)
        done[stage] = json.loads((dirs[stage] / MANIFEST).read_text())

    log(f"[4/4] verify -> {dirs['verify']}")
    verify_opts.output = str(dirs["verify"])
    result = verify_stage.run(dirs["export"], verify_opts, log=log)
    return {"stages": {k: str(v) for k, v in dirs.items()}, "verify": result}

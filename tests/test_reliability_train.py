"""rsp train's folder under crashes, concurrency and bad input: nothing lost, nothing silent (issue 15).

Tiny runs only (digits, small-cnn with 8/16 channels, a few steps): the whole file takes seconds.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rsp
import rsp.engine
from rsp.artifacts import (LOCK_FILE, ArtifactError, FolderBusyError, check_files, load_tensors, lock_folder,
                           read_manifest)
from rsp.config import ConfigError, resolve
from rsp.train import STATE_FILE, Trainer
from helpers import rsp_cli, rsp_cli_here

TINY = {"epochs": 1, "max_steps": 2, "attack_steps": 1, "eval_attack_steps": 1, "test_attack_steps": 1,
        "batch_size": 64, "device": "cpu", "model_kwargs": {"channels": [8, 16]}}
TINY_FLAGS = ["--epochs", "1", "--max-steps", "1", "--attack-steps", "1", "--eval-attack-steps", "1",
              "--test-attack-steps", "1", "--batch-size", "64", "--model-kwargs", "{channels: [8, 16]}",
              "--threads", "1"]


def _train(out, resume=False, **over):
    cfg = resolve(None, {**TINY, **over})
    return Trainer(cfg, out, resume=resume, progress=False, log=lambda *_: None).fit()


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# --- item 2: a batch larger than the training set ------------------------------------------------------


def test_batch_larger_than_the_training_set_is_refused_at_once(tmp_path):
    out = tmp_path / "x"
    try:  # before the fix: zero batches an epoch, the epoch counter ran on forever
        r = rsp_cli("train", "--model", "small-cnn", "--batch-size", "2000", "--epochs", "1", "--output", out,
                    timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("rsp train --batch-size 2000 hangs")
    err = _one_line_error(r)
    assert "--batch-size 2000" in err and "1296" in err
    assert not out.exists()  # refused before anything was written: no folder left behind


def test_rst_batch_larger_than_the_extra_data_is_refused(tmp_path):
    from safetensors.torch import save_file

    extra = tmp_path / "extra.safetensors"
    save_file({"images": torch.zeros(10, 8, 8, 1, dtype=torch.uint8), "labels": torch.zeros(10, dtype=torch.int64)},
              str(extra))
    with pytest.raises(ConfigError, match="extra images a batch"):
        _train(tmp_path / "x", objective="rst", extra_data=str(extra), batch_size=64)
    assert not (tmp_path / "x").exists()


# --- item 3: a crash between checkpoint writes ---------------------------------------------------------


def _crash_on_nth_replace(monkeypatch, name: str, n: int):
    """os.replace (the last step of every atomic write) raises on the n-th write of `name`: a crash there."""
    real, seen = os.replace, {"n": 0}

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            seen["n"] += 1
            if seen["n"] == n:
                raise OSError(f"injected crash before {name} write {n} landed")
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    return lambda: monkeypatch.setattr(os, "replace", real)


def test_crash_between_state_and_model_then_resume_seals_the_selected_weights(tmp_path, monkeypatch):
    out = tmp_path / "run"
    # every epoch is selected, so the crashed checkpoint's model differs from the one on disk
    monkeypatch.setattr(rsp.engine, "beats_best", lambda *a: True)
    restore = _crash_on_nth_replace(monkeypatch, "model.safetensors", 2)  # epoch 2: state written, model not
    over = {"epochs": 2, "max_steps": None, "batch_size": 512}  # 2 steps an epoch
    with pytest.raises(OSError, match="injected crash"):
        _train(out, **over)
    restore()
    assert not (out / LOCK_FILE).exists()  # the crashed run let go of its folder
    _train(out, resume=True, **over)
    m = read_manifest(out, stage="train")
    assert m["status"] == "complete" and m["metrics"]["epoch"] == 2
    assert check_files(out, m) == []
    sealed, state = load_tensors(out / "model.safetensors"), load_tensors(out / STATE_FILE)
    best = {k[5:]: v for k, v in state.items() if k.startswith("best.")}
    assert set(sealed) == set(best) and all(torch.equal(sealed[k], best[k]) for k in best)
    # the manifest's figures describe the sealed file
    from rsp.data import load_dataset, to_float

    s = load_dataset("digits")
    with torch.no_grad():
        acc = (rsp.load_model(out)(to_float(s.test_x)).argmax(1) == s.test_y).float().mean().item()
    assert acc == pytest.approx(m["metrics"]["clean_acc"])
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def test_crash_during_the_first_checkpoint_then_resume_starts_over(tmp_path, monkeypatch):
    out = tmp_path / "run"
    restore = _crash_on_nth_replace(monkeypatch, STATE_FILE, 1)
    with pytest.raises(OSError, match="injected crash"):
        _train(out)
    restore()
    assert read_manifest(out)["status"] == "running" and STATE_FILE not in read_manifest(out)["files"]
    assert _train(out, resume=True)["status"] == "complete"


# --- item 4: one writer per folder ---------------------------------------------------------------------

HOLDER = ("import sys; from rsp.artifacts import lock_folder; held = lock_folder(sys.argv[1]); "
          "print('locked', flush=True); sys.stdin.read()")


def test_second_writer_fails_at_once_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "x"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        err = _one_line_error(rsp_cli("train", *TINY_FLAGS, "--output", out, timeout=60))
        assert "in use by another rsp process" in err and f"pid {holder.pid}" in err
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: the lock file stays, stale
        holder.wait()
    assert (out / LOCK_FILE).exists()
    assert _train(out)["status"] == "complete"
    assert not (out / LOCK_FILE).exists()


def test_lock_in_one_process(tmp_path):
    folder = tmp_path / "a" / "b"
    lock = lock_folder(folder)
    with pytest.raises(FolderBusyError, match=f"pid {os.getpid()}"):
        lock_folder(folder)
    lock.release()
    assert not (tmp_path / "a").exists()  # created for the lock, nothing written: removed again
    with lock_folder(folder):
        (folder / "manifest.json").write_text("{}")
    with pytest.raises(ArtifactError, match="already holds an rsp folder"):
        lock_folder(folder, new=True)
    assert [p.name for p in folder.iterdir()] == ["manifest.json"]


# --- item 5: --resume checks train_state against the manifest ------------------------------------------


def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")  # after safetensors' header: tensor data
    data[(start + len(data)) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_resume_refuses_a_damaged_or_missing_train_state(tmp_path):
    out = tmp_path / "run"
    _train(out)
    _flip_a_tensor_byte(out / STATE_FILE)
    before = _snapshot(out)
    err = _one_line_error(rsp_cli_here("train", "--output", out, "--resume", "--max-steps", "4"))
    assert "train_state.safetensors does not match" in err and "damaged" in err
    assert _snapshot(out) == before
    (out / STATE_FILE).unlink()
    before = _snapshot(out)
    with pytest.raises(ArtifactError, match="train_state.safetensors is missing"):
        _train(out, resume=True, max_steps=4)
    assert _snapshot(out) == before


def test_resume_without_a_run_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="holds no run to resume"):
        _train(tmp_path / "nothing", resume=True)
    assert not (tmp_path / "nothing").exists()


# --- item 6: every stage refuses an unfinished run -----------------------------------------------------


def test_every_stage_refuses_an_unfinished_train_run(tmp_path, monkeypatch):
    from rsp import export, structure, verify

    run = tmp_path / "run"

    def killed(self):
        raise KeyboardInterrupt  # as if killed after the last checkpoint, before the seal

    monkeypatch.setattr(Trainer, "finish", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(run)
    assert read_manifest(run)["status"] == "running" and (run / "model.safetensors").is_file()
    errors = []
    for call in (lambda: structure.run(run, tmp_path / "s", structure.StructureOptions(n_examples=0)),
                 lambda: export.run(run, tmp_path / "e", export.ExportOptions(target="x86-cpu", formats=["onnx"])),
                 lambda: verify.run(run, verify.VerifyOptions(output=str(tmp_path / "v"), backends=["torch"]))):
        with pytest.raises(ArtifactError) as exc:
            call()
        errors.append(str(exc.value))
    assert errors[0] == errors[1] == errors[2] and "is not complete (status 'running')" in errors[0]
    assert not any((tmp_path / d).exists() for d in "sev")


# --- item 7: no user file is overwritten, no metrics line lost ---------------------------------------


def test_train_refuses_a_folder_of_user_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "metrics.jsonl").write_text('{"my": "numbers"}\n')
    (mine / "notes.txt").write_text("keep me\n")
    before = _snapshot(mine)
    err = _one_line_error(rsp_cli_here("train", *TINY_FLAGS, "--output", mine))
    assert "is not empty and holds no rsp run (config.yaml, metrics.jsonl, notes.txt)" in err
    assert _snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == sorted(before)
    with pytest.raises(ArtifactError, match="holds no run to resume"):  # nor with --resume
        _train(mine, resume=True)
    assert _snapshot(mine) == before


def test_resume_of_a_finished_run_changes_nothing_and_continuing_keeps_every_line(tmp_path):
    out = tmp_path / "run"
    _train(out)  # a --max-steps run: its one metrics line is a partial epoch's
    before = _snapshot(out)
    assert json.loads(before["metrics.jsonl"])["partial"]
    manifest = _train(out, resume=True)
    assert _snapshot(out) == before and manifest["status"] == "complete"
    # continuing past the stop: the stop's line leaves metrics.jsonl (one line per finished epoch), kept aside
    _train(out, resume=True, max_steps=4)
    assert (out / "metrics.superseded.jsonl").read_bytes() == before["metrics.jsonl"]
    assert read_manifest(out)["status"] == "complete"


def test_own_torn_temporaries_do_not_make_a_folder_foreign(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".manifest.json.abc123.tmp").write_text("{torn")  # a kill during the very first write
    assert _train(out)["status"] == "complete"
    assert not (out / ".manifest.json.abc123.tmp").exists()

"""`rsp train` end to end on tiny runs: the run-folder contract, resume, kill -9, bad input, DDP."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import rsp
from rsp.artifacts import load_tensors, read_manifest
from rsp.config import resolve
from rsp.train import Trainer
from helpers import rsp_cli, rsp_cli_here

TINY = ["--epochs", "3", "--attack-steps", "2", "--batch-size", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    r = rsp_cli("train", *TINY, "--sparsity", "0.9", "--output", out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_run_folder_contract(tiny_run):
    out, r = tiny_run
    for name in ("model.safetensors", "train_state.safetensors", "manifest.json", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    m = read_manifest(out, stage="train")
    for key in ("rsp_version", "model", "dataset", "normalization", "objective", "method", "target_sparsity",
                "sparsity", "layers", "metrics", "files"):
        assert key in m, key
    assert m["status"] == "complete" and m["method"] == "bcs" and m["objective"] == "pgd-at"
    assert m["metrics"]["split"] == "test" and m["metrics"]["selected_on"] == "val"
    assert 0 <= m["metrics"]["clean_acc"] <= 1 and 0 <= m["metrics"]["robust_acc"] <= 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2, 3]
    # independent check of the budget from the file itself
    state = load_tensors(out / "model.safetensors")
    names = [layer["name"] for layer in m["layers"]]
    nnz = sum(int(torch.count_nonzero(state[n])) for n in names)
    total = sum(state[n].numel() for n in names)
    assert nnz == round(0.1 * total)
    assert m["sparsity"] == pytest.approx(1 - nnz / total)
    assert "robust" in r.stdout and "test clean" in r.stdout


def test_load_model_rebuilds_without_pickles_and_matches_reported_accuracy(tiny_run):
    out, _ = tiny_run
    model = rsp.load_model(out)
    assert not model.training
    from rsp.data import load_dataset, to_float

    s = load_dataset("digits")
    with torch.no_grad():
        correct = int((model(to_float(s.test_x)).argmax(1) == s.test_y).sum())
    assert correct / len(s.test_y) == read_manifest(out)["metrics"]["clean_acc"]


def _train(out, resume=False, **over):
    cfg = resolve(None, {"epochs": 2, "attack_steps": 2, "batch_size": 64, "device": "cpu", **over})
    Trainer(cfg, out, resume=resume, progress=False, log=lambda *_: None).fit()
    return load_tensors(out / "train_state.safetensors")


def test_resume_equals_uninterrupted(tmp_path):
    """A --max-steps stop in the middle of epoch 2, then --resume: the same trajectory as one run."""
    full = _train(tmp_path / "full")
    _train(tmp_path / "part", max_steps=27)
    part = read_manifest(tmp_path / "part")
    assert part["training"]["steps"] == 27 and part["training"]["epochs"] == 1
    resumed = _train(tmp_path / "part", resume=True)
    assert set(full) == set(resumed)
    for k in full:
        if not k.startswith("best."):  # a stop evaluates where it stopped, which selection may pick
            assert torch.equal(full[k], resumed[k]), k
    lines = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [1, 2] and not any(x["partial"] for x in lines)


def test_kill_9_then_resume_is_bit_for_bit(tiny_run, tmp_path):
    ref, _ = tiny_run  # the uninterrupted run of the same command (3 epochs), trained once for this file
    args = ["train", *TINY, "--sparsity", "0.9"]
    victim = tmp_path / "victim"
    cmd = [sys.executable, "-m", "rsp.cli", *args, "--output", str(victim)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill in the middle of epoch 2 (or 3), after a checkpoint exists
        if (victim / "metrics.jsonl").exists() and (victim / "metrics.jsonl").read_text().count("\n") >= 1:
            time.sleep(0.3)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = (victim / "metrics.jsonl").read_text().count("\n")
    assert 1 <= lines < 3, "the kill must land mid-run"
    r = rsp_cli(*args, "--output", victim, "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_tensors(ref / "model.safetensors"), load_tensors(victim / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_tensors(ref / "train_state.safetensors"), load_tensors(victim / "train_state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (ref / "metrics.jsonl").read_text().count("\n") == (victim / "metrics.jsonl").read_text().count("\n") == 3


def _one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args,match", [
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "no cifar-10-batches-py"),
    (["--model", "resnet9000"], "unknown model"),
    (["--objective", "fgsm-maybe"], "unknown objective"),
    (["--method", "magic"], "unknown method"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.5"], "sparsity"),
    (["--eps", "eight"], "eps"),
    (["--dataset", "mnist"], "unknown dataset"),
    (["--config", "/nonexistent.yaml"], "no config file"),
    (["--objective", "rst"], "extra-data"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--model-kwargs", "{widht: 0.25}"], "takes no argument 'widht'"),
    (["--model-kwargs", "{channels: [0]}"], "positive"),
    (["--model-kwargs", "[1, 2]"], "expected a mapping"),
    (["--model-kwargs", "{width: "], "not YAML"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, match):
    # in-process: the message and the exit code (the real entry point: test_corrupt_data_folder_is_bad_input)
    err = _one_line_error(rsp_cli_here("train", *args, "--max-steps", "1", "--output", tmp_path / "o"))
    assert match in err


def test_corrupt_data_folder_is_bad_input(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(b"\x80\x04garbage")
    err = _one_line_error(rsp_cli("train", "--dataset", "cifar10", "--data-dir", tmp_path, "--output", tmp_path / "o"))
    assert "cannot read" in err


def test_resume_from_another_config_is_refused_and_existing_run_kept(tiny_run, tmp_path):
    out, _ = tiny_run
    before = (out / "model.safetensors").read_bytes()
    err = _one_line_error(rsp_cli_here("train", "--output", out, "--resume", "--sparsity", "0.5"))
    assert "cannot resume" in err and "sparsity" in err
    err = _one_line_error(rsp_cli_here("train", "--output", out, *TINY))
    assert "already holds a run" in err
    assert (out / "model.safetensors").read_bytes() == before


def test_divergence_stops_with_a_clear_message(tmp_path):
    r = rsp_cli("train", "--epochs", "2", "--attack-steps", "1", "--lr", "1e30", "--objective", "natural",
                "--method", "dense", "--output", tmp_path / "d")
    assert r.returncode == 1 and "diverged" in r.stderr and "Traceback" not in r.stderr


def test_help_teaches():
    r = rsp_cli("train", "--help", env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    for flag in ("--dataset", "--data-dir", "--model", "--sparsity", "--method", "--objective", "--epochs",
                 "--max-steps", "--batch-size", "--lr", "--seed", "--device", "--output", "--resume", "--config"):
        assert flag in r.stdout, flag


def test_recipe_with_flag_overrides_is_saved_resolved(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 0.8\nobjective: trades\neps: 4/255\nepochs: 7\n")
    out = tmp_path / "run"
    r = rsp_cli("train", "--config", recipe, "--epochs", "1", "--max-steps", "2", "--attack-steps", "1",
                "--eval-attack-steps", "1", "--test-attack-steps", "1", "--output", out)
    assert r.returncode == 0, r.stderr
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["sparsity"] == 0.8 and saved["objective"] == "trades" and saved["epochs"] == 1
    assert saved["eps"] == pytest.approx(4 / 255)
    m = read_manifest(out)
    assert m["objective"] == "trades" and m["target_sparsity"] == 0.8


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    from rsp.train import TrainingError

    out = tmp_path / "run"
    cfg = resolve(None, {"epochs": 3, "attack_steps": 1, "batch_size": 64, "device": "cpu"})
    trainer = Trainer(cfg, out, progress=False, log=lambda *_: None)
    trainer.train_epoch()
    trainer.epoch += 1
    trainer._save_checkpoint({"epoch": 1})
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with torch.no_grad():  # poison the model: the next epoch's loss is NaN
        next(trainer.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="diverged"):
        trainer.train_epoch()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before == after


def test_vgg16_on_real_cifar_at_99_percent_is_exactly_one_percent_dense(cifar_dir, tmp_path):
    out = tmp_path / "vgg"
    r = rsp_cli("train", "--dataset", "cifar10", "--data-dir", cifar_dir, "--model", "vgg16", "--sparsity", "0.99",
                "--objective", "trades", "--max-steps", "1", "--batch-size", "8", "--attack-steps", "1",
                "--eval-attack-steps", "1", "--test-attack-steps", "1", "--val-fraction", "0.02",  # 100 val images
                "--output", out)
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file  # read the file independently of rsp

    w = load_file(str(out / "model.safetensors"))
    convs = [k for k, v in w.items() if k.endswith(".weight") and v.ndim in (2, 4)]
    nnz = sum(int((w[k] != 0).sum()) for k in convs)
    total = sum(w[k].size for k in convs)
    assert len(convs) == 16 and total == 15_302_848  # the paper's VGG-16
    assert nnz == round(0.01 * total)


@pytest.mark.gpu
def test_rewiring_step_never_synchronises_with_the_host():
    from rsp.models import create_model
    from rsp.sparse import BayesianRewiring

    torch.manual_seed(0)
    model = create_model("resnet18", width=16).cuda()
    sparse = BayesianRewiring(model, 0.99, torch.Generator("cuda").manual_seed(0))
    x, y = torch.rand(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    for _ in range(3):
        sparse.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sparse.step(0.1, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert int(sparse.active_count()) == sparse.budget


def test_paper_recipes_use_the_reference_init_and_decay_and_the_manifest_records_them(tmp_path):
    from rsp.config import read_recipe, recipe_names, resolve

    for name in recipe_names():
        if "vgg16" in name:
            cfg = resolve(read_recipe(name))
            assert (cfg.sparse_init, cfg.decay_scope) == ("reference", "all"), name
    out = tmp_path / "run"
    r = rsp_cli("train", "--sparse-init", "reference", "--decay-scope", "all", "--method", "fixed", "--epochs", "1",
                "--max-steps", "2", "--attack-steps", "1", "--eval-attack-steps", "1", "--test-attack-steps", "1",
                "--threads", "1", "--output", out)
    assert r.returncode == 0, r.stderr
    mc = read_manifest(out)["method_config"]
    assert mc["sparse_init"] == "reference" and mc["weight_decay_scope"].startswith("all")
    assert mc["initial_density_profile"] == "first/last>=0.6"  # small-cnn: no reference profile
    for flag, value in (("--sparse-init", "nope"), ("--decay-scope", "bn")):
        r = rsp_cli_here("train", flag, value, "--output", tmp_path / "bad")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr

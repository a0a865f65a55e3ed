"""Every `rsp train --method` runs through all its phases, ends at or under the weight budget, and writes a
folder that structure, export and verify accept unchanged (issue: seed baselines, acceptance 1 in small)."""

import json

import pytest
import torch

import rsp
from rsp.artifacts import load_tensors, read_manifest
from rsp.config import resolve
from rsp.methods import list_methods
from rsp.sparse import sparsifiable_layers
from rsp.train import Trainer

METHODS = [m for m in list_methods() if m != "dense"]


def _nonzero_and_total(folder):
    state = load_tensors(folder / "model.safetensors")
    names = [n for n, _ in sparsifiable_layers(rsp.load_model(folder))]
    ws = [state[f"{n}.weight"] for n in names]
    return sum(int(torch.count_nonzero(w)) for w in ws), sum(w.numel() for w in ws)


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_all_phases_within_budget_and_later_stages_accept_it(method, tmp_path):
    from rsp.export import ExportOptions
    from rsp.export import run as export_run
    from rsp.structure import StructureOptions
    from rsp.structure import run as structure_run
    from rsp.verify import VerifyOptions
    from rsp.verify import run as verify_run

    run = tmp_path / "train"
    cfg = resolve(None, {"method": method, "sparsity": 0.9, "epochs": 2, "max_steps": 2, "attack_steps": 1,
                         "eval_attack_steps": 1, "test_attack_steps": 1, "batch_size": 64, "device": "cpu",
                         "threads": 1})
    Trainer(cfg, run, progress=False, log=lambda *_: None).fit()
    manifest = read_manifest(run)
    assert manifest["status"] == "complete" and manifest["method"] == method
    nonzero, total = _nonzero_and_total(run)
    budget = round(0.1 * total)
    assert manifest["method_config"]["budget"] == budget and nonzero <= budget
    assert manifest["sparsity"] >= 1 - budget / total - 1e-12
    phases = manifest["method_config"].get("phases")
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    if phases:  # each phase ran (max 2 steps each) and only at-budget phases were selectable
        assert [r["phase"] for r in records] == [p["name"] for p in phases]
        assert all(not r["selected"] for r, p in zip(records, phases) if not p["at_budget"])
        assert manifest["training"]["steps"] == sum(min(2, p["steps"]) for p in phases)

    structure_run(run, tmp_path / "structure", StructureOptions(k=0, n_examples=32, attack_steps=0), log=lambda *_: None)
    assert _nonzero_and_total(tmp_path / "structure")[0] <= nonzero
    export_run(tmp_path / "structure", tmp_path / "bundle", ExportOptions(target="x86-cpu", formats=["onnx"],
                                                                          parity_images=32, threads=1),
               log=lambda *_: None)
    result = verify_run(tmp_path / "bundle", VerifyOptions(output=str(tmp_path / "verify"), backends=["onnx"],
                                                           attacks=["pgd"], n_examples=32, steps=2, restarts=1,
                                                           sanity=False,
                                                           latency_runs=2, latency_batches=(1,), threads=1),
                        log=lambda *_: None)
    assert 0.0 <= result["robust_acc"] <= result["clean_acc"] <= 1.0
    assert result["parity"]["onnx"]["max_abs_err"] < 1e-4


def test_unknown_method_and_bad_options_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    from helpers import rsp_cli_here

    def cli(*args, here=True):  # in-process, but for the first case: the real entry point, a fresh interpreter
        if here:
            return rsp_cli_here("train", *args, "--output", tmp_path / "x")
        return subprocess.run([sys.executable, "-m", "rsp.cli", "train", *args, "--output", str(tmp_path / "x")],
                              capture_output=True, text=True, timeout=120)

    r = cli("--method", "snip", here=False)
    assert r.returncode == 2 and "unknown method 'snip'" in r.stderr and "Traceback" not in r.stderr
    r = cli("--method", "lth", "--method-option", "rounds")
    assert r.returncode == 2 and "KEY=VALUE" in r.stderr and "Traceback" not in r.stderr
    r = cli("--method", "lth", "--method-option", "colour=red", "--max-steps", "1")
    assert r.returncode == 2 and "method_options" in r.stderr and "Traceback" not in r.stderr

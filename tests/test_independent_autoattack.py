"""rsp's AutoAttack preset against an independent implementation (torchattacks, test-only, installed with
--no-deps; skipped when missing): on the same model and images rsp's worst case is within one image of it and
rsp's default headline within one image of rsp's AutoAttack."""

import importlib.util
import sys
from pathlib import Path

import pytest

from helpers import rsp_cli

pytest.importorskip("torchattacks")


def _script():
    spec = importlib.util.spec_from_file_location("independent_autoattack", Path(__file__).parents[1] / "scripts" / "independent_autoattack.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rsp_autoattack_is_never_weaker_than_an_independent_autoattack(tmp_path):
    r = rsp_cli("train", "--epochs", "2", "--attack-steps", "2", "--eval-attack-steps", "2", "--test-attack-steps", "2",
                "--threads", "1", "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    out = _script().compare(tmp_path / "run", None, 60, seed=0, presets=("default", "autoattack"), log=lambda s: None)
    n, acc = out["n_examples"], out["robust_acc"]
    assert n == 60 and 0 < acc["torchattacks-aa-budgets"] < out["clean_acc"]  # a model the attacks do not trivially break
    one = 1 / n + 1e-9
    assert acc["rsp-autoattack"] <= acc["torchattacks-aa-budgets"] + one
    assert abs(acc["rsp-default"] - acc["rsp-autoattack"]) <= one
    assert len(out["missed_by_rsp"]["rsp-autoattack vs torchattacks-aa-budgets"]) <= 1

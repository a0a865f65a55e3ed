"""Model selection and phase boundaries: collapsed classifiers are never preferred, BatchNorm is recalibrated."""

import json

import pytest
import torch
import torch.nn as nn

from rsp.artifacts import read_manifest
from rsp.attacks import evaluate
from rsp.config import resolve
from rsp.train import Trainer, beats_best, is_collapsed, recalibrate_batchnorm


def _val(top_class, share):
    return {"top_class": top_class, "top_class_share": share}


def test_collapse_rule_flags_near_constant_classifiers_only():
    balanced = torch.arange(100) % 10
    assert is_collapsed(_val(3, 1.0), balanced)  # one class for every image
    assert is_collapsed(_val(3, 0.6), balanced)  # threshold for a 10 % class: 0.55
    assert not is_collapsed(_val(3, 0.5), balanced) and not is_collapsed(_val(3, 0.3), balanced)  # weak but real
    skewed = torch.cat([torch.zeros(70, dtype=torch.long), torch.arange(30) % 3 + 1])
    assert not is_collapsed(_val(0, 0.8), skewed)  # class 0 is 70 % of the data: predicting it often is no collapse
    assert is_collapsed(_val(0, 0.9), skewed) and is_collapsed(_val(1, 0.6), skewed)
    two = torch.arange(10) % 2
    assert is_collapsed(_val(1, 1.0), two) and not is_collapsed(_val(1, 0.7), two)


def test_evaluate_reports_the_most_predicted_class():
    class Constant(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 10)
            out[:, 7] = 1.0
            return out

    y = torch.arange(40) % 10
    r = evaluate(Constant(), torch.rand(40, 1, 4, 4), y, None, batch_size=16)
    assert r["top_class"] == 7 and r["top_class_share"] == 1.0 and r["clean_acc"] == pytest.approx(0.1)
    assert is_collapsed(r, y)


def test_a_healthy_epoch_always_beats_a_collapsed_one():
    start = {"score": -1.0, "collapsed": True}
    assert beats_best(0.0, True, start)  # a collapsed epoch is kept while nothing better exists
    collapsed_best = {"score": 0.10, "collapsed": True}
    assert beats_best(0.05, False, collapsed_best)  # healthy at 5 % beats a constant classifier's 10 %
    healthy_best = {"score": 0.05, "collapsed": False}
    assert not beats_best(0.10, True, healthy_best)
    assert beats_best(0.06, False, healthy_best) and not beats_best(0.05, False, healthy_best)  # ties keep the first
    assert not beats_best(0.2, True, {"score": 0.3})  # a best from before the rule counts as healthy


def test_batchnorm_recalibration_is_exact_and_touches_nothing_else():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3), nn.BatchNorm1d(3))
    model.train()
    x = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        model[0].weight.mul_(0.01)  # "pruned": the old statistics are far off
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(model, x, batch_size=40) == 2
    assert torch.equal(torch.get_rng_state(), rng)  # dropout did not run: nothing random was drawn
    assert model.training and model[3].training and model[1].momentum == 0.1  # modes and momentum restored
    with torch.no_grad():
        h = model[0](x.float() / 255)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model[1].running_var, h.var((0, 2, 3), unbiased=True), rtol=1e-4)
    # in batches: the cumulative average of the per-batch means (equal batches: the full mean)
    recalibrate_batchnorm(model, x, batch_size=20)
    assert torch.allclose(model[1].running_mean, h.mean((0, 2, 3)), atol=1e-6)


def _fake_eval(script):
    """Trainer._eval replaced by a script of validation results, one per epoch (test evaluations pass through)."""
    real = Trainer._eval
    calls = iter(script)

    def fake(self, x, y, steps, seed):
        if x is self.splits.val_x:
            robust, share = next(calls)
            top = int(self.splits.val_y[0])
            return {"clean_acc": robust, "robust_acc": robust, "n": len(y), "top_class": top, "top_class_share": share}
        return real(self, x, y, steps, seed)

    return fake


@pytest.mark.parametrize("script, chosen, fallback", [
    ([(0.30, 0.2), (0.50, 1.0), (0.20, 0.2)], 1, False),  # the collapsed epoch 2 scores best but is not chosen
    ([(0.10, 1.0), (0.12, 0.9), (0.05, 0.95)], 2, True),  # every epoch collapsed: the best of them, and it says so
])
def test_trainer_selects_healthy_epochs_first(tmp_path, monkeypatch, script, chosen, fallback):
    monkeypatch.setattr(Trainer, "_eval", _fake_eval(script))
    cfg = resolve(None, {"epochs": 3, "attack_steps": 1, "batch_size": 64, "device": "cpu", "sparsity": 0.9})
    out = tmp_path / "run"
    Trainer(cfg, out, progress=False, log=lambda *_: None).fit()
    m = read_manifest(out, stage="train")
    assert m["metrics"]["epoch"] == chosen and m["metrics"]["selected_collapsed"] is fallback
    assert "collapsed" in m["selection"]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["collapsed"] for r in lines] == [share > 0.5 for _, share in script]
    assert [r["epoch"] for r in lines if r["selected"]][-1] == chosen


def test_trainer_recalibrates_batchnorm_at_each_phase_boundary_only(tmp_path, monkeypatch):
    import rsp.train as train

    calls = []
    real = train.recalibrate_batchnorm

    def spy(model, x, **kw):
        calls.append(len(x))
        return real(model, x, **kw)

    monkeypatch.setattr(train, "recalibrate_batchnorm", spy)
    cfg = resolve(None, {"epochs": 2, "attack_steps": 1, "batch_size": 64, "device": "cpu", "sparsity": 0.9,
                         "method": "magnitude"})
    out = tmp_path / "mag"
    Trainer(cfg, out, progress=False, log=lambda *_: None).fit()
    m = read_manifest(out, stage="train")
    # two phases: one boundary, none at the start of the first phase; the first 2048 training images (all of digits')
    assert calls == [min(train.BN_RECALIBRATION_IMAGES, m["dataset"]["n_train"])]
    assert "re-estimated" in m["method_config"]["batchnorm_recalibration"]
    calls.clear()
    single = resolve(None, {"epochs": 1, "attack_steps": 1, "batch_size": 64, "device": "cpu", "sparsity": 0.9})
    Trainer(single, tmp_path / "bcs", progress=False, log=lambda *_: None).fit()
    assert calls == [] and "batchnorm_recalibration" not in read_manifest(tmp_path / "bcs")["method_config"]

"""The attack registry: an attack registered from outside rsp.attacks is listed by rsp verify --help, accepted by
--attacks (and `all`), run by ensemble_eval into the worst case, and split as black-box by the sanity checks."""

import contextlib
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from rsp.artifacts import save_tensors, write_manifest
from rsp.attacks import ATTACK_REGISTRY, AttackResult, attack_names, ensemble_eval, register_attack
from rsp.cli import app
from rsp.sanity import check_black_box
from rsp.verify import VerifyOptions, expand_attacks, resolve_evaluation

NAME = "sign-noise"
EPS = 32 / 255


def sign_noise(model, judge, x, y, settings, generator, attack):
    """A throwaway black-box attack: one random corner of the eps-ball per example, judged by `judge`."""
    signs = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
    x_adv = (x + settings.eps * signs).clamp(0.0, 1.0)
    with torch.no_grad():
        robust = attack & (judge(x_adv).argmax(1) == y)
    return AttackResult(NAME, x_adv, robust, attack.clone(), len(x), 0.0, {"eps": settings.eps})


@contextlib.contextmanager
def sign_noise_registered():
    register_attack(NAME, kind="black-box", note="a random corner of the ball")(sign_noise)
    try:
        yield
    finally:
        del ATTACK_REGISTRY[NAME]


def _verify_help() -> str:
    r = CliRunner().invoke(app, ["verify", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    return r.output


def _model_and_data():
    """A tiny CNN and inputs in [0, 1] it classifies correctly (labels: its own predictions)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_verify_help_lists_the_registry_as_it_is_when_shown():
    assert NAME not in _verify_help()
    with sign_noise_registered():
        shown = _verify_help()
        assert f"{NAME} (a random corner of the ball)" in shown
        assert "pgd | apgd-ce | apgd-dlr | apgd-t (targeted DLR)" in shown  # the built-ins, in registry order
    assert NAME not in _verify_help()


def test_importing_the_cli_does_not_import_torch():
    """verify's help is built from the registry when shown, so the CLI's import stays light."""
    code = "import sys, rsp.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_registration_is_checked():
    with pytest.raises(ValueError, match="kind must be one of white-box, black-box"):
        register_attack("grey-box", kind="grey-box")
    with pytest.raises(ValueError, match="'pgd' is already registered"):
        register_attack("pgd", kind="white-box")(sign_noise)
    assert attack_names() == ["pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square"]


def test_verify_accepts_it_by_name_and_in_all():
    with sign_noise_registered():
        assert attack_names("black-box") == ["square", NAME]
        assert expand_attacks(["all"]) == ["pgd", "apgd-ce", "apgd-t", "fab-t", "square", NAME]
        assert resolve_evaluation(VerifyOptions(output="", attacks=["pgd", NAME]))["attacks"] == ["pgd", NAME]
    assert expand_attacks(["all"]) == ["pgd", "apgd-ce", "apgd-t", "fab-t", "square"]


def test_ensemble_runs_it_into_the_worst_case_and_sanity_sees_a_black_box_attack():
    model, x, y = _model_and_data()
    with sign_noise_registered():
        kw = dict(eps=EPS, steps=2, restarts=1, seed=3)
        r = ensemble_eval(model, x, y, ["pgd", NAME], **kw)
        assert r["attacks"] == ["pgd", NAME] and r["per_attack"][NAME]["config"] == {"eps": EPS}
        with torch.no_grad():
            judged = r["clean"] & (model(r["x_adv_by_attack"][NAME]).argmax(1) == y)
        assert torch.equal(r["robust_by_attack"][NAME], judged)
        assert (r["x_adv_by_attack"][NAME] - x).abs().max() <= EPS + 1e-6
        assert torch.equal(r["robust"], r["robust_by_attack"]["pgd"] & r["robust_by_attack"][NAME])
        again = ensemble_eval(model, x, y, [NAME], **kw)  # its generator depends on the seed and its name only
        assert torch.equal(again["x_adv_by_attack"][NAME], r["x_adv_by_attack"][NAME])
        check = check_black_box(model, x, y, EPS, ensemble=r, escalate_steps=0)
        assert f"black-box ({NAME})" in check["detail"] and "white-box (pgd)" in check["detail"]
    with pytest.raises(ValueError, match=f"unknown attack.*{NAME}"):
        ensemble_eval(model, x, y, [NAME])


def test_rsp_verify_runs_it(tmp_path, monkeypatch):
    """`rsp verify --attacks sign-noise` on a tiny bundle (random weights; the PyTorch twin is the runtime)."""
    import rsp.verify
    from rsp.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, channels=[4, 4]).eval()
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    save_tensors(bundle / "model.safetensors", model.state_dict())
    write_manifest(bundle, {"stage": "export", "status": "complete",
                            "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits", "num_classes": 10}, "input": {"shape": [1, 8, 8]}},
                   ["model.safetensors"])
    monkeypatch.setattr(rsp.verify, "_latency", lambda *args, **kw: {})  # not what this test is about
    with sign_noise_registered():
        r = CliRunner().invoke(app, ["verify", str(bundle), "--backend", "torch", "--attacks", "pgd", "--attacks", NAME,
                                     "--n-examples", "16", "--steps", "1", "--restarts", "1", "--no-sanity",
                                     "--output", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    out = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert list(out["attacks"]) == ["pgd", NAME] and out["preset"] == "custom"
    per_attack = out["backends"]["torch"]["per_attack"]
    assert out["robust_acc"] <= min(per_attack["pgd"], per_attack[NAME])
    assert f"| {NAME} |" in (tmp_path / "v" / "report.md").read_text()

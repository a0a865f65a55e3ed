"""PGD and the robust losses: the attack stays legal and works; the losses match hand computation."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.attacks import PGDConfig, attack_mode, evaluate, parse_eps, pgd
from rsp.objectives import Objective, mart_loss, trades_loss


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, 10))


def test_parse_eps_accepts_fractions_and_rejects_garbage():
    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.031") == pytest.approx(0.031)
    assert parse_eps(0.5) == 0.5
    for bad in ("abc", "1/0", "2", "-0.1"):
        with pytest.raises(ValueError):
            parse_eps(bad)


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_pgd_stays_in_eps_ball_and_unit_box_and_raises_the_loss(loss):
    model = _net()
    model.train()
    x = torch.rand(16, 3, 8, 8)
    x[:4] = 0.0  # corners of the box: the projection must clip to [0, 1]
    x[4:8] = 1.0
    y = torch.randint(0, 10, (16,))
    cfg = PGDConfig(eps=8 / 255, step_size=2 / 255, steps=10, loss=loss)
    x_adv = pgd(model, x, y, cfg, torch.Generator().manual_seed(0))
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training, "pgd must restore the caller's mode"
    model.eval()
    with torch.no_grad():
        if loss == "ce":
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
        else:
            p = F.softmax(model(x), 1)
            assert F.kl_div(F.log_softmax(model(x_adv), 1), p, reduction="sum") > 1e-6


def test_attack_runs_in_eval_mode_and_leaves_batchnorm_statistics_alone():
    model = _net()
    model.train()
    bn = model[1]
    before = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    modes = []
    model[0].register_forward_pre_hook(lambda m, i: modes.append(m.training))
    pgd(model, torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,)), PGDConfig(steps=3), torch.Generator().manual_seed(0))
    assert modes and not any(modes)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.num_batches_tracked, before[1])
    assert all(p.requires_grad for p in model.parameters())


def test_restarts_are_worst_case_per_example():
    model = _net().eval()
    x = torch.rand(64, 3, 8, 8)
    y = model(x).argmax(1).detach()  # all clean-correct
    gen = torch.Generator().manual_seed(0)
    weak = PGDConfig(eps=2 / 255, step_size=0.5 / 255, steps=2, restarts=1)
    strong = PGDConfig(eps=2 / 255, step_size=0.5 / 255, steps=2, restarts=5)
    r1 = evaluate(model, x, y, weak, generator=torch.Generator().manual_seed(0))
    r5 = evaluate(model, x, y, strong, generator=torch.Generator().manual_seed(0))
    assert r1["clean_acc"] == r5["clean_acc"] == 1.0
    assert r5["robust_acc"] <= r1["robust_acc"]
    # eps = 0 gives clean accuracy; a huge eps leaves (almost) nothing
    zero = evaluate(model, x, y, PGDConfig(eps=0.0, steps=5), generator=gen)
    assert zero["robust_acc"] == zero["clean_acc"]
    big = evaluate(model, x, y, PGDConfig(eps=1.0, step_size=0.1, steps=20), generator=gen)
    assert big["robust_acc"] <= 0.2


def test_attack_mode_freezes_parameters_and_restores_them():
    model = _net()
    with attack_mode(model):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_trades_loss_matches_hand_computation():
    logits_clean = torch.tensor([[0.0, 0.0]])
    logits_adv = torch.tensor([[math.log(3.0), 0.0]])  # p_adv = (0.75, 0.25)
    y = torch.tensor([0])
    ce = math.log(2.0)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert trades_loss(logits_clean, logits_adv, y, beta=6.0).item() == pytest.approx(ce + 6 * kl, rel=1e-6)


def test_mart_loss_matches_hand_computation():
    p_clean, p_adv = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3]
    logits_clean = torch.tensor([[math.log(p) for p in p_clean]])
    logits_adv = torch.tensor([[math.log(p) for p in p_adv]])
    y = torch.tensor([0])
    boosted_ce = -math.log(0.2) - math.log(1.0001 - 0.5)  # the most likely wrong class is 1
    kl = sum(a * math.log(a / b) for a, b in zip(p_clean, p_adv))
    expected = boosted_ce + 6.0 * kl * (1.0000001 - 0.6)
    assert mart_loss(logits_clean, logits_adv, y, beta=6.0).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["natural", "pgd-at", "mixed-at", "trades", "mart", "rst"])
def test_every_objective_gives_a_finite_differentiable_loss(name):
    model = _net().train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    loss, logits = Objective(name, PGDConfig(steps=2))(model, x, y, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and logits.shape == (6, 10)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.training


def test_vs_lambda_adds_the_anp_vs_vulnerability_term():
    """--vs-lambda: loss = objective + lambda * mean over ReLU sites of mean |z(x) - z(x_adv)|, differentiable;
    the term vanishes when the adversarial input equals the clean one."""
    from rsp.methods.anp import vulnerability_loss

    model = _net().train()
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 10, (6,))
    assert vulnerability_loss(model, x, x).item() == 0.0
    x_adv = (x + 0.03).clamp(0, 1)
    with torch.no_grad():  # the single ReLU site, by hand
        z = lambda inp: F.relu(model[1](model[0](inp)))
        expected = (z(x) - z(x_adv)).abs().mean()
    vs = vulnerability_loss(model, x, x_adv)
    assert vs.item() == pytest.approx(expected.item(), rel=1e-5) and vs.requires_grad
    atk = PGDConfig(eps=8 / 255, step_size=2 / 255, steps=2)
    base = Objective("pgd-at", atk)(model, x, y, torch.Generator().manual_seed(0))[0]
    with_vs = Objective("pgd-at", atk, vs_lambda=0.5)(model, x, y, torch.Generator().manual_seed(0))[0]
    assert with_vs.item() > base.item()
    with_vs.backward()
    assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad).all()

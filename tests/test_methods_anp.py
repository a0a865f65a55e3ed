"""ANP-VS (rsp.methods.anp): the Kumaraswamy sample and KL term, the gate's modes, unit pruning, the budget,
and resume. Phases are driven by a tiny loop that does what rsp train does (no trainer needed)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.methods import PhaseContext, budget_of, create_method
from rsp.methods.anp import (ALPHA, EULER, BetaBernoulliGate, BetaBernoulliGates, kl_kumaraswamy_beta,
                             kumaraswamy_mean, kumaraswamy_sample, softplus_params)
from rsp.models import create_model
from rsp.sparse import dense_state_dict, frozen_weights, sparse_layers, sparsifiable_layers, to_dense

TWO_PHASES = [0.8, 0.2]  # anp, finetune: the gate mechanics without the default's dense pre-training


def _net():
    # conv -> BN like the registry models, a hidden linear with a bias, and the classifier (never gated)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10))


def _cfg(**kw):
    base = dict(sparsity=0.5, lr=0.05, momentum=0.9, weight_decay=5e-4, epochs=1, batch_size=16, dataset="digits")
    return SimpleNamespace(**{**base, **kw})


def _ctx(cfg, steps, resuming=False, seed=1):
    return PhaseContext(cfg=cfg, model_name="test", generator=torch.Generator().manual_seed(seed),
                        device=torch.device("cpu"), resuming=resuming, steps=steps, log=lambda s: None, n_train=64)


def _batch(gen, n=16):
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _fgsm(model, x, y, eps=0.05):
    """The trainer's order: the attack in eval mode with frozen weights, then the loss in train mode."""
    was = model.training
    model.eval()
    with frozen_weights(model):
        xa = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
    model.train(was)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def _train(model, sparse, steps, gen, lr=0.05, wd=5e-4):
    """One phase of rsp train: SGD over every trainable parameter, decoupled decay on decayed_params,
    loss = robust objective + extra_loss, then sparse.step."""
    own = {id(p) for p in sparse.self_updated_params()} if sparse is not None else set()
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    decayed = sparse.decayed_params() if sparse is not None else [m.weight for _, m in sparsifiable_layers(model)]
    model.train()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        if sparse is not None:
            sparse.zero_grad()
        x, y = _batch(gen)
        loss = F.cross_entropy(model(_fgsm(model, x, y)), y)
        extra = sparse.extra_loss() if sparse is not None else None
        (loss if extra is None else loss + extra).backward()
        with torch.no_grad():
            torch._foreach_mul_(decayed, 1 - wd)
        opt.step()
        if sparse is not None:
            sparse.step(lr, 1.0)
    return opt


def _run(method, model, cfg, steps=(3, 3), before_finetune=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    sparse = None
    for i, _ in enumerate(method.phases(cfg)):
        if i > 0:
            to_dense(model)
        sparse = method.enter(i, model, _ctx(cfg, steps[i]))
        if i == 0 and before_finetune is not None:
            before_finetune(sparse)
        _train(model, sparse, steps[i], gen)
    return sparse


def _nonzero(model):
    state = dense_state_dict(model)
    return sum(int(torch.count_nonzero(state[f"{n}.weight"])) for n, _ in sparsifiable_layers(model))


# --- the distributions -------------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(0.5, 1.0), (2.127, 1.0), (3.0, 2.5), (0.8, 0.6)])
def test_kumaraswamy_sample_in_unit_interval_with_the_analytic_mean(a, b):
    gen = torch.Generator().manual_seed(0)
    u = torch.rand(400_000, generator=gen, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    at, bt = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    pi = kumaraswamy_sample(at, bt, u)
    assert bool(((pi > 0) & (pi < 1)).all())
    mean = float(kumaraswamy_mean(at, bt))
    assert mean == pytest.approx(b * math.exp(math.lgamma(1 + 1 / a) + math.lgamma(b) - math.lgamma(1 + 1 / a + b)))
    se = float(pi.std()) / math.sqrt(len(pi))
    assert abs(float(pi.mean()) - mean) < 5 * se
    # the gate module's float32 sampler: one pi per unit per draw, in [0, 1] (float32 rounds 1 - 1e-10 to 1),
    # the same mean, and finite gradients everywhere
    g = BetaBernoulliGate(4096, a_uc_init=math.log(math.expm1(a)), b_uc_init=math.log(math.expm1(b)),
                          generator=torch.Generator().manual_seed(1))
    draws = torch.stack([g.sample_pi() for _ in range(20)])
    assert bool(((draws >= 0) & (draws <= 1)).all())
    assert float(draws.detach().mean()) == pytest.approx(mean, abs=0.01)
    g.sample(8).sum().backward()
    assert bool(torch.isfinite(g.a_uc.grad).all() & torch.isfinite(g.b_uc.grad).all())


def _kl_monte_carlo(a, b, alpha, n=400_000, seed=0):
    """E_q[log q(pi) - log p(pi)] from exact log densities, sampled in log space (float64)."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).clamp(1e-300, 1.0)
    log_t = torch.log(u) / b  # log u^(1/b) = log(1 - pi^a)
    log_pi = torch.log(-torch.expm1(log_t)) / a
    log_q = math.log(a * b) + (a - 1) * log_pi + (b - 1) * log_t
    log_p = math.log(alpha) + (alpha - 1) * log_pi  # Beta(alpha, 1): density alpha * x^(alpha - 1)
    d = log_q - log_p
    return float(d.mean()), float(d.std()) / math.sqrt(n)


@pytest.mark.parametrize("a,b,alpha", [(2.127, 1.0, ALPHA), (0.7, 2.5, 0.3), (3.0, 0.6, ALPHA), (0.05, 1.3, 0.02)])
def test_kl_matches_monte_carlo(a, b, alpha):
    f64 = dict(dtype=torch.float64)
    closed = float(kl_kumaraswamy_beta(torch.tensor(a, **f64), torch.tensor(b, **f64), alpha))
    mc, se = _kl_monte_carlo(a, b, alpha)
    assert abs(closed - mc) < 5 * se + 1e-3, (closed, mc, se)


def test_kl_is_nonnegative_zero_at_the_prior_and_decreases_towards_it():
    a = torch.logspace(-4, 1.5, 60, dtype=torch.float64)
    b = torch.logspace(-1.5, 1.5, 60, dtype=torch.float64)
    grid = kl_kumaraswamy_beta(a[:, None], b[None, :], ALPHA)
    assert float(grid.min()) > -1e-9
    one = torch.tensor(1.0, dtype=torch.float64)
    # Kumaraswamy(alpha, 1) is Beta(alpha, 1)
    at_prior = kl_kumaraswamy_beta(torch.tensor(ALPHA, dtype=torch.float64), one, ALPHA)
    assert float(at_prior) == pytest.approx(0, abs=1e-9)
    # closed form on b = 1: alpha/a - 1 - log(alpha/a)
    aa = torch.tensor(0.3, dtype=torch.float64)
    assert float(kl_kumaraswamy_beta(aa, one, ALPHA)) == pytest.approx(ALPHA / 0.3 - 1 - math.log(ALPHA / 0.3))
    # moving a towards alpha (b = 1) and b towards 1 (a = alpha) both decrease it strictly
    path_a = kl_kumaraswamy_beta(torch.logspace(1, -4, 30, dtype=torch.float64), one, ALPHA)
    assert bool((path_a[1:] < path_a[:-1]).all())
    for bs in (torch.linspace(4, 1, 30, dtype=torch.float64), torch.linspace(0.2, 1, 30, dtype=torch.float64)):
        path_b = kl_kumaraswamy_beta(torch.tensor(ALPHA, dtype=torch.float64), bs, ALPHA)
        assert bool((path_b[1:] < path_b[:-1]).all())
    # the gate's kl() is the sum over its units, with their parametrisation (Euler's constant = -digamma(1))
    g = BetaBernoulliGate(5, a_uc_init=0.3, b_uc_init=-0.2)
    with torch.no_grad():
        ga, gb = softplus_params(g.a_uc, g.b_uc)
        assert float(g.kl()) == pytest.approx(float(kl_kumaraswamy_beta(ga, gb, ALPHA).sum()), rel=1e-6)
    assert EULER == pytest.approx(-float(torch.digamma(torch.tensor(1.0, dtype=torch.float64))), abs=1e-14)


# --- the gate in a layer ------------------------------------------------------------------------------


def _gated(per_example=True, seed=0, **kw):
    torch.manual_seed(seed)
    model = _net()
    sparse = BetaBernoulliGates(model, 0.5, kl_scale=1 / 64, generator=torch.Generator().manual_seed(3),
                                per_example=per_example, **kw)
    return model, sparse


def test_gates_on_every_layer_but_the_classifier():
    model, sparse = _gated()
    names = [n for n, _ in sparsifiable_layers(model)]
    assert [n for n, _ in sparse.layers] == names[:-1]
    assert not hasattr(model[-1], "gate") and type(model[-1]) is nn.Linear
    for _, m in sparse.layers:
        assert m.parametrization == "gate" and m.gate.n == m.weight.shape[0]
        assert torch.equal(m.mask, torch.ones_like(m.weight))
    # their inits: conv a_uc 2.0 (E[pi] = a / (a + 1) at b = 1), linear -1.0
    e = sparse.gates["0"].keep_probability().detach()
    a = F.softplus(torch.tensor(2.0))
    assert torch.allclose(e, torch.full_like(e, float(a / (a + 1))), atol=1e-4)
    a = F.softplus(torch.tensor(-1.0))
    assert float(sparse.gates["8"].keep_probability().detach()[0]) == pytest.approx(float(a / (a + 1)), abs=1e-4)
    # state_dict carries the gate parameters (resume), dense_state_dict only plain weights
    keys = model.state_dict().keys()
    assert {"0.gate.a_uc", "0.gate.b_uc", "0.mask", "8.gate.a_uc"} <= set(keys)
    assert set(dense_state_dict(model)) == set(_net().state_dict())


@pytest.mark.parametrize("per_example", [True, False])
def test_eval_is_the_thresholded_expectation_and_train_samples(per_example):
    model, sparse = _gated(per_example)
    with torch.no_grad():
        sparse.gates["3"].a_uc[:4] = -10.0  # E[pi] ~ 4.5e-5: pruned in eval
    x = torch.rand(6, 1, 8, 8)
    model.eval()
    out1, out2 = model(x), model(x)
    assert torch.equal(out1, out2)
    conv = sparse.layers[1][1]
    e = sparse.gates["3"].keep_probability()
    assert bool((conv.gate()[:4] == 0).all()) and torch.allclose(conv.gate()[4:], e[4:])
    assert torch.allclose(conv.effective_weight(), conv.weight * conv.gate().view(-1, 1, 1, 1))
    lin = sparse.layers[2][1]  # with a bias: (W * E[pi]) h + b
    h = torch.rand(5, 16)
    assert torch.allclose(lin(h), F.linear(h, lin.weight * lin.gate.expected()[:, None], lin.bias), atol=1e-6)
    model.train()
    t1, t2 = model(x), model(x)
    assert not torch.allclose(t1, t2)
    z = sparse.gates["0"].sample(4)
    assert z.shape == (4, 8) and bool(((z >= 0) & (z <= 1)).all())
    if per_example:
        # one mask per example: identical inputs give different outputs; gate() is 1, the hook draws
        y = lin(torch.rand(1, 16).expand(4, -1))
        assert not torch.allclose(y[0], y[1])
        assert torch.equal(sparse.gates["0"](), torch.ones(8))
    else:
        g1, g2 = sparse.gates["0"](), sparse.gates["0"]()
        assert not torch.equal(g1, g2) and bool(((g1 >= 0) & (g1 <= 1)).all())
    # without autograd (to_dense, saving, frozen weights) even train mode sees the expectation
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        assert torch.equal(sparse.gates["3"](), sparse.gates["3"].expected())


@pytest.mark.parametrize("gate_optimizer", ["adam", "sgd"])
def test_gradient_reaches_the_gates_and_the_gates_train(gate_optimizer):
    model, sparse = _gated(gate_optimizer=gate_optimizer)
    before = [p.detach().clone() for p in sparse.gate_params()]
    gate_ids = {id(p) for p in sparse.gate_params()}
    assert gate_ids.isdisjoint(id(p) for p in sparse.decayed_params())  # never decayed
    assert {id(p) for p in sparse.decayed_params()} == {id(m.weight) for _, m in sparsifiable_layers(model)}
    assert all(p.requires_grad for p in sparse.gate_params())
    model.train()
    x, y = _batch(torch.Generator().manual_seed(0))
    sparse.zero_grad()
    (F.cross_entropy(model(x), y) + sparse.extra_loss()).backward()
    own = {id(p) for p in sparse.self_updated_params()}
    # under Adam the method updates the gates itself: the trainer's optimizer leaves them out
    assert own == (gate_ids if gate_optimizer == "adam" else set())
    grads = [p.grad for p in sparse.gate_params()]
    for g in grads:
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    _train(model, sparse, 2, torch.Generator().manual_seed(1))
    after = sparse.gate_params()
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    if gate_optimizer == "adam":
        assert sparse.state_tensors()


def test_per_example_masks_survive_batchnorm():
    """Why one mask per example: train-mode BatchNorm divides out a channel scale shared by the batch, so a
    per-batch gate on the first conv gets (almost) no data gradient; per-example masks get a real one."""
    grads = {}
    for per_example in (False, True):
        model, sparse = _gated(per_example, gate_optimizer="sgd")
        model[1].eps = 1e-12  # what is left with one mask per batch comes only through BatchNorm's eps
        model.train()
        x, y = _batch(torch.Generator().manual_seed(0), n=32)
        F.cross_entropy(model(x), y).backward()  # no KL: the data gradient only
        grads[per_example] = float(sparse.gates["0"].a_uc.grad.abs().mean())
    assert grads[True] > 1000 * grads[False]


# --- the phases ------------------------------------------------------------------------------------------


def test_unit_pruning_zero_rows_and_budget():
    torch.manual_seed(0)
    model, cfg = _net(), _cfg(sparsity=0.9)
    method = create_method("anp-vs", split=TWO_PHASES)
    tiny = {"0": [1, 5], "3": [0, 2, 3, 9], "8": [4]}

    def prune_some(sparse):
        with torch.no_grad():
            for n, rows in tiny.items():
                sparse.gates[n].a_uc[rows] = -10.0

    final = _run(method, model, cfg, before_finetune=prune_some)
    assert final.name == "anp-vs" and method._anp is None
    state = dense_state_dict(model)
    for n, rows in tiny.items():
        assert float(state[f"{n}.weight"][rows].abs().sum()) == 0
    keep, total = budget_of(model, cfg.sparsity)
    assert _nonzero(model) <= keep
    conf = method.config()
    assert conf["finished_with_global_magnitude"] is True
    assert conf["units_pruned"] == 7 and conf["units_gated"] == 8 + 16 + 12
    assert conf["unit_sparsity"] == pytest.approx(7 / 36)
    assert conf["unit_sparsity_per_layer"]["3"] == {"units": 16, "pruned": 4, "unit_sparsity": 0.25}
    assert "10" not in conf["unit_sparsity_per_layer"]  # the classifier has no gate
    assert conf["nonzero_final"] == _nonzero(model) <= keep == conf["budget"]
    assert conf["weight_sparsity_final"] == pytest.approx(1 - conf["nonzero_final"] / total)
    assert conf["weight_sparsity_after_unit_pruning"] < cfg.sparsity
    assert not any(m._forward_hooks for _, m in sparsifiable_layers(model))  # the gate hooks are gone


def test_unit_pruning_alone_reaches_a_loose_budget():
    torch.manual_seed(0)
    model, cfg = _net(), _cfg(sparsity=0.3)

    def prune_most(sparse):  # 12 of 16 units of the largest layer: > 30 % of all weights
        with torch.no_grad():
            sparse.gates["3"].a_uc[:12] = -10.0

    method = create_method("anp-vs", split=[0.5, 0.5])
    _run(method, model, cfg, before_finetune=prune_most)
    conf = method.config()
    assert conf["finished_with_global_magnitude"] is False
    keep, _ = budget_of(model, cfg.sparsity)
    assert _nonzero(model) <= keep
    assert float(dense_state_dict(model)["3.weight"][:12].abs().sum()) == 0
    assert conf["weight_sparsity_final"] == pytest.approx(conf["weight_sparsity_after_unit_pruning"])


def test_small_cnn_end_to_end_with_pretraining():
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, mean=[0.5], std=[0.5])
    cfg = _cfg(sparsity=0.8)
    method = create_method("anp-vs", split=[1, 2, 1])
    assert [p.name for p in method.phases(cfg)] == ["pretrain", "anp", "finetune"]
    assert [p.at_budget for p in method.phases(cfg)] == [False, False, True]
    _run(method, model, cfg, steps=(2, 2, 2))
    keep, _ = budget_of(model, cfg.sparsity)
    assert _nonzero(model) <= keep
    assert method.config()["phases"] == {"pretrain": 0.25, "anp": 0.5, "finetune": 0.25}


def test_default_recipe_warm_starts_from_dense_robust_training():
    phases = create_method("anp-vs").phases(_cfg())
    assert [p.name for p in phases] == ["pretrain", "anp", "finetune"]
    assert [p.fraction for p in phases] == pytest.approx([0.4, 0.4, 0.2])
    assert [p.at_budget for p in phases] == [False, False, True]


def test_kl_weight_and_n_train():
    cfg = _cfg(dataset="cifar10")
    method = create_method("anp-vs", split=TWO_PHASES)
    method.phases(cfg)
    assert method.kl_weight == 2.0 and method.default_vs_lambda == 1e-4
    sparse = method.enter(0, _net(), _ctx(cfg, 10))
    assert sparse.kl_scale == pytest.approx(2.0 / 64)
    assert float(sparse.extra_loss().detach()) == pytest.approx(float(sparse.kl().detach()) * 2.0 / 64)
    m2 = create_method("anp-vs", kl_weight=0.5, split=TWO_PHASES)
    m2.phases(_cfg(dataset="digits"))
    ctx = _ctx(cfg, 10)
    ctx.n_train = 0  # unknown: estimated from steps x batch / (anp share of epochs)
    assert m2.enter(0, _net(), ctx).kl_scale == pytest.approx(0.5 / (round(10 / 0.8) * 16))
    with pytest.raises(ValueError):
        create_method("anp-vs", split=[1.0])


def _save(model, sparse, method):
    return ({k: v.clone() for k, v in model.state_dict().items()}, dict(sparse.state_tensors()),
            dict(method.state_tensors()))


def test_resume_rebuilds_and_loads_strictly():
    cfg = _cfg(sparsity=0.9)
    # run A: two anp steps, a checkpoint, one more step
    torch.manual_seed(0)
    model_a = _net()
    method_a = create_method("anp-vs", split=TWO_PHASES)
    method_a.phases(cfg)
    sparse_a = method_a.enter(0, model_a, _ctx(cfg, 5))
    _train(model_a, sparse_a, 2, torch.Generator().manual_seed(0))
    saved = _save(model_a, sparse_a, method_a)
    assert any(k.startswith("anp.adam.") for k in saved[1])

    # run B: a fresh process resumes inside the anp phase
    torch.manual_seed(123)
    model_b = _net()
    method_b = create_method("anp-vs", split=TWO_PHASES)
    method_b.phases(cfg)
    method_b.load_state_tensors(saved[2])
    sparse_b = method_b.enter(0, model_b, _ctx(cfg, 5, resuming=True))
    model_b.load_state_dict(saved[0], strict=True)
    sparse_b.load_state_tensors(saved[1])
    model_a.eval(), model_b.eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(model_a(x), model_b(x))
    # the same step from the same random streams lands on the same gates (Adam moments restored)
    for model, sparse in ((model_a, sparse_a), (model_b, sparse_b)):
        for g in sparse.gates.values():
            g.generator = torch.Generator().manual_seed(9)
        _train(model, sparse, 1, torch.Generator().manual_seed(5))
    for pa, pb in zip(sparse_a.gate_params(), sparse_b.gate_params()):
        assert torch.allclose(pa, pb, atol=1e-6)

    # run A enters the fine-tune, checkpoints; run C resumes there
    for g in sparse_a.gates.values():
        g.generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        sparse_a.gates["3"].a_uc[:3] = -10.0
    to_dense(model_a)
    sparse_a2 = method_a.enter(1, model_a, _ctx(cfg, 2))
    _train(model_a, sparse_a2, 1, torch.Generator().manual_seed(6))
    saved = _save(model_a, sparse_a2, method_a)
    torch.manual_seed(7)
    model_c = _net()
    method_c = create_method("anp-vs", split=TWO_PHASES)
    method_c.phases(cfg)
    method_c.load_state_tensors(saved[2])
    to_dense(model_c)  # the trainer folds before every phase after the first (a no-op on a fresh model)
    sparse_c = method_c.enter(1, model_c, _ctx(cfg, 2, resuming=True))
    model_c.load_state_dict(saved[0], strict=True)
    sparse_c.load_state_tensors(saved[1])
    da, dc = dense_state_dict(model_a), dense_state_dict(model_c)
    assert da.keys() == dc.keys() and all(torch.equal(da[k], dc[k]) for k in da)
    assert method_c.config()["unit_sparsity_per_layer"] == method_a.config()["unit_sparsity_per_layer"]
    assert method_c.config()["finished_with_global_magnitude"] is True
    assert method_c.config()["n_train"] == 64
    assert float(dc["3.weight"][:3].abs().sum()) == 0
    assert int(sparse_c.active_count()) == int(sparse_a2.active_count()) <= budget_of(model_c, cfg.sparsity)[0]
    assert len(sparse_layers(model_c)) == len(sparsifiable_layers(model_c))

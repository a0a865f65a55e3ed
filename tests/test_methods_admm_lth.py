"""ADMM (Ye et al. 2019) and lottery tickets with rewinding (Frankle et al.): the rules each method rests on.

The phases are driven by a small loop that does what the trainer does: to_dense between phases,
method.enter(i, ...), a fresh SGD per phase, loss + sparse.extra_loss(), optimizer step, sparse.step().
"""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.config import TrainConfig
from rsp.methods import PhaseContext, budget_of, create_method
from rsp.methods.admm import ADMMPenalty, layer_keeps, project
from rsp.methods.lth import keep_schedule
from rsp.models import create_model
from rsp.sparse import FixedMask, dense_state_dict, sparsifiable_layers, sparse_layers, to_dense


def _tiny():
    # conv -> BN -> conv -> linear on 8x8: BN buffers make rewinding cover more than the weights
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def _cfg(**kw):
    return dataclasses.replace(TrainConfig(), **{"sparsity": 0.9, "lr": 0.05, **kw})


def _ctx(cfg, steps, resuming=False):
    return PhaseContext(cfg=cfg, model_name="tiny", generator=torch.Generator().manual_seed(0),
                        device=torch.device("cpu"), resuming=resuming, steps=steps, log=lambda _: None)


def _nnz(model):
    state = dense_state_dict(model)
    return sum(int(torch.count_nonzero(state[f"{n}.weight"])) for n, _ in sparsifiable_layers(model))


def _train(model, sparse, steps, lr, gen):
    """The trainer's step: natural objective on random data, + extra_loss, SGD, then sparse.step."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(steps):
        x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loss = F.cross_entropy(model(x), y)
        extra = sparse.extra_loss() if sparse is not None else None
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sparse is not None:
            sparse.step(lr, 1.0)


def _drive(method, model, cfg, steps, on_enter=None, on_exit=None, start=0, stop=None):
    """Run phases start..stop-1 as the trainer would; steps: per phase. Returns the last SparseMethod."""
    gen = torch.Generator().manual_seed(1)
    phases = method.phases(cfg)
    sparse = None
    for i in range(start, len(phases) if stop is None else stop):
        if i > 0:
            to_dense(model)
        sparse = method.enter(i, model, _ctx(cfg, steps))
        if on_enter:
            on_enter(i, sparse)
        _train(model, sparse, steps, phases[i].lr or cfg.lr, gen)
        if on_exit:
            on_exit(i, sparse)
    return sparse


# --- ADMM ----------------------------------------------------------------------------------------


def test_projection_keeps_exactly_the_top_entries_of_each_layer():
    torch.manual_seed(0)
    v = torch.randn(6, 5, 3, 3)
    for k in (0, 1, 17, 270):
        z = project(v, k)
        assert int(torch.count_nonzero(z)) == k
        kept = z != 0
        assert torch.equal(z[kept], v[kept])  # survivors keep their values
        if 0 < k < v.numel():
            assert v[kept].abs().min() > v[~kept].abs().max()  # and they are the largest |v|

    model = _tiny()
    keeps = layer_keeps(model, 0.9)
    assert keeps == {n: math.floor(0.1 * m.weight.numel() + 1e-9) for n, m in sparsifiable_layers(model)}
    assert sum(keeps.values()) <= budget_of(model, 0.9)[0]
    admm = ADMMPenalty(model, keeps, rho=1e-3, rho_growth=1.3, period=1, max_updates=9)
    for n, m in admm.layers:
        u = torch.randn_like(m.weight)
        admm.u[n] = u.clone()
    u_before = {n: u.clone() for n, u in admm.u.items()}
    admm.update()
    for n, m in admm.layers:
        target = m.weight.detach() + u_before[n]
        z = admm.z[n]
        assert int(torch.count_nonzero(z)) == keeps[n]
        kept = z != 0
        assert torch.equal(z[kept], target[kept])
        assert target[kept].abs().min() > target[~kept].abs().max()


def test_dual_update_and_rho_growth_every_period():
    torch.manual_seed(0)
    model = _tiny()
    keeps = layer_keeps(model, 0.8)
    admm = ADMMPenalty(model, keeps, rho=1e-3, rho_growth=1.3, period=3, max_updates=2)
    # initialisation as their admm_initialization: Z = Proj(W), U = 0
    for n, m in admm.layers:
        assert torch.equal(admm.z[n], project(m.weight.detach(), keeps[n]))
        assert not admm.u[n].any()
    rhos, gen = [], torch.Generator().manual_seed(0)
    for step in range(1, 11):
        with torch.no_grad():  # stand-in for an optimizer step: W moves
            for _, m in admm.layers:
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * 0.1)
        u_old = {n: u.clone() for n, u in admm.u.items()}
        admm.step(0.1, 1.0)
        if step in (3, 6):  # every period, at most max_updates times
            for n, m in admm.layers:
                assert torch.equal(admm.z[n], project(m.weight.detach() + u_old[n], keeps[n]))
                assert torch.equal(admm.u[n], u_old[n] + m.weight.detach() - admm.z[n])
        else:
            for n in admm.u:
                assert torch.equal(admm.u[n], u_old[n])
        rhos.append(admm.rho)
    assert admm.updates == 2
    assert rhos == pytest.approx([1e-3] * 2 + [1.3e-3] * 3 + [1e-3 * 1.3**2] * 5)


def test_extra_loss_is_the_penalty_and_pulls_w_towards_z():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]))
    model = nn.Sequential(lin)
    admm = ADMMPenalty(model, {"0": 2}, rho=0.5, rho_growth=1.3, period=100, max_updates=0)
    assert torch.equal(admm.z["0"], torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, 0.0]]))
    admm.u["0"] = torch.tensor([[0.1, 0.0, -0.1], [0.0, 0.2, 0.0]])
    expected = 0.5 / 2 * ((lin.weight - admm.z["0"] + admm.u["0"]) ** 2).sum()
    # by hand: W - Z + U = [[1.1, 0, 0.4], [0, 0.2, -1]] -> squares 1.21 + 0.16 + 0.04 + 1 = 2.41
    assert admm.extra_loss().item() == pytest.approx(0.25 * 2.41)
    assert torch.allclose(admm.extra_loss(), expected)
    # gradient descent on the penalty alone: W -> Z - U, so ||W - Z|| shrinks to ||U||
    admm.u["0"].zero_()
    opt = torch.optim.SGD(admm.weight_params(), lr=0.5)
    gaps = []
    for _ in range(20):
        opt.zero_grad()
        admm.extra_loss().backward()
        assert torch.allclose(lin.weight.grad, 0.5 * (lin.weight - admm.z["0"]))  # rho (W - Z + U)
        opt.step()
        gaps.append(float((lin.weight.detach() - admm.z["0"]).norm()))
    assert all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-2


@pytest.mark.parametrize("prune_to", ["weights", "z"])
def test_admm_phases_end_at_the_budget_on_the_projected_support(prune_to):
    torch.manual_seed(0)
    model, cfg = _tiny(), _cfg(sparsity=0.9)
    method = create_method("admm", periods=4, prune_to=prune_to)
    phases = method.phases(cfg)
    assert [p.name for p in phases] == ["pretrain", "admm", "retrain"]
    assert [p.at_budget for p in phases] == [False, False, True]
    assert [p.lr for p in phases] == [None, pytest.approx(0.005), pytest.approx(0.005)]
    seen = {}

    def on_exit(i, sparse):
        if i == 1:
            assert sparse.updates == 3 and sparse.period == 3  # 12 steps // 4 periods; 3 updates
            assert sparse.rho == pytest.approx(1e-3 * 1.3**3)
            seen["z"] = {n: z.clone() for n, z in sparse.z.items()}
            seen["w"] = {n: m.weight.detach().clone() for n, m in sparse.layers}

    sparse = _drive(method, model, cfg, steps=12, on_exit=on_exit)
    keeps = layer_keeps(model, 0.9)
    assert isinstance(sparse, FixedMask) and sparse.name == "admm"
    assert _nnz(model) <= budget_of(model, 0.9)[0]
    for n, m in sparse_layers(model):
        want = (seen["z"][n] != 0) if prune_to == "z" else project(seen["w"][n], keeps[n]) != 0
        assert torch.equal(m.mask.bool(), want)
        assert int(m.mask.sum()) == keeps[n]
        assert not m.effective_weight()[~want].any()


def test_admm_ratios_per_layer_and_over_budget():
    model = _tiny()
    names = [n for n, _ in sparsifiable_layers(model)]
    keeps = layer_keeps(model, 0.9, {f"{names[0]}.weight": 0.5, names[1]: 0.95})  # their key style works too
    sizes = {n: m.weight.numel() for n, m in sparsifiable_layers(model)}
    assert keeps[names[0]] == sizes[names[0]] // 2
    assert keeps[names[1]] == math.floor(0.05 * sizes[names[1]])
    assert keeps[names[2]] == math.floor(0.1 * sizes[names[2]] + 1e-9)
    with pytest.raises(ValueError, match="over the budget"):
        layer_keeps(model, 0.9, {names[1]: 0.0})
    with pytest.raises(ValueError, match="unknown layers"):
        layer_keeps(model, 0.9, {"nope": 0.5})
    with pytest.raises(ValueError):
        create_method("admm", bogus=1)


def test_admm_state_survives_resume():
    torch.manual_seed(0)
    model, cfg = _tiny(), _cfg(sparsity=0.8)
    method = create_method("admm", periods=5)
    sparse = _drive(method, model, cfg, steps=7, stop=2)  # pretrain, admm (period 1: 4 updates)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved = {k: v.clone() for k, v in sparse.state_tensors().items()}

    torch.manual_seed(123)
    model2, method2 = _tiny(), create_method("admm", periods=5)
    method2.load_state_tensors(method.state_tensors())
    sparse2 = method2.enter(1, model2, _ctx(cfg, steps=99, resuming=True))  # --max-steps may differ on resume
    model2.load_state_dict(saved_model, strict=True)
    sparse2.load_state_tensors(saved)
    assert (sparse2.rho, sparse2.steps, sparse2.updates, sparse2.period) == (sparse.rho, sparse.steps, sparse.updates, 1)
    for n in sparse.z:
        assert torch.equal(sparse2.z[n], sparse.z[n]) and torch.equal(sparse2.u[n], sparse.u[n])
    assert torch.equal(sparse2.extra_loss(), sparse.extra_loss())

    # resuming inside the retraining phase: the masked model loads strictly, masks and budget come back
    to_dense(model)
    sparse = method.enter(2, model, _ctx(cfg, steps=3))
    _train(model, sparse, 3, 0.01, torch.Generator().manual_seed(5))
    model3, method3 = _tiny(), create_method("admm", periods=5)
    method3.load_state_tensors(method.state_tensors())
    to_dense(model3)
    sparse3 = method3.enter(2, model3, _ctx(cfg, steps=3, resuming=True))
    model3.load_state_dict(model.state_dict(), strict=True)
    sparse3.load_state_tensors(sparse.state_tensors())
    assert sparse3.budget == sparse.budget
    assert torch.equal(dense_state_dict(model3)["3.weight"], dense_state_dict(model)["3.weight"])


# --- lottery tickets ------------------------------------------------------------------------------


def test_keep_schedule_and_phases():
    n, cfg = 10_000, _cfg(sparsity=0.99)
    k = round(0.01 * n)
    keeps = keep_schedule(n, k, 3)
    q = 0.01 ** (1 / 3)
    assert keeps == [n, round(n * q), round(n * q * q), k]
    assert all(a >= b for a, b in zip(keeps, keeps[1:]))
    assert keep_schedule(n, round(0.2 * n), 1) == [n, round(0.2 * n)]
    method = create_method("lth", rounds=3, rewind_fraction=0.1)
    phases = method.phases(cfg)
    assert [p.name for p in phases] == ["warmup", "round-0", "round-1", "round-2", "round-3"]
    assert [p.at_budget for p in phases] == [False, False, False, False, True]
    assert [p.fraction for p in phases] == pytest.approx([0.1, 0.9, 0.9, 0.9, 0.9])
    assert [p.name for p in create_method("lth", rounds=2, rewind_fraction=0.0).phases(cfg)] == \
        ["round-0", "round-1", "round-2"]
    with pytest.raises(ValueError):
        create_method("lth", rounds=0)


@pytest.mark.parametrize("rewind_fraction", [0.1, 0.0])
def test_lth_rounds_rewind_prune_and_nest(rewind_fraction):
    torch.manual_seed(0)
    model, cfg = _tiny(), _cfg(sparsity=0.95)
    method = create_method("lth", rounds=3, rewind_fraction=rewind_fraction)
    warm = int(rewind_fraction > 0)
    keep, total = budget_of(model, 0.95)
    keeps = keep_schedule(total, keep, 3)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trail = {"masks": [], "end": None}

    def on_exit(i, sparse):
        trail["end"] = {k: v.clone() for k, v in dense_state_dict(model).items()}

    def on_enter(i, sparse):
        r = i - warm
        if r < 0:
            assert sparse is None
            return
        if r == 0:  # the rewind point: the weights at the end of warmup (the initialisation without warmup)
            assert sparse is None
            ref = trail["end"] if warm else init
            assert set(method.rewind) == set(ref)
            assert all(torch.equal(method.rewind[k], ref[k]) for k in ref)
            if warm:
                assert not torch.equal(method.rewind["0.weight"], init["0.weight"])  # warmup did train
            return
        masks = {n: m.mask.bool().clone() for n, m in sparse_layers(model)}
        assert sum(int(v.sum()) for v in masks.values()) == keeps[r]
        # pruned by magnitude of the weights trained in the last round (one global threshold)...
        kept = torch.cat([trail["end"][f"{n}.weight"][masks[n]].abs() for n in masks])
        gone = torch.cat([trail["end"][f"{n}.weight"][~masks[n]].abs() for n in masks])
        assert kept.min() >= gone.max()
        # ...then rewound: survivors equal the rewind weights exactly, pruned weights are zero
        for n, m in sparse_layers(model):
            w = m.effective_weight().detach()
            assert torch.equal(w[masks[n]], method.rewind[f"{n}.weight"][masks[n]])
            assert not w[~masks[n]].any()
        for key in ("1.running_mean", "1.running_var", "1.weight", "1.bias", "0.bias", "7.bias"):
            assert torch.equal(model.state_dict()[key], method.rewind[key])
        if trail["masks"]:  # nested: this round's mask lies within the last one
            assert all(not (masks[n] & ~trail["masks"][-1][n]).any() for n in masks)
        trail["masks"].append(masks)

    _drive(method, model, cfg, steps=6, on_enter=on_enter, on_exit=on_exit)
    assert len(trail["masks"]) == 3
    assert _nnz(model) == keep  # the last round lands exactly on the budget


def test_lth_resume_rebuilds_the_same_model():
    torch.manual_seed(0)
    model, cfg = _tiny(), _cfg(sparsity=0.9)
    method = create_method("lth", rounds=2, rewind_fraction=0.2)
    sparse = _drive(method, model, cfg, steps=4, stop=3)  # warmup, round-0, round-1 (masked)
    ckpt_model = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt_sparse = {k: v.clone() for k, v in sparse.state_tensors().items()}
    ckpt_method = {k: v.clone() for k, v in method.state_tensors().items()}
    assert ckpt_method and all(k.startswith("rewind.") for k in ckpt_method)

    # a fresh process: method state first, then enter(resuming=True), then model (strict) and sparse state
    torch.manual_seed(99)
    model2, method2 = _tiny(), create_method("lth", rounds=2, rewind_fraction=0.2)
    method2.load_state_tensors(ckpt_method)
    sparse2 = method2.enter(2, model2, _ctx(cfg, steps=4, resuming=True))
    model2.load_state_dict(ckpt_model, strict=True)
    sparse2.load_state_tensors(ckpt_sparse)
    x = torch.rand(4, 1, 8, 8)
    model.eval(), model2.eval()
    assert torch.equal(model(x), model2(x))
    assert sparse2.budget == sparse.budget

    # both continue into the last round identically: prune the same weights, rewind to the same point
    for mdl, meth in ((model, method), (model2, method2)):
        to_dense(mdl)
        meth.enter(3, mdl, _ctx(cfg, steps=4))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert _nnz(model2) == budget_of(model2, 0.9)[0]


def test_lth_rewind_round_zero_resume_and_registry_model():
    # round 0 resumed: the rewind point must come from the checkpoint; a registry model works end to end
    cfg = _cfg(sparsity=0.9)
    method = create_method("lth", rounds=1, rewind_fraction=0.5)
    with pytest.raises(RuntimeError, match="rewind point"):
        method.enter(1, _tiny(), _ctx(cfg, steps=1, resuming=True))
    torch.manual_seed(0)
    model = create_model("small-cnn", num_classes=10, in_channels=1, mean=[0.5], std=[0.5])
    _drive(method, model, cfg, steps=2)
    assert _nnz(model) == budget_of(model, 0.9)[0]


def test_lth_reinit_control_keeps_the_masks_and_redraws_the_survivors():
    # the lottery-ticket control: the same rounds and budget, but survivors restart from fresh random weights
    # (the model's init distribution), while BatchNorm and biases still rewind
    torch.manual_seed(0)
    model, cfg = _tiny(), _cfg(sparsity=0.95)
    method = create_method("lth-reinit", rounds=2, rewind_fraction=0.1)
    assert method.config()["reinit"] == "random" and method.name == "lth-reinit"
    keep, total = budget_of(model, 0.95)
    seen = []

    def on_enter(i, sparse):
        if sparse is None:
            return
        for n, m in sparse_layers(model):
            mask = m.mask.bool()
            w = m.effective_weight().detach()
            assert not w[~mask].any()
            assert not torch.equal(w[mask], method.rewind[f"{n}.weight"][mask])  # not rewound
            std = w[mask].std() if mask.sum() > 1 else None
            seen.append((n, std))
        for key in ("1.running_mean", "1.weight", "1.bias"):
            assert torch.equal(model.state_dict()[key], method.rewind[key])

    _drive(method, model, cfg, steps=4, on_enter=on_enter)
    assert seen and _nnz(model) == keep
    with pytest.raises(ValueError):
        create_method("lth", reinit="shuffle")

"""HYDRA and edge-popup (rsp.methods.hydra / edge_popup): the score parametrisation's rules, and the phases
driven by a small loop that does what the trainer does (to_dense between phases, enter, SGD on every
trainable parameter, decoupled decay on decayed_params)."""

import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.attacks import PGDConfig
from rsp.config import TrainConfig
from rsp.methods import PhaseContext, budget_of, create_method
from rsp.methods.edge_popup import EdgePopup
from rsp.methods.hydra import Hydra, ScoreMask, layer_keep, scaled_score_init
from rsp.models import create_model
from rsp.objectives import Objective
from rsp.sparse import FixedMask, dense_state_dict, sparsifiable_layers, to_dense, topk_mask


def _tiny():
    return create_model("small-cnn", num_classes=10, in_channels=1, mean=[0.5], std=[0.5], channels=[4, 8])


def _uneven():
    # 9 to 2048 weights per layer: floors and the ">= 1" rule must hold on very different sizes
    return nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 32, 1), nn.ReLU(),
                         nn.Conv2d(32, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _ctx(sparsity=0.9, resuming=False, seed=1):
    return PhaseContext(cfg=TrainConfig(sparsity=sparsity), model_name="small-cnn",
                        generator=torch.Generator().manual_seed(seed), device=torch.device("cpu"),
                        resuming=resuming, log=lambda _: None)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)) for _ in range(n)]


OBJECTIVE = Objective("pgd-at", PGDConfig(eps=0.1, step_size=0.05, steps=2))


def _train(model, sparse, steps, lr, weight_decay=5e-4, seed=0):
    """The trainer's step: robust loss, backward, SGD(momentum) over requires_grad params, decoupled decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    decayed = sparse.decayed_params() if sparse else [m.weight for _, m in sparsifiable_layers(model)]
    gen = torch.Generator().manual_seed(seed + 99)
    model.train()
    for x, y in _batches(steps, seed):
        opt.zero_grad(set_to_none=True)
        loss, _ = OBJECTIVE(model, x, y, gen)
        extra = sparse.extra_loss() if sparse else None
        (loss if extra is None else loss + extra).backward()
        with torch.no_grad():
            torch._foreach_mul_(decayed, 1.0 - weight_decay)
        opt.step()
        if sparse:
            sparse.step(lr, 1.0)
    return model


def _nnz(model):
    state = dense_state_dict(model)
    return {n: int(torch.count_nonzero(state[f"{n}.weight"])) for n, _ in sparsifiable_layers(model)}


# --- the top-k rule ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [_tiny, _uneven])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95, 0.99])
def test_topk_exact_k_per_layer_and_total_within_budget(make, sparsity):
    torch.manual_seed(0)
    model = make()
    sizes = {n: m.weight.numel() for n, m in sparsifiable_layers(model)}
    budget, _ = budget_of(model, sparsity)
    sparse = EdgePopup().enter(0, model, _ctx(sparsity))
    want = {n: max(1, math.floor(round((1 - sparsity) * s, 6))) for n, s in sizes.items()}
    exact = sum(want.values()) <= budget  # else the ">= 1" overshoot is taken from the largest layer
    for name, m in sparse.layers:
        assert int(m.active_mask().sum()) == m.k
        assert m.k == want[name] if exact else 1 <= m.k <= want[name]
    assert sparse.budget == int(sparse.active_count()) <= budget
    # the saved plain weights hold exactly k_l non-zeros per layer (random weights are never exactly 0)
    assert _nnz(model) == {n: m.k for n, m in sparse.layers}


def test_layer_keep_floors_and_keeps_one_per_layer():
    assert layer_keep([100, 27, 9], 0.9) == [10, 2, 1]  # (1 - 0.9) * 100 is 9.999...: still 10
    keep = layer_keep([9] * 5 + [10000], 0.999)  # five tiny layers keep 1 each; the big one pays for them
    assert keep[:5] == [1] * 5 and sum(keep) <= round(0.001 * 10045)
    with pytest.raises(ValueError, match="at least one per layer"):
        layer_keep([9] * 20, 0.99)


def test_straight_through_gradient_is_the_mask_gradient():
    """d loss / d score == d loss / d mask == (d loss / d w_eff) * weight, computed by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    model = nn.Sequential(conv)
    sparse = ScoreMask(model, 0.7, init=lambda _, m: torch.rand_like(m.weight))
    x, target = torch.randn(4, 3, 6, 6), torch.randn(4, 5, 6, 6)
    F.mse_loss(model(x), target).backward()

    mask = topk_mask(conv.score.detach(), conv.k)
    w_eff = (weight * mask).requires_grad_(True)
    F.mse_loss(F.conv2d(x, w_eff, bias, padding=1), target).backward()
    assert torch.allclose(conv.score.grad, w_eff.grad * weight, atol=1e-7)
    # pruned positions get a gradient too (that is what lets a score climb back into the top-k)
    assert conv.score.grad[mask == 0].abs().sum() > 0
    assert conv.weight.grad is None and not conv.weight.requires_grad and sparse.weight_params() == [conv.score]


# --- HYDRA ---------------------------------------------------------------------------------------


def test_hydra_scaled_score_init_is_layerwise_magnitude_pruning():
    torch.manual_seed(0)
    model = _tiny()
    weights = {n: m.weight.detach().clone() for n, m in sparsifiable_layers(model)}
    sparse = Hydra().enter(1, model, _ctx(0.8))
    for name, m in sparse.layers:
        w = weights[name]
        fan_in = w[0].numel()  # in_channels * kh * kw, or in_features
        expected = math.sqrt(6.0 / fan_in) * w / w.abs().max()
        assert torch.allclose(scaled_score_init(w), expected)
        assert torch.equal(m.score.detach(), expected)
        assert torch.equal(m.active_mask(), topk_mask(w.abs(), m.k).bool())  # starts from magnitude pruning


@pytest.mark.parametrize("method", ["hydra", "edge-popup"])
def test_score_phase_trains_scores_never_weights(method):
    torch.manual_seed(0)
    model = _tiny()
    m = create_method(method)
    index = 1 if method == "hydra" else 0
    sparse = m.enter(index, model, _ctx(0.8))
    layer_state = {k: v.clone() for n, l in sparse.layers for k, v in
                   ((f"{n}.weight", l.weight), (f"{n}.bias", l.bias), (f"{n}.score", l.score)) if v is not None}
    bn = {n: (b.weight.detach().clone(), b.bias.detach().clone()) for n, b in model.named_modules()
          if isinstance(b, nn.BatchNorm2d)}
    masks0 = {n: l.active_mask().clone() for n, l in sparse.layers}
    _train(model, sparse, 4, lr=0.5)
    for n, l in sparse.layers:
        assert torch.equal(l.weight, layer_state[f"{n}.weight"])
        if l.bias is not None:
            assert torch.equal(l.bias, layer_state[f"{n}.bias"])
        assert not torch.equal(l.score, layer_state[f"{n}.score"])
        assert int(l.active_mask().sum()) == l.k
    assert any(not torch.equal(l.active_mask(), masks0[n]) for n, l in sparse.layers)  # the search moves the mask
    bn_moved = any(not torch.equal(b.weight, bn[n][0]) for n, b in model.named_modules() if n in bn)
    assert bn_moved == (method == "hydra")  # HYDRA trains BatchNorm with the scores; edge-popup's BN is fixed


def test_hydra_three_phases_end_within_budget_and_finetune_keeps_the_mask():
    torch.manual_seed(0)
    model, method, ctx = _tiny(), create_method("hydra", split=[2, 1, 2]), _ctx(0.85)
    phases = method.phases(ctx.cfg)
    assert [p.name for p in phases] == ["pretrain", "scores", "finetune"]
    assert [p.at_budget for p in phases] == [False, True, True]
    assert [p.fraction for p in phases] == pytest.approx([0.4, 0.2, 0.4])
    # the paper's 0.1 / 0.1 / 0.01 at --lr 0.1; they follow --lr in those ratios, a number overrides one
    assert [p.lr for p in phases] == pytest.approx([ctx.cfg.lr, ctx.cfg.lr, 0.1 * ctx.cfg.lr])
    half = dataclasses.replace(ctx.cfg, lr=0.05)
    assert [p.lr for p in method.phases(half)] == pytest.approx([0.05, 0.05, 0.005])
    assert [p.lr for p in create_method("hydra", finetune_lr=0.02).phases(half)] == pytest.approx([0.05, 0.05, 0.02])
    assert method.config()["fractions"] == pytest.approx({"pretrain": 0.4, "scores": 0.2, "finetune": 0.4})
    budget, total = budget_of(model, 0.85)
    search_masks = {}  # filled by the score phase (i == 1), read by the fine-tune (i == 2)
    for i, phase in enumerate(phases):
        if i:
            to_dense(model)
        sparse = method.enter(i, model, ctx)
        if i == 0:
            assert sparse is None
        if i == 2:
            assert isinstance(sparse, FixedMask) and all(p.requires_grad for p in model.parameters())
            for n, l in sparse.layers:
                assert torch.equal(l.mask.bool(), search_masks[n])
            before = {n: l.weight.detach().clone() for n, l in sparse.layers}
        _train(model, sparse, 3, lr=phase.lr or 0.1, seed=i)
        if i == 1:
            search_masks = {n: l.active_mask().clone() for n, l in sparse.layers}
    for n, l in sparse.layers:  # fine-tuning moved the surviving weights only
        assert torch.equal(l.mask.bool(), search_masks[n])
        assert not torch.equal(l.weight, before[n])
        assert torch.all(l.effective_weight()[~search_masks[n]] == 0)
    nnz = _nnz(model)
    assert sum(nnz.values()) <= budget and sparse.total == total
    assert nnz == {n: int(search_masks[n].sum()) for n in nnz}


# --- edge-popup ----------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_init", ["kaiming-normal", "signed-constant"])
def test_edge_popup_weights_are_the_initial_random_draw(weight_init):
    torch.manual_seed(0)
    model = _tiny()
    sparse = create_method("edge-popup", weight_init=weight_init).enter(0, model, _ctx(0.7))
    moving = (".score", "running_mean", "running_var", "num_batches_tracked")  # what training may change
    drawn = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(moving)}
    for _, l in sparse.layers:
        std = math.sqrt(2.0 / l.weight[0].numel())
        if weight_init == "signed-constant":
            assert torch.allclose(l.weight.abs(), torch.full_like(l.weight, std))
        else:
            assert abs(l.weight.std().item() / std - 1) < 0.5
        bound = 1.0 / math.sqrt(l.weight[0].numel())  # kaiming_uniform(a=sqrt(5)), stored as |.|
        assert l.score.abs().max() <= bound and l.score.min() < 0  # raw draw; the mask ranks |score|
        if l.bias is not None:
            assert torch.all(l.bias == 0)
    for b in model.modules():
        if isinstance(b, nn.BatchNorm2d):
            assert torch.all(b.weight == 1) and torch.all(b.bias == 0)
    assert [p for p in model.parameters() if p.requires_grad] == sparse.weight_params()
    _train(model, sparse, 4, lr=0.5)
    after = model.state_dict()
    for k, v in drawn.items():
        assert torch.equal(after[k], v), k  # weights, biases and BN affine never move


def test_edge_popup_draw_is_reproducible_from_the_generator():
    a, b = _tiny(), _tiny()
    EdgePopup().enter(0, a, _ctx(0.9, seed=5))
    EdgePopup().enter(0, b, _ctx(0.9, seed=5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- resume --------------------------------------------------------------------------------------


def _trained_until(method_name, phase, sparsity=0.8):
    torch.manual_seed(0)
    model, method, ctx = _tiny(), create_method(method_name), _ctx(sparsity)
    for i in range(phase + 1):
        if i:
            to_dense(model)
        sparse = method.enter(i, model, ctx)
        _train(model, sparse, 2, lr=0.1, seed=i)
    return model, method, sparse


@pytest.mark.parametrize("method_name,phase", [("hydra", 1), ("hydra", 2), ("edge-popup", 0)])
def test_resume_rebuilds_a_model_that_loads_the_checkpoint_strictly(method_name, phase):
    model, method, sparse = _trained_until(method_name, phase)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sparse_state = sparse.state_tensors()

    torch.manual_seed(123)  # a fresh process: other initial weights
    fresh, fresh_method = _tiny(), create_method(method_name)
    ctx = _ctx(0.8, resuming=True, seed=77)
    gen_before = ctx.generator.get_state()
    rebuilt = fresh_method.enter(phase, fresh, ctx)
    assert torch.equal(ctx.generator.get_state(), gen_before)  # the checkpointed stream is not consumed
    fresh.load_state_dict(saved, strict=True)
    rebuilt.load_state_tensors(sparse_state)
    assert {k: v.requires_grad for k, v in fresh.named_parameters()} == \
           {k: v.requires_grad for k, v in model.named_parameters()}
    dense_a, dense_b = dense_state_dict(model), dense_state_dict(fresh)
    assert dense_a.keys() == dense_b.keys() and all(torch.equal(dense_a[k], dense_b[k]) for k in dense_a)
    if method_name == "hydra" and phase == 1:
        # the next phase's mask comes from the loaded scores
        to_dense(model), to_dense(fresh)
        ma = method.enter(2, model, _ctx(0.8))
        mb = fresh_method.enter(2, fresh, _ctx(0.8))
        assert all(torch.equal(a.mask, b.mask) for (_, a), (_, b) in zip(ma.layers, mb.layers))


def test_options_are_checked_and_recorded():
    with pytest.raises(ValueError, match="split"):
        create_method("hydra", split=[1, 2])
    with pytest.raises(ValueError, match="schedule"):
        create_method("hydra", score_schedule="linear")
    with pytest.raises(ValueError, match="weight_init"):
        create_method("edge-popup", weight_init="xavier")
    with pytest.raises(ValueError, match="bad method_options"):
        create_method("edge-popup", rho=1.0)
    cfg = Hydra().config()
    assert cfg["split"] == [100, 20, 100] and cfg["lr"] == {"pretrain": "--lr", "scores": "--lr", "finetune": "0.1 x --lr"}
    ep = EdgePopup(weight_init="signed-constant").config()
    assert ep["weight_init"].startswith("signed-constant") and "frozen" in ep["batchnorm"]

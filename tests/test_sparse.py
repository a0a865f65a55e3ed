"""Bayesian connectivity sampling and the fixed-mask baseline: the invariants training relies on."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.models import create_model
from rsp.sparse import (BayesianRewiring, FixedMask, allocate_budget, dense_state_dict, initial_densities, make_sparse,
                        sparse_layers)


def _uneven_net():
    # layer sizes from 27 to 65536 weights: the budget must hold across very different sizes
    return nn.Sequential(nn.Conv2d(3, 1, 3, padding=1), nn.ReLU(), nn.Conv2d(1, 256, 1), nn.ReLU(),
                         nn.Conv2d(256, 256, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))


MODELS = {
    "uneven": _uneven_net,
    "small-cnn": lambda: create_model("small-cnn", in_channels=3),
    "resnet18-tiny": lambda: create_model("resnet18", width=4),
    "vgg16-tiny": lambda: create_model("vgg16", width=0.0625),
}


def _train_steps(model, sparse, steps, lr=0.5, check=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.rand(8, 3, 32, 32, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        sparse.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if check is not None:
            check("grad", step)
        sparse.step(lr, 1.0)
        if check is not None:
            check("step", step)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["bcs", "fixed"])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_active_count_equals_budget_after_every_step(name, method, sparsity):
    torch.manual_seed(0)
    model = MODELS[name]()
    sparse = make_sparse(method, model, sparsity, torch.Generator().manual_seed(1), model_name=name)
    assert sparse.budget == round((1 - sparsity) * sparse.total)
    counts = []
    _train_steps(model, sparse, 12, check=lambda when, _: when == "step" and counts.append(int(sparse.active_count())))
    assert counts == [sparse.budget] * 12
    # the saved (plain) weights hold exactly K non-zeros
    state = dense_state_dict(model)
    nnz = sum(int(torch.count_nonzero(state[f"{n}.weight"])) for n, _ in sparse_layers(model))
    assert nnz == sparse.budget


def test_connections_die_and_are_reborn_and_signs_never_change():
    torch.manual_seed(0)
    model = _uneven_net()
    sparse = BayesianRewiring(model, 0.9, torch.Generator().manual_seed(0), weight_decay=5e-4)
    sign0 = sparse.sign.clone()
    active0 = sparse.theta > 0
    seen_rewire = []

    def check(when, step):
        if when == "step":
            assert torch.equal(sparse.sign, sign0)
            assert int((sparse.theta > 0).sum()) == sparse.budget
            seen_rewire.append(int(((sparse.theta > 0) & ~active0).sum()))

    _train_steps(model, sparse, 40, lr=1.0, check=check)
    assert seen_rewire[-1] > 0, "no connection was ever reborn: rewiring is not happening"
    # effective weights carry the fixed sign wherever active
    w = torch.cat([m.effective_weight().reshape(-1) for _, m in sparse.layers])
    on = w != 0
    assert torch.equal(torch.sign(w[on]), sign0[on])


def test_dormant_positions_get_no_gradient_and_stay_zero():
    torch.manual_seed(0)
    model = _uneven_net()
    sparse = BayesianRewiring(model, 0.95, torch.Generator().manual_seed(0))

    def check(when, _):
        dormant = sparse.theta <= 0
        if when == "grad":
            assert torch.count_nonzero(sparse.grad[dormant]) == 0
            assert sparse.grad.abs().sum() > 0
        else:
            assert torch.all(sparse.theta[dormant] == 0)
            assert torch.all(sparse.buf[sparse.theta[sparse.slots] == 0] == 0)  # momentum reset
            # the slot table is exactly the set of active positions, no position twice
            assert torch.equal(torch.sort(sparse.slots).values, torch.nonzero(sparse.theta > 0).squeeze(1))

    _train_steps(model, sparse, 10, check=check)
    for name, m in sparse.layers:
        w = dense_state_dict(model)[f"{name}.weight"]
        assert torch.all(w[m.theta <= 0] == 0)


def test_second_pass_covers_any_shortfall():
    """With almost no candidates, the fallback pass must still land exactly on the budget."""
    torch.manual_seed(0)
    model = _uneven_net()
    sparse = BayesianRewiring(model, 0.5, torch.Generator().manual_seed(0))
    sparse.n_candidates = 1
    with torch.no_grad():  # kill a third of the active connections at once
        sparse.theta[sparse.slots[: sparse.budget // 3]] = 0
    sparse._rebirth()
    assert int((sparse.theta > 0).sum()) == sparse.budget
    assert torch.equal(torch.sort(sparse.slots).values, torch.nonzero(sparse.theta > 0).squeeze(1))


def test_rewire_every_n_restores_budget_on_rewiring_steps():
    torch.manual_seed(0)
    model = _uneven_net()
    sparse = BayesianRewiring(model, 0.9, torch.Generator().manual_seed(0), rewire_every=3)
    counts = []
    _train_steps(model, sparse, 9, lr=1.0, check=lambda w, s: w == "step" and counts.append(int(sparse.active_count())))
    assert all(c <= sparse.budget for c in counts)
    assert counts[2] == counts[5] == counts[8] == sparse.budget


def test_initial_allocation_is_exact_and_follows_the_vgg16_profile():
    sizes = [1728, 36864, 73728, 147456] + [294912] + [589824] * 2 + [1179648] + [2359296] * 5 + [5120]
    for density in (0.1, 0.01):
        budget = round(density * sum(sizes))
        active = allocate_budget(sizes, budget, initial_densities("vgg16", len(sizes), density),
                                 torch.Generator().manual_seed(0))
        assert int(active.sum()) == budget
        first = int(active[:1728].sum())
        assert first >= round(0.6 * 1728) * (0.9 if density == 0.01 else 1.0)
    # a budget too small for the profile is scaled down, never exceeded
    active = allocate_budget([100, 100], 10, [0.6, 0.6], torch.Generator().manual_seed(0))
    assert int(active.sum()) == 10 and int(active[:100].sum()) == 5


def test_sparse_layers_forward_is_the_math():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(conv)
    sparse = BayesianRewiring(model, 0.5, torch.Generator().manual_seed(0))
    layer = sparse.layers[0][1]
    x = torch.rand(1, 2, 5, 5)
    w = layer.sign * torch.clamp(layer.theta, min=0)
    assert torch.allclose(model(x), F.conv2d(x, w, layer.bias))
    fixed_model = nn.Sequential(nn.Linear(4, 3))
    fm = FixedMask(fixed_model, 0.5, torch.Generator().manual_seed(0))
    lin = fm.layers[0][1]
    x = torch.rand(2, 4)
    assert torch.allclose(fixed_model(x), x @ (lin.weight * lin.mask).T + lin.bias)


def test_bad_sparsity_is_rejected():
    with pytest.raises(ValueError):
        make_sparse("bcs", _uneven_net(), 1.0, torch.Generator())
    with pytest.raises(ValueError):
        make_sparse("bcs", _uneven_net(), -0.1, torch.Generator())


@pytest.mark.parametrize("regrow", ["layer-size", "l2", "l2-magnitude-seeded"])
@pytest.mark.parametrize("name", ["uneven", "resnet18-tiny"])
def test_structured_regrowth_keeps_budget_and_never_doubles_a_position(regrow, name):
    torch.manual_seed(0)
    model = MODELS[name]()
    sparse = BayesianRewiring(model, 0.95, torch.Generator().manual_seed(0), regrow=regrow)

    def check(when, _):
        if when == "step":
            assert int((sparse.theta > 0).sum()) == sparse.budget
            assert torch.unique(sparse.slots).numel() == sparse.budget  # no position twice
            assert torch.equal(torch.sort(sparse.slots).values, torch.nonzero(sparse.theta > 0).squeeze(1))

    _train_steps(model, sparse, 8, lr=1.0, check=check)


def test_nearest_dormant_picks_the_closest_free_position_and_no_position_twice():
    from rsp.sparse import nearest_dormant

    shape = (4, 4, 3, 3)
    size = 4 * 4 * 9
    theta = torch.zeros(size + 1)
    seed = 1 * 36 + 2 * 9 + 1 * 3 + 1  # (1, 2, 1, 1)
    theta[seed] = 1.0
    # occupy every distance-1 neighbour but one: (1, 2, 1, 2)
    free = 1 * 36 + 2 * 9 + 1 * 3 + 2
    for d in [(1, 0, 0, 0), (-1, 0, 0, 0), (0, 1, 0, 0), (0, -1, 0, 0), (0, 0, 1, 0), (0, 0, -1, 0), (0, 0, 0, -1)]:
        o = (1 + d[0]) * 36 + (2 + d[1]) * 9 + (1 + d[2]) * 3 + (1 + d[3])
        theta[o] = 1.0
    out = nearest_dormant(theta, 0, size, shape, torch.tensor([seed, seed, seed]), torch.Generator().manual_seed(0))
    assert out[0] == free or free in out.tolist()
    assert len(set(out.tolist())) == 3  # three seeds at one place: three different positions
    coords = [((p // 36) % 4, (p // 9) % 4, (p // 3) % 3, p % 3) for p in out.tolist()]
    dist2 = sorted(sum((a - b) ** 2 for a, b in zip(c, (1, 2, 1, 1))) for c in coords)
    assert dist2 == [1, 2, 2]  # the one free neighbour, then the nearest diagonal ones
    assert torch.all(theta[out] > 0)


# --- the reference's initialisation (issue 16) ----------------------------------------------------

REFERENCE_PROFILES = {  # model: (kwargs, expected density of a layer by name, p the global density)
    "vgg16": ({"width": 0.25}, None),
    "resnet18": ({"width": 16}, lambda n, i, last, p: 0.6 if i in (0, last) else 0.2 if n.startswith("layer1.") else 0.5 * p),
    "wrn-28-4": ({}, lambda n, i, last, p: 0.6 if i in (0, last) else 0.1 if n.startswith("layer1.") else 0.5 * p),
}


@pytest.mark.parametrize("name", list(REFERENCE_PROFILES))
def test_reference_init_starts_at_the_profile_and_the_first_step_fills_the_budget(name):
    import math

    kwargs, rule = REFERENCE_PROFILES[name]
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, **kwargs)
    sparsity, p = 0.9, 0.1
    sparse = make_sparse("bcs", model, sparsity, torch.Generator().manual_seed(0), model_name=name, init="reference")
    layer_names = [n for n, _ in sparse.layers]
    if name == "vgg16":
        assert len(layer_names) == 16  # conv1..conv13, fc14, fc15, fc16 (the reference's network)
        expected = [0.6, 0.6, 0.2, 0.2] + [0.5 * p] * 11 + [0.6]
    else:
        expected = [rule(n, i, len(layer_names) - 1, p) for i, n in enumerate(layer_names)]
        # shortcut convs take their stage's density, as in the reference
        assert any("shortcut" in n for n in layer_names)
    counts = [int((m.theta > 0).sum()) for _, m in sparse.layers]
    sizes = [m.theta.numel() for _, m in sparse.layers]
    assert counts == [math.floor(d * s) for d, s in zip(expected, sizes)]  # int(p_init * size), per layer
    assert sum(counts) < sparse.budget  # under the budget until the first fill
    # signs are drawn everywhere, theta only where active
    assert all(bool((m.sign.abs() == 1).all()) for _, m in sparse.layers)
    # one step: exactly the budget, no position twice, the newborns at 1e-12
    before = sparse.theta.clone()
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    sparse.step(1e-9, 1.0)  # lr ~0: nothing dies, so every new connection is a fill
    assert int(sparse.active_count()) == sparse.budget
    assert torch.unique(sparse.slots).numel() == sparse.budget
    assert torch.equal(torch.sort(sparse.slots).values, torch.nonzero(sparse.theta > 0).squeeze(1))
    born = (sparse.theta > 0) & (before == 0)
    assert int(born.sum()) == sparse.budget - sum(counts)
    assert torch.all(sparse.theta[born] == 1e-12)


def test_reference_fill_draws_layers_in_proportion_to_size_not_to_dormant_count():
    from rsp.sparse import fill_by_layer_size

    # two layers of equal size, one 90 % full: the reference's draw still sends half to each (while room lasts)
    add = fill_by_layer_size([10000, 10000], [9000, 0], 1800, torch.Generator().manual_seed(0))
    assert sum(add) == 1800 and 800 < add[0] <= 1000
    # overflow of a full layer goes to the others: the total always lands on the request
    add = fill_by_layer_size([10, 1000], [10, 0], 500, torch.Generator().manual_seed(0))
    assert add == [0, 500]


def test_random_method_is_budget_exact_with_the_same_density_in_every_layer():
    torch.manual_seed(0)
    model = _uneven_net()
    sparse = make_sparse("random", model, 0.99, torch.Generator().manual_seed(0))
    counts = [int(m.mask.sum()) for _, m in sparse.layers]
    sizes = [m.mask.numel() for _, m in sparse.layers]
    assert sum(counts) == sparse.budget == round(0.01 * sum(sizes))
    common = sparse.budget / sum(sizes)
    assert all(abs(c - common * s) < 1 for c, s in zip(counts, sizes))  # within one weight of one density
    _train_steps(model, sparse, 2)
    assert int(sparse.active_count()) == sparse.budget


def test_decay_scope_all_decays_batchnorm_and_biases_and_weights_only_does_not():
    from rsp.attacks import PGDConfig
    from rsp.objectives import Objective
    from rsp.train import TrainStep

    def run(scope):
        torch.manual_seed(0)
        model = create_model("small-cnn", in_channels=3)
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        with torch.no_grad():
            bn.weight.fill_(2.0)
        step = TrainStep(model, None, Objective("natural", PGDConfig(steps=0)), lr=0.1, momentum=0.0, weight_decay=0.1,
                         decay_scope=scope)
        decayed = {id(p) for p in step.decayed}
        return model, bn, decayed

    model, bn, decayed = run("all")
    assert id(bn.weight) in decayed and id(bn.bias) in decayed
    biases = [m.bias for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
    assert biases and all(id(b) in decayed for b in biases)
    assert {id(p) for p in model.parameters() if p.requires_grad} == decayed
    model, bn, decayed = run("weights")
    assert id(bn.weight) not in decayed and id(bn.bias) not in decayed


def test_models_without_a_reference_profile_keep_first_and_last_at_least_0_6():
    from rsp.models.profiles import profile_name

    assert initial_densities("small-cnn", ["a", "b", "c", "d"], 0.01) == [0.6, None, None, 0.6]
    assert initial_densities("small-cnn", ["a", "b"], 0.7) == [0.7, 0.7]
    assert profile_name("small-cnn") == "first/last>=0.6" and profile_name("wrn-34-10") == "wrn-reference"
    assert initial_densities("vgg16-1fc", [str(i) for i in range(14)], 0.1) == [0.6, 0.6, 0.2, 0.2] + [0.05] * 9 + [0.6]


def test_reference_init_of_a_model_without_a_reference_profile_is_not_a_dead_network():
    # vgg11 has no reference profile: its interior layers have no fixed share. Started empty they would hold
    # only 1e-12 rebirths and BatchNorm would see nothing (every run of the rewiring study collapsed so);
    # the reference start gives them the reference's bulk density 0.5 p with |He| values instead.
    import math

    torch.manual_seed(0)
    model = create_model("vgg11", num_classes=10, width=0.125)
    sparse = make_sparse("bcs", model, 0.95, torch.Generator().manual_seed(0), model_name="vgg11", init="reference")
    sizes = [m.theta.numel() for _, m in sparse.layers]
    counts = [int((m.theta > 1e-6).sum()) for _, m in sparse.layers]
    assert counts[1:-1] == [math.floor(0.5 * 0.05 * s) for s in sizes[1:-1]]
    assert sum(counts) < sparse.budget
    fixed = make_sparse("fixed", create_model("vgg11", num_classes=10, width=0.125), 0.95,
                        torch.Generator().manual_seed(0), model_name="vgg11", init="reference")
    assert all(int(m.mask.sum()) >= math.floor(0.5 * 0.05 * m.mask.numel()) for _, m in fixed.layers)

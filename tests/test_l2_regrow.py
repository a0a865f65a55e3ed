"""Exact L2 regrowth: every rebirth at a nearest dormant position, checked against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn

import rsp.sparse as sp
from rsp.sparse import REBIRTH_THETA, BayesianRewiring, nearest_dormant

SHAPES = [(3, 4, 3, 3), (5, 7, 1, 1), (2, 3, 5, 5), (1, 1, 9, 7)]


def _coords(flat: torch.Tensor, shape) -> torch.Tensor:
    strides = (shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1)
    return torch.stack([(flat // strides[i]) % shape[i] for i in range(4)], 1)


def _d2(a: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    """Squared Euclidean distances between local flat positions a (n,) and b (m,) in index space: (n, m)."""
    return ((_coords(a, shape)[:, None, :] - _coords(b, shape)[None, :, :]) ** 2).sum(2)


def check_exact(dormant_before: torch.Tensor, shape, seeds: torch.Tensor, out: torch.Tensor,
                keys: torch.Tensor | None = None) -> None:
    """dormant_before: bool (size,) of the layer; seeds, out: local positions, one rebirth per seed.

    With claim keys: each rebirth must be nearest to its seed among the positions dormant before, minus
    those taken with a smaller key (the order in which they were taken). Without: among the positions
    dormant before minus those taken by the other rebirths (a weaker condition, true in any order).
    """
    assert out.numel() == seeds.numel()
    assert len(set(out.tolist())) == out.numel(), "two rebirths at one position"
    assert bool(dormant_before[out].all()), "a rebirth at a position that was not dormant"
    cand = torch.nonzero(dormant_before).squeeze(1)
    d2 = _d2(seeds, cand, shape)  # (n, |cand|)
    mine = _d2(seeds, out, shape).diagonal()
    slot_of = {int(p): j for j, p in enumerate(cand.tolist())}
    taken_col = torch.tensor([slot_of[int(p)] for p in out])
    for i in range(seeds.numel()):
        if keys is None:
            others = torch.ones(out.numel(), dtype=torch.bool)
            others[i] = False
        else:
            others = keys < keys[i]
        avail = torch.ones(cand.numel(), dtype=torch.bool)
        avail[taken_col[others]] = False
        assert bool(avail[taken_col[i]]), f"rebirth {i} at a position another one took first"
        best = int(d2[i][avail].min())
        assert int(mine[i]) == best, f"rebirth {i}: squared distance {int(mine[i])}, nearest dormant {best}"


def _layer(shape, density, gen):
    size = shape[0] * shape[1] * shape[2] * shape[3]
    theta = torch.zeros(size + 1)  # + the spare slot at the end, as in BayesianRewiring
    live = torch.rand(size, generator=gen) < density
    theta[:size][live] = torch.rand(int(live.sum()), generator=gen) + 0.1
    return theta, size


def _run(theta, size, shape, seeds, gen):
    before = theta[:size] == 0
    out, keys = nearest_dormant(theta, 0, size, shape, seeds, gen, return_order=True)
    assert bool((theta[out] == REBIRTH_THETA).all())
    assert int((theta[:size] == 0).sum()) == int(before.sum()) - seeds.numel()  # exactly one per seed
    assert theta[size] == 0  # the spare slot is left clean
    check_exact(before, shape, seeds, out, keys)
    check_exact(before, shape, seeds, out)  # the order-free condition holds too
    return out


@pytest.fixture(params=["default", "bands", "dormant-list", "small-chunks", "dormant-list-small-chunks"])
def search_mode(request, monkeypatch):
    """The two search paths and the chunking, each forced on the same cases."""
    if request.param.startswith("dormant-list"):
        monkeypatch.setattr(sp, "_BRUTE_MIN_BAND", 0)
        monkeypatch.setattr(sp, "_BRUTE_RATIO", 1e9)
    elif request.param == "bands":
        monkeypatch.setattr(sp, "_BRUTE_RATIO", 0.0)
    if request.param.endswith("small-chunks"):
        monkeypatch.setattr(sp, "_PAIRS", 7)
        monkeypatch.setattr(sp, "_BAND_MAX", 5)
        monkeypatch.setattr(sp, "_RANK_CAP", 2)
    sp._band_edge.cache_clear()
    yield request.param
    sp._band_edge.cache_clear()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.7, 0.95])
def test_every_rebirth_is_at_a_nearest_dormant_position(shape, density, search_mode):
    gen = torch.Generator().manual_seed(hash((shape, density)) % 2**31)
    for _ in range(3):
        theta, size = _layer(shape, density, gen)
        live = torch.nonzero(theta[:size] > 0).squeeze(1)
        n_dormant = size - live.numel()
        if live.numel() == 0 or n_dormant == 0:
            continue
        c = int(torch.randint(1, n_dormant + 1, (1,), generator=gen))  # up to every dormant position
        seeds = live[torch.randint(0, live.numel(), (c,), generator=gen)]  # repeats included
        _run(theta, size, shape, seeds, gen)


@pytest.mark.parametrize("shape", SHAPES)
def test_dormant_seeds_and_a_full_take(shape, search_mode):
    """Seeds anywhere (a layer without live connections takes uniform ones): a dormant seed is its own
    nearest position; as many seeds as dormant positions take every one of them."""
    gen = torch.Generator().manual_seed(1)
    theta, size = _layer(shape, 0.5, gen)
    n_dormant = int((theta[:size] == 0).sum())
    seeds = torch.randint(0, size, (n_dormant,), generator=gen)
    out = _run(theta, size, shape, seeds, gen)
    assert int((theta[:size] == 0).sum()) == 0
    assert sorted(out.tolist()) == sorted(set(out.tolist()))


@pytest.mark.parametrize("shape", [(1, 1, 15, 15), (9, 9, 3, 3), (40, 30, 1, 1)])
def test_full_neighbourhood_forces_a_large_radius(shape, search_mode):
    """Everything live except the far corner: seeds at the other corner must reach across the layer."""
    gen = torch.Generator().manual_seed(2)
    size = shape[0] * shape[1] * shape[2] * shape[3]
    theta = torch.zeros(size + 1)
    theta[:size] = 1.0
    co = _coords(torch.arange(size), shape)
    far = (co - torch.tensor(shape) + 1).pow(2).sum(1)  # squared distance to the last corner
    hole = torch.argsort(far.double() + torch.rand(size, generator=gen, dtype=torch.float64))[:6]
    theta[hole] = 0.0
    seeds = torch.tensor([0, 0, 1, 0])  # the first corner, three times, and its neighbour
    out = _run(theta, size, shape, seeds, gen)
    assert set(out.tolist()) <= set(hole.tolist())
    assert int(_d2(seeds[:1], out[:1], shape)) > 8  # beyond the old radius-2 search


def test_almost_full_layer_takes_its_last_dormant_positions(search_mode):
    shape = (5, 7, 1, 1)
    size = 35
    gen = torch.Generator().manual_seed(3)
    theta = torch.ones(size + 1)
    theta[size] = 0.0
    theta[[4, 30]] = 0.0
    out = _run(theta, size, shape, torch.tensor([17, 17]), gen)
    assert sorted(out.tolist()) == [4, 30]
    with pytest.raises(RuntimeError):
        nearest_dormant(theta, 0, size, shape, torch.tensor([0]), gen)  # nothing left


def test_checker_rejects_a_farther_position():
    """The brute-force check can fail: a rebirth one step beyond the nearest free position."""
    shape = (1, 1, 1, 6)
    dormant = torch.tensor([False, False, True, True, True, True])
    seeds = torch.tensor([0])
    check_exact(dormant, shape, seeds, torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(AssertionError):
        check_exact(dormant, shape, seeds, torch.tensor([3]), torch.tensor([0]))
    # two seeds: the second could only take 3 if the first took 2 before it
    seeds = torch.tensor([0, 1])
    check_exact(dormant, shape, seeds, torch.tensor([2, 3]), torch.tensor([0, 1]))
    with pytest.raises(AssertionError):
        check_exact(dormant, shape, seeds, torch.tensor([3, 2]), torch.tensor([0, 1]))


def test_ties_are_broken_at_random():
    shape = (3, 3, 3, 3)
    size = 81
    centre = 40  # (1, 1, 1, 1): eight dormant neighbours at distance 1
    seen = set()
    for s in range(64):
        theta = torch.zeros(size + 1)
        theta[centre] = 1.0
        seen.add(int(nearest_dormant(theta, 0, size, shape, torch.tensor([centre]), torch.Generator().manual_seed(s))))
    assert len(seen) == 8


def test_bands_enumerate_every_offset_once():
    for bounds, lo, hi in [((2, 3, 2, 2), 0, 2), ((2, 3, 2, 2), 3, 7), ((5, 0, 4, 0), 4, 30), ((0, 0, 0, 0), 0, 2),
                           ((6, 2, 2, 1), 10, 13), ((1, 7, 0, 0), 20, 60)]:
        offs, d2 = sp._band(bounds, lo, hi)
        box = torch.tensor(list(itertools.product(*[range(-b, b + 1) for b in bounds])))
        n2 = (box**2).sum(1)
        want = box[(n2 >= lo) & (n2 < hi)]
        assert sp._band(bounds, lo, hi, count_only=True) == len(offs) == len(want)
        assert set(map(tuple, offs.tolist())) == set(map(tuple, want.tolist()))
        assert torch.equal(d2, (offs**2).sum(1)) and bool((d2[1:] >= d2[:-1]).all())


class _Layers(nn.Module):
    """Three layers of the shapes above; only the rewiring is exercised, not a forward pass."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 3, 3, bias=False)  # (3, 4, 3, 3)
        self.b = nn.Conv2d(3, 2, 5, bias=False)  # (2, 3, 5, 5)
        self.c = nn.Linear(7, 5, bias=False)  # (5, 7)


@pytest.mark.parametrize("regrow", ["l2", "l2-magnitude-seeded"])
@pytest.mark.parametrize("sparsity", [0.05, 0.5, 0.9])
def test_bcs_rewiring_is_exact_per_layer_and_keeps_the_budget(regrow, sparsity, monkeypatch):
    calls = []
    search = sp.nearest_dormant

    def recording(theta_ext, start, size, shape, seeds, gen, **kw):
        before = theta_ext[start : start + size] == 0
        live = theta_ext[start : start + size].clone()
        out, keys = search(theta_ext, start, size, shape, seeds, gen, return_order=True, **kw)
        calls.append((before, live, shape, seeds.clone(), out - start, keys))
        return out

    monkeypatch.setattr(sp, "nearest_dormant", recording)
    for s in range(4):
        torch.manual_seed(s)
        bcs = BayesianRewiring(_Layers(), sparsity, torch.Generator().manual_seed(s), regrow=regrow)
        gen = torch.Generator().manual_seed(100 + s)
        dead = torch.rand(bcs.budget, generator=gen) < 0.4
        bcs.theta_buf[bcs.slots[dead]] = 0.0
        calls.clear()
        bcs._rebirth_near(dead)
        assert int((bcs.theta > 0).sum()) == bcs.budget  # budget exact
        assert torch.unique(bcs.slots).numel() == bcs.budget
        assert torch.equal(torch.sort(bcs.slots).values, torch.nonzero(bcs.theta > 0).squeeze(1))
        assert sum(c[3].numel() for c in calls) == int(dead.sum())
        for before, live, shape, seeds, out, keys in calls:
            check_exact(before, shape, seeds, out, keys)
            alive = torch.nonzero(live > 0).squeeze(1)
            if alive.numel() == 0:
                continue
            assert set(seeds.tolist()) <= set(alive.tolist())  # seeds are live connections
            if regrow == "l2-magnitude-seeded" and seeds.numel() <= alive.numel():
                # the seeds are the strongest live connections: none left out is stronger than one taken
                left = torch.ones(live.numel(), dtype=torch.bool)
                left[seeds] = False
                left &= live > 0
                if bool(left.any()):
                    assert float(live[left].max()) <= float(live[seeds].min())


def test_the_old_name_is_an_alias():
    from rsp.config import TrainConfig, resolve

    bcs = BayesianRewiring(_Layers(), 0.5, torch.Generator().manual_seed(0), regrow="l2-weighted")
    assert bcs.regrow == "l2-magnitude-seeded"
    assert resolve(overrides={"regrow": "l2-weighted"}).regrow == "l2-magnitude-seeded"
    assert TrainConfig(regrow="l2-weighted").to_dict()["regrow"] == "l2-magnitude-seeded"  # manifest/config
    assert "l2-magnitude-seeded" in sp.REGROW and "l2-weighted" not in sp.REGROW
    with pytest.raises(ValueError):
        BayesianRewiring(_Layers(), 0.5, torch.Generator(), regrow="l2-nearest")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_the_search_runs_on_the_gpu():
    for shape, density in [((3, 4, 3, 3), 0.5), ((5, 7, 1, 1), 0.9), ((2, 3, 5, 5), 0.1)]:
        gen = torch.Generator().manual_seed(5)
        theta, size = _layer(shape, density, gen)
        live = torch.nonzero(theta[:size] > 0).squeeze(1)
        seeds = live[torch.randint(0, live.numel(), (min(live.numel(), size - live.numel()),), generator=gen)]
        before = theta[:size] == 0
        theta_gpu = theta.cuda()
        out, keys = nearest_dormant(theta_gpu, 0, size, shape, seeds.cuda(), torch.Generator("cuda").manual_seed(0),
                                    return_order=True)
        check_exact(before, shape, seeds, out.cpu(), keys.cpu())
        assert bool((theta_gpu[out] == REBIRTH_THETA).all())

"""FAB-T (targeted fast adaptive boundary attack, Linf) against linear models whose minimal perturbations are
known in closed form: for logits W x + b and a point inside the box, the smallest Linf step to class t is
(z_y - z_t) / ||w_y - w_t||_1 (the box does not bind when the point is far enough from its walls)."""

import torch
import torch.nn as nn

from pipeline.attacks import ensemble_eval, fab_eval
from pipeline.attacks.fab import _fab_rows, _linf_hyperplane_step


class Linear(nn.Module):
    def __init__(self, w: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
            self.fc.bias.copy_(b)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _closed_form(model: Linear, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    w, z = model.fc.weight.detach(), model(x).detach()
    gap = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, t[:, None]).squeeze(1)
    return gap / (w[y] - w[t]).abs().sum(1)


def _two_class(n=64, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = Linear(torch.randn(2, d, generator=g), torch.zeros(2))
    x = 0.5 + 0.02 * (torch.rand(n, 1, 1, d, generator=g) - 0.5)  # near the centre: the box never binds
    y = model(x).argmax(1)
    return model, x, y, 1 - y


def test_projection_reaches_the_hyperplane_with_the_smallest_linf_step():
    g = torch.Generator().manual_seed(1)
    p, w = torch.rand(5, 30, generator=g) * 0.2 + 0.4, torch.randn(5, 30, generator=g)
    b = (w * p).sum(1) + torch.randn(5, generator=g) * 0.3
    d = _linf_hyperplane_step(p, w, b)
    assert torch.allclose((w * (p + d)).sum(1), b, atol=1e-4)
    expected = ((w * p).sum(1) - b).abs() / w.abs().sum(1)  # the box does not bind here
    assert torch.allclose(d.abs().amax(1), expected, rtol=1e-4)


def test_projection_respects_the_box():
    p = torch.tensor([[0.95, 0.5]])
    w = torch.tensor([[1.0, 1.0]])
    d = _linf_hyperplane_step(p, w, torch.tensor([1.45 + 0.2]))  # needs +0.2 in total; x0 can rise 0.05 only
    assert torch.allclose(p + d, torch.tensor([[1.0, 0.65]]), atol=1e-6)


def test_fab_t_finds_the_minimal_perturbation_within_one_percent():
    model, x, y, t = _two_class()
    with torch.no_grad():
        # eps 0: no row stops early, each walks the whole 100 steps towards its minimum
        found_x, found, _ = _fab_rows(model, x, y, t, eps=0.0, steps=100, random_start=False, generator=None)
    r_min = _closed_form(model, x, y, t)
    assert torch.allclose(found, (found_x - x).flatten(1).abs().amax(1))
    assert (model(found_x).argmax(1) == t).all()
    assert (found >= r_min * (1 - 1e-4)).all()  # nothing beats the true minimum
    assert (found <= r_min * 1.01).all()


def test_fab_t_never_reports_an_unconfirmed_break():
    """Minimal perturbations from 0.9 to 1.1 eps: broken exactly where the minimum is below eps (up to 1 %)."""
    model, x, y, t = _two_class(n=200, seed=3)
    r_min = _closed_form(model, x, y, t)
    eps = float(r_min.median())
    res = fab_eval(model, x, y, eps=eps, steps=100, n_target_classes=1)
    assert res.robust[r_min > eps].all()  # a break there would be impossible
    assert (~res.robust[r_min < 0.99 * eps]).all()
    assert ((res.x_adv - x).flatten(1).abs().amax(1) <= eps + 1e-6).all()


def test_fab_t_many_classes_within_the_ensemble():
    g = torch.Generator().manual_seed(5)
    d, k = 40, 10
    model = Linear(torch.randn(k, d, generator=g), torch.zeros(k))
    x = 0.5 + 0.02 * (torch.rand(100, 1, 1, d, generator=g) - 0.5)
    y = model(x).argmax(1)
    r_all = torch.stack([_closed_form(model, x, y, torch.full_like(y, c)) for c in range(k)], 1)
    r_all[torch.arange(len(y)), y] = float("inf")
    r_best = r_all.amin(1)  # the minimal perturbation over all wrong classes
    eps = float(r_best.median())
    ens = ensemble_eval(model, x, y, ["fab-t"], eps=eps, seed=0)
    robust = ens["robust_by_attack"]["fab-t"]
    assert robust[r_best > eps].all()
    assert (~robust[r_best < 0.99 * eps]).all()
    assert ens["per_attack"]["fab-t"]["config"]["n_target_classes"] == 9


def test_cumulative_ensemble_skips_attacks_left_without_examples():
    """PGD at a huge eps breaks every image: the later attacks get an empty batch and must not fail on it."""
    from rsp.attacks import ensemble_eval

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10)).eval()
    x = torch.rand(6, 3, 2, 2)
    y = model(x).argmax(1)
    res = ensemble_eval(model, x, y, attacks=["pgd", "apgd-ce", "apgd-t", "fab-t"], eps=1.0, steps=5, restarts=1,
                        apgd_steps=5, cumulative=True)
    assert res["clean_acc"] == 1.0 and res["robust_acc"] == 0.0
    assert set(res["per_attack"]) == {"pgd", "apgd-ce", "apgd-t", "fab-t"}

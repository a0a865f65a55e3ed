"""The robustness-evaluation core of rsp verify: worst-case PGD, APGD, Square, the ensemble, ANP-VS vulnerability,
and the sanity checks, each fed a model built to violate it.

The reference model is a small CNN trained in a few seconds with PGD-AT on the embedded digits (359 test images);
the cross-checks run at eps = 32/255, where its PGD robust accuracy is about 50 % (at 8/255 digits are nearly
saturated and every attack agrees trivially).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.attacks import (PGDConfig, apgd_eval, attack_mode, ensemble_eval, evaluate, margin, model_predict, pgd,
                         pgd_eval, square_eval)
from rsp.data import load_dataset, to_float
from rsp.methods.anp import latent_vulnerability
from rsp.sanity import (CHECKS, check_black_box, check_determinism, check_eps_monotone, check_eps_zero,
                        check_gradients, check_large_eps, check_more_steps, run_sanity_checks)

EPS = 32 / 255


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two and immune to a busy neighbour."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(1024, 64), nn.ReLU(),
                         nn.Linear(64, 10))


@pytest.fixture(scope="module")
def trained(one_thread):
    """(model, x_test, y_test): PGD-AT (eps 16/255, 5 steps), 10 epochs on digits; about a second on one core."""
    torch.manual_seed(0)
    splits = load_dataset("digits", None)
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = to_float(splits.train_x), splits.train_y
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            xb = pgd(model, x[b], y[b], PGDConfig(eps=16 / 255, step_size=4 / 255, steps=5), gen)
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, to_float(splits.test_x), splits.test_y


def textbook_pgd_robust(model, x, y, eps, alpha, steps, restarts, gen):
    """Madry et al.'s PGD as in the textbook, written independently of rsp: uniform start, signed steps,
    projection; an example is robust iff the final iterate of every restart is classified correctly."""
    robust = torch.ones(len(y), dtype=torch.bool)
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(restarts):
        xa = (x + torch.empty_like(x).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
        for _ in range(steps):
            xa.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
            xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
        with torch.no_grad():
            robust &= model(xa).argmax(1) == y
    for p in model.parameters():
        p.requires_grad_(True)
    return robust


# --- acceptance 2: cross-check against a reference ---------------------------------------------------------------


def test_pgd_is_at_least_as_strong_as_textbook_pgd(trained):
    model, x, y = trained
    cfg = PGDConfig(eps=EPS, step_size=EPS / 4, steps=50, restarts=10)
    ours = pgd_eval(model, x, y, cfg, torch.Generator().manual_seed(0))
    ref = textbook_pgd_robust(model, x, y, EPS, EPS / 4, 50, 10, torch.Generator().manual_seed(1))
    assert 0.3 < ref.float().mean() < 0.75, "the reference model should be in the interesting regime"
    assert ours.robust_acc <= ref.float().mean().item()
    # and it is the same attack: almost every example gets the same verdict
    assert (ours.robust != ref).float().mean() <= 0.01
    assert ours.clean_acc == pytest.approx(evaluate(model, x, y, None)["clean_acc"])
    # it did so with fewer gradient evaluations than restarts x steps x examples
    assert ours.work < 0.75 * 10 * 50 * len(y)


def test_apgd_is_at_least_as_strong_as_pgd50(trained):
    model, x, y = trained
    pgd50 = pgd_eval(model, x, y, PGDConfig(eps=EPS, step_size=EPS / 4, steps=50, restarts=1),
                     torch.Generator().manual_seed(0))
    pgd50x10 = pgd_eval(model, x, y, PGDConfig(eps=EPS, step_size=EPS / 4, steps=50, restarts=10),
                        torch.Generator().manual_seed(0))
    ce = apgd_eval(model, x, y, eps=EPS, steps=100, loss="ce", generator=torch.Generator().manual_seed(0))
    tg = apgd_eval(model, x, y, eps=EPS, steps=100, loss="dlr-t", n_target_classes=9,
                   generator=torch.Generator().manual_seed(0))
    assert ce.robust_acc <= pgd50.robust_acc
    both = (ce.robust & tg.robust).sum().item() / len(y)  # a count, as robust_acc (float32 means round)
    assert both <= pgd50.robust_acc and both <= pgd50x10.robust_acc


# --- the attacks' contracts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-t", "fab-t", "square"])
def test_attacks_stay_legal_and_flags_match_their_examples(trained, attack):
    model, x, y = trained
    x, y = x[:64].clone(), y[:64]
    x[:4] = 0.0
    x[4:8] = 1.0
    r = ensemble_eval(model, x, y, [attack], eps=EPS, steps=10, restarts=2, apgd_steps=20, n_target_classes=3,
                      square_queries=200, fab_steps=20, seed=3)
    adv = r["x_adv_by_attack"][attack]
    assert (adv - x).abs().max() <= EPS + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert torch.equal(r["robust"], r["clean"] & (pred == y))
    assert r["robust_acc"] <= r["clean_acc"]
    assert model.training is False and all(p.requires_grad for p in model.parameters())


def test_ensemble_is_the_per_example_minimum_and_deterministic(trained):
    model, x, y = trained
    x, y = x[:96], y[:96]
    kw = dict(attacks=["pgd", "apgd-ce", "apgd-t", "square"], eps=EPS, steps=10, restarts=3, apgd_steps=20,
              n_target_classes=3, square_queries=300)
    a = ensemble_eval(model, x, y, seed=7, **kw)
    b = ensemble_eval(model, x, y, seed=7, **kw)
    assert torch.equal(a["robust"], b["robust"]) and torch.equal(a["x_adv"], b["x_adv"])
    per = torch.stack([a["robust_by_attack"][k] for k in kw["attacks"]])
    assert torch.equal(a["robust"], per.all(0))
    assert a["robust_acc"] <= min(v["robust_acc"] for v in a["per_attack"].values())
    with torch.no_grad():
        fooled = model(a["x_adv"]).argmax(1) != y
    assert torch.equal(~a["robust"] & a["clean"], fooled & a["clean"])  # the kept example is the fooling one
    assert ((a["x_adv"] - x).abs().max() <= EPS + 1e-6)
    # an attack's draws do not depend on which other attacks run
    alone = ensemble_eval(model, x, y, seed=7, **{**kw, "attacks": ["apgd-ce"]})
    assert torch.equal(alone["robust_by_attack"]["apgd-ce"], a["robust_by_attack"]["apgd-ce"])
    # cumulative (AutoAttack order) finds the same worst case up to the random draws
    c = ensemble_eval(model, x, y, seed=7, cumulative=True, **kw)
    assert abs(c["robust_acc"] - a["robust_acc"]) <= 0.03


def test_predict_callable_judges_and_square_queries_it(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    calls = []

    def artifact(xb):  # stands in for onnxruntime: numpy in/out, no autograd
        calls.append(len(xb))
        with torch.no_grad():
            return model(torch.as_tensor(xb.numpy())).numpy()

    kw = dict(attacks=["pgd", "square"], eps=EPS, steps=10, restarts=2, square_queries=100, seed=1)
    via_model = ensemble_eval(model, x, y, **kw)
    via_artifact = ensemble_eval(model, x, y, predict=artifact, **kw)
    assert via_artifact["judge"] == "predict" and sum(calls) > 100 * 10
    assert torch.equal(via_model["robust"], via_artifact["robust"])
    # an artifact that differs from its twin (here: coarsely quantised inputs) is what gets reported
    def coarse(xb):
        with torch.no_grad():
            return model(torch.round(xb * 4) / 4)

    quantised = ensemble_eval(model, x, y, predict=coarse, **kw)
    art_clean = coarse(x).argmax(1) == y
    assert torch.equal(quantised["clean"], art_clean)
    for name in kw["attacks"]:
        art_ok = art_clean & (coarse(quantised["x_adv_by_attack"][name]).argmax(1) == y)
        assert torch.equal(quantised["robust_by_attack"][name], art_ok)
    assert quantised["per_attack"]["pgd"]["model_robust_acc"] == pytest.approx(via_model["per_attack"]["pgd"]
                                                                               ["robust_acc"])


def test_examples_the_twin_gets_wrong_are_still_attacked_for_another_judge(trained):
    """attack=mask: an example the attacked model misclassifies clean (the artifact may not) runs the whole budget
    and keeps its most misclassified iterate instead of stopping at x."""
    model, x, y = trained
    x, y = x[:128], y[:128]
    with torch.no_grad():
        clean_margin = margin(model(x), y)
    wrong = clean_margin < 0
    assert wrong.any()
    everything = torch.ones(len(y), dtype=torch.bool)
    cfg = PGDConfig(eps=EPS, step_size=EPS / 4, steps=10, restarts=2)
    default = pgd_eval(model, x, y, cfg, torch.Generator().manual_seed(0))
    masked = pgd_eval(model, x, y, cfg, torch.Generator().manual_seed(0), attack=everything)
    assert torch.equal(default.x_adv[wrong], x[wrong])  # by default they are not attacked
    with torch.no_grad():
        adv_margin = margin(model(masked.x_adv), y)
    assert (adv_margin[wrong] < clean_margin[wrong]).all()
    assert masked.work >= default.work + wrong.sum().item() * 2 * 10  # full budget, no early stop
    assert not masked.robust[wrong].any() and abs(masked.robust_acc - default.robust_acc) <= 0.03
    a = apgd_eval(model, x, y, eps=EPS, steps=10, generator=torch.Generator().manual_seed(0), attack=everything)
    with torch.no_grad():
        assert (margin(model(a.x_adv), y)[wrong] < clean_margin[wrong]).all()


def test_square_needs_only_queries(trained):
    model, x, y = trained
    x, y = x[:48], y[:48]
    with attack_mode(model):
        r = square_eval(model_predict(model), x, y, eps=EPS, queries=300, generator=torch.Generator().manual_seed(0))
    assert r.robust_acc < r.clean_acc  # it does break examples
    assert r.work <= len(y) * 302


def test_bf16_steers_but_float32_decides(trained):
    model, x, y = trained
    x, y = x[:96], y[:96]
    cfg = PGDConfig(eps=EPS, step_size=EPS / 4, steps=20, restarts=2)
    fp32 = pgd_eval(model, x, y, cfg, torch.Generator().manual_seed(0))
    bf16 = pgd_eval(model, x, y, cfg, torch.Generator().manual_seed(0), bf16=True)
    with torch.no_grad():
        pred = model(bf16.x_adv).argmax(1)
    assert torch.equal(bf16.robust, bf16.clean & (pred == y))  # flags are float32 verdicts on the examples
    assert abs(bf16.robust_acc - fp32.robust_acc) <= 0.05
    a = apgd_eval(model, x, y, eps=EPS, steps=20, generator=torch.Generator().manual_seed(0), bf16=True)
    assert a.robust_acc <= a.clean_acc


def test_restarts_run_batched_and_only_on_survivors(trained):
    model, x, y = trained
    x, y = x[:128], y[:128]
    one = pgd_eval(model, x, y, PGDConfig(eps=EPS, step_size=EPS / 4, steps=20, restarts=1),
                   torch.Generator().manual_seed(0))
    ten = pgd_eval(model, x, y, PGDConfig(eps=EPS, step_size=EPS / 4, steps=20, restarts=10),
                   torch.Generator().manual_seed(0), batch_size=100)
    assert torch.equal(one.robust & ten.robust, ten.robust)  # restart 1 is the same; more restarts only break more
    survivors = one.robust.sum().item()
    # work counts padded rows too (batch shapes stay on a short ladder): allow that padding, not full restarts
    assert ten.work <= 1.05 * (one.work + 9 * 20 * survivors) < 10 * 20 * len(y) * 0.75


def test_eps_zero_and_uint8_inputs(trained):
    model, x, y = trained
    u8 = (x[:32] * 255).round().to(torch.uint8)
    r = ensemble_eval(model, u8, y[:32], ["pgd", "apgd-ce"], eps=0.0, steps=3, restarts=2, apgd_steps=3)
    assert r["robust_acc"] == r["clean_acc"] and torch.equal(r["x_adv"], u8.float() / 255)
    with pytest.raises(ValueError):
        ensemble_eval(model, u8, y[:32], ["fgsm"])


def test_latent_vulnerability(trained):
    model, x, y = trained
    x, y = x[:64], y[:64]
    same = latent_vulnerability(model, x, x)
    assert same["vulnerability"] == 0.0 and same["sites"] == "relu" and set(same["layers"]) == {"1", "4"}
    adv = pgd_eval(model, x, y, PGDConfig(eps=EPS, step_size=EPS / 4, steps=10), torch.Generator().manual_seed(0))
    v = latent_vulnerability(model, x, adv.x_adv)
    assert v["vulnerability"] > 0 and all(val > 0 for val in v["layers"].values())
    assert v["vulnerability"] == pytest.approx(sum(v["layers"].values()) / 2)
    noise = (x + torch.empty_like(x).uniform_(-EPS, EPS, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert latent_vulnerability(model, x, noise)["vulnerability"] < v["vulnerability"]  # adversarial hurts more
    lay = latent_vulnerability(model, x, adv.x_adv, sites="layers")
    assert lay["sites"] == "layers" and set(lay["layers"]) == {"0", "3", "5"}


# --- acceptance 3: sanity checks, each fed a model built to violate it -------------------------------------------

LEVELS = torch.tensor([round(k * 255 / 16) for k in range(17)], dtype=torch.float32) / 255  # the digits' grey levels


class Rounding(nn.Module):
    """Masks gradients by rounding (binarising) its input: zero input gradient everywhere."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x))


class Drifting(nn.Module):
    """Updates state in every forward, even in eval mode: its class-0 bias grows with each call."""

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.base(x)
        return out + F.one_hot(torch.zeros(len(x), dtype=torch.long), out.shape[1]) * 0.5 * self.calls


class TinyNoiseFails(nn.Module):
    """Misclassifies inputs slightly off the data's grey levels (a defence tuned to one noise scale): accuracy
    at a small eps is lower than at a larger one."""

    def __init__(self, base, scale):
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x):
        out = self.base(x)
        d = (x[..., None] - LEVELS).abs().amin(-1).flatten(1).amax(1)
        tiny = (d > 0) & (d < self.scale)
        return torch.where(tiny[:, None], out.roll(1, dims=1), out)


class Hardening(nn.Module):
    """A stateful defence: after `limit` queries it snaps inputs to the data's grey levels, undoing small
    perturbations, so a longer attack meets a stronger model."""

    def __init__(self, base, limit):
        super().__init__()
        self.base, self.limit, self.calls = base, limit, 0

    def forward(self, x):
        self.calls += 1
        if self.calls > self.limit:
            x = LEVELS[(x[..., None] - LEVELS).abs().argmin(-1)]
        return self.base(x)


class SqrtInput(nn.Module):
    """sqrt of the input: infinite gradients at the many exactly-black pixels."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x.sqrt())


class Randomised(nn.Module):
    """Gaussian noise on the input at every call (a randomised defence)."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x + 0.05 * torch.randn_like(x))


def _batch_stats(base):
    """BatchNorm without running statistics: normalises with the batch's own statistics even in eval mode."""
    return nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False), base)


@pytest.fixture(scope="module")
def subset(trained):
    model, x, y = trained
    return model, x[:200], y[:200]


def test_a_sound_model_passes_every_check(subset):
    model, x, y = subset
    report = run_sanity_checks(model, x, y, EPS)
    assert report["passed"] and report["reliable"], [c["detail"] for c in report["checks"] if not c["passed"]]
    assert [c["name"] for c in report["checks"]] == list(CHECKS)
    for c in report["checks"]:
        assert set(c) == {"name", "passed", "detail", "figures", "tolerance"}


def test_eps_zero_flags_a_stateful_model(subset):
    model, x, y = subset
    assert check_eps_zero(model, x, y)["passed"]
    bad = check_eps_zero(Drifting(model), x, y)
    assert not bad["passed"] and bad["detail"].startswith("FAILED")


def test_eps_monotone_flags_accuracy_rising_with_eps(subset):
    model, x, y = subset
    bad = check_eps_monotone(TinyNoiseFails(model, 3 / 255), x, y, 8 / 255)
    assert not bad["passed"] and bad["figures"]["max_rise"] > 0.5


def test_large_eps_flags_gradient_masking(subset):
    model, x, y = subset
    ok = check_large_eps(model, x, y)
    assert ok["passed"] and ok["figures"]["robust_acc"] <= ok["figures"]["chance"]
    bad = check_large_eps(Rounding(model), x, y)
    assert not bad["passed"] and bad["figures"]["robust_acc"] > 0.3


def test_more_steps_flags_a_model_that_hardens_under_attack(subset):
    model, x, y = subset
    assert check_more_steps(model, x, y, 8 / 255)["passed"]
    bad = check_more_steps(Hardening(model, limit=30), x, y, 8 / 255)
    assert not bad["passed"]
    assert bad["figures"]["robust_acc"][1] > bad["figures"]["robust_acc"][0]


def test_black_box_beating_white_box_flags_gradient_masking(subset):
    model, x, y = subset
    bad = check_black_box(Rounding(model), x, y, EPS, queries=500)
    assert not bad["passed"]
    assert bad["figures"]["black_box_robust_acc"] < bad["figures"]["white_box_robust_acc"] - 0.1
    # an ensemble result is reused instead of attacking again
    r = ensemble_eval(model, x, y, ["pgd", "square"], eps=EPS, steps=20, restarts=2, square_queries=300)
    assert check_black_box(model, x, y, EPS, ensemble=r)["figures"]["white_box_robust_acc"] == pytest.approx(
        r["per_attack"]["pgd"]["robust_acc"])


def test_black_box_check_escalates_a_light_white_box_budget_before_failing(subset):
    """Square beating a 1-step, tiny-step PGD is a weak white-box budget, not gradient masking: the
    stronger APGD round on the examples only Square broke clears the model; the masking model still fails."""
    model, x, y = subset
    light = ensemble_eval(model, x, y, ["pgd", "square"], eps=EPS, steps=1, restarts=1, step_size=EPS / 20,
                          square_queries=300)
    assert light["per_attack"]["square"]["robust_acc"] < light["per_attack"]["pgd"]["robust_acc"] - 0.05
    ok = check_black_box(model, x, y, EPS, ensemble=light)
    assert ok["passed"] and ok["figures"]["escalation"]["broken"] > 0
    assert ok["figures"]["only_black_box_broken"] < ok["figures"]["only_black_box_broken_before_escalation"]
    assert not check_black_box(Rounding(model), x, y, EPS, queries=500)["passed"]


@pytest.mark.parametrize("kind", ["zero", "nan"])
def test_gradient_check_flags_zero_and_non_finite_gradients(subset, kind):
    model, x, y = subset
    bad = check_gradients(Rounding(model) if kind == "zero" else SqrtInput(model), x, y, EPS)
    assert not bad["passed"]
    key = "zero_fraction" if kind == "zero" else "nonfinite_fraction"
    assert bad["figures"][key] > 0.5


@pytest.mark.parametrize("kind", ["random", "batch-stats"])
def test_determinism_flags_random_and_batch_dependent_models(subset, kind):
    model, x, y = subset
    assert check_determinism(model, x)["passed"]
    bad_model = Randomised(model) if kind == "random" else _batch_stats(model)
    bad = check_determinism(bad_model, x)
    assert not bad["passed"] and bad["detail"].startswith("FAILED")


def test_a_violating_model_is_marked_unreliable(subset):
    model, x, y = subset
    report = run_sanity_checks(Rounding(model), x, y, EPS, queries=300)
    assert not report["reliable"]
    assert {"large_eps", "black_box", "gradients"} <= set(report["failed"])
    # the artifact path: a query-only predict that masks gradients the PyTorch twin does not have
    artifact = run_sanity_checks(model, x, y, EPS, predict=lambda xb: model(torch.round(xb)), queries=300,
                                 checks=["black_box", "determinism"])
    assert "black_box" in artifact["failed"]


def test_margin_and_evaluate_unchanged(trained):
    model, x, y = trained
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert torch.allclose(margin(logits, torch.tensor([0, 0])), torch.tensor([1.0, -3.0]))
    r = evaluate(model, x[:64], y[:64], PGDConfig(eps=EPS, step_size=EPS / 4, steps=5),
                 generator=torch.Generator().manual_seed(0))
    assert set(r) == {"clean_acc", "n", "robust_acc", "attack", "top_class", "top_class_share"}
    assert 0 < r["top_class_share"] <= 1 and r["top_class"] in set(y[:64].tolist()) | set(range(10))

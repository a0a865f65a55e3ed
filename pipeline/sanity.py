"""Sanity checks on a robustness evaluation (rsp verify): signs that the attacks, not the model, are weak.

Each check returns a dict {name, passed, detail, figures, tolerance}; `run_sanity_checks` runs them all and
marks the model unreliable when any fails (its robust accuracy should then not be trusted). The checks
follow Carlini et al. 2019 ("On evaluating adversarial robustness") and Athalye et al. 2018 (obfuscated
gradients). Each fails when:

- eps_zero: at eps = 0 an attack changes the input, or robust accuracy differs from clean accuracy. Exact.
- eps_monotone: robust accuracy rises from one eps of a short sweep (0, eps/4, eps/2, eps, 2 eps) to the
  next. Tolerance 0.02 and one example.
- large_eps: at eps = 0.5 (every ball holds the grey image) robust accuracy stays above chance (the share of
  the most frequent label). Tolerance 0.05 and one example.
- more_steps: PGD with more steps (50 vs 10, same seed, same step size) gives higher robust accuracy.
  Tolerance 0.01 and one example.
- black_box: the black-box Square attack has lower robust accuracy than the white-box attacks (per-example
  worst case), even after a stronger white-box round (APGD-CE + APGD-DLR, 100 steps x 2) on the examples
  only Square broke. Tolerance 0.02 and one example.
- gradients: an input gradient of the loss is not finite (none allowed), or is exactly zero (allowed for 1 %
  and one example).
- determinism: logits depend on the batch size or differ between two identical calls. Tolerance
  atol 1e-4 + rtol 1e-3 x max |logit|, and the same labels.

"a and one example" means max(a, 1/n) in accuracy units, so one fluke example never fails a check on a small
set. With `predict` (the exported artifact), clean and robust figures are the artifact's, Square queries it,
and the determinism check runs on it too; gradients always come from the PyTorch model.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import (Predict, as_float_images, attack_mode, attack_names, attack_seed, chunked_logits, ensemble_eval,
                      input_grad, model_predict)

CHECKS = ("eps_zero", "eps_monotone", "large_eps", "more_steps", "black_box", "gradients", "determinism")


def _tol(n: int, abs_tol: float, examples: int = 1) -> float:
    return max(abs_tol, examples / max(1, n))


def _result(name: str, passed: bool, detail: str, figures: dict, tolerance) -> dict:
    return {"name": name, "passed": bool(passed), "detail": detail, "figures": figures, "tolerance": tolerance}


def _acc(r: dict, attack: str) -> float:
    return r["per_attack"][attack]["robust_acc"]


def check_eps_zero(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 10, restarts: int = 2,
                   queries: int = 20, seed: int = 0, predict: Predict | None = None, batch_size: int = 512) -> dict:
    """At eps = 0 every attack (PGD, APGD-CE, Square) must return x itself and robust accuracy = clean accuracy."""
    r = ensemble_eval(model, x, y, ["pgd", "apgd-ce", "square"], eps=0.0, steps=steps, restarts=restarts, seed=seed,
                      predict=predict, apgd_steps=steps, square_queries=queries, batch_size=batch_size)
    x = as_float_images(x)
    moved = max((adv - x).abs().max().item() if len(x) else 0.0 for adv in r["x_adv_by_attack"].values())
    robust = {a: _acc(r, a) for a in r["attacks"]}
    bad = {a: v for a, v in robust.items() if v != r["clean_acc"]}
    passed = not bad and moved == 0.0
    detail = (f"eps=0: clean {r['clean_acc']:.4f}, robust " + ", ".join(f"{a} {v:.4f}" for a, v in robust.items())
              + f", max |x_adv - x| {moved:.3g}")
    if not passed:
        detail = "FAILED " + detail + " (expected robust = clean and x_adv = x: the model or the attack is not"
        detail += " deterministic/stateless)"
    return _result("eps_zero", passed, detail, {"clean_acc": r["clean_acc"], "robust_acc": robust,
                                                "max_perturbation": moved}, 0.0)


def check_eps_monotone(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                       fractions: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0), steps: int = 20, restarts: int = 2,
                       seed: int = 0, predict: Predict | None = None, batch_size: int = 512,
                       tol: float = 0.02) -> dict:
    """A short eps sweep with PGD: robust accuracy must not rise with eps (a bigger ball holds the smaller)."""
    sweep = sorted({min(1.0, f * eps) for f in fractions})
    accs = []
    for e in sweep:
        r = ensemble_eval(model, x, y, ["pgd"], eps=e, steps=steps, restarts=restarts, seed=seed, predict=predict,
                          batch_size=batch_size)
        accs.append(r["robust_acc"])
    t = _tol(len(y), tol)
    rises = [accs[i + 1] - accs[i] for i in range(len(accs) - 1)]
    worst = max(rises, default=0.0)
    passed = worst <= t + 1e-12
    curve = ", ".join(f"{e * 255:.3g}/255: {a:.4f}" for e, a in zip(sweep, accs))
    detail = f"robust accuracy over eps: {curve}; largest rise {worst:+.4f} (tolerance {t:.4f})"
    if not passed:
        detail = ("FAILED " + detail
                  + ": accuracy rises with eps (gradient masking, or a model tuned to one noise scale)")
    return _result("eps_monotone", passed, detail, {"eps": sweep, "robust_acc": accs, "max_rise": worst}, t)


def check_large_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.5, steps: int = 20,
                    restarts: int = 1, seed: int = 0, predict: Predict | None = None, batch_size: int = 512,
                    num_classes: int | None = None, tol: float = 0.05) -> dict:
    """At eps = 0.5 every eps-ball holds the uniform grey image, so no classifier can beat a constant one: robust
    accuracy must fall to chance (the share of the most frequent label) or below."""
    r = ensemble_eval(model, x, y, ["pgd"], eps=eps, steps=steps, restarts=restarts, seed=seed, predict=predict,
                      batch_size=batch_size)
    counts = torch.bincount(y.cpu(), minlength=num_classes or 0)
    chance = counts.max().item() / max(1, len(y)) if len(y) else 0.0
    t = _tol(len(y), tol)
    passed = r["robust_acc"] <= chance + t + 1e-12
    detail = f"eps={eps:.3g}: robust {r['robust_acc']:.4f}, chance {chance:.4f} (tolerance {t:.4f})"
    if not passed:
        detail = "FAILED " + detail + ": the attack cannot reach what every ball contains (gradient masking?)"
    return _result("large_eps", passed, detail, {"eps": eps, "robust_acc": r["robust_acc"], "chance": chance}, t)


def check_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *,
                     steps: Sequence[int] = (10, 50), restarts: int = 1, seed: int = 0,
                     predict: Predict | None = None, batch_size: int = 512, tol: float = 0.01) -> dict:
    """PGD with more steps must not give higher robust accuracy. Same seed and step size (eps/4) for all runs, one
    restart: the shorter run's trajectories are prefixes of the longer ones', so for a deterministic, stateless
    model this holds exactly; a rise points at randomness, state, or an attack bug."""
    steps = sorted(steps)
    step_size = eps / 4
    accs = []
    for s in steps:
        r = ensemble_eval(model, x, y, ["pgd"], eps=eps, steps=s, restarts=restarts, seed=seed, predict=predict,
                          step_size=step_size, batch_size=batch_size)
        accs.append(r["robust_acc"])
    t = _tol(len(y), tol)
    worst = max((accs[i + 1] - accs[i] for i in range(len(accs) - 1)), default=0.0)
    passed = worst <= t + 1e-12
    curve = ", ".join(f"{s} steps: {a:.4f}" for s, a in zip(steps, accs))
    detail = f"PGD robust accuracy: {curve}; largest rise {worst:+.4f} (tolerance {t:.4f})"
    if not passed:
        detail = "FAILED " + detail + ": more steps made the model look more robust"
    return _result("more_steps", passed, detail, {"steps": list(steps), "robust_acc": accs, "max_rise": worst}, t)


def check_black_box(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20,
                    restarts: int = 2, queries: int = 1000, seed: int = 0, predict: Predict | None = None,
                    batch_size: int = 512, tol: float = 0.02, ensemble: dict | None = None,
                    escalate_steps: int = 100, escalate_restarts: int = 2) -> dict:
    """The black-box Square attack must not beat the white-box attacks. `ensemble`: a result of
    `ensemble_eval` holding at least one black-box and one white-box attack (their kinds in the attack registry),
    reused instead of attacking again.

    Robust accuracy is compared per example (worst case over the white-box attacks vs over the black-box
    ones). When Square breaks examples the white-box attacks did not, those examples get a stronger
    white-box round first (APGD-CE and APGD-DLR, `escalate_steps` x `escalate_restarts`; DLR is a margin
    loss like Square's): a light white-box budget is not gradient masking. The check fails only when
    black-box still wins by more than the tolerance after it."""
    r = ensemble
    white_box, black_box = set(attack_names("white-box")), set(attack_names("black-box"))
    if r is None or not (set(r["attacks"]) & black_box) or not (set(r["attacks"]) & white_box):
        r = ensemble_eval(model, x, y, ["pgd", "apgd-ce", "square"], eps=eps, steps=steps, restarts=restarts,
                          seed=seed, predict=predict, apgd_steps=max(steps, 20), square_queries=queries,
                          batch_size=batch_size)
    white = [a for a in r["attacks"] if a in white_box]
    black = [a for a in r["attacks"] if a in black_box]
    n = max(1, r["n"])
    white_rob = torch.stack([r["robust_by_attack"][a] for a in white]).all(0)
    black_rob = torch.stack([r["robust_by_attack"][a] for a in black]).all(0)
    t = _tol(r["n"], tol)
    first_only_black = (white_rob & ~black_rob).sum().item() / n
    escalation = None
    if (black_rob.float().mean() < white_rob.float().mean() - t - 1e-12) and escalate_steps > 0:
        idx = torch.nonzero(white_rob & ~black_rob).squeeze(1)
        xe = as_float_images(x)[idx.to(x.device)]
        esc = ensemble_eval(model, xe, y[idx.to(y.device)], ["apgd-ce", "apgd-dlr"], eps=eps, seed=seed + 1,
                            predict=predict, apgd_steps=escalate_steps, apgd_restarts=escalate_restarts,
                            batch_size=batch_size)
        white_rob = white_rob.clone()
        white_rob[idx] = esc["robust"].to(white_rob.device)
        escalation = {"attacks": ["apgd-ce", "apgd-dlr"], "steps": escalate_steps, "restarts": escalate_restarts,
                      "examples": int(len(idx)), "broken": int((~esc["robust"]).sum().item())}
    white_acc = white_rob.float().mean().item() if r["n"] else 0.0
    black_acc = black_rob.float().mean().item() if r["n"] else 0.0
    only_black = (white_rob & ~black_rob).sum().item() / n
    passed = black_acc >= white_acc - t - 1e-12
    detail = (f"white-box ({', '.join(white)}) robust {white_acc:.4f}, black-box ({', '.join(black)}) {black_acc:.4f};"
              f" broken by black-box only {only_black:.4f} (tolerance {t:.4f})")
    if escalation:
        detail += (f"; black-box first broke {first_only_black:.4f} more, a stronger white-box round (APGD-CE + "
                   f"APGD-DLR {escalate_steps}x{escalate_restarts}) then broke {escalation['broken']} of those "
                   f"{escalation['examples']}")
    if not passed:
        detail = "FAILED " + detail + ": the gradients do not lead to adversarial examples (gradient masking?)"
    return _result("black_box", passed, detail, {"white_box_robust_acc": white_acc, "black_box_robust_acc": black_acc,
                                                 "only_black_box_broken": only_black,
                                                 "only_black_box_broken_before_escalation": first_only_black,
                                                 "escalation": escalation}, t)


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, seed: int = 0,
                    batch_size: int = 512, max_zero_fraction: float = 0.01) -> dict:
    """Input gradients of the cross-entropy, at x and at a random point of the eps-ball: all finite, and exactly
    zero for at most max(max_zero_fraction, 1/n) of the examples (zero gradients blind every gradient attack)."""
    x = as_float_images(x)
    gen = torch.Generator(x.device).manual_seed(attack_seed(seed, "gradients"))
    nonfinite = zero = total = 0
    norms = []
    with attack_mode(model):
        for where in ("clean", "random"):
            for s in range(0, len(x), batch_size):
                xb, yb = x[s:s + batch_size], y[s:s + batch_size]
                if where == "random":
                    noise = (torch.rand(xb.shape, device=xb.device, dtype=xb.dtype, generator=gen) * 2 - 1) * eps
                    xb = (xb + noise).clamp(0.0, 1.0)
                xb = xb.detach().clone().requires_grad_(True)
                with torch.enable_grad():
                    loss = F.cross_entropy(model(xb).float(), yb, reduction="sum")
                    g = input_grad(loss, xb)
                g = g.flatten(1)
                finite = torch.isfinite(g).all(1)
                nonfinite += (~finite).sum().item()
                zero += (finite & (g == 0).all(1)).sum().item()
                norms.append(g[finite].abs().sum(1))
                total += len(g)
    norms = torch.cat(norms) if norms else torch.zeros(0)
    nonfinite_f, zero_f = nonfinite / max(1, total), zero / max(1, total)
    t = _tol(total, max_zero_fraction)
    median = norms.median().item() if norms.numel() else 0.0
    passed = nonfinite == 0 and zero_f <= t + 1e-12
    detail = (f"input gradients (clean and random start, {total} examples): non-finite {nonfinite_f:.4f}, "
              f"exactly zero {zero_f:.4f} (tolerance {t:.4f}), median L1 {median:.3g}")
    if not passed:
        detail = "FAILED " + detail + ": gradient attacks cannot work on this model"
    return _result("gradients", passed, detail, {"nonfinite_fraction": nonfinite_f, "zero_fraction": zero_f,
                                                 "median_l1": median}, {"nonfinite": 0, "zero_fraction": t})


def _determinism_of(predict: Callable, x: torch.Tensor, batch_sizes: Sequence[int], rtol: float, atol: float):
    ref = chunked_logits(predict, x, len(x))
    scale = ref.abs().max().item() if ref.numel() else 0.0
    limit = atol + rtol * scale
    diffs, label_flips = {}, 0
    top2 = ref.topk(min(2, ref.shape[1]), dim=1).values if ref.numel() else ref
    gap = (top2[:, 0] - top2[:, -1]) if ref.numel() else torch.zeros(0)
    errors = {}
    for bs in list(batch_sizes) + ["repeat"]:
        try:
            out = chunked_logits(predict, x, len(x) if bs == "repeat" else int(bs))
        except Exception as exc:  # a model that cannot run a batch size at all depends on it
            errors[str(bs)] = f"{type(exc).__name__}: {exc}"
            diffs[str(bs)] = float("inf")
            continue
        diffs[str(bs)] = (out - ref).abs().max().item() if ref.numel() else 0.0
        flips = (out.argmax(1) != ref.argmax(1)) & (gap > 2 * limit)  # ties within the tolerance may flip
        label_flips += flips.sum().item()
    return diffs, label_flips, limit, errors


def check_determinism(model: nn.Module, x: torch.Tensor, *, predict: Predict | None = None,
                      batch_sizes: Sequence[int] = (1, 7), n: int = 32, rtol: float = 1e-3,
                      atol: float = 1e-4) -> dict:
    """Logits of the first n inputs in one batch vs in batches of 1 and 7, and vs a second identical call: equal
    within atol + rtol * max |logit|, and the same labels (eval mode; the artifact too when given)."""
    x = as_float_images(x)[:n]
    figures, bad = {}, []
    with attack_mode(model):
        targets = [("model", model_predict(model))] + ([("artifact", predict)] if predict is not None else [])
        for label, fn in targets:
            diffs, flips, limit, errors = _determinism_of(fn, x, batch_sizes, rtol, atol)
            figures[label] = {"max_abs_diff": diffs, "label_flips": flips, "limit": limit, "errors": errors}
            worst = max(diffs.values(), default=0.0)
            if errors:
                bad.append(f"{label}: " + "; ".join(f"batch size {k} raised {v}" for k, v in errors.items()))
            elif worst > limit or flips:
                bad.append(f"{label}: max |diff| {worst:.3g} > {limit:.3g}" if worst > limit
                           else f"{label}: {flips} labels changed")
    passed = not bad
    detail = "; ".join(f"{k}: max |diff| over batch sizes {', '.join(map(str, batch_sizes))} and a repeat "
                       f"{max(v['max_abs_diff'].values(), default=0.0):.3g}" for k, v in figures.items())
    if not passed:
        detail = "FAILED " + "; ".join(bad) + " (randomness, or batch statistics in eval mode)"
    return _result("determinism", passed, detail, figures, {"rtol": rtol, "atol": atol})


def run_sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, steps: int = 20,
                      restarts: int = 2, queries: int = 1000, seed: int = 0, predict: Predict | None = None,
                      n_examples: int | None = 200, batch_size: int = 512, ensemble: dict | None = None,
                      checks: Sequence[str] = CHECKS) -> dict:
    """Run the sanity checks on the first `n_examples` examples (all with None).

    steps/restarts/queries size the sweeps' attacks (lighter than the evaluation itself); `ensemble` (the
    evaluation's own `ensemble_eval` result, on all its examples, with Square and a white-box attack) is reused
    as it is by the black-box check. Returns {passed, reliable, failed [names], checks [results], n, seconds}.
    """
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        raise ValueError(f"unknown sanity check(s) {unknown}; choose from {', '.join(CHECKS)}")
    t0 = time.perf_counter()
    x = as_float_images(x)
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    common = {"seed": seed, "batch_size": batch_size}
    runners = {
        "eps_zero": lambda: check_eps_zero(model, x, y, steps=min(steps, 10), restarts=restarts, predict=predict,
                                           **common),
        "eps_monotone": lambda: check_eps_monotone(model, x, y, eps, steps=steps, restarts=restarts, predict=predict,
                                                   **common),
        "large_eps": lambda: check_large_eps(model, x, y, steps=steps, predict=predict, **common),
        "more_steps": lambda: check_more_steps(model, x, y, eps, predict=predict, **common),
        "black_box": lambda: check_black_box(model, x, y, eps, steps=steps, restarts=restarts, queries=queries,
                                             predict=predict, ensemble=ensemble, **common),
        "gradients": lambda: check_gradients(model, x, y, eps, **common),
        "determinism": lambda: check_determinism(model, x, predict=predict),
    }
    results = [runners[c]() for c in checks]
    failed = [r["name"] for r in results if not r["passed"]]
    return {"passed": not failed, "reliable": not failed, "failed": failed, "checks": results, "n": len(y),
            "seconds": time.perf_counter() - t0}


__all__ = ["CHECKS", "check_black_box", "check_determinism", "check_eps_monotone", "check_eps_zero",
           "check_gradients", "check_large_eps", "check_more_steps", "run_sanity_checks"]

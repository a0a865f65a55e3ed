"""APGD (Croce & Hein 2020, AutoAttack's auto-PGD), L-infinity: APGD-CE, APGD-DLR and the targeted APGD-T."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from .core import (AttackResult, Tracker, as_float_images, attack_mode, clean_start, confirm, forward_logits,
                   hand_over, input_grad, judge_adversarial, keep_best_rows, live_first, model_predict,
                   per_example_loss, project, shrink_to, wrong_classes_ranked)
from .registry import AttackSettings, register_attack


def _apgd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ex: torch.Tensor, tracker: Tracker, *,
               eps: float, steps: int, loss: str, target: torch.Tensor | None, generator: torch.Generator | None,
               bf16: bool, rho: float = 0.75, alpha: float = 0.75) -> int:
    """One APGD run (Croce & Hein 2020, Linf) on rows attacking examples ex (distinct). Returns gradient evals.

    Step size 2*eps, halved per row at checkpoints (first after 22 % of the steps, intervals shrinking by 3 % to
    at least 6 %) when at most a fraction rho of the steps since the last checkpoint raised the loss, or when the step
    size was not halved at the last checkpoint and the best loss has not improved since; after halving, the row
    restarts from its best point. Momentum alpha = 0.75. As in the reference code (autoattack/autopgd_base.py).
    """
    u = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
    scale = u.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
    cur = (x + eps * u / scale).clamp(0.0, 1.0)
    view = (-1,) + (1,) * (x.dim() - 1)
    k, k_min, k_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    n = len(x)
    row_best = torch.full((n,), float("inf"), device=x.device)
    row_x = cur.clone()
    ids = torch.arange(n, device=x.device)
    work = 0

    def evaluate_rows(cur, ys, tg):
        nonlocal work
        cur = cur.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = forward_logits(model, cur, bf16)
            loss_i = per_example_loss(logits, ys, loss, tg)
            grad = input_grad(loss_i.sum(), cur)
        work += len(cur)
        cur = cur.detach()
        m, fooled = confirm(model, cur, ys, logits.detach(), bf16)
        keep_best_rows(tracker, ex[ids], ids, cur, m, fooled, row_best, row_x)
        return loss_i.detach().float(), grad

    s = {"xs": x, "ys": y, "tg": target if target is not None else y}
    loss_i, grad = evaluate_rows(cur, s["ys"], target)
    s.update(cur=cur, prev=cur.clone(), grad=grad, step=torch.full((n,), 2.0 * eps, device=x.device),
             x_best=cur.clone(), g_best=grad.clone(), l_best=loss_i.clone(), l_prev=loss_i.clone(),
             l_check=loss_i.clone(), reduced=torch.ones(n, dtype=torch.bool, device=x.device),
             n_incr=torch.zeros(n, device=x.device))
    counter = 0
    for i in range(steps):
        live = ~tracker.broken[ex[ids]]
        n_live = int(live.sum())
        if n_live == 0:
            break
        size = shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = live_first(live, size)
            s = {key: v[sel] for key, v in s.items()}
            ids = ids[sel]
        xs, cur, prev = s["xs"], s["cur"], s["prev"]
        a = alpha if i > 0 else 1.0
        z = project(cur + s["step"].view(view) * s["grad"].sign(), xs, eps)
        nxt = project(cur + a * (z - cur) + (1 - a) * (cur - prev), xs, eps)
        s["prev"], s["cur"] = cur, nxt
        loss_i, grad = evaluate_rows(nxt, s["ys"], s["tg"] if target is not None else None)
        s["grad"] = grad
        s["n_incr"] += (loss_i > s["l_prev"]).float()
        s["l_prev"] = loss_i
        imp = loss_i > s["l_best"]
        s["x_best"][imp], s["g_best"][imp], s["l_best"][imp] = nxt[imp], grad[imp], loss_i[imp]
        counter += 1
        if counter == k:
            red = (s["n_incr"] <= k * rho) | (~s["reduced"] & (s["l_check"] >= s["l_best"]))
            s["reduced"], s["l_check"] = red, s["l_best"].clone()
            s["step"] = torch.where(red, s["step"] / 2, s["step"])
            s["cur"] = torch.where(red.view(view), s["x_best"], s["cur"])
            s["grad"] = torch.where(red.view(view), s["g_best"], s["grad"])
            s["n_incr"] = torch.zeros_like(s["n_incr"])
            counter, k = 0, max(k - k_decr, k_min)
    hand_over(tracker, ex, row_x, row_best)
    return work


def apgd_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, restarts: int = 1,
              loss: str = "ce", n_target_classes: int = 9, generator: torch.Generator | None = None,
              batch_size: int = 512, bf16: bool = False, rho: float = 0.75,
              attack: torch.Tensor | None = None) -> AttackResult:
    """APGD robust accuracy, worst case over restarts (and over target classes for loss='dlr-t').

    loss: 'ce' (APGD-CE), 'dlr' (untargeted DLR) or 'dlr-t' (APGD-T: the targeted DLR loss against each of the
    `n_target_classes` most likely wrong classes of the clean input, `restarts` runs each, as in AutoAttack).
    Every restart/target attacks only the examples that are still unbroken. attack: as in `pgd_eval`.
    """
    if loss not in ("ce", "dlr", "dlr-t"):
        raise ValueError(f"apgd_eval: loss must be ce, dlr or dlr-t, not {loss!r}")
    name = {"ce": "apgd-ce", "dlr": "apgd-dlr", "dlr-t": "apgd-t"}[loss]
    t0 = time.perf_counter()
    x = as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits, n_classes, clean, tracker = clean_start(predict, x, y, batch_size, attack, name,
                                                               {"ce": 0, "dlr": 3, "dlr-t": 4}[loss])
        if loss == "dlr-t":
            ranked = wrong_classes_ranked(clean_logits, y)
            n_t = min(n_target_classes, n_classes - 1)
            targets = [ranked[:, r] for r in range(n_t)]  # the clean input's most likely wrong classes, in order
        else:
            targets = [None]
        for tg in targets:
            for _ in range(max(1, restarts)):
                todo = torch.nonzero(~tracker.broken).squeeze(1)
                for s in range(0, len(todo), batch_size):
                    ex = todo[s:s + batch_size]
                    work += _apgd_rows(model, x[ex], y[ex], ex, tracker, eps=eps, steps=steps, loss=loss,
                                       target=None if tg is None else tg[ex], generator=generator, bf16=bf16, rho=rho)
        robust, _ = judge_adversarial(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": eps, "steps": steps, "restarts": restarts, "loss": loss, "bf16": bf16, "rho": rho}
    if loss == "dlr-t":
        config["n_target_classes"] = n_target_classes
    return AttackResult(name, tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


def _apgd_run(loss: str):
    def run(model: nn.Module, judge, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
            generator: torch.Generator, attack: torch.Tensor) -> AttackResult:
        return apgd_eval(model, x, y, eps=settings.eps, steps=settings.apgd_steps, restarts=settings.apgd_restarts,
                         loss=loss, n_target_classes=settings.n_target_classes, generator=generator,
                         batch_size=settings.batch_size, bf16=settings.bf16, attack=attack)

    return run


register_attack("apgd-ce", kind="white-box", order=20)(_apgd_run("ce"))
# not in `all`: AutoAttack runs DLR in its targeted form, apgd-t
register_attack("apgd-dlr", kind="white-box", in_all=False, order=30)(_apgd_run("dlr"))
register_attack("apgd-t", kind="white-box", note="targeted DLR", order=40)(_apgd_run("dlr-t"))

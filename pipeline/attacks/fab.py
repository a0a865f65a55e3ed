"""FAB-T (Croce & Hein 2020, targeted fast adaptive boundary), L-infinity, as AutoAttack runs it."""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from .core import (AttackResult, as_float_images, attack_mode, clean_start, input_grad, judge_adversarial,
                   live_first, margin, model_predict, project, shrink_to, wrong_classes_ranked)
from .registry import AttackSettings, register_attack


def _linf_hyperplane_step(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row: the smallest-Linf step d with w.(p + d) = b and p + d in [0, 1] (exact, by sorting).

    Every coordinate moves in the direction that helps (sign of w_i * (b - w.p)) by min(r, room_i), room_i being
    the distance to the box's wall that way; r is the smallest radius whose reachable change covers b - w.p (a
    piecewise-linear, increasing function of r). Where even the box's corner does not reach the hyperplane, the
    step goes to that corner. p, w: [n, d]; b: [n]."""
    delta = b - (w * p).sum(1)
    direction = torch.sign(w) * torch.sign(delta)[:, None]
    room = torch.where(direction > 0, 1.0 - p, p).clamp_min(0.0)
    a = w.abs()
    room_s, order = room.sort(dim=1)
    a_s = a.gather(1, order)
    below = torch.cumsum(a_s * room_s, 1) - a_s * room_s  # sum over coordinates capped before this one
    above = a_s.flip(1).cumsum(1).flip(1)  # weight still moving at this radius
    reach = below + room_s * above  # change reached at radius room_s[k]
    need = delta.abs()[:, None]
    k = (reach < need).sum(1, keepdim=True).clamp_max(room.shape[1] - 1)
    r = ((need - below.gather(1, k)) / above.gather(1, k).clamp_min(1e-12)).squeeze(1)
    r = torch.minimum(r.clamp_min(0.0), room_s[:, -1])
    return direction * torch.minimum(room, r[:, None])


def _fab_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor, *, eps: float, steps: int,
              random_start: bool, generator: torch.Generator | None, eta: float = 1.05, beta: float = 0.9,
              alpha_max: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Targeted FAB, Linf (Croce & Hein 2020) on rows (x, y) against classes `target`.

    Each step linearises the boundary z_t - z_y = 0 at the iterate, projects both the iterate and the original
    onto it (smallest Linf step inside [0, 1]), and moves to a mix of the two projections, biased towards the
    original by alpha = |d_iterate| / (|d_iterate| + |d_original|) capped at alpha_max, with overshoot eta. A
    fooling iterate closer than the best so far is kept, then pulled back towards the original by beta: the
    search walks down the boundary towards the minimal perturbation. A row stops once its best is within eps
    (the evaluation is eps-bounded). Returns the closest fooling points (x itself where none), their Linf
    distances (inf where none) and the gradient evaluations spent."""
    n = len(x)
    flat = x.flatten(1)
    best_x, best_d = x.clone(), torch.full((n,), float("inf"), device=x.device)
    cur = x.clone()
    if random_start:
        u = torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1
        u = u / u.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
        cur = (x + 0.5 * eps * u).clamp(0.0, 1.0)
    ids = torch.arange(n, device=x.device)
    work = 0

    def logits_and_grad(z: torch.Tensor, yy: torch.Tensor, tt: torch.Tensor):
        nonlocal work
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(z).float()
            diff = logits.gather(1, tt[:, None]).squeeze(1) - logits.gather(1, yy[:, None]).squeeze(1)
            grad = input_grad(diff.sum(), z)
        work += len(z)
        return logits.detach(), diff.detach(), grad

    def record(rows: torch.Tensor, z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Keep fooling rows that are closer than their best; returns the fooling mask."""
        fooled = logits.argmax(1) != y[rows]
        dist = (z - x[rows]).flatten(1).abs().amax(1)
        closer = fooled & (dist < best_d[rows])
        best_d[rows[closer]] = dist[closer]
        best_x[rows[closer]] = z[closer].detach()
        return fooled

    for it in range(steps + 1):
        logits, diff, grad = logits_and_grad(cur, y[ids], target[ids])
        fooled = record(ids, cur, logits)
        if fooled.any():  # pull back towards the original and linearise there instead
            f = torch.nonzero(fooled).squeeze(1)
            cur[f] = x[ids[f]] + beta * (cur[f] - x[ids[f]])
            lf, df_, gf = logits_and_grad(cur[f], y[ids[f]], target[ids[f]])
            record(ids[f], cur[f], lf)
            logits[f], diff[f], grad[f] = lf, df_, gf
        if it == steps:
            break
        live = best_d[ids] > eps
        n_live = int(live.sum())
        if n_live == 0:
            break
        size = shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = live_first(live, size)
            ids, cur, diff, grad = ids[sel], cur[sel], diff[sel], grad[sel]
        m = len(ids)
        w = grad.flatten(1)
        p = cur.flatten(1)
        b = (w * p).sum(1) - diff  # the linearised boundary: w.z = b
        steps_both = _linf_hyperplane_step(torch.cat([p, flat[ids]]), torch.cat([w, w]), torch.cat([b, b]))
        d_cur, d_orig = steps_both[:m], steps_both[m:]
        n_cur = d_cur.abs().amax(1).clamp_min(1e-8)
        n_orig = d_orig.abs().amax(1).clamp_min(1e-8)
        alpha = (n_cur / (n_cur + n_orig)).clamp(0.0, alpha_max)[:, None]
        nxt = ((p + eta * d_cur) * (1 - alpha) + (flat[ids] + eta * d_orig) * alpha).clamp(0.0, 1.0)
        cur = nxt.view_as(cur)
    return best_x, best_d, work


def fab_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, restarts: int = 1,
             n_target_classes: int = 9, generator: torch.Generator | None = None, batch_size: int = 512,
             attack: torch.Tensor | None = None, eta: float = 1.05, beta: float = 0.9,
             alpha_max: float = 0.1) -> AttackResult:
    """FAB-T robust accuracy (targeted FAB, Linf, Croce & Hein 2020, as AutoAttack runs it): for each of the
    `n_target_classes` most likely wrong classes of the clean input, `restarts` runs of `steps` steps (the
    first from the clean input, later ones from a random point of the eps/2-ball). FAB looks for the smallest
    fooling perturbation; an example counts as broken only when the point it found lies in the eps-ball (it is
    projected onto it) and the model, run again on it, misclassifies it. Unbroken examples keep that projected
    point. attack: as in `pgd_eval`."""
    t0 = time.perf_counter()
    x = as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits, n_classes, clean, tracker = clean_start(predict, x, y, batch_size, attack, "fab-t", 2)
        ranked = wrong_classes_ranked(clean_logits, y)
        for r in range(min(n_target_classes, n_classes - 1)):
            for restart in range(max(1, restarts)):
                todo = torch.nonzero(~tracker.broken).squeeze(1)
                for s in range(0, len(todo), batch_size):
                    ex = todo[s:s + batch_size]
                    found, _, w = _fab_rows(model, x[ex], y[ex], ranked[ex, r], eps=eps, steps=steps,
                                            random_start=restart > 0, generator=generator, eta=eta, beta=beta,
                                            alpha_max=alpha_max)
                    work += w
                    found = project(found, x[ex], eps)  # confirm inside the ball, in float32
                    with torch.no_grad():
                        logits = model(found).float()
                    tracker.offer(ex, found, margin(logits, y[ex]), logits.argmax(1) != y[ex])
        robust, _ = judge_adversarial(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": eps, "steps": steps, "restarts": restarts, "n_target_classes": n_target_classes, "eta": eta,
              "beta": beta, "alpha_max": alpha_max}
    return AttackResult("fab-t", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


@register_attack("fab-t", kind="white-box", note="targeted FAB", order=50)
def run_fab(model: nn.Module, judge, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
            generator: torch.Generator, attack: torch.Tensor) -> AttackResult:
    return fab_eval(model, x, y, eps=settings.eps, steps=settings.fab_steps, restarts=settings.fab_restarts,
                    n_target_classes=settings.n_target_classes, generator=generator,
                    batch_size=settings.batch_size, attack=attack)

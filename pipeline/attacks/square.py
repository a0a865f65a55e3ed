"""The Square attack (Andriushchenko et al. 2020), L-infinity: black-box, it only queries the judge."""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from .core import (AttackResult, Predict, Tracker, as_float_images, chunked_logits, judge_adversarial, margin,
                   to_logits)
from .registry import AttackSettings, register_attack


def _square_p(p_init: float, it: int, n_iters: int) -> float:
    """The Square attack's schedule for the fraction of pixels changed (rescaled to 10,000 iterations)."""
    it = int(it / max(1, n_iters) * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def square_eval(predict: Predict, x: torch.Tensor, y: torch.Tensor, *, eps: float, queries: int = 5000,
                p_init: float = 0.8, generator: torch.Generator | None = None, batch_size: int = 512) -> AttackResult:
    """Square attack, Linf, untargeted margin loss (Andriushchenko et al. 2020): queries only, no gradients.

    `predict` is any callable float NCHW [0, 1] -> logits (an onnxruntime/TVM session wrapper, or
    `model_predict(model)` inside `attack_mode`). Start: vertical stripes of +-eps; then, per example and
    iteration, a random square window (side from the p schedule, p_init = 0.8 as in AutoAttack) of one random
    sign per channel, kept when it lowers the margin. Stops per example once misclassified. `queries` counts
    the initial query; the final judging query is extra.
    """
    t0 = time.perf_counter()
    x = as_float_images(x)
    n, c, h, w = x.shape
    clean_logits = chunked_logits(predict, x, batch_size)
    clean = clean_logits.argmax(1) == y
    tracker = Tracker(x, margin(clean_logits, y))
    tracker.broken |= ~clean
    work = len(x)
    todo = torch.nonzero(clean).squeeze(1)
    rows_h = torch.arange(h, device=x.device)
    rows_w = torch.arange(w, device=x.device)
    for s0 in range(0, len(todo), batch_size):
        ex = todo[s0:s0 + batch_size]
        xs, ys = x[ex], y[ex]
        signs = torch.randint(0, 2, (len(ex), c, 1, w), device=x.device, generator=generator).to(x.dtype) * 2 - 1
        best = (xs + eps * signs).clamp(0.0, 1.0)
        logits = to_logits(predict(best), x.device)
        work += len(ex)
        m_best = margin(logits, ys)
        fooled = logits.argmax(1) != ys
        for it in range(queries - 1):
            act = torch.nonzero(~fooled).squeeze(1)
            if act.numel() == 0:
                break
            p = _square_p(p_init, it, queries)
            side = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1, w - 1) if min(h, w) > 1 else 1
            k = len(act)
            vh = torch.randint(0, h - side + 1, (k,), device=x.device, generator=generator)
            vw = torch.randint(0, w - side + 1, (k,), device=x.device, generator=generator)
            win = (((rows_h[None] >= vh[:, None]) & (rows_h[None] < vh[:, None] + side))[:, :, None]
                   & ((rows_w[None] >= vw[:, None]) & (rows_w[None] < vw[:, None] + side))[:, None, :])[:, None]
            sign = torch.randint(0, 2, (k, c, 1, 1), device=x.device, generator=generator).to(x.dtype) * 2 - 1
            xa = xs[act]
            cur_best = best[act]
            cand = torch.where(win, (xa + eps * sign).clamp(0.0, 1.0), cur_best)
            same = (cand == cur_best).flatten(1).all(1)  # the window already holds these signs: flip them
            if same.any():
                cand[same] = torch.where(win[same], (xa[same] - eps * sign[same]).clamp(0.0, 1.0), cur_best[same])
            logits = to_logits(predict(cand), x.device)
            work += k
            m_new = margin(logits, ys[act])
            f_new = logits.argmax(1) != ys[act]
            take = (m_new < m_best[act]) | f_new
            sel = act[take]
            best[sel], m_best[sel] = cand[take], m_new[take]
            fooled[sel] = f_new[take]
        tracker.offer(ex, best, m_best, fooled)
    robust, _ = judge_adversarial(predict, tracker.x_adv, y, clean, batch_size)
    work += len(x)
    config = {"eps": eps, "queries": queries, "p_init": p_init}
    return AttackResult("square", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


@register_attack("square", kind="black-box", note="black-box, queries the artifact", order=60)
def run_square(model: nn.Module, judge: Predict, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
               generator: torch.Generator, attack: torch.Tensor) -> AttackResult:
    """Square on the judge (the artifact where there is one); it attacks what the judge classifies correctly."""
    return square_eval(judge, x, y, eps=settings.eps, queries=settings.square_queries, p_init=settings.p_init,
                       generator=generator, batch_size=settings.batch_size)

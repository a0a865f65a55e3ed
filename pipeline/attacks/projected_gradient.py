"""PGD (Madry et al. 2018), L-infinity: training's attack (`pgd`, `evaluate`) and verify's worst-case `pgd_eval`."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import (AttackResult, Tracker, as_float_images, attack_mode, chunked_logits, confirm, forward_logits,
                   hand_over, input_grad, judge_adversarial, keep_best_rows, live_first, model_predict,
                   per_example_loss, project, shrink_to)
from ..defaults import EPS
from .registry import AttackSettings, register_attack


@dataclass(frozen=True)
class PGDConfig:
    eps: float = EPS
    step_size: float = 2 / 255
    steps: int = 10
    restarts: int = 1
    loss: str = "ce"  # "ce": maximise cross-entropy; "kl": TRADES' KL(p(x) || p(x_adv))
    random_start: bool = True


def _attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, ref_prob: torch.Tensor | None) -> torch.Tensor:
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="sum")
    if loss == "kl":
        return F.kl_div(F.log_softmax(logits.float(), dim=1), ref_prob, reduction="sum")
    raise ValueError(f"unknown attack loss {loss!r}")


def pgd_once(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One PGD run (Madry et al.): random start, `steps` signed-gradient steps, projection each step.

    The caller is responsible for eval mode (use `attack_mode`); `pgd` does that for you.
    """
    if cfg.eps == 0 or cfg.steps == 0:
        return x.detach().clone()
    ref_prob = None
    if cfg.loss == "kl":
        with torch.no_grad():
            ref_prob = F.softmax(model(x).float(), dim=1)
        # TRADES starts next to x, not uniformly in the ball.
        start = 0.001 * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    elif cfg.random_start:
        start = (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1) * cfg.eps
    else:
        start = torch.zeros_like(x)
    x_adv = project(x + start, x, cfg.eps)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        loss = _attack_loss(model(x_adv), y, cfg.loss, ref_prob)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = project(x_adv.detach() + cfg.step_size * grad.sign(), x, cfg.eps)
    return x_adv.detach()


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples, worst case per example over `cfg.restarts` restarts.

    Each restart attacks only the examples that every earlier restart failed to break; an example keeps
    the first perturbation that fools the model (else the last one tried).
    """
    with attack_mode(model):
        x_adv = pgd_once(model, x, y, cfg, generator)
        if cfg.restarts <= 1 or cfg.loss != "ce":
            return x_adv
        with torch.no_grad():
            alive = model(x_adv).argmax(1) == y
        for _ in range(cfg.restarts - 1):
            idx = torch.nonzero(alive).squeeze(1)
            if idx.numel() == 0:
                break
            cand = pgd_once(model, x[idx], y[idx], cfg, generator)
            x_adv[idx] = cand
            with torch.no_grad():
                alive[idx] = model(cand).argmax(1) == y[idx]
        return x_adv


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig | None, *, batch_size: int = 256,
             generator: torch.Generator | None = None, float_inputs=None) -> dict:
    """Clean and PGD robust accuracy (fractions in [0, 1]) of `model` on uint8 or float images x.

    Robust accuracy counts an example only if it is classified correctly clean and under every restart.
    `top_class`/`top_class_share`: the class predicted most often on the clean images, and its share.
    """
    from ..data import to_float

    float_inputs = float_inputs if float_inputs is not None else (x.dtype != torch.uint8)
    was_training = model.training
    model.eval()
    clean_ok = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    robust_ok = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    pred = torch.zeros(len(y), dtype=torch.long, device=y.device)
    try:
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            xb = x[sl] if float_inputs else to_float(x[sl])
            yb = y[sl]
            with attack_mode(model):
                pred[sl] = _predict(model, xb)
            ok = pred[sl] == yb
            clean_ok[sl] = ok
            if cfg is None:
                continue
            idx = torch.nonzero(ok).squeeze(1)  # a misclassified example is already non-robust
            if idx.numel():
                x_adv = pgd(model, xb[idx], yb[idx], cfg, generator)
                with attack_mode(model):
                    robust_ok[sl][idx] = _predict(model, x_adv) == yb[idx]
    finally:
        model.train(was_training)
    n = max(1, len(y))
    out = {"clean_acc": clean_ok.sum().item() / n, "n": len(y)}
    if len(y):  # the most predicted class and its share: a collapsed (near-constant) classifier shows here
        counts = torch.bincount(pred)
        out["top_class"] = int(counts.argmax())
        out["top_class_share"] = counts.max().item() / n
    if cfg is not None:
        out["robust_acc"] = robust_ok.sum().item() / n
        out["attack"] = f"pgd-{cfg.steps}x{cfg.restarts} eps={cfg.eps:.6g} step={cfg.step_size:.6g} loss={cfg.loss}"
    return out


def _pgd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor, tracker: Tracker,
              cfg: PGDConfig, generator: torch.Generator | None, bf16: bool, loss: str) -> int:
    """PGD on rows (x[i], y[i]) that attack example owner[i] (several rows may share an owner: batched restarts).

    A row stops once its example is broken (by it or by a sibling row). Returns the gradient evaluations spent.
    """
    start = (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1) * cfg.eps
    cur = project(x + start, x, cfg.eps)
    # the best (lowest-margin) iterate of each row; reduced to one per owner at the end
    row_best = torch.full((len(x),), float("inf"), device=x.device)
    row_x = cur.clone()
    ids = torch.arange(len(x), device=x.device)
    xs, ys, work = x, y, 0
    for t in range(cfg.steps + 1):
        last = t == cfg.steps
        if last:
            with torch.no_grad():
                logits = model(cur).float()
        else:
            cur.requires_grad_(True)
            with torch.enable_grad():
                logits = forward_logits(model, cur, bf16)
                grad = input_grad(per_example_loss(logits, ys, loss).sum(), cur)
            cur = cur.detach()
            logits = logits.detach()
            work += len(cur)
        m, fooled = confirm(model, cur, ys, logits, bf16 and not last)
        keep_best_rows(tracker, owner[ids], ids, cur, m, fooled, row_best, row_x)
        if last:
            break
        live = ~tracker.broken[owner[ids]]
        n_live = int(live.sum())
        if n_live == 0:
            break
        size = shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = live_first(live, size)
            xs, ys, cur, grad, ids = xs[sel], ys[sel], cur[sel], grad[sel], ids[sel]
        cur = project(cur + cfg.step_size * grad.sign(), xs, cfg.eps)
    hand_over(tracker, owner, row_x, row_best)
    return work


def pgd_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig,
             generator: torch.Generator | None = None, *, batch_size: int = 512, bf16: bool = False,
             loss: str | None = None, attack: torch.Tensor | None = None) -> AttackResult:
    """Worst-case PGD robust accuracy, fast and exact: `cfg.restarts` restarts of `cfg.steps` steps each.

    The first restart attacks every clean-correct example; the remaining restarts are batched (each surviving
    example's restarts run side by side, `batch_size` rows at a time) and a row stops as soon as any row of its
    example fools the model. An example is robust iff no iterate of any restart fools the model, which implies
    the textbook rule (the final iterate of every restart is classified correctly).

    attack: bool mask of the examples to attack (default: those the model classifies correctly). Examples in it
    that the model already misclassifies (a different judge, e.g. the exported artifact, may not) are attacked
    for the whole budget without stopping, and keep their most misclassified iterate.
    """
    loss = loss or cfg.loss
    if loss not in ("ce", "dlr"):
        raise ValueError(f"pgd_eval: loss must be 'ce' or 'dlr', not {loss!r}")
    t0 = time.perf_counter()
    x = as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits = chunked_logits(predict, x, batch_size)
        clean = clean_logits.argmax(1) == y
        tracker = Tracker.start(x, clean_logits, y, clean, attack)
        todo = torch.nonzero(~tracker.broken).squeeze(1)
        for s in range(0, len(todo), batch_size):
            ex = todo[s:s + batch_size]
            work += _pgd_rows(model, x[ex], y[ex], ex, tracker, cfg, generator, bf16, loss)
        if cfg.restarts > 1:
            alive = torch.nonzero(~tracker.broken).squeeze(1)
            rows = alive.repeat_interleave(cfg.restarts - 1)  # example-major: an example's restarts side by side
            for s in range(0, len(rows), batch_size):
                ex = rows[s:s + batch_size]
                ex = ex[~tracker.broken[ex]]
                if ex.numel():
                    work += _pgd_rows(model, x[ex], y[ex], ex, tracker, cfg, generator, bf16, loss)
        robust, _ = judge_adversarial(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.steps, "restarts": cfg.restarts, "loss": loss,
              "bf16": bf16}
    return AttackResult("pgd", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)



@register_attack("pgd", kind="white-box", order=10)
def run_pgd(model: nn.Module, judge, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings,
            generator: torch.Generator, attack: torch.Tensor) -> AttackResult:
    """Cross-entropy PGD, settings.steps x settings.restarts, step settings.step_size."""
    cfg = PGDConfig(eps=settings.eps, step_size=settings.step_size, steps=settings.steps, restarts=settings.restarts)
    return pgd_eval(model, x, y, cfg, generator, batch_size=settings.batch_size, bf16=settings.bf16, attack=attack)

"""L-infinity attacks: the one implementation that training and verification share.

Field rules kept here so no caller can forget them: inputs live in [0, 1] (normalisation is inside the
model), the model is in eval mode while an attack is crafted (BatchNorm uses running statistics),
adversarial examples never leave the eps-ball nor [0, 1], and robust accuracy is the worst case per
example over restarts (an example counts only if it survives every one).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sparse import frozen_weights


def parse_eps(value: str | float) -> float:
    """'8/255', '0.03', 0.03 -> float. Raises ValueError with a readable message."""
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip()
        try:
            out = float(Fraction(text)) if "/" in text else float(text)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"not a number or fraction: {value!r} (write e.g. 8/255 or 0.031)") from None
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{value!r} is outside [0, 1] (inputs are in [0, 1])")
    return out


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 10
    restarts: int = 1
    loss: str = "ce"  # "ce": maximise cross-entropy; "kl": TRADES' KL(p(x) || p(x_adv))
    random_start: bool = True


@contextlib.contextmanager
def attack_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, sparse weights computed once: the weights are constants here."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with frozen_weights(model):
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


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
    x_adv = _project(x + start, x, cfg.eps)
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        loss = _attack_loss(model(x_adv), y, cfg.loss, ref_prob)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = _project(x_adv.detach() + cfg.step_size * grad.sign(), x, cfg.eps)
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
    """
    from .data import to_float

    float_inputs = float_inputs if float_inputs is not None else (x.dtype != torch.uint8)
    was_training = model.training
    model.eval()
    clean_ok = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    robust_ok = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    try:
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            xb = x[sl] if float_inputs else to_float(x[sl])
            yb = y[sl]
            with attack_mode(model):
                ok = _predict(model, xb) == yb
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
    if cfg is not None:
        out["robust_acc"] = robust_ok.sum().item() / n
        out["attack"] = f"pgd-{cfg.steps}x{cfg.restarts} eps={cfg.eps:.6g} step={cfg.step_size:.6g} loss={cfg.loss}"
    return out

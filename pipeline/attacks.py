"""L-infinity attacks: the one implementation that training and verification share.

Field rules kept here so no caller can forget them: inputs live in [0, 1] (normalisation is inside the
model), the model is in eval mode while an attack is crafted (BatchNorm uses running statistics),
adversarial examples never leave the eps-ball nor [0, 1], and robust accuracy is the worst case per
example over restarts (an example counts only if it survives every one).
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Sequence

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
    `top_class`/`top_class_share`: the class predicted most often on the clean images, and its share.
    """
    from .data import to_float

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


# =====================================================================================================
# Evaluation (rsp verify): worst-case PGD, APGD-CE / APGD-T (DLR), Square, the ensemble, ANP-VS vulnerability.
#
# Shared rules, on top of the field rules above:
# * An example is *broken* as soon as any iterate of any restart of any attack is misclassified; the attack
#   keeps that iterate as the example's adversarial example. This is at least as strong as checking only the
#   final iterate of each restart (the textbook rule), for the same random starts.
# * Examples never interact: every per-example quantity (loss, step size, schedule state) is computed per row,
#   and an eval-mode model treats rows independently, so dropping the broken rows from the batch changes
#   nothing for the others. That is what makes early stopping exact, and where most of the speed comes from.
# * Decisions are made in float32. With `bf16=True` the gradient passes run under bfloat16 autocast; an
#   iterate they flag as misclassified is confirmed by a float32 forward before it counts (PGD also checks
#   every restart's final iterate in float32). bf16 only ever steers the search, it never decides an outcome.
# * The reported flags are recomputed at the end from the returned adversarial examples by the *judge*: the
#   model itself (float32, eval mode) or, in `ensemble_eval`, an optional `predict` callable (the exported
#   artifact). So the flags and the returned examples always agree.
# * Random draws come from the torch.Generator passed in (the ensemble seeds one per attack from `seed` and the
#   attack's name): same seed, same inputs, same arguments -> same result.
# =====================================================================================================

Predict = Callable[[torch.Tensor], "torch.Tensor"]
"""A query-only model (e.g. an onnxruntime or TVM session wrapper): called with a float32 NCHW tensor in [0, 1]
on the device of the evaluated images, returns logits [n, classes] as a tensor or anything numpy can read.
It is never differentiated."""

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "square")
WHITE_BOX = ("pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t")
BLACK_BOX = ("square",)


@dataclass
class AttackResult:
    """What one attack found, per example (all tensors have the length of the evaluated set)."""

    name: str
    x_adv: torch.Tensor  # the fooling iterate if broken, else the most adversarial (lowest-margin) one found
    robust: torch.Tensor  # bool: correct on x and on x_adv (judged in float32 after the attack)
    clean: torch.Tensor  # bool: correct on x
    work: int  # example-gradient evaluations (white-box) or example-queries (black-box)
    seconds: float
    config: dict

    @property
    def robust_acc(self) -> float:
        return self.robust.sum().item() / max(1, len(self.robust))

    @property
    def clean_acc(self) -> float:
        return self.clean.sum().item() / max(1, len(self.clean))


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{k != y} z_k per row (negative: misclassified)."""
    logits = logits.float()
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
    return zy - other


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Croce & Hein's difference-of-logits ratio, per row (to be maximised).

    Untargeted: -(z_y - max_{k!=y} z_k) / (z_pi1 - z_pi3); targeted: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2).
    Needs at least 3 (untargeted) or 4 (targeted) classes.
    """
    z = logits.float()
    zs = z.sort(dim=1, descending=True).values
    zy = z.gather(1, y[:, None]).squeeze(1)
    if target is None:
        return -margin(z, y) / (zs[:, 0] - zs[:, 2] + 1e-12)
    zt = z.gather(1, target[:, None]).squeeze(1)
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def _per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None):
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    if loss == "dlr-t":
        return dlr_loss(logits, y, target)
    raise ValueError(f"unknown evaluation loss {loss!r} (ce, dlr, dlr-t)")


def _input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zero where the output does not depend on x through autograd (a lookup, an argmax, ...)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def _forward(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    if bf16:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return model(x).float()
    return model(x).float()


def _as_float_images(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x


def _to_logits(out, device) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().to(device=device, dtype=torch.float32)
    import numpy as np

    return torch.as_tensor(np.asarray(out), dtype=torch.float32, device=device)


def model_predict(model: nn.Module) -> Predict:
    """The query-only view of a PyTorch model (float32, no gradients); wrap calls in `attack_mode`."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x).float()

    return predict


def _chunked_logits(predict: Predict, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [_to_logits(predict(x[i:i + batch_size]), x.device) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, 1, device=x.device)


class _Tracker:
    """Per-example outcome across restarts/targets: broken flag, kept iterate, lowest margin seen."""

    def __init__(self, x: torch.Tensor, clean_margin: torch.Tensor):
        self.x_adv = x.clone()
        self.best = clean_margin.clone()  # lowest margin seen so far (a broken example is pinned at -inf)
        self.broken = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        # examples whose attack ends at the first fooling iterate (all, except those the attacked model already
        # misclassifies clean but a different judge does not: those keep maximising their loss)
        self.stop = torch.ones(len(x), dtype=torch.bool, device=x.device)

    @classmethod
    def start(cls, x: torch.Tensor, clean_logits: torch.Tensor, y: torch.Tensor, clean: torch.Tensor,
              attack: torch.Tensor | None) -> "_Tracker":
        tracker = cls(x, margin(clean_logits, y))
        if attack is None:
            attack = clean
        tracker.broken |= ~attack
        tracker.stop = clean.clone()
        return tracker

    def offer(self, ex: torch.Tensor, xs: torch.Tensor, m: torch.Tensor, fooled: torch.Tensor) -> None:
        """Rows xs of examples ex (each example at most once) with margins m; fooled rows pin their example."""
        m = torch.where(fooled, torch.full_like(m, float("-inf")), m)
        better = m < self.best[ex]
        if better.any():
            sel = ex[better]
            self.best[sel] = m[better]
            self.x_adv[sel] = xs[better].detach()
        if fooled.any():
            self.broken[ex[fooled]] = True


def _confirm(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, logits: torch.Tensor, bf16: bool):
    """Margins and fooled flags for rows xs; with bf16 the rows flagged fooled are re-judged in float32."""
    m = margin(logits, ys)
    fooled = logits.argmax(1) != ys
    if bf16 and fooled.any():
        idx = torch.nonzero(fooled).squeeze(1)
        with torch.no_grad():
            exact = model(xs[idx].detach()).float()
        m[idx] = margin(exact, ys[idx])
        fooled[idx] = exact.argmax(1) != ys[idx]
    return m, fooled


def _keep_best_rows(tracker: _Tracker, owners: torch.Tensor, ids: torch.Tensor, cur: torch.Tensor, m: torch.Tensor,
                    fooled: torch.Tensor, row_best: torch.Tensor, row_x: torch.Tensor) -> None:
    """Rows `ids` (of examples `owners`) keep their lowest-margin iterate; a fooling iterate is pinned at -inf and
    breaks its example, unless that example keeps attacking (tracker.stop false)."""
    fooled = fooled & tracker.stop[owners]
    m = torch.where(fooled, torch.full_like(m, float("-inf")), m)
    better = m < row_best[ids]
    row_best[ids[better]] = m[better]
    row_x[ids[better]] = cur[better]
    if fooled.any():
        tracker.broken[owners[fooled]] = True


def _first_per_owner(owner: torch.Tensor) -> torch.Tensor:
    """Row mask: the first row of each owner."""
    pos = torch.arange(len(owner), device=owner.device)
    first = torch.full((int(owner.max()) + 1,), len(owner), dtype=torch.long, device=owner.device)
    first = first.scatter_reduce(0, owner, pos, reduce="amin", include_self=True)
    return first[owner] == pos


_LADDER = sorted({max(1, round(1.25 ** j)) for j in range(0, 80)})


def _shrink_to(n_live: int, n_rows: int) -> int:
    """How many rows to keep when n_live of n_rows are still useful: the smallest size of a fixed geometric ladder
    (ratio 1.25) that holds n_live, or n_rows (no change) if that is not smaller. Batch shapes then come from a
    short list, which keeps oneDNN/cuDNN primitive caches warm (a new shape costs ~30 % more per row on CPU and
    a cuDNN autotune on GPU); the padding rows cost at most 25 % extra work."""
    for size in _LADDER:
        if size >= n_live:
            return size if size < n_rows else n_rows
    return n_rows


def _live_first(live: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of `keep` rows: every live row first (in order), then dead rows as padding."""
    return torch.argsort((~live).to(torch.int8), stable=True)[:keep]


def _hand_over(tracker: _Tracker, owner: torch.Tensor, row_x: torch.Tensor, row_best: torch.Tensor) -> None:
    """One row per owner goes to the tracker: a fooling row (margin -inf) if any, else the lowest margin."""
    order = torch.argsort(row_best, stable=True)
    pick = order[_first_per_owner(owner[order])]
    tracker.offer(owner[pick], row_x[pick], row_best[pick], row_best[pick] == float("-inf"))


def _pgd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, owner: torch.Tensor, tracker: _Tracker,
              cfg: PGDConfig, generator: torch.Generator | None, bf16: bool, loss: str) -> int:
    """PGD on rows (x[i], y[i]) that attack example owner[i] (several rows may share an owner: batched restarts).

    A row stops once its example is broken (by it or by a sibling row). Returns the gradient evaluations spent.
    """
    start = (torch.rand(x.shape, device=x.device, dtype=x.dtype, generator=generator) * 2 - 1) * cfg.eps
    cur = _project(x + start, x, cfg.eps)
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
                logits = _forward(model, cur, bf16)
                grad = _input_grad(_per_example_loss(logits, ys, loss).sum(), cur)
            cur = cur.detach()
            logits = logits.detach()
            work += len(cur)
        m, fooled = _confirm(model, cur, ys, logits, bf16 and not last)
        _keep_best_rows(tracker, owner[ids], ids, cur, m, fooled, row_best, row_x)
        if last:
            break
        live = ~tracker.broken[owner[ids]]
        n_live = int(live.sum())
        if n_live == 0:
            break
        size = _shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = _live_first(live, size)
            xs, ys, cur, grad, ids = xs[sel], ys[sel], cur[sel], grad[sel], ids[sel]
        cur = _project(cur + cfg.step_size * grad.sign(), xs, cfg.eps)
    _hand_over(tracker, owner, row_x, row_best)
    return work


def _judge(predict: Predict, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, batch_size: int):
    logits = _chunked_logits(predict, x_adv, batch_size)
    return clean & (logits.argmax(1) == y), logits


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
    x = _as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits = _chunked_logits(predict, x, batch_size)
        clean = clean_logits.argmax(1) == y
        tracker = _Tracker.start(x, clean_logits, y, clean, attack)
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
        robust, _ = _judge(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": cfg.eps, "step_size": cfg.step_size, "steps": cfg.steps, "restarts": cfg.restarts, "loss": loss,
              "bf16": bf16}
    return AttackResult("pgd", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


def _apgd_rows(model: nn.Module, x: torch.Tensor, y: torch.Tensor, ex: torch.Tensor, tracker: _Tracker, *,
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
            logits = _forward(model, cur, bf16)
            loss_i = _per_example_loss(logits, ys, loss, tg)
            grad = _input_grad(loss_i.sum(), cur)
        work += len(cur)
        cur = cur.detach()
        m, fooled = _confirm(model, cur, ys, logits.detach(), bf16)
        _keep_best_rows(tracker, ex[ids], ids, cur, m, fooled, row_best, row_x)
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
        size = _shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = _live_first(live, size)
            s = {key: v[sel] for key, v in s.items()}
            ids = ids[sel]
        xs, cur, prev = s["xs"], s["cur"], s["prev"]
        a = alpha if i > 0 else 1.0
        z = _project(cur + s["step"].view(view) * s["grad"].sign(), xs, eps)
        nxt = _project(cur + a * (z - cur) + (1 - a) * (cur - prev), xs, eps)
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
    _hand_over(tracker, ex, row_x, row_best)
    return work


def _clean_start(predict: Predict, x: torch.Tensor, y: torch.Tensor, batch_size: int, attack, name: str,
                 min_classes: int):
    """What every white-box attack starts from: the clean logits, the class count, which examples are clean,
    and the tracker. A model with fewer than `min_classes` classes is refused, unless there is no example left
    to attack (a cumulative ensemble whose earlier attacks broke them all)."""
    clean_logits = _chunked_logits(predict, x, batch_size)
    n_classes = clean_logits.shape[1] if len(clean_logits) else 0
    if len(x) and n_classes < min_classes:
        raise ValueError(f"{name} needs at least {min_classes} classes, the model has {n_classes}")
    clean = clean_logits.argmax(1) == y
    return clean_logits, n_classes, clean, _Tracker.start(x, clean_logits, y, clean, attack)


def _wrong_classes_ranked(clean_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the wrong classes from most to least likely on the clean input (the targets of APGD-T, FAB-T)."""
    return clean_logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)


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
    x = _as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits, n_classes, clean, tracker = _clean_start(predict, x, y, batch_size, attack, name,
                                                               {"ce": 0, "dlr": 3, "dlr-t": 4}[loss])
        if loss == "dlr-t":
            ranked = _wrong_classes_ranked(clean_logits, y)
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
        robust, _ = _judge(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": eps, "steps": steps, "restarts": restarts, "loss": loss, "bf16": bf16, "rho": rho}
    if loss == "dlr-t":
        config["n_target_classes"] = n_target_classes
    return AttackResult(name, tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


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
    x = _as_float_images(x)
    n, c, h, w = x.shape
    clean_logits = _chunked_logits(predict, x, batch_size)
    clean = clean_logits.argmax(1) == y
    tracker = _Tracker(x, margin(clean_logits, y))
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
        logits = _to_logits(predict(best), x.device)
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
            logits = _to_logits(predict(cand), x.device)
            work += k
            m_new = margin(logits, ys[act])
            f_new = logits.argmax(1) != ys[act]
            take = (m_new < m_best[act]) | f_new
            sel = act[take]
            best[sel], m_best[sel] = cand[take], m_new[take]
            fooled[sel] = f_new[take]
        tracker.offer(ex, best, m_best, fooled)
    robust, _ = _judge(predict, tracker.x_adv, y, clean, batch_size)
    work += len(x)
    config = {"eps": eps, "queries": queries, "p_init": p_init}
    return AttackResult("square", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


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
            grad = _input_grad(diff.sum(), z)
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
        size = _shrink_to(n_live, len(ids))
        if size < len(ids):
            sel = _live_first(live, size)
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
    x = _as_float_images(x)
    work = 0
    with attack_mode(model):
        predict = model_predict(model)
        clean_logits, n_classes, clean, tracker = _clean_start(predict, x, y, batch_size, attack, "fab-t", 2)
        ranked = _wrong_classes_ranked(clean_logits, y)
        for r in range(min(n_target_classes, n_classes - 1)):
            for restart in range(max(1, restarts)):
                todo = torch.nonzero(~tracker.broken).squeeze(1)
                for s in range(0, len(todo), batch_size):
                    ex = todo[s:s + batch_size]
                    found, _, w = _fab_rows(model, x[ex], y[ex], ranked[ex, r], eps=eps, steps=steps,
                                            random_start=restart > 0, generator=generator, eta=eta, beta=beta,
                                            alpha_max=alpha_max)
                    work += w
                    found = _project(found, x[ex], eps)  # confirm inside the ball, in float32
                    with torch.no_grad():
                        logits = model(found).float()
                    tracker.offer(ex, found, margin(logits, y[ex]), logits.argmax(1) != y[ex])
        robust, _ = _judge(predict, tracker.x_adv, y, clean, batch_size)
    config = {"eps": eps, "steps": steps, "restarts": restarts, "n_target_classes": n_target_classes, "eta": eta,
              "beta": beta, "alpha_max": alpha_max}
    return AttackResult("fab-t", tracker.x_adv, robust, clean, work, time.perf_counter() - t0, config)


def attack_seed(seed: int, name: str) -> int:
    """The seed of one attack's generator: depends on the run's seed and the attack's name only, so adding or
    dropping other attacks never changes an attack's draws."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def default_step_size(eps: float, steps: int) -> float:
    """eps/4 (2/255 at eps = 8/255), or 2.5 * eps / steps where that is larger, so the ball can be crossed."""
    return max(eps / 4, 2.5 * eps / max(1, steps))


def ensemble_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[str] = ATTACKS,
                  eps: float = 8 / 255, steps: int = 50, restarts: int = 10, seed: int = 0,
                  predict: Predict | None = None, *, step_size: float | None = None, apgd_steps: int | None = None,
                  apgd_restarts: int = 1, n_target_classes: int = 9, square_queries: int = 5000, p_init: float = 0.8,
                  fab_steps: int = 100, fab_restarts: int = 1, batch_size: int = 512, bf16: bool = False,
                  cumulative: bool = False) -> dict:
    """Robust accuracy under each attack and under all of them (the per-example minimum).

    attacks: any of 'pgd' (steps x restarts, CE, step `step_size` or `default_step_size`), 'apgd-ce', 'apgd-dlr',
    'apgd-t' (APGD with `apgd_steps`, default 100 as in AutoAttack, `apgd_restarts` each; apgd-t over
    `n_target_classes` targets), 'fab-t' (targeted FAB, `fab_steps` steps, `fab_restarts` runs per each of the
    `n_target_classes` targets) and 'square' (`square_queries` queries). White-box attacks use `model`; if
    `predict` (the exported artifact) is given, Square queries it, and every attack's adversarial examples and
    the clean inputs are judged by it, so the reported figures are the artifact's (`model_robust_acc` keeps
    the PyTorch twin's own figure); white-box attacks then attack every example the artifact gets right, also
    those the twin gets wrong (without early stopping: they keep the twin's most misclassified iterate). cumulative=True runs each attack only on the examples every earlier one
    left robust (AutoAttack's order; faster, and the per-attack figures become running minima).

    Returns a dict: eps, seed, n, attacks, judge, mode, clean_acc, robust_acc (worst case), per_attack {name:
    robust_acc, model_robust_acc, seconds, work, seed, config}, and tensors: clean, robust, robust_by_attack
    {name: bool[n]}, x_adv (per example: a fooling example from the first attack that fooled the judge, else
    the lowest-margin one), x_adv_by_attack {name: float[n, ...]}, worst_attack (index into attacks per example,
    -1 where the clean input is already wrong).
    """
    attacks = list(attacks)
    known = WHITE_BOX + BLACK_BOX
    bad = [a for a in attacks if a not in known]
    if bad or not attacks:
        raise ValueError(f"unknown attack(s) {bad or attacks}; choose from {', '.join(known)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {attacks}")
    x = _as_float_images(x)
    n = len(y)
    device = x.device
    apgd_steps = 100 if apgd_steps is None else apgd_steps
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    per_attack, robust_by, x_by = {}, {}, {}
    margins = []
    with attack_mode(model):
        judge = predict or model_predict(model)
        clean_logits = _chunked_logits(judge, x, batch_size)
        clean = clean_logits.argmax(1) == y
        alive = clean.clone()
        x_worst = x.clone()
        for name in attacks:
            gen = torch.Generator(device).manual_seed(attack_seed(seed, name))
            idx = torch.nonzero(alive).squeeze(1) if cumulative else torch.arange(n, device=device)
            xs, ys = x[idx], y[idx]
            if name == "pgd":
                cfg = PGDConfig(eps=eps, step_size=step_size, steps=steps, restarts=restarts)
                res = pgd_eval(model, xs, ys, cfg, gen, batch_size=batch_size, bf16=bf16, attack=clean[idx])
            elif name.startswith("apgd"):
                loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-t"}[name]
                res = apgd_eval(model, xs, ys, eps=eps, steps=apgd_steps, restarts=apgd_restarts, loss=loss,
                                n_target_classes=n_target_classes, generator=gen, batch_size=batch_size, bf16=bf16,
                                attack=clean[idx])
            elif name == "fab-t":
                res = fab_eval(model, xs, ys, eps=eps, steps=fab_steps, restarts=fab_restarts,
                               n_target_classes=n_target_classes, generator=gen, batch_size=batch_size,
                               attack=clean[idx])
            else:
                res = square_eval(judge, xs, ys, eps=eps, queries=square_queries, p_init=p_init, generator=gen,
                                  batch_size=batch_size)
            adv = x_worst.clone() if cumulative else torch.empty_like(x)
            adv[idx] = res.x_adv
            logits = _chunked_logits(judge, adv, batch_size)
            rob = clean & (logits.argmax(1) == y)
            if cumulative:
                rob &= alive
            model_rob = torch.zeros(n, dtype=torch.bool, device=device)
            model_rob[idx] = res.robust
            m = margin(logits, y).masked_fill(~rob & clean, float("-inf"))
            if cumulative:
                m = m.masked_fill(~alive, float("inf"))  # not attacked here: keep the earlier example
            margins.append(m)
            robust_by[name], x_by[name] = rob, adv
            alive &= rob
            per_attack[name] = {"robust_acc": rob.sum().item() / max(1, n),
                                "model_robust_acc": model_rob.sum().item() / max(1, n),
                                "seconds": res.seconds, "work": res.work, "seed": attack_seed(seed, name),
                                "config": res.config}
            if cumulative:
                x_worst = adv
        stacked = torch.stack(margins)  # [attacks, n]; a fooling example has margin -inf
        worst = torch.argmin(stacked, dim=0)  # first minimum: the first attack that fooled the judge
        x_adv = torch.stack([x_by[a] for a in attacks])[worst, torch.arange(n, device=device)] if n else x.clone()
        robust = torch.stack([robust_by[a] for a in attacks]).all(0)
        worst = torch.where(clean, worst, torch.full_like(worst, -1))
        x_adv[~clean] = x[~clean]
    return {"eps": eps, "seed": seed, "n": n, "attacks": attacks, "judge": "predict" if predict else "model",
            "mode": "cumulative" if cumulative else "standalone",
            "clean_acc": clean.sum().item() / max(1, n), "robust_acc": robust.sum().item() / max(1, n),
            "per_attack": per_attack, "clean": clean, "robust": robust, "robust_by_attack": robust_by,
            "x_adv": x_adv, "x_adv_by_attack": x_by, "worst_attack": worst}


def feature_sites(model: nn.Module, sites: str = "auto") -> tuple[list[tuple[str, nn.Module]], str]:
    """The latent features z of ANP-VS: outputs of the model's nn.ReLU modules (sites='relu', or 'auto' when
    it has any), else of its conv/linear layers (sites='layers')."""
    if sites not in ("auto", "relu", "layers"):
        raise ValueError(f"sites must be auto, relu or layers, not {sites!r}")
    relus = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    if sites == "relu" or (sites == "auto" and relus):
        chosen, used = relus, "relu"
    else:
        chosen, used = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))], "layers"
    if not chosen:
        raise ValueError(f"the model has no {'nn.ReLU' if used == 'relu' else 'conv/linear'} modules to hook")
    return chosen, used


@contextlib.contextmanager
def capture_features(model: nn.Module, sites: str = "auto", detach: bool = True) -> Iterator[list]:
    """Collect (site name, output) of every feature site during the forward passes run inside the block, in
    call order (a module called twice gives two entries, "name" and "name#1"). The list is yielded; clear it
    between passes. detach=False keeps the graph (the VS training loss)."""
    chosen, _ = feature_sites(model, sites)
    captured: list[tuple[str, torch.Tensor]] = []

    def make_hook(name):
        def hook(_m, _inp, out):
            calls = sum(1 for k, _ in captured if k.split("#")[0] == name)
            captured.append((f"{name}#{calls}" if calls else name, out.detach().float() if detach else out.float()))
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in chosen]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def vulnerability_loss(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The ANP-VS vulnerability suppression term, differentiable: mean over feature sites of
    mean |z(x) - z(x_adv)|, in the model's current mode (train mode in training)."""
    with capture_features(model, detach=False) as z:
        model(x)
        clean = list(z)
        z.clear()
        model(x_adv)
        terms = [(zc - za).abs().mean() for (_, zc), (_, za) in zip(clean, z)]
    return torch.stack(terms).mean()


def latent_vulnerability(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, *, batch_size: int = 256,
                         sites: str = "auto") -> dict:
    """ANP-VS latent-feature vulnerability (Madaan et al. 2020): mean over layers of mean |z(x) - z(x_adv)|.

    z are the outputs of the model's nn.ReLU modules (the activations of its conv/linear layers; a module
    called twice counts as two layers) with sites='relu' or 'auto'; with sites='layers', or 'auto' on a model
    without nn.ReLU modules, the conv/linear outputs themselves. Per layer the mean runs over examples and
    features; the result is the plain mean over layers. Eval mode, no gradients.
    """
    x, x_adv = _as_float_images(x), _as_float_images(x_adv)
    _, used = feature_sites(model, sites)
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with capture_features(model, sites) as captured, attack_mode(model), torch.no_grad():
        for s in range(0, len(x), batch_size):
            captured.clear()
            model(x[s:s + batch_size])
            clean_z = list(captured)
            captured.clear()
            model(x_adv[s:s + batch_size])
            for (key, zc), (_, za) in zip(clean_z, captured):
                sums[key] = sums.get(key, 0.0) + (zc - za).abs().sum().item()
                counts[key] = counts.get(key, 0) + zc.numel()
    layers = {k: sums[k] / max(1, counts[k]) for k in sums}
    return {"vulnerability": sum(layers.values()) / max(1, len(layers)), "layers": layers, "sites": used}

"""What every attack shares: the field rules in code (eval mode, the eps-ball and [0, 1]), losses and margins,
the per-example bookkeeping of early stopping, and the judging of adversarial examples."""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sparse import frozen_weights


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


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


# =====================================================================================================
# Evaluation (rsp verify): the rules the built-in attacks follow, on top of the field rules (rsp.attacks):
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


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, target: torch.Tensor | None = None):
    if loss == "ce":
        return F.cross_entropy(logits.float(), y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    if loss == "dlr-t":
        return dlr_loss(logits, y, target)
    raise ValueError(f"unknown evaluation loss {loss!r} (ce, dlr, dlr-t)")


def input_grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d loss / d x; zero where the output does not depend on x through autograd (a lookup, an argmax, ...)."""
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad


def forward_logits(model: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    if bf16:
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            return model(x).float()
    return model(x).float()


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x


def to_logits(out, device) -> torch.Tensor:
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


def chunked_logits(predict: Predict, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [to_logits(predict(x[i:i + batch_size]), x.device) for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.zeros(0, 1, device=x.device)


class Tracker:
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
              attack: torch.Tensor | None) -> "Tracker":
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


def confirm(model: nn.Module, xs: torch.Tensor, ys: torch.Tensor, logits: torch.Tensor, bf16: bool):
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


def keep_best_rows(tracker: Tracker, owners: torch.Tensor, ids: torch.Tensor, cur: torch.Tensor, m: torch.Tensor,
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


def shrink_to(n_live: int, n_rows: int) -> int:
    """How many rows to keep when n_live of n_rows are still useful: the smallest size of a fixed geometric ladder
    (ratio 1.25) that holds n_live, or n_rows (no change) if that is not smaller. Batch shapes then come from a
    short list, which keeps oneDNN/cuDNN primitive caches warm (a new shape costs ~30 % more per row on CPU and
    a cuDNN autotune on GPU); the padding rows cost at most 25 % extra work."""
    for size in _LADDER:
        if size >= n_live:
            return size if size < n_rows else n_rows
    return n_rows


def live_first(live: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of `keep` rows: every live row first (in order), then dead rows as padding."""
    return torch.argsort((~live).to(torch.int8), stable=True)[:keep]


def hand_over(tracker: Tracker, owner: torch.Tensor, row_x: torch.Tensor, row_best: torch.Tensor) -> None:
    """One row per owner goes to the tracker: a fooling row (margin -inf) if any, else the lowest margin."""
    order = torch.argsort(row_best, stable=True)
    pick = order[_first_per_owner(owner[order])]
    tracker.offer(owner[pick], row_x[pick], row_best[pick], row_best[pick] == float("-inf"))


def judge_adversarial(predict: Predict, x_adv: torch.Tensor, y: torch.Tensor, clean: torch.Tensor, batch_size: int):
    logits = chunked_logits(predict, x_adv, batch_size)
    return clean & (logits.argmax(1) == y), logits


def clean_start(predict: Predict, x: torch.Tensor, y: torch.Tensor, batch_size: int, attack, name: str,
                 min_classes: int):
    """What every white-box attack starts from: the clean logits, the class count, which examples are clean,
    and the tracker. A model with fewer than `min_classes` classes is refused, unless there is no example left
    to attack (a cumulative ensemble whose earlier attacks broke them all)."""
    clean_logits = chunked_logits(predict, x, batch_size)
    n_classes = clean_logits.shape[1] if len(clean_logits) else 0
    if len(x) and n_classes < min_classes:
        raise ValueError(f"{name} needs at least {min_classes} classes, the model has {n_classes}")
    clean = clean_logits.argmax(1) == y
    return clean_logits, n_classes, clean, Tracker.start(x, clean_logits, y, clean, attack)


def wrong_classes_ranked(clean_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the wrong classes from most to least likely on the clean input (the targets of APGD-T, FAB-T)."""
    return clean_logits.scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)


def attack_seed(seed: int, name: str) -> int:
    """The seed of one attack's generator: depends on the run's seed and the attack's name only, so adding or
    dropping other attacks never changes an attack's draws."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def default_step_size(eps: float, steps: int) -> float:
    """eps/4 (2/255 at eps = 8/255), or 2.5 * eps / steps where that is larger, so the ball can be crossed."""
    return max(eps / 4, 2.5 * eps / max(1, steps))

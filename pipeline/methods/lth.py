"""`lth`: iterative magnitude pruning with rewinding (lottery tickets), robust objective throughout.

Frankle & Carbin, "The Lottery Ticket Hypothesis", ICLR 2019; rewinding to an early iteration k instead
of the initialisation: Frankle et al., "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
ICML 2020. The rule, for R pruning rounds:

    train the dense network; remember its weights at iteration k (the rewind point)
    repeat R times:
        prune: keep the keep_r largest |w| among the surviving weights, one global threshold over all
               conv/linear layers, keep_r = round(N * q^r), q = (1 - sparsity)^(1/R); keep_R = budget K
        rewind: every parameter and BatchNorm buffer back to the rewind point; pruned weights stay 0
        train the survivors under the fixed mask

Phases: `warmup` (iterations 0..k, dense), `round-0` (dense, from k), `round-1` .. `round-R` (masked).
Each rewound round replays round 0 from k: the same length (1 - rewind_fraction of a round) and the same
lr schedule, so --epochs is split as rewind_fraction + (R + 1) * (1 - rewind_fraction) equal parts.
The paper's 20 % per round would take ~21 rounds to reach 99 %; the default R = 3 prunes to
(1 - sparsity)^(1/3) of the survivors per round (0.215 at 99 %, 0.464 at 90 %).
rewind_fraction = 0 rewinds to the initialisation (the original 2019 rule) and has no warmup phase.

`lth-reinit` is the paper's control (Frankle & Carbin, "random reinitialization"): the same rounds and masks,
but at each rewind the surviving conv/linear weights are drawn afresh from the initial distribution (the
model's own init: Kaiming normal fan_out for convs, PyTorch's default for linears) instead of being rewound;
BatchNorm and biases still rewind. Its masks come from its own rounds (iterative pruning with random
re-initialisation), not from an lth run's final mask. A winning ticket is one that beats this control at the
same budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..sparse import FixedMask, global_magnitude_masks, sparsifiable_layers
from . import Method, Phase, budget_of, register


def keep_schedule(total: int, budget: int, rounds: int) -> list[int]:
    """Weights kept in rounds 0..R: N, round(N q), ..., round(N q^(R-1)), K, with q = (K / N)^(1/R)
    (K / N is 1 - sparsity up to rounding); non-increasing and never under K."""
    q = (budget / total) ** (1.0 / rounds) if total else 1.0
    keeps = [total] + [max(budget, round(total * q**r)) for r in range(1, rounds)] + [budget]
    for i in range(1, len(keeps)):
        keeps[i] = min(keeps[i], keeps[i - 1])
    return keeps


def prune_survivors(model: nn.Module, keep: int) -> dict[str, torch.Tensor]:
    """Global magnitude masks keeping `keep` weights among the non-zero ones (the survivors of earlier
    rounds: after to_dense pruned weights are exact zeros), so each round's mask lies within the last."""
    masks = global_magnitude_masks(model, keep)
    return {n: masks[n] * (m.weight.detach() != 0).to(masks[n].dtype) for n, m in sparsifiable_layers(model)}


REINITS = ("rewind", "random")  # what the surviving weights restart from after a pruning round


def redraw_weights(model: nn.Module, generator: torch.Generator) -> None:
    """Fresh conv/linear weights from the model's initial distribution (rsp.models.layers.init_weights:
    Kaiming normal fan_out for convs, PyTorch's default uniform +-1/sqrt(fan_in) for linears)."""
    with torch.no_grad():
        for _, m in sparsifiable_layers(model):
            w = m.weight
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
            if isinstance(m, nn.Conv2d):
                w.copy_(torch.randn(w.shape, generator=generator) * math.sqrt(2.0 / fan_out))
            else:
                w.copy_((torch.rand(w.shape, generator=generator) * 2 - 1) / math.sqrt(fan_in))


@register("lth", "prune a dense robust model: iterative magnitude pruning with rewinding (lottery tickets)")
class LotteryTicket(Method):
    """Options (recipe `method_options`): rounds (R = 3 pruning rounds), rewind_fraction (0.1 of round 0's
    training; 0 = rewind to the initialisation)."""

    name = "lth"

    def __init__(self, rounds: int = 3, rewind_fraction: float = 0.1, reinit: str = "rewind"):
        if int(rounds) < 1 or not 0.0 <= rewind_fraction < 1.0:
            raise ValueError("lth needs rounds >= 1 and 0 <= rewind_fraction < 1")
        if reinit not in REINITS:
            raise ValueError(f"lth: reinit must be one of {', '.join(REINITS)}, got {reinit!r}")
        self.reinit = reinit
        self.name = "lth" if reinit == "rewind" else "lth-reinit"
        self.rounds, self.rewind_fraction = int(rounds), float(rewind_fraction)
        self.warm = self.rewind_fraction > 0  # a warmup phase before the rewind point
        self.rewind: dict[str, torch.Tensor] = {}  # the model's state_dict at the rewind point
        self.keeps: list[int] = []

    def phases(self, cfg):
        rf, per_round = self.rewind_fraction, 1.0 - self.rewind_fraction
        out = [Phase("warmup", rf, schedule="constant", at_budget=False)] if self.warm else []
        out += [Phase(f"round-{r}", per_round, at_budget=r == self.rounds) for r in range(self.rounds + 1)]
        return out

    def enter(self, index, model, ctx):
        r = index - 1 if self.warm else index
        if r < 0:
            return None  # warmup: dense, from the initialisation to the rewind point
        keep, total = budget_of(model, ctx.cfg.sparsity)
        self.keeps = keep_schedule(total, keep, self.rounds)
        if r == 0:
            if not ctx.resuming:  # on resume the rewind point comes from the checkpoint (load_state_tensors)
                self.rewind = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif not self.rewind:
                raise RuntimeError("lth: resuming round 0 without the rewind point in the checkpoint")
            return None
        layers = sparsifiable_layers(model)
        if ctx.resuming:  # the checkpoint holds masks and weights
            masks = {n: torch.ones_like(m.weight) for n, m in layers}
        else:
            if not self.rewind:
                raise RuntimeError("lth: no rewind point captured before pruning")
            masks = prune_survivors(model, self.keeps[r])
            model.load_state_dict(self.rewind, strict=True)  # weights and BatchNorm statistics
            if self.reinit == "random":  # the control: same mask, weights never seen in training
                redraw_weights(model, torch.Generator().manual_seed(int(ctx.cfg.seed) * 1000 + r))
            ctx.log(f"lth round {r}: kept {int(sum(v.sum() for v in masks.values()))} of {total} weights, "
                    + ("re-initialised at random (the lottery-ticket control)" if self.reinit == "random" else
                       f"rewound to the {'initialisation' if not self.warm else 'rewind point'}"))
        sparse = FixedMask.from_masks(model, masks, name="lth")  # zeroes the rewound weights outside the mask
        if ctx.resuming:
            sparse.budget = self.keeps[r]  # not the placeholder's count (the loaded masks hold these)
        return sparse

    def state_tensors(self):
        return {f"rewind.{k}": v for k, v in self.rewind.items()}

    def load_state_tensors(self, state):
        self.rewind = {k[len("rewind."):]: v.clone() for k, v in state.items() if k.startswith("rewind.")}

    def config(self):
        q = f"(1 - sparsity)^(1/{self.rounds})"
        return {"rounds": self.rounds, "reinit": self.reinit, "keep_per_round": q, "keep_schedule": self.keeps or None,
                "rewind_fraction": self.rewind_fraction,
                "rewind_to": "initialisation" if not self.warm else f"end of warmup ({self.rewind_fraction} of round 0)",
                "pruning": "global magnitude over surviving weights; last round exactly at the budget",
                "split": f"warmup {self.rewind_fraction}, each of {self.rounds + 1} rounds {1 - self.rewind_fraction}",
                "reference": "Frankle & Carbin ICLR 2019; Frankle et al. ICML 2020 (rewinding)"}


@register("lth-reinit", "lth's control: the same rounds, survivors re-drawn from the init distribution", role="control")
def lottery_ticket_reinit(**options) -> LotteryTicket:
    """The lottery-ticket control: lth's masks, weights re-drawn at random at every rewind."""
    return LotteryTicket(reinit="random", **options)

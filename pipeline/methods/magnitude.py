"""`magnitude`: robust dense training, one-shot global magnitude pruning to the budget, robust fine-tune.

The simplest pruning baseline: a single global threshold over all conv/linear weights (so layers keep
different densities), then the surviving weights are fine-tuned under a fixed mask at a tenth of --lr.
"""

from __future__ import annotations

from ..sparse import FixedMask, global_magnitude_masks
from . import Method, Phase, budget_of, register


@register("magnitude", "prune a dense robust model: one-shot global magnitude, robust fine-tune")
class MagnitudePruning(Method):
    name = "magnitude"

    def phases(self, cfg):
        return [Phase("pretrain", 0.5, at_budget=False), Phase("finetune", 0.5, lr=cfg.lr * 0.1)]

    def enter(self, index, model, ctx):
        if index == 0:
            return None  # dense
        keep, _ = budget_of(model, ctx.cfg.sparsity)
        masks = global_magnitude_masks(model, keep)
        return FixedMask.from_masks(model, masks, name="magnitude")

    def config(self):
        return {"pruning": "one-shot global magnitude after dense robust training", "finetune_lr_factor": 0.1}

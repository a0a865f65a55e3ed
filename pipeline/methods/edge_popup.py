"""`edge-popup` (Ramanujan et al., "What's Hidden in a Randomly Weighted Neural Network?", CVPR 2020), trained
with the robust objective as in the robust scratch tickets (Fu et al., NeurIPS 2021).

One phase. The conv/linear weights are drawn once and never trained: Kaiming normal (fan_in, ReLU gain;
the paper's "kn"), or with `weight_init: signed-constant` the paper's best, +-sqrt(2 / fan_in) with random
signs. Only the scores train, through w = weight * topk(score, k_l) per layer with the straight-through
gradient (rsp.methods.hydra.ScoreMask; the same rule and |score| storage as HYDRA). Scores start Kaiming
uniform as in the authors' code (kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
ranked by magnitude, so stored as |.|).

Their networks have no affine parameters besides the weights: convs are bias-free and BatchNorm is
non-affine (NonAffineBatchNorm: running statistics only). rsp's models have affine BatchNorm and a linear
classifier bias, so these are held at the identity: BatchNorm weight 1 and bias 0, layer biases 0, all
frozen. Running statistics still update. Everything but the scores is frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..sparse import sparsifiable_layers
from . import Method, Phase, register
from .hydra import SCHEDULES, ScoreMask

WEIGHT_INITS = ("kaiming-normal", "signed-constant")


def draw_weight(weight: torch.Tensor, how: str, generator: torch.Generator) -> torch.Tensor:
    """Kaiming normal N(0, 2 / fan_in), or its signed constant +-sqrt(2 / fan_in) (edge-popup's Builder)."""
    std = math.sqrt(2.0 / nn.init._calculate_fan_in_and_fan_out(weight)[0])  # relu gain sqrt(2), fan_in mode
    w = torch.empty_like(weight).normal_(0.0, std, generator=generator)
    return w if how == "kaiming-normal" else w.sign() * std


def draw_score(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Their SubnetConv scores: kaiming_uniform_(a=sqrt(5)); the mask ranks |score|."""
    return nn.init.kaiming_uniform_(torch.empty_like(weight), a=math.sqrt(5), generator=generator)


@register("edge-popup", "scores only, on random weights that are never trained")
class EdgePopup(Method):
    name = "edge-popup"

    def __init__(self, weight_init: str = "kaiming-normal", lr: float | None = None, schedule: str = "cosine"):
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {', '.join(WEIGHT_INITS)}, got {weight_init!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.weight_init, self.lr, self.schedule = weight_init, lr, schedule

    def phases(self, cfg):
        return [Phase("scores", 1.0, lr=self.lr, schedule=self.schedule)]

    def enter(self, index, model, ctx):
        if index != 0:
            raise ValueError(f"edge-popup has one phase, not {index + 1}")
        gen = ctx.generator
        if not ctx.resuming:  # a resumed phase loads weights and scores: draw nothing (the stream stays put)
            with torch.no_grad():
                for _, m in sparsifiable_layers(model):
                    m.weight.copy_(draw_weight(m.weight, self.weight_init, gen))
                    if m.bias is not None:
                        m.bias.zero_()
                for m in model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                        m.weight.fill_(1.0)
                        m.bias.zero_()
        init = None if ctx.resuming else (lambda _, m: draw_score(m.weight, gen))
        sparse = ScoreMask(model, ctx.cfg.sparsity, init, name="edge-popup")
        scores = {id(p) for p in sparse.weight_params()}
        for p in model.parameters():
            if id(p) not in scores:
                p.requires_grad_(False)
        return sparse

    def config(self):
        return {"lr": "--lr" if self.lr is None else self.lr, "schedule": self.schedule,
                "weight_init": self.weight_init + " (fan_in, ReLU gain), drawn once from the run's sparse stream, "
                                                  "never trained",
                "score_init": "|kaiming_uniform(a=sqrt(5))| per layer (edge-popup's SubnetConv; |.| as they rank "
                              "|score|)",
                "topk": "per layer, k_l = floor((1 - sparsity) * n_l) >= 1, straight-through gradient to the scores",
                "batchnorm": "affine parameters held at weight 1, bias 0 and frozen (edge-popup's non-affine BN); "
                             "running statistics update",
                "bias": "conv/linear biases zero and frozen (edge-popup's layers are bias-free)",
                "trainable": "scores only"}

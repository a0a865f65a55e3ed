"""`hydra` (Sehwag et al., "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020).

Three phases, as the authors' code (github.com/inspire-group/hydra) runs them:

  pretrain   dense robust training (their configs: 100 epochs, lr 0.1 cosine)
  scores     conv/linear weights and biases frozen; one importance score per weight, trained with the robust
             objective through w = weight * topk(score, k_l), the gradient reaching the scores straight through
             (20 epochs, lr 0.1 cosine). BatchNorm stays trainable, as their `freeze_vars` leaves it.
  finetune   the top-k masks of the final scores are fixed; the surviving weights are trained (lr 0.01 cosine)

Scores start from the scaled weight magnitudes (`scaled_score_init`): s = sqrt(6 / fan_in) * w / max|w| per
layer, so the first mask is layer-wise magnitude pruning and the search starts from it. Top-k is per layer
with k_l = floor((1 - sparsity) * n_l), at least 1, so the total never exceeds the budget K (rsp.methods).

As in their layers (GetSubnet(popup_scores.abs())), rsp.sparse's score parametrisation ranks |s|.
`ScoreMask` (the score parametrisation of all conv/linear layers) is shared with `edge-popup`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..sparse import FixedMask, SparseMethod, SparseMixin, _convert, sparsifiable_layers, topk_mask
from . import Method, Phase, register

SCHEDULES = ("step", "cosine", "constant")


def layer_keep(sizes: Sequence[int], sparsity: float) -> list[int]:
    """Per-layer top-k counts: k_l = floor((1 - sparsity) * n_l), at least 1 per layer.

    The sum of floors is <= floor((1 - sparsity) * N) <= K = round((1 - sparsity) * N). Only the "at least 1"
    can overshoot (many tiny layers at extreme sparsity): the excess is taken from the largest k_l.
    """
    density = 1.0 - sparsity
    keep = [max(1, math.floor(density * n + 1e-9)) for n in sizes]  # 1e-9: (1 - 0.9) * 100 is 9.999...
    budget = round(density * sum(sizes))
    while sum(keep) > budget:
        i = max(range(len(keep)), key=keep.__getitem__)
        if keep[i] <= 1:
            raise ValueError(f"sparsity {sparsity} leaves {budget} weights for {len(sizes)} layers: per-layer top-k "
                             "needs at least one per layer")
        keep[i] -= 1
    return keep


def scaled_score_init(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's `initialize_scaled_score`: sqrt(6 / fan_in) * w / max|w| (close to a Kaiming-uniform range)."""
    fan_in = nn.init._calculate_fan_in_and_fan_out(weight)[0]
    return math.sqrt(6.0 / fan_in) * weight / weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny)


class ScoreMask(SparseMethod):
    """w = weight * topk(score, k_l) on every conv/linear layer (rsp.sparse's `score` parametrisation).

    The weights and biases of these layers are frozen (requires_grad False); `score` is a Parameter of each
    layer, so the trainer's optimizer trains it and checkpoints hold it in the model's state_dict; k_l is
    recomputed from the sparsity (layer_keep), so there is no extra state. `init(name, layer)` gives the
    initial scores; None gives zeros (a resumed phase: the checkpoint overwrites them).
    """

    def __init__(self, model: nn.Module, sparsity: float,
                 init: Callable[[str, nn.Module], torch.Tensor] | None = None, name: str = "score"):
        self.name = name
        dense = sparsifiable_layers(model)
        for lname, m in dense:
            if isinstance(m, SparseMixin):
                raise TypeError(f"{lname} is already sparse: fold the model with rsp.sparse.to_dense first")
        sizes = [m.weight.numel() for _, m in dense]
        self.total = sum(sizes)
        keep = layer_keep(sizes, sparsity)
        self.budget = sum(keep)
        self.layers = []
        for (lname, m), k in zip(dense, keep):
            with torch.no_grad():
                score = init(lname, m) if init is not None else torch.zeros_like(m.weight)
            m.weight.requires_grad_(False)
            if m.bias is not None:
                m.bias.requires_grad_(False)
            layer = _convert(m, "score")
            layer.score = nn.Parameter(score.detach().to(m.weight.device, m.weight.dtype).clone())
            layer.k = k
            self.layers.append((lname, layer))

    def weight_params(self):
        return [m.score for _, m in self.layers]

    def masks(self) -> dict[str, torch.Tensor]:
        """The current top-k masks by layer name (what to_dense keeps of the weights)."""
        return {n: topk_mask(m.score.detach(), m.k) for n, m in self.layers}


def _check_schedule(what: str, value: str) -> str:
    if value not in SCHEDULES:
        raise ValueError(f"{what} must be one of {', '.join(SCHEDULES)}, got {value!r}")
    return value


@register("hydra", "prune a dense robust model: importance-score search (weights frozen), fine-tune")
class Hydra(Method):
    """HYDRA: dense robust training -> score search with frozen weights -> masked fine-tuning.

    `split`: relative lengths of pretrain / scores / finetune (the paper's epochs 100 / 20 / 100, so
    --epochs 220 reproduces them). Learning rates: the paper's code uses 0.1 / 0.1 / 0.01 with a base lr of
    0.1, so by default they follow --lr in those ratios (--lr, --lr, 0.1 x --lr: the paper's values at the
    default --lr 0.1, and no phase at a rate the user lowered --lr to avoid); a number sets a phase's lr.
    """

    name = "hydra"
    LR_FACTORS = (1.0, 1.0, 0.1)  # of --lr, for the phases whose lr is not given (the paper's 0.1 / 0.1 / 0.01)

    def __init__(self, split: Sequence[float] = (100, 20, 100), pretrain_lr: float | None = None,
                 pretrain_schedule: str = "cosine", score_lr: float | None = None, score_schedule: str = "cosine",
                 finetune_lr: float | None = None, finetune_schedule: str = "cosine"):
        split = [float(s) for s in split]
        if len(split) != 3 or min(split) < 0 or sum(split) <= 0:
            raise ValueError(f"split must be three non-negative lengths (pretrain, scores, finetune), got {split}")
        for what, lr in (("pretrain_lr", pretrain_lr), ("score_lr", score_lr), ("finetune_lr", finetune_lr)):
            if lr is not None and not lr > 0:
                raise ValueError(f"{what} must be > 0, got {lr}")
        self.split = split
        self.lrs = (pretrain_lr, score_lr, finetune_lr)
        self.schedules = tuple(_check_schedule(w, s) for w, s in (("pretrain_schedule", pretrain_schedule),
                                                                  ("score_schedule", score_schedule),
                                                                  ("finetune_schedule", finetune_schedule)))
        self._scores: dict[str, tuple[torch.Tensor, int]] | None = None  # the search's scores, for the finetune mask

    def fractions(self) -> list[float]:
        return [s / sum(self.split) for s in self.split]

    def phases(self, cfg):
        f, sch = self.fractions(), self.schedules
        lr = [x if x is not None else cfg.lr * factor for x, factor in zip(self.lrs, self.LR_FACTORS)]
        return [Phase("pretrain", f[0], lr=lr[0], schedule=sch[0], at_budget=False),
                Phase("scores", f[1], lr=lr[1], schedule=sch[1]),
                Phase("finetune", f[2], lr=lr[2], schedule=sch[2])]

    def enter(self, index, model, ctx):
        if index == 0:
            return None  # dense robust pre-training
        sparsity = ctx.cfg.sparsity
        if index == 1:
            init = None if ctx.resuming else (lambda _, m: scaled_score_init(m.weight))
            sparse = ScoreMask(model, sparsity, init, name="hydra")
            # kept past to_dense (which drops them from the layers); a resume's load_state_dict fills them in place
            self._scores = {n: (m.score, m.k) for n, m in sparse.layers}
            return sparse
        if index != 2:
            raise ValueError(f"hydra has 3 phases, not {index + 1}")
        layers = sparsifiable_layers(model)
        if self._scores is not None:
            masks = {n: topk_mask(s.detach().abs(), k) for n, (s, k) in self._scores.items()}
        else:
            # no search in this process: resuming (the checkpoint holds the mask) or the score phase was skipped.
            # to_dense zeroed all but the top-k, so per-layer top-k of |w| recovers that mask (and is at budget).
            if not ctx.resuming:
                ctx.log("hydra: no score search in this process; finetune mask = per-layer top-k of |w|")
            keep = layer_keep([m.weight.numel() for _, m in layers], sparsity)
            masks = {n: topk_mask(m.weight.detach().abs(), k) for (n, m), k in zip(layers, keep)}
        self._scores = None
        for p in model.parameters():  # the search froze conv/linear weights and biases; all train now
            p.requires_grad_(True)
        return FixedMask.from_masks(model, masks, name="hydra")

    def config(self):
        f = self.fractions()
        lr = [x if x is not None else ("--lr" if k == 1 else f"{k:g} x --lr") for x, k in zip(self.lrs, self.LR_FACTORS)]
        return {"fractions": {"pretrain": f[0], "scores": f[1], "finetune": f[2]},
                "split": self.split, "paper_split_epochs": [100, 20, 100],
                "lr": {"pretrain": lr[0], "scores": lr[1], "finetune": lr[2]},
                "schedule": {"pretrain": self.schedules[0], "scores": self.schedules[1], "finetune": self.schedules[2]},
                "score_init": "sqrt(6 / fan_in) * w / max|w| per layer (HYDRA scaled_score_init); top-k of |score|",
                "topk": "per layer, k_l = floor((1 - sparsity) * n_l) >= 1, straight-through gradient to the scores",
                "score_phase_trainable": "scores and BatchNorm; conv/linear weights and biases frozen",
                "score_decay": "the trainer's decoupled weight decay on the scores",
                "finetune": "fixed top-k masks of the final scores, weights and biases trained"}

"""Training objectives: natural, PGD-AT, mixed-AT, TRADES, MART, RST.

Each objective crafts its attack with `rsp.attacks` (eval mode, weights frozen) and returns the loss
computed in train mode, plus the logits used for the running training accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attacks import PGDConfig, pgd
from .methods.anp import vulnerability_loss

OBJECTIVES = ("natural", "pgd-at", "mixed-at", "trades", "mart", "rst")


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Zhang et al. 2019: CE(clean) + beta * mean_i KL(p_clean_i || p_adv_i)."""
    natural = F.cross_entropy(logits_clean, y)
    kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
    return natural + beta * kl


def mart_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """Wang et al. 2020: boosted CE on x_adv + beta * mean_i KL(p_clean_i || p_adv_i) * (1 - p_clean_i[y_i])."""
    p_adv = F.softmax(logits_adv, dim=1)
    # the most likely wrong class under attack
    top2 = p_adv.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), wrong)
    p_clean = F.softmax(logits_clean, dim=1)
    kl = (p_clean * (torch.log(p_clean + 1e-12) - torch.log(p_adv + 1e-12))).sum(1)
    true_prob = p_clean.gather(1, y[:, None]).squeeze(1)
    return bce + beta * (kl * (1.0000001 - true_prob)).mean()


@dataclass(frozen=True)
class Objective:
    name: str
    attack: PGDConfig
    beta: float = 6.0
    vs_lambda: float = 0.0  # ANP-VS: + vs_lambda * mean |z(x) - z(x_adv)| over the ReLU features

    @property
    def robust(self) -> bool:
        return self.name != "natural"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits, x_adv = self._loss(model, x, y, generator)
        if self.vs_lambda and x_adv is not None:
            loss = loss + self.vs_lambda * vulnerability_loss(model, x, x_adv)
        return loss, logits

    def _loss(self, model, x, y, generator):
        """(loss, logits for the running accuracy, the adversarial batch or None)."""
        name = self.name
        if name == "natural":
            logits = model(x)
            return F.cross_entropy(logits.float(), y), logits, None
        if name == "pgd-at":
            x_adv = pgd(model, x, y, self.attack, generator)
            logits = model(x_adv)
            return F.cross_entropy(logits.float(), y), logits, x_adv
        if name == "mixed-at":  # half the batch adversarial, half clean, in one forward pass
            h = len(y) // 2
            x_mix = torch.cat([x[:h], pgd(model, x[h:], y[h:], self.attack, generator)])
            logits = model(x_mix)
            return F.cross_entropy(logits.float(), y), logits, x_mix
        if name in ("trades", "rst"):
            x_adv = pgd(model, x, y, PGDConfig(**{**self.attack.__dict__, "loss": "kl", "restarts": 1}), generator)
            logits, logits_adv = model(x), model(x_adv)
            return trades_loss(logits.float(), logits_adv.float(), y, self.beta), logits_adv, x_adv
        if name == "mart":
            x_adv = pgd(model, x, y, self.attack, generator)
            logits, logits_adv = model(x), model(x_adv)
            return mart_loss(logits.float(), logits_adv.float(), y, self.beta), logits_adv, x_adv
        raise ValueError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")

"""`admm`: robust dense training -> ADMM towards the sparse set -> hard pruning and masked robust retraining.

Ye et al., "Adversarial Robustness vs. Model Compression, or Both?", ICCV 2019 (code:
yeshaokai/Robustness-Aware-Pruning-ADMM, admm/admm.py and ADMM_examples/cifar10). Pruning is the problem
min_W loss(W) s.t. W_l in S_l = {at most k_l non-zeros}, split by ADMM into

    W-step  SGD on  loss(W) + sum_l rho/2 ||W_l - Z_l + U_l||^2     (the robust objective's loss; every step)
    Z-step  Z_l = Proj_{S_l}(W_l + U_l)       keep the k_l largest |.| of each layer, zero the rest
    U-step  U_l = U_l + W_l - Z_l             (scaled dual variable)
    rho     rho = 1.3 * rho                   at every Z/U update (their `multi_rho`)

As in their code: Z = Proj(W), U = 0 when the ADMM phase starts; the Z/U update runs at the start of each
of `periods` equal periods after the first (their admm_epoch 20 of 200 ADMM epochs: 10 periods, 9 updates);
rho starts at 1e-3. Retraining hard-prunes each layer to its k_l largest |W| (their `masking`: Proj(W), by
which point W is close to Z) and trains the survivors under that fixed mask.

Per-layer sparsities come from `ratios: {layer: sparsity}` (their prune_ratios; unlisted layers take
--sparsity) or are uniform = --sparsity; k_l = floor((1 - s_l) n_l), so the total stays within the budget.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..sparse import FixedMask, SparseMethod, sparsifiable_layers, topk_mask
from . import Method, Phase, budget_of, register


def project(v: torch.Tensor, k: int) -> torch.Tensor:
    """Euclidean projection onto {at most k non-zeros}: v at its k largest |v|, 0 elsewhere."""
    return v * topk_mask(v.detach().abs(), k)


def layer_keeps(model: nn.Module, sparsity: float, ratios: dict | None = None) -> dict[str, int]:
    """k_l = floor((1 - s_l) * n_l) per conv/linear layer; s_l = ratios[layer] (or `layer.weight`, their
    key style) else `sparsity`. Raises ValueError for unknown layer names or ratios over the budget."""
    layers = sparsifiable_layers(model)
    names = {n for n, _ in layers}
    ratios = dict(ratios or {})
    spec = {k[: -len(".weight")] if k.endswith(".weight") and k[: -len(".weight")] in names else k: float(v)
            for k, v in ratios.items()}
    unknown = sorted(set(spec) - names)
    if unknown:
        raise ValueError(f"admm ratios name unknown layers {unknown}; layers are {sorted(names)}")
    keeps = {}
    for name, m in layers:
        s = spec.get(name, sparsity)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"admm ratio for {name} must be in [0, 1], got {s}")
        keeps[name] = math.floor((1.0 - s) * m.weight.numel() + 1e-9)  # 1e-9: (1 - 0.9) * 10 is 0.999...
    budget, _ = budget_of(model, sparsity)
    if sum(keeps.values()) > budget:
        raise ValueError(f"admm ratios keep {sum(keeps.values())} weights, over the budget of {budget} "
                         f"(--sparsity {sparsity})")
    return keeps


class ADMMPenalty(SparseMethod):
    """The ADMM phase: dense weights W (trained by the trainer's optimizer, decoupled decay included),
    auxiliary Z and scaled dual U per layer, the penalty as `extra_loss`, and the Z/U/rho update in `step`
    every `period` optimizer steps, at most `max_updates` times."""

    name = "admm"

    def __init__(self, model: nn.Module, keeps: dict[str, int], *, rho: float, rho_growth: float, period: int,
                 max_updates: int, initialise: bool = True):
        self.layers = sparsifiable_layers(model)  # plain conv/linear: there is no mask in this phase
        self.keeps = keeps
        self.total = sum(m.weight.numel() for _, m in self.layers)
        self.budget = sum(keeps.values())
        self.rho, self.rho_growth = float(rho), float(rho_growth)
        self.period, self.max_updates = max(1, int(period)), int(max_updates)
        self.steps = 0  # optimizer steps in this phase
        self.updates = 0  # Z/U updates done
        with torch.no_grad():
            self.u = {n: torch.zeros_like(m.weight) for n, m in self.layers}
            # their admm_initialization: Z = Proj(W), U = 0 (on resume the checkpoint overwrites both)
            self.z = {n: project(m.weight.detach(), keeps[n]) if initialise else torch.zeros_like(m.weight)
                      for n, m in self.layers}

    def weight_params(self):
        return [m.weight for _, m in self.layers]

    def active_count(self) -> torch.Tensor:
        return sum((m.weight != 0).sum() for _, m in self.layers)

    def extra_loss(self) -> torch.Tensor:
        """sum_l rho/2 ||W_l - Z_l + U_l||^2 (their append_admm_loss; a sum, not a mean)."""
        sq = sum((m.weight - self.z[n] + self.u[n]).pow(2).sum() for n, m in self.layers)
        return 0.5 * self.rho * sq

    @torch.no_grad()
    def update(self) -> None:
        """Z = Proj(W + U); U = U + W - Z; rho = rho_growth * rho."""
        for n, m in self.layers:
            w = m.weight.detach()
            self.z[n] = project(w + self.u[n], self.keeps[n])
            self.u[n] = self.u[n] + w - self.z[n]
        self.rho *= self.rho_growth
        self.updates += 1

    def step(self, lr: float, decay_scale: float) -> None:
        self.steps += 1
        if self.steps % self.period == 0 and self.updates < self.max_updates:
            self.update()

    def state_tensors(self):
        out = {f"admm.z.{n}": z for n, z in self.z.items()}
        out.update({f"admm.u.{n}": u for n, u in self.u.items()})
        out["admm.rho"] = torch.tensor([self.rho], dtype=torch.float64)
        # period is kept: --max-steps may change on resume, the update times must not
        out["admm.counters"] = torch.tensor([self.steps, self.updates, self.period, self.max_updates], dtype=torch.int64)
        return out

    def load_state_tensors(self, state):
        for n, m in self.layers:
            self.z[n] = state[f"admm.z.{n}"].to(m.weight.device, m.weight.dtype).clone()
            self.u[n] = state[f"admm.u.{n}"].to(m.weight.device, m.weight.dtype).clone()
        self.rho = float(state["admm.rho"][0])
        self.steps, self.updates, self.period, self.max_updates = (int(v) for v in state["admm.counters"].tolist())


@register("admm", "prune a dense robust model: ADMM towards the sparse set, masked retraining")
class ADMMPruning(Method):
    """Options (recipe `method_options`): rho (1e-3), rho_growth (1.3), periods (10: Z/U updates at the
    start of periods 2..10 of the ADMM phase), ratios ({layer: sparsity}; default uniform --sparsity),
    split ([1, 1, 1]: their 200/200/200 epochs), admm_lr_factor and retrain_lr_factor (0.1: their
    0.01 after a 0.1 pre-training), prune_to ("weights": top-|W| per layer at retraining, their code;
    "z": the support of the last Z)."""

    name = "admm"

    def __init__(self, rho: float = 1e-3, rho_growth: float = 1.3, periods: int = 10, ratios: dict | None = None,
                 split: list | tuple = (1.0, 1.0, 1.0), admm_lr_factor: float = 0.1, retrain_lr_factor: float = 0.1,
                 prune_to: str = "weights"):
        if rho <= 0 or rho_growth < 1.0 or int(periods) < 1 or len(split) != 3 or min(split) <= 0:
            raise ValueError("admm needs rho > 0, rho_growth >= 1, periods >= 1 and three positive split weights")
        if prune_to not in ("weights", "z"):
            raise ValueError(f"admm prune_to must be 'weights' or 'z', got {prune_to!r}")
        self.rho, self.rho_growth, self.periods = float(rho), float(rho_growth), int(periods)
        self.ratios = dict(ratios) if ratios else None
        self.split = [float(s) for s in split]
        self.admm_lr_factor, self.retrain_lr_factor, self.prune_to = admm_lr_factor, retrain_lr_factor, prune_to
        self.admm: ADMMPenalty | None = None

    def phases(self, cfg):
        s = sum(self.split)
        return [Phase("pretrain", self.split[0] / s, schedule="cosine", at_budget=False),
                # their ADMM lr restarts at every Z/U update and drops x0.1 at each third of a period;
                # phases have one schedule, so the ADMM phase runs at a constant 0.1 * lr
                Phase("admm", self.split[1] / s, lr=cfg.lr * self.admm_lr_factor, schedule="constant", at_budget=False),
                Phase("retrain", self.split[2] / s, lr=cfg.lr * self.retrain_lr_factor, schedule="step")]

    def enter(self, index, model, ctx):
        keeps = layer_keeps(model, ctx.cfg.sparsity, self.ratios)  # in phase 0 too: bad ratios fail at once
        if index == 0:
            return None
        if index == 1:
            self.admm = ADMMPenalty(model, keeps, rho=self.rho, rho_growth=self.rho_growth,
                                    period=max(1, ctx.steps // self.periods), max_updates=self.periods - 1,
                                    initialise=not ctx.resuming)
            if not ctx.resuming:
                ctx.log(f"admm: per-layer keeps {keeps} ({sum(keeps.values())} weights), rho {self.rho}, "
                        f"Z/U update every {self.admm.period} steps")
            return self.admm
        layers = sparsifiable_layers(model)
        if ctx.resuming:  # the checkpoint holds the masks
            masks = {n: torch.ones_like(m.weight) for n, m in layers}
        elif self.prune_to == "z" and self.admm is not None:
            masks = {n: (self.admm.z[n] != 0).to(m.weight.dtype) for n, m in layers}
        else:  # their masking(): the k_l largest |W| of each layer
            masks = {n: topk_mask(m.weight.detach().abs(), keeps[n]) for n, m in layers}
        self.admm = None  # Z and U are not needed any more
        sparse = FixedMask.from_masks(model, masks, name="admm")
        if ctx.resuming:
            sparse.budget = sum(keeps.values())  # not the placeholder's count (the loaded masks hold these)
        return sparse

    def config(self):
        return {"recipe": {"pretrain": "dense robust training, cosine lr",
                           "admm": f"dense W + ADMM penalty, constant lr x{self.admm_lr_factor}",
                           "retrain": f"hard prune per layer, masked robust retraining, step lr x{self.retrain_lr_factor}"},
                "split": self.split, "rho": self.rho, "rho_growth": self.rho_growth, "periods": self.periods,
                "updates": self.periods - 1, "ratios": self.ratios or "uniform --sparsity per layer (floor)",
                "admm_lr_schedule": "constant (reference: back to the ADMM lr at each Z/U update, x0.1 at each third "
                                    "of a period)",
                "prune_to": self.prune_to, "reference": "Ye et al. ICCV 2019, yeshaokai/Robustness-Aware-Pruning-ADMM"}

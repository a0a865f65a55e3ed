"""The ensemble: robust accuracy under each registered attack and under all of them, worst case per example."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..defaults import EPS
from .core import (Predict, as_float_images, attack_mode, attack_seed, chunked_logits, default_step_size, margin,
                   model_predict)
from .registry import ATTACK_REGISTRY, AttackSettings, attack_names

ATTACKS = ("pgd", "apgd-ce", "apgd-t", "square")  # ensemble_eval's default


def ensemble_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[str] = ATTACKS,
                  eps: float = EPS, steps: int = 50, restarts: int = 10, seed: int = 0,
                  predict: Predict | None = None, *, step_size: float | None = None, apgd_steps: int | None = None,
                  apgd_restarts: int = 1, n_target_classes: int = 9, square_queries: int = 5000, p_init: float = 0.8,
                  fab_steps: int = 100, fab_restarts: int = 1, batch_size: int = 512, bf16: bool = False,
                  cumulative: bool = False) -> dict:
    """Robust accuracy under each attack and under all of them (the per-example minimum).

    attacks: any registered attack (`attack_names()`): 'pgd' (steps x restarts, CE, step `step_size` or
    `default_step_size`), 'apgd-ce', 'apgd-dlr', 'apgd-t' (APGD with `apgd_steps`, default 100 as in AutoAttack,
    `apgd_restarts` each; apgd-t over `n_target_classes` targets), 'fab-t' (targeted FAB, `fab_steps` steps,
    `fab_restarts` runs per each of the `n_target_classes` targets), 'square' (`square_queries` queries) and any
    attack registered elsewhere; each gets these budgets as `AttackSettings`. White-box attacks use `model`; if
    `predict` (the exported artifact) is given, Square queries it, and every attack's adversarial examples and
    the clean inputs are judged by it, so the reported figures are the artifact's (`model_robust_acc` keeps
    the PyTorch twin's own figure); white-box attacks then attack every example the artifact gets right, also
    those the twin gets wrong (without early stopping: they keep the twin's most misclassified iterate).
    cumulative=True runs each attack only on the examples every earlier one left robust (AutoAttack's order;
    faster, and the per-attack figures become running minima).

    Returns a dict: eps, seed, n, attacks, judge, mode, clean_acc, robust_acc (worst case), per_attack {name:
    robust_acc, model_robust_acc, seconds, work, seed, config}, and tensors: clean, robust, robust_by_attack
    {name: bool[n]}, x_adv (per example: a fooling example from the first attack that fooled the judge, else
    the lowest-margin one), x_adv_by_attack {name: float[n, ...]}, worst_attack (index into attacks per example,
    -1 where the clean input is already wrong).
    """
    attacks = list(attacks)
    known = attack_names()
    bad = [a for a in attacks if a not in known]
    if bad or not attacks:
        raise ValueError(f"unknown attack(s) {bad or attacks}; choose from {', '.join(known)}")
    if len(set(attacks)) != len(attacks):
        raise ValueError(f"attack listed twice: {attacks}")
    x = as_float_images(x)
    n = len(y)
    device = x.device
    settings = AttackSettings(
        eps=eps, steps=steps, restarts=restarts,
        step_size=default_step_size(eps, steps) if step_size is None else step_size,
        apgd_steps=100 if apgd_steps is None else apgd_steps, apgd_restarts=apgd_restarts,
        n_target_classes=n_target_classes, square_queries=square_queries, p_init=p_init, fab_steps=fab_steps,
        fab_restarts=fab_restarts, batch_size=batch_size, bf16=bf16)
    per_attack, robust_by, x_by = {}, {}, {}
    margins = []
    with attack_mode(model):
        judge = predict or model_predict(model)
        clean_logits = chunked_logits(judge, x, batch_size)
        clean = clean_logits.argmax(1) == y
        alive = clean.clone()
        x_worst = x.clone()
        for name in attacks:
            gen = torch.Generator(device).manual_seed(attack_seed(seed, name))
            idx = torch.nonzero(alive).squeeze(1) if cumulative else torch.arange(n, device=device)
            xs, ys = x[idx], y[idx]
            res = ATTACK_REGISTRY[name].run(model, judge, xs, ys, settings, gen, clean[idx])
            adv = x_worst.clone() if cumulative else torch.empty_like(x)
            adv[idx] = res.x_adv
            logits = chunked_logits(judge, adv, batch_size)
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

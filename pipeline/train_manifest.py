"""manifest.json of an rsp train run: what every later stage reads (see artifacts.SourceRun).

It describes the run from the trainer's state, as a running run (metrics: the selected epoch's validation
figures) or sealed with the test figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import __version__
from .engine import BN_RECALIBRATION_IMAGES, COLLAPSE_RULE
from .models.profiles import profile_name
from .sparse import dense_state_dict, layer_report

if TYPE_CHECKING:
    from .train import Trainer


def train_manifest(run: Trainer, final: dict | None) -> dict:
    """manifest.json of a run: running (metrics: the selected epoch's validation figures) or sealed with the
    test figures `final`."""
    cfg = run.cfg
    state = run.selection.state or dense_state_dict(run.model)
    layers, sparsity = layer_report(state, run.layer_names)
    if final is None:
        metrics = {"clean_acc": run.selection.best["val_clean_acc"], "robust_acc": run.selection.best["val_robust_acc"],
                   "epoch": run.selection.best["epoch"], "split": "val", "selected_on": "val"}
    else:
        metrics = final
    manifest = {
        "stage": "train",
        "status": "complete" if final is not None else "running",
        "rsp_version": __version__,
        "model": {"name": run.model_name, "kwargs": run.model_kwargs},
        "dataset": {**run.splits.meta, "num_classes": run.info.num_classes,
                    "class_names": list(run.info.class_names),
                    **({"extra_data": run.extra_record} if run.extra_record else {})},
        "input": {"shape": [run.info.in_channels, run.info.image_size, run.info.image_size], "layout": "NCHW",
                  "dtype": "float32", "range": [0.0, 1.0]},
        "normalization": {"mean": list(run.info.mean), "std": list(run.info.std), "inside_model": True},
        "objective": cfg.objective,
        "attack": {"norm": "Linf", "eps": cfg.eps, "step_size": cfg.attack_step_size, "steps": cfg.attack_steps,
                   "beta": cfg.beta if cfg.objective in ("trades", "mart", "rst") else None},
        "method": cfg.method,
        "method_config": method_config(run),
        "target_sparsity": cfg.sparsity if cfg.method != "dense" else 0.0,
        "sparsity": sparsity,
        "layers": layers,
        "metrics": metrics,
        "selection": "epoch with the best validation " + ("robust" if run.objective.robust else "clean")
                     + " accuracy among the epochs at the budget that are not collapsed classifiers (" + COLLAPSE_RULE
                     + "; one is kept only if every epoch is); the validation split is cut from the training data"
                       " and the test set is used once, after training, for the figures in metrics",
        "training": {"epochs": run.epoch, "epochs_planned": cfg.epochs, "steps": run.step, "seed": cfg.seed,
                     "device": str(run.device), "world_size": run.dist.world, "bf16": run.bf16,
                     "time_s": round(run.time_s, 3), "torch": torch.__version__},
    }
    return manifest

def method_config(run: Trainer) -> dict:
    """What the method did, with its budget, phases and the rules the trainer applied."""
    cfg = run.cfg
    out = {"name": cfg.method, "budget": run.budget, "total": run.total_weights,
           "budget_rule": "non-zero conv+linear weights <= round((1 - sparsity) * all conv+linear weights)"}
    if cfg.method in ("bcs", "fixed"):
        out["initial_density_profile"] = profile_name(run.model_name)
        out["sparse_init"] = cfg.sparse_init
        out["sparse_init_rule"] = SPARSE_INIT_RULES[cfg.sparse_init][cfg.method]
    if cfg.method == "random":
        out["initial_density_profile"] = "uniform (every layer at the global density, +-1 weight)"
    if cfg.method == "bcs":
        out.update({"rewire_every": cfg.rewire_every, "regrow": cfg.regrow, "sigma": cfg.sigma, "alpha": cfg.alpha,
                    "temperature": cfg.temperature, "optimizer": "SGDW momentum 0.9, decoupled decay"})
    out["weight_decay_scope"] = DECAY_SCOPE_RULES[cfg.decay_scope]
    if len(run.phases) > 1 or cfg.method_options or cfg.method not in ("bcs", "fixed", "random", "dense"):
        out["phases"] = [{"name": p.name, "fraction": p.fraction, "steps": n,
                          "lr": cfg.lr if p.lr is None else p.lr, "schedule": p.schedule, "at_budget": p.at_budget}
                         for p, n in zip(run.phases, run.phase_steps)]
        out["epochs_budget"] = cfg.epochs
        out["options"] = dict(cfg.method_options)
    if len(run.phases) > 1:
        out["batchnorm_recalibration"] = (f"at the start of every phase after the first: running statistics "
                                          f"re-estimated on the first {BN_RECALIBRATION_IMAGES} training images")
    out.update({k: v for k, v in run.method.config().items() if k not in out})  # the trainer's phases win
    if run.vs_lambda:
        out["vs_lambda"] = run.vs_lambda
    return out


SPARSE_INIT_RULES = {
    "budget": {"bcs": "exactly the budget from step one: the profile's round(d * size) per layer, the rest uniform "
                      "over dormant positions; active theta = |He normal|",
               "fixed": "the profile's round(d * size) per layer, the rest uniform over dormant positions"},
    "reference": {"bcs": "under the budget: the profile's int(d * size) per layer at theta = |He normal|; the first "
                         "step fills the rest at theta = 1e-12, each one's layer drawn in proportion to layer size",
                  "fixed": "the profile's int(d * size) per layer, the rest layer by layer in proportion to layer size"},
}
DECAY_SCOPE_RULES = {"weights": "weights: conv/linear weights (BCS: theta); BatchNorm and biases not decayed",
                     "all": "all: every trainable parameter, BatchNorm and biases included (the reference's SGDW)"}

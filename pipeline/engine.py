"""The training engine rsp train and rsp structure's robust fine-tune share.

  TrainStep              one optimizer step: objective (attack + loss) -> backward -> SGDW update -> rewiring
  run_epoch              the steps of one pass over a batch stream (resumable: skip, limit)
  is_collapsed, Selection  the selection rule on the validation split cut from the training data: a healthy
                         epoch beats a collapsed classifier, then the higher score wins
  recalibrate_batchnorm  fresh BatchNorm statistics after the weights changed under them

Nothing here reads or writes a folder: the stages own their files.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn

from .objectives import Objective
from .sparse import dense_state_dict, sparsifiable_layers

BN_RECALIBRATION_IMAGES = 2048


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
                          prepare=lambda t: t) -> int:
    """Re-estimate every BatchNorm's running mean/var on images x (uint8 or float in [0, 1]) for the current weights.

    After one-shot pruning, rewinding or a hard projection the running statistics still describe the old
    weights; in eval mode the model then often predicts one class until enough training steps have replaced
    them (the momentum-0.1 average keeps ~17 % of the stale value after 17 steps, which compounds across 13
    layers). Only the BatchNorm layers are put in train mode (cumulative average, momentum None), so nothing
    else (dropout, stochastic gates) runs or draws random numbers: the result is deterministic. Returns the
    number of BatchNorm layers recalibrated.
    """
    from .data import to_float

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or not len(x):
        return 0
    was_training = model.training
    saved = [(m, m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the batches below
        m.train()
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size]
            model(prepare(to_float(xb) if xb.dtype == torch.uint8 else xb))
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    return len(bns)


class TrainStep:
    """One optimizer step, the same for training, fine-tuning and bench/train_step.py:
    objective (attack + loss) -> backward -> gradient averaging over ranks -> SGDW update -> rewiring.

    Decoupled decay follows the schedule multiplier lr_t / lr_0 (SGDW), not the learning rate. It shrinks
    conv/linear weights only with decay_scope "weights" (rsp's default: BatchNorm and biases get none), or
    every trainable parameter with "all" (the reference's SGDW, applied to all of model.param_list). With
    BCS, the sparse method updates and decays theta itself.
    """

    def __init__(self, model: nn.Module, sparse, objective: Objective, *, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, bf16: bool = False, forward_model: nn.Module | None = None,
                 allreduce=None, decay_scope: str = "weights"):
        self.model, self.sparse, self.objective = model, sparse, objective
        self.lr0, self.weight_decay, self.bf16, self.allreduce = lr, weight_decay, bf16, allreduce
        self.forward_model = forward_model or model
        self.decayed = (sparse.decayed_params() if sparse else [m.weight for _, m in sparsifiable_layers(model)])
        # the method updates some parameters itself (BCS's theta); frozen ones (score phases) are not trained
        own = {id(p) for p in sparse.self_updated_params()} if sparse else set()
        self.sgd_params = [p for p in model.parameters() if id(p) not in own and p.requires_grad]
        if decay_scope == "all":  # + BatchNorm affine parameters and biases (what "weights" leaves out)
            weight_like = {id(p) for _, m in sparsifiable_layers(model) for n, p in m.named_parameters() if n != "bias"}
            seen = {id(p) for p in self.decayed}
            self.decayed = self.decayed + [p for p in self.sgd_params if id(p) not in seen and id(p) not in weight_like]
        elif decay_scope != "weights":
            raise ValueError(f"unknown decay scope {decay_scope!r}; choose weights or all")
        self.opt = torch.optim.SGD(self.sgd_params, lr=lr, momentum=momentum, weight_decay=0.0)

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float, generator: torch.Generator | None = None):
        self.opt.zero_grad(set_to_none=True)
        if self.sparse is not None:
            self.sparse.zero_grad()
        with self.autocast():
            loss, logits = self.objective(self.forward_model, x, y, generator)
        extra = self.sparse.extra_loss() if self.sparse is not None else None
        (loss if extra is None else loss + extra).backward()
        if self.allreduce is not None:
            self.allreduce()
        decay_scale = lr / self.lr0
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.decayed:
            with torch.no_grad():
                torch._foreach_mul_(self.decayed, 1.0 - self.weight_decay * decay_scale)
        self.opt.step()
        if self.sparse is not None:
            self.sparse.step(lr, decay_scale)
        return loss.detach(), logits.detach()


@dataclass
class EpochStats:
    """What run_epoch did: `steps` optimizer steps, the last on batch `next_batch - 1` of the stream."""
    steps: int
    next_batch: int  # where the next pass continues (the `skip` given, when no step was taken)
    seen: int  # images this process trained on
    loss_sum: torch.Tensor  # sum of the per-image training loss, on the device (read once, at the end)
    correct: torch.Tensor
    lr: float  # the learning rate of the last step
    seconds: float

    @property
    def train_loss(self) -> float:
        return self.loss_sum.item() / max(1, self.seen)

    @property
    def train_acc(self) -> float:
        return self.correct.item() / max(1, self.seen)

    @property
    def diverged(self) -> bool:
        return bool(self.seen) and not bool(torch.isfinite(self.loss_sum))


def run_epoch(train_step: TrainStep, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              lr_at_step: Callable[[int], float], generator: torch.Generator | None, *, device: torch.device,
              skip: int = 0, limit: int | None = None, prepare=lambda t: t, shard: tuple[int, int] = (0, 1),
              progress: Callable[[int, float], None] | None = None) -> EpochStats:
    """Train on `batches` from batch `skip` on (the batches before it are still drawn, so a resumed epoch
    repeats the same order and augmentations), for at most `limit` steps. lr_at_step(k): the learning rate
    of this call's k-th step. shard (rank, world): every rank draws the same global batch and trains on its
    slice. progress(batches done, mean loss so far) every 10 batches."""
    train_step.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = done = 0
    next_batch = skip
    rank, world = shard
    t0 = time.perf_counter()
    lr = lr_at_step(0)
    for i, (x, y) in enumerate(batches):
        if i < skip:
            continue
        if limit is not None and done >= limit:
            break
        if world > 1:
            x, y = x[rank::world], y[rank::world]
        lr = lr_at_step(done)
        loss, logits = train_step(prepare(x), y, lr, generator)
        done += 1
        next_batch = i + 1
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if progress is not None and i % 10 == 0:
            progress(i + 1, loss_sum.item() / max(1, seen))
    return EpochStats(done, next_batch, seen, loss_sum, correct, lr, time.perf_counter() - t0)


COLLAPSE_RULE = ("one class predicted for more than halfway from its true share to all of the validation images "
                 "(so always for more than half of them)")


def is_collapsed(val: dict, labels: torch.Tensor) -> bool:
    """A near-constant classifier (COLLAPSE_RULE), e.g. right after one-shot pruning with stale BatchNorm.

    Its robust accuracy is about its class's share (~0.1 on CIFAR-10), which beats a weak but real model's
    (~0.05), so without this rule "best validation robust accuracy" would select it.
    """
    share = val.get("top_class_share")
    if share is None or not len(labels):
        return False
    true_share = (labels == val["top_class"]).float().mean().item()
    return share > 0.5 * (1.0 + true_share)


def beats_best(score: float, collapsed: bool, best: dict) -> bool:
    """Selection order: any healthy epoch beats any collapsed one, then the higher score wins (ties keep the
    earlier epoch). A best recorded before the collapse rule existed counts as healthy."""
    return (not collapsed, score) > (not best.get("collapsed", False), best["score"])


class Selection:
    """The model selected so far on the validation split (cut from the training data: the test set is used
    once, after selection). best: its score, the caller's facts about it (epoch, ...) and collapsed; state:
    its plain weights."""

    def __init__(self, best: dict | None = None, state: dict[str, torch.Tensor] | None = None):
        self.best = best or {"score": -1.0, "collapsed": True}  # anything evaluated beats it
        self.state = state

    @staticmethod
    def judge(val: dict, labels: torch.Tensor, robust: bool) -> tuple[float, bool]:
        """(score, collapsed) of a validation result: robust accuracy for a robust objective, else clean."""
        score = val.get("robust_acc", val["clean_acc"]) if robust else val["clean_acc"]
        return score, is_collapsed(val, labels)

    def beats(self, score: float, collapsed: bool) -> bool:
        return beats_best(score, collapsed, self.best)

    def keep(self, model: nn.Module, score: float, collapsed: bool, **facts) -> None:
        self.best = {"score": score, **facts, "collapsed": collapsed}
        self.state = {k: v.detach().clone() for k, v in dense_state_dict(model).items()}

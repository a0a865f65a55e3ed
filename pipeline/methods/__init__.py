"""Sparse training methods: how a run reaches its connection budget.

A method is a recipe of phases. `rsp train` runs them in order, each for its share of `--epochs` (the
method's whole budget; `--max-steps` caps each phase), with a fresh optimizer per phase. At the start of a
phase the trainer calls `method.enter(i, model, ctx)`, which may transform the model (prune, rewind,
re-parametrise) and returns the `SparseMethod` (rsp.sparse) that the phase trains, or None for dense.

Budget accounting is the same for every method: zero weights over all conv and linear weights.
Model selection (best validation robust accuracy) only considers phases whose weights are at the budget
(`Phase.at_budget`), so every method's selected model is at or under it; the trainer checks this.

    bcs, fixed, random,  one phase (rsp.sparse): Bayesian connectivity sampling; a static random mask with
    dense                BCS's initial layer profile (fixed) or the same density in every layer (random); dense
    magnitude            dense robust training -> one-shot global magnitude pruning -> robust fine-tune
    lth                  iterative magnitude pruning with rewinding (lottery tickets), robust throughout
    hydra                dense robust training -> importance-score search (weights frozen) -> fine-tune
    edge-popup           scores only on random weights that are never trained
    admm                 dense robust training -> ADMM towards the sparse set -> masked retraining
    anp-vs               beta-Bernoulli unit masks + vulnerability suppression -> magnitude to budget
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from ..sparse import SparseMethod


@dataclass(frozen=True)
class Phase:
    name: str
    fraction: float  # share of --epochs
    lr: float | None = None  # None: --lr
    schedule: str = "step"  # step: --lr-milestones/--lr-gamma within the phase | cosine | constant
    at_budget: bool = True  # weights at or under the budget: model selection may pick this phase's epochs


@dataclass
class PhaseContext:
    """What `Method.enter` may use. `resuming`: the phase's checkpointed state is loaded right after, so
    enter only has to build the same structures (no pruning decisions that would be overwritten anyway)."""

    cfg: object  # TrainConfig
    model_name: str
    generator: torch.Generator  # the run's checkpointed "sparse" stream
    device: torch.device
    resuming: bool = False
    steps: int = 0  # optimizer steps this phase will run
    n_train: int = 0  # training examples (KL terms are scaled per example)
    log: Callable[[str], None] = print


class Method:
    """Base of every method. Subclasses set `name`, and override `phases` and `enter`."""

    name: str = ""

    def phases(self, cfg) -> list[Phase]:
        return [Phase("train", 1.0)]

    def enter(self, index: int, model: nn.Module, ctx: PhaseContext) -> SparseMethod | None:
        raise NotImplementedError

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Method-level state that --resume needs across phases (e.g. LTH's rewind weights)."""
        return {}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def config(self) -> dict:
        """Extra method_config entries for the manifest."""
        return {}


def budget_of(model: nn.Module, sparsity: float) -> tuple[int, int]:
    """(budget K, total N) over all conv/linear weights: K = round((1 - sparsity) * N), as BCS."""
    from ..sparse import sparsifiable_layers

    total = sum((m.weight_shape if hasattr(m, "weight_shape") else m.weight.shape).numel()
                for _, m in sparsifiable_layers(model))
    return round((1.0 - sparsity) * total), total


class SingleSparse(Method):
    """bcs / fixed / random / dense: one phase, the rsp.sparse method from step one."""

    def __init__(self, name: str):
        self.name = name  # no options: BCS's are first-class flags (--regrow, --sigma, ...)

    def enter(self, index, model, ctx):
        from ..sparse import make_sparse

        cfg = ctx.cfg
        init = getattr(cfg, "sparse_init", "budget")
        opts = dict(momentum=cfg.momentum, weight_decay=cfg.weight_decay, sigma=cfg.sigma, alpha=cfg.alpha,
                    temperature=cfg.temperature, rewire_every=cfg.rewire_every,
                    regrow=cfg.regrow, init=init) if self.name == "bcs" else {"init": init} if self.name == "fixed" else {}
        return make_sparse(self.name, model, cfg.sparsity, ctx.generator, model_name=ctx.model_name, **opts)


@dataclass(frozen=True)
class MethodEntry:
    factory: Callable[..., Method]
    summary: str  # one line for `rsp train --help`
    # "method": a way to reach the budget (scripts/methods_table.py's default rows); "control": a baseline that
    # isolates one ingredient of another method (random masks, re-drawn tickets); "dense": no budget at all
    role: str = "method"


_REGISTRY: dict[str, MethodEntry] = {}
ROLES = ("method", "control", "dense")


def register(name: str, summary: str, role: str = "method"):
    """Class or factory decorator: `rsp train --method NAME` builds it with the recipe's method_options."""
    if role not in ROLES:
        raise ValueError(f"method {name}: role must be one of {', '.join(ROLES)}, got {role!r}")

    def wrap(factory):
        _REGISTRY[name] = MethodEntry(factory, summary, role)
        return factory
    return wrap


for _n, _summary, _role in (
        ("bcs", "Bayesian connectivity sampling, sparse from step one", "method"),
        ("fixed", "random static mask, BCS's layer profile", "method"),
        ("random", "random static mask, the same density in every layer", "control"),
        ("dense", "no mask", "dense")):
    register(_n, _summary, _role)(lambda n=_n, **kw: SingleSparse(n, **kw))


def _load_all() -> None:
    # each family registers itself on import: a new method is one new module in this package, found here
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list_methods(role: str | None = None) -> list[str]:
    """Registered names in registration order (the single-phase ones first, then the modules by name)."""
    _load_all()
    return [n for n, e in _REGISTRY.items() if role is None or e.role == role]


def method_help() -> str:
    """`name (summary) | ...` for the CLI's --method help."""
    _load_all()
    return " | ".join(f"{n} ({e.summary})" for n, e in _REGISTRY.items())


def create_method(name: str, **options) -> Method:
    """The method `name`; options (`method_options` in a recipe) go to its constructor as keywords."""
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    try:
        return _REGISTRY[name].factory(**options)
    except TypeError as exc:
        raise ValueError(f"method {name}: bad method_options {sorted(options)} ({exc})") from None


def split_steps(phases: list[Phase], total_steps: int) -> list[int]:
    """Steps per phase: fractions of the method's whole budget, largest remainder, each phase >= 1 step."""
    n = len(phases)
    total_steps = max(total_steps, n)
    weights = [max(0.0, p.fraction) for p in phases]
    s = sum(weights) or 1.0
    raw = [w / s * (total_steps - n) for w in weights]
    out = [1 + int(r) for r in raw]
    rest = total_steps - sum(out)
    for i in sorted(range(n), key=lambda i: raw[i] - int(raw[i]), reverse=True)[:rest]:
        out[i] += 1
    return out


__all__ = ["Method", "MethodEntry", "Phase", "PhaseContext", "SingleSparse", "budget_of", "create_method", "list_methods",
           "method_help", "register", "split_steps"]

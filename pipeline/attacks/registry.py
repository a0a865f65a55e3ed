"""The attack registry: every attack `ensemble_eval` and `rsp verify` can run, by name, with one signature.

An attack registers itself where it is defined (as timm's `register_model`):

    @register_attack("square", kind="black-box", note="black-box, queries the artifact")
    def run_square(model, judge, x, y, settings, generator, attack) -> AttackResult: ...

`run` gets the PyTorch model (in `attack_mode`; a white-box attack differentiates it), the judge (query-only:
the exported artifact, else the model; a black-box attack queries it), float images x in [0, 1] with labels y,
the run's `AttackSettings`, a torch.Generator seeded for this attack alone, and the bool mask of the examples
to attack (those the judge classifies correctly). It returns an `AttackResult` for these examples; the worst
case over attacks and the judging are `ensemble_eval`'s. Everything that names attacks reads the registry:
ensemble_eval, rsp verify's --attacks (its check, its help, its `all` alias) and the sanity checks' white-box /
black-box split. Every module of the package registers on import (rsp.attacks finds them: a new attack is one
new file); `order` places an attack in the lists (verify's columns, `all`, which attack's example an image
keeps on a tie), whatever order the modules were found in: the built-ins are 10, 20, ... in the order rsp verify
has always listed them, a new attack without one comes after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

KINDS = ("white-box", "black-box")


@dataclass(frozen=True)
class AttackSettings:
    """One evaluation's budgets, as `ensemble_eval` resolved them; each attack reads the fields it uses."""

    eps: float
    steps: int  # PGD
    restarts: int  # PGD
    step_size: float  # PGD
    apgd_steps: int
    apgd_restarts: int
    n_target_classes: int  # APGD-T, FAB-T
    square_queries: int
    p_init: float  # Square
    fab_steps: int
    fab_restarts: int
    batch_size: int
    bf16: bool  # gradient passes under bfloat16 autocast (attacks that support it)


@dataclass(frozen=True)
class Attack:
    name: str
    kind: str  # "white-box": gradients of the model | "black-box": queries of the judge only
    run: Callable  # run(model, judge, x, y, settings, generator, attack) -> AttackResult
    note: str = ""  # a few words for rsp verify --help, e.g. "targeted DLR"
    in_all: bool = True  # part of rsp verify's --attacks all
    order: int = 100  # position in every list of attacks (ties: registration order)


ATTACK_REGISTRY: dict[str, Attack] = {}


def register_attack(name: str, *, kind: str, note: str = "", in_all: bool = True, order: int = 100):
    """Decorator: register `run` under `name` (see the module docstring for its signature)."""
    if kind not in KINDS:
        raise ValueError(f"attack {name!r}: kind must be one of {', '.join(KINDS)}, not {kind!r}")

    def wrap(run: Callable) -> Callable:
        if name in ATTACK_REGISTRY:
            raise ValueError(f"attack {name!r} is already registered")
        ATTACK_REGISTRY[name] = Attack(name, kind, run, note, in_all, order)
        ordered = sorted(ATTACK_REGISTRY.values(), key=lambda a: a.order)  # stable: ties keep registration order
        ATTACK_REGISTRY.clear()
        ATTACK_REGISTRY.update((a.name, a) for a in ordered)
        return run

    return wrap


def attack_names(kind: str | None = None) -> list[str]:
    """The registered attacks (of one kind), in their order."""
    return [a.name for a in ATTACK_REGISTRY.values() if kind is None or a.kind == kind]

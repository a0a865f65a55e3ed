"""The model zoo: a name -> constructor registry, one file per family.

Every model takes float NCHW input in [0, 1] and returns logits; its first module `normalize` holds the
data set's mean/std. Each model carries `rsp_family` and `rsp_config` (JSON-plain kwargs) so that
`create_model(name, **model.rsp_config)` rebuilds the same architecture, shrunk widths included.
"""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch.nn as nn

from .layers import Normalize

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(KeyError):
    """A model name that is not registered. A KeyError so dict-style callers can catch it."""

    def __init__(self, name: str, available: Iterable[str]):
        super().__init__(name)
        self.name = name
        self.available = list(available)

    def __str__(self) -> str:  # KeyError would print the repr of the name only
        return f"unknown model {self.name!r}; available models: {', '.join(self.available)}"


class ModelArgumentError(TypeError, ValueError):
    """Constructor arguments a model does not take, or values it rejects (bad input, not a bug)."""


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a constructor under `name` (names are unique)."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model. Unknown kwargs or bad values raise ModelArgumentError (a TypeError and a ValueError)."""
    try:
        fn = _REGISTRY[name]
    except KeyError:
        raise UnknownModelError(name, list_models()) from None
    params = inspect.signature(fn).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = ", ".join(n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL)
        raise ModelArgumentError(f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
                                 f"it takes: {accepted}")
    try:
        return fn(**kwargs)
    except (TypeError, ValueError) as exc:  # a value of the wrong type or range, e.g. width: -1
        raise ModelArgumentError(f"model {name!r} with {kwargs}: {exc}") from None


__all__ = ["ModelArgumentError", "Normalize", "UnknownModelError", "create_model", "list_models", "register_model"]

# Importing the families registers them; they import register_model from here, so this stays last.
from . import resnet, small_cnn, vgg, wrn  # noqa: E402,F401

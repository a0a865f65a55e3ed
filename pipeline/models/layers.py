"""Building blocks shared by every model family: input normalisation, conv helpers, init, common kwargs."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, as the model's first module.

    Normalisation lives inside the model so attacks, exports and verifiers all work on raw [0, 1] inputs
    (epsilon balls are defined there). The buffers are persistent so a saved state_dict carries them.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv feeds a BatchNorm, whose shift makes a conv bias redundant.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs, BN as identity; linear layers keep PyTorch's default.

    The default linear init (uniform +-1/sqrt(fan_in)) is what the CIFAR reference implementations we
    compare against use; the classifier is small, so its scale barely matters, and keeping the default
    means the output layer starts exactly as in those references. Modules are visited in registration
    order, so the weights are a deterministic function of the torch seed.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def positive_int(value: object, what: str) -> int:
    ok = isinstance(value, int) or (isinstance(value, float) and value.is_integer())  # JSON may give 64.0
    if isinstance(value, bool) or not ok or int(value) < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def common_config(num_classes: int, in_channels: int, mean: Sequence[float] | None,
                  std: Sequence[float] | None) -> dict:
    """The kwargs every constructor takes, validated and made JSON-plain (lists of Python floats)."""
    num_classes = positive_int(num_classes, "num_classes")
    in_channels = positive_int(in_channels, "in_channels")
    mean = [0.0] * in_channels if mean is None else [float(v) for v in mean]
    std = [1.0] * in_channels if std is None else [float(v) for v in std]
    for label, stats in (("mean", mean), ("std", std)):
        if len(stats) != in_channels:
            raise ValueError(f"{label} has {len(stats)} values but in_channels is {in_channels}")
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(math.isfinite(m) for m in mean):
        raise ValueError(f"mean must be finite and std positive, got mean={mean} std={std}")
    return {"num_classes": num_classes, "in_channels": in_channels, "mean": mean, "std": std}


def block_widths(block_channels: Sequence[Sequence[int]] | None, defaults: Sequence[int],
                 blocks_per_stage: Sequence[int]) -> list[list[int]]:
    """Per-block inner widths, one list per stage: the given ones (checked against the layout) or the defaults."""
    if block_channels is None:
        return [[int(w)] * n for w, n in zip(defaults, blocks_per_stage)]
    stages = [list(s) for s in block_channels]
    layout = [len(s) for s in stages]
    if layout != list(blocks_per_stage):
        raise ValueError(f"block_channels must have {list(blocks_per_stage)} blocks per stage, got {layout}")
    return [[positive_int(w, "block_channels entry") for w in s] for s in stages]

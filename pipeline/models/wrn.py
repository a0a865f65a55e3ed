"""WideResNet (Zagoruyko & Komodakis 2016), the variant used by TRADES and MART.

Pre-activation blocks (BN-ReLU-conv), a 16-channel stem, three groups of widths 16k, 32k, 64k with
n = (depth - 4) / 6 blocks each, a 1x1 conv shortcut where the shape changes, and a final BN-ReLU before
the average pool. As there, a projecting shortcut reads the pre-activated input, an identity one the raw
input. `block_channels` narrows each block's inner width (conv1 out = conv2 in) for shrunk networks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import register_model
from .layers import Normalize, block_widths, common_config, conv1x1, conv3x3, init_weights, positive_int


class WideBlock(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, mid_channels, stride)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(mid_channels, out_channels)
        self.shortcut = conv1x1(in_channels, out_channels, stride) if stride != 1 or in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(o)
        out = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return out + identity


def wrn_depth(depth: int) -> int:
    """Blocks per group for a WRN of this depth."""
    depth = positive_int(depth, "depth")
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 34, ...), got {depth}")
    return (depth - 4) // 6


class WideResNet(nn.Module):
    rsp_family = "wrn"

    def __init__(self, depth: int = 28, widen_factor: int = 10, block_channels: Sequence[Sequence[int]] | None = None,
                 *, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        config = common_config(num_classes, in_channels, mean, std)
        n = wrn_depth(depth)
        widen_factor = positive_int(widen_factor, "widen_factor")
        group_widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        mids = block_widths(block_channels, group_widths, [n] * 3)
        self.normalize = Normalize(config["mean"], config["std"])
        self.conv1 = conv3x3(config["in_channels"], 16)
        c = 16
        for i, (out, group_mids) in enumerate(zip(group_widths, mids)):
            group = []
            for j, mid in enumerate(group_mids):
                group.append(WideBlock(c, mid, out, stride=2 if i > 0 and j == 0 else 1))
                c = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*group))
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, config["num_classes"])
        init_weights(self)
        self.rsp_config = {**config, "depth": int(depth), "widen_factor": widen_factor, "block_channels": mids}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.normalize(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(self.relu(self.bn(x)))))


@register_model("wrn")
def wrn(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None, depth: int = 28, widen_factor: int = 10,
        block_channels: Sequence[Sequence[int]] | None = None) -> WideResNet:
    return WideResNet(depth, widen_factor, block_channels, num_classes=num_classes, in_channels=in_channels,
                      mean=mean, std=std)


def _named(depth: int, widen_factor: int, **kwargs) -> WideResNet:
    model = wrn(depth=depth, widen_factor=widen_factor, **kwargs)
    # The name fixes depth and width, so they are not kwargs of the named constructor.
    model.rsp_config = {k: v for k, v in model.rsp_config.items() if k not in ("depth", "widen_factor")}
    return model


@register_model("wrn-28-4")
def wrn_28_4(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, block_channels: Sequence[Sequence[int]] | None = None) -> WideResNet:
    return _named(28, 4, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                  block_channels=block_channels)


@register_model("wrn-34-10")
def wrn_34_10(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, block_channels: Sequence[Sequence[int]] | None = None) -> WideResNet:
    return _named(34, 10, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                  block_channels=block_channels)

"""CIFAR ResNet (He et al. 2016, the common CIFAR adaptation): 3x3 stem, no max pool, BasicBlocks.

Stage output widths are tied by the residual additions, so a shrunk network can only narrow each
block's inner width (conv1 out = conv2 in): that is `block_channels`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import register_model
from .layers import Normalize, block_widths, common_config, conv1x1, conv3x3, init_weights, positive_int


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, mid_channels, stride)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(mid_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        # Projection only where the shape changes; identity blocks add no parameters.
        self.shortcut = (nn.Sequential(conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.shortcut is None else self.shortcut(x)
        return self.relu2(out + identity)


class ResNet(nn.Module):
    rsp_family = "resnet"

    def __init__(self, blocks: Sequence[int], width: int = 64, block_channels: Sequence[Sequence[int]] | None = None,
                 *, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        config = common_config(num_classes, in_channels, mean, std)
        width = positive_int(width, "width")
        stage_widths = [width * m for m in (1, 2, 4, 8)]
        mids = block_widths(block_channels, stage_widths, blocks)
        self.normalize = Normalize(config["mean"], config["std"])
        self.conv1 = conv3x3(config["in_channels"], width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        c = width
        for i, (out, stage_mids) in enumerate(zip(stage_widths, mids)):
            stage = []
            for j, mid in enumerate(stage_mids):
                stage.append(BasicBlock(c, mid, out, stride=2 if i > 0 and j == 0 else 1))
                c = out
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(c, config["num_classes"])
        init_weights(self)
        self.rsp_config = {**config, "width": width, "block_channels": mids}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.normalize(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


@register_model("resnet18")
def resnet18(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, width: int = 64,
             block_channels: Sequence[Sequence[int]] | None = None) -> ResNet:
    return ResNet([2, 2, 2, 2], width, block_channels, num_classes=num_classes, in_channels=in_channels,
                  mean=mean, std=std)


@register_model("resnet34")
def resnet34(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
             std: Sequence[float] | None = None, width: int = 64,
             block_channels: Sequence[Sequence[int]] | None = None) -> ResNet:
    return ResNet([3, 4, 6, 3], width, block_channels, num_classes=num_classes, in_channels=in_channels,
                  mean=mean, std=std)

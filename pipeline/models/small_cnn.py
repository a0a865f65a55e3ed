"""A small all-conv network for tiny inputs (8x8 digits) that also runs on 32x32 images.

conv3x3-BN-ReLU per entry of `channels`, one 2x2 max pool after the second conv, global average pool,
linear classifier. The global pool makes it independent of the input size; the single pool keeps 8x8
inputs at >= 4x4 so the last convs still see spatial context.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import register_model
from .layers import Normalize, common_config, conv3x3, init_weights, positive_int


class SmallCNN(nn.Module):
    rsp_family = "small-cnn"

    def __init__(self, channels: Sequence[int] = (32, 64, 128), *, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        config = common_config(num_classes, in_channels, mean, std)
        channels = [positive_int(c, "channels entry") for c in channels]
        if not channels:
            raise ValueError("channels must list at least one conv width")
        self.normalize = Normalize(config["mean"], config["std"])
        layers: list[nn.Module] = []
        c = config["in_channels"]
        for i, width in enumerate(channels):
            layers += [conv3x3(c, width), nn.BatchNorm2d(width), nn.ReLU()]
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            c = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, config["num_classes"])
        init_weights(self)
        self.rsp_config = {**config, "channels": channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(self.normalize(x)))))


@register_model("small-cnn")
def small_cnn(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, channels: Sequence[int] = (32, 64, 128)) -> SmallCNN:
    return SmallCNN(channels, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

"""CIFAR VGG with BatchNorm and a single linear classifier.

As in Özdenizci & Legenstein (2021): conv3x3-BN-ReLU stacks with 2x2 max pools, then one
Linear(512, num_classes) (5,120 output weights for CIFAR-10) instead of ImageNet VGG's three FC layers.
An adaptive 1x1 average pool before the classifier lets inputs larger than 32x32 through; at 32x32 the
features are already 1x1 and it is the identity.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import register_model
from .layers import Normalize, common_config, conv3x3, init_weights, positive_int

POOL = "M"
CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
}


def _check_cfg(cfg: Sequence[int | str]) -> list[int | str]:
    out: list[int | str] = [POOL if v == POOL else positive_int(v, "cfg entry") for v in cfg]
    if not any(v != POOL for v in out):
        raise ValueError(f"cfg must hold at least one conv width, got {list(cfg)}")
    return out


def scaled_cfg(cfg: Sequence[int | str], width: float) -> list[int | str]:
    """The cfg with every conv width multiplied by `width`, rounded half up, at least 1."""
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    return [v if v == POOL else max(1, int(v * width + 0.5)) for v in cfg]


class VGG(nn.Module):
    rsp_family = "vgg"

    def __init__(self, cfg: Sequence[int | str], *, num_classes: int = 10, in_channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        config = common_config(num_classes, in_channels, mean, std)
        cfg = _check_cfg(cfg)
        self.normalize = Normalize(config["mean"], config["std"])
        layers: list[nn.Module] = []
        c = config["in_channels"]
        for v in cfg:
            if v == POOL:
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [conv3x3(c, v), nn.BatchNorm2d(v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(c, config["num_classes"])
        init_weights(self)
        # The resolved cfg, not the width multiplier: a shrunk network edits per-layer widths here.
        self.rsp_config = {**config, "cfg": cfg}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(self.normalize(x)))))


def _vgg(name: str, cfg: Sequence[int | str] | None, width: float, **common) -> VGG:
    return VGG(scaled_cfg(CFGS[name], width) if cfg is None else cfg, **common)


@register_model("vgg11")
def vgg11(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None, cfg: Sequence[int | str] | None = None, width: float = 1.0) -> VGG:
    return _vgg("vgg11", cfg, width, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)


@register_model("vgg16")
def vgg16(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None, cfg: Sequence[int | str] | None = None, width: float = 1.0) -> VGG:
    return _vgg("vgg16", cfg, width, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

"""CIFAR VGG with BatchNorm: the paper's VGG-16 and single-linear variants.

`vgg16` is the network of Özdenizci & Legenstein (2021), layer by layer as in their reference code
(models/sparse_vgg16.py): 13 conv3x3 (no bias) -> BatchNorm -> ReLU layers of widths
64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 with only four 2x2 max pools (after convs 2, 4, 7
and 10, so the last three 512-convs run at 2x2 on 32x32 input), then flatten 2x2x512 = 2048 and a head
Linear(2048, 256) -> ReLU -> Linear(256, 256) -> ReLU -> Linear(256, C), with biases and no BatchNorm. That is
16 sparsifiable layers (features.* convs 1-13, classifier.0 / .2 / .4) and 15,302,848 conv+linear weights for
10 classes.

- Other input sizes: an adaptive average pool to `pool_size` x `pool_size` (2 here) sits before the flatten.
  At 32x32 the features are already 2x2 and it is the identity; larger inputs are averaged down to 2x2 so the
  head keeps its 2048 inputs. Inputs must be at least 16x16 (the four pools need it).
  The flatten is PyTorch's (NCHW): input feature c*4 + h*2 + w of classifier.0 is channel c at (h, w)
  (the reference flattens NHWC; the order of a dense layer's inputs changes nothing it can learn).
- `width` scales the conv widths *and* the head's hidden widths (256 -> 64 at width 0.25): every layer then
  keeps the share of the network's weights it has at full width (convs and the hidden linears scale by
  width^2), so the layer-size-proportional parts of BCS (the density profile, the rebirth draw) see the
  paper's proportions. An explicit `cfg` / `hidden` wins over `width` (a shrunk network lists its widths).

`vgg16-1fc` is rsp's earlier VGG-16, kept because it is a common CIFAR variant and older runs use it: five
pools, a global average pool and one Linear(512, C) (14 layers, 14,715,584 weights for 10 classes). It is
*not* the paper's network. `vgg11` has the same single-linear layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from . import register_model
from .layers import Normalize, common_config, conv3x3, init_weights, positive_int

POOL = "M"
CFGS: dict[str, list[int | str]] = {
    "vgg11-1fc": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL],
    "vgg16-1fc": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL],
    # the paper's: no pool after the last block, the 2x2 map goes to the head
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512],
}
PAPER_HIDDEN = [256, 256]  # the reference's head: 2048 -> 256 -> 256 -> C
PAPER_POOL_SIZE = 2


def _check_cfg(cfg: Sequence[int | str]) -> list[int | str]:
    out: list[int | str] = [POOL if v == POOL else positive_int(v, "cfg entry") for v in cfg]
    if not any(v != POOL for v in out):
        raise ValueError(f"cfg must hold at least one conv width, got {list(cfg)}")
    return out


def _scaled(v: int, width: float) -> int:
    return max(1, int(v * width + 0.5))


def scaled_cfg(cfg: Sequence[int | str], width: float) -> list[int | str]:
    """The cfg with every conv width multiplied by `width`, rounded half up, at least 1."""
    if not width > 0:
        raise ValueError(f"width must be positive, got {width!r}")
    return [v if v == POOL else _scaled(v, width) for v in cfg]


class VGG(nn.Module):
    """conv3x3-BN-ReLU per int of `cfg` ("M": 2x2 max pool), an adaptive average pool to pool_size^2, flatten,
    then the head: Linear+bias -> ReLU per entry of `hidden`, and the output Linear. With no hidden layer the
    head is the single `classifier` Linear; with some it is the Sequential `classifier` (Linear, ReLU, ...)."""

    rsp_family = "vgg"

    def __init__(self, cfg: Sequence[int | str], *, hidden: Sequence[int] = (), pool_size: int = 1,
                 num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        super().__init__()
        config = common_config(num_classes, in_channels, mean, std)
        cfg = _check_cfg(cfg)
        hidden = [positive_int(h, "hidden entry") for h in hidden]
        pool_size = positive_int(pool_size, "pool_size")
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
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.flatten = nn.Flatten(1)
        n = c * pool_size * pool_size
        if hidden:
            head: list[nn.Module] = []
            for h in hidden:
                head += [nn.Linear(n, h), nn.ReLU()]
                n = h
            self.classifier = nn.Sequential(*head, nn.Linear(n, config["num_classes"]))
        else:
            self.classifier = nn.Linear(n, config["num_classes"])
        init_weights(self)
        # The resolved widths, not the width multiplier: a shrunk network edits per-layer widths here.
        self.rsp_config = {**config, "cfg": cfg, "hidden": hidden, "pool_size": pool_size}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.flatten(self.pool(self.features(self.normalize(x)))))


def _vgg(layout: str, cfg, hidden, pool_size: int, width: float, default_hidden: Sequence[int], **common) -> VGG:
    cfg = scaled_cfg(CFGS[layout], width) if cfg is None else cfg  # scaled_cfg also checks width
    hidden = [_scaled(h, width) for h in default_hidden] if hidden is None else hidden
    return VGG(cfg, hidden=hidden, pool_size=pool_size, **common)


@register_model("vgg16")
def vgg16(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None, cfg: Sequence[int | str] | None = None,
          hidden: Sequence[int] | None = None, pool_size: int = PAPER_POOL_SIZE, width: float = 1.0) -> VGG:
    """The paper's VGG-16 (four pools, 2x2 map, head 2048-256-256-C); width scales convs and hidden units."""
    if cfg is not None and hidden is None and list(cfg)[-1:] == [POOL]:
        # what a run made before vgg16 was the paper's network stores: rebuilding it here would silently
        # give another head (and then a state_dict that does not fit)
        raise ValueError("a cfg ending in a max pool with no hidden widths is the earlier single-linear VGG-16: "
                         "build it as vgg16-1fc")
    return _vgg("vgg16", cfg, hidden, pool_size, width, PAPER_HIDDEN, num_classes=num_classes,
                in_channels=in_channels, mean=mean, std=std)


@register_model("vgg16-1fc")
def vgg16_1fc(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, cfg: Sequence[int | str] | None = None,
              hidden: Sequence[int] | None = None, pool_size: int = 1, width: float = 1.0) -> VGG:
    """VGG-16 with five pools, a global average pool and one Linear(512, C): not the paper's network."""
    return _vgg("vgg16-1fc", cfg, hidden, pool_size, width, [], num_classes=num_classes,
                in_channels=in_channels, mean=mean, std=std)


@register_model("vgg11")
def vgg11(*, num_classes: int = 10, in_channels: int = 3, mean: Sequence[float] | None = None,
          std: Sequence[float] | None = None, cfg: Sequence[int | str] | None = None,
          hidden: Sequence[int] | None = None, pool_size: int = 1, width: float = 1.0) -> VGG:
    """VGG-11 with five pools, a global average pool and one Linear(512, C)."""
    return _vgg("vgg11-1fc", cfg, hidden, pool_size, width, [], num_classes=num_classes,
                in_channels=in_channels, mean=mean, std=std)

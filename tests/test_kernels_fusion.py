"""What the exporter fuses into rsp's CPU kernels (BatchNorm folded into the weights, bias, residual add, ReLU,
2x2 max pool; the input normalisation and a global average pool) computes what the unfused graph does: the
TVM library of every registry family, all its layers on rsp's kernels (one on the dense kernel), against the
PyTorch model within 1e-5. Small widths keep each build to seconds; ``wrn`` (depth 10, widen 1) stands in
for wrn-28-4 and wrn-34-10, which are the same module code at other sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import needs_tvm
from rsp.models import create_model, list_models

FAMILIES = {
    "small-cnn": {"channels": [8, 16, 16]},
    "vgg11": {"width": 0.125},
    "vgg16": {"width": 0.125},
    "resnet18": {"width": 4},
    "wrn": {"depth": 10, "widen_factor": 1},
}
STANDS_IN = {"wrn-28-4": "wrn", "wrn-34-10": "wrn", "resnet34": "resnet18",
             "vgg16-1fc": "vgg16"}  # the same module code at other sizes


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], **FAMILIES[name]).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < 0.3)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.BatchNorm2d):  # statistics far from the identity: folding is real work
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def test_every_registry_model_is_covered():
    assert set(list_models()) == set(FAMILIES) | set(STANDS_IN)


@needs_tvm
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_kernels_match_the_unfused_model(name, tmp_path, monkeypatch):
    from rsp.export import _layer_names
    from rsp.targets import get_target
    from rsp.tvm_build import build, run_library

    monkeypatch.setenv("RSP_KERNEL_CACHE", str(tmp_path / "cache"))
    model = _model(name)
    state = model.state_dict()
    names = _layer_names(model)
    layers = {n: state[f"{n}.weight"] for n in names}
    res = build(model, (3, 32, 32), get_target("x86-cpu"), tmp_path / "m.so", batch=2, sparse_layers=layers,
                sparse_mode="cpu", dense_layers=names[:1], log=lambda *_: None)
    linked = {ll["layer"]: ll for ll in res.info["sparse_kernels"]["layers"]}
    assert set(linked) == set(names) and linked[names[0]]["kernel_mode"] == "cpu-dense"
    fused = {op for ll in linked.values() for op in ll["fused"]}
    assert "normalize" in linked[names[0]]["fused"]  # the model's first op is its input normalisation
    if name != "wrn":  # post-activation families: every conv's BatchNorm and ReLU run in its kernel
        assert {"batch_norm", "relu"} <= fused
    if name.startswith("vgg") or name == "small-cnn":
        assert "pool" in fused
    if name in ("resnet18", "wrn"):
        assert "residual" in fused
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    out = run_library(tmp_path / "m.so", x.numpy(), 2)
    assert np.abs(out - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))

"""The model zoo: the registry and the contract every model keeps for the rest of rsp."""

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rsp.models import ModelArgumentError, Normalize, UnknownModelError, create_model, list_models, register_model

# Small but structurally complete versions of every registered model: each forward takes milliseconds.
TINY = {
    "small-cnn": {},
    "vgg11": {"width": 0.125},
    "vgg16": {"width": 0.125},
    "vgg16-1fc": {"width": 0.125},
    "resnet18": {"width": 8},
    "resnet34": {"width": 8},
    "wrn": {"depth": 10, "widen_factor": 1},
    "wrn-28-4": {"block_channels": [[4] * 4] * 3},  # full depth and stage widths, narrow inner convs
    "wrn-34-10": None,  # 46M parameters: built on the meta device for the parameter count only
}
RUNNABLE = [n for n, kw in TINY.items() if kw is not None]
CIFAR = {"num_classes": 10, "in_channels": 3, "mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}
LEAVES = (Normalize, nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)


def tiny(name, **kwargs):
    return create_model(name, **{**TINY[name], **kwargs})


def batch(n=2, c=3, size=32, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_model_is_covered():
    assert set(list_models()) == set(TINY)


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("num_classes", [10, 7])
def test_builds_and_maps_a_batch_to_finite_logits(name, num_classes):
    torch.manual_seed(0)
    model = tiny(name, num_classes=num_classes)
    assert type(model.rsp_family) is str and model.rsp_family
    assert next(iter(model.named_children()))[0] == "normalize"
    for train in (True, False):
        model.train(train)
        out = model(batch())
        assert out.shape == (2, num_classes) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_small_cnn_takes_8x8_grayscale_and_32x32():
    model = create_model("small-cnn", in_channels=1, mean=[0.5], std=[0.25]).eval()
    for size in (8, 32):
        assert torch.isfinite(model(batch(c=1, size=size))).all()
    assert model(batch(c=1, size=8)).shape == (2, 10)


@pytest.mark.parametrize("name", ["vgg16", "resnet18", "wrn"])
def test_inputs_larger_than_32_work(name):
    assert tiny(name).eval()(batch(size=40)).shape == (2, 10)


@pytest.mark.parametrize("name", RUNNABLE)
def test_rebuild_from_rsp_config_gives_identical_logits(name):
    torch.manual_seed(0)
    model = tiny(name, **CIFAR)
    config = json.loads(json.dumps(model.rsp_config))  # what a manifest stores
    assert config == model.rsp_config, "rsp_config must be JSON-plain (lists, not tuples)"
    torch.manual_seed(1)  # different init: the rebuild must get everything from the state_dict
    rebuilt = create_model(name, **config)
    assert rebuilt.rsp_config == model.rsp_config
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = batch()
    assert torch.equal(model.eval()(x), rebuilt.eval()(x))


def test_named_wrn_config_rebuilds_the_named_net():
    model = create_model("wrn-28-4", block_channels=[[4] * 4] * 3)
    assert "depth" not in model.rsp_config and "widen_factor" not in model.rsp_config
    rebuilt = create_model("wrn-28-4", **model.rsp_config)
    assert [k for k in rebuilt.state_dict()] == [k for k in model.state_dict()]
    generic = create_model("wrn", depth=28, widen_factor=4, block_channels=[[4] * 4] * 3)
    assert {k: v.shape for k, v in generic.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", RUNNABLE)
def test_same_seed_same_weights(name):
    torch.manual_seed(0)
    a = tiny(name).state_dict()
    torch.manual_seed(0)
    b = tiny(name).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,expected", [("vgg16", 15.3e6), ("vgg16-1fc", 14.7e6), ("resnet18", 11.2e6), ("wrn-28-4", 5.85e6),
                                           ("wrn-34-10", 46.2e6), ("vgg11", 9.2e6)])
def test_full_size_parameter_counts(name, expected):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.01, count


def _weights(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_vgg16_is_the_papers_network():
    # the reference (models/sparse_vgg16.py): 13 convs, 4 pools, head 2048 -> 256 -> 256 -> C with biases
    with torch.device("meta"):
        model = create_model("vgg16", num_classes=10)
    layers = _weights(model)
    assert sum(m.weight.numel() for _, m in layers) == 15_302_848
    assert [n for n, _ in layers] == [f"features.{i}" for i in (0, 3, 7, 10, 14, 17, 20, 24, 27, 30, 34, 37, 40)] + \
        ["classifier.0", "classifier.2", "classifier.4"]
    assert all(m.bias is None for _, m in layers[:13]) and all(m.bias is not None for _, m in layers[13:])
    assert [tuple(m.weight.shape) for _, m in layers[13:]] == [(256, 2048), (256, 256), (10, 256)]


def test_vgg16_forward_follows_the_reference_layer_sequence():
    model = create_model("vgg16").eval()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((type(m).__name__, tuple(o.shape[1:]))))
             for m in model.modules() if not list(m.children())]
    model(batch(n=1))
    for h in hooks:
        h.remove()

    def block(c, s):
        return [("Conv2d", (c, s, s)), ("BatchNorm2d", (c, s, s)), ("ReLU", (c, s, s))]

    pool = lambda c, s: [("MaxPool2d", (c, s, s))]
    expected = [("Normalize", (3, 32, 32))] + block(64, 32) * 2 + pool(64, 16) + block(128, 16) * 2 + pool(128, 8) \
        + block(256, 8) * 3 + pool(256, 4) + block(512, 4) * 3 + pool(512, 2) + block(512, 2) * 3 \
        + [("AdaptiveAvgPool2d", (512, 2, 2)), ("Flatten", (2048,)), ("Linear", (256,)), ("ReLU", (256,)),
           ("Linear", (256,)), ("ReLU", (256,)), ("Linear", (10,))]
    assert seen == expected


def test_vgg16_width_scales_convs_and_the_hidden_head():
    model = create_model("vgg16", width=0.25)
    assert model.rsp_config["hidden"] == [64, 64] and model.rsp_config["pool_size"] == 2
    assert [m.weight.shape[1] for _, m in _weights(model)[13:]] == [512, 64, 64]
    explicit = create_model("vgg16", width=0.25, hidden=[7, 5])  # explicit widths win over width
    assert [m.out_features for _, m in _weights(explicit)[13:]] == [7, 5, 10]
    assert explicit(batch(size=64)).shape == (2, 10)  # larger inputs are pooled to 2x2 before the head


def test_a_run_of_the_earlier_vgg16_is_refused_with_the_name_to_use():
    old = create_model("vgg16-1fc", width=0.125).rsp_config
    del old["hidden"], old["pool_size"]  # what a manifest written before the paper's network holds
    with pytest.raises(ModelArgumentError, match="vgg16-1fc"):
        create_model("vgg16", **old)


def test_vgg16_1fc_is_the_single_linear_variant():
    with torch.device("meta"):
        model = create_model("vgg16-1fc")
    assert isinstance(model.classifier, nn.Linear) and model.classifier.weight.shape == (10, 512)
    assert len(_weights(model)) == 14
    assert sum(m.weight.numel() for _, m in _weights(model)) == 14_715_584


@pytest.mark.parametrize("name", RUNNABLE)
def test_normalisation_is_inside_the_model(name):
    torch.manual_seed(0)
    model = tiny(name, **CIFAR).eval()
    state = model.state_dict()
    mean = torch.tensor(CIFAR["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR["std"]).view(1, 3, 1, 1)
    assert torch.equal(state["normalize.mean"], mean) and torch.equal(state["normalize.std"], std)
    identity = copy.deepcopy(model)
    identity.normalize.mean.zero_()
    identity.normalize.std.fill_(1.0)
    x = batch()
    torch.testing.assert_close(model(x), identity((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_default_normalisation_is_identity():
    model = create_model("small-cnn", in_channels=2)
    assert model.normalize.mean.shape == (1, 2, 1, 1)
    assert torch.equal(model.normalize.mean, torch.zeros(1, 2, 1, 1))
    assert torch.equal(model.normalize.std, torch.ones(1, 2, 1, 1))
    assert model.rsp_config["mean"] == [0.0, 0.0] and model.rsp_config["std"] == [1.0, 1.0]


@pytest.mark.parametrize("name", RUNNABLE)
def test_only_plain_layers_and_each_conv_linear_called_once(name):
    model = tiny(name)
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    assert [n for n, m in leaves if type(m) not in LEAVES] == []  # no dropout, no custom ops
    assert [n for n, m in leaves if getattr(m, "inplace", False)] == []
    calls = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len({id(m) for _, m in layers}) == len(layers), "a conv/linear instance is reachable twice"
    for n, m in layers:
        m.register_forward_hook(lambda mod, inp, out, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    model(batch())
    assert calls == {n: 1 for n, _ in layers}


class _CountingConv(nn.Conv2d):
    def forward(self, x):
        self.calls += 1
        return super().forward(x)


class _CountingLinear(nn.Linear):
    def forward(self, x):
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("name", RUNNABLE)
def test_layers_swapped_by_setattr_are_the_ones_used(name):
    # What rsp's sparse/structure stages do: replace each conv/linear on its parent by attribute.
    torch.manual_seed(0)
    model = tiny(name).eval()
    x = batch()
    expected = model(x)
    swapped = []
    for _parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                new = copy.deepcopy(child)
                new.__class__ = _CountingConv if isinstance(child, nn.Conv2d) else _CountingLinear
                new.calls = 0
                setattr(parent, child_name, new)
                swapped.append(new)
    assert swapped
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert [m.calls for m in swapped] == [1] * len(swapped)


@pytest.mark.parametrize("name", RUNNABLE)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = tiny(name).train()
    F.cross_entropy(model(batch(n=4)), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_state_dict_keys_are_plain():
    keys = {n: list(create_model(n, **TINY[n]).state_dict()) for n in RUNNABLE}
    assert keys["vgg16"][:3] == ["normalize.mean", "normalize.std", "features.0.weight"]
    assert keys["vgg16"][-2:] == ["classifier.4.weight", "classifier.4.bias"]
    assert "classifier.weight" in keys["vgg16-1fc"] and "classifier.bias" in keys["vgg16-1fc"]
    assert keys["small-cnn"][2] == "features.0.weight" and "classifier.weight" in keys["small-cnn"]
    for k in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var",
              "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight", "layer4.1.conv2.weight", "fc.weight"):
        assert k in keys["resnet18"], k
    assert not any(k.startswith("layer1.0.shortcut") for k in keys["resnet18"])  # identity shortcut
    for k in ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.weight",
              "layer3.0.conv2.weight", "bn.weight", "fc.weight"):
        assert k in keys["wrn"], k


def test_vgg_cfg_and_width():
    model = create_model("vgg16", width=0.25)
    assert model.rsp_config["cfg"][:3] == [16, 16, "M"]
    cfg = [5, "M", 7, 3, "M", 6]
    shrunk = create_model("vgg11", cfg=cfg, width=4.0)  # an explicit cfg wins over width
    assert shrunk.rsp_config["cfg"] == cfg
    convs = [m for m in shrunk.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [5, 7, 3, 6] and shrunk.classifier.in_features == 6
    assert shrunk(batch()).shape == (2, 10)


def test_resnet_block_channels_shrink_inner_widths_only():
    mids = [[3, 5], [2, 7], [9, 1], [4, 4]]
    model = create_model("resnet18", width=4, block_channels=mids)
    assert model.rsp_config["block_channels"] == mids
    for stage, stage_mids in enumerate(mids, start=1):
        for j, mid in enumerate(stage_mids):
            block = getattr(model, f"layer{stage}")[j]
            assert block.conv1.out_channels == mid == block.conv2.in_channels
            assert block.conv2.out_channels == 4 * 2 ** (stage - 1)
    assert model(batch()).shape == (2, 10)
    assert create_model("resnet18", width=4).rsp_config["block_channels"] == [[4, 4], [8, 8], [16, 16], [32, 32]]


def test_wrn_block_channels():
    model = create_model("wrn", depth=16, widen_factor=2, block_channels=[[3, 4], [5, 6], [7, 8]])
    assert [model.layer2[j].conv1.out_channels for j in range(2)] == [5, 6]
    assert model.fc.in_features == 128 and model(batch()).shape == (2, 10)


@pytest.mark.parametrize("name,kwargs", [
    ("small-cnn", {"mean": [0.5, 0.5]}),  # length != in_channels
    ("small-cnn", {"std": [1.0, 0.0, 1.0]}),
    ("small-cnn", {"channels": []}),
    ("vgg16", {"width": 0}),
    ("vgg16", {"cfg": ["M"]}),
    ("resnet18", {"block_channels": [[4, 4], [4, 4], [4]]}),
    ("wrn", {"depth": 12}),
    ("resnet18", {"num_classes": 0}),
])
def test_bad_values_raise_value_error(name, kwargs):
    with pytest.raises(ValueError):
        create_model(name, **kwargs)


def test_unknown_kwarg_raises_type_error():
    with pytest.raises(TypeError):
        create_model("wrn-28-4", depth=10)  # the name fixes the depth


def test_unknown_model_name():
    with pytest.raises(UnknownModelError) as info:
        create_model("vgg19")
    err = info.value
    assert isinstance(err, KeyError)
    message = str(err)
    assert "\n" not in message and "vgg19" in message
    assert all(name in message for name in list_models())
    assert err.available == list_models()


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError):
        register_model("vgg16")(lambda **kw: nn.Identity())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("kwargs,match", [({"widht": 0.25}, "takes no argument 'widht'"),
                                          ({"width": 0.5}, "positive integer")])
def test_bad_constructor_arguments_are_one_error_type(kwargs, match):
    # bad input (a typo in --model-kwargs or a recipe), not a bug: the CLI turns it into a one-line exit 2
    with pytest.raises(ModelArgumentError, match=match) as info:
        create_model("resnet18", **kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)

"""rsp structure: regrouping and exact shrinking keep the function; pruning and N:M do what they say."""

import json

import pytest
import torch

import rsp
from rsp.artifacts import read_manifest, save_tensors, write_manifest
from rsp.channels import channel_groups, select_channels
from rsp.models import create_model
from rsp.sparse import sparsifiable_layers
from rsp.structure import (StructureOptions, analyse_layer, project_nm, prune_vectors, regroup_permutations, run,
                           shrink)
from helpers import rsp_cli, rsp_cli_here

TINY = {"small-cnn": {}, "vgg11": {"width": 0.125}, "vgg16": {"width": 0.125}, "vgg16-1fc": {"width": 0.125},
        "resnet18": {"width": 8}, "resnet34": {"width": 8},
        "wrn": {"depth": 10, "widen_factor": 2}, "wrn-28-4": {"block_channels": [[4] * 4, [8] * 4, [16] * 4]},
        "wrn-34-10": None}


def _sparse_model(name, kwargs, density=0.3, seed=0, zero_channels=True):
    """A registry model with random sparse weights, random BN statistics, and some dead channels."""
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        layers = sparsifiable_layers(model)
        for i, (_, m) in enumerate(layers):
            m.weight.mul_(torch.rand_like(m.weight) < density)
            if zero_channels and 0 < i < len(layers) - 1 and m.weight.shape[0] > 2:
                m.weight[0] = 0  # a zero filter
                m.weight[:, 1] = 0  # an input channel nobody reads
    return model.eval()


def _params(model_name):
    if TINY.get(model_name) is None:
        pytest.skip("full-size only")
    return TINY[model_name]


@pytest.mark.parametrize("name", [n for n in TINY if TINY[n] is not None])
def test_regrouping_preserves_logits_on_every_registry_model(name):
    model = _sparse_model(name, _params(name))
    x = torch.rand(4, model.normalize.mean.shape[1], 32, 32)
    groups = channel_groups(model)
    state = model.state_dict()
    new = select_channels(state, groups, regroup_permutations(state, groups))
    twin = create_model(name, **model.rsp_config).eval()
    twin.load_state_dict(new)
    with torch.no_grad():
        assert torch.allclose(model(x), twin(x), atol=1e-5, rtol=0)
    changed = [k for k in state if not torch.equal(state[k], new[k])]
    assert changed, "the permutation should move something"


def test_every_registry_model_is_covered():
    from rsp.models import list_models

    assert set(list_models()) == set(TINY)


@pytest.mark.parametrize("name", ["small-cnn", "vgg16", "vgg16-1fc", "resnet18", "wrn"])
def test_shrinking_only_dead_structures_is_exact_and_never_larger(name):
    model = _sparse_model(name, _params(name))
    x = torch.rand(4, 3, 32, 32)
    state = model.state_dict()
    groups = channel_groups(model)
    small_state, kwargs, removed = shrink(state, groups, name, model.rsp_config, model)
    assert removed, "the test model has dead channels: some must go"
    small = create_model(name, **kwargs).eval()
    small.load_state_dict(small_state, strict=True)
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-5, rtol=0)
    n_big = sum(p.numel() for p in model.parameters())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < n_big


def test_shrinking_the_vgg16_head_removes_rows_biases_and_columns_exactly():
    """The paper's head is a Linear chain: a hidden unit goes with its row and bias and the next layer's column;
    a conv channel read through the 2x2 flatten goes with its 4 input features of classifier.0."""
    model = _sparse_model("vgg16", {"width": 0.125}, zero_channels=False)
    fc14, fc15, fc16 = model.classifier[0], model.classifier[2], model.classifier[4]
    with torch.no_grad():
        fc14.weight[:, 4 * 3: 4 * 3 + 4] = 0  # channel 3 of conv 13, at all 4 positions: nobody reads it
        fc14.weight[5] = 0
        fc14.bias[5] = -0.1  # relu(0 * x - 0.1) = 0: unit 5 of fc14 is silent
        fc14.weight[6] = 0
        fc14.bias[6] = 0.2  # relu(0.2) > 0 feeds a constant: kept
        fc15.weight[:, 7] = 0  # unit 7 of fc14 is read by nobody
        fc16.weight[:, 2] = 0  # unit 2 of fc15 too
    x = torch.rand(4, 3, 32, 32)
    groups = channel_groups(model)
    state, kwargs, removed = shrink(model.state_dict(), groups, "vgg16", model.rsp_config, model)
    assert removed == {"features.40": 1, "classifier.0": 2, "classifier.2": 1}
    assert kwargs["hidden"] == [30, 31] and kwargs["cfg"][-1] == 63  # from 32, 32 and 64 at width 0.125
    small = create_model("vgg16", **json.loads(json.dumps(kwargs))).eval()
    small.load_state_dict(state, strict=True)
    assert [tuple(small.classifier[i].weight.shape) for i in (0, 2, 4)] == [(30, 252), (31, 30), (10, 31)]
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-5, rtol=0)


def test_zero_filter_with_live_batchnorm_output_is_kept():
    """relu(bn(0)) > 0 means the 'zero' filter still feeds a constant: removing it would change logits."""
    model = _sparse_model("vgg16", {"width": 0.125}, zero_channels=False)
    with torch.no_grad():
        model.features[3].weight[2] = 0  # conv 2, filter 2
        bn = model.features[4]
        bn.bias[2] = 1.0
        bn.running_mean[2] = 0.0
    groups = channel_groups(model)
    _, kwargs, removed = shrink(model.state_dict(), groups, "vgg16", model.rsp_config, model)
    assert "features.3" not in removed


def test_prune_k_zeroes_small_vectors_and_k0_changes_nothing():
    # a vector is one (in, kh, kw) position across all output channels (the study's HWIO innermost axis)
    w = torch.zeros(3, 1, 2, 2)
    w[:, 0, 0, 0] = torch.tensor([1.0, 0, 0])  # 1 non-zero: pruned at k = 1
    w[:, 0, 0, 1] = torch.tensor([1.0, 2, 0])  # 2 non-zeros: kept
    w[:, 0, 1, 1] = torch.tensor([0.0, 0, 3])  # 1 non-zero: pruned
    state = {"c.weight": w}
    same, removed = prune_vectors(state, ["c"], 0)
    assert removed == 0 and torch.equal(same["c.weight"], w)
    out, removed = prune_vectors(state, ["c"], 1)
    assert removed == 2
    expect = torch.zeros_like(w)
    expect[:, 0, 0, 1] = torch.tensor([1.0, 2, 0])
    assert torch.equal(out["c.weight"], expect)
    assert analyse_layer(out["c.weight"])["zero_vectors"] == 0.75


def test_block_pruning_zeroes_sparse_blocks_including_ragged_edges():
    g = torch.zeros(6, 6)  # GEMM view of a 6 x 6 linear; 4x4 blocks leave ragged 2-wide edges
    g[0, 0] = 1.0  # block (0,0): 1 non-zero -> pruned at k = 1
    g[1, 4], g[0, 5] = 2.0, 3.0  # block (0,1), ragged: 2 non-zeros -> kept
    g[5, 5] = 4.0  # block (1,1), ragged corner: 1 non-zero -> pruned
    g[4, 0], g[5, 1], g[4, 2] = 5.0, 6.0, 7.0  # block (1,0): 3 -> kept
    out, removed = prune_vectors({"l.weight": g}, ["l"], 1, block=(4, 4))
    assert removed == 2
    expect = g.clone()
    expect[0, 0] = expect[5, 5] = 0.0
    assert torch.equal(out["l.weight"], expect)
    same, removed = prune_vectors({"l.weight": g}, ["l"], 0, block=(4, 4))
    assert removed == 0 and torch.equal(same["l.weight"], g)


def test_finetune_selection_never_prefers_a_collapsed_epoch(tmp_path, monkeypatch):
    """structure's fine-tune selects with the trainer's rule: a healthy epoch beats a collapsed one."""
    import rsp.attacks
    from rsp.data import load_dataset
    from rsp.structure import finetune

    scores = iter([(0.10, 0.2), (0.50, 1.0), (0.15, 0.2)])  # (clean acc, top-class share) for epochs 0, 1, 2

    def fake_evaluate(model, x, y, cfg, **kw):
        acc, share = next(scores)
        return {"clean_acc": acc, "n": len(y), "top_class": int(y[0]), "top_class_share": share}

    monkeypatch.setattr(rsp.attacks, "evaluate", fake_evaluate)
    model = _sparse_model("small-cnn", {"in_channels": 1, "mean": [0.0], "std": [1.0]}, density=0.2)
    manifest = {"objective": "natural", "attack": {"eps": 8 / 255, "step_size": 2 / 255, "steps": 1}}
    opts = StructureOptions(k=0, finetune=2, finetune_lr=0.01, batch_size=256)
    _, summary = finetune(model, manifest, load_dataset("digits"), opts, tmp_path, log=lambda *_: None)
    assert [h["collapsed"] for h in summary["history"]] == [False, True, False]
    assert summary["selected_epoch"] == 2  # 0.50 scored best, but one class took every image


def test_finetune_keeps_the_structure_frozen_and_selects_on_validation(tmp_path):
    model = _sparse_model("small-cnn", {"in_channels": 1, "mean": [0.0], "std": [1.0]}, density=0.2)
    src = _folder(tmp_path, model, "small-cnn")
    manifest = read_manifest(src)  # natural objective: from random weights, fine-tuning must clearly help
    write_manifest(src, {**manifest, "objective": "natural"}, ["model.safetensors"])
    opts = StructureOptions(k=0, regroup=False, n_examples=64, attack_steps=2, finetune=2, finetune_lr=0.05,
                            batch_size=128)
    m = run(src, tmp_path / "s", opts, log=lambda *_: None)
    ft = m["structure"]["finetune"]
    assert ft["selected_on"] == "val" and [h["epoch"] for h in ft["history"]] == [0, 1, 2]
    # the selected epoch is the best on validation robust accuracy
    best = max(h["clean_acc"] for h in ft["history"])
    assert ft["history"][ft["selected_epoch"]]["clean_acc"] == best and ft["selected_epoch"] > 0
    steps = json.loads((tmp_path / "s" / "analysis.json").read_text())["steps"]
    assert [s["step"] for s in steps][-1] == "finetune"
    tuned = rsp.load_model(tmp_path / "s").state_dict()
    for n, l in steps[-2]["analysis"]["layers"].items():
        assert steps[-1]["analysis"]["layers"][n]["nonzero"] <= l["nonzero"]  # no connection appears
    run(src, tmp_path / "s0", StructureOptions(k=0, regroup=False, n_examples=0), log=lambda *_: None)
    plain = rsp.load_model(tmp_path / "s0").state_dict()
    for n in steps[-1]["analysis"]["layers"]:  # weights moved, zeros stayed zeros
        w0, w1 = plain[f"{n}.weight"], tuned[f"{n}.weight"]
        assert torch.all(w1[w0 == 0] == 0)
        assert not torch.equal(w0, w1)


def test_nm_projection_really_is_2_of_4_along_input_channels():
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(8, 16, 3, 3), "b.weight": torch.randn(10, 30), "c.weight": torch.randn(6, 3, 3, 3)}
    out, skipped = project_nm(state, ["a", "b", "c"], 2, 4)
    assert skipped == ["b", "c"] and torch.equal(out["b.weight"], state["b.weight"])
    # sparse tensor cores' rule: every 4 consecutive input channels at one (out, kh, kw) hold <= 2 non-zeros
    g = out["a.weight"].permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4)
    assert torch.all((g != 0).sum(-1) == 2)
    orig = state["a.weight"].permute(0, 2, 3, 1).reshape(8, 3, 3, 4, 4).abs()
    kept_min = torch.where(g != 0, orig, torch.full_like(orig, float("inf"))).amin(-1)
    dropped_max = torch.where(g == 0, orig, torch.zeros_like(orig)).amax(-1)
    assert torch.all(kept_min >= dropped_max)  # the kept two are the largest of each group
    kept = out["a.weight"] != 0
    assert torch.equal(out["a.weight"][kept], state["a.weight"][kept])  # survivors keep their values and place
    assert analyse_layer(out["a.weight"])["nm_2_4_compliance"] == 1.0


def _folder(tmp_path, model, name):
    folder = tmp_path / "run"
    folder.mkdir()
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "train", "model": {"name": name, "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits"}, "attack": {"eps": 8 / 255, "step_size": 2 / 255}},
                   ["model.safetensors"])
    return folder


def test_structured_folder_loads_the_shrunk_model(tmp_path):
    model = _sparse_model("small-cnn", {"in_channels": 1, "mean": [0.0], "std": [1.0]})
    src = _folder(tmp_path, model, "small-cnn")
    m = run(src, tmp_path / "s", StructureOptions(k=0, n_examples=64, attack_steps=2), log=lambda *_: None)
    assert m["stage"] == "structure" and m["params"]["after"] < m["params"]["before"]
    loaded = rsp.load_model(tmp_path / "s")
    assert loaded.rsp_config["channels"] != model.rsp_config["channels"]
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5, rtol=0)
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| original |" in report and "| shrink |" in report
    assert list((tmp_path / "s").glob("*.png"))
    steps = json.loads((tmp_path / "s" / "analysis.json").read_text())["steps"]
    assert steps[0]["clean_acc"] == steps[-1]["clean_acc"]  # k = 0: exact


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    model = _sparse_model("small-cnn", {"in_channels": 1, "mean": [0.0], "std": [1.0]})
    src = _folder(tmp_path, model, "small-cnn")
    cases = [
        (["structure", tmp_path, "--output", tmp_path / "o"], "not an rsp run folder"),
        (["structure", src, "--output", tmp_path / "o", "--k", "-1"], "--k must be >= 0"),
        (["structure", src, "--output", tmp_path / "o", "--block", "7x7"], "divides no layer"),
        (["structure", src, "--output", tmp_path / "o", "--block", "four"], "block shape"),
        (["structure", src, "--output", tmp_path / "o", "--nm", "4:2"], "--nm"),
        (["structure", src, "--output", tmp_path / "o", "--prune-block", "0x4"], "block shape"),
        (["structure", src, "--output", tmp_path / "o", "--finetune", "-1"], "--finetune"),
    ]
    for i, (args, match) in enumerate(cases):
        # the first through a fresh interpreter (the real entry point), the rest in-process: same exit code and line
        r = (rsp_cli if i == 0 else rsp_cli_here)(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert match in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (src / "model.safetensors").write_bytes(b"tampered")
    r = rsp_cli_here("structure", src, "--output", tmp_path / "o2")
    assert r.returncode == 2 and "changed" in r.stderr and "Traceback" not in r.stderr


def test_nm_output_is_what_tensorrt_accepts_as_2_4():
    from rsp.export import _trt_24_layers

    torch.manual_seed(1)
    state = {"a.weight": torch.randn(8, 16, 3, 3), "l.weight": torch.randn(10, 32)}
    assert not any(_trt_24_layers(state, ["a", "l"]).values())
    out, _ = project_nm(state, ["a", "l"], 2, 4)
    assert all(_trt_24_layers(out, ["a", "l"]).values())


def test_a_lossy_prune_step_is_reported_as_a_warning(tmp_path):
    """At 99 % most vectors hold a single non-zero: k = 1 removes much of the model, and the user hears it."""
    model = _sparse_model("small-cnn", {"in_channels": 1, "mean": [0.0], "std": [1.0]}, density=0.01,
                          zero_channels=False)
    src = _folder(tmp_path, model, "small-cnn")
    logged = []
    m = run(src, tmp_path / "k1", StructureOptions(k=1, n_examples=0), log=logged.append)
    (w,) = m["structure"]["warnings"]
    assert "the prune step (k = 1) cost" in w and "of the remaining non-zeros" in w and "--finetune" in w
    assert f"warning: {w}" in logged
    assert "## Warnings" in (tmp_path / "k1" / "report.md").read_text()
    m = run(src, tmp_path / "k0", StructureOptions(k=0, n_examples=0), log=lambda *_: None)
    assert m["structure"]["warnings"] == [] and "## Warnings" not in (tmp_path / "k0" / "report.md").read_text()


def test_prune_warnings_on_accuracy_and_collapse():
    from rsp.structure import prune_warnings

    def step(nonzero, **kw):
        return {"analysis": {"overall": {"nonzero": nonzero}}, **kw}

    healthy, fine = step(1000, clean_acc=0.8, collapsed=False), step(995, clean_acc=0.78, collapsed=False)
    assert prune_warnings(healthy, fine, 1, 0) == []
    (w,) = prune_warnings(healthy, step(995, clean_acc=0.1, collapsed=True, top_class_share=1.0), 1, 3)
    assert "clean accuracy 0.800 -> 0.100" in w and "one class now takes 100%" in w and "--finetune" not in w

"""rsp compare: exact figures on hand-built weights (known overlap, degrees, zero filters), the report files,
and bad input as one line and exit 2."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from rsp.artifacts import check_files, save_tensors, write_manifest
from rsp.cli import app
from rsp.compare import CompareError, CompareOptions, moments, run
from rsp.models import create_model
from helpers import has_module, rsp_cli

runner = CliRunner()
KW = {"in_channels": 1, "num_classes": 10, "mean": [0.0], "std": [1.0], "channels": [4, 4, 4]}
# small-cnn with these kwargs: features.0 4x1x3x3 (36), features.3 4x4x3x3 (144), features.7 4x4x3x3 (144),
# classifier 10x4 (40); every size divisible by 4
LAYERS = ["features.0", "features.3", "features.7", "classifier"]


def _state(pattern, kwargs=KW, sign=True):
    """A small-cnn state whose conv/linear weights are pattern(flat index) in {0, 1}, times +-1 alternating."""
    model = create_model("small-cnn", **kwargs)
    state = model.state_dict()
    for n in LAYERS:
        w = state[f"{n}.weight"]
        i = torch.arange(w.numel())
        signs = torch.where(i % 2 == 0, 1.0, -1.0) if sign else torch.ones(w.numel())
        state[f"{n}.weight"] = (pattern(i).float() * signs).reshape(w.shape)
    return state


def _folder(path, state, kwargs=KW, stage="train", method="magnitude", **extra):
    path.mkdir(parents=True)
    save_tensors(path / "model.safetensors", state)
    write_manifest(path, {"stage": stage, "status": "complete", "model": {"name": "small-cnn", "kwargs": kwargs},
                          "method": method, "objective": "pgd-at", "target_sparsity": 0.5,
                          "metrics": {"clean_acc": 0.5, "robust_acc": 0.25}, **extra}, ["model.safetensors"])
    return path


def _quiet(*_):
    pass


def test_moments_are_exact():
    m = moments(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m["mean"] == 2.5 and m["mean_abs"] == 2.5 and m["std"] == pytest.approx(math.sqrt(1.25), abs=1e-12)
    assert m["skewness"] == pytest.approx(0.0, abs=1e-12) and m["excess_kurtosis"] == pytest.approx(-1.36, abs=1e-12)
    m = moments(torch.tensor([1.0, 1.0, 1.0, 5.0]))  # m2 = 3, m3 = 6, m4 = 21
    assert m["skewness"] == pytest.approx(2 / math.sqrt(3), abs=1e-12)
    assert m["excess_kurtosis"] == pytest.approx(21 / 9 - 3, abs=1e-12)
    assert moments(torch.tensor([]))["mean"] is None
    assert moments(torch.tensor([2.0, 2.0]))["skewness"] is None  # no spread: undefined, not nan


def test_jaccard_of_known_masks_and_the_random_baseline(tmp_path):
    a = _folder(tmp_path / "a", _state(lambda i: i % 4 < 2))  # positions 0, 1 of every 4: density 1/2
    b = _folder(tmp_path / "b", _state(lambda i: (i % 4 == 1) | (i % 4 == 2)))  # 1, 2: density 1/2
    c = _folder(tmp_path / "c", _state(lambda i: i % 4 == 0))  # 0: density 1/4, inside a
    out = run([a, b, c], tmp_path / "out", CompareOptions(), log=_quiet)["result"]
    pairs = {(p["a"], p["b"]): p for p in out["overlap"]["pairs"]}
    assert all(p["computed"] for p in pairs.values())
    ab, ac, bc = pairs["a", "b"], pairs["a", "c"], pairs["b", "c"]
    n = 36 + 144 + 144 + 40
    assert ab["overall"]["intersection"] == n // 4 and ab["overall"]["union"] == 3 * n // 4
    assert ab["overall"]["jaccard"] == pytest.approx(1 / 3, abs=1e-15)
    assert all(v["jaccard"] == pytest.approx(1 / 3, abs=1e-15) for v in ab["layers"].values())
    assert ac["overall"]["jaccard"] == pytest.approx(1 / 2, abs=1e-15)
    assert bc["overall"]["jaccard"] == 0.0 and bc["overall"]["intersection"] == 0
    # independent random masks of densities 1/2 and 1/4: (1/8) / (1/2 + 1/4 - 1/8) = 1/5
    assert ac["overall"]["chance"] == pytest.approx(1 / 5, abs=1e-12)
    assert ab["overall"]["chance"] == pytest.approx(1 / 3, abs=1e-12)
    matrix = out["overlap"]["jaccard_matrix"]
    assert matrix[0][0] == 1.0 and matrix[0][1] == matrix[1][0] == pytest.approx(1 / 3) and matrix[1][2] == 0.0
    dens = {r["label"]: r["overall"]["density"] for r in out["runs"]}
    assert dens == {"a": 0.5, "b": 0.5, "c": 0.25}
    m = out["runs"][0]["overall"]["moments"]  # non-zeros: +1 at even, -1 at odd positions, as many of each
    assert m["mean"] == 0.0 and m["std"] == 1.0 and m["mean_abs"] == 1.0 and m["excess_kurtosis"] == -2.0


def _topology_state():
    """features.3 (4 out x 4 in x 3 x 3) with a known graph, classifier with one unread input, the rest dense."""
    state = _state(lambda i: torch.ones_like(i, dtype=torch.bool), sign=False)
    w = torch.zeros(4, 4, 3, 3)
    w[0] = 0  # output channel 0: a zero filter
    w[1, 0] = 1.0  # out 1 <- in 0: the whole kernel (9)
    w[1, 1, 0, 0] = 1.0  # out 1 <- in 1: one entry           in-degree 10 weights, 2 channels
    w[2, 0, 0, 0] = -2.0  # out 2 <- in 0: one entry            in-degree 1, 1 channel
    w[3, :3, 1, 1] = 3.0  # out 3 <- in 0, 1, 2: the centre     in-degree 3, 3 channels
    # input channel 3 is read by nobody: a zero input channel
    state["features.3.weight"] = w
    cls = torch.ones(10, 4)
    cls[:, 2] = 0  # input feature 2 of the classifier is unread
    state["classifier.weight"] = cls
    return state


def test_degrees_zero_filters_and_zero_inputs_are_exact(tmp_path):
    t = _folder(tmp_path / "t", _topology_state())
    out = run([t], tmp_path / "out", CompareOptions(), log=_quiet)["result"]
    r = out["runs"][0]
    f3 = r["layers"]["features.3"]
    assert f3["nonzero"] == 14 and f3["density"] == 14 / 144
    ind, outd = f3["in_degree"], f3["out_degree"]
    assert ind["weights"]["distribution"] == [[0, 1], [1, 1], [3, 1], [10, 1]]
    assert ind["channels"]["distribution"] == [[0, 1], [1, 1], [2, 1], [3, 1]]
    assert outd["weights"]["distribution"] == [[0, 1], [1, 1], [2, 1], [11, 1]]  # in 0: 9 + 1 + 1, in 1: 1 + 1, in 2: 1
    assert outd["channels"]["distribution"] == [[0, 1], [1, 1], [2, 1], [3, 1]]
    assert ind["weights"]["max_possible"] == 36 and ind["channels"]["max_possible"] == 4
    assert ind["weights"]["mean"] == 14 / 4 and ind["weights"]["min"] == 0 and ind["weights"]["max"] == 10
    assert ind["weights"]["median"] == 2.0
    assert f3["zero_filters"] == {"count": 1, "units": 4, "share": 0.25}
    assert f3["zero_input_channels"] == {"count": 1, "units": 4, "share": 0.25}
    # non-zeros of features.3: nine 1s, one 1, one -2, three 3s
    vals = torch.tensor([1.0] * 10 + [-2.0] + [3.0] * 3, dtype=torch.float64)
    assert f3["moments"]["mean"] == pytest.approx(vals.mean().item(), abs=1e-12)
    assert f3["moments"]["mean_abs"] == pytest.approx(vals.abs().mean().item(), abs=1e-12)
    cls = r["layers"]["classifier"]
    assert cls["in_degree"]["weights"]["distribution"] == [[3, 10]]
    assert cls["out_degree"]["weights"]["distribution"] == [[0, 1], [10, 3]]
    assert cls["in_degree"]["channels"] == {**cls["in_degree"]["weights"], "max_possible": 4}  # linear: the same
    assert cls["zero_input_channels"]["count"] == 1 and cls["zero_filters"]["count"] == 0
    ov = r["overall"]
    assert ov["zero_filters"] == {"count": 1, "units": 4 + 4 + 4 + 10, "share": 1 / 22}
    assert ov["zero_input_channels"] == {"count": 2, "units": 1 + 4 + 4 + 4, "share": 2 / 13}
    assert ov["in_degree_share"]["weights"]["min"] == 0.0 and ov["in_degree_share"]["weights"]["max"] == 1.0
    assert ov["nonzero"] == 36 + 14 + 144 + 30


def test_report_files_png_and_seal(tmp_path):
    a = _folder(tmp_path / "a", _state(lambda i: i % 4 < 2))
    t = _folder(tmp_path / "t", _topology_state())
    out = tmp_path / "out"
    run([a, t], out, CompareOptions(labels=["half", "topo"]), log=_quiet)
    manifest = json.loads((out / "manifest.json").read_text())  # a report folder: no model, so not read_manifest's
    assert manifest["stage"] == "compare" and manifest["status"] == "complete" and not check_files(out, manifest)
    assert {"compare.json", "report.md"} <= set(manifest["files"])
    data = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["half", "topo"]
    report = (out / "report.md").read_text()
    assert "| half / topo |" in report and "## Per layer" in report and "### features.3" in report
    if has_module("matplotlib"):
        expected = {"weights_hist.png", "in_degree_weights.png", "in_degree_channels.png", "out_degree_weights.png",
                    "out_degree_channels.png", "jaccard.png", "density.png", "jaccard_layers.png"}
        assert set(data["figures"]) == expected and expected <= set(manifest["files"])
        for name in expected:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({name})" in report
    assert not list(out.glob("*.pkl")) and not list(out.glob("*.pt"))


def test_other_architectures_and_regrouped_folders_skip_only_the_overlap(tmp_path):
    a = _folder(tmp_path / "a", _state(lambda i: i % 4 < 2))
    wide_kw = {**KW, "channels": [4, 4, 8]}
    wide = _folder(tmp_path / "wide", _state(lambda i: i % 2 == 0, wide_kw), wide_kw)
    s = _folder(tmp_path / "s", _state(lambda i: i % 4 < 2), stage="structure", structure={"regroup": True, "k": 0})
    out = run([a, wide, s], tmp_path / "out", CompareOptions(), log=_quiet)["result"]
    pairs = {(p["a"], p["b"]): p for p in out["overlap"]["pairs"]}
    assert not pairs["a", "wide"]["computed"] and "different layer shapes" in pairs["a", "wide"]["skipped_because"]
    assert "features.7" in pairs["a", "wide"]["skipped_because"]
    assert not pairs["a", "s"]["computed"] and "regroup" in pairs["a", "s"]["skipped_because"]
    assert out["overlap"]["jaccard_matrix"][0][1] is None
    # everything else is still compared
    assert out["runs"][1]["layers"]["features.7"]["shape"] == [8, 4, 3, 3]
    assert out["runs"][1]["overall"]["density"] == 0.5
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Skipped" in report and "a / wide: different layer shapes" in report


def test_same_folder_names_get_distinct_labels(tmp_path):
    x = _folder(tmp_path / "x" / "train", _state(lambda i: i % 4 < 2))
    y = _folder(tmp_path / "y" / "train", _state(lambda i: i % 4 < 2))
    out = run([x, y], tmp_path / "out", CompareOptions(), log=_quiet)["result"]
    assert [r["label"] for r in out["runs"]] == ["x/train", "y/train"]
    assert out["overlap"]["pairs"][0]["overall"]["jaccard"] == 1.0


def _one_line(r, match):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit) or r.exception is None, r.exception
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rsp: error: ") and match in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    a = _folder(tmp_path / "a", _state(lambda i: i % 4 < 2))
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    (tmp_path / "afile").write_text("x")
    running = _folder(tmp_path / "running", _state(lambda i: i % 4 < 2))
    m = json.loads((running / "manifest.json").read_text())
    (running / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    cases = [
        (["compare", "--output", tmp_path / "o"], "missing RUN"),
        (["compare", a], "--output is required"),
        (["compare", tmp_path / "missing", "--output", tmp_path / "o"], "does not exist"),
        (["compare", tmp_path / "plain", "--output", tmp_path / "o"], "not an rsp run folder"),
        (["compare", running, "--output", tmp_path / "o"], "not complete"),
        (["compare", a, "--output", full], "is not empty"),
        (["compare", a, "--output", a], "is one of the runs"),
        (["compare", a, "--output", tmp_path / "afile"], "not a folder"),
        (["compare", a, a, "--output", tmp_path / "o"], "given twice"),
        (["compare", a, "--label", "x", "--label", "y", "--output", tmp_path / "o"], "--label"),
        (["compare", a, "--bins", "1", "--output", tmp_path / "o"], "--bins"),
    ]
    for args, match in cases:
        _one_line(runner.invoke(app, [str(v) for v in args]), match)
    assert not (tmp_path / "o").exists()  # nothing left behind by a refused run
    assert (full / "notes.txt").read_text() == "x" and sorted(p.name for p in full.iterdir()) == ["notes.txt"]
    (a / "model.safetensors").write_bytes(b"tampered")
    r = rsp_cli("compare", a, "--output", tmp_path / "o2", timeout=120)  # as a user sees it: a fresh interpreter
    assert r.returncode == 2 and "changed" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(CompareError, match="at least one"):
        run([], tmp_path / "o3", CompareOptions(), log=_quiet)

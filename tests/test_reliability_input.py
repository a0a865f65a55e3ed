"""What rsp reads is bounded and typed; a bundle is pinned by its manifest's hash; progress only on a terminal;
pictures and help texts that read well (issue 15: nothing lost, nothing silent)."""

import ctypes
import hashlib
import io
import json
import re
import struct
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from rsp.artifacts import ArtifactError, read_manifest, save_tensors, sha256_file, write_manifest
from rsp.cli import app
from rsp.config import ConfigError, read_recipe, resolve
from rsp.models import create_model

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
) + "model_kwargs: {x: *i}\n"


def _one_line_exit_2(result):
    """A CliRunner result that is what a user must see for bad input: exit 2, one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rsp: error:") and "Traceback" not in result.output, result.stderr
    return err[0]


def _small_folder(tmp_path, name="run", stage="train", extra_files=(), **fields):
    """A stage folder with a tiny small-cnn (random weights) and any extra files, hashed by write_manifest."""
    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0]).eval()
    folder = tmp_path / name
    folder.mkdir()
    save_tensors(folder / "model.safetensors", model.state_dict())
    for file_name, data in extra_files:
        (folder / file_name).write_bytes(data)
    manifest = {"stage": stage, "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]},
                "attack": {"eps": 8 / 255, "step_size": 2 / 255}, **fields}
    write_manifest(folder, manifest, ["model.safetensors", *(n for n, _ in extra_files)])
    return folder


# --- item 8: bounded, typed reading ---------------------------------------------------------------------


def test_an_expanding_yaml_recipe_is_refused_at_once(tmp_path):
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text(BILLION_LAUGHS)  # 400 bytes; 9^9 strings once expanded
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        read_recipe(str(recipe))
    deep = tmp_path / "deep.yaml"
    deep.write_text("model_kwargs: " + "[" * 5000 + "]" * 5000 + "\n")  # would recurse past Python's stack
    with pytest.raises(ConfigError, match="nested deeper"):
        read_recipe(str(deep))
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"seed: 1\n" + b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than"):
        read_recipe(str(huge))
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("seed: !!python/object/apply:os.system ['echo owned']\n")
    with pytest.raises(ConfigError, match="not usable YAML"):
        read_recipe(str(tagged))
    assert time.perf_counter() - t0 < 5
    line = _one_line_exit_2(CliRunner().invoke(app, ["train", "--config", str(recipe), "--output", str(tmp_path / "o")]))
    assert "aliases" in line and not (tmp_path / "o" / "manifest.json").exists()
    # a YAML flag goes through the same bounded loader
    line = _one_line_exit_2(CliRunner().invoke(app, ["train", "--model-kwargs", "{a: &x [1, *x]}",
                                                     "--output", str(tmp_path / "o2")]))
    assert "aliases" in line


def test_wrong_types_in_a_recipe_are_one_line_and_exit_2(tmp_path):
    cases = {
        "epochs: abc\n": "--epochs must be an integer, got text ('abc')",
        'lr: "0.1"\n': "--lr must be a finite number, got text ('0.1')",
        "lr: .nan\n": "--lr must be a finite number",
        "seed: 1.5\n": "--seed must be an integer",
        "sparsity: [0.9]\n": "--sparsity must be a finite number, got a list",
        "bf16: 1\n": "--bf16 must be true/false",
        "model_kwargs: 3\n": "--model-kwargs must be a mapping",
        "method_options: {1: 2}\n": "--method-options must be a mapping with text keys",
        "lr_milestones: [0.5, x]\n": "--lr-milestones must be a list of numbers",
        "eps: [8]\n": "--eps: expected a number or fraction",
        "- epochs\n": "expected a mapping of option: value, got a list",
        "1: 2\n": "option names must be text",
    }
    for i, (text, message) in enumerate(cases.items()):
        recipe = tmp_path / f"r{i}.yaml"
        recipe.write_text(text)
        with pytest.raises(ConfigError) as exc:
            resolve(read_recipe(str(recipe)))
        assert message in str(exc.value) and "\n" not in str(exc.value), (text, str(exc.value))
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("epochs: abc\n")
    line = _one_line_exit_2(CliRunner().invoke(app, ["train", "--config", str(recipe), "--output", str(tmp_path / "o")]))
    assert "--epochs must be an integer" in line
    # YAML 1.2 numbers are numbers (PyYAML alone reads 1e-3 as text), quoted numbers stay text
    recipe.write_text("lr: 1e-3\nsigma: 2E-6\nepochs: 3\n")
    cfg = resolve(read_recipe(str(recipe)))
    assert (cfg.lr, cfg.sigma, cfg.epochs) == (0.001, 2e-6, 3)


def test_wrong_kinds_in_a_manifest_are_refused_in_one_line(tmp_path):
    folder = _small_folder(tmp_path)
    good = json.loads((folder / "manifest.json").read_text())
    cases = [
        ([good], "needs 'stage' and 'model'"),
        ({**good, "stage": 3}, "'stage' must be text"),
        ({**good, "model": "small-cnn"}, "'model' must be"),
        ({**good, "model": {"name": "small-cnn", "kwargs": [1]}}, "'model' must be"),
        ({**good, "files": ["model.safetensors"]}, "'files' must map names to sha256"),
        ({**good, "dataset": "digits"}, "'dataset' must be a mapping"),
        ({**good, "input": {"shape": ["1", 8, 8]}}, "'input.shape' must be a list of positive integers"),
    ]
    for manifest, message in cases:
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ArtifactError, match=re.escape(message)):
            read_manifest(folder)
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="nested too deeply|not valid JSON"):
        read_manifest(folder)
    (folder / "manifest.json").write_bytes(b" " * (16 << 20) + b"{}")
    with pytest.raises(ArtifactError, match="larger than"):
        read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**good, "stage": 3}))
    line = _one_line_exit_2(CliRunner().invoke(app, ["structure", str(folder), "--output", str(tmp_path / "s")]))
    assert "'stage' must be text" in line


def test_non_utf8_bytes_are_one_line(tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("dataset: digits\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=re.escape("not UTF-8 text (byte 0xe9 at offset 26)")):
        read_recipe(str(recipe))
    line = _one_line_exit_2(CliRunner().invoke(app, ["train", "--config", str(recipe), "--output", str(tmp_path / "o")]))
    assert "not UTF-8" in line
    folder = _small_folder(tmp_path)
    (folder / "manifest.json").write_bytes(b'{"stage": "train\xff", "model": {}}')
    with pytest.raises(ArtifactError, match="not UTF-8 text"):
        read_manifest(folder)


# --- item 12: a bundle is pinned by its manifest's hash, before anything native is loaded -----------------


class NativeLoad(Exception):
    """Raised by the stand-ins of every way verify could load native code from the bundle."""


def _forbid_native_loading(monkeypatch):
    """Every way verify could load the bundle's library raises NativeLoad; returns the calls seen."""
    import rsp.runtimes
    import rsp.verify

    calls = []

    def forbidden(*args, **kw):
        calls.append(args)
        raise NativeLoad(f"native code loaded: {args[:1]}")

    monkeypatch.setattr(rsp.verify, "tvm_runtime", forbidden)
    monkeypatch.setattr(rsp.runtimes, "tvm_runtime", forbidden)
    if "tvm.runtime" in sys.modules:  # TVM already imported: its loader; otherwise importing TVM needs ctypes
        monkeypatch.setattr(sys.modules["tvm.runtime"], "load_module", forbidden)
    monkeypatch.setattr(ctypes, "CDLL", forbidden)
    return calls


def test_expect_sha256_refuses_another_bundle_before_loading_native_code(tmp_path, monkeypatch):
    from rsp.verify import VerifyError, VerifyOptions, run

    bundle = _small_folder(tmp_path, "bundle", stage="export", extra_files=[("model.tvm.so", b"\x7fELF the exported one")])
    exported = sha256_file(bundle / "manifest.json")
    # an attacker with write access swaps the library and re-hashes the manifest: the file check passes ...
    (bundle / "model.tvm.so").write_bytes(b"\x7fELF a rogue library")
    manifest = json.loads((bundle / "manifest.json").read_text())
    write_manifest(bundle, {k: v for k, v in manifest.items() if k != "files"}, ["model.safetensors", "model.tvm.so"])
    assert sha256_file(bundle / "manifest.json") != exported
    calls = _forbid_native_loading(monkeypatch)
    logged = []
    opts = VerifyOptions(output=str(tmp_path / "v"), backends=["tvm"], n_examples=8, steps=1, restarts=1,
                         expect_sha256=exported)
    # ... but the pinned manifest hash does not
    with pytest.raises(VerifyError, match=f"not the expected {exported}: refusing"):
        run(bundle, opts, log=logged.append)
    assert calls == [] and not (tmp_path / "v").exists()
    line = _one_line_exit_2(CliRunner().invoke(app, ["verify", str(bundle), "--backend", "tvm", "--expect-sha256",
                                                     exported.upper(), "--output", str(tmp_path / "v2")]))
    assert "refusing to load this bundle" in line and calls == []
    with pytest.raises(VerifyError, match="must be a sha256"):
        run(bundle, VerifyOptions(output=str(tmp_path / "v"), expect_sha256="abc"), log=logged.append)
    # the bundle's own hash gets past the pin, and only then is the library loaded (here: the stand-in)
    current = sha256_file(bundle / "manifest.json")
    with pytest.raises(NativeLoad):
        run(bundle, VerifyOptions(output=str(tmp_path / "v"), backends=["tvm"], expect_sha256=current),
            log=logged.append)
    assert len(calls) == 1
    # verify prints the hash it checked and records it (latency left out: not what this test is about)
    import rsp.verify

    monkeypatch.setattr(rsp.verify, "_latency", lambda *args, **kw: {})
    logged.clear()
    result = run(bundle, VerifyOptions(output=str(tmp_path / "v"), backends=["torch"], n_examples=8, steps=1,
                                       restarts=1, sanity=False, expect_sha256=current), log=logged.append)
    assert f"bundle manifest sha256 {current} (as expected)" in logged and len(calls) == 1
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["bundle_manifest_sha256"] == current
    assert result["bundle_manifest_sha256"] == current and current in (tmp_path / "v" / "report.md").read_text()


def test_a_second_verify_into_a_busy_output_fails_before_any_work(tmp_path, monkeypatch):
    """verify locks its output before it loads the model or attacks (the lock used to come at the report)."""
    import rsp.verify
    from rsp.artifacts import FolderBusyError, lock_folder
    from rsp.verify import VerifyOptions, run

    bundle = _small_folder(tmp_path, "bundle", stage="export")
    monkeypatch.setattr(rsp.verify, "load_model", lambda *a, **k: pytest.fail("loaded the model of a busy verify"))
    with lock_folder(tmp_path / "v"), pytest.raises(FolderBusyError, match="is in use by another rsp process"):
        run(bundle, VerifyOptions(output=str(tmp_path / "v"), backends=["torch"], n_examples=8, steps=1, restarts=1),
            log=lambda *_: None)


def test_export_prints_the_manifest_sha256(tmp_path):
    pytest.importorskip("onnxruntime")
    from rsp.export import ExportOptions, run

    source = _small_folder(tmp_path, "run")
    logged = []
    run(source, tmp_path / "bundle", ExportOptions(target="x86-cpu", formats=["onnx"], parity_images=16),
        log=logged.append)
    digest = hashlib.sha256((tmp_path / "bundle" / "manifest.json").read_bytes()).hexdigest()
    assert any(f"manifest sha256 {digest}" in m and "--expect-sha256" in m for m in logged), logged


# --- item 15: progress on a terminal, quiet off one -------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_drawn_on_a_terminal_only():
    from rsp.progress import StepProgress, show_progress

    closed = io.StringIO()
    closed.close()
    assert show_progress(_Terminal()) and not show_progress(io.StringIO()) and not show_progress(closed)
    assert not show_progress(object())
    quiet = io.StringIO()
    with StepProgress("verify bundle", total=2, file=quiet) as progress:  # decides by itself: not a terminal
        assert not progress.enabled
        progress.step("attacks")
        progress.advance()
    assert quiet.getvalue() == ""
    shown = _Terminal()
    with StepProgress("verify bundle", total=2, file=shown) as progress:
        assert progress.enabled
        progress.step("attacks pgd")
        progress.advance()
        progress._progress.refresh()
        assert "verify bundle" in shown.getvalue() and "attacks pgd" in shown.getvalue()


class _RecordingProgress:
    """Stands in for StepProgress in a stage: records the steps it is told about."""

    seen: list = []

    def __init__(self, title, total, enabled=None, file=None):
        self.title, self.total, self.done = title, total, 0
        _RecordingProgress.seen.append(self)
        self.steps = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def step(self, now):
        self.steps.append(now)

    def advance(self, n=1):
        self.done += n


def test_structure_reports_progress_per_evaluated_step(tmp_path, monkeypatch):
    import rsp.structure
    from rsp.structure import StructureOptions, run

    monkeypatch.setattr(rsp.structure, "StepProgress", _RecordingProgress)
    _RecordingProgress.seen = []
    run(_small_folder(tmp_path), tmp_path / "s", StructureOptions(k=1, n_examples=16, attack_steps=1), log=lambda *_: None)
    (progress,) = _RecordingProgress.seen
    assert progress.steps == ["evaluating original", "evaluating regroup", "evaluating prune", "evaluating shrink"]
    assert progress.done == progress.total == 4


def test_verify_sanity_checks_one_at_a_time_give_the_same_result(tmp_path):
    """verify runs the sanity checks one by one (progress names each): the same figures as one call."""
    from rsp.sanity import CHECKS, run_sanity_checks
    from rsp.verify import VerifyOptions, _sanity_checks

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0]).eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    from rsp.attacks import ensemble_eval

    ens = ensemble_eval(model, x, y, attacks=["pgd", "square"], eps=8 / 255, steps=2, restarts=1, square_queries=20)
    progress = _RecordingProgress("verify", total=len(CHECKS))
    logged = []
    ours = _sanity_checks(model, x, y, 8 / 255, VerifyOptions(output=""), None, ens, progress, logged.append)
    whole = run_sanity_checks(model, x, y, 8 / 255, seed=0, ensemble=ens)
    assert progress.steps == [f"sanity check {c}" for c in CHECKS] and progress.done == len(CHECKS)
    assert [c["name"] for c in ours["checks"]] == list(CHECKS) and len(logged) == len(CHECKS)
    assert [(c["passed"], c.get("detail")) for c in ours["checks"]] == [(c["passed"], c.get("detail")) for c in whole["checks"]]
    assert ours["failed"] == whole["failed"] and ours["n"] == whole["n"]


# --- item 16: pictures and help texts ---------------------------------------------------------------------


def _png_header(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height, _, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, colour


def test_weight_pictures_have_axes_a_title_and_a_scale(tmp_path):
    pytest.importorskip("matplotlib")
    from rsp.structure import weight_picture_title, write_weight_picture

    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * (torch.rand(16, 8, 3, 3) < 0.25)
    title = weight_picture_title("features.3", "regrouped", w)
    sparsity = 1 - (w != 0).float().mean().item()
    assert title == f"features.3 (16x8x3x3), regrouped: sparsity {sparsity:.4f}"
    write_weight_picture(tmp_path / "w.png", w, "features.3", "regrouped")
    width, height, colour = _png_header(tmp_path / "w.png")
    # a matplotlib figure (colour, margins for axes, title and scale), not the bare greyscale 288 x 64 map
    assert colour in (2, 6) and width > 300 and height > 150


def test_help_texts_keep_paragraphs_whole():
    import typer.main

    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        for paragraph in (sub.help or "").split("\n\n"):
            assert "\n" not in paragraph, (name, paragraph)
    result = CliRunner().invoke(app, ["structure", "--help"], env={"COLUMNS": "100"}, terminal_width=100)
    assert result.exit_code == 0
    assert not any(line.strip() in ("->", "and", "or") for line in result.output.splitlines())

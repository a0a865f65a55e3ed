"""The commands users type first, under bad input: one line and exit 2 before any work, nothing lost.

In-process (typer's CliRunner) on the embedded digits and tiny settings, so the whole file runs in seconds.
"""

import json
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rsp.artifacts import read_manifest, save_tensors, write_manifest
from rsp.cli import app
from helpers import has_module, needs_tvm

runner = CliRunner()

# A training run that takes a second or two on a CPU: digits, a tiny CNN, one step per phase.
TINY_TRAIN = ["--epochs", "1", "--max-steps", "2", "--batch-size", "64", "--attack-steps", "1",
              "--eval-attack-steps", "1", "--test-attack-steps", "1", "--device", "cpu"]


def rsp(*args, env=None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def one_line_error(r, code: int = 2) -> str:
    """The result of bad input: exit `code`, no traceback, one `rsp: error:` line on stderr."""
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("rsp: error: "), r.stderr
    assert "Traceback" not in r.output
    return lines[-1]


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "run"
    r = rsp("train", *TINY_TRAIN, "--model-kwargs", "{channels: [8, 8]}", "--output", out)
    assert r.exit_code == 0, r.output
    return out


def _fake_folder(folder: Path, stage: str = "structure", dataset: dict | None = None, chw=(1, 8, 8)) -> Path:
    """A complete stage folder without training: a registry model's weights and the manifest contract."""
    from rsp.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=chw[0], channels=[4, 4]).eval()
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": stage, "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": dataset or {"dataset": "digits", "num_classes": 10}, "input": {"shape": list(chw)}},
                   ["model.safetensors"])
    return folder


# --- 1. rsp pipeline removes only what rsp wrote -----------------------------------------------------------


@pytest.mark.parametrize("stage", ["train", "structure", "export"])
def test_pipeline_never_removes_files_it_did_not_write(tmp_path, stage):
    d = tmp_path / "D"
    (d / stage).mkdir(parents=True)
    (d / stage / "keep.txt").write_text("x")
    before = tree(d)
    # the command: before, training ran and then keep.txt was deleted
    one_line_error(rsp("pipeline", "-o", d, "--target", "nope", *TINY_TRAIN[:2]))
    err = one_line_error(rsp("pipeline", "-o", d, "--target", "x86-cpu", "--format", "onnx", "--epochs", "1"))
    assert f"{d / stage} is not an rsp stage folder" in err and "keep.txt" in err and "nothing was removed" in err
    assert tree(d) == before and not (d / "train" / "config.yaml").exists()  # refused before training


def test_pipeline_rebuilds_only_its_own_half_written_stage(tmp_path):
    from rsp import workflow

    d = tmp_path / "D"
    folder = d / "structure"
    workflow._fresh(folder, "structure")  # what the pipeline does before the stage runs: the marker
    assert (folder / workflow.MARKER).is_file()
    for name in ("analysis.json", "weights_conv1_original.png", ".report.md.abc123.tmp"):
        (folder / name).write_text("half-written by a killed structure stage")
    workflow.check_folders(d)  # all rsp's: accepted
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(workflow.ArtifactError, match=r"also holds files rsp did not write \(notes.txt\)"):
        workflow.check_folders(d)
    assert (folder / "analysis.json").is_file() and (folder / "notes.txt").is_file()
    (folder / "notes.txt").unlink()
    workflow._fresh(folder, "structure")  # the rerun: the stage's own files go, the marker stays
    assert sorted(p.name for p in folder.iterdir()) == [workflow.MARKER]
    # a folder without the marker holding rsp-named files is not provably rsp's: refused, kept
    other = d / "export"
    other.mkdir()
    (other / "model.onnx").write_bytes(b"user's own model")
    with pytest.raises(workflow.ArtifactError, match="is not an rsp stage folder"):
        workflow.check_folders(d)
    assert (other / "model.onnx").read_bytes() == b"user's own model"


# --- 9. rsp pipeline checks every stage's options before training --------------------------------------------


@pytest.mark.parametrize("args, match", [
    (["--target", "nope"], "unknown target 'nope'"),
    (["--format", "pdf"], "unknown format 'pdf'"),
    (["--k", "-1"], "--k must be >= 0"),
    (["--nm", "3:2"], "nm"),
    (["--finetune", "-1"], "--finetune"),
    (["--attacks", "fgsm-ish"], "unknown attack"),
    (["--steps", "0"], "--steps"),
    (["--n-examples", "-5"], "--n-examples"),
    (["--format", "onnx", "--tune-trials", "8"], "--tune-trials"),
])
def test_pipeline_refuses_bad_stage_options_before_training(tmp_path, args, match):
    d = tmp_path / "D"
    err = one_line_error(rsp("pipeline", "-o", d, *TINY_TRAIN[:2], *args))
    assert match in err
    assert not (d / "train").exists()  # nothing trained, nothing written


# --- 10. an --output that cannot be written fails before the work ----------------------------------------


def test_unwritable_output_fails_first_in_every_command(tmp_path, digits_run):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "out"
    bundle = _fake_folder(tmp_path / "bundle", stage="structure")
    for args in (["train", *TINY_TRAIN], ["structure", digits_run], ["export", digits_run, "--target", "x86-cpu"],
                 ["verify", bundle], ["pipeline", *TINY_TRAIN[:2]]):
        err = one_line_error(rsp(*args, "--output", bad))
        assert f"--output {bad} cannot be created: {blocker} is not a folder" in err, args
    err = one_line_error(rsp("train", *TINY_TRAIN, "--output", blocker))
    assert "exists and is not a folder" in err
    assert not (bundle / "verify").exists()


@pytest.mark.skipif(Path("/proc/self").is_dir() is False, reason="needs /proc")
def test_verify_default_report_folder_on_read_only_media_fails_before_attacks(tmp_path):
    # /proc refuses new files even for root: the stand-in for a bundle on read-only media
    err = one_line_error(rsp("verify", "/proc/self", "--n-examples", "4"))
    assert "report folder" in err and "--output" in err


# --- 11. no traceback for any input ----------------------------------------------------------------------


@pytest.mark.parametrize("args, match", [
    (["--threads", "0"], "--threads must be >= 1"),
    (["--threads", "-3"], "--threads must be >= 1"),
    (["--temperature", "-1"], "--temperature must be > 0"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--weight-decay", "-0.01"], "--weight-decay must be >= 0"),
    (["--beta", "-6"], "--beta must be >= 0"),
    (["--sigma", "-1"], "--sigma must be >= 0"),
    (["--method-option", "rounds=[1,"], "the value is not YAML"),
    (["--method-option", "=3"], "expected KEY=VALUE"),
])
def test_train_refuses_bad_numbers_in_one_line(tmp_path, args, match):
    err = one_line_error(rsp("train", *TINY_TRAIN, *args, "--output", tmp_path / "o"))
    assert match in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, args, match", [
    ("export", ["--target", "x86-cpu", "--opset", "99"], "--opset must be in 17.."),
    ("export", ["--target", "x86-cpu", "--opset", "5"], "--opset must be in 17.."),
    ("export", ["--target", "x86-cpu", "--threads", "0"], "--threads must be >= 1"),
    ("structure", ["--device", "tpu"], "--device must be cpu or cuda"),
    ("structure", ["--n-examples", "-1"], "--n-examples"),
    ("structure", ["--device", "cuda:7"], "--device cuda:7"),
    ("verify", ["--latency-runs", "0"], "--latency-runs must be >= 1"),
    ("verify", ["--threads", "-1"], "--threads must be >= 1"),
    ("verify", ["--device", "gpu"], "--device must be cpu or cuda"),
    ("verify", ["--dataset", "cifar10"], "--dataset cifar10: its images are 3x32x32, the bundle's model takes 1x8x8"),
    ("verify", ["--dataset", "imagenet"], "unknown data set"),
])
def test_stage_commands_refuse_bad_numbers_in_one_line(tmp_path, command, args, match):
    src = _fake_folder(tmp_path / "src")
    err = one_line_error(rsp(command, src, *args, "--output", tmp_path / "o"))
    assert match in err
    assert not (tmp_path / "o").exists()


def test_val_fraction_0_does_not_claim_selection_on_validation(tmp_path):
    out = tmp_path / "run"
    r = rsp("train", *TINY_TRAIN, "--model-kwargs", "{channels: [4, 4]}", "--val-fraction", "0", "--output", out)
    assert r.exit_code == 0, r.output
    assert "on validation" not in r.stdout and "no validation split" in r.stdout
    m = read_manifest(out)
    assert m["dataset"]["n_val"] == 0 and m["metrics"]["selected_on"] == "last"


def test_first_epoch_divergence_claims_no_checkpoint(tmp_path):
    out = tmp_path / "d"
    r = rsp("train", "--epochs", "1", "--max-steps", "3", "--attack-steps", "1", "--lr", "1e30", "--objective",
            "natural", "--method", "dense", "--output", out)
    err = one_line_error(r, code=1)
    assert "diverged" in err and "no checkpoint was written yet" in err and "intact" not in err
    assert not (out / "train_state.safetensors").exists()


def _serve(handler) -> tuple[int, threading.Event]:
    """A one-connection-at-a-time TCP server on localhost calling handler(conn) (not a TVM server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    stop = threading.Event()

    def loop():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                handler(conn)
        sock.close()

    threading.Thread(target=loop, daemon=True).start()
    return sock.getsockname()[1], stop


def _http_like(conn):
    conn.settimeout(2)
    try:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
    except OSError:
        pass


def _silent(conn):
    threading.Event().wait(1.5)


@needs_tvm
def test_rpc_port_with_another_service_is_named_not_host_down():
    from rsp.runtimes import RuntimeUnavailable, rpc_session

    port, stop = _serve(_http_like)
    try:
        with pytest.raises(RuntimeUnavailable, match=rf"127.0.0.1:{port} is not a TVM RPC server: .*HTTP/1.0 400"):
            rpc_session(f"127.0.0.1:{port}", timeout=5)
    finally:
        stop.set()
    port, stop = _serve(_silent)
    try:
        with pytest.raises(RuntimeUnavailable, match=r"no answer within 1 s to the handshake \(the host is up") as exc:
            rpc_session(f"127.0.0.1:{port}", timeout=1)
        assert "host is down" not in str(exc.value)
    finally:
        stop.set()


# --- 13. family aliases: rsp export --target jetson ----------------------------------------------------------


def test_jetson_alias_resolves_to_the_default_or_to_the_board_here(tmp_path, monkeypatch):
    from rsp import targets

    assert targets.aliases() == {"jetson": "jetson-orin-nano"}
    monkeypatch.setattr(targets, "DEVICE_TREE_MODEL", tmp_path / "absent")
    target, why = targets.resolve_target("jetson")
    assert target.name == "jetson-orin-nano" and "default" in why
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\x00")
    monkeypatch.setattr(targets, "DEVICE_TREE_MODEL", model)
    target, why = targets.resolve_target("jetson")
    assert target.name == "jetson-agx-orin" and "the board rsp runs on" in why
    monkeypatch.setattr(targets.platform, "machine", lambda: "aarch64")
    assert targets.host_target_name() == "jetson-agx-orin"
    with pytest.raises(targets.UnknownTargetError, match=r"aliases: jetson \(jetson-orin-nano\)"):
        targets.get_target("jetsno")
    r = rsp("export", "--list-targets")
    assert r.exit_code == 0
    names, alias_lines = r.stdout.strip().split("\n\n")
    assert [ln.split()[0] for ln in names.splitlines()] == targets.target_names()
    assert alias_lines.splitlines()[0].startswith("jetson") and "jetson-orin-nano" in alias_lines


@pytest.mark.skipif(not has_module("onnxruntime"), reason="onnxruntime not installed")
def test_export_target_jetson_builds_a_jetson_bundle(tmp_path, digits_run, monkeypatch):
    from rsp import targets

    monkeypatch.setattr(targets, "DEVICE_TREE_MODEL", tmp_path / "absent")  # this machine is no Jetson
    out = tmp_path / "orin"
    # ONNX only here (seconds); the full default build (ONNX + TVM sm_87 + TensorRT) is the same resolution
    r = rsp("export", digits_run, "--target", "jetson", "--format", "onnx", "--parity-images", "16", "--output", out)
    assert r.exit_code == 0, r.output
    assert "target jetson = jetson-orin-nano" in r.stderr
    m = read_manifest(out, stage="export")
    assert m["target"]["name"] == "jetson-orin-nano" and m["target"]["registry"]["cuda"]["arch"] == ["sm_87"]


# --- 14. the data location travels with the run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory, cifar_dir):
    """A real (one-step) CIFAR-10-subset run trained from a copy of the data, so the copy can move."""
    root = tmp_path_factory.mktemp("cifar-run")
    data = root / "data"
    shutil.copytree(cifar_dir / "cifar-10-batches-py", data / "cifar-10-batches-py")
    run = root / "run"
    r = rsp("train", "--dataset", "cifar10", "--data-dir", data, "--model", "small-cnn", "--model-kwargs",
            "{channels: [4, 4]}", "--max-steps", "1", "--batch-size", "16", "--attack-steps", "1",
            "--eval-attack-steps", "1", "--test-attack-steps", "1", "--output", run)
    assert r.exit_code == 0, r.output
    return run, data


def test_cifar_run_needs_no_data_dir_in_later_stages(cifar_run, tmp_path, monkeypatch):
    monkeypatch.delenv("RSP_DATA_DIR", raising=False)
    run, data = cifar_run
    assert read_manifest(run)["dataset"]["source"] == str((data / "cifar-10-batches-py").resolve())
    s = tmp_path / "s"
    r = rsp("structure", run, "--n-examples", "16", "--attack-steps", "0", "--block", "1x4", "--output", s)
    assert r.exit_code == 0, r.output
    if not has_module("onnxruntime"):
        pytest.skip("onnxruntime not installed")
    e = tmp_path / "e"
    r = rsp("export", run, "--target", "x86-cpu", "--format", "onnx", "--parity-images", "16", "--output", e)
    assert r.exit_code == 0, r.output
    r = rsp("verify", e, "--n-examples", "16", "--steps", "1", "--restarts", "1", "--latency-runs", "1", "--no-sanity",
            "--output", tmp_path / "v")
    assert r.exit_code in (0, 1), r.output  # 1: a gate of the barely trained model; the data was found
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["dataset"] == "cifar10"


def test_moved_data_is_one_clear_line_and_rsp_data_dir_or_data_dir_find_it(cifar_run, tmp_path, monkeypatch, cifar_dir):
    monkeypatch.delenv("RSP_DATA_DIR", raising=False)
    run, data = cifar_run
    moved = tmp_path / "moved-run"
    shutil.copytree(run, moved)
    m = json.loads((moved / "manifest.json").read_text())
    m["dataset"]["source"] = str(tmp_path / "gone" / "cifar-10-batches-py")  # the data was moved away
    (moved / "manifest.json").write_text(json.dumps(m))
    args = ["structure", moved, "--n-examples", "8", "--attack-steps", "0", "--block", "1x4", "--output"]
    err = one_line_error(rsp(*args, tmp_path / "s1"))
    assert "no longer holds it (moved?)" in err and "--data-dir" in err and "RSP_DATA_DIR" in err
    # RSP_DATA_DIR works as TORCH_HOME does: the folder holding cifar-10-batches-py/
    r = rsp(*args, tmp_path / "s2", env={"RSP_DATA_DIR": str(cifar_dir)})
    assert r.exit_code == 0, r.output
    # --data-dir overrides both
    r = rsp(*args, tmp_path / "s3", "--data-dir", data, env={"RSP_DATA_DIR": str(tmp_path / "nowhere")})
    assert r.exit_code == 0, r.output
    err = one_line_error(rsp(*args, tmp_path / "s4", env={"RSP_DATA_DIR": str(tmp_path / "nowhere")}))
    assert "(RSP_DATA_DIR)" in err
    # a hint is checked, not trusted: other data in the recorded folder is refused
    m["dataset"]["source"] = str(data / "cifar-10-batches-py")
    m["dataset"]["n_test"] = 9999
    (moved / "manifest.json").write_text(json.dumps(m))
    err = one_line_error(rsp(*args, tmp_path / "s5"))
    assert "no longer holds the cifar10 data the run was trained on (n_test" in err


def test_rsp_data_dir_serves_training_too(tmp_path, monkeypatch, cifar_dir):
    from rsp.data import load_dataset

    monkeypatch.setenv("RSP_DATA_DIR", str(cifar_dir))
    assert load_dataset("cifar10").meta["n_test"] > 0

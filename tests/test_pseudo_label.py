"""`rsp pseudo-label` and RST's extra data: labels from a natural run, the folder contract, training on it, and
bad or hostile input (one line, exit 2, nothing executed)."""

import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from rsp.artifacts import lock_folder, read_manifest
from rsp.cli import app
from rsp.data import PSEUDO_LABEL_FILE, DataError, dataset_info, load_dataset, load_extra_data
from helpers import rsp_cli, rsp_cli_here

runner = CliRunner()
TINY_TRAIN = ["--epochs", "1", "--batch-size", "64", "--attack-steps", "1", "--eval-attack-steps", "1",
              "--test-attack-steps", "1", "--threads", "1", "--sparsity", "0.5"]


def rsp(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, code: int = 2) -> str:
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), r.exception
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("rsp: error: ") and "Traceback" not in r.output, r.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def natural_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pl") / "natural"
    r = rsp("train", *TINY_TRAIN, "--objective", "natural", "--model-kwargs", "{channels: [8, 16]}", "--output", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def unlabeled(tmp_path_factory):
    """The digits test images (NHWC, as a user's .npz might hold them) with their true labels beside."""
    s = load_dataset("digits")
    path = tmp_path_factory.mktemp("img") / "unlabeled.npz"
    np.savez(path, images=s.test_x.numpy().transpose(0, 2, 3, 1), labels=s.test_y.numpy())
    return path, s


def test_pseudo_labels_are_the_models_predictions_and_train_rst(natural_run, unlabeled, tmp_path):
    path, s = unlabeled
    out = tmp_path / "pseudo"
    r = rsp("pseudo-label", natural_run, path, "-o", out, "--batch-size", "50")
    assert r.exit_code == 0, r.output
    m = read_manifest(out, stage="pseudo-label")
    trained = read_manifest(natural_run, stage="train")
    assert m["status"] == "complete" and set(m["files"]) == {PSEUDO_LABEL_FILE}
    assert m["labeller"]["model_sha256"] == trained["files"]["model.safetensors"]
    assert m["labeller"]["objective"] == "natural" and m["dataset"]["dataset"] == "digits"
    z = load_file(str(out / PSEUDO_LABEL_FILE))
    assert np.array_equal(z["images"], s.test_x.numpy())  # the pixels as read, NCHW
    # the labels are the model's: on the test images their agreement with the truth is its test accuracy
    agreement = float((z["labels"] == s.test_y.numpy()).mean())
    assert m["labels"]["agreement_with_input_labels"] == pytest.approx(agreement)
    assert agreement == pytest.approx(trained["metrics"]["clean_acc"])
    assert sum(m["labels"]["class_counts"]) == len(s.test_y) and str(path.resolve()) in m["images"]["files"]

    ex, ey = load_extra_data(str(out), dataset_info("digits"))
    assert np.array_equal(ey.numpy(), z["labels"])
    with pytest.raises(DataError, match="labelled by a digits model"):  # same classes count, other meaning
        load_extra_data(str(out), dataset_info("svhn"))
    r = rsp("train", *TINY_TRAIN, "--objective", "rst", "--extra-data", out, "--max-steps", "2",
            "--output", tmp_path / "rst")
    assert r.exit_code == 0, r.output
    rst = read_manifest(tmp_path / "rst", stage="train")
    assert rst["objective"] == "rst"
    # the manifest names the extra data by content, not only by the path as typed
    import hashlib
    extra = rst["dataset"]["extra_data"]
    assert extra["n_images"] == len(ex) and extra["path"] == str(out)
    assert extra["sha256"] == hashlib.sha256(ex.numpy().tobytes() + ey.numpy().tobytes()).hexdigest()


def test_pickle_layout_on_request_is_the_distributed_one(natural_run, unlabeled, tmp_path):
    path, s = unlabeled
    r = rsp("pseudo-label", natural_run, path, "-o", tmp_path / "p", "--write-pickle")
    assert r.exit_code == 0, r.output
    with open(tmp_path / "p" / "pseudo_labeled.pickle", "rb") as f:
        d = pickle.load(f)  # the reference code's own reader (trusted here: rsp just wrote it)
    assert d["data"].shape == (len(s.test_y), 8, 8, 1) and d["data"].dtype == np.uint8
    ex, ey = load_extra_data(str(tmp_path / "p" / "pseudo_labeled.pickle"), dataset_info("digits"))
    assert np.array_equal(ey.numpy(), d["extrapolated_targets"]) and np.array_equal(ex.numpy(), s.test_x.numpy())


def test_hostile_pickle_is_refused_and_never_run(natural_run, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "ti_500K_pseudo_labeled.pickle"
    evil.write_bytes(pickle.dumps({"data": Payload(), "extrapolated_targets": [0]}))
    for cli, args in ((rsp_cli_here, ["train", "--objective", "rst", "--extra-data", evil, "--max-steps", "1",
                                      "--output", tmp_path / "o"]),
                      (rsp_cli, ["pseudo-label", natural_run, evil, "-o", tmp_path / "o2"])):
        r = cli(*args)  # in-process, then the real command line: its exit code and stderr as a user sees them
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert "refusing to load posix.system" in lines[-1] and "Traceback" not in r.stderr
        assert not marker.exists()
    assert not (tmp_path / "o2").exists()  # refused before its output was created


def test_bad_input_is_one_line(natural_run, tmp_path):
    np.savez(tmp_path / "small.npz", images=np.zeros((4, 4, 4), np.uint8))
    np.savez(tmp_path / "float.npz", images=np.zeros((4, 1, 8, 8), np.float32))
    np.savez(tmp_path / "nokey.npz", x=np.zeros((4, 1, 8, 8), np.uint8))
    (tmp_path / "notes.txt").write_text("hello")
    good = tmp_path / "good.npz"
    np.savez(good, images=np.zeros((4, 1, 8, 8), np.uint8))
    cases = {
        "is not a folder": [tmp_path / "no-model", good],
        "expected uint8 images N x 1 x 8 x 8": [natural_run, tmp_path / "small.npz"],
        "got float32": [natural_run, tmp_path / "float.npz"],
        "no `images` array": [natural_run, tmp_path / "nokey.npz"],
        "unknown image-set layout '.txt'": [natural_run, tmp_path / "notes.txt"],
        "missing image file": [natural_run, tmp_path / "absent.npz"],
        "not an image set": [natural_run, natural_run],  # a train folder is a model, not images
    }
    for expected, (model_dir, images) in cases.items():
        err = one_line_error(rsp("pseudo-label", model_dir, images, "-o", tmp_path / "out"))
        assert expected in err, err
        assert not (tmp_path / "out").exists()
    # the one writer of a folder: a held lock and a sealed folder are both refused
    held = lock_folder(tmp_path / "busy")
    label = lambda out: rsp("pseudo-label", natural_run, good, "-o", out)  # noqa: E731
    assert "in use by another rsp process" in one_line_error(label(tmp_path / "busy"))
    held.release()
    assert label(tmp_path / "done").exit_code == 0
    assert "already holds an rsp folder" in one_line_error(label(tmp_path / "done"))


def test_unsealed_or_changed_folder_is_not_extra_data(natural_run, tmp_path):
    np.savez(tmp_path / "imgs.npz", images=np.zeros((6, 1, 8, 8), np.uint8))
    out = tmp_path / "pseudo"
    assert rsp("pseudo-label", natural_run, tmp_path / "imgs.npz", "-o", out).exit_code == 0
    info = dataset_info("digits")
    data = (out / PSEUDO_LABEL_FILE).read_bytes()
    (out / PSEUDO_LABEL_FILE).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataError, match="changed"):
        load_extra_data(str(out), info)
    (out / PSEUDO_LABEL_FILE).write_bytes(data)
    load_extra_data(str(out), info)
    m = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()  # killed before the manifest landed: files without a seal
    with pytest.raises(DataError, match="did not finish"):
        load_extra_data(str(out), info)
    assert rsp("pseudo-label", natural_run, tmp_path / "imgs.npz", "-o", out).exit_code == 0  # and redone in place
    assert read_manifest(out)["files"] == m["files"]

"""Stage-folder reading and writing: atomic files, hashes, no pickles."""

import json

import pytest
import torch

from rsp.artifacts import (ArtifactError, atomic_write_text, check_files, load_tensors, read_jsonl, read_manifest,
                           save_tensors, write_manifest)


def test_manifest_hashes_detect_changed_and_missing_files(tmp_path):
    save_tensors(tmp_path / "model.safetensors", {"w": torch.ones(3)})
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    m = write_manifest(tmp_path, {"stage": "train", "model": {"name": "x", "kwargs": {}}},
                       ["model.safetensors", "config.yaml"])
    assert set(m["files"]) == {"model.safetensors", "config.yaml"}
    assert check_files(tmp_path, read_manifest(tmp_path)) == []
    atomic_write_text(tmp_path / "config.yaml", "a: 2\n")
    (tmp_path / "model.safetensors").unlink()
    problems = check_files(tmp_path, read_manifest(tmp_path))
    assert any("config.yaml changed" in p for p in problems)
    assert any("model.safetensors is missing" in p for p in problems)


def test_not_an_rsp_folder(tmp_path):
    with pytest.raises(ArtifactError, match="not an rsp run folder"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ArtifactError, match="not an rsp manifest"):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError):
        load_tensors(tmp_path / "nothing.safetensors")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    for i in range(3):
        atomic_write_text(tmp_path / "f.txt", f"v{i}")
    assert (tmp_path / "f.txt").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_torn_metrics_line_is_ignored(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epo')
    assert read_jsonl(p) == [{"epoch": 1}, {"epoch": 2}]

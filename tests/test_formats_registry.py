"""The format registry (rsp.formats): a format registered from outside the package is a full format: listed by
`rsp export --help` / `rsp verify --help`, exported into a bundle, recorded in its manifest, run by verify."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import rsp.formats as formats
from rsp.artifacts import read_manifest, save_tensors

from helpers import untrained_digits_run

BUILT_IN = ("onnx", "tvm", "tensorrt")


@pytest.fixture
def registry(monkeypatch):
    """The registry as the package fills it, restored after the test (what a test registers goes away)."""
    formats.formats()
    monkeypatch.setattr(formats, "_FORMATS", dict(formats._FORMATS))
    monkeypatch.setattr(formats, "_BACKENDS", dict(formats._BACKENDS))
    return formats


def _register_logits_format(registry):
    """A throwaway format: the PyTorch logits of the parity images as a tensor file, run back by verify as a
    lookup-free runtime (the twin on the bundle's own weights)."""

    @registry.register
    class Logits(registry.Format):
        name = "logits"
        export_help = "the parity logits (a test format)"
        verify_help = "the PyTorch twin again (a test backend)"
        files = ("logits.safetensors",)
        priority = 5  # before onnx: the scored backend when present

        def export(self, job):
            save_tensors(job.output / self.files[0], {"logits": torch.from_numpy(job.reference)})
            return registry.Exported(list(self.files), {"file": self.files[0], "n": len(job.reference)},
                                     {"passed": True, "max_abs_err": 0.0, "tolerance": 0.0})

        def runtime(self, bundle, manifest, chw, opts, log):
            from rsp.artifacts import load_model
            from rsp.runtimes import torch_runtime

            return torch_runtime(load_model(bundle), chw, "cpu", self.name)

    return Logits


def test_built_in_formats_are_discovered_in_order_without_heavy_imports():
    code = ("import sys, rsp.formats as f; names = f.format_names(); "
            "print((names, f.backend_names(), [m for m in ('torch', 'onnx', 'tvm', 'tensorrt') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str((BUILT_IN, ("onnx", "tvm", "tvm-rpc", "tensorrt"), []))
    from rsp.targets import FORMATS
    from rsp.verify import BACKENDS

    assert FORMATS == BUILT_IN and BACKENDS == ("torch", "onnx", "tvm", "tvm-rpc", "tensorrt")


def test_each_bundle_file_name_is_owned_by_one_format():
    files = formats.bundle_files()
    assert len(files) == len(set(files)) and {"model.onnx", "model.tvm.so", "tensorrt.json"} <= set(files)
    package = Path(formats.__file__).parents[1]
    for name in files:
        literal = f'"{name}"'
        holders = [p for p in package.rglob("*.py") if literal in p.read_text()]
        assert len(holders) == 1 and holders[0].parent.name == "formats", (name, holders)


def test_a_registered_format_is_listed_exported_and_verified(registry, tmp_path):
    import rsp.targets
    import rsp.verify
    from rsp.cli import app

    _register_logits_format(registry)  # after the CLI was imported
    assert "logits" in rsp.targets.FORMATS and "logits" in rsp.verify.BACKENDS
    runner = CliRunner()
    for command in ("export", "verify", "pipeline"):
        r = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
        assert r.exit_code == 0 and "logits" in r.output, (command, r.output)

    src, bundle = untrained_digits_run(tmp_path), tmp_path / "bundle"
    r = runner.invoke(app, ["export", str(src), "--target", "x86-cpu", "--format", "logits", "--parity-images", "16",
                            "--output", str(bundle)])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(bundle, stage="export")
    assert manifest["formats"] == ["logits"] and manifest["artifacts"]["logits"] == {"file": "logits.safetensors", "n": 16}
    assert set(manifest["files"]) == {"model.safetensors", "logits.safetensors"} and manifest["parity"]["logits"]["passed"]
    assert manifest["kernels"]["note"].endswith("(no TVM library in this bundle)")  # the tvm format was told

    r = runner.invoke(app, ["verify", str(bundle), "--attacks", "pgd", "--n-examples", "16", "--steps", "2", "--restarts", "1",
                            "--no-sanity", "--latency-runs", "2", "--threads", "1", "--output", str(tmp_path / "v")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert next(iter(result["backends"])) == "logits"  # present and first in the registry: the scored backend
    assert result["parity"]["logits"]["max_abs_err"] == 0.0


def test_a_format_for_other_targets_is_refused_with_its_reason(registry, tmp_path):
    from rsp.artifacts import ArtifactError
    from rsp.export import ExportOptions, run

    @registry.register
    class Gpu(registry.Format):
        name = "gpu-only"
        files = ("gpu.bin",)

        def unsupported(self, target):
            return None if target.has_cuda else f"target {target.name} has no GPU for gpu-only"

    with pytest.raises(ArtifactError, match="target x86-cpu has no GPU for gpu-only"):
        run(untrained_digits_run(tmp_path), tmp_path / "b", ExportOptions(target="x86-cpu", formats=["gpu-only"]))

"""What several test files share: running the CLI as a user does, and skipping where a package is missing."""

import subprocess
import sys
import traceback
from pathlib import Path

import pytest


def rsp_cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`rsp ARGS` in a fresh interpreter (exit codes and stderr exactly as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "rsp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def rsp_cli_here(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rsp ARGS` in this interpreter (click's runner): the exit code, stdout and stderr the CLI gives, without
    the seconds a fresh interpreter spends importing torch. For checks of a message and an exit code; each
    command keeps at least one `rsp_cli` check, so that the real entry point is still run.

    An exception that escapes the command (what a user would see as a traceback) is returned as exit code 1
    with its traceback appended to stderr, so the callers' "Traceback" not in stderr checks still catch it."""
    from typer.testing import CliRunner

    from rsp.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], env=env)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["rsp", *map(str, args)], result.exit_code, result.stdout, stderr)


def untrained_digits_run(root: Path) -> Path:
    """A train-stage folder ROOT/run: a random small CNN for 8x8 digits (export and verify need no training)."""
    import torch

    from rsp.artifacts import save_tensors, write_manifest
    from rsp.models import create_model

    torch.manual_seed(0)
    model = create_model("small-cnn", in_channels=1, mean=[0.0], std=[1.0]).eval()
    folder = root / "run"
    folder.mkdir(parents=True)
    save_tensors(folder / "model.safetensors", model.state_dict())
    write_manifest(folder, {"stage": "train", "status": "complete", "model": {"name": "small-cnn", "kwargs": model.rsp_config},
                            "dataset": {"dataset": "digits"}, "input": {"shape": [1, 8, 8]},
                            "attack": {"eps": 8 / 255}}, ["model.safetensors"])
    return folder


def has_module(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an installed package that fails to import counts as missing
        return False


needs_tvm = pytest.mark.skipif(not has_module("tvm"), reason="Apache TVM not installed (pip install 'rsp[export]')")

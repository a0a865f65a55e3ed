"""What several test files share: running the CLI as a user does, and skipping where a package is missing."""

import subprocess
import sys

import pytest


def rsp_cli(*args, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """`rsp ARGS` in a fresh interpreter (exit codes and stderr exactly as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "rsp.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


def has_module(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:  # an installed package that fails to import counts as missing
        return False


needs_tvm = pytest.mark.skipif(not has_module("tvm"), reason="Apache TVM not installed (pip install 'rsp[export]')")

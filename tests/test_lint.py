"""The repository passes its lint configuration (pyproject's [tool.ruff]); CI runs this file with the rest."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    from ruff.__main__ import find_ruff_bin  # ruff is in the [test] extra; a missing one is a failure, not a skip

    done = subprocess.run([find_ruff_bin(), "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

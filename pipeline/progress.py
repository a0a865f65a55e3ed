"""Live progress for rsp's long steps: drawn on a terminal (rich, on stderr), silent anywhere else.

`rsp train` draws its epoch bar the same way. Off a terminal (a log file, CI, a pipe) nothing is drawn:
the stages' one-line log messages are the whole record there.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Callable


def show_progress(stream=None) -> bool:
    """Whether live progress is drawn: only when `stream` (default: stderr, where rsp logs) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # not a file, or a closed one
        return False


class StepProgress:
    """A bar over a stage's steps: `title  [bar]  3/7  0:01:12  step`. Disabled (off a terminal): every
    method does nothing, so stages call it unconditionally.

        with StepProgress("verify", total=4) as progress:
            progress.step("attacks: pgd 50x10")   # what runs now
            ...
            progress.advance()                     # one step done
    """

    def __init__(self, title: str, total: int | None, enabled: bool | None = None, file=None):
        self.enabled = show_progress(file) if enabled is None else enabled
        self.title, self.total, self.file = title, total, file
        self._progress = self._task = None

    def __enter__(self) -> "StepProgress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn)

            console = Console(file=self.file) if self.file is not None else Console(stderr=True)
            # transient: when the stage ends the bar goes, its log lines stay
            # markup off: a folder or step name with [brackets] is text, not a style
            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}", style="bold", markup=False),
                                      BarColumn(bar_width=30), MofNCompleteColumn(), TimeElapsedColumn(),
                                      TextColumn("{task.fields[now]}", markup=False), console=console, transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.title, total=self.total, now="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def step(self, now: str) -> None:
        """Name what runs now (shown after the bar)."""
        if self._progress is not None:
            self._progress.update(self._task, now=now)

    def advance(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def set_completed(self, completed: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=min(completed, self.total or completed))


class LineCounter:
    """Counts lines appended to a file since it was created, polled in a thread: MetaSchedule appends one
    line per measured candidate to its tuning-record file, which is how export shows tuning progress
    without reaching into TVM. `on_count` gets the new count; stop() ends the thread."""

    def __init__(self, path: Path, on_count: Callable[[int], None], interval_s: float = 1.0):
        self.path, self.on_count, self.interval_s = Path(path), on_count, interval_s
        try:
            self._offset = self.path.stat().st_size
        except OSError:
            self._offset = 0
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rsp-progress-lines", daemon=True)

    def __enter__(self) -> "LineCounter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return self.count
        self._offset += len(chunk)
        self.count += chunk.count(b"\n")
        return self.count

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.on_count(self.poll())

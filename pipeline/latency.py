"""Latency measurement shared by verify and the benches: warm-up, many timed runs, percentiles.

Candidates are timed round-robin (one run of each per round), so a clock that drifts or a neighbour that
wakes up hits every candidate alike and the ratio between them stays honest. On CUDA a candidate can
supply its own timer (CUDA events on its stream), so no host transfer or device-wide sync is counted.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    v = sorted(values)
    if not v:
        return float("nan")
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(times_s: list[float], batch: int) -> dict:
    ms = [t * 1e3 for t in times_s]
    p50 = percentile(ms, 50)
    return {"batch": batch, "runs": len(ms), "p50_ms": p50, "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "min_ms": min(ms), "throughput_ips": batch * 1e3 / p50 if p50 > 0 else None}


def cuda_event_timer(fn: Callable[[], object]) -> Callable[[], float]:
    """Time fn on the current CUDA stream with events (seconds); only the events are waited on."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timed


def wall_timer(fn: Callable[[], object]) -> Callable[[], float]:
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return timed


def median_call_seconds(fn: Callable[[], object], repeat: int = 5, min_s: float = 0.1) -> float:
    """Median seconds per call of one candidate; each repeat runs >= min_s (as TVM's time_evaluator does)."""
    t = time.perf_counter()
    fn()
    number = max(1, int(min_s / max(time.perf_counter() - t, 1e-6)))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times)


def compare(candidates: dict[str, Callable[[], float]], batch: int, *, warmup: int = 10, runs: int = 100,
            max_seconds: float | None = None, settle: int = 0) -> dict[str, dict]:
    """Time each candidate (a zero-argument callable returning its own elapsed seconds) round-robin.

    `max_seconds` caps the timed phase (at least 5 rounds are always taken) so that a slow model on a
    small CPU does not hold a CI job for minutes. `settle`: untimed calls of a candidate before each of
    its timed ones, so the previous candidate's spinning worker threads (onnxruntime's, OpenMP's, rsp's)
    have yielded the cores and its own are awake: every candidate is timed as it runs on its own.
    """
    for timed in candidates.values():
        for _ in range(warmup):
            timed()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    t_start = time.perf_counter()
    for r in range(runs):
        for k, timed in candidates.items():
            for _ in range(settle):
                timed()
            times[k].append(timed())
        if max_seconds is not None and r >= 4 and time.perf_counter() - t_start > max_seconds:
            break
    return {k: summarize(v, batch) for k, v in times.items()}

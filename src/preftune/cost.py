"""What a stage costs: wall time, CPU time and the process's peak resident memory while it ran.

The peak is Linux's VmHWM, reset at the stage's start by writing 5 to /proc/self/clear_refs, so each stage reports
its own peak (which includes what the process already held: libraries and any model loaded before). Where the reset
is not allowed the peak since the process started is reported, and `peak_since_start` says so. A measurement
inside another (a round inside a frontier method) resets the peak too, so each reports its peak to the one around
it, which reports the larger of its own reading and theirs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
_inner_peaks: list[list[float]] = []  # per open measurement, the peaks of those that ran inside it


def _peak_mb() -> float | None:
    """VmHWM of this process in MB (10⁶ bytes), None where /proc is missing."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def measured(cost: dict):
    """Fills `cost` with wall_s, cpu_s, peak_rss_mb and peak_since_start when the block ends (also on error)."""
    reset = _reset_peak()
    _inner_peaks.append([])
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield cost
    finally:
        peaks = [p for p in (_peak_mb(), *_inner_peaks.pop()) if p is not None]
        peak = max(peaks) if peaks else None
        if _inner_peaks and peak is not None:
            _inner_peaks[-1].append(peak)
        cost.update(
            wall_s=round(time.perf_counter() - wall, 1),
            cpu_s=round(time.process_time() - cpu, 1),
            peak_rss_mb=None if peak is None else round(peak),
            peak_since_start=not reset,
        )

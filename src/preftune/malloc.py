"""glibc's malloc thresholds for a training run: freed tensor memory goes back to the system instead of staying
resident (Linux with glibc only; nothing happens elsewhere).

Why. glibc serves a request of at least M_MMAP_THRESHOLD bytes (128 KiB at start) with its own mmap, returned to
the system by free. But it raises that threshold, up to 32 MiB, each time such a block is freed, so that later
blocks of that size come from the heap; and the heap gives memory back only from its top, above
M_TRIM_THRESHOLD, which it raises too. A training step allocates and frees the same 1–32 MiB tensors (weight
gradients, a layer's activations, AdamW's temporaries) again and again: after the first frees they all come from
the heap, and what is freed below a live block stays resident. At 162M parameters this retention is a quarter of
the run's peak (benchmarks/RESULTS.md section 12, with `--gradient-checkpointing`: 4.40–4.42 → 3.19 GiB). Setting
both thresholds once turns the raising off, so every tensor from 128 KiB up is mapped and unmapped on its own.

Cost: every such allocation starts from fresh pages, which the kernel faults in and zeroes: at 162M on one CPU
thread, 4× the page faults and 1.2× the time per step. So training fixes the thresholds only where the user has
chosen memory over time, with `--gradient-checkpointing`. Nothing computed changes: malloc only decides where
memory comes from, and every kernel sees the same values (tests/test_malloc.py compares two runs bit for bit).

`$PREFTUNE_MALLOC_THRESHOLD` (bytes) fixes the thresholds at that value in any run, and 0 never fixes them.
glibc's own settings win: when the process was started with `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`
or a `glibc.malloc` tunable in `GLIBC_TUNABLES`, preftune leaves malloc as they set it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger("preftune")

ENV = "PREFTUNE_MALLOC_THRESHOLD"
THRESHOLD = 128 * 1024  # glibc's own starting value of both thresholds, now kept fixed
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def fix_malloc_thresholds(wanted: bool = True, environ: dict[str, str] | None = None) -> int | None:
    """Fix glibc's mmap and trim thresholds (see the module's docstring) when `wanted` (training: with
    --gradient-checkpointing) or PREFTUNE_MALLOC_THRESHOLD names a value; return the value set, or None when
    malloc was left alone (not wanted, not glibc, PREFTUNE_MALLOC_THRESHOLD=0, or set by the user through glibc's
    own variables). Once per process is enough; calling it again sets the same values."""
    env = os.environ if environ is None else environ
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return None
    if any(name in env for name in GLIBC_ENV) or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return None
    raw = env.get(ENV, "").strip()
    if not raw and not wanted:
        return None
    try:
        value = int(raw) if raw else THRESHOLD
    except ValueError:
        log.warning("%s=%r is not a number of bytes: using %d", ENV, raw, THRESHOLD)
        value = THRESHOLD
    if value <= 0:
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    value = min(value, 2**31 - 1)
    # mallopt returns 1 on success (older glibc refuses an mmap threshold above 32 MiB).
    if not (mallopt(M_MMAP_THRESHOLD, value) and mallopt(M_TRIM_THRESHOLD, value)):
        log.debug("mallopt refused the threshold %d: malloc left as it was", value)
        return None
    return value

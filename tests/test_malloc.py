"""`preftune.malloc`: training with --gradient-checkpointing fixes glibc's mmap and trim thresholds, so freed tensor
memory leaves the process; it has that effect, it stays out of the way where the user or the platform says so, and
it changes no number."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from preftune import malloc, recipe, reward_model
from preftune.cli import main

from helpers import SRC, TIMING, assert_same_weights, records
from toy import counting_pairs, save_model_folder, write_jsonl

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
OWN_SETTINGS = (*malloc.GLIBC_ENV, malloc.ENV, "GLIBC_TUNABLES")

# Frees a 16 MiB block (glibc then raises its mmap threshold to 16 MiB), makes eight 8 MiB blocks and one small one
# after them, frees the eight and prints how many bytes of them left the process.
RETENTION = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "fix":
    from preftune.malloc import fix_malloc_thresholds
    assert fix_malloc_thresholds() == 128 * 1024
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
MiB = 1 << 20
big = libc.malloc(16 * MiB)
ctypes.memset(big, 1, 16 * MiB)
libc.free(big)
blocks = [libc.malloc(8 * MiB) for _ in range(8)]
for b in blocks:
    ctypes.memset(b, 1, 8 * MiB)
pin = libc.malloc(4096)
before = rss()
for b in blocks:
    libc.free(b)
print(before - rss())
"""


def returned_bytes(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    out = subprocess.run(
        [sys.executable, "-c", RETENTION, mode],
        env={**env, "PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return int(out.stdout.split()[-1])


@needs_glibc
def test_freed_blocks_leave_the_process_only_with_fixed_thresholds():
    # glibc's default: after the 16 MiB free the 8 MiB blocks come from the heap and stay resident when freed.
    assert returned_bytes("default") < 16 << 20
    assert returned_bytes("fix") >= 56 << 20


@needs_glibc
@pytest.mark.parametrize(
    "env",
    [
        {malloc.ENV: "0"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TRIM_THRESHOLD_": "65536"},
        {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"},
    ],
)
def test_left_alone_when_turned_off_or_set_through_glibc(env):
    assert malloc.fix_malloc_thresholds(True, env) is None


@needs_glibc
def test_wanted_or_named_in_the_environment():
    assert malloc.fix_malloc_thresholds(False, {}) is None
    assert malloc.fix_malloc_thresholds(True, {}) == malloc.THRESHOLD
    assert malloc.fix_malloc_thresholds(False, {malloc.ENV: "1048576"}) == 1 << 20
    assert malloc.fix_malloc_thresholds(True, {malloc.ENV: "lots"}) == malloc.THRESHOLD
    assert malloc.fix_malloc_thresholds(True, {}) == malloc.THRESHOLD  # the test process ends as training leaves it


def test_nothing_happens_off_glibc(monkeypatch):
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    assert malloc.fix_malloc_thresholds(True, {}) is None
    monkeypatch.setattr(malloc.sys, "platform", "darwin")
    assert malloc.fix_malloc_thresholds(True, {}) is None


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    model = save_model_folder(root / "model")
    train = write_jsonl(counting_pairs(16, seed=1), root / "train.jsonl")
    return {"model": str(model), "train": str(train)}


def train_args(toy, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", toy["model"], "--data", toy["train"], "--output", str(out), "--batch-size", "4"] + [
        *("--max-steps", "3", "--learning-rate", "1e-3", "--no-report", *extra),
    ]


@pytest.mark.parametrize("command", [recipe, reward_model], ids=["train", "reward-model"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_asks_once_wanted_with_gradient_checkpointing(toy, tmp_path, monkeypatch, command, checkpointing):
    calls = []
    monkeypatch.setattr(command, "fix_malloc_thresholds", lambda wanted: calls.append(wanted))
    extra = ["--gradient-checkpointing"] if checkpointing else []
    argv = train_args(toy, tmp_path / "run", *extra)
    if command is reward_model:
        argv = ["reward-model", *argv[1:]]
    assert main(argv) == 0
    assert calls == [checkpointing]


@needs_glibc
def test_same_numbers_with_and_without_fixed_thresholds(toy, tmp_path):
    """Two processes, glibc's default malloc and preftune's thresholds: bit-identical metrics and weights (a tensor
    read before it is written would show here: fresh mmap pages are zero, reused heap memory is not)."""
    env = {k: v for k, v in os.environ.items() if k not in OWN_SETTINGS}
    runs = {"glibc": tmp_path / "glibc", "fixed": tmp_path / "fixed"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "preftune", *train_args(toy, out, "--gradient-checkpointing")],
            env={
                **env,
                "PYTHONPATH": str(SRC),
                "PREFTUNE_CACHE": str(tmp_path / f"cache-{name}"),
                # 4 KiB rather than 128: the toy's tensors are small, and this maps nearly every one of them.
                malloc.ENV: "0" if name == "glibc" else "4096",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, out in runs.items()
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING} for r in rs]  # noqa: E731
    assert strip(records(runs["glibc"])) == strip(records(runs["fixed"]))
    assert_same_weights(runs["glibc"], runs["fixed"], tol=0)

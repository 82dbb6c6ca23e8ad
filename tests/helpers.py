"""Helpers shared by the test files: reading a run folder, comparing two runs, and the tolerances they use.

Two runs are bit-identical only when every tensor goes through the same kernels with the same shapes in the same
order: a resumed run in the same process, a run killed and resumed on the same machine. Anything else rounds
differently and is compared within a tolerance whose size is explained here:

- RUN_TOL (relative and absolute) for the metrics of two runs that split the same work differently: other batch
  shapes (gradient accumulation, the packed and padded layouts, a streamed store), other process counts (each
  process sums its share, then an all-reduce sums the shares), a reference cache computed in other batches, or
  other CPU kernels (ATEN_CPU_CAPABILITY). Each log-prob is a float32 sum of up to ~20 token log-probs of a 2-layer
  model: the two sides differ by a few ulp of the sum (eps 1.2e-7, measured ≤ 2e-7 relative between batch
  compositions), then a few optimizer steps at learning rate 1e-3 carry that into the weights. 1e-5 leaves two
  orders of magnitude of room.
- WEIGHT_TOL (absolute) for the final weights of such runs: AdamW's first steps move each weight by about the
  learning rate (1e-3) whatever the gradient's size, so a gradient that differs in its last bits moves a weight by
  at most a rounding-level fraction of that; 1e-5 is 1% of one step.

`rewards/accuracies` jumps at ties: it counts pairs whose margin is above the tie band (`losses.tie_band`). Two runs
whose margins agree within RUN_TOL can disagree on a pair whose margin lies within RUN_TOL of the band's edge, so
the accuracy is compared through the quantity behind it: the margins at RUN_TOL, and the accuracy to within one
pair of the step (`ACCURACY_KEYS`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

SRC = Path(__file__).resolve().parents[1] / "src"
RUN_TOL = 1e-5
WEIGHT_TOL = 1e-5
TIMING = {"pairs_per_s", "tokens_per_s", "step_time_s"}
ACCURACY_KEYS = {"rewards/accuracies", "eval/rewards/accuracies"}


def records(run_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in records(run_dir)]


def assert_same_run(got: list[dict], expected: list[dict], tol: float = RUN_TOL, pairs_per_step: int = 8) -> None:
    """Same steps, same keys, every metric within `tol` (timings aside); accuracies within one pair of a step of
    `pairs_per_step` pairs (see the module's docstring)."""
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for x, y in zip(got, expected):
        assert set(x) == set(y)
        for key in set(x) - TIMING - {"step"}:
            slack = 1 / pairs_per_step if key in ACCURACY_KEYS and tol else 0
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol + slack), (x["step"], key)


def assert_same_weights(a_dir: Path, b_dir: Path, tol: float = WEIGHT_TOL) -> None:
    """The final/ weights of two runs, within `tol` (0: bit-identical)."""
    a, b = load_file(a_dir / "final" / "model.safetensors"), load_file(b_dir / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=0, atol=tol), key


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a run folder that `--resume --output dst` accepts: its config.yaml names the new place."""
    shutil.copytree(src, dst)
    config = yaml.safe_load((dst / "config.yaml").read_text())
    (dst / "config.yaml").write_text(yaml.safe_dump({**config, "output": str(dst)}, sort_keys=False))
    return dst


def torchrun(argv: list[str], cache: Path, processes: int = 2) -> subprocess.CompletedProcess:
    """`preftune ARGV` under the real torchrun (CPU, gloo), with its own reference cache folder."""
    # --standalone: a free port, so that parallel test runs on one machine do not collide.
    env = {**os.environ, "PYTHONPATH": str(SRC), "PREFTUNE_CACHE": str(cache)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(processes),
            "-m",
            "preftune",
            *argv,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}

"""Faults: kill -9 at any moment then --resume, --keep-last, non-finite steps, a full disk."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint, rundir
from preftune import recipe as train_module
from preftune.cli import main

from conftest import stopped_after
from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels

STEPS = 4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(32, seed=3), root / "train.jsonl")),
    }


def args(toy, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        str(STEPS),
        "--learning-rate",
        "1e-3",
        "--save-every",
        "1",
        *extra,
    ]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(args(toy, out)) == 0
    return out


# The child process runs the real CLI and SIGKILLs itself at one chosen moment: right after a step's metrics
# are written, after a checkpoint's weights are written but before its optimizer state, after a folder is
# complete but before its rename, or inside the final model's write (the 5th atomic write of this run).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from preftune import checkpoint, recipe
    from preftune.cli import main

    point, at = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}

    def die_on_call(fn):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapped

    if point == "after_step":
        recipe.after_step = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == at else None
    elif point == "weights_written":
        checkpoint.save_model = die_on_call(checkpoint.save_model)
    elif point == "before_rename":
        checkpoint.fsync_tree = die_on_call(checkpoint.fsync_tree)
    sys.exit(main(sys.argv[3:]))
""")


@pytest.mark.parametrize(
    "point,at",
    [
        ("weights_written", 1),
        ("before_rename", 2),
        pytest.param("after_step", 3, marks=pytest.mark.slow),
        pytest.param("before_rename", 4, marks=pytest.mark.slow),
    ],
)
def test_kill_9_then_resume_gives_identical_weights(toy, uninterrupted, tmp_path, point, at):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(at), *args(toy, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert not (out / "final").exists()
    assert main(args(toy, out, "--resume")) == 0
    expected, got = final_weights(uninterrupted), final_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert [m["loss"] for m in metrics] == [m["loss"] for m in whole]


@pytest.mark.slow
def test_kill_9_at_a_random_moment(toy, uninterrupted, tmp_path):
    """Killed from outside as soon as the run has written anything, wherever it is, then resumed."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    child = subprocess.Popen(
        [sys.executable, "-m", "preftune", *args(toy, out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while child.poll() is None and not (out / "metrics.jsonl").exists():
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=300)
    assert main(args(toy, out, "--resume")) == 0
    expected, got = final_weights(uninterrupted), final_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_ignores_a_metrics_line_cut_mid_write(toy, tmp_path, uninterrupted):
    out = tmp_path / "run"
    with stopped_after(2):
        assert main(args(toy, out)) == 130
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.6')  # what a kill during the write leaves
    assert main(args(toy, out, "--resume")) == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_keep_last_keeps_the_newest_checkpoints(toy, tmp_path):
    out = tmp_path / "run"
    assert main(args(toy, out, "--keep-last", "2")) == 0
    # Steps 1-3 are checkpointed (the last step writes final/ instead); the two newest remain.
    assert [p.name for p in rundir.complete_checkpoints(out)] == ["step-00000002", "step-00000003"]


def test_keep_last_needs_save_every(toy, tmp_path, capsys):
    argv = [a for a in args(toy, tmp_path / "run", "--keep-last", "2") if a not in ("--save-every", "1")]
    assert main(argv) == 2
    assert "--keep-last has no effect without --save-every" in capsys.readouterr().err


def poison_step(monkeypatch, bad_step: int) -> None:
    """Make the loss of optimizer step `bad_step` (1-based) NaN, as an overflow would."""
    real = train_module.combined_loss
    calls = {"n": 0}

    def loss(*a, **k):
        calls["n"] += 1
        value = real(*a, **k)
        return value * float("nan") if calls["n"] == bad_step else value

    monkeypatch.setattr(train_module, "combined_loss", loss)


def test_nonfinite_loss_stops_the_run_without_writing_a_model(toy, tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, 2)
    out = tmp_path / "run"
    assert main(args(toy, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("preftune: error: step 2: loss is nan")
    assert not (out / "final").exists()
    assert [p.name for p in rundir.complete_checkpoints(out)] == ["step-00000001"]


def test_skip_nonfinite_skips_and_counts_the_step(toy, tmp_path, monkeypatch, capsys):
    poison_step(monkeypatch, 2)
    out = tmp_path / "run"
    assert main(args(toy, out, "--skip-nonfinite")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 1, 0, 0]
    assert math.isnan(records[1]["loss"])
    # The skipped step changed nothing: the weights after it equal those after step 1.
    one, two = (load_file(str(out / "checkpoints" / f"step-0000000{i}" / "model.safetensors")) for i in (1, 2))
    assert all(torch.equal(one[k], two[k]) for k in one)
    final = final_weights(out)
    assert all(torch.isfinite(t).all() for t in final.values())
    assert "skipped 1 step with a non-finite loss or gradient" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_checkpoint(toy, tmp_path, monkeypatch, capsys):
    real = checkpoint.save_model
    calls = {"n": 0}

    def save_model(model, path):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(model, path)

    monkeypatch.setattr(checkpoint, "save_model", save_model)
    out = tmp_path / "run"
    assert main(args(toy, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot write checkpoint step 2 (No space left on device)" in err
    assert "step-00000001 is intact" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"]  # no .tmp left behind
    monkeypatch.setattr(checkpoint, "save_model", real)
    assert main(args(toy, out, "--resume")) == 0

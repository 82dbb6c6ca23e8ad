"""--loss plackett_luce through the real CLI: rows with k rejected responses train as groups of k pairs, kept whole
in the epoch order, in micro-batches and across processes; the loss at π = π_ref is ln(k + 1); a row that lost a
pair, uneven rows and options defined on single pairs are one-line errors. The loss itself: tests/test_losses.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.data.load import epoch_order

from helpers import RUN_TOL, assert_same_run, assert_same_weights, records, torchrun
from toy import counting_pairs, counting_rows_with_rejected_lists, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("plackett_luce")
    return {
        "model": str(save_model_folder(root / "model")),
        "root": root,
        "train": str(write_jsonl(counting_rows_with_rejected_lists(10, 3, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_rows_with_rejected_lists(4, 3, seed=2), root / "eval.jsonl")),
    }


def args(toy, out: Path, *extra: str) -> list[str]:
    """10 rows × 3 rejected = 30 pairs; 6 pairs (2 rows) per step: 5 steps."""
    return [
        "train",
        "--model",
        toy["model"],
        "--data",
        toy["train"],
        "--output",
        str(out),
        "--loss",
        "plackett_luce",
        "--batch-size",
        "6",
        "--epochs",
        "1",
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--no-report",
        *extra,
    ]


def assert_same_runs(a: Path, b: Path, tol: float = RUN_TOL) -> None:
    assert_same_run(records(a), records(b), tol, pairs_per_step=6)
    assert_same_weights(a, b, tol)


@pytest.fixture(scope="module")
def whole(toy):
    out = toy["root"] / "whole"
    assert main(args(toy, out, "--eval-data", toy["eval"])) == 0
    return out


def test_first_loss_is_ln_k_plus_1_and_the_run_learns(whole):
    got = records(whole)
    assert len(got) == 5
    # π = π_ref at step 1: every h_j = 0, so each row's loss is log(1 + 3·e^0) = ln 4 (the cached reference
    # log-probs equal the policy's up to rounding).
    assert got[0]["loss"] == pytest.approx(math.log(4), abs=1e-5)
    assert got[0]["rewards/margins"] == pytest.approx(0, abs=1e-5)
    assert got[-1]["loss"] < got[0]["loss"] and got[-1]["eval/loss"] < math.log(4)
    assert got[-1]["eval/rewards/margins"] > 0


def test_grad_accumulation_gives_the_same_run(toy, whole, tmp_path):
    # 2 micro-batches of 3 pairs (one row each) per step = one of 6: the same losses, metrics and final weights.
    out = tmp_path / "accum"
    assert main(args(toy, out, "--eval-data", toy["eval"], "--batch-size", "3", "--grad-accum", "2")) == 0
    assert_same_runs(out, whole)


def test_one_rejected_response_per_row_is_dpo(toy, tmp_path):
    data = write_jsonl(counting_pairs(12, seed=3), tmp_path / "pairs.jsonl")
    runs = {}
    for loss in ("sigmoid", "plackett_luce"):
        runs[loss] = tmp_path / loss
        assert (
            main([*args(toy, runs[loss], "--data", str(data), "--batch-size", "4", "--no-ref-cache"), "--loss", loss])
            == 0
        )
    assert_same_runs(runs["plackett_luce"], runs["sigmoid"])


def test_the_epoch_order_shuffles_whole_groups():
    cfg = TrainConfig(model="m", data="d", output="o", loss="plackett_luce", batch_size=6)
    pairs = [None] * 30
    for epoch in (0, 1):
        order = np.asarray(epoch_order(pairs, cfg, epoch, group=3)).reshape(10, 3)
        assert sorted(order.ravel().tolist()) == list(range(30))
        assert (order[:, 1:] == order[:, :1] + [1, 2]).all() and (order[:, 0] % 3 == 0).all()
    assert not np.array_equal(epoch_order(pairs, cfg, 0, group=3), epoch_order(pairs, cfg, 1, group=3))
    assert not np.array_equal(epoch_order(pairs, cfg, 0, group=3), np.arange(30))


def test_streamed_data_trains_the_same(toy, whole, tmp_path):
    out = tmp_path / "streamed"
    assert main(args(toy, out, "--eval-data", toy["eval"], "--stream")) == 0
    # The same process, batches, kernels and cached reference file: only the source of the token ids differs.
    assert_same_runs(out, whole, tol=0)


@pytest.mark.slow  # about 20 s: two processes under the real torchrun
def test_two_processes_share_steps_in_whole_groups(toy, tmp_path):
    # 11 rows: the last step holds one row (3 pairs), all on rank 0; 4 eval rows split 2 + 2. Each process has
    # --batch-size 3, so 2 processes train on 6 pairs a step, as one process with --batch-size 6.
    toy = {**toy, "train": str(write_jsonl(counting_rows_with_rejected_lists(11, 3, seed=5), tmp_path / "t.jsonl"))}
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(toy, one, "--eval-data", toy["eval"], "--eval-every", "3")) == 0
    proc = torchrun(
        args(toy, two, "--eval-data", toy["eval"], "--eval-every", "3", "--batch-size", "3"), tmp_path / "cache"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records(two)) == 6
    assert_same_runs(two, one)


def _rows(tmp_path: Path, rows: list[dict], name: str = "d.jsonl") -> str:
    return str(write_jsonl(rows, tmp_path / name))


@pytest.mark.parametrize(
    "case, message",
    [
        ("uneven", "line 2 gives 2 pairs but {data} line 1 gives 3; every row must keep the same number of rejected"),
        ("identical", "line 2 gives 2 pairs but {data} line 1 gives 3"),
        ("batch", "--batch-size 4 is not a multiple of 3, the pairs of one row of --data"),
        ("eval", "the rows of --eval-data give 2 pairs each but those of --data 3"),
        ("wpo", "--wpo works on single pairs and cannot be used with --loss plackett_luce"),
        ("group-by-length", "--group-by-length works on single pairs and cannot be used with --loss plackett_luce"),
        ("ld-alpha", "--ld-alpha works on single pairs and cannot be used with --loss plackett_luce"),
    ],
)
def test_what_a_grouped_loss_cannot_train_is_a_one_line_error(toy, tmp_path, capsys, case, message):
    rows = counting_rows_with_rejected_lists(4, 3, seed=4)
    extra = []
    if case == "uneven":
        rows[1]["rejected"] = rows[1]["rejected"][:2]
    if case == "identical":  # skipped and counted as usual: its row is left with 2 pairs
        rows[1]["rejected"][2] = rows[1]["chosen"]
    data = _rows(tmp_path, rows)
    if case == "batch":
        extra = ["--batch-size", "4"]
    if case == "eval":
        short = [{**r, "rejected": r["rejected"][:2]} for r in rows]
        extra = ["--eval-data", _rows(tmp_path, short, "eval.jsonl")]
    if case in ("wpo", "group-by-length"):
        extra = [f"--{case}"]
    if case == "ld-alpha":
        extra = ["--ld-alpha", "0.5"]
    out = tmp_path / "run"
    assert main([*args(toy, out, "--batch-size", "3", *extra), "--data", data]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error: ") and message.format(data=data) in err[-1], err[-1]
    assert "Traceback" not in "".join(err)
    assert not out.exists()

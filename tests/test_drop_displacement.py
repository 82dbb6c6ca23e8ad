"""--drop-displacement P: the top P% of the training pairs by the reference's length-normalised CHES are dropped
before training (counted and logged); the scores come from the reference cache pass."""

from __future__ import annotations

import math

import numpy as np
import pytest

from preftune.ches import score_pairs
from preftune.cli import main
from preftune.config import resolve
from preftune.data.load import load_data
from preftune.loading import load_causal_lm, load_tokenizer

from helpers import records
from toy import counting_pairs, save_model_folder, write_jsonl


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(32, seed=4), root / "train.jsonl")),
        "root": root,
    }


def args(toy, out, *extra):
    return ["train", "--model", toy["model"], "--data", toy["train"], "--output", str(out), "--batch-size", "4",
            "--epochs", "1", "--no-shuffle", "--no-report", "--ref-cache", str(toy["root"] / "cache"), *extra]  # fmt: skip


def test_the_riskiest_quarter_is_dropped_and_counted(toy, tmp_path, capsys):
    assert main(args(toy, tmp_path / "run", "--drop-displacement", "25")) == 0
    # 32 pairs, 25% dropped → 24 pairs: 6 steps of 4 (a run without the flag takes 8).
    assert [r["step"] for r in records(tmp_path / "run")] == list(range(1, 7))
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("preftune: --drop-displacement")).removeprefix("preftune: ")
    assert line.startswith("--drop-displacement 25: dropped 8 of 32 pairs, CHES_norm ≥ ")
    # The dropped pairs are those an independent pass ranks highest (`preftune audit --displacement`'s scores).
    cfg, _ = resolve({"model": toy["model"], "data": toy["train"], "output": "-"})
    tokenizer = load_tokenizer(toy["model"])
    pairs, _ = load_data(toy["train"], cfg, tokenizer, "--data")
    scores = score_pairs(load_causal_lm(toy["model"]), pairs, tokenizer.pad_token_id, progress=False)[:, 1]
    riskiest = pairs[int(np.argmax(scores))].where
    assert f"(the riskiest: {riskiest})" in line
    threshold = float(line.split("CHES_norm ≥ ")[1].split(" ")[0])
    assert threshold == pytest.approx(np.sort(scores)[-8], rel=1e-3)


def test_a_second_run_reuses_the_cached_scores(toy, tmp_path, capsys):
    assert main(args(toy, tmp_path / "a", "--drop-displacement", "10")) == 0
    capsys.readouterr()
    assert main(args(toy, tmp_path / "b", "--drop-displacement", "10")) == 0
    assert "reference log-probs: reused" in capsys.readouterr().err
    first, second = records(tmp_path / "a"), records(tmp_path / "b")
    assert len(first) == math.ceil((32 - 3) / 4) and [r["loss"] for r in first] == [r["loss"] for r in second]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--drop-displacement", "100"], "--drop-displacement must be a percentage in (0, 100), got 100.0"),
        (["--drop-displacement", "10", "--no-ref-cache"], "--drop-displacement: not supported with a live reference"),
        (["--drop-displacement", "10", "--loss", "simpo"], "--drop-displacement: not supported with --loss simpo"),
        (["--drop-displacement", "10", "--stream"], "--drop-displacement: not supported with --stream"),
    ],
)
def test_what_it_cannot_do_is_one_line(toy, tmp_path, capsys, extra, message):
    argv = [a for a in args(toy, tmp_path / "run", *extra) if a not in ("--ref-cache", str(toy["root"] / "cache"))]
    assert main(argv) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()

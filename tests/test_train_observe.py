"""Training observes itself: the data audit at the start, sampling-based evaluation every N steps, warnings as
metrics arrive and the report at the end — through the real CLI, with the same code as `audit`/`eval`/`report`."""

from __future__ import annotations

import json
import math

import pytest

from preftune.cli import main

from toy import counting_pairs, save_model_folder, write_jsonl

REWARD_MODULE = '''
def score(texts):
    """Counts the digits of a text: a reward a test can reason about."""
    return [float(sum(word.isdigit() for word in text.split())) for text in texts]
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("observe")
    rows = counting_pairs(32, seed=4)
    rows += rows[:3]  # at least 3 exact duplicates
    (root / "toy_reward.py").write_text(REWARD_MODULE, encoding="utf-8")
    return {
        "root": root,
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(rows, root / "train.jsonl")),
        "duplicates": len(rows) - len({json.dumps(r) for r in rows}),
        "eval": str(write_jsonl(counting_pairs(8, seed=5), root / "eval.jsonl")),
        "prompts": str(write_jsonl([{"prompt": f"count from {i} :"} for i in range(6)], root / "prompts.jsonl")),
    }


def test_a_run_samples_audits_warns_and_reports(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(toy["root"]))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            toy["model"],
            "--data",
            toy["train"],
            "--eval-data",
            toy["eval"],
            "--output",
            str(out),
            "--batch-size",
            "8",
            "--max-steps",
            "4",
            "--learning-rate",
            "1e-3",
            "--eval-every",
            "2",
            "--eval-prompts",
            toy["prompts"],
            "--eval-reward",
            "toy_reward:score",
            "--eval-max-new-tokens",
            "6",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    warning = err.split("--data audit:")[1].splitlines()[0]
    assert f"({toy['duplicates']}) repeat an earlier pair exactly" in warning

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r["step"] for r in records if "eval/kl" in r]
    assert evaluated == [2, 4]
    last = records[-1]
    assert math.isfinite(last["eval/kl"]) and last["eval/kl_se"] >= 0
    assert 0 <= last["eval/win_rate"] <= 1 and "eval/reward/policy" in last
    assert "eval/rewards/accuracies" in last  # the held-out pairs are evaluated at the same steps

    result = json.loads((out / "eval.json").read_text())
    assert result["step"] == 4 and result["generation"]["prompts"] == 6
    assert len(result["samples"]) == 5  # the first five, for the report
    audit = json.loads((out / "audit.json").read_text())
    assert audit["duplicates"]["count"] == toy["duplicates"] >= 3

    html = (out / "report.html").read_text()
    assert "KL" in html and (out / "plots" / "kl.png").exists()


def test_eval_options_need_their_inputs(toy, tmp_path, capsys):
    base = ["train", "--model", toy["model"], "--data", toy["train"], "--output", str(tmp_path / "run")]
    assert main(base + ["--eval-reward", "toy_reward:score"]) == 2
    assert "--eval-reward has no effect without --eval-prompts" in capsys.readouterr().err
    assert main(base + ["--eval-every", "2"]) == 2
    assert "--eval-every has no effect without --eval-data or --eval-prompts" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

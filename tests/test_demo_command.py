"""`preftune demo` (eval + report after the stages) and `preftune frontier`: the arithmetic by hand, the command
line's mistakes, and both commands end to end at sizes far below `--quick` (slow-marked)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.demo import command, frontier, online, pipeline
from preftune.errors import UserError

TINY = pipeline.Sizes(
    reviews=300,
    sft_steps=5,
    sft_batch=8,
    train_prompts=24,
    heldout_prompts=6,
    dpo_steps=2,
    dpo_batch=4,
    hidden=32,
    max_new_tokens=10,
    iterate_prompts=8,
)


def test_reward_difference_is_welch_with_the_normal_quantile():
    # diff = 0.3 − 0.1 = 0.2; se = √(0.03² + 0.04²) = √0.0025 = 0.05; half-width 1.959964 · 0.05 = 0.0979982
    got = command.reward_difference({"policy": 0.3, "reference": 0.1, "policy_se": 0.03, "reference_se": 0.04})
    assert got["difference"] == pytest.approx(0.2) and got["se"] == pytest.approx(0.05)
    assert got["ci_low"] == pytest.approx(0.1020018) and got["ci_high"] == pytest.approx(0.2979982)


def test_summary_line_names_every_number():
    generation = {
        "reward": {"policy": 0.182, "reference": 0.002},
        "kl": 2.915,
        "kl_se": 0.27,
        "win_rate": {"win_rate": 0.63, "ci_low": 0.571, "ci_high": 0.684, "prompts": 256},
    }
    difference = {"difference": 0.18, "ci_low": 0.109, "ci_high": 0.251}
    assert command.summary_line(generation, difference, "out/dpo/report.html") == (
        "reward SFT +0.002 → DPO +0.182: +0.180 (95% CI +0.109 … +0.251, Welch); KL(DPO‖SFT) 2.92 ± 0.27 nats (SE); "
        "win rate 0.63 (95% CI 0.57 … 0.68, Wilson) on 256 held-out prompts; report: out/dpo/report.html"
    )


def test_best_of_n_kl_and_reward_by_hand():
    assert frontier.kl_best_of_n(1) == 0
    assert frontier.kl_best_of_n(4) == pytest.approx(math.log(4) - 0.75)  # 1.3862944 − 0.75 = 0.6362944
    # Prompt 1: groups (1, 3), (2, 0) → maxima 3, 2 → 2.5; best of 4 → 3.  Prompt 2: (0, 0), (1, −1) → 0.5; → 1.
    rewards = [[1, 3, 2, 0], [0, 0, 1, -1]]
    mean, se = frontier.best_of_n(rewards, 2)
    assert mean == pytest.approx(1.5) and se == pytest.approx(1.0)  # values 2.5, 0.5: s = √2, SE = √2/√2
    assert frontier.best_of_n(rewards, 4) == (pytest.approx(2.0), pytest.approx(1.0))
    assert frontier.best_of_n([[0.5]], 1) == (0.5, None)
    with pytest.raises(ValueError, match="not a multiple"):
        frontier.best_of_n([[1, 2, 3]], 2)


def test_parse_betas():
    assert frontier.parse_betas("0.05,0.1,0.3,1") == [0.05, 0.1, 0.3, 1.0]
    for spec, message in (
        ("0.1,x", "comma-separated numbers"),
        ("0.1,0", "positive"),
        ("0.1,nan", "positive"),
        ("0.1,0.1", "repeated"),
    ):
        with pytest.raises(UserError, match=message):
            frontier.parse_betas(spec)


@pytest.mark.parametrize("subcommand", ["demo", "frontier"])
def test_a_non_empty_output_folder_is_refused(tmp_path, capsys, subcommand):
    (tmp_path / "old.txt").write_text("keep me")
    assert main([subcommand, "--output", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err == f"preftune: error: --output {tmp_path}: folder is not empty; choose a new folder\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["old.txt"]


def test_frontier_bad_betas_end_in_one_line(tmp_path, capsys):
    assert main(["frontier", "--output", str(tmp_path / "new"), "--betas", "0.1,-1"]) == 2
    assert capsys.readouterr().err == "preftune: error: --betas: every β must be a positive number, got '0.1,-1'\n"
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    result = command.run_demo(tmp_path / "out", sizes=TINY)
    saved = json.loads((result["run"] / "eval.json").read_text(encoding="utf-8"))
    assert saved["model"] == str(result["run"] / "final") and saved["reference"] == str(result["sft"])
    assert saved["generation"]["prompts"] == TINY.heldout_prompts
    assert saved["generation"]["reward"]["spec"] == "preftune.demo.sentiment:score"
    assert saved["reward_difference"] == pytest.approx(command.reward_difference(saved["generation"]["reward"]))
    assert len(saved["samples"]) == 5 and {"policy", "reference", "policy_reward"} <= set(saved["samples"][0])
    assert saved["pairs"]["rewards/accuracies"] is not None
    page = result["report"].read_text(encoding="utf-8")
    assert result["report"] == result["run"] / "report.html" and "Sample continuations" in page
    assert saved["samples"][0]["policy"].strip()[:20] in page  # html-escaping aside, a DPO continuation is shown
    stages = json.loads((tmp_path / "out" / "stages.json").read_text(encoding="utf-8"))
    assert list(stages) == ["corpus", "sft", "pairs", "dpo", "eval", "report"]
    assert result["summary"].startswith("reward SFT ") and result["summary"].endswith(f"report: {result['report']}")


@pytest.mark.slow
def test_frontier_end_to_end_tiny_shares_one_reference_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="preftune")
    points = frontier.run_frontier(tmp_path / "out", betas=[0.1, 0.5, 2.0], sizes=TINY, best_of=(2, 4))
    messages = [r.getMessage() for r in caplog.records]
    offline = [m for m in messages if str(tmp_path / "out" / "ref-cache") in m]  # the on-policy rounds have their own
    computed = [m for m in offline if "reference log-probs: computed" in m]
    reused = [m for m in offline if "reference log-probs: reused" in m]
    assert len(computed) == 2 and len(reused) == 4  # --data and --eval-data once, then reused by β = 0.5 and 2
    assert len(list((tmp_path / "out" / "ref-cache").glob("*.npy"))) == 2
    saved = json.loads((tmp_path / "out" / "frontier.json").read_text(encoding="utf-8"))
    assert [p["beta"] for p in saved["dpo"]] == [0.1, 0.5, 2.0]
    assert [p["n"] for p in saved["best_of_n"]] == [2, 4]
    assert saved["best_of_n"][1]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert saved["best_of_n"][1]["reward"] >= saved["best_of_n"][0]["reward"]  # nested maxima: best of 4 ≥ of 2
    for p in saved["dpo"]:
        assert p["kl"] is not None and math.isfinite(p["reward"])
        assert json.loads((tmp_path / "out" / f"dpo-beta{p['beta']:g}" / "eval.json").read_text())["generation"]
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert points["prompts"] == TINY.heldout_prompts
    assert sum("frontier: offline DPO β=" in m for m in messages) == 3
    assert sum("frontier: best-of-" in m for m in messages) == 4  # picked by the true reward, by the reward model
    rm = saved["reward_model"]
    assert 0 <= rm["accuracy"] <= 1 and 0 <= rm["ceiling"]["accuracy"] <= 1 and rm["agreement"]["pairs"] > 0
    assert [m["name"] for m in saved["online"]] == list(online.methods("rm"))
    for method in saved["online"]:
        rounds = method["rounds"]
        assert [p["round"] for p in rounds] == [1, 2, 3]
        assert [p["samples"] for p in rounds] == [8 * 4, 16 * 4, 24 * 4]  # cumulative: 8 prompts × k = 4 a round
        assert rounds[0]["seconds"] < rounds[2]["seconds"] and all(p["peak_rss_mb"] > 0 for p in rounds)
        summary = json.loads((Path(method["folder"]) / "iterate.json").read_text())
        assert [r["reward"] for r in summary["rounds"]] == [p["reward"] for p in rounds]
        assert summary["rounds"][0]["start_reward"] == rounds[0]["start_reward"]
    rloo = json.loads((tmp_path / "out" / "rloo-rm" / "iterate-config.json").read_text())
    assert rloo["reward"] == saved["reward_model"]["folder"] and rloo["eval_reward"] == command.REWARD
    for p in saved["dpo"]:
        assert p["cost"]["samples"] == 2 * TINY.train_prompts and p["cost"]["seconds"] > 0
    by_rm = saved["best_of_n_rm"]
    assert [p["cost"]["samples"] for p in by_rm] == [2 * TINY.heldout_prompts, 4 * TINY.heldout_prompts]
    assert by_rm[0]["reward"] <= saved["best_of_n"][0]["reward"]  # the true reward picks the true best

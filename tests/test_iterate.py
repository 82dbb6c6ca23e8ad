"""`preftune iterate`: the pair building by hand, the error lines, and whole runs through the real CLI on a tiny
Llama built from a config (offline), with a `module:function` reward (tests/iterate_reward.py)."""

from __future__ import annotations

import importlib
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from iterate_reward import total

from preftune.cli import main
from preftune.evaluation.rewards import load_reward
from preftune.iterate.pairs import Pair, build_pairs

from conftest import build_tiny_tokenizer
from helpers import RUN_TOL, assert_same_run, assert_same_weights, records
from toy import build_model, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares a resumed run with an uninterrupted one

# ------------------------------------------------------------------------------------------- pairs, by hand


def test_best_worst_takes_the_first_best_and_the_first_worst():
    pairs, counts = build_pairs([["a", "b", "c", "d", "e"]], [[1.0, 5.0, 5.0, 0.0, 0.0]])
    assert pairs == [Pair(prompt=0, chosen=1, rejected=3, chosen_reward=5.0, rejected_reward=0.0)]
    assert (counts.candidates, counts.pairs, counts.ties, counts.prompts_without_pair) == (1, 1, 0, 0)


def test_all_pairs_skip_ties_and_near_ties_and_count_them():
    # Rewards [3, 1, 3, 0], min_gap 1: of the 6 candidates, {0, 2} ties (gap 0), {1, 3} is a near tie (gap 1).
    pairs, counts = build_pairs([["a", "b", "c", "d"]], [[3.0, 1.0, 3.0, 0.0]], "all", min_gap=1.0)
    assert [(p.chosen, p.rejected) for p in pairs] == [(0, 1), (0, 3), (2, 1), (2, 3)]
    assert [(p.chosen_reward, p.rejected_reward) for p in pairs] == [(3, 1), (3, 0), (3, 1), (3, 0)]
    assert (counts.candidates, counts.pairs, counts.ties, counts.near_ties) == (6, 4, 1, 1)
    # The higher reward is chosen whatever the order: (1, 0) is oriented as (0 over 1).
    pairs, _ = build_pairs([["a", "b"]], [[0.0, 2.0]], "all")
    assert [(p.chosen, p.rejected) for p in pairs] == [(1, 0)]


def test_best_worst_near_tie_is_skipped_and_an_exact_gap_above_min_gap_is_kept():
    _, counts = build_pairs([["a", "b"], ["c", "d"]], [[1.0, 1.5], [0.0, 0.75]], min_gap=0.5)
    assert (counts.pairs, counts.near_ties, counts.prompts_without_pair) == (1, 1, 1)


def test_a_prompt_whose_rewards_all_tie_yields_nothing_and_is_counted():
    for how, ties in (("best-worst", 1), ("all", 3)):
        pairs, counts = build_pairs([["a", "b", "c"], ["d", "e", "f"]], [[2.0, 2.0, 2.0], [1.0, 0.0, 1.0]], how)
        assert [p.prompt for p in pairs] == [1] * (1 if how == "best-worst" else 2)
        assert (counts.prompts_all_tied, counts.prompts_without_pair, counts.ties) == (1, 1, ties + (how == "all"))
        assert counts.prompts == 2 and counts.responses == 6


def test_empty_responses_take_part_in_no_pair_and_identical_texts_are_skipped():
    # The empty responses have the best rewards but training refuses them: the pair is among the other two.
    pairs, counts = build_pairs([["", "  ", "x", "y"]], [[9.0, 8.0, 1.0, 0.0]])
    assert [(p.chosen, p.rejected) for p in pairs] == [(2, 3)] and counts.empty == 2
    # One usable response: no candidate at all; it is not a tie.
    _, counts = build_pairs([["", "x"]], [[1.0, 0.0]])
    assert (counts.candidates, counts.prompts_without_pair, counts.prompts_all_tied) == (0, 1, 0)
    # The same text scored twice differently (a nondeterministic reward): skipped and counted.
    _, counts = build_pairs([["x", "x"]], [[1.0, 0.0]])
    assert (counts.pairs, counts.identical) == (0, 1)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        build_pairs([["a", "b"]], [[1.0]])
    with pytest.raises(ValueError):
        build_pairs([["a", "b"]], [[1.0, 0.0]], "best")


def test_the_test_rewards():
    assert total(["count from 3 : 4 5", "no numbers"]) == [12.0, 0.0]


# ------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("iterate")
    model = save_model_folder(root / "sft")
    prompts = write_jsonl([{"prompt": f"count from {i} :"} for i in range(6)], root / "prompts.jsonl")
    held_out = write_jsonl([{"prompt": f"count from {i} :"} for i in range(12, 16)], root / "eval.jsonl")
    return {"model": str(model), "prompts": str(prompts), "eval": str(held_out), "root": root}


def required(toy, out: Path) -> list[str]:
    return [
        "iterate",
        *("--model", toy["model"], "--prompts", toy["prompts"], "--eval-prompts", toy["eval"]),
        *("--reward", "iterate_reward:total", "--output", str(out)),
    ]


def flags(toy, out: Path, *extra: str) -> list[str]:
    return [
        *required(toy, out),
        *("--rounds", "2", "--samples", "3", "--max-new-tokens", "6", "--device", "cpu"),
        *("--max-steps", "2", "--batch-size", "2", "--learning-rate", "1e-3", "--save-every", "1"),
        *extra,
    ]


def read(path: Path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def whole(toy):
    """Two rounds, uninterrupted, with the round reports."""
    out = toy["root"] / "whole"
    assert main(flags(toy, out)) == 0
    return out


def test_rounds_write_their_folders_and_the_summary(toy, whole):
    summary = read(whole / "iterate.json")
    assert [s["round"] for s in summary["rounds"]] == [1, 2]
    assert (whole / "iterate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for r, s in enumerate(summary["rounds"], start=1):
        folder = whole / f"round-{r}"
        for name in ("samples.jsonl", "pairs.jsonl", "eval.json", "run/audit.json", "run/report.html"):
            assert (folder / name).exists(), name
        assert [rec["step"] for rec in records(folder / "run")] == [1, 2]
        assert s["policy"] == f"round-{r}/run/final" and (whole / s["policy"] / "model.safetensors").exists()
        assert s["samples"] == 6 * 3
        assert s["kl"] is not None and s["kl_se"] is not None
        assert 0 <= s["win_rate_ci"][0] <= s["win_rate"] <= s["win_rate_ci"][1] <= 1
        assert s["peak_rss_mb"] > 0 and s["seconds"]["total"] > 0
        generation = read(folder / "eval.json")["generation"]
        assert (s["reward"], s["start_reward"]) == (generation["reward"]["policy"], generation["reward"]["reference"])
        assert generation["prompts"] == 4
    # Every evaluation samples the starting model with the same seed: its reward is the same each round.
    assert summary["rounds"][0]["start_reward"] == summary["rounds"][1]["start_reward"] == summary["start"]["reward"]


def test_samples_are_scored_and_paired_as_written(toy, whole):
    for r in (1, 2):
        folder = whole / f"round-{r}"
        rows = read(folder / "samples.jsonl")
        assert len(rows) == 6 and all(len(row["responses"]) == len(row["response_ids"]) == 3 for row in rows)
        for row in rows:  # the reward sees the prompt as the model does, then the response
            assert row["rewards"] == total([row["prompt"] + text for text in row["responses"]])
        pairs, counts = build_pairs([row["responses"] for row in rows], [row["rewards"] for row in rows])
        written = read(folder / "pairs.jsonl")
        assert [(w["chosen"], w["rejected"]) for w in written] == [
            (rows[p.prompt]["responses"][p.chosen], rows[p.prompt]["responses"][p.rejected]) for p in pairs
        ]
        assert all(w["chosen_reward"] > w["rejected_reward"] for w in written)
        assert read(folder / "pairs.json")["pairs"] == counts.pairs == len(written)


def test_each_round_trains_against_the_starting_model(toy, whole):
    first = yaml.safe_load((whole / "round-1/run/config.yaml").read_text())
    second = yaml.safe_load((whole / "round-2/run/config.yaml").read_text())
    assert (first["model"], first["ref_model"]) == (toy["model"], None)  # the policy as loaded is π_0
    assert (second["model"], second["ref_model"]) == (str(whole / "round-1/run/final"), toy["model"])
    assert second["ref_cache"] == str(whole / "ref-cache")
    # Round 1 starts at π = π_ref (loss ln 2); round 2 starts from round 1's policy but against π_0: not ln 2.
    assert records(whole / "round-1/run")[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert records(whole / "round-2/run")[0]["loss"] != pytest.approx(0.6931472, abs=1e-4)


@contextmanager
def stopped_at_step(n: int, trainer: str = "recipe"):
    """Interrupt (a Ctrl-C) once the n-th optimizer step of the whole iteration is done, counting every round's;
    `trainer`: the module whose `after_step` hook counts them (recipe for dpo, rloo)."""
    module = importlib.import_module(f"preftune.{trainer}")
    done = []

    def interrupt(step: int) -> None:
        done.append(step)
        if len(done) == n:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "after_step", interrupt)
        yield


def test_resume_in_the_middle_of_a_rounds_training_gives_the_same_result(toy, whole, tmp_path, capsys):
    out = tmp_path / "stopped"
    with stopped_at_step(3):  # round 2, after its step 1 (checkpointed: --save-every 1)
        assert main(flags(toy, out, "--no-report")) == 130
    assert (out / "round-1/round.json").exists() and (out / "round-2/samples.json").exists()
    assert not (out / "round-2/train.json").exists()
    assert (out / "round-2/run/checkpoints/step-00000001").is_dir()
    samples_before = (out / "round-2/samples.jsonl").read_bytes()
    capsys.readouterr()
    assert main(flags(toy, out, "--no-report", "--resume")) == 0
    log = capsys.readouterr().err  # preftune logs to stderr
    assert "resumed from" in log and "(step 1 of 2)" in log  # not from step 0
    assert "reference log-probs: reused" in log and "reference log-probs: computed" not in log  # computed once
    assert "round 2 sampled" not in log and "iterate: round 1 of 2" not in log
    assert (out / "round-2/samples.jsonl").read_bytes() == samples_before  # not sampled again
    for r in (1, 2):
        run, expected = out / f"round-{r}/run", whole / f"round-{r}/run"
        assert_same_run(records(run), records(expected), pairs_per_step=2)
        assert_same_weights(run, expected)
    got, want = read(out / "iterate.json")["rounds"], read(whole / "iterate.json")["rounds"]
    for a, b in zip(got, want):
        for key in ("reward", "reward_se", "start_reward", "kl", "kl_se", "win_rate", "sample_reward"):
            assert a[key] == pytest.approx(b[key], rel=RUN_TOL, abs=RUN_TOL), key
        assert a["pairs"] | {"seconds": 0} == b["pairs"] | {"seconds": 0}


def test_resume_of_a_finished_run_redoes_nothing_and_more_rounds_continue_it(toy, whole, tmp_path):
    import shutil

    out = shutil.copytree(whole, tmp_path / "copy")
    marker = (out / "round-2/round.json").stat().st_mtime_ns
    assert main(flags(toy, out, "--resume")) == 0
    assert (out / "round-2/round.json").stat().st_mtime_ns == marker
    assert read(out / "iterate.json")["rounds"] == read(whole / "iterate.json")["rounds"]
    assert main(flags(toy, out, "--resume", "--rounds", "3")) == 0  # --rounds may change
    rounds = read(out / "iterate.json")["rounds"]
    assert [s["round"] for s in rounds] == [1, 2, 3] and rounds[:2] == read(whole / "iterate.json")["rounds"]
    assert yaml.safe_load((out / "round-3/run/config.yaml").read_text())["model"] == str(out / "round-2/run/final")
    assert read(out / "iterate-config.json")["rounds"] == 3


def save_reward_folder(folder: Path, tokenizer) -> Path:
    """A random one-logit Llama classifier with its tokenizer: a reward model folder."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(1)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),
        num_labels=1,
    )
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_chat_prompts_all_pairs_a_reward_folder_and_the_previous_policy_as_reference(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = build_model(len(tokenizer))
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    reward = save_reward_folder(tmp_path / "rm", tokenizer)
    chat = [{"prompt": [{"role": "user", "content": q}]} for q in ("hi", "what color is the sky ?", "tell me a joke")]
    prompts = write_jsonl(chat, tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    argv = [
        "iterate",
        *("--model", str(tmp_path / "sft"), "--prompts", str(prompts), "--eval-prompts", str(prompts)),
        *("--reward", str(reward), "--output", str(out), "--rounds", "2", "--samples", "3"),
        *("--pairs", "all", "--min-gap", "0.02", "--reference", "previous", "--max-new-tokens", "5"),
        *("--max-steps", "1", "--batch-size", "2", "--learning-rate", "1e-3", "--no-report", "--device", "cpu"),
    ]
    assert main(argv) == 0
    for r in (1, 2):
        folder = out / f"round-{r}"
        rows, written, counts = (
            read(folder / "samples.jsonl"),
            read(folder / "pairs.jsonl"),
            read(folder / "pairs.json"),
        )
        pairs, expected = build_pairs([x["responses"] for x in rows], [x["rewards"] for x in rows], "all", 0.02)
        assert counts | {"seconds": 0} == expected.to_dict() | {"seconds": 0}
        if not counts["empty"]:
            assert counts["candidates"] == 3 * 3  # k(k − 1)/2 = 3 per prompt
        rendered = [
            tokenizer.apply_chat_template(x["prompt"], tokenize=False, add_generation_prompt=True) for x in rows
        ]
        scores = load_reward(str(reward))(
            [t for t in rendered for _ in range(3)], [y for x in rows for y in x["responses"]]
        )
        assert [y for x in rows for y in x["rewards"]] == pytest.approx(scores, abs=1e-6)
        assert [w["chosen"] for w in written] == [
            [{"role": "assistant", "content": rows[p.prompt]["responses"][p.chosen]}] for p in pairs
        ]
        assert all(w["prompt"] == rows[p.prompt]["prompt"] for w, p in zip(written, pairs))
        config = yaml.safe_load((folder / "run/config.yaml").read_text())
        # --reference previous: the policy as loaded is the reference, round 2 too (no --ref-model).
        assert config["ref_model"] is None
        assert records(folder / "run")[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)


def test_rloo_rounds_train_on_the_samples_and_resume_mid_round(toy, tmp_path):
    def rloo(out: Path, *extra: str) -> int:
        return main(
            [
                *required(toy, out),
                *("--algorithm", "rloo", "--rounds", "2", "--samples", "3", "--max-new-tokens", "6"),
                *("--batch-prompts", "2", "--learning-rate", "1e-3", "--save-every", "1", "--device", "cpu"),
                *("--eval-reward", "iterate_reward:words"),
                *extra,
            ]
        )

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert rloo(whole) == 0
    summary = read(whole / "iterate.json")
    assert [s["round"] for s in summary["rounds"]] == [1, 2] and all(s["pairs"] is None for s in summary["rounds"])
    assert read(whole / "iterate-config.json")["rloo"]["beta"] == 0.05  # RLOO's own default, not train's 0.1
    for r in (1, 2):  # the samples scored by --reward, the evaluations by --eval-reward
        rows, evaluation = read(whole / f"round-{r}/samples.jsonl"), read(whole / f"round-{r}/eval.json")
        assert all(row["rewards"] == total([row["prompt"] + t for t in row["responses"]]) for row in rows)
        assert evaluation["generation"]["reward"]["spec"] == "iterate_reward:words"
        assert not (whole / f"round-{r}/pairs.jsonl").exists()
        assert [rec["step"] for rec in records(whole / f"round-{r}/run")] == [1, 2, 3]  # 6 prompts, 2 per batch
    with stopped_at_step(5, "rloo"):  # round 2, after its second batch (checkpointed: --save-every 1)
        assert rloo(stopped) == 130
    assert not (stopped / "round-2/train.json").exists()
    assert sorted(p.name for p in (stopped / "round-2/run/checkpoints").iterdir()) == ["step-00000002"]
    assert rloo(stopped, "--resume") == 0
    for r in (1, 2):
        run, expected = stopped / f"round-{r}/run", whole / f"round-{r}/run"
        assert_same_run(records(run), records(expected), pairs_per_step=6)
        assert_same_weights(run, expected)


# ------------------------------------------------------------------------------------------- mistakes


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples", "1"], "--samples must be at least 2"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--min-gap", "-1"], "--min-gap must be zero or positive"),
        (["--temperature", "0"], "--temperature must be greater than 0"),
        (["--epsilon", "0.2"], "--epsilon has no effect with --algorithm dpo"),
        (["--algorithm", "rloo", "--pairs", "all"], "--pairs has no effect with --algorithm rloo"),
        (["--algorithm", "rloo", "--loss", "ipo"], "--loss has no effect with --algorithm rloo"),
        (["--algorithm", "rloo", "--epsilon", "1.5"], "--epsilon 1.5: expected in (0, 1)"),
        (["--loss", "plackett_luce"], "--loss plackett_luce: not supported by preftune iterate"),
        (["--loss", "nope"], "--loss: unknown loss 'nope'"),
        (["--label-smoothing", "0.1", "--loss", "ipo"], "--label-smoothing has no effect with --loss ipo"),
        (["--reward", "no_such_module:f"], "cannot import module 'no_such_module'"),
        (["--pairs", "best"], "argument --pairs: invalid choice"),
    ],
)
def test_bad_flags_give_one_line_and_write_nothing(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main([*required(toy, out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_missing_files_and_folders(toy, whole, tmp_path, capsys):
    def error(*extra: str, out: Path = tmp_path / "out") -> str:
        assert main([*flags(toy, out), *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert f"--prompts {tmp_path}/none.jsonl: no such file" in error("--prompts", str(tmp_path / "none.jsonl"))
    assert f"--eval-prompts {tmp_path}/none.jsonl: no such file" in error(
        "--eval-prompts", str(tmp_path / "none.jsonl")
    )
    assert main(["iterate", "--prompts", toy["prompts"]]) == 2
    assert "the following arguments are required: --model, --eval-prompts" in capsys.readouterr().err
    assert "--resume: no iterate run to resume in" in error("--resume")
    assert "folder is not empty; pass --resume" in error(out=whole)
    assert "--resume: option --beta is 0.2 but the run in" in error("--resume", "--beta", "0.2", out=whole)
    assert "--resume: option --samples is 4 but" in error("--resume", "--samples", "4", out=whole)


def test_a_round_with_fewer_pairs_than_one_step_stops_with_one_line(toy, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(flags(toy, out, "--batch-size", "64")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "fewer than one optimizer step (--batch-size 64 × --grad-accum 1 = 64)" in err[-1]
    assert err[-1].startswith("preftune: error: round 1: ")
    # The samples stay: a --resume with the same settings reuses them (a smaller --batch-size is another run).
    assert (out / "round-1/samples.json").exists() and not (out / "round-1/pairs.json").exists()

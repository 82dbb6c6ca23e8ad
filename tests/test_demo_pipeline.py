"""`run_stages` end to end at a size far below `--quick`: every file is written and well-formed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.data.formats import load_pairs
from preftune.demo import pipeline, sentiment
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
)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    threads = torch.get_num_threads()
    result = pipeline.run_stages(tmp_path_factory.mktemp("demo") / "out", sizes=TINY)
    assert torch.get_num_threads() == threads  # the one-thread setting does not leak out
    return result


def test_returns_every_path_and_stage(demo):
    out = demo["corpus"].parent
    assert set(demo) == {"corpus", "sft", "train_pairs", "heldout_pairs", "prompts", "run", "stages"}
    assert demo["sft"] == out / "sft" and demo["run"] == out / "dpo"
    assert list(demo["stages"]) == ["corpus", "sft", "pairs", "dpo"]
    for stage in demo["stages"].values():
        assert stage["seconds"] >= 0 and stage["cpu_seconds"] >= 0 and "→" in stage["summary"]
    assert json.loads((out / "stages.json").read_text()) == json.loads(json.dumps(demo["stages"]))


def test_corpus_and_sft_folder(demo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert demo["corpus"].read_text(encoding="utf-8").splitlines() == sentiment.reviews(TINY.reviews, TINY.seed)
    tokenizer = AutoTokenizer.from_pretrained(demo["sft"])
    model = AutoModelForCausalLM.from_pretrained(demo["sft"])
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tokenizer)
    assert len(tokenizer) == demo["stages"]["sft"]["vocab"]
    assert (demo["sft"] / "model.safetensors").exists()
    assert model.generation_config.do_sample and model.generation_config.top_k == 0  # plain sampling, no top-k


def test_pairs_are_well_formed_and_labelled_as_reported(demo):
    train, heldout = read_jsonl(demo["train_pairs"]), read_jsonl(demo["heldout_pairs"])
    report = demo["stages"]["pairs"]["train"]
    assert len(train) == report["pairs"]
    assert report["pairs"] + report["identical_skipped"] + report["empty_skipped"] == TINY.train_prompts
    prompts = sentiment.prompts(TINY.train_prompts, seed=TINY.seed + 1)
    for row in train + heldout:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"] and row["chosen"].strip() and row["rejected"].strip()
        assert 2 <= len(row["prompt"].split(" ")) <= 4
    remaining = iter(prompts)  # rows keep the prompts' order, minus the skipped ones
    assert all(r["prompt"] in remaining for r in train)
    # The report's disagreements are the rows whose chosen scores below its rejected.
    chosen = sentiment.score([r["prompt"] + r["chosen"] for r in train])
    rejected = sentiment.score([r["prompt"] + r["rejected"] for r in train])
    assert sum(c < r for c, r in zip(chosen, rejected)) == report["disagreements"]
    assert sum(c == r for c, r in zip(chosen, rejected)) == report["ties"]
    # preftune reads them as they are: nothing skipped.
    pairs, load_report = load_pairs(str(demo["train_pairs"]))
    assert len(pairs) == len(train) and load_report.identical_skipped == 0
    heldout_prompts = sentiment.prompts(TINY.heldout_prompts, seed=TINY.seed + 2, heldout=True)
    assert read_jsonl(demo["prompts"]) == [{"prompt": p} for p in heldout_prompts]
    assert {r["prompt"] for r in heldout} <= set(heldout_prompts)
    assert not {r["prompt"] for r in train} & set(heldout_prompts)


def test_dpo_ran_through_the_training_path(demo):
    run = demo["run"]
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and "eval/rewards/accuracies" in records[-1]
    assert records[0]["rewards/accuracies"] == 0.0  # π = π_ref: the cached reference's rounding gives ties, no wins
    assert (run / "final" / "model.safetensors").exists() and (run / "final" / "tokenizer.json").exists()
    config = (run / "config.yaml").read_text()
    assert "beta: 0.1" in config and f"model: {demo['sft']}" in config
    assert list((demo["corpus"].parent / "ref-cache").glob("*.npy"))  # the demo's cache stays in its folder


def test_refuses_a_used_output_folder(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        pipeline.run_stages(tmp_path, sizes=TINY)
    with pytest.raises(UserError, match="not a folder"):
        pipeline.run_stages(tmp_path / "old.txt", sizes=TINY)

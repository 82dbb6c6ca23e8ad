"""The demo's SFT stage: tokenizer ids, LM batches, the learning-rate schedule and temperature-1 sampling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from preftune.demo import sft

CORPUS = ["the plot was good.", "the plot was dull.", "good."]
# Pieces by falling count, ties alphabetically: "." ×3; Ġgood, Ġplot, Ġthe, Ġwas ×2; Ġdull ×1.
DOT, GOOD, PLOT, THE, WAS, DULL = 3, 4, 5, 6, 7, 8


@pytest.fixture(autouse=True)
def _one_thread():
    with sft.one_cpu_thread():  # a busy shared CPU makes two spinning threads far slower than one
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return sft.build_tokenizer(CORPUS)


def test_tokenizer_ids_by_hand(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(9))) == [
        "<unk>",
        "<s>",
        "</s>",
        ".",
        "Ġgood",
        "Ġplot",
        "Ġthe",
        "Ġwas",
        "Ġdull",
    ]
    assert tokenizer("the plot was dull.")["input_ids"] == [1, THE, PLOT, WAS, DULL, DOT]
    # preftune tokenizes prompt + response + EOS: the response keeps its leading space and EOS stays one token.
    assert tokenizer("the plot was" + " good." + "</s>")["input_ids"] == [1, THE, PLOT, WAS, GOOD, DOT, 2]
    assert tokenizer("the movie")["input_ids"] == [1, THE, 0]  # unknown word → <unk>
    assert tokenizer.decode([GOOD, DOT]) == " good."  # a response decodes with its space: prompt + response
    assert tokenizer.pad_token is None and tokenizer.eos_token_id == sft.EOS_ID


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("the plot was good.</s>")["input_ids"] == [1, THE, PLOT, WAS, GOOD, DOT, 2]
    assert loaded.decode([DULL, DOT]) == " dull."


def test_encode_and_lm_batch(tokenizer):
    sequences = sft.encode(["good.", "the plot was dull."], tokenizer)
    assert sequences == [[1, GOOD, DOT, 2], [1, THE, PLOT, WAS, DULL, DOT, 2]]
    batch = sft.lm_batch(sequences)
    assert batch["input_ids"].tolist() == [[1, GOOD, DOT, 2, 2, 2, 2], [1, THE, PLOT, WAS, DULL, DOT, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    # The first EOS is a target (the model must learn to stop); the padding EOS are not.
    assert batch["labels"].tolist() == [[1, GOOD, DOT, 2, -100, -100, -100], [1, THE, PLOT, WAS, DULL, DOT, 2]]


def test_learning_rate_schedule():
    # 100 steps: warmup 5 steps (peak·(s+1)/5), then cosine from the peak down to 10% of it.
    assert sft.learning_rate(0, 100, 1.0) == pytest.approx(0.2)
    assert sft.learning_rate(4, 100, 1.0) == pytest.approx(1.0)
    assert sft.learning_rate(5, 100, 1.0) == pytest.approx(1.0)
    assert sft.learning_rate(100, 100, 1.0) == pytest.approx(0.1)
    # 105 steps: warmup 5, step 55 is half-way through the cosine: 0.1 + 0.9 · ½(1 + cos π/2) = 0.55.
    assert sft.learning_rate(55, 105, 1.0) == pytest.approx(0.55)


class ScriptedLM(torch.nn.Module):
    """A causal LM stand-in whose next token is fixed by the last one: the plot was good . </s> (then </s>)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.next = {THE: PLOT, PLOT: WAS, WAS: GOOD, GOOD: DOT, DOT: 2}

    def forward(self, input_ids, use_cache=False, cache=None):
        logits = torch.full((*input_ids.shape, self.vocab_size), -1e4)
        for b, t in ((b, t) for b in range(input_ids.shape[0]) for t in range(input_ids.shape[1])):
            logits[b, t, self.next.get(int(input_ids[b, t]), 2)] = 0.0
        return SimpleNamespace(logits=logits, cache=None)


def test_sample_follows_the_model_groups_lengths_and_stops_at_eos(tokenizer):
    model = ScriptedLM(len(tokenizer))
    prompts = ["the plot was", "the", "the plot the", "the plot"]  # token lengths 4, 2, 4, 3
    samples = sft.sample(model, tokenizer, prompts, max_new_tokens=8, seed=0)
    assert [s.ids for s in samples] == [[GOOD, DOT], [PLOT, WAS, GOOD, DOT], [PLOT, WAS, GOOD, DOT], [WAS, GOOD, DOT]]
    assert [s.text for s in samples] == [" good.", " plot was good.", " plot was good.", " was good."]
    assert all(s.finished for s in samples)
    cut = sft.sample(model, tokenizer, ["the"], max_new_tokens=3, seed=0)[0]
    assert (cut.ids, cut.text, cut.finished) == ([PLOT, WAS, GOOD], " plot was good", False)


def test_sample_is_seeded_on_a_real_model(tokenizer):
    model = sft.build_model(len(tokenizer), hidden=32, seed=0)
    first = sft.sample(model, tokenizer, ["the plot", "the"] * 4, max_new_tokens=6, seed=3)
    again = sft.sample(model, tokenizer, ["the plot", "the"] * 4, max_new_tokens=6, seed=3)
    other = sft.sample(model, tokenizer, ["the plot", "the"] * 4, max_new_tokens=6, seed=4)
    assert [s.ids for s in first] == [s.ids for s in again] != [s.ids for s in other]
    for s in first:
        assert sft.EOS_ID not in s.ids and s.text == tokenizer.decode(s.ids)
        assert s.finished == (len(s.ids) < 6)  # EOS took one of the 6 places


def test_train_lm_lowers_the_loss(tokenizer):
    model = sft.build_model(len(tokenizer), hidden=32, seed=0)
    report = sft.train_lm(model, sft.encode(CORPUS, tokenizer), steps=30, batch_size=4, lr=1e-2, seed=0)
    # Random start: about ln(9) ≈ 2.2 nats/token over 9 tokens; three short texts are soon nearly memorised.
    assert report.first_loss == pytest.approx(2.2, abs=0.3)
    assert report.last_loss < 0.8
    assert not model.training

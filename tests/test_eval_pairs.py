"""Held-out pair metrics: hand-worked summaries, length buckets, and model log-probs against a naive loop."""

from __future__ import annotations

import pytest
import torch

from preftune.data.tokenize import TokenizedPair
from preftune.evaluation.pairs import (
    bucket_bounds,
    bucket_label,
    pair_eval,
    pair_logps,
    quartile_edges,
    summarize_pairs,
)

PAD = 2  # the tiny tokenizer's EOS, which preftune pads with


def test_summary_counts_ties_apart_from_wins():
    # β = 0.5. Pair 0: chosen reward 0.5·(−3 − (−4)) = 0.5, rejected 0.5·(−5 − (−4)) = −0.5 → a win, margin 1.
    #          Pair 1: chosen 0.5·(−2 − (−1)) = −0.5, rejected 0.5·(−2 − (−1)) = −0.5 → a tie, margin 0.
    result = summarize_pairs([-3.0, -2.0], [-5.0, -2.0], [-4.0, -1.0], [-4.0, -1.0], [4, 8], beta=0.5, length_edges=[5])
    assert (result["pairs"], result["wins"], result["ties"], result["losses"]) == (2, 1, 1, 0)
    assert result["rewards/accuracies"] == 0.5 and result["rewards/ties"] == 0.5
    # margins 1 and 0: mean 0.5, s = √((0.5² + 0.5²) / 1) = 0.7071, SE = s / √2 = 0.5
    assert result["rewards/margins"] == 0.5 and result["rewards/margins_se"] == pytest.approx(0.5)
    assert result["rewards/chosen"] == 0.0 and result["rewards/rejected"] == -0.5
    assert result["logps/chosen"] == -2.5 and result["logps/rejected"] == -3.5
    by_length = result["by_length"]
    assert by_length["edges"] == [5] and by_length["measure"] == "chosen + rejected response tokens"
    low, high = by_length["buckets"]
    assert (low["tokens"], low["min_tokens"], low["max_tokens"], low["pairs"]) == ("≤ 5", None, 5, 1)
    assert (low["wins"], low["ties"], low["rewards/margins"]) == (1, 0, 1.0)
    assert (high["tokens"], high["min_tokens"], high["max_tokens"], high["pairs"]) == ("≥ 6", 6, None, 1)
    assert (high["rewards/accuracies"], high["rewards/ties"]) == (0.0, 1.0)


def test_a_loss_is_neither_win_nor_tie():
    result = summarize_pairs([-4.0], [-1.0], [-2.0], [-2.0], [3], beta=1.0)  # chosen −2, rejected +1
    assert (result["wins"], result["ties"], result["losses"]) == (0, 0, 1)
    assert result["rewards/margins"] == -3.0 and result["rewards/margins_se"] is None


def test_fixed_edges_keep_empty_buckets():
    result = summarize_pairs([0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2, [3, 4], beta=0.1, length_edges=[10, 20])
    buckets = result["by_length"]["buckets"]
    assert [b["tokens"] for b in buckets] == ["≤ 10", "11–20", "≥ 21"]
    assert [b["pairs"] for b in buckets] == [2, 0, 0]
    assert buckets[1]["rewards/accuracies"] is None and buckets[1]["rewards/margins"] is None


@pytest.mark.parametrize(
    "lengths, edges",
    [
        ([2, 3, 4, 5, 6, 7, 8, 9], [3, 5, 7]),  # 2nd, 4th and 6th smallest: buckets {2,3} {4,5} {6,7} {8,9}
        ([9, 2, 8, 3, 7, 4, 6, 5], [3, 5, 7]),  # order does not matter
        ([1, 1, 1, 10], [1]),  # quartiles 1, 1, 1 collapse: buckets {1,1,1} and {10}
        ([5, 5, 5], []),  # one length: one bucket, no edge at the maximum
        ([], []),
    ],
)
def test_quartile_edges(lengths, edges):
    assert quartile_edges(lengths) == edges


def test_bucket_bounds_and_labels():
    assert bucket_bounds([3, 5]) == [(None, 3), (4, 5), (6, None)]
    assert [bucket_label(lo, hi) for lo, hi in bucket_bounds([3, 4])] == ["≤ 3", "4", "≥ 5"]
    assert bucket_label(None, None) == "all"


# ------------------------------------------------------------------------------------------- with models


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=len(tiny_tokenizer),
        )
        out.append(LlamaForCausalLM(config).eval())
    return out


# Ids of the tiny tokenizer (tests/conftest.py): <s>=1 </s>=2 ":"=7 Q=12 A=13 hi=16 there=17 good=18 bad=19 ...
PAIRS = [
    TokenizedPair([1, 12, 7, 16, 13, 7], [18, 2], [19, 2], "pair 0"),
    TokenizedPair([1, 16, 17], [18, 18, 18, 2], [19, 2], "pair 1"),
    TokenizedPair([1, 12, 7, 20, 21, 22, 23, 24, 13, 7], [25, 26, 27, 2], [28, 29, 30, 31, 32, 2], "pair 2"),
]


def naive_logp(model, prompt: list[int], response: list[int]) -> float:
    """Σ log p(response token | everything before it), one unpadded sequence at a time."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    return sum(logprobs[len(prompt) + k - 1, token].item() for k, token in enumerate(response))


def test_pair_logps_match_a_naive_loop(models):
    policy, reference = models
    logps = pair_logps(policy, reference, PAIRS, pad_id=PAD, batch_size=2)  # batches of 2 and 1: padding varies
    for i, pair in enumerate(PAIRS):
        assert logps["policy_chosen"][i] == pytest.approx(
            naive_logp(policy, pair.prompt_ids, pair.chosen_ids), abs=1e-4
        )
        assert logps["ref_rejected"][i] == pytest.approx(
            naive_logp(reference, pair.prompt_ids, pair.rejected_ids), abs=1e-4
        )
    assert logps["lengths"] == [2 + 2, 4 + 2, 4 + 6]


def test_pair_eval_against_hand_computation(models):
    policy, reference = models
    beta = 0.1
    chosen = [
        beta * (naive_logp(policy, p.prompt_ids, p.chosen_ids) - naive_logp(reference, p.prompt_ids, p.chosen_ids))
        for p in PAIRS
    ]
    rejected = [
        beta * (naive_logp(policy, p.prompt_ids, p.rejected_ids) - naive_logp(reference, p.prompt_ids, p.rejected_ids))
        for p in PAIRS
    ]
    result = pair_eval(policy, reference, PAIRS, pad_id=PAD, beta=beta, batch_size=2)
    assert all(abs(c - r) > 1e-4 for c, r in zip(chosen, rejected))  # no near-tie for float noise to flip
    wins = sum(c > r for c, r in zip(chosen, rejected))
    assert (result["wins"], result["ties"], result["losses"]) == (wins, 0, 3 - wins)
    assert result["rewards/chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-5)
    assert result["rewards/margins"] == pytest.approx(sum(c - r for c, r in zip(chosen, rejected)) / 3, abs=1e-5)
    # lengths 4, 6, 10 → quartile edges [4, 6]: one pair per bucket
    assert result["by_length"]["edges"] == [4, 6]
    assert [b["pairs"] for b in result["by_length"]["buckets"]] == [1, 1, 1]


def test_a_model_against_itself_gives_only_ties(models):
    policy = models[0]
    result = pair_eval(policy, policy, PAIRS, pad_id=PAD)
    assert (result["wins"], result["ties"], result["losses"]) == (0, 3, 0)
    assert result["rewards/accuracies"] == 0.0 and result["rewards/ties"] == 1.0
    assert result["rewards/margins"] == 0.0 and result["rewards/chosen"] == 0.0


def test_reference_log_probs_looked_up_by_pair_position(models):
    """A cached reference (training's `CachedReference`) is any object with .logps(batch), keyed by batch.index."""
    policy = models[0]
    cached = torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]])  # (chosen, rejected) per pair

    class Cached:
        def __init__(self):
            self.seen: list[list[int]] = []

        def logps(self, batch):
            self.seen.append(batch.index.tolist())
            rows = cached[batch.index]
            return rows[:, 0], rows[:, 1]

    reference = Cached()
    policy.train()  # training calls this mid-run: dropout goes off during the evaluation and comes back after
    result = pair_eval(policy, reference, PAIRS, pad_id=PAD, beta=1.0, batch_size=2)
    assert policy.training
    policy.eval()
    assert reference.seen == [[0, 1], [2]]
    expected = [naive_logp(policy, p.prompt_ids, p.chosen_ids) - c for p, c in zip(PAIRS, (-1.0, -3.0, -5.0))]
    assert result["rewards/chosen"] == pytest.approx(sum(expected) / 3, abs=1e-4)

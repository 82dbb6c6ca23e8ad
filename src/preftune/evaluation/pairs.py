"""Held-out pair metrics: preference accuracy (ties apart), margins and implicit rewards, overall and per
response-length bucket.

Per pair, with log-probs summed over response tokens (DESIGN.md, "The math in one place"):

    chosen_reward   = β·(log π(y_w|x) − log π_ref(y_w|x))
    rejected_reward = β·(log π(y_l|x) − log π_ref(y_l|x))
    margin          = chosen_reward − rejected_reward

A pair is a tie when |margin| is within the rounding of its log-probs (`losses.tie_band`: β·1e-5·(|πw| + |rw| +
|πl| + |rl|); a model against itself gives only ties), a win when the margin is above that, a loss below.
`rewards/accuracies` is wins / pairs, as in training's metrics (a tie is not a win); `rewards/ties` is ties /
pairs, reported on its own.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from preftune.data.batching import PaddedBatch, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.evaluation.stats import mean_se
from preftune.logps import compute_logps
from preftune.losses import tie_band

LENGTH_MEASURE = "chosen + rejected response tokens"
T = TypeVar("T", int, float)
ReferenceLogps = Callable[[PaddedBatch], tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------- length buckets


def quartile_edges(lengths: Sequence[T]) -> list[T]:
    """Bucket edges at the quartiles of `lengths` (nearest rank: the ⌈q·n/4⌉-th smallest, q = 1, 2, 3).

    Repeated edges collapse, and edges at or above the longest length go (their last bucket would be empty), so
    every bucket holds a pair. e.g. [2, 3, 4, 5, 6, 7, 8, 9] → [3, 5, 7]: buckets ≤ 3, 4–5, 6–7, ≥ 8. Any
    ordered values work (distance.py buckets float distances with it).
    """
    if not lengths:
        return []
    ordered = sorted(lengths)
    n = len(ordered)
    edges = sorted({ordered[math.ceil(q * n / 4) - 1] for q in (1, 2, 3)})
    return [e for e in edges if e < ordered[-1]]


def bucket_index(length: T, edges: Sequence[T]) -> int:
    """Bucket k holds lengths in (edges[k−1], edges[k]]; the first has no lower edge, the last no upper one."""
    return bisect_left(edges, length)


def bucket_members(values: Sequence[T], edges: Sequence[T]) -> list[list[int]]:
    """Indices of `values` per bucket of `edges` (see `bucket_index`), len(edges) + 1 lists, some maybe empty."""
    members: list[list[int]] = [[] for _ in range(len(edges) + 1)]
    for i, value in enumerate(values):
        members[bucket_index(value, edges)].append(i)
    return members


def bucket_bounds(edges: Sequence[int]) -> list[tuple[int | None, int | None]]:
    """(min_tokens, max_tokens), inclusive, per bucket; None for an open end. [3, 5] → (None, 3), (4, 5), (6, None)."""
    lows = [None] + [e + 1 for e in edges]
    highs = list(edges) + [None]
    return list(zip(lows, highs))


def bucket_label(low: int | None, high: int | None) -> str:
    if low is None and high is None:
        return "all"
    if low is None:
        return f"≤ {high}"
    if high is None:
        return f"≥ {low}"
    return f"{low}" if low == high else f"{low}–{high}"


# ------------------------------------------------------------------------------------------- summaries


def pair_rewards(
    policy_chosen_logps: Sequence[float],
    policy_rejected_logps: Sequence[float],
    ref_chosen_logps: Sequence[float],
    ref_rejected_logps: Sequence[float],
    beta: float,
) -> tuple[list[float], list[float], list[float]]:
    """(chosen rewards, rejected rewards, tie bands) per pair: one definition of a win and a tie for every
    grouping of the pairs (by length here, by distance from the training prompts in distance.py)."""
    chosen = [beta * (p - r) for p, r in zip(policy_chosen_logps, ref_chosen_logps)]
    rejected = [beta * (p - r) for p, r in zip(policy_rejected_logps, ref_rejected_logps)]
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    bands = tie_band(
        *map(as_tensor, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)), beta
    ).tolist()
    return chosen, rejected, bands


def group_metrics(chosen_rewards: Sequence[float], rejected_rewards: Sequence[float], bands: Sequence[float]) -> dict:
    """Accuracy, ties, margin ± SE and mean rewards of a group of pairs (all of them, or one bucket)."""
    n = len(chosen_rewards)
    wins = sum(c - r > band for c, r, band in zip(chosen_rewards, rejected_rewards, bands))
    ties = sum(abs(c - r) <= band for c, r, band in zip(chosen_rewards, rejected_rewards, bands))
    margin, margin_se = mean_se([c - r for c, r in zip(chosen_rewards, rejected_rewards)])
    return {
        "pairs": n,
        "rewards/accuracies": wins / n if n else None,
        "rewards/ties": ties / n if n else None,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "rewards/margins": margin,
        "rewards/margins_se": margin_se,
        "rewards/chosen": mean_se(chosen_rewards)[0],
        "rewards/rejected": mean_se(rejected_rewards)[0],
    }


def summarize_pairs(
    policy_chosen_logps: Sequence[float],
    policy_rejected_logps: Sequence[float],
    ref_chosen_logps: Sequence[float],
    ref_rejected_logps: Sequence[float],
    lengths: Sequence[int],
    *,
    beta: float,
    length_edges: Sequence[int] | None = None,
) -> dict:
    """Pair metrics from per-pair summed log-probs (each a sequence of n numbers) and response lengths
    (chosen + rejected tokens, n ints). `length_edges` None → quartile edges of `lengths`.

    e.g. β = 0.5, policy (c, r) = (−3, −5), (−2, −2); reference (−4, −4), (−1, −1); lengths 4, 8, edges [5]
    → chosen rewards 0.5, −0.5; rejected −0.5, −0.5 → one win, one tie: accuracy 0.5, ties 0.5, margin 0.5;
    bucket ≤ 5 holds the win, bucket ≥ 6 the tie.
    """
    chosen, rejected, bands = pair_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    edges = sorted(set(length_edges)) if length_edges is not None else quartile_edges(lengths)
    result = {
        "beta": beta,
        **group_metrics(chosen, rejected, bands),
        "logps/chosen": mean_se(policy_chosen_logps)[0],
        "logps/rejected": mean_se(policy_rejected_logps)[0],
    }
    buckets = []
    for (low, high), members in zip(bucket_bounds(edges), bucket_members(lengths, edges)):
        group = group_metrics([chosen[i] for i in members], [rejected[i] for i in members], [bands[i] for i in members])
        buckets.append({"tokens": bucket_label(low, high), "min_tokens": low, "max_tokens": high, **group})
    result["by_length"] = {"measure": LENGTH_MEASURE, "edges": edges, "buckets": buckets}
    return result


# ------------------------------------------------------------------------------------------- models


@contextmanager
def eval_mode(*models: torch.nn.Module):
    """Dropout off for the duration, each model's train/eval state restored after (training calls this mid-run)."""
    states = [(m, m.training) for m in models if isinstance(m, torch.nn.Module)]
    for m, _ in states:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in states:
            m.train(was_training)


def reference_logps_fn(reference) -> ReferenceLogps:
    """batch → (ref_chosen_logps, ref_rejected_logps) from a model, an object with `.logps(batch)` (training's
    `ReferenceModel` or `CachedReference`, which looks pairs up by `batch.index`), or such a function itself."""
    if isinstance(reference, torch.nn.Module):
        return lambda batch: compute_logps(reference, batch)[:2]
    if hasattr(reference, "logps"):
        return reference.logps
    if callable(reference):
        return reference
    raise TypeError(f"reference must be a model, have .logps(batch), or be callable; got {type(reference).__name__}")


@torch.no_grad()
def pair_logps(
    policy: torch.nn.Module, reference, pairs: Sequence[TokenizedPair], *, pad_id: int, batch_size: int = 8
) -> dict[str, list]:
    """Per-pair summed log-probs of policy and reference, plain padded layout, no gradients.

    Pairs are indexed by their position in `pairs` (what a `CachedReference` of the same pairs expects).
    → {"policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected": n floats; "lengths": n ints}
    """
    device = next(policy.parameters()).device
    ref_fn = reference_logps_fn(reference)
    out: dict[str, list] = {
        k: [] for k in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "lengths")
    }
    with eval_mode(policy, reference):
        for start in range(0, len(pairs), batch_size):
            indices = list(range(start, min(start + batch_size, len(pairs))))
            batch = collate_padded([pairs[i] for i in indices], indices, pad_id).to(device)
            chosen, rejected, chosen_lengths, rejected_lengths = compute_logps(policy, batch)
            ref_chosen, ref_rejected = ref_fn(batch)
            for key, values in (
                ("policy_chosen", chosen),
                ("policy_rejected", rejected),
                ("ref_chosen", ref_chosen),
                ("ref_rejected", ref_rejected),
                ("lengths", chosen_lengths + rejected_lengths),
            ):
                out[key].extend(values.tolist())
    return out


def pair_eval(
    policy: torch.nn.Module,
    reference,
    pairs: Sequence[TokenizedPair],
    *,
    pad_id: int,
    beta: float = 0.1,
    batch_size: int = 8,
    length_edges: Sequence[int] | None = None,
) -> dict:
    """Held-out pair metrics of `policy` against `reference` (a model, or see `reference_logps_fn`) on tokenized
    pairs: see `summarize_pairs` for the keys. Independent of training's setup, so training can call it between
    steps: models are put in eval mode and restored."""
    logps = pair_logps(policy, reference, pairs, pad_id=pad_id, batch_size=batch_size)
    return summarize_pairs(
        logps["policy_chosen"],
        logps["policy_rejected"],
        logps["ref_chosen"],
        logps["ref_rejected"],
        logps["lengths"],
        beta=beta,
        length_edges=length_edges,
    )

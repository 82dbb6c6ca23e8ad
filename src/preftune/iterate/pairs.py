"""k scored responses per prompt → preference pairs for one round of `preftune iterate`, every skip counted.
Pure Python: no model, no files.

For each prompt, the responses with visible text (an empty or whitespace-only response takes part in no pair:
training refuses it) give the candidates:

    best-worst   one: the highest reward (the first of equals) against the lowest (the first of equals)
    all          every unordered pair {i, j}, i < j, of the k (k(k − 1)/2 candidates), oriented so that the
                 response with the higher reward is chosen

A candidate whose reward gap |r_i − r_j| is 0 is a tie, one with 0 < gap ≤ min_gap a near tie: both are skipped
and counted, as is a candidate whose two texts are identical (a reward that scored one text twice differently).
e.g. rewards [3, 1, 3, 0] with min_gap 1: best-worst → (0 over 3); all → (0 over 1), (0 over 3), (2 over 1),
(2 over 3), with (0, 2) a tie and (1, 3) a near tie.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

HOW = ("best-worst", "all")


@dataclass(frozen=True)
class Pair:
    """Responses `chosen` and `rejected` (indices among the prompt's k) of prompt `prompt`."""

    prompt: int
    chosen: int
    rejected: int
    chosen_reward: float
    rejected_reward: float


@dataclass
class PairCounts:
    prompts: int = 0
    responses: int = 0
    empty: int = 0  # responses without visible text: in no pair
    candidates: int = 0  # pairs considered
    pairs: int = 0  # pairs built
    ties: int = 0  # candidates skipped: equal rewards
    near_ties: int = 0  # candidates skipped: 0 < gap ≤ min_gap
    identical: int = 0  # candidates skipped: the same text twice
    prompts_all_tied: int = 0  # prompts with ≥ 2 usable responses whose rewards are all equal
    prompts_without_pair: int = 0  # prompts that gave no pair, for whatever reason

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.candidates} candidates of {self.prompts} prompts; skipped "
            f"{self.ties} ties, {self.near_ties} near ties, {self.identical} identical; {self.empty} empty "
            f"responses; {self.prompts_without_pair} prompts without a pair ({self.prompts_all_tied} all tied)"
        )


def _candidates(usable: list[int], rewards: Sequence[float], how: str) -> list[tuple[int, int]]:
    """(i, j) index pairs to consider, i the higher (or equal) reward."""
    if how == "best-worst":
        best = max(usable, key=lambda i: (rewards[i], -i))  # the first of equals
        worst = min(usable, key=lambda i: (rewards[i], i))
        return [(best, worst)]
    out = []
    for a, i in enumerate(usable):
        for j in usable[a + 1 :]:
            out.append((i, j) if rewards[i] >= rewards[j] else (j, i))
    return out


def build_pairs(
    texts: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]], how: str = "best-worst", min_gap: float = 0.0
) -> tuple[list[Pair], PairCounts]:
    """texts[p], rewards[p]: the responses of prompt p and their rewards → (pairs in prompt order, counts)."""
    if how not in HOW:
        raise ValueError(f"how must be one of {HOW}, got {how!r}")
    if len(texts) != len(rewards) or any(len(t) != len(r) for t, r in zip(texts, rewards)):
        raise ValueError("texts and rewards must have the same shape")
    counts, pairs = PairCounts(prompts=len(texts)), []
    for p, (responses, scores) in enumerate(zip(texts, rewards)):
        counts.responses += len(responses)
        usable = [i for i, text in enumerate(responses) if text.strip()]
        counts.empty += len(responses) - len(usable)
        built = 0
        if len(usable) >= 2:
            counts.prompts_all_tied += len({scores[i] for i in usable}) == 1
            for i, j in _candidates(usable, scores, how):
                counts.candidates += 1
                gap = scores[i] - scores[j]
                if gap == 0:
                    counts.ties += 1
                elif gap <= min_gap:
                    counts.near_ties += 1
                elif responses[i] == responses[j]:
                    counts.identical += 1
                else:
                    pairs.append(Pair(p, i, j, scores[i], scores[j]))
                    built += 1
        counts.prompts_without_pair += built == 0
        counts.pairs += built
    return pairs, counts

"""Preference labels from a ground-truth reward, noisy the way human labels are (Bradley–Terry sampling).

Two responses y1, y2 to one prompt with rewards r1, r2 are labelled by a coin with

    P(y1 preferred) = σ((r1 − r2) / τ)                       (Bradley–Terry, temperature τ)

the very model DPO assumes of its raters (Eq. 1 of the DPO paper). A small τ gives near-deterministic labels, a
large one coin flips; equal rewards give a fair coin. The labels that prefer the lower-reward response are
counted as disagreements: the noise DPO must see through.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from preftune.demo.sentiment import score

TAU = 0.25  # the demo's label noise (pipeline.Sizes.tau)


def preference_probability(r1: float, r2: float, tau: float) -> float:
    """σ((r1 − r2) / τ): r1 − r2 = τ·ln 3 → 0.75; equal rewards → 0.5."""
    return 1.0 / (1.0 + math.exp(-(r1 - r2) / tau))


def gumbel(text: str) -> float:
    """A standard Gumbel draw fixed by the text (its SHA-256): the same text always gets the same noise."""
    u = (int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") + 0.5) / 2**64
    return -math.log(-math.log(u))


def judge(texts: list[str]) -> list[float]:
    """A labeller with the noise of the demo's human labels, as a `--reward module:function`: r + τ·G per text.
    The difference of two Gumbel draws is logistic, so judge(a) > judge(b) with probability σ((r_a − r_b)/τ): the
    Bradley–Terry labels of `first_preferred` (and the best of k is a Plackett–Luce draw). It stands for a judge
    (people, or a judging model) as good as the labels of the offline pairs, for on-policy rounds."""
    return [r + TAU * gumbel(text) for r, text in zip(score(texts), texts)]


def first_preferred(r1: list[float], r2: list[float], tau: float, rng: random.Random) -> list[bool]:
    """One Bradley–Terry draw per pair: [n] rewards, [n] rewards → [n] (True: the first response wins)."""
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return [rng.random() < preference_probability(a, b, tau) for a, b in zip(r1, r2, strict=True)]


@dataclass
class LabelReport:
    """What `preference_rows` made of the sampled response pairs. Counts are pairs unless named otherwise."""

    pairs: int = 0  # rows written
    identical_skipped: int = 0  # both samples the same text: no preference to express
    empty_skipped: int = 0  # a sample with no text (the model ended at once); preftune refuses empty responses
    ties: int = 0  # equal rewards (labelled by a fair coin, not counted as disagreements)
    disagreements: int = 0  # labels that prefer the lower-reward response
    tau: float = 0.0

    @property
    def disagreement_share(self) -> float:
        return self.disagreements / self.pairs if self.pairs else 0.0

    def summary(self) -> str:
        """e.g. "2001 pairs, labels disagree with the reward on 14% (τ = 0.25), 307 ties; skipped 18 identical,
        29 empty"."""
        return (
            f"{self.pairs} pairs, labels disagree with the reward on {self.disagreement_share:.0%} "
            f"(τ = {self.tau:g}), {self.ties} ties; skipped {self.identical_skipped} identical, "
            f"{self.empty_skipped} empty"
        )


def preference_rows(
    prompts: list[str],
    first: list[str],
    second: list[str],
    first_rewards: list[float],
    second_rewards: list[float],
    *,
    tau: float,
    seed: int,
) -> tuple[list[dict], LabelReport]:
    """Label each (prompt, first, second) and write it as {prompt, chosen, rejected}, skipping (and counting) the
    pairs that cannot be one: identical or empty responses."""
    report = LabelReport(tau=tau)
    wins = first_preferred(first_rewards, second_rewards, tau, random.Random(seed))
    rows = []
    for prompt, a, b, ra, rb, a_wins in zip(prompts, first, second, first_rewards, second_rewards, wins, strict=True):
        if not a.strip() or not b.strip():
            report.empty_skipped += 1
            continue
        if a == b:
            report.identical_skipped += 1
            continue
        report.ties += ra == rb
        report.disagreements += (ra < rb) if a_wins else (rb < ra)
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    report.pairs = len(rows)
    return rows, report

"""Estimators with their uncertainty: mean ± standard error, sequence-level KL, distinct-n, win rate.

Pure Python on lists of numbers (no torch): each function is small enough to check by hand in a test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% normal quantile, Φ⁻¹(0.975).
Z95 = 1.959963984540054


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(mean, standard error of the mean) of n values: SE = s / √n with the sample standard deviation s
    (n − 1 in its denominator). n = 0 → (None, None); n = 1 → (value, None): one value says nothing of spread.

    e.g. [1, 2, 3, 4] → mean 2.5, s² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, SE = √(5/3) / 2 = 0.6455
    """
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def kl_estimate(policy_logps: Sequence[float], ref_logps: Sequence[float]) -> dict:
    """Monte-Carlo KL(π‖π_ref) = E_{y~π}[log π(y|x) − log π_ref(y|x)] from n responses y sampled from π.

    policy_logps[i], ref_logps[i]: log-probs of sample i, summed over its tokens, under the distribution that was
    sampled from (π) and under the reference. The estimate is the mean of the n log-ratios, its SE std/√n. A
    sample the reference gives probability 0 (log-prob −inf, e.g. outside its top-p nucleus) makes the KL
    infinite: the estimate is then None and `infinite` counts such samples.
    → {"kl", "kl_se", "samples", "infinite"}
    """
    if len(policy_logps) != len(ref_logps):
        raise ValueError(f"{len(policy_logps)} policy log-probs but {len(ref_logps)} reference log-probs")
    ratios = [p - r for p, r in zip(policy_logps, ref_logps)]
    infinite = sum(not math.isfinite(x) for x in ratios)
    if infinite:
        return {"kl": None, "kl_se": None, "samples": len(ratios), "infinite": infinite}
    kl, se = mean_se(ratios)
    return {"kl": kl, "kl_se": se, "samples": len(ratios), "infinite": 0}


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float | None:
    """Distinct-n (Li et al. 2016): unique n-grams / all n-grams, pooled over every response (token ids).

    e.g. responses [[5, 6, 5], [5, 7]]: distinct-1 = |{5, 6, 7}| / 5 = 0.6; distinct-2 = |{56, 65, 57}| / 3 = 1.0.
    None when no response has n tokens.
    """
    grams = [tuple(r[i : i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion p̂ = successes / n (Wilson 1927); successes may be fractional.

        centre = (p̂ + z²/2n) / (1 + z²/n),   half-width = z / (1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²)

    Unlike the normal interval it stays inside [0, 1] and is not a single point when p̂ is 0 or 1.
    """
    if n <= 0:
        raise ValueError("a proportion needs n ≥ 1")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(policy_scores: Sequence[float], ref_scores: Sequence[float]) -> dict:
    """Paired win rate of the policy over the reference: one outcome per prompt, 1 if the policy's response
    scores higher, ½ on equal scores, 0 if lower; the rate is their mean, (wins + ties/2) / n.

    The 95% interval is Wilson's on that rate with n prompts. Ties counted half make each outcome one of
    {0, ½, 1}, whose variance is at most the Bernoulli p(1 − p) Wilson assumes, so with ties the interval is
    conservative (a little wide), never too narrow.
    → {"win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "prompts"}
    """
    if len(policy_scores) != len(ref_scores):
        raise ValueError(f"{len(policy_scores)} policy scores but {len(ref_scores)} reference scores")
    n = len(policy_scores)
    if n == 0:
        return {"win_rate": None, "ci_low": None, "ci_high": None, "wins": 0, "ties": 0, "losses": 0, "prompts": 0}
    wins = sum(p > r for p, r in zip(policy_scores, ref_scores))
    ties = sum(p == r for p, r in zip(policy_scores, ref_scores))
    low, high = wilson_interval(wins + ties / 2, n)
    return {
        "win_rate": (wins + ties / 2) / n,
        "ci_low": low,
        "ci_high": high,
        "wins": wins,
        "ties": ties,
        "losses": n - wins - ties,
        "prompts": n,
    }

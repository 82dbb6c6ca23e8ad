"""Preference losses: pure functions of per-sequence log-prob tensors, and the `LOSSES` registry.

Every loss has the signature

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, <params>) -> losses

where the four inputs are [B] tensors of log-probs summed over the response tokens (for a reference-free loss the
ref_* tensors are ignored) and `losses` is [B], one loss per pair. A loss declares, by exact name, only the keyword
params it uses: loss options (`beta`, `label_smoothing`, `simpo_gamma`, ..., each a `TrainConfig` field and flag of
the same name; `OPTIONS` lists them) and the per-pair tensors `chosen_lengths`, `rejected_lengths` ([B] response
token counts). The trainer reads the signature (`loss_params`) to pass them, and to reject a flag that would have
no effect on the chosen losses.

Where TRL 1.16 has a loss, the formula is TRL's: `DPOTrainer._compute_loss` for its 15 loss types and the
f-divergences, trl.experimental's `CPOTrainer` for simpo and cpo, `ORPOTrainer` for orpo. tests/test_losses.py
restates each one independently and ties the restatement to TRL's installed source.

Notation: πw, πl are the policy's summed log-probs of the chosen (w) and rejected (l) response, rw, rl the
reference's; hw = πw − rw and hl = πl − rl their log-ratios, h = hw − hl; |y| is a response's token count.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a loss accepts for one of its options, e.g. Range(0, 0.5, "[)") for 0 ≤ ε < 0.5."""

    low: float
    high: float
    ends: str = "[]"  # "[" / "(": low included or not; "]" / ")": high included or not
    note: str = ""  # said after the range in the error, e.g. " (the EXO paper uses 1e-3)"

    def __str__(self) -> str:
        return f"{self.ends[0]}{self.low:g}, {self.high:g}{self.ends[1]}"

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.ends[0] == "[" else value > self.low
        below = value <= self.high if self.ends[1] == "]" else value < self.high
        return above and below


def _ranged(**ranges: Range):
    """Declare the ranges of a loss's options (`LossSpec.ranges` reads them, config.py checks them up front); the
    function itself refuses a value outside them too, when called directly."""

    def decorate(fn):
        @functools.wraps(fn)
        def checked(*args, **kwargs):
            for option, allowed in ranges.items():
                if kwargs[option] not in allowed:
                    raise UserError(
                        f"--{option.replace('_', '-')} must lie in {allowed} for the '{fn.__name__}' "
                        f"loss{allowed.note}, got {kwargs[option]}"
                    )
            return fn(*args, **kwargs)

        checked.ranges = ranges
        return checked

    return decorate


# ---------------------------------------------------------------------------------------------------- f-divergences
# f-DPO (Wang et al. 2023, Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
# Constraints, arXiv 2309.16240): with an f-divergence in place of the reverse KL,
# the implicit reward of a response is β·f'(π/π_ref) instead of β·log(π/π_ref). The forms are TRL 1.16's.


def _reverse_kl(logratio: Tensor, f_alpha: float) -> Tensor:
    return logratio  # f'(t) = log t + 1; the constant cancels in the chosen − rejected difference


def _forward_kl(logratio: Tensor, f_alpha: float) -> Tensor:
    return 1 - torch.exp(-logratio)  # f'(t) = 1 − 1/t


def _js_divergence(logratio: Tensor, f_alpha: float) -> Tensor:
    return math.log(2) + F.logsigmoid(logratio)  # f'(t) = log(2t / (1 + t))


def _alpha_divergence(logratio: Tensor, f_alpha: float) -> Tensor:
    if abs(f_alpha - 1.0) < 1e-6:  # the α → 1 limit is the reverse KL (TRL's cut-off)
        return logratio
    # f'(t) = (t^(α−1) − 1) / (α − 1). Clamped so that exp stays finite in float32 (TRL's bound).
    exponent = ((f_alpha - 1.0) * logratio).clamp(max=80.0)
    return (torch.exp(exponent) - 1.0) * (1.0 / (f_alpha - 1.0))


class FDivergence(NamedTuple):
    score: Callable[[Tensor, float], Tensor]  # log-ratio [B] → f'(π/π_ref) [B]
    formula: str  # f'(t) with t = π/π_ref, for docs/losses.md


F_DIVERGENCES: dict[str, FDivergence] = {
    "reverse_kl": FDivergence(_reverse_kl, "log t (standard DPO)"),
    "forward_kl": FDivergence(_forward_kl, "1 − 1/t"),
    "js_divergence": FDivergence(_js_divergence, "log(2t / (1 + t))"),
    "alpha_divergence": FDivergence(
        _alpha_divergence,
        "(t^(α−1) − 1) / (α − 1), α = `--f-alpha` (TRL's "
        "`f_alpha_divergence_coef`: α → 1 is reverse KL, α = 0 forward KL; the "
        "paper's α-divergence with parameter a is α = 1 − a)",
    ),
}


def _scores(policy_logps: Tensor, ref_logps: Tensor, f_divergence: str, f_alpha: float) -> Tensor:
    """f'(π/π_ref) of each response, [B]; the log-ratio π − r itself for the reverse KL (standard DPO)."""
    return F_DIVERGENCES[f_divergence].score(policy_logps - ref_logps, f_alpha)


def _margin(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """h = hw − hl, [B] (with an f-divergence: f'(tw) − f'(tl))."""
    return _scores(policy_chosen_logps, ref_chosen_logps, f_divergence, f_alpha) - _scores(
        policy_rejected_logps, ref_rejected_logps, f_divergence, f_alpha
    )


def _smoothed_logistic(x: Tensor, label_smoothing: float) -> Tensor:
    """−(1−ε)·log σ(x) − ε·log σ(−x), [B], written as TRL writes it for aot, simpo and cpo."""
    return -F.logsigmoid(x) * (1 - label_smoothing) - F.logsigmoid(-x) * label_smoothing


# ---------------------------------------------------------------------------------------------------- DPO and kin


def sigmoid(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DPO, Eq. 7 of Rafailov et al. 2023: −log σ(β·h), [B].

    With label_smoothing ε > 0 this is conservative DPO (cDPO): the preference label is assumed flipped with
    probability ε, giving −(1−ε)·log σ(β·h) − ε·log σ(−β·h). ε = 0 is exactly TRL's "sigmoid".
    """
    scaled = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha
    )
    if label_smoothing == 0.0:  # skip the second term so ε = 0 is bit-identical to plain DPO
        return -F.logsigmoid(scaled)
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """IPO, Eq. 17 of Azar et al. 2023, length-normalised: (hw/|yw| − hl/|yl| − 1/(2β))², [B], β = the paper's τ.

    The log-ratios are divided by the response lengths (clamped to ≥ 1). The paper does not spell this
    normalisation out; TRL adopts it, confirmed by the IPO authors as the form behind the paper's results. Without
    it the squared loss grows with response length and β is not comparable across datasets. `ipo_sum` is the
    paper's formula as written.
    """
    chosen_avg = _scores(policy_chosen_logps, ref_chosen_logps, f_divergence, f_alpha) / chosen_lengths.clamp(min=1)
    rejected_avg = _scores(policy_rejected_logps, ref_rejected_logps, f_divergence, f_alpha) / rejected_lengths.clamp(
        min=1
    )
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def ipo_sum(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """IPO, Eq. 17 of Azar et al. 2023 as written, on summed log-probs: (h − 1/(2β))², [B], β = the paper's τ.

    The regression target 1/(2β) does not grow with the responses while h does: β is tied to response length.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    return (h - 1 / (2 * beta)) ** 2


def sigmoid_norm(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """Length-normalised DPO (Tülu 3, Lambert et al. 2024): −log σ(β·(hw/|yw| − hl/|yl|)), [B], as TRL."""
    chosen_avg = _scores(policy_chosen_logps, ref_chosen_logps, f_divergence, f_alpha) / chosen_lengths.clamp(min=1)
    rejected_avg = _scores(policy_rejected_logps, ref_rejected_logps, f_divergence, f_alpha) / rejected_lengths.clamp(
        min=1
    )
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg))


def hinge(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """SLiC's hinge (Zhao et al. 2023) on the reference-relative margin, RSO's hinge-norm (Liu et al. 2023),
    as in TRL: max(0, 1 − β·h), [B]; 1/β is the margin."""
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    return torch.relu(1 - beta * h)


@_ranged(label_smoothing=Range(0.0, 0.5, "[)"))
def robust(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), as in TRL, [B]:

        ((1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))) / (1 − 2ε)

    an unbiased estimate of the DPO loss when labels are flipped with probability ε. Needs 0 ≤ ε < 0.5.
    """
    scaled = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha
    )
    clean = -(1 - label_smoothing) * F.logsigmoid(scaled)
    flipped = -label_smoothing * F.logsigmoid(-scaled)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@_ranged(label_smoothing=Range(0.0, 1.0, "()", " (the EXO paper uses 1e-3)"))
def exo_pair(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """EXO-pref for two responses, Eq. 16 of Ji et al. 2024: KL(q ‖ p) with q = (σ(β·h), σ(−β·h)) the policy's
    and p = (1−ε, ε) the smoothed label's preference distribution, [B]:

        q_w·(log q_w − log(1−ε)) + q_l·(log q_l − log ε)

    Needs 0 < ε < 1 (log ε); the paper uses ε = 1e-3.
    """
    scaled = beta * _margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha
    )
    chosen_term = torch.sigmoid(scaled) * (F.logsigmoid(scaled) - math.log1p(-label_smoothing))
    rejected_term = torch.sigmoid(-scaled) * (F.logsigmoid(-scaled) - math.log(label_smoothing))
    return chosen_term + rejected_term


def discopop(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    discopop_tau: float,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DiscoPOP's log-ratio modulated loss, Eq. 5 of Lu et al. 2024, as in TRL, [B]: with x = β·h and
    m = σ(x/τ), (1 − m)·(−log σ(x)) + m·exp(−x): logistic for pairs it gets wrong, exponential for the others."""
    logits = (
        _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
        * beta
    )
    modulation = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def dpop(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float, dpop_lambda: float
) -> Tensor:
    """DPO-Positive, Eq. 3 of Pal et al. 2024 (Smaug): −log σ(β·(h − λ·max(0, rw − πw))), [B].

    The penalty is active only while the policy's chosen log-prob is below the reference's: DPO alone can lower
    both responses' likelihood as long as the rejected one falls faster.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    h = chosen_logratios - (policy_rejected_logps - ref_rejected_logps)
    penalty = torch.clamp(-chosen_logratios, min=0)
    return -F.logsigmoid(beta * (h - dpop_lambda * penalty))


def rdpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    rdpo_alpha: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """Length-regularised DPO (R-DPO) of Park et al. 2024: −log σ(β·h + α·(|yw| − |yl|)), [B].

    A longer chosen response already explains part of the preference, so the policy is pushed less to raise
    it: the implicit reward stops paying for length.
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h + rdpo_alpha * (chosen_lengths - rejected_lengths))


# ---------------------------------------------------------------------------------------------------- one reward each


def nca_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> Tensor:
    """NCA for a pair (Chen et al. 2024, Noise Contrastive Alignment), as in TRL, [B]: with rewards
    cw = β·hw and cl = β·hl, −log σ(cw) − ½·log σ(−cw) − ½·log σ(−cl). It moves each response's likelihood,
    not only their difference."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def bco_pair(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> Tensor:
    """BCO on pairs (Jung et al. 2024), as TRL's bco_pair (no reward shift δ), [B]: a binary classifier with
    logit β·hw for a chosen response (label 1) and β·hl for a rejected one (label 0): −log σ(β·hw) − log σ(−β·hl)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)


def sppo_hard(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, Eq. 4.7 with P = 1 for the winner, 0 for the loser), as
    in TRL, [B]: (hw − 1/(2β))² + (hl + 1/(2β))²: each log-ratio regressed to ±1/(2β)."""
    chosen_error = (policy_chosen_logps - ref_chosen_logps - 0.5 / beta) ** 2
    rejected_error = (policy_rejected_logps - ref_rejected_logps + 0.5 / beta) ** 2
    return chosen_error + rejected_error


def apo_zero(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> Tensor:
    """APO-zero, Eq. 7 of D'Oosterlinck et al. 2024, [B]: (1 − σ(β·hw)) + σ(β·hl). Raises the chosen and lowers
    the rejected likelihood: for chosen responses better than the model's own."""
    return (
        1
        - torch.sigmoid(beta * (policy_chosen_logps - ref_chosen_logps))
        + torch.sigmoid(beta * (policy_rejected_logps - ref_rejected_logps))
    )


def apo_down(
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float
) -> Tensor:
    """APO-down, Eq. 8 of D'Oosterlinck et al. 2024, [B]: σ(β·hw) + (1 − σ(β·(hw − hl))). Lowers both
    likelihoods, the rejected one more: for chosen responses worse than the model's own."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    h = chosen_logratios - (policy_rejected_logps - ref_rejected_logps)
    return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * h))


# ---------------------------------------------------------------------------------------------------- grouped
# A row whose `rejected` lists k responses is k pairs (chosen, rejected_j) in the data; a grouped loss sees them as
# one group. The trainer keeps each group's k pairs next to each other, in one micro-batch (data/groups.py), and
# passes k as `group_size`.


def plackett_luce(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    group_size: int,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 0.5,
) -> Tensor:
    """DPO under the Plackett–Luce model (Rafailov et al. 2023, Appendix A.3) for one chosen response over the
    k = `group_size` rejected responses of its group: −log of the probability that the chosen one ranks first,

        −log [exp(β·hw) / (exp(β·hw) + Σ_j exp(β·hl_j))] = log(1 + Σ_j exp(−β·h_j)),   h_j = hw − hl_j,

    the paper's ranking likelihood (Eq. 18, reward β·log π/π_ref) summed over every order of the rejected
    responses, which the data does not give. Pairs j of a group sit next to each other in the batch ([B], B a
    multiple of k); each carries its group's loss, so the mean over pairs is the mean over groups. k = 1 is DPO;
    at π = π_ref the loss is ln(k + 1).
    """
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, f_divergence, f_alpha)
    if h.numel() % group_size:
        raise ValueError(f"{h.numel()} pairs do not make whole groups of {group_size}")
    scaled = (-beta * h).view(-1, group_size)
    losses = torch.logsumexp(F.pad(scaled, (1, 0)), dim=1)  # the padded 0 is the chosen response's own term
    return losses.repeat_interleave(group_size)


# ---------------------------------------------------------------------------------------------------- batch-sorted


def aot(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT for paired data (Melnyk et al. 2024, Distributional Preference Alignment via Optimal Transport), as in
    TRL, [B]: the policy's margins πw − πl and the reference's rw − rl are each sorted over the micro-batch, and
    d_i = sorted_i − sorted_ref_i goes through the smoothed logistic loss −(1−ε)·log σ(β·d) − ε·log σ(−β·d).

    Row i of the result is the i-th quantile, not pair i: the loss of a micro-batch depends on all its pairs, so
    gradient accumulation is not one big batch for this loss (as in TRL, sorting happens per device batch).
    """
    logratios, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_logratios, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
    return _smoothed_logistic(beta * (logratios - ref_logratios), label_smoothing)


def aot_unpaired(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """AOT for unpaired data (Melnyk et al. 2024), as in TRL, [B]: the chosen log-ratios hw and the rejected ones hl
    are sorted separately over the micro-batch and d = sorted(hw) − sorted(hl) goes through the smoothed logistic
    loss: the chosen rewards' distribution should dominate the rejected ones'. Micro-batch dependent, as `aot`."""
    chosen_sorted, _ = torch.sort(policy_chosen_logps - ref_chosen_logps, dim=0)
    rejected_sorted, _ = torch.sort(policy_rejected_logps - ref_rejected_logps, dim=0)
    return _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


# ---------------------------------------------------------------------------------------------------- reference-free


def simpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    simpo_gamma: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO, Eq. 6 of Meng et al. 2024: −log σ(β·(πw/|yw| − πl/|yl|) − γ), [B]; no reference.

    As TRL's CPOTrainer(loss_type="simpo"): written β·(Δ − γ/β), with label smoothing ε as in cDPO. TRL's
    default cpo_alpha = 1 adds CPO's NLL term; here that is `--loss simpo,sft --loss-weights 1,α`.
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
    logits = (chosen_avg - rejected_avg) - simpo_gamma / beta
    return _smoothed_logistic(beta * logits, label_smoothing)


def cpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """CPO's preference term, Eq. 3 of Xu et al. 2024: −log σ(β·(πw − πl)), [B]; no reference.

    As TRL's CPOTrainer(loss_type="sigmoid"), with label smoothing ε as in cDPO. The registry adds CPO's
    second term, cpo_alpha × the NLL of the chosen response (a token mean, as `sft`), in `combined_loss`.
    """
    return _smoothed_logistic(beta * (policy_chosen_logps - policy_rejected_logps), label_smoothing)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x ≤ 0, switching form at −ln 2 to avoid cancellation (TRL's ORPO helper)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """ORPO's odds-ratio term, Eqs. 4, 6 and 7 of Hong et al. 2024, times λ = β, [B]; no reference:

        −β·log σ(log odds(yw) − log odds(yl)),   odds(y) = p̄/(1 − p̄),   p̄ = exp(π/|y|)

    the per-token mean likelihood, as TRL's ORPOTrainer. The registry adds ORPO's first term, the NLL of the
    chosen response (weight 1, a token mean over the chosen responses, as `sft`), in `combined_loss`.
    """
    chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds)


def sft(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """Negative log-likelihood of the chosen response, [B] (summed over its tokens).

    Registered with normalize="chosen_tokens": `combined_loss` divides the sum by the number of chosen tokens,
    the token mean TRL uses. Added to "sigmoid" with a weight this is RPO (Pang et al. 2024) up to its
    normalisation: RPO divides each chosen response's NLL by that response's own length.
    """
    return -policy_chosen_logps


# ---------------------------------------------------------------------------------------------------- unpaired
# An unpaired loss (LossSpec.unpaired) trains on examples (prompt, completion, label), not pairs. The data layer
# (data/unpaired.py) gives each example the shape of a pair, so batching, the log-prob code and the reference
# cache serve both: the "chosen" sequence is the example's own completion, the "rejected" one a mismatched
# completion (another example's completion after this example's prompt) for KTO's KL estimate, and `labels` [B]
# (1.0 desirable, 0.0 undesirable) says which side each example is on.


def kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """(Σ, count) of the log-ratios π − r of the mismatched completions, [2], detached. The trainer adds them up over
    the micro-batches of all processes that run together and takes max(0, Σ / count) as KTO's reference point z:
    an estimate of KL(π ‖ π_ref) that carries no gradient (as TRL's KTOTrainer, which gathers it over devices)."""
    logratios = (policy_kl_logps - ref_kl_logps).detach().float()
    return torch.stack([logratios.sum(), logratios.new_tensor(float(logratios.numel()))])


def kto(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    labels: Tensor,
    kl: Tensor,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """KTO (Ethayarajh et al. 2024, Eq. 7 of arXiv 2402.01306 v2), as TRL's KTOTrainer, [B]: with h = π − r the log-ratio of an example's
    completion and z = `kl` the reference point (see `kl_estimate`),

        desirable example:    λD·(1 − σ(β·(h − z)))
        undesirable example:  λU·(1 − σ(β·(z − h)))

    λD, λU = desirable_weight, undesirable_weight. The rejected log-probs (the mismatched completions) enter only
    through z."""
    logratios = policy_chosen_logps - ref_chosen_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(labels.bool(), desirable, undesirable)


def apo_zero_unpaired(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    *,
    beta: float,
    labels: Tensor,
    desirable_weight: float,
    undesirable_weight: float,
) -> Tensor:
    """APO-zero for unpaired data (D'Oosterlinck et al. 2024), as TRL's KTOTrainer(loss_type="apo_zero_unpaired"),
    [B]: λD·(1 − σ(β·h)) for a desirable example, λU·σ(β·h) for an undesirable one; no KL term."""
    logratios = policy_chosen_logps - ref_chosen_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * logratios))
    undesirable = undesirable_weight * torch.sigmoid(beta * logratios)
    return torch.where(labels.bool(), desirable, undesirable)


# ---------------------------------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., Tensor]
    needs_reference: bool
    formula: str  # the per-pair loss, for docs/losses.md (notation of this module's docstring)
    paper: str  # where it comes from, with the equation
    reward: str | None = "logratio"  # how its implicit reward is logged (REWARDS); None: it defines none
    normalize: str = "pairs"  # "pairs": sum / number of pairs; "chosen_tokens": sum / number of chosen tokens
    nll: str | float | None = None  # adds w × `sft` (token mean); w: this option's value, or this constant
    beta: str = "—"  # the β the paper recommends ("—": none recorded, see docs/losses.md)
    lr: str = "—"  # the learning rate the paper recommends
    unpaired: bool = False  # trains on examples (prompt, completion, label), see "unpaired" above
    # What config.py checks for this loss, generically (adding a loss never touches config.py):
    requires: dict[str, str] = field(default_factory=dict)  # option → why it has no default
    min_batch_size: tuple[int, str] = (1, "")  # (n, why) for a loss that needs n examples per micro-batch
    refuses: dict[str, str] = field(default_factory=dict)  # option → the error when it is on, "{name}": the loss

    @property
    def ranges(self) -> dict[str, Range]:
        """Allowed values of its options (declared on the function with `_ranged`)."""
        return getattr(self.fn, "ranges", {})

    @property
    def grouped(self) -> bool:
        """Trains the pairs of a data row as one group (the function takes `group_size`)."""
        return "group_size" in inspect.signature(self.fn).parameters

    @property
    def needs_kl(self) -> bool:
        """Takes KTO's reference point `kl`, estimated from the micro-batch (see `kl_estimate`)."""
        return "kl" in inspect.signature(self.fn).parameters


_SORTS_PAIRS = {"wpo": "--wpo cannot weight --loss {name}: it sorts the pairs of a batch"}
_SINGLE_PAIRS = {
    option: f"--{option.replace('_', '-')} works on single pairs and cannot be used with --loss {{name}}, "
    "which trains the pairs of a row as one group"
    for option in ("wpo", "ld_alpha", "group_by_length")
}

LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(
        sigmoid,
        True,
        "−log σ(βh); with ε > 0 (cDPO): −(1−ε) log σ(βh) − ε log σ(−βh)",
        "Rafailov et al. 2023, Direct Preference Optimization: Your Language Model is Secretly a Reward Model "
        "(arXiv 2305.18290), Eq. 7; cDPO: Mitchell 2023, A note on DPO with noisy preferences & relationship to IPO "
        "(ericmitchell.ai/cdpo.pdf), Eq. 3",
        beta="0.1",
        lr="1e-6",
    ),
    "ipo": LossSpec(
        ipo,
        True,
        "(hw/|yw| − hl/|yl| − 1/(2β))²",
        "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences "
        "(arXiv 2310.12036 v2), Eq. 17, length-normalised as TRL and the IPO authors",
        reward="logratio_per_token",
    ),
    "ipo_sum": LossSpec(
        ipo_sum, True, "(h − 1/(2β))²", "Azar et al. 2023 (arXiv 2310.12036), Eq. 17 as written (summed log-probs)"
    ),
    "sigmoid_norm": LossSpec(
        sigmoid_norm,
        True,
        "−log σ(β(hw/|yw| − hl/|yl|))",
        "Lambert et al. 2024, Tülu 3: Pushing Frontiers in Open Language Model Post-Training (arXiv 2411.15124), "
        "length-normalised DPO",
        reward="logratio_per_token",
        beta="5",
        lr="5e-7 (8B), 2e-7 (70B)",
    ),
    "hinge": LossSpec(
        hinge,
        True,
        "max(0, 1 − βh)",
        "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv 2305.10425); Liu et "
        "al. 2023, Statistical Rejection Sampling Improves Preference Optimization (RSO, arXiv 2309.06657), "
        "hinge-norm loss",
    ),
    "robust": LossSpec(
        robust,
        True,
        "[−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε), ε < 0.5",
        "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback (arXiv 2403.00409)",
        beta="0.01 †",
        lr="1e-3 †",
    ),
    "exo_pair": LossSpec(
        exo_pair,
        True,
        "q log(q/(1−ε)) + (1−q) log((1−q)/ε), q = σ(βh), 0 < ε",
        "Ji et al. 2024, Towards Efficient and Exact Optimization of Language Model Alignment (arXiv 2402.00856), "
        "Eq. 16",
        beta="0.1 (0.5 on HH)",
        lr="1e-6",
    ),
    "nca_pair": LossSpec(
        nca_pair,
        True,
        "−log σ(βhw) − ½ log σ(−βhw) − ½ log σ(−βhl)",
        "Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards "
        "(arXiv 2402.05369), NCA for K = 2",
        beta="0.01",
        lr="5e-6 (QLoRA)",
    ),
    "bco_pair": LossSpec(
        bco_pair,
        True,
        "−log σ(βhw) − log σ(−βhl)",
        "Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (arXiv 2404.04656), "
        "without the reward shift δ",
        beta="0.01 †",
        lr="5e-7 †",
    ),
    "sppo_hard": LossSpec(
        sppo_hard,
        True,
        "(hw − 1/(2β))² + (hl + 1/(2β))²",
        "Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (arXiv 2405.00675), "
        "Eq. 4.7 (Algorithm 1) with hard probabilities",
        lr="5e-7",
    ),
    "aot": LossSpec(
        aot,
        True,
        "−(1−ε) log σ(βd) − ε log σ(−βd), d = sort(πw − πl) − sort(rw − rl) over the micro-batch",
        "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
        "(arXiv 2406.05882), paired",
        refuses=_SORTS_PAIRS,
    ),
    "aot_unpaired": LossSpec(
        aot_unpaired,
        True,
        "as aot with d = sort(hw) − sort(hl) over the micro-batch",
        "Melnyk et al. 2024 (arXiv 2406.05882), unpaired",
        refuses=_SORTS_PAIRS,
    ),
    "apo_zero": LossSpec(
        apo_zero,
        True,
        "1 − σ(βhw) + σ(βhl)",
        "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions: Addressing "
        "Underspecification in Alignment (arXiv 2408.06266), Eq. 7",
        beta="0.1 †",
        lr="2e-7 †",
    ),
    "apo_down": LossSpec(
        apo_down,
        True,
        "σ(βhw) + 1 − σ(βh)",
        "D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8",
        beta="0.1 †",
        lr="2e-7 †",
    ),
    "discopop": LossSpec(
        discopop,
        True,
        "(1 − m)(−log σ(βh)) + m e^(−βh), m = σ(βh/τ)",
        "Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language Models "
        "(arXiv 2406.08414), Eq. 5 (τ = 0.05)",
        beta="0.05",
        lr="5e-7",
    ),
    "dpop": LossSpec(
        dpop,
        True,
        "−log σ(β(h − λ max(0, −hw)))",
        "Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive "
        "(arXiv 2402.13228), Eq. 3",
    ),
    "rdpo": LossSpec(
        rdpo,
        True,
        "−log σ(βh + α(|yw| − |yl|))",
        "Park et al. 2024, Disentangling Length from Quality in Direct Preference Optimization "
        "(arXiv 2403.19159), R-DPO",
        requires={"rdpo_alpha": "the weight of the length difference; no default fits all datasets"},
    ),
    "plackett_luce": LossSpec(
        plackett_luce,
        True,
        "log(1 + Σ_j exp(−βh_j)) over the k rejected responses j of a row, h_j = hw − hl_j "
        "(a row's loss, carried by each of its k pairs)",
        "Rafailov et al. 2023 (arXiv 2305.18290), Appendix A.3, Eq. 18 with the chosen response ranked first and "
        "the rejected ones in any order (the paper runs no experiment with it)",
        refuses=_SINGLE_PAIRS,
    ),
    "simpo": LossSpec(
        simpo,
        False,
        "−log σ(β(πw/|yw| − πl/|yl|) − γ)",
        "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward "
        "(arXiv 2405.14734), Eq. 6",
        reward="logp_per_token",
        beta="2.0–2.5",
        lr="3e-7–1e-6",
    ),
    "cpo": LossSpec(
        cpo,
        False,
        "−log σ(β(πw − πl)) + α NLL(yw)",
        "Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance in Machine "
        "Translation (arXiv 2401.08417), Eq. 3 + NLL term",
        reward="logp",
        nll="cpo_alpha",
        beta="0.1",
        lr="1e-4 (LoRA)",
    ),
    "orpo": LossSpec(
        orpo,
        False,
        "NLL(yw) − β log σ(log odds(yw) − log odds(yl)), odds = p̄/(1−p̄), p̄ = e^(π/|y|)",
        "Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model "
        "(arXiv 2403.07691), Eqs. 3, 4, 6, 7 (β = λ)",
        reward="logp_per_token",
        nll=1.0,
        beta="0.1",
        lr="5e-6",
    ),
    "kto": LossSpec(
        kto,
        True,
        "λD(1 − σ(β(h − z))) if desirable, λU(1 − σ(β(z − h))) if not; h = π − r of the completion, "
        "z = max(0, mean of π − r over mismatched completions), no gradient",
        "Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (arXiv 2402.01306 v2), Eq. 7",
        unpaired=True,
        beta="0.1",
        lr="5e-6",
        min_batch_size=(
            2,
            "its KL estimate comes from the other examples of the micro-batch (with one it would be "
            "the example's own reward)",
        ),
    ),
    "apo_zero_unpaired": LossSpec(
        apo_zero_unpaired,
        True,
        "λD(1 − σ(βh)) if desirable, λU σ(βh) if not; h = π − r of the completion",
        "D'Oosterlinck et al. 2024 (arXiv 2408.06266), unpaired variant of Eq. 7 (APO-zero), as TRL's KTOTrainer",
        unpaired=True,
        beta="0.1 †",
        lr="2e-7 †",
    ),
    "sft": LossSpec(
        sft,
        False,
        "NLL(yw) = −πw, averaged over the step's chosen tokens",
        "negative log-likelihood of the chosen response (RPO: Pang et al. 2024, Iterative Reasoning Preference "
        "Optimization, arXiv 2404.19733)",
        reward=None,
        normalize="chosen_tokens",
    ),
}

_POSITIONAL = 4  # the four log-prob tensors every loss takes first
# Values a loss may declare besides its options: per pair ([B]: response token counts; `labels`, 1.0 for a desirable
# example of an unpaired loss) and per micro-batch (`kl`: KTO's reference point, see `kl_estimate`; `group_size`:
# the pairs of one group, see "grouped" above).
PER_PAIR = frozenset({"chosen_lengths", "rejected_lengths", "labels", "kl", "group_size"})


def loss_params(name: str) -> set[str]:
    """The keyword params loss `name` uses: those its function declares, plus its NLL weight option if any."""
    params = set(list(inspect.signature(LOSSES[name].fn).parameters)[_POSITIONAL:])
    nll = LOSSES[name].nll
    return params | {nll} if isinstance(nll, str) else params


# Every loss option, each a TrainConfig field and flag of the same name.
OPTIONS: frozenset[str] = frozenset().union(*(loss_params(name) for name in LOSSES)) - PER_PAIR


def reward_kind(names: list[str]) -> str:
    """How the rewards of a run with losses `names` are logged: as the first loss that defines one (the log-ratio
    when none does, e.g. `sft` alone, whose reference log-probs are then zeros)."""
    return next((LOSSES[n].reward for n in names if LOSSES[n].reward is not None), "logratio")


def combined_loss(
    names: list[str],
    weights: list[float],
    *,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None,
    ref_rejected_logps: Tensor | None,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    num_pairs: int,
    num_chosen_tokens: int,
    pair_weights: Tensor | None = None,
    labels: Tensor | None = None,
    kl: Tensor | None = None,
    group_size: int = 1,
    **options,
) -> Tensor:
    """Σ_k w_k · sum(losses_k) / N_k, a scalar, with N_k = num_pairs or num_chosen_tokens (LossSpec.normalize).

    `options` are the loss options by name (beta=0.1, label_smoothing=0.0, ...; a loss's own default applies to
    one not given). `pair_weights` [B] (WPO) multiply each pair's loss in the pair-normalised losses; the NLL terms
    (`sft`, and those of cpo and orpo) stay unweighted. num_pairs and num_chosen_tokens are totals over the GLOBAL
    batch, not this micro-batch:
    micro-batches that each call this with the global totals and sum their gradients give exactly the loss and
    gradients of one big batch (a per-micro-batch mean would over-weight short micro-batches; `aot` and
    `aot_unpaired` are the exception, their losses depend on the micro-batch). ref_* may be None when no loss
    in `names` needs the reference. An unpaired loss takes `labels` [B] and (kto) `kl`, the micro-batch's
    reference point; for it a "pair" is one example, so num_pairs counts examples. `group_size`: the pairs of one
    group of a grouped loss (`plackett_luce`), next to each other in the batch.
    """
    available = {
        **options,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "group_size": group_size,
        **({} if labels is None else {"labels": labels}),
        **({} if kl is None else {"kl": kl}),
    }
    denominators = {"pairs": num_pairs, "chosen_tokens": num_chosen_tokens}
    total = policy_chosen_logps.new_zeros(())
    for name, weight in zip(names, weights, strict=True):
        spec = LOSSES[name]
        kwargs = {param: available[param] for param in loss_params(name) - {spec.nll} if param in available}
        losses = spec.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **kwargs)
        if pair_weights is not None and spec.normalize == "pairs":
            losses = losses * pair_weights
        total = total + weight * losses.sum() / denominators[spec.normalize]
        if spec.nll is not None:  # CPO and ORPO add the chosen response's NLL, a token mean as `sft`
            nll_weight = options[spec.nll] if isinstance(spec.nll, str) else spec.nll
            total = total + weight * nll_weight * (-policy_chosen_logps).sum() / num_chosen_tokens
    return total


# ---------------------------------------------------------------------------------------------------- rewards

# The implicit reward of a response is β × one of these, [B], from (policy log-probs, reference log-probs,
# response lengths); each loss logs the kind that matches what it trains (LossSpec.reward).
REWARDS: dict[str, Callable[[Tensor, Tensor, Tensor | None], Tensor]] = {
    "logratio": lambda policy, ref, lengths: policy - ref,  # DPO's β·log(π/π_ref)
    "logratio_per_token": lambda policy, ref, lengths: (policy - ref) / lengths.clamp(min=1),
    "logp": lambda policy, ref, lengths: policy,  # reference-free: β·log π
    "logp_per_token": lambda policy, ref, lengths: policy / lengths.clamp(min=1),
}


REWARD_FORMULAS = {
    "logratio": "β hw",
    "logratio_per_token": "β hw/|yw|",
    "logp": "β πw",
    "logp_per_token": "β πw/|yw|",
}  # of a chosen response, for docs/losses.md


# A pair whose reward margin lies within the rounding of its log-probs is a tie, not a win. With cached reference
# log-probs (the default) the policy's and the reference's come from different passes, whose batch shapes and
# kernels round differently: at π = π_ref their margins are ±1e-7 (float32) or ±1e-4 (bfloat16 autocast) of the
# log-probs' magnitude instead of 0, and a strict `>` would count about half of them as wins. TIE_RTOL is that
# rounding with a wide safety factor (measured ≤ 2e-7 and ≤ 2e-4 on 2- and 6-layer test models between batch
# compositions); the band
# is TIE_RTOL × the sum of the four log-probs' magnitudes, in the units of the logged reward (`tie_band`).
TIE_RTOL = {"float32": 1e-5, "bfloat16": 2e-3}


def tie_band(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    reward: str = "logratio",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    rtol: float = TIE_RTOL["float32"],
) -> Tensor:
    """[B]: the largest reward margin of each pair that is still a tie: β·rtol·(|πw| + |rw| + |πl| + |rl|), each
    response's share taken through the reward's own normalisation (a per-token reward divides it by |y|)."""
    chosen = REWARDS[reward](policy_chosen_logps.abs(), -ref_chosen_logps.abs(), chosen_lengths)
    rejected = REWARDS[reward](policy_rejected_logps.abs(), -ref_rejected_logps.abs(), rejected_lengths)
    return beta * rtol * (chosen + rejected)


def rewards(
    policy_logps: Tensor, ref_logps: Tensor, beta: float, kind: str = "logratio", lengths: Tensor | None = None
) -> Tensor:
    """Implicit reward β·(log π(y|x) − log π_ref(y|x)), or the `kind` of REWARDS, [B]. Not detached."""
    return beta * REWARDS[kind](policy_logps, ref_logps, lengths)


def pair_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    reward: str = "logratio",
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    tie_rtol: float = TIE_RTOL["float32"],
) -> dict[str, Tensor]:
    """Per-pair (not reduced) detached metrics, each [B], named as in TRL, torchtune and the DPO authors' code.

    Rewards (and so margins and accuracies) are of the kind `reward` (see `reward_kind`): a length-normalised loss
    logs length-normalised rewards. `logps/*` are always the summed log-probs. A pair is accurate when its margin
    exceeds its `tie_band`: a tie counts as wrong, as in TRL, and so does a margin within rounding of one.
    """
    chosen_rewards = rewards(policy_chosen_logps, ref_chosen_logps, beta, reward, chosen_lengths).detach()
    rejected_rewards = rewards(policy_rejected_logps, ref_rejected_logps, beta, reward, rejected_lengths).detach()
    band = tie_band(
        policy_chosen_logps.detach(),
        policy_rejected_logps.detach(),
        ref_chosen_logps,
        ref_rejected_logps,
        beta,
        reward,
        chosen_lengths,
        rejected_lengths,
        tie_rtol,
    )
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards - rejected_rewards > band).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }


# Metrics of unpaired examples are means over the desirable or the undesirable ones only: `example_metrics` gives
# each example's value masked by its label, and the trainer divides the step's sum by the step's count (these keys).
MASKED_MEANS = {
    "rewards/chosen": "count/desirable",
    "logps/chosen": "count/desirable",
    "rewards/rejected": "count/undesirable",
    "logps/rejected": "count/undesirable",
}


def example_metrics(
    policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, beta: float, kl: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-example detached metrics of an unpaired loss, each [B], for the means TRL's KTOTrainer logs: rewards and
    log-probs of the desirable examples ("chosen") and of the undesirable ones ("rejected"), each masked by the
    label (see MASKED_MEANS), the label counts, and KTO's reference point `kl` of the micro-batch."""
    desirable = labels.float()
    undesirable = 1 - desirable
    reward = beta * (policy_logps - ref_logps).detach()
    policy_logps = policy_logps.detach()
    metrics = {
        "rewards/chosen": reward * desirable,
        "rewards/rejected": reward * undesirable,
        "logps/chosen": policy_logps * desirable,
        "logps/rejected": policy_logps * undesirable,
        "count/desirable": desirable,
        "count/undesirable": undesirable,
    }
    if kl is not None:
        metrics["kl"] = kl.detach().expand_as(desirable)
    return metrics


# ---------------------------------------------------------------------------------------------------- docs/losses.md

DOCS_BEGIN = "<!-- losses table: generated by `python -m preftune.losses docs/losses.md`, do not edit -->"
DOCS_END = "<!-- end of losses table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # |y| would end a markdown table cell


def _flag(option: str) -> str:
    return "`--" + option.replace("_", "-") + "`"


def losses_table_markdown() -> str:
    """The tables of docs/losses.md (between DOCS_BEGIN and DOCS_END), generated from the registry."""
    lines = [
        "| loss | per pair | paper | reference | β in the paper | lr in the paper | logged reward | options |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in LOSSES.items():
        options = sorted(loss_params(name) - PER_PAIR, key=lambda o: (o != "beta", o))
        reward = REWARD_FORMULAS[spec.reward] if spec.reward else "— (see notes)"
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    _cell(spec.formula),
                    _cell(spec.paper),
                    "yes" if spec.needs_reference else "no",
                    spec.beta,
                    spec.lr,
                    _cell(reward),
                    ", ".join(_flag(o) for o in options) or "—",
                ]
            )
            + " |"
        )
    with_f = [f"`{name}`" for name in LOSSES if "f_divergence" in loss_params(name)]
    lines += [
        "",
        f"`--f-divergence` (with {', '.join(with_f)}) replaces each log-ratio log t, t = π/π_ref, by f'(t):",
        "",
        "| `--f-divergence` | f'(t) |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {_cell(f.formula)} |" for name, f in F_DIVERGENCES.items()]
    return "\n".join(lines) + "\n"


def update_docs(path: str | Path) -> None:
    """Rewrite the generated tables of the file at `path` (docs/losses.md) in place."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(DOCS_BEGIN) + r"\n.*?" + re.escape(DOCS_END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no generated section ({DOCS_BEGIN} ... {DOCS_END})")
    path.write_text(pattern.sub(lambda _: f"{DOCS_BEGIN}\n{losses_table_markdown()}{DOCS_END}", text), encoding="utf-8")


if __name__ == "__main__":
    update_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/losses.md")

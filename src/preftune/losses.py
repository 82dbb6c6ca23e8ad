"""Preference losses: pure functions of per-sequence log-prob tensors, and the `LOSSES` registry.

Every loss has the signature

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, <params>) -> losses

where the four inputs are [B] tensors of log-probs summed over the response tokens and `losses` is [B], one
loss per pair. A loss declares, by exact name, only the keyword params it uses, out of `beta`,
`label_smoothing`, `chosen_lengths` and `rejected_lengths` ([B] response token counts): the trainer reads the
signature (`loss_params`) to pass them, and to reject a flag that would have no effect on the chosen losses.

The formulas equal TRL 1.16's `DPOTrainer._compute_loss` (f_divergence_type="reverse_kl", no WPO weighting,
no ld_alpha). Notation: h = (πc − rc) − (πr − rr), the difference of the chosen and rejected log-ratios.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from preftune.errors import UserError


def _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """h = (πc − rc) − (πr − rr), [B]."""
    return (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)


def sigmoid(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
            beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO, Eq. 7 of Rafailov et al. 2023: −log σ(β·h), [B].

    With label_smoothing ε > 0 this is conservative DPO (cDPO): the preference label is assumed flipped with
    probability ε, giving −(1−ε)·log σ(β·h) − ε·log σ(−β·h). ε = 0 is exactly TRL's "sigmoid".
    """
    scaled = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if label_smoothing == 0.0:  # skip the second term so ε = 0 is bit-identical to plain DPO
        return -F.logsigmoid(scaled)
    return -(1 - label_smoothing) * F.logsigmoid(scaled) - label_smoothing * F.logsigmoid(-scaled)


def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta: float, chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """IPO, Eq. 17 of Azar et al. 2023: (hc/|c| − hr/|r| − 1/(2β))², [B], with β playing the paper's τ.

    The log-ratios hc = πc − rc and hr = πr − rr are divided by the response lengths (clamped to ≥ 1). The
    paper does not spell this normalisation out; TRL adopts it, confirmed by the IPO authors as the form behind
    the paper's results. Without it the squared loss grows with response length and β is not comparable
    across datasets.
    """
    chosen_avg = (policy_chosen_logps - ref_chosen_logps) / chosen_lengths.clamp(min=1)
    rejected_avg = (policy_rejected_logps - ref_rejected_logps) / rejected_lengths.clamp(min=1)
    return (chosen_avg - rejected_avg - 1 / (2 * beta)) ** 2


def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
          beta: float) -> Tensor:
    """SLiC hinge loss (Zhao et al. 2023), on the reference-relative margin as in TRL: relu(1 − β·h), [B]."""
    h = _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return torch.relu(1 - beta * h)


def robust(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
           beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), as in TRL, [B]:

        ((1−ε)·(−log σ(β·h)) − ε·(−log σ(−β·h))) / (1 − 2ε)

    an unbiased estimate of the DPO loss when labels are flipped with probability ε. Needs 0 ≤ ε < 0.5.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise UserError(f"--label-smoothing must lie in [0, 0.5) for the 'robust' loss, got {label_smoothing}")
    scaled = beta * _margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    clean = -(1 - label_smoothing) * F.logsigmoid(scaled)
    flipped = -label_smoothing * F.logsigmoid(-scaled)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def sft(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps) -> Tensor:
    """Negative log-likelihood of the chosen response, [B] (summed over its tokens).

    Registered with normalize="chosen_tokens": `combined_loss` divides the sum by the number of chosen tokens,
    the token mean TRL uses. Added to "sigmoid" with a weight this is RPO (Pang et al. 2024).
    """
    return -policy_chosen_logps


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[..., Tensor]
    needs_reference: bool
    normalize: str  # "pairs": sum / number of pairs; "chosen_tokens": sum / number of chosen tokens
    paper: str


LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, True, "pairs",
                        "Rafailov et al. 2023, Direct Preference Optimization, Eq. 7 (cDPO with label_smoothing)"),
    "ipo": LossSpec(ipo, True, "pairs",
                    "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human "
                    "Preferences, Eq. 17 (length-normalised as in TRL)"),
    "hinge": LossSpec(hinge, True, "pairs",
                      "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback"),
    "robust": LossSpec(robust, True, "pairs",
                       "Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback"),
    "sft": LossSpec(sft, False, "chosen_tokens",
                    "negative log-likelihood of the chosen response (RPO: Pang et al. 2024, Iterative "
                    "Reasoning Preference Optimization)"),
}

_POSITIONAL = 4  # the four log-prob tensors every loss takes first


def loss_params(name: str) -> set[str]:
    """The keyword params loss `name` declares (a subset of beta, label_smoothing, chosen/rejected_lengths)."""
    params = list(inspect.signature(LOSSES[name].fn).parameters)
    return set(params[_POSITIONAL:])


def combined_loss(names: list[str], weights: list[float], *, policy_chosen_logps: Tensor,
                  policy_rejected_logps: Tensor, ref_chosen_logps: Tensor | None, ref_rejected_logps: Tensor | None,
                  chosen_lengths: Tensor, rejected_lengths: Tensor, beta: float, label_smoothing: float,
                  num_pairs: int, num_chosen_tokens: int) -> Tensor:
    """Σ_k w_k · sum(losses_k) / N_k, a scalar, with N_k = num_pairs or num_chosen_tokens (LossSpec.normalize).

    num_pairs and num_chosen_tokens are totals over the GLOBAL batch, not this micro-batch: micro-batches that
    each call this with the global totals and sum their gradients give exactly the loss and gradients of one
    big batch (a per-micro-batch mean would over-weight short micro-batches). ref_* may be None when no loss
    in `names` needs the reference.
    """
    available = {"beta": beta, "label_smoothing": label_smoothing,
                 "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    denominators = {"pairs": num_pairs, "chosen_tokens": num_chosen_tokens}
    total = policy_chosen_logps.new_zeros(())
    for name, weight in zip(names, weights, strict=True):
        spec = LOSSES[name]
        kwargs = {param: available[param] for param in loss_params(name)}
        losses = spec.fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, **kwargs)
        total = total + weight * losses.sum() / denominators[spec.normalize]
    return total


def rewards(policy_logps: Tensor, ref_logps: Tensor, beta: float) -> Tensor:
    """Implicit DPO reward β·(log π(y|x) − log π_ref(y|x)), [B]. Not detached: callers detach for logging."""
    return beta * (policy_logps - ref_logps)


def pair_metrics(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, beta: float) -> dict[str, Tensor]:
    """Per-pair (not reduced) detached metrics, each [B], named as in TRL, torchtune and the DPO authors' code."""
    chosen_rewards = rewards(policy_chosen_logps, ref_chosen_logps, beta).detach()
    rejected_rewards = rewards(policy_rejected_logps, ref_rejected_logps, beta).detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),  # a tie counts as wrong, as in TRL
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }

"""Losses against values worked out by hand (torchtune's test_dpo_loss.py style), gradient signs, the registry,
combined losses, gradient-accumulation equivalence, rewards, the loss options of the config, and TRL's formulas.

Shared example, three pairs with β = 0.1:
    policy_chosen  πw = [-4, -3, -2]    ref_chosen   rw = [-5, -5, -5]   → hw = πw − rw = [1, 2, 3]
    policy_rejected πl = [-6, -6, -6]   ref_rejected rl = [-7, -7, -7]   → hl = πl − rl = [1, 1, 1]
    margin h = hw − hl = [0, 1, 2], β·h = x = [0, 0.1, 0.2]
Softplus sp(x) = −log σ(x) = log(1 + e^(−x)):
    sp(0) = ln 2 = 0.6931471806, sp(0.1) = 0.6443966601, sp(0.2) = 0.5981388694, sp(0.15) = 0.6209570478,
    sp(0.3) = 0.5543552445, sp(0.5) = 0.4740769842, sp(1) = 0.3132616875, sp(1.5) = 0.2014132780,
    sp(2) = 0.1269280110, sp(2.5) = 0.0788897343
and sp(−x) − sp(x) = log((1 + e^x) / (1 + e^(−x))) = log(e^x) = x, used below wherever a loss has σ(−x).
Sigmoid σ(x) = 1 − σ(−x): σ(0.1) = 0.5249791875, σ(0.2) = 0.5498339973, σ(0.3) = 0.5744425168.
"""

import inspect
import math

import pytest
import torch

from preftune.errors import UserError
from preftune.losses import (
    F_DIVERGENCES,
    LOSSES,
    OPTIONS,
    TIE_RTOL,
    _scores,
    combined_loss,
    loss_params,
    pair_metrics,
    reward_kind,
    rewards,
    tie_band,
)

BETA = 0.1
SP = [0.6931471806, 0.6443966601, 0.5981388694]  # sp(0), sp(0.1), sp(0.2)
LENGTHS = torch.tensor([1, 2, 4]), torch.tensor([1, 1, 2])  # chosen, rejected token counts of the example


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def example(requires_grad=False):
    def leaf(values):
        return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)

    return leaf([-4.0, -3.0, -2.0]), leaf([-6.0, -6.0, -6.0]), leaf([-5.0, -5.0, -5.0]), leaf([-7.0, -7.0, -7.0])


def call(name, logps, **params):
    return LOSSES[name].fn(*logps, **params)


def close(got, expected, atol=1e-9):
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------- DPO and kin


def test_sigmoid_hand_values():
    # −log σ(β·h) with β·h = [0, 0.1, 0.2] → sp(x).
    close(call("sigmoid", example(), beta=BETA), SP)


def test_sigmoid_label_smoothing_is_cdpo():
    # cDPO: (1−ε)·sp(x) + ε·sp(−x) = sp(x) + ε·(sp(−x) − sp(x)) = sp(x) + ε·x.
    # ε = 0.1: [0.6931471806 + 0, 0.6443966601 + 0.01, 0.5981388694 + 0.02]
    close(call("sigmoid", example(), beta=BETA, label_smoothing=0.1), [0.6931471806, 0.6543966601, 0.6181388694])


def test_ipo_hand_values_with_length_normalisation():
    # chosen lengths [1, 2, 4], rejected lengths [1, 1, 2]:
    #   hw/|yw| = [1/1, 2/2, 3/4] = [1, 1, 0.75];  hl/|yl| = [1/1, 1/1, 1/2] = [1, 1, 0.5]
    #   difference = [0, 0, 0.25];  1/(2β) = 5  →  (d − 5)² = [25, 25, 4.75² = 22.5625]
    losses = call("ipo", example(), beta=BETA, chosen_lengths=LENGTHS[0], rejected_lengths=LENGTHS[1])
    close(losses, [25.0, 25.0, 22.5625])


def test_ipo_clamps_zero_lengths_to_one():
    # A length of 0 divides by 1 (as TRL's clamp(min=1)): same as lengths [1, 1, 1]:
    #   d = hw − hl = [0, 1, 2] → (d − 5)² = [25, 16, 9]
    losses = call(
        "ipo", example(), beta=BETA, chosen_lengths=torch.tensor([0, 1, 0]), rejected_lengths=torch.tensor([1, 0, 0])
    )
    close(losses, [25.0, 16.0, 9.0])


def test_ipo_sum_is_the_papers_form_on_summed_logps():
    # (h − 1/(2β))² with h = [0, 1, 2], 1/(2β) = 5 → [25, 16, 9], whatever the lengths (none are taken).
    close(call("ipo_sum", example(), beta=BETA), [25.0, 16.0, 9.0])
    assert "chosen_lengths" not in loss_params("ipo_sum")


def test_sigmoid_norm_hand_values():
    # Per-token log-ratios as in the IPO test: difference [0, 0, 0.25]; β = 2 → β·d = [0, 0, 0.5]
    #   −log σ → [sp(0), sp(0), sp(0.5)] = [0.6931471806, 0.6931471806, 0.4740769842]
    losses = call("sigmoid_norm", example(), beta=2.0, chosen_lengths=LENGTHS[0], rejected_lengths=LENGTHS[1])
    close(losses, [0.6931471806, 0.6931471806, 0.4740769842])


def test_hinge_hand_values():
    # relu(1 − β·h): β = 0.1 → [1, 0.9, 0.8]; β = 1 → relu([1, 0, −1]) = [1, 0, 0]
    close(call("hinge", example(), beta=BETA), [1.0, 0.9, 0.8])
    close(call("hinge", example(), beta=1.0), [1.0, 0.0, 0.0])


def test_robust_hand_values():
    # ((1−ε)·sp(x) − ε·sp(−x)) / (1−2ε) = ((1−ε)·sp(x) − ε·(sp(x) + x)) / (1−2ε) = sp(x) − ε·x/(1−2ε).
    # ε = 0.1: sp(x) − x/8 = [0.6931471806, 0.6443966601 − 0.0125, 0.5981388694 − 0.025]
    close(call("robust", example(), beta=BETA, label_smoothing=0.1), [0.6931471806, 0.6318966601, 0.5731388694])


def test_robust_rejects_label_smoothing_outside_range():
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(UserError, match="label-smoothing"):
            call("robust", example(), beta=BETA, label_smoothing=bad)


def test_exo_pair_hand_values():
    # KL(q ‖ p) of two-point distributions, q = (σ(x), σ(−x)), p = (1 − ε, ε), ε = 0.2.
    # x = 0: q = (½, ½): ½ log(½/0.8) + ½ log(½/0.2) = log ½ − ½ log(0.8 · 0.2) = log(0.5 / 0.4) = ln 1.25
    #   = 0.2231435513.
    # x = 0.1: σ(0.1) = 0.5249791875, log σ(0.1) = −sp(0.1), log σ(−0.1) = −sp(0.1) − 0.1:
    #   0.5249791875·(−0.6443966601 − ln 0.8) + 0.4750208125·(−0.7443966601 − ln 0.2) = 0.1897634838
    # x = 0.2: 0.5498339973·(−0.5981388694 − ln 0.8) + 0.4501660027·(−0.7981388694 − ln 0.2) = 0.1590340725
    close(call("exo_pair", example(), beta=BETA, label_smoothing=0.2), [0.2231435513, 0.1897634838, 0.1590340725])


def test_exo_pair_needs_positive_label_smoothing():
    with pytest.raises(UserError, match=r"label-smoothing must lie in \(0, 1\) for the 'exo_pair' loss"):
        call("exo_pair", example(), beta=BETA, label_smoothing=0.0)


def test_discopop_hand_values():
    # x = β·h = [0, 0.1, 0.2], τ = 0.05 → m = σ(x/τ) = σ([0, 2, 4]) = [0.5, 0.8807970780, 0.9820137900].
    # (1 − m)·sp(x) + m·e^(−x):
    #   x = 0:   0.5·ln 2 + 0.5·1 = 0.8465735903
    #   x = 0.1: 0.1192029220·0.6443966601 + 0.8807970780·0.9048374180 = 0.8737921187
    #   x = 0.2: 0.0179862100·0.5981388694 + 0.9820137900·0.8187307531 = 0.8147631411
    close(call("discopop", example(), beta=BETA, discopop_tau=0.05), [0.8465735903, 0.8737921187, 0.8147631411])


def test_dpop_hand_values():
    # On the shared example hw = [1, 2, 3] > 0: the penalty max(0, −hw) is 0 and DPOP is DPO: sp(x).
    close(call("dpop", example(), beta=BETA, dpop_lambda=50.0), SP)
    # A pair whose chosen log-prob fell below the reference: πw = −6, rw = −5 → hw = −1; πl = −9, rl = −7 → hl = −2;
    # h = 1, penalty = max(0, 1) = 1.
    #   β = 1, λ = 0.5: −log σ(1 − 0.5) = sp(0.5) = 0.4740769842
    #   β = 0.1, λ = 50: −log σ(0.1·(1 − 50)) = sp(−4.9) = 4.9 + sp(4.9) = 4.9074189941
    pair = t([-6.0]), t([-9.0]), t([-5.0]), t([-7.0])
    close(call("dpop", pair, beta=1.0, dpop_lambda=0.5), [0.4740769842])
    close(call("dpop", pair, beta=0.1, dpop_lambda=50.0), [4.9074189941])


def test_rdpo_hand_values():
    # β·h + α·(|yw| − |yl|) with α = 0.05, length differences [1−1, 2−1, 4−2] = [0, 1, 2]:
    #   [0 + 0, 0.1 + 0.05, 0.2 + 0.1] = [0, 0.15, 0.3] → sp = [0.6931471806, 0.6209570478, 0.5543552445]
    losses = call("rdpo", example(), beta=BETA, rdpo_alpha=0.05, chosen_lengths=LENGTHS[0], rejected_lengths=LENGTHS[1])
    close(losses, [0.6931471806, 0.6209570478, 0.5543552445])


# ---------------------------------------------------------------------------------------------------- one reward each


def test_nca_pair_hand_values():
    # cw = β·hw = [0.1, 0.2, 0.3], cl = β·hl = 0.1.  sp(cw) + ½·sp(−cw) + ½·sp(−cl)
    #   = sp(cw) + ½·(sp(cw) + cw) + ½·(sp(0.1) + 0.1) = 1.5·sp(cw) + ½·cw + ½·0.6443966601 + 0.05
    #   cw = 0.1: 1.5·0.6443966601 + 0.05 + 0.3721983301 = 1.3887933201
    #   cw = 0.2: 1.5·0.5981388694 + 0.10 + 0.3721983301 = 1.3694066341
    #   cw = 0.3: 1.5·0.5543552445 + 0.15 + 0.3721983301 = 1.3537311967
    close(call("nca_pair", example(), beta=BETA), [1.3887933201, 1.3694066341, 1.3537311967])


def test_bco_pair_hand_values():
    # sp(cw) + sp(−cl) = sp(cw) + sp(0.1) + 0.1 = sp(cw) + 0.7443966601
    #   → [0.6443966601, 0.5981388694, 0.5543552445] + 0.7443966601
    close(call("bco_pair", example(), beta=BETA), [1.3887933202, 1.3425355295, 1.2987519046])


def test_sppo_hard_hand_values():
    # (hw − 1/(2β))² + (hl + 1/(2β))² with 1/(2β) = 5: (hw − 5)² + (1 + 5)² = [16 + 36, 9 + 36, 4 + 36]
    close(call("sppo_hard", example(), beta=BETA), [52.0, 45.0, 40.0])


def test_apo_zero_hand_values():
    # 1 − σ(β·hw) + σ(β·hl), σ(β·hl) = σ(0.1) = 0.5249791875:
    #   [1 − 0.5249791875, 1 − 0.5498339973, 1 − 0.5744425168] + 0.5249791875 = [1, 0.9751451902, 0.9505366707]
    close(call("apo_zero", example(), beta=BETA), [1.0, 0.9751451902, 0.9505366707])


def test_apo_down_hand_values():
    # σ(β·hw) + 1 − σ(β·h): [σ(0.1) + 1 − σ(0), σ(0.2) + 1 − σ(0.1), σ(0.3) + 1 − σ(0.2)]
    #   = [0.5249791875 + 0.5, 0.5498339973 + 0.4750208125, 0.5744425168 + 0.4501660027]
    close(call("apo_down", example(), beta=BETA), [1.0249791875, 1.0248548098, 1.0246085195])


# ---------------------------------------------------------------------------------------------------- batch-sorted


def test_aot_sorts_policy_and_reference_margins_separately():
    # Policy margins πw − πl = [4, 2, 3], reference margins rw − rl = [2, 2, 5].
    # Sorted: [2, 3, 4] − [2, 2, 5] = d = [0, 1, −1]; β·d = [0, 0.1, −0.1]
    #   → [sp(0), sp(0.1), sp(−0.1) = sp(0.1) + 0.1] = [0.6931471806, 0.6443966601, 0.7443966601]
    logps = t([-2.0, -4.0, -3.0]), t([-6.0, -6.0, -6.0]), t([-5.0, -5.0, -2.0]), t([-7.0, -7.0, -7.0])
    close(call("aot", logps, beta=BETA), [0.6931471806, 0.6443966601, 0.7443966601])
    # With ε = 0.1 each term gains ε·β·d (see cDPO above): [+0, +0.01, −0.01]
    close(call("aot", logps, beta=BETA, label_smoothing=0.1), [0.6931471806, 0.6543966601, 0.7343966601])


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_separately():
    # hw = [3, 1, 2], hl = [1, 0, 2]: sorted [1, 2, 3] − [0, 1, 2] = [1, 1, 1] → sp(0.1) three times,
    # where the paired differences hw − hl = [2, 1, 0] would give [sp(0.2), sp(0.1), sp(0)].
    logps = t([-2.0, -4.0, -3.0]), t([-6.0, -7.0, -5.0]), t([-5.0, -5.0, -5.0]), t([-7.0, -7.0, -7.0])
    close(call("aot_unpaired", logps, beta=BETA), [0.6443966601] * 3)


def test_aot_depends_on_the_micro_batch():
    # Documented: a pair's AOT loss depends on the other pairs it is sorted with, so two micro-batches are not
    # one batch (as in TRL, which sorts per device batch). Splitting the example above changes the total.
    logps = t([-2.0, -4.0, -3.0]), t([-6.0, -6.0, -6.0]), t([-5.0, -5.0, -2.0]), t([-7.0, -7.0, -7.0])
    whole = call("aot", logps, beta=BETA).sum()
    parts = sum(call("aot", [x[s] for x in logps], beta=BETA).sum() for s in (slice(0, 1), slice(1, 3)))
    # parts: pair 0 alone d = 4 − 2 = 2 → sp(0.2); pairs 1, 2: sorted [2, 3] − [2, 5] = [0, −2] → sp(0) + sp(−0.2)
    assert parts.item() == pytest.approx(0.5981388694 + 0.6931471806 + 0.7981388694)
    assert whole.item() == pytest.approx(0.6931471806 + 0.6443966601 + 0.7443966601)


# ---------------------------------------------------------------------------------------------------- reference-free


def test_simpo_hand_values_ignore_the_reference():
    # Per-token means: πw/|yw| = [−4/1, −3/2, −2/4] = [−4, −1.5, −0.5]; πl/|yl| = [−6/1, −6/1, −6/2] = [−6, −6, −3]
    # difference [2, 4.5, 2.5]; β = 1, γ = 2: [0, 2.5, 0.5] → [sp(0), sp(2.5), sp(0.5)]
    policy_chosen, policy_rejected, _, _ = example()
    expected = [0.6931471806, 0.0788897343, 0.4740769842]
    for ref in (t([0.0] * 3), t([-100.0, 3.0, 7.0])):  # any reference gives the same losses
        losses = LOSSES["simpo"].fn(
            policy_chosen,
            policy_rejected,
            ref,
            ref,
            beta=1.0,
            simpo_gamma=2.0,
            chosen_lengths=LENGTHS[0],
            rejected_lengths=LENGTHS[1],
        )
        close(losses, expected)


def test_cpo_preference_term_hand_values():
    # −log σ(β·(πw − πl)), πw − πl = [2, 3, 4], β = 0.5 → [sp(1), sp(1.5), sp(2)]
    policy_chosen, policy_rejected, _, _ = example()
    losses = LOSSES["cpo"].fn(policy_chosen, policy_rejected, None, None, beta=0.5)
    close(losses, [0.3132616875, 0.2014132780, 0.1269280110])


def orpo_example():
    # Responses chosen so that odds are round: mean per-token likelihood p̄ and odds p̄/(1 − p̄):
    #   p̄ = 0.5 → odds 1;  p̄ = 0.2 → odds 1/4;  p̄ = 0.8 → odds 4.
    # pair 0: p̄w = 0.5 (|yw| = 2), p̄l = 0.2 (|yl| = 1): odds ratio 4
    # pair 1: p̄w = 0.8 (|yw| = 1), p̄l = 0.5 (|yl| = 4): odds ratio 4
    # pair 2: p̄w = 0.5 (|yw| = 3), p̄l = 0.5 (|yl| = 2): odds ratio 1
    lengths = torch.tensor([2, 1, 3]), torch.tensor([1, 4, 2])
    chosen = t([2 * math.log(0.5), math.log(0.8), 3 * math.log(0.5)])  # summed log-probs = |y|·log p̄
    rejected = t([math.log(0.2), 4 * math.log(0.5), 2 * math.log(0.5)])
    return chosen, rejected, lengths


def test_orpo_odds_ratio_term_hand_values():
    # −β·log σ(log 4) = −β·log(4/5) = β·ln 1.25;  −β·log σ(0) = β·ln 2.  β = 0.1:
    #   [0.02231435513, 0.02231435513, 0.06931471806]
    chosen, rejected, lengths = orpo_example()
    losses = LOSSES["orpo"].fn(
        chosen, rejected, None, None, beta=BETA, chosen_lengths=lengths[0], rejected_lengths=lengths[1]
    )
    close(losses, [0.02231435513, 0.02231435513, 0.06931471806], atol=1e-11)


def test_sft_is_chosen_nll():
    # −πw = [4, 3, 2]; nothing else enters.
    close(call("sft", example()), [4.0, 3.0, 2.0])


# ---------------------------------------------------------------------------------------------------- f-divergences


def test_f_divergence_scores_hand_values():
    # t = π/π_ref = 2 (log-ratio ln 2) and t = ½ (log-ratio −ln 2):
    #   reverse KL: log t = ±0.6931471806
    #   forward KL: 1 − 1/t = 0.5 and −1
    #   JS: log(2t/(1+t)) = log(4/3) = 0.2876820725 and log(2/3) = −0.4054651081
    #   α = 0.5: (t^(−½) − 1)/(−½) = 2·(1 − 1/√2) = 0.5857864376 and 2·(1 − √2) = −0.8284271247
    policy, ref = t([math.log(2), -math.log(2)]), t([0.0, 0.0])
    close(_scores(policy, ref, "reverse_kl", 0.5), [0.6931471806, -0.6931471806])
    close(_scores(policy, ref, "forward_kl", 0.5), [0.5, -1.0])
    close(_scores(policy, ref, "js_divergence", 0.5), [0.2876820725, -0.4054651081])
    close(_scores(policy, ref, "alpha_divergence", 0.5), [0.5857864376, -0.8284271247])
    # TRL's α convention: α → 1 is reverse KL (within 1e-6, then exactly), α = 0 is forward KL.
    torch.testing.assert_close(_scores(policy, ref, "alpha_divergence", 1.0), _scores(policy, ref, "reverse_kl", 0))
    torch.testing.assert_close(_scores(policy, ref, "alpha_divergence", 0.0), _scores(policy, ref, "forward_kl", 0))


def test_f_divergence_changes_the_margin_of_the_loss():
    # One pair with hw = ln 2 (t = 2) and hl = −ln 2 (t = ½); β = 1.
    #   reverse KL: h = 2 ln 2 = 1.3862943611 → sp(1.3862943611) = log(1 + 1/4) = 0.2231435513
    #   forward KL: h = 0.5 − (−1) = 1.5 → sp(1.5) = 0.2014132780
    logps = t([math.log(2)]), t([-math.log(2)]), t([0.0]), t([0.0])
    close(call("sigmoid", logps, beta=1.0), [0.2231435513])
    close(call("sigmoid", logps, beta=1.0, f_divergence="forward_kl"), [0.2014132780])
    close(call("hinge", logps, beta=0.5, f_divergence="forward_kl"), [0.25])  # relu(1 − 0.5·1.5)


def test_losses_with_f_divergence_are_those_of_the_chosen_minus_rejected_difference():
    supported = {name for name in LOSSES if "f_divergence" in loss_params(name)}
    assert supported == {
        "sigmoid",
        "ipo",
        "ipo_sum",
        "sigmoid_norm",
        "hinge",
        "robust",
        "exo_pair",
        "discopop",
        "plackett_luce",
    }
    assert {name for name in supported if "f_alpha" in loss_params(name)} == supported
    assert set(F_DIVERGENCES) == {"reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"}


# ---------------------------------------------------------------------------------------------------- Plackett–Luce


def ranking_probability(rewards: list[float], order: tuple[int, ...]) -> float:
    """Eq. 18 of the DPO paper, written out: the probability of the ranking `order` (best first) of responses with
    these rewards, a product of "best of the rest" softmax terms."""
    p = 1.0
    for k, best in enumerate(order):
        p *= math.exp(rewards[best]) / sum(math.exp(rewards[j]) for j in order[k:])
    return p


def test_plackett_luce_by_hand():
    # Two groups of k = 2 rejected responses, β = 0.5, log-ratios hw (chosen) and hl_j (rejected):
    #   group 1: hw = 1, hl = [1, −1] → h = [0, 2] → log(1 + e^0 + e^(−1)) = log(2.3678794412) = 0.8619948041
    #   group 2: hw = 2, hl = [0, 0]  → h = [2, 2] → log(1 + 2e^(−1))     = log(1.7357588823) = 0.5514447139
    # Each pair carries its group's loss.
    logps = t([1.0, 1.0, 2.0, 2.0]), t([1.0, -1.0, 0.0, 0.0]), t([0.0] * 4), t([0.0] * 4)
    close(call("plackett_luce", logps, beta=0.5, group_size=2), [0.8619948041] * 2 + [0.5514447139] * 2)
    # π = π_ref: every h is 0 and the loss is log(k + 1); k = 3 gives ln 4.
    same = t([-3.0, -3.0, -3.0]), t([-4.0, -1.0, -9.0])
    close(call("plackett_luce", (*same, *same), beta=0.5, group_size=3), [math.log(4)] * 3)


def test_plackett_luce_of_one_rejected_response_is_dpo():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = example()
    logps = policy_chosen, policy_rejected, ref_chosen, ref_rejected
    torch.testing.assert_close(call("plackett_luce", logps, beta=BETA, group_size=1), call("sigmoid", logps, beta=BETA))


def test_plackett_luce_is_the_probability_that_the_chosen_response_ranks_first():
    # Independently of the closed form: sum Eq. 18 over the 3! orders of the rejected responses behind the chosen
    # one (response 0). Rewards are β·log-ratios; a group of k = 3, f-divergence reverse KL.
    import itertools

    beta, hw, hl = 0.7, 0.4, [1.3, -0.2, 0.9]
    rewards = [beta * hw] + [beta * x for x in hl]
    first = sum(ranking_probability(rewards, (0, *rest)) for rest in itertools.permutations([1, 2, 3]))
    logps = t([hw] * 3), t(hl), t([0.0] * 3), t([0.0] * 3)
    close(call("plackett_luce", logps, beta=beta, group_size=3), [-math.log(first)] * 3, atol=1e-12)


def test_plackett_luce_gradient_is_the_softmax_over_the_group():
    # ∂L/∂hw = −β·(1 − p_w) and ∂L/∂hl_j = β·p_j, with p the softmax of β·(hw, hl_1, ..., hl_k): group 1 of the
    # hand example (β = 0.5, hw = 1, hl = [1, −1]): p ∝ (e^0.5, e^0.5, e^−0.5). Summed over the k = 2 copies and
    # divided by k (the mean over pairs), the gradient of one group's loss.
    hw = t([1.0, 1.0]).requires_grad_()
    hl = t([1.0, -1.0]).requires_grad_()
    loss = call("plackett_luce", (hw, hl, t([0.0, 0.0]), t([0.0, 0.0])), beta=0.5, group_size=2).mean()
    loss.backward()
    z = 2 * math.exp(0.5) + math.exp(-0.5)
    p = [math.exp(0.5) / z, math.exp(0.5) / z, math.exp(-0.5) / z]
    assert hw.grad.sum().item() == pytest.approx(-0.5 * (1 - p[0]), abs=1e-12)
    close(hl.grad, [0.5 * p[1], 0.5 * p[2]], atol=1e-12)


def test_plackett_luce_groups_are_independent_and_unordered():
    torch.manual_seed(0)
    logps = [-10 * torch.rand(6, dtype=torch.float64) for _ in range(4)]
    logps[0] = logps[0][[0, 0, 0, 3, 3, 3]]  # one chosen response per group of 3
    logps[2] = logps[2][[0, 0, 0, 3, 3, 3]]
    whole = call("plackett_luce", logps, beta=0.3, group_size=3)
    for group in (slice(0, 3), slice(3, 6)):  # a group alone gives the same loss
        torch.testing.assert_close(
            call("plackett_luce", [x[group] for x in logps], beta=0.3, group_size=3), whole[group]
        )
    shuffled = [x[[2, 0, 1, 5, 3, 4]] for x in logps]  # the order of the rejected responses does not matter
    torch.testing.assert_close(call("plackett_luce", shuffled, beta=0.3, group_size=3), whole)
    with pytest.raises(ValueError, match="whole groups"):
        call("plackett_luce", [x[:4] for x in logps], beta=0.3, group_size=3)


# ---------------------------------------------------------------------------------------------------- properties

ALL_PARAMS = {
    "beta": BETA,
    "label_smoothing": 0.1,
    "simpo_gamma": 0.5,
    "discopop_tau": 0.05,
    "dpop_lambda": 50.0,
    "rdpo_alpha": 0.05,
    "cpo_alpha": 1.0,
    "f_divergence": "reverse_kl",
    "f_alpha": 0.5,
    "chosen_lengths": LENGTHS[0],
    "rejected_lengths": LENGTHS[1],
    "group_size": 1,
}


def kwargs_for(name, params=ALL_PARAMS):
    return {p: params[p] for p in loss_params(name) if p != LOSSES[name].nll}


@pytest.mark.parametrize("name", ["sigmoid", "robust", "sigmoid_norm", "dpop", "rdpo", "aot", "aot_unpaired"])
def test_ln2_when_policy_equals_reference(name):
    # π = π_ref → every log-ratio is 0 → −log σ(0) = ln 2, for any ε (R-DPO: equal lengths, so no length term).
    logps = torch.tensor([-3.0, -12.5]), torch.tensor([-4.0, -1.0])
    params = {
        **ALL_PARAMS,
        "beta": 0.5,
        "label_smoothing": 0.2,
        "chosen_lengths": torch.tensor([3, 5]),
        "rejected_lengths": torch.tensor([3, 5]),
    }
    losses = LOSSES[name].fn(logps[0], logps[1], logps[0].clone(), logps[1].clone(), **kwargs_for(name, params))
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))


# Raising the chosen log-prob lowers every loss on the example, and raising the rejected one raises it, except:
# sft ignores the rejected response; apo_down lowers both likelihoods by design (its chosen gradient is
# σ'(β·hw) − σ'(β·h) times β, whose sign depends on the pair); discopop is not monotone near x = β·h = 0, where
# its mix m = σ(x/τ) moves fast from the logistic to the exponential part (its hand values above rise from x = 0
# to x = 0.1: d/dx at 0 is −5·ln 2 − 0.25 + 5 − 0.5 = +0.78).
# The unpaired losses (kto, apo_zero_unpaired) have their own test: their sign depends on the example's label.
SIGNED = [name for name in LOSSES if name not in ("apo_down", "discopop") and not LOSSES[name].unpaired]


@pytest.mark.parametrize("name", SIGNED)
def test_raising_chosen_logp_lowers_loss(name):
    # On the example every loss is in its active region (hinge: β·h < 1; IPO, SPPO: below their targets).
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = example(requires_grad=True)
    LOSSES[name].fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs_for(name)).sum().backward()
    assert (policy_chosen.grad < 0).all()
    if name == "sft":
        assert policy_rejected.grad is None or (policy_rejected.grad == 0).all()
    else:
        assert (policy_rejected.grad > 0).all()
    if not LOSSES[name].needs_reference:  # reference-free: the reference gets no gradient and changes nothing
        assert ref_chosen.grad is None and ref_rejected.grad is None


def test_apo_down_lowers_a_chosen_response_better_than_the_reference():
    # hw = 3, hl = −3 (h = 6), β = 1: d/dπw = σ'(3) − σ'(6) = 0.0451766597 − 0.0024665093 > 0 (lowers πw),
    # with σ'(x) = σ(x)·(1 − σ(x)).
    policy_chosen = torch.tensor([-2.0], dtype=torch.float64, requires_grad=True)
    LOSSES["apo_down"].fn(policy_chosen, t([-10.0]), t([-5.0]), t([-7.0]), beta=1.0).sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(0.0451766597 - 0.0024665093, abs=1e-10)


def test_loss_params_and_registry():
    expected = {
        "sigmoid": {"beta", "label_smoothing", "f_divergence", "f_alpha"},
        "ipo": {"beta", "chosen_lengths", "rejected_lengths", "f_divergence", "f_alpha"},
        "ipo_sum": {"beta", "f_divergence", "f_alpha"},
        "sigmoid_norm": {"beta", "chosen_lengths", "rejected_lengths", "f_divergence", "f_alpha"},
        "hinge": {"beta", "f_divergence", "f_alpha"},
        "robust": {"beta", "label_smoothing", "f_divergence", "f_alpha"},
        "exo_pair": {"beta", "label_smoothing", "f_divergence", "f_alpha"},
        "nca_pair": {"beta"},
        "bco_pair": {"beta"},
        "sppo_hard": {"beta"},
        "apo_zero": {"beta"},
        "apo_down": {"beta"},
        "aot": {"beta", "label_smoothing"},
        "aot_unpaired": {"beta", "label_smoothing"},
        "discopop": {"beta", "discopop_tau", "f_divergence", "f_alpha"},
        "dpop": {"beta", "dpop_lambda"},
        "rdpo": {"beta", "rdpo_alpha", "chosen_lengths", "rejected_lengths"},
        "simpo": {"beta", "simpo_gamma", "label_smoothing", "chosen_lengths", "rejected_lengths"},
        "cpo": {"beta", "label_smoothing", "cpo_alpha"},
        "orpo": {"beta", "chosen_lengths", "rejected_lengths"},
        "sft": set(),
        "kto": {"beta", "labels", "kl", "desirable_weight", "undesirable_weight"},
        "apo_zero_unpaired": {"beta", "labels", "desirable_weight", "undesirable_weight"},
        "plackett_luce": {"beta", "group_size", "f_divergence", "f_alpha"},
    }
    assert {name: loss_params(name) for name in LOSSES} == expected
    assert OPTIONS == {
        "beta",
        "label_smoothing",
        "simpo_gamma",
        "cpo_alpha",
        "dpop_lambda",
        "rdpo_alpha",
        "discopop_tau",
        "f_divergence",
        "f_alpha",
        "desirable_weight",
        "undesirable_weight",
    }
    assert {name for name, spec in LOSSES.items() if spec.unpaired} == {"kto", "apo_zero_unpaired"}
    assert {name for name, spec in LOSSES.items() if not spec.needs_reference} == {"simpo", "cpo", "orpo", "sft"}
    assert {name for name, spec in LOSSES.items() if spec.normalize != "pairs"} == {"sft"}
    assert {name: spec.nll for name, spec in LOSSES.items() if spec.nll is not None} == {
        "cpo": "cpo_alpha",
        "orpo": 1.0,
    }
    assert all(spec.paper and spec.formula for spec in LOSSES.values())


def test_every_loss_option_is_a_config_field_with_the_losses_default():
    # The flag of an option has the loss function's own default wherever the function has one.
    import dataclasses

    from preftune.config import TrainConfig

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert OPTIONS <= set(fields)
    for name, spec in LOSSES.items():
        for param in inspect.signature(spec.fn).parameters.values():
            if param.name in OPTIONS and param.default is not inspect.Parameter.empty:
                assert fields[param.name] == param.default, (name, param.name)


# ---------------------------------------------------------------------------------------------------- combined


def combined(names, weights, logps, lengths, num_pairs, num_chosen_tokens, **options):
    options = {"beta": BETA, **options}
    return combined_loss(
        names,
        weights,
        policy_chosen_logps=logps[0],
        policy_rejected_logps=logps[1],
        ref_chosen_logps=logps[2],
        ref_rejected_logps=logps[3],
        chosen_lengths=lengths[0],
        rejected_lengths=lengths[1],
        num_pairs=num_pairs,
        num_chosen_tokens=num_chosen_tokens,
        **options,
    )


def test_combined_rpo_value():
    # RPO = sigmoid + 0.2·sft. Chosen lengths [1, 2, 4] → 7 chosen tokens.
    #   sigmoid part: (0.6931471806 + 0.6443966601 + 0.5981388694) / 3 pairs = 0.6452275700
    #   sft part:     0.2 · (4 + 3 + 2) / 7 tokens = 0.2571428571
    #   total = 0.9023704271
    loss = combined(
        ["sigmoid", "sft"], [1.0, 0.2], example(), LENGTHS, num_pairs=3, num_chosen_tokens=7, label_smoothing=0.0
    )
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.9023704271, abs=1e-9)


def test_combined_sft_alone_needs_no_reference():
    # 1.0 · (4 + 3 + 2) / 9 tokens = 1.0
    policy_chosen, policy_rejected, _, _ = example()
    loss = combined(
        ["sft"],
        [1.0],
        (policy_chosen, policy_rejected, None, None),
        (torch.tensor([3, 3, 3]), torch.tensor([1, 1, 1])),
        num_pairs=3,
        num_chosen_tokens=9,
    )
    assert loss.item() == pytest.approx(1.0)


def test_combined_cpo_adds_the_chosen_nll_weighted_by_cpo_alpha():
    # CPO, β = 0.5, α = 0.3: preference term (sp(1) + sp(1.5) + sp(2)) / 3 = 0.6416029765 / 3 = 0.2138676588
    #   NLL term: 0.3 · (4 + 3 + 2) / 7 chosen tokens = 0.3857142857  → 0.5995819445
    policy_chosen, policy_rejected, _, _ = example()
    loss = combined(
        ["cpo"],
        [1.0],
        (policy_chosen, policy_rejected, None, None),
        LENGTHS,
        num_pairs=3,
        num_chosen_tokens=7,
        beta=0.5,
        cpo_alpha=0.3,
    )
    assert loss.item() == pytest.approx(0.5995819445, abs=1e-9)
    with pytest.raises(KeyError):  # cpo_alpha has no default outside the config: a direct call must give it
        combined(["cpo"], [1.0], (policy_chosen, policy_rejected, None, None), LENGTHS, 3, 7, beta=0.5)


def test_combined_orpo_is_nll_plus_odds_ratio_term():
    # NLL: −(2 ln ½ + ln 0.8 + 3 ln ½) / (2 + 1 + 3) = (5 ln 2 − ln 0.8) / 6 = (3.4657359028 + 0.2231435513) / 6
    #   = 0.6148132424;  odds-ratio term (β = 0.1): (2 · 0.02231435513 + 0.06931471806) / 3 = 0.0379811428
    #   → 0.6527943852
    chosen, rejected, lengths = orpo_example()
    loss = combined(["orpo"], [1.0], (chosen, rejected, None, None), lengths, num_pairs=3, num_chosen_tokens=6)
    assert loss.item() == pytest.approx(0.6527943852, abs=1e-9)


def test_combined_rejects_mismatched_weights():
    with pytest.raises(ValueError):
        combined(["sigmoid", "sft"], [1.0], example(), (torch.ones(3), torch.ones(3)), 3, 3)


# Unpaired losses take labels (and kto the micro-batch's KL estimate) and train alone: tests/test_unpaired.py.
PER_PAIR_LOSSES = [name for name in LOSSES if name not in ("aot", "aot_unpaired") and not LOSSES[name].unpaired]


def test_grad_accumulation_equals_one_batch():
    # Two half batches, each normalised by the GLOBAL totals, summed = the full batch: values and gradients, for
    # every loss whose per-pair value depends on that pair only (all but aot, aot_unpaired), and the NLL terms.
    torch.manual_seed(0)
    weights = [0.1 + 0.05 * i for i in range(len(PER_PAIR_LOSSES))]
    leaves = [(-20 * torch.rand(6, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    refs = [-20 * torch.rand(6, dtype=torch.float64) for _ in range(2)]
    lengths = torch.tensor([3, 7, 1, 12, 5, 2]), torch.tensor([4, 4, 9, 1, 6, 3])
    totals = {"num_pairs": 6, "num_chosen_tokens": int(lengths[0].sum())}
    options = {k: v for k, v in ALL_PARAMS.items() if k in OPTIONS}

    full = combined(PER_PAIR_LOSSES, weights, (*leaves, *refs), lengths, **totals, **options)
    full_grads = torch.autograd.grad(full, leaves)

    halves = [
        combined(
            PER_PAIR_LOSSES, weights, [x[s] for x in (*leaves, *refs)], [x[s] for x in lengths], **totals, **options
        )
        for s in (slice(0, 2), slice(2, 6))
    ]  # unequal halves
    accumulated = halves[0] + halves[1]
    accumulated_grads = torch.autograd.grad(accumulated, leaves)

    torch.testing.assert_close(accumulated, full)
    for got, want in zip(accumulated_grads, full_grads):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------- rewards


def test_rewards_and_pair_metrics():
    # rewards = β·(π − π_ref): chosen 0.1·[1, 2, 3] = [0.1, 0.2, 0.3], rejected 0.1·[1, 1, 1].
    # accuracies: chosen > rejected strictly, so the tie in pair 0 counts as 0 (as TRL).
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = example(requires_grad=True)
    close(rewards(policy_chosen, ref_chosen, BETA).detach(), [0.1, 0.2, 0.3])
    metrics = pair_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA)
    expected = {
        "rewards/chosen": [0.1, 0.2, 0.3],
        "rewards/rejected": [0.1, 0.1, 0.1],
        "rewards/accuracies": [0.0, 1.0, 1.0],
        "rewards/margins": [0.0, 0.1, 0.2],
        "logps/chosen": [-4.0, -3.0, -2.0],
        "logps/rejected": [-6.0, -6.0, -6.0],
    }
    assert set(metrics) == set(expected)
    for key, values in expected.items():
        assert not metrics[key].requires_grad, key
        torch.testing.assert_close(metrics[key], torch.tensor(values, dtype=metrics[key].dtype), msg=key)


def test_length_normalised_and_reference_free_rewards():
    # Lengths chosen [1, 2, 4], rejected [1, 1, 2], β = 0.1:
    #   logratio_per_token: chosen 0.1·[1/1, 2/2, 3/4] = [0.1, 0.1, 0.075], rejected 0.1·[1, 1, 0.5]
    #     → margins [0, 0, 0.025], accuracies [0, 0, 1]  (the summed rewards would win pair 1 too)
    #   logp: β·π: chosen [−0.4, −0.3, −0.2], rejected [−0.6, −0.6, −0.6]
    #   logp_per_token: chosen 0.1·[−4, −1.5, −0.5], rejected 0.1·[−6, −6, −3]
    logps = example()
    per_token = pair_metrics(
        *logps, BETA, reward="logratio_per_token", chosen_lengths=LENGTHS[0], rejected_lengths=LENGTHS[1]
    )
    close(per_token["rewards/chosen"], [0.1, 0.1, 0.075])
    close(per_token["rewards/rejected"], [0.1, 0.1, 0.05])
    close(per_token["rewards/margins"], [0.0, 0.0, 0.025])
    close(per_token["rewards/accuracies"], [0.0, 0.0, 1.0])
    close(per_token["logps/chosen"], [-4.0, -3.0, -2.0])  # log-probs stay summed
    logp = pair_metrics(*logps, BETA, reward="logp")
    close(logp["rewards/chosen"], [-0.4, -0.3, -0.2])
    close(logp["rewards/rejected"], [-0.6, -0.6, -0.6])
    mean_logp = pair_metrics(
        *logps, BETA, reward="logp_per_token", chosen_lengths=LENGTHS[0], rejected_lengths=LENGTHS[1]
    )
    close(mean_logp["rewards/chosen"], [-0.4, -0.15, -0.05])
    close(mean_logp["rewards/rejected"], [-0.6, -0.6, -0.3])


def test_a_margin_within_the_rounding_of_the_logps_is_a_tie():
    # Policy (πw, πl) = (−10, −12), reference (rw, rl) = (−10 − d, −12), β = 0.1: the margin is β·d.
    # Band (float32): β·1e-5·(10 + 10 + d + 12 + 12) ≈ 0.1·1e-5·44 = 4.4e-5, i.e. d ≈ 4.4e-4 in log-prob.
    #   d = 1e-5 (rounding of a cached reference): margin 1e-6 < band → a tie, not a win.
    #   d = 1e-3: margin 1e-4 > band → a win.     bfloat16's band is 200 times wider: d = 1e-3 is a tie there.
    policy_chosen, policy_rejected = torch.tensor([-10.0, -10.0]), torch.tensor([-12.0, -12.0])
    ref_chosen, ref_rejected = (
        torch.tensor([-10.0 - 1e-5, -10.0 - 1e-3], dtype=torch.float64),
        torch.tensor([-12.0, -12.0], dtype=torch.float64),
    )
    policy_chosen, policy_rejected = policy_chosen.double(), policy_rejected.double()
    band = tie_band(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA)
    close(band, [0.1 * 1e-5 * (44 + 1e-5), 0.1 * 1e-5 * (44 + 1e-3)])
    metrics = pair_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA)
    close(metrics["rewards/margins"], [1e-6, 1e-4])
    close(metrics["rewards/accuracies"], [0.0, 1.0])
    wide = pair_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA, tie_rtol=TIE_RTOL["bfloat16"])
    close(wide["rewards/accuracies"], [0.0, 0.0])
    # A per-token reward divides each response's share of the band by its length, as it divides the reward.
    lengths = torch.tensor([4.0, 4.0]), torch.tensor([2.0, 2.0])
    close(
        tie_band(policy_chosen, policy_rejected, ref_chosen, ref_rejected, BETA, "logratio_per_token", *lengths),
        [0.1 * 1e-5 * ((20 + 1e-5) / 4 + 24 / 2), 0.1 * 1e-5 * ((20 + 1e-3) / 4 + 24 / 2)],
    )


def test_reward_kind_follows_the_first_loss_that_defines_one():
    assert reward_kind(["sigmoid"]) == "logratio"
    assert reward_kind(["ipo"]) == reward_kind(["sigmoid_norm"]) == "logratio_per_token"
    assert reward_kind(["simpo"]) == reward_kind(["orpo"]) == "logp_per_token"
    assert reward_kind(["cpo"]) == "logp"
    assert reward_kind(["sft", "simpo"]) == "logp_per_token"  # sft defines none
    assert reward_kind(["sft"]) == "logratio"  # with zero reference log-probs: β·log π
    assert reward_kind(["sigmoid_norm", "sigmoid"]) == "logratio_per_token"


# ---------------------------------------------------------------------------------------------------- the config


def resolve(**values):
    from preftune.config import resolve as resolve_config

    return resolve_config({"model": "m", "data": "d", "output": "o", **values})[0]


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loss": "hinge", "label_smoothing": 0.1}, "--label-smoothing has no effect with --loss hinge"),
        ({"loss": "sigmoid", "simpo_gamma": 1.0}, "--simpo-gamma has no effect with --loss sigmoid"),
        ({"loss": "simpo", "cpo_alpha": 0.5}, "--cpo-alpha has no effect with --loss simpo"),
        ({"loss": "sigmoid", "dpop_lambda": 5.0}, "--dpop-lambda has no effect with --loss sigmoid"),
        ({"loss": "sigmoid", "discopop_tau": 0.1}, "--discopop-tau has no effect with --loss sigmoid"),
        ({"loss": "nca_pair", "f_divergence": "forward_kl"}, "--f-divergence has no effect with --loss nca_pair"),
        (
            {"loss": "sigmoid,nca_pair", "f_divergence": "js_divergence"},
            "--f-divergence js_divergence is not defined for --loss nca_pair",
        ),
        ({"loss": "sigmoid", "f_alpha": 0.3}, "--f-alpha has no effect without --f-divergence alpha_divergence"),
        (
            {"loss": "sigmoid", "f_divergence": "forward_kl", "f_alpha": 0.3},
            "--f-alpha has no effect without --f-divergence alpha_divergence",
        ),
        ({"loss": "exo_pair"}, r"--label-smoothing must be in \(0, 1\) for the exo_pair loss"),
        ({"loss": "rdpo"}, "--loss rdpo needs --rdpo-alpha"),
        ({"loss": "rdpo", "rdpo_alpha": -0.1}, "--rdpo-alpha must be zero or positive, got -0.1"),
        ({"loss": "simpo", "simpo_gamma": float("nan")}, "--simpo-gamma must be zero or positive, got nan"),
        ({"loss": "discopop", "discopop_tau": 0.0}, "--discopop-tau must be positive, got 0.0"),
        ({"loss": "sft", "beta": 0.2}, "--beta has no effect with --loss sft"),
        ({"loss": "simpo", "ref_model": "r"}, "--ref-model has no effect with --loss simpo"),
    ],
)
def test_config_rejects_loss_options_that_do_nothing_or_are_out_of_range(values, message):
    with pytest.raises(UserError, match=message):
        resolve(**values)


def test_config_accepts_the_options_its_losses_use():
    cfg = resolve(loss="sigmoid,sft", f_divergence="alpha_divergence", f_alpha=0.3, loss_weights="1,0.2")
    assert (cfg.f_divergence, cfg.f_alpha, cfg.needs_reference) == ("alpha_divergence", 0.3, True)
    cfg = resolve(loss="simpo", simpo_gamma=1.0, beta=2.0, label_smoothing=0.1)
    assert not cfg.needs_reference
    assert resolve(loss="exo_pair", label_smoothing=1e-3).label_smoothing == 1e-3
    assert resolve(loss="rdpo", rdpo_alpha=0.05).rdpo_alpha == 0.05
    assert not resolve(loss="orpo").needs_reference and not resolve(loss="cpo", cpo_alpha=0.0).needs_reference


def test_reference_free_loss_trains_without_any_reference(tmp_path, monkeypatch):
    """`preftune train --loss simpo` builds no reference model and writes no reference cache."""
    import json

    from preftune import recipe as train_module
    from preftune.cli import main

    from toy import counting_pairs, save_model_folder, write_jsonl

    cache = tmp_path / "cache"
    monkeypatch.setenv("PREFTUNE_CACHE", str(cache))
    monkeypatch.setattr(train_module, "attach_reference", lambda s: pytest.fail("a reference was attached"))
    model = save_model_folder(tmp_path / "model")
    data = write_jsonl(counting_pairs(16, seed=1), tmp_path / "train.jsonl")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--output",
                str(out),
                "--batch-size",
                "8",
                "--max-steps",
                "3",
                "--learning-rate",
                "1e-3",
                "--loss",
                "simpo",
                "--beta",
                "2.0",
                "--no-report",
            ]
        )
        == 0
    )
    assert not cache.exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    # SimPO's reward is β × the mean per-token log-prob: negative, and far smaller in size than β × the sum.
    first = records[0]
    assert first["logps/chosen"] < 0 and 2.0 * first["logps/chosen"] < first["rewards/chosen"] < 0
    assert records[2]["loss"] < records[0]["loss"]


def test_a_new_loss_is_one_registry_entry(tmp_path, monkeypatch):
    """A loss added to LOSSES alone (no change to config, the trainer or the CLI) trains through `preftune train`:
    its declared range is checked up front, the option it refuses is refused, and its value is what it computes."""
    import json

    from preftune.cli import main
    from preftune.losses import LossSpec, Range, _ranged

    from toy import counting_pairs, save_model_folder, write_jsonl

    @_ranged(beta=Range(0.0, 1.0, "(]"))
    def squared_margin(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
        """(1 − β·h)²: at π = π_ref, h = 0 and the loss is 1."""
        h = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
        return (1 - beta * h) ** 2

    monkeypatch.setitem(
        LOSSES,
        "squared_margin",
        LossSpec(squared_margin, True, "(1 − βh)²", "a test", refuses={"wpo": "--wpo: not with --loss {name}"}),
    )
    model = save_model_folder(tmp_path / "model")
    data = write_jsonl(counting_pairs(16, seed=1), tmp_path / "train.jsonl")

    def train(name: str, *extra: str) -> int:
        return main(
            [
                "train",
                "--model",
                str(model),
                "--data",
                str(data),
                "--output",
                str(tmp_path / name),
                "--batch-size",
                "8",
                "--max-steps",
                "2",
                "--learning-rate",
                "1e-3",
                "--loss",
                "squared_margin",
                "--no-report",
                *extra,
            ]
        )

    assert train("run") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["loss"] == pytest.approx(1.0, abs=1e-5) and records[1]["loss"] < records[0]["loss"]
    assert train("too-large", "--beta", "2") == 2 and not (tmp_path / "too-large").exists()
    assert train("refused", "--wpo") == 2


# ---------------------------------------------------------------------------------------------------- TRL's formulas


def _logsigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _sigmoid(x):
    return math.exp(_logsigmoid(x))


def trl_scores(x, f_divergence, alpha):
    """TRL 1.16 `_compute_loss`: chosen_scores / rejected_scores from a log-ratio, per f_divergence_type."""
    if f_divergence == "forward_kl":
        return 1 - math.exp(-x)
    if f_divergence == "js_divergence":
        return math.log(2) + _logsigmoid(x)
    if f_divergence == "alpha_divergence":
        return (math.exp(min((alpha - 1.0) * x, 80.0)) - 1.0) * (1.0 / (alpha - 1.0))
    return x


def trl_formula(name, pc, pr, rc, rr, lc, lr, beta, eps, tau=0.05, gamma=0.5, f_div="reverse_kl", alpha=0.5):
    """TRL 1.16 (DPOTrainer._compute_loss; CPOTrainer.cpo_loss; ORPOTrainer.odds_ratio_loss), one pair, restated
    independently with Python floats."""
    ls, sig = _logsigmoid, _sigmoid
    cl, rl = pc - rc, pr - rr
    cs, rs = trl_scores(cl, f_div, alpha), trl_scores(rl, f_div, alpha)
    delta = cs - rs
    if name == "sigmoid":  # -F.logsigmoid(beta * delta_score)
        return -ls(beta * delta)
    if name == "cdpo":  # the DPO authors' preference_loss with label_smoothing (TRL 1.16 has no cDPO)
        return -ls(beta * delta) * (1 - eps) - ls(-beta * delta) * eps
    if name == "hinge":  # torch.relu(1 - beta * delta_score)
        return max(0.0, 1 - beta * delta)
    if name == "ipo":  # ((chosen/len_c - rejected/len_r) - 1/(2 beta))**2, lengths clamp(min=1)
        return (cs / max(lc, 1) - rs / max(lr, 1) - 1 / (2 * beta)) ** 2
    if name == "robust":  # (clean - flipped) / (1 - 2 eps)
        return (-(1 - eps) * ls(beta * delta) + eps * ls(-beta * delta)) / (1 - 2 * eps)
    if name == "exo_pair":  # qw * (log_qw - log_pw) + ql * (log_ql - log_pl)
        qw, ql = sig(beta * delta), sig(-beta * delta)
        return qw * (ls(beta * delta) - math.log1p(-eps)) + ql * (ls(-beta * delta) - math.log(eps))
    if name == "nca_pair":
        return -ls(beta * cl) - 0.5 * ls(-beta * cl) - 0.5 * ls(-beta * rl)
    if name == "bco_pair":
        return -ls(beta * cl) - ls(-beta * rl)
    if name == "sppo_hard":
        return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if name == "apo_zero":
        return (1 - sig(beta * cl)) + sig(beta * rl)
    if name == "apo_down":
        return sig(beta * cl) + (1 - sig(beta * (cl - rl)))
    if name == "discopop":
        logits = delta * beta
        modulation = sig(logits / tau)
        return -ls(logits) * (1 - modulation) + math.exp(-logits) * modulation
    if name == "sigmoid_norm":
        return -ls(beta * (cs / max(lc, 1) - rs / max(lr, 1)))
    if name == "simpo":  # CPOTrainer: logits = avg_c - avg_r - gamma / beta, label smoothing as cDPO
        logits = pc / lc - pr / lr - gamma / beta
        return -ls(beta * logits) * (1 - eps) - ls(-beta * logits) * eps
    if name == "cpo":  # CPOTrainer, loss_type="sigmoid": logits = pc - pr
        return -ls(beta * (pc - pr)) * (1 - eps) - ls(-beta * (pc - pr)) * eps
    if name == "orpo":  # ORPOTrainer: loss = nll - mean(beta * logsigmoid(log_odds)), on mean log-probs

        def log1mexp(x):
            return math.log1p(-math.exp(x)) if x < -0.6931471805599453 else math.log(-math.expm1(x))

        mc, mr = pc / lc, pr / lr
        return -beta * ls((mc - mr) - (log1mexp(mc) - log1mexp(mr)))
    raise AssertionError(name)


def trl_aot(name, pc, pr, rc, rr, beta, eps):
    """TRL 1.16 aot / aot_unpaired: sorted over the batch, then the smoothed logistic loss, element by element."""
    if name == "aot":
        first, second = sorted(a - b for a, b in zip(pc, pr)), sorted(a - b for a, b in zip(rc, rr))
    else:
        first, second = sorted(a - b for a, b in zip(pc, rc)), sorted(a - b for a, b in zip(pr, rr))
    return [
        -_logsigmoid(beta * (a - b)) * (1 - eps) - _logsigmoid(-beta * (a - b)) * eps for a, b in zip(first, second)
    ]


TRL_CASES = [  # (our loss, TRL restatement, ε, f-divergence, α)
    ("sigmoid", "sigmoid", 0.0, "reverse_kl", 0.5),
    ("sigmoid", "cdpo", 0.15, "reverse_kl", 0.5),
    ("ipo", "ipo", 0.0, "reverse_kl", 0.5),
    ("hinge", "hinge", 0.0, "reverse_kl", 0.5),
    ("robust", "robust", 0.15, "reverse_kl", 0.5),
    ("exo_pair", "exo_pair", 1e-3, "reverse_kl", 0.5),
    ("nca_pair", "nca_pair", 0.0, "reverse_kl", 0.5),
    ("bco_pair", "bco_pair", 0.0, "reverse_kl", 0.5),
    ("sppo_hard", "sppo_hard", 0.0, "reverse_kl", 0.5),
    ("apo_zero", "apo_zero", 0.0, "reverse_kl", 0.5),
    ("apo_down", "apo_down", 0.0, "reverse_kl", 0.5),
    ("discopop", "discopop", 0.0, "reverse_kl", 0.5),
    ("sigmoid_norm", "sigmoid_norm", 0.0, "reverse_kl", 0.5),
    ("simpo", "simpo", 0.1, "reverse_kl", 0.5),
    ("cpo", "cpo", 0.1, "reverse_kl", 0.5),
    ("orpo", "orpo", 0.0, "reverse_kl", 0.5),
    ("sigmoid", "sigmoid", 0.0, "forward_kl", 0.5),
    ("sigmoid", "sigmoid", 0.0, "js_divergence", 0.5),
    ("sigmoid", "sigmoid", 0.0, "alpha_divergence", 0.3),
    ("ipo", "ipo", 0.0, "js_divergence", 0.5),
    ("hinge", "hinge", 0.0, "alpha_divergence", 0.7),
    ("robust", "robust", 0.15, "forward_kl", 0.5),
    ("exo_pair", "exo_pair", 1e-3, "js_divergence", 0.5),
    ("discopop", "discopop", 0.0, "alpha_divergence", 0.5),
    ("sigmoid_norm", "sigmoid_norm", 0.0, "forward_kl", 0.5),
]


@pytest.mark.parametrize(
    "name, restated, eps, f_div, alpha", TRL_CASES, ids=[f"{c[1]}-{c[3]}-{c[4]}" for c in TRL_CASES]
)
def test_parity_with_trl_formulas(name, restated, eps, f_div, alpha):
    torch.manual_seed(1)
    # Log-ratios within ±3 so that forward KL's e^(−x) and the α-divergence stay moderate; lengths ≥ 1 for the
    # per-token means of the reference-free losses (TRL does not clamp those), 0 allowed for ipo / sigmoid_norm.
    policy = [-30 * torch.rand(8, dtype=torch.float64) for _ in range(2)]
    refs = [p + 6 * torch.rand(8, dtype=torch.float64) - 3 for p in policy]
    logps = [policy[0], policy[1], refs[0], refs[1]]
    low = 0 if name in ("ipo", "sigmoid_norm") else 1
    lengths = torch.randint(low, 20, (8,)), torch.randint(low, 20, (8,))
    beta = 0.25
    params = {
        "beta": beta,
        "label_smoothing": eps,
        "chosen_lengths": lengths[0],
        "rejected_lengths": lengths[1],
        "discopop_tau": 0.05,
        "simpo_gamma": 0.5,
        "f_divergence": f_div,
        "f_alpha": alpha,
    }
    got = LOSSES[name].fn(*logps, **{p: params[p] for p in loss_params(name) if p in params})
    want = [
        trl_formula(restated, *(float(x[i]) for x in (*logps, *lengths)), beta, eps, f_div=f_div, alpha=alpha)
        for i in range(8)
    ]
    torch.testing.assert_close(got, t(want), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_parity_with_trl_aot(name, eps):
    torch.manual_seed(2)
    logps = [-30 * torch.rand(8, dtype=torch.float64) for _ in range(4)]
    got = LOSSES[name].fn(*logps, beta=0.25, label_smoothing=eps)
    want = trl_aot(name, *([float(v) for v in x] for x in logps), 0.25, eps)
    torch.testing.assert_close(got, t(want), rtol=1e-12, atol=1e-12)


def _source(module: str, function: str) -> str:
    owner = pytest.importorskip(module)
    cls, method = function.split(".")
    return " ".join(inspect.getsource(getattr(getattr(owner, cls), method)).split())


def test_restated_formulas_are_those_of_installed_trl():
    # Ties the restatements above to the source they restate: if TRL changes a formula, this fails first.
    dpo = _source("trl.trainer.dpo_trainer", "DPOTrainer._compute_loss")
    for line in [
        "chosen_scores = 1 - torch.exp(-chosen_logratios)",
        "chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)",
        "if abs(self.f_alpha_divergence_coef - 1.0) < 1e-6:",
        "coef = 1.0 / (self.f_alpha_divergence_coef - 1.0)",
        "t_chosen = (self.f_alpha_divergence_coef - 1.0) * chosen_logratios",
        "clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[dtype]",
        "chosen_scores = (torch.exp(t_chosen_float) - 1.0).to(dtype) * coef",
        "delta_score = chosen_scores - rejected_scores",
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",
        "qw = torch.sigmoid(self.beta * delta_score)",
        "log_pw = torch.log1p(-epsilon)",
        "log_pl = torch.log(epsilon)",
        "per_sequence_loss = qw * (log_qw - log_pw) + ql * (log_ql - log_pl)",
        "-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)",
        "clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)",
        "flipped_loss_term = -self.label_smoothing * F.logsigmoid(-self.beta * delta_score)",
        "per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)",
        "per_sequence_loss = -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)",
        "winner_margin_error = (chosen_logratios - 0.5 / self.beta) ** 2",
        "loser_margin_error = (rejected_logratios + 0.5 / self.beta) ** 2",
        "logratios = chosen_logps - rejected_logps",
        "ref_logratios = ref_chosen_logps - ref_rejected_logps",
        "delta = logratios_sorted - ref_logratios_sorted",
        "delta = chosen_logratios_sorted - rejected_logratios_sorted",
        (
            "-F.logsigmoid(self.beta * delta) * (1 - self.label_smoothing) "
            "- F.logsigmoid(-self.beta * delta) * self.label_smoothing"
        ),
        "losses_chosen = 1 - torch.sigmoid(self.beta * chosen_logratios)",
        "losses_rejected = torch.sigmoid(self.beta * rejected_logratios)",
        "losses_chosen = torch.sigmoid(self.beta * chosen_logratios)",
        "losses_rejected = 1 - torch.sigmoid(self.beta * (chosen_logratios - rejected_logratios))",
        "logits = delta_score * self.beta",
        "log_ratio_modulation = torch.sigmoid(logits / self.args.discopop_tau)",
        "logistic_component * (1 - log_ratio_modulation) + exp_component * log_ratio_modulation",
        "batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()",
        "delta = chosen_avg_score - rejected_avg_score",
        "loss += per_sequence_loss.mean() * loss_weight",
        "chosen_rewards = self.beta * chosen_logratios.detach()",
        "reward_accuracies = (chosen_rewards > rejected_rewards).float()",
    ]:
        assert line in dpo, line
    cpo = _source("trl.experimental.cpo.cpo_trainer", "CPOTrainer.cpo_loss")
    for line in [
        "logits = (policy_chosen_logps - policy_rejected_logps).to(self.accelerator.device)",
        "gamma_logratios = self.simpo_gamma / self.beta",
        "logits = logits - gamma_logratios",
        (
            "-F.logsigmoid(self.beta * logits) * (1 - self.label_smoothing) "
            "- F.logsigmoid(-self.beta * logits) * self.label_smoothing"
        ),
        "chosen_rewards = self.beta * (policy_chosen_logps.to(self.accelerator.device)).detach()",
    ]:
        assert line in cpo, line
    cpo_forward = _source("trl.experimental.cpo.cpo_trainer", "CPOTrainer.concatenated_forward")
    assert 'average_log_prob=self.loss_type in ["ipo", "simpo"]' in cpo_forward
    cpo_metrics = _source("trl.experimental.cpo.cpo_trainer", "CPOTrainer.get_batch_loss_metrics")
    assert "loss = losses.mean() + self.cpo_alpha * policy_nll_loss" in cpo_metrics
    orpo = _source("trl.experimental.orpo.orpo_trainer", "ORPOTrainer.odds_ratio_loss")
    for line in [
        (
            "log_odds = (policy_chosen_logps - policy_rejected_logps) - ( log1mexp(policy_chosen_logps) - "
            "log1mexp(policy_rejected_logps) )"
        ),
        "ratio = F.logsigmoid(log_odds)",
        "losses = self.beta * ratio",
    ]:
        assert line in orpo, line
    orpo_metrics = _source("trl.experimental.orpo.orpo_trainer", "ORPOTrainer.get_batch_loss_metrics")
    assert "loss = policy_nll_loss - losses.mean()" in orpo_metrics
    orpo_forward = _source("trl.experimental.orpo.orpo_trainer", "ORPOTrainer.concatenated_forward")
    assert "average_log_prob=True" in orpo_forward
    # A documented difference: TRL's ORPO NLL also counts the prompt tokens; preftune's is over the response.
    assert "orpo chosen nll loss is computed over the full prompt and response" in orpo_forward


def test_sft_parity_with_trl_token_mean():
    # TRL: -chosen_per_token_logps[chosen_mask].mean(), the mean over every chosen token of the batch.
    # Per-token log-probs of two chosen responses (3 and 1 tokens): the sequence sums are what preftune gets.
    per_token = [[-0.5, -1.5, -2.0], [-4.0]]
    trl_value = -sum(sum(row) for row in per_token) / 4  # (0.5 + 1.5 + 2 + 4) / 4 = 2.0
    policy_chosen = torch.tensor([sum(row) for row in per_token])
    loss = combined(
        ["sft"],
        [1.0],
        (policy_chosen, torch.zeros(2), None, None),
        (torch.tensor([3, 1]), torch.tensor([1, 1])),
        num_pairs=2,
        num_chosen_tokens=4,
    )
    assert loss.item() == pytest.approx(trl_value) == 2.0


# ---------------------------------------------------------------------------------------------------- WPO


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are the same vector at every position: per-token probabilities known by hand."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.logits = torch.tensor(logits)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, len(self.logits)).clone())


def test_wpo_log_weights_hand_values():
    # Logits [ln 3, 0] over 2 tokens: p = (3/4, 1/4), Σ_v p(v)² = 9/16 + 1/16 = 5/8.
    #   token 0: log(3/4) − log(5/8) = log(6/5) = 0.1823215568;  token 1: log(1/4) − log(5/8) = log(2/5) = −0.9162907319
    # Pair: prompt [1], chosen [0, 1, 0] → mean (2·0.1823215568 − 0.9162907319)/3 = −0.1838825394;
    # rejected [1] → −0.9162907319. (Uniform logits would give log(1/V) − log(1/V) = 0: weight 1.)
    from preftune.data.batching import collate_padded
    from preftune.data.tokenize import TokenizedPair
    from preftune.logps import compute_logps, compute_logps_wpo

    batch = collate_padded([TokenizedPair([1], [0, 1, 0], [1], "p")], [0], pad_id=1)
    model = FixedLogits([math.log(3.0), 0.0])
    *logps, chosen_w, rejected_w = compute_logps_wpo(model, batch)
    for got, want in zip(logps, compute_logps(model, batch)):  # the log-probs are compute_logps' own
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert chosen_w.item() == pytest.approx(-0.1838825394, abs=1e-6)
    assert rejected_w.item() == pytest.approx(-0.9162907319, abs=1e-6)
    assert not chosen_w.requires_grad


def test_wpo_log_weights_agree_between_layouts_and_with_full_logits():
    from preftune.data.batching import collate_packed, collate_padded
    from preftune.data.tokenize import TokenizedPair
    from preftune.logps import compute_logps, compute_logps_wpo

    from toy import build_model

    model = build_model(40, seed=1)
    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(3, 40, (n,), generator=gen).tolist()

    pairs = [TokenizedPair(ids(4), ids(3), ids(5), "a"), TokenizedPair(ids(2), ids(6), ids(1), "b")]
    padded = collate_padded(pairs, [0, 1], pad_id=0)
    # Naive: full logits of each plain sequence, mean over its response tokens of log p − log Σ p².
    naive = []
    for pair in pairs:
        for response in (pair.chosen_ids, pair.rejected_ids):
            sequence = torch.tensor([pair.prompt_ids + response])
            logp = model(sequence).logits[0, :-1].double().log_softmax(-1)
            start = len(pair.prompt_ids) - 1
            terms = [
                logp[start + k, token] - torch.logsumexp(2 * logp[start + k], 0) for k, token in enumerate(response)
            ]
            naive.append(sum(terms).item() / len(response))
    naive = torch.tensor(naive, dtype=torch.float64).view(2, 2).t()  # [chosen of both pairs], [rejected ...]
    with torch.no_grad():
        for batch in (padded, collate_packed(pairs, [0, 1], pad_id=0)):
            *logps, chosen_w, rejected_w = compute_logps_wpo(model, batch)
            for got, want in zip(logps, compute_logps(model, batch)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            torch.testing.assert_close(torch.stack([chosen_w, rejected_w]).double(), naive, rtol=0, atol=1e-5)


def test_pair_weights_scale_the_pair_losses_not_the_nll():
    # sigmoid + 0.2·sft with pair weights [1, 0.5, 0]:
    #   (0.6931471806·1 + 0.6443966601·0.5 + 0) / 3 = 1.0153455107 / 3 = 0.3384485036;  sft unweighted: 0.2·9/7
    #   = 0.2571428571
    loss = combined(
        ["sigmoid", "sft"],
        [1.0, 0.2],
        example(),
        LENGTHS,
        num_pairs=3,
        num_chosen_tokens=7,
        pair_weights=t([1.0, 0.5, 0.0]),
    )
    assert loss.item() == pytest.approx(0.3384485036 + 0.2571428571, abs=1e-9)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loss": "aot", "wpo": True}, "--wpo cannot weight --loss aot: it sorts the pairs of a batch"),
        ({"loss": "sft", "wpo": True}, "--wpo has no effect with --loss sft"),
    ],
)
def test_config_rejects_wpo_where_it_cannot_apply(values, message):
    with pytest.raises(UserError, match=message):
        resolve(**values)


# ---------------------------------------------------------------------------------------------------- LD-DPO log-probs


def test_ld_dpo_logps_hand_values():
    # Logits [ln 3, 0]: log p(0) = log(3/4) = −0.2876820725, log p(1) = log(1/4) = −1.3862943611.
    # Chosen [0, 1, 0] (3 tokens), rejected [1] (1 token): shared length min(3, 1) = 1, α = 0.5:
    #   chosen: log(3/4) + 0.5·(log(1/4) + log(3/4)) = −0.2876820725 − 0.8369882168 = −1.1246702893
    #   rejected: log(1/4) = −1.3862943611 (all of it shared)
    from preftune.data.batching import collate_padded
    from preftune.data.tokenize import TokenizedPair
    from preftune.logps import compute_logps

    batch = collate_padded([TokenizedPair([1], [0, 1, 0], [1], "p")], [0], pad_id=1)
    chosen, rejected, chosen_len, rejected_len = compute_logps(FixedLogits([math.log(3.0), 0.0]), batch, ld_alpha=0.5)
    assert chosen.item() == pytest.approx(-1.1246702893, abs=1e-6)
    assert rejected.item() == pytest.approx(-1.3862943611, abs=1e-6)
    assert (chosen_len.item(), rejected_len.item()) == (3, 1)  # lengths stay token counts


@pytest.mark.parametrize("pack_tokens", [None, 64])
def test_ld_dpo_logps_agree_between_layouts(pack_tokens):
    # Values and gradients of the packed layout (one or several pairs per row) equal the plain one; α = 1 is
    # exactly the plain sum, and α = 0 keeps only the first min(|yw|, |yl|) tokens of each response.
    from preftune.data.batching import collate_packed, collate_padded
    from preftune.data.tokenize import TokenizedPair
    from preftune.logps import compute_logps

    from toy import build_model

    model = build_model(40, seed=1)
    gen = torch.Generator().manual_seed(4)

    def ids(n):
        return torch.randint(3, 40, (n,), generator=gen).tolist()

    pairs = [
        TokenizedPair(ids(4), ids(3), ids(5), "a"),
        TokenizedPair(ids(2), ids(6), ids(1), "b"),
        TokenizedPair(ids(3), ids(2), ids(2), "c"),
    ]
    layouts = {
        "padded": collate_padded(pairs, [0, 1, 2], pad_id=0),
        "packed": collate_packed(pairs, [0, 1, 2], pad_id=0, max_row_tokens=pack_tokens),
    }

    def run(batch, alpha):
        model.zero_grad()
        chosen, rejected, _, _ = compute_logps(model, batch, ld_alpha=alpha)
        (chosen.sum() - 2 * rejected.sum()).backward()
        return torch.cat([chosen, rejected]).detach(), [p.grad.clone() for p in model.parameters()]

    values, grads = run(layouts["padded"], 0.3)
    packed_values, packed_grads = run(layouts["packed"], 0.3)
    torch.testing.assert_close(packed_values, values, rtol=1e-5, atol=1e-5)
    for got, want in zip(packed_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for batch in layouts.values():
        with torch.no_grad():
            plain = torch.cat(compute_logps(model, batch)[:2])
            torch.testing.assert_close(torch.cat(compute_logps(model, batch, ld_alpha=1.0)[:2]), plain, rtol=0, atol=0)
            # α = 0: the sum over the shared part, from the per-token log-probs of the plain sequences.
            shared = []
            for pair in pairs:
                for response in (pair.chosen_ids, pair.rejected_ids):
                    n = min(len(pair.chosen_ids), len(pair.rejected_ids))
                    logp = model(torch.tensor([pair.prompt_ids + response])).logits[0, :-1].log_softmax(-1)
                    start = len(pair.prompt_ids) - 1
                    shared.append(sum(logp[start + k, response[k]].item() for k in range(n)))
            expected = torch.tensor(shared).view(3, 2).t().reshape(-1)  # chosen of every pair, then rejected
            torch.testing.assert_close(
                torch.cat(compute_logps(model, batch, ld_alpha=0.0)[:2]), expected, rtol=1e-5, atol=1e-5
            )

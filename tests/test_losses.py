"""Losses against values worked out by hand (torchtune's test_dpo_loss.py style), gradient signs, the
registry, combined losses and gradient-accumulation equivalence.

Shared example, three pairs with β = 0.1:
    policy_chosen  πc = [-4, -3, -2]    ref_chosen   rc = [-5, -5, -5]   → hc = πc − rc = [1, 2, 3]
    policy_rejected πr = [-6, -6, -6]   ref_rejected rr = [-7, -7, -7]   → hr = πr − rr = [1, 1, 1]
    margin h = hc − hr = [0, 1, 2], β·h = x = [0, 0.1, 0.2]
Softplus sp(x) = −log σ(x) = log(1 + e^(−x)):
    sp(0) = ln 2 = 0.6931471806, sp(0.1) = 0.6443966601, sp(0.2) = 0.5981388694
and sp(−x) − sp(x) = log((1 + e^x) / (1 + e^(−x))) = log(e^x) = x, used below for cDPO and robust.
"""

import inspect
import math

import pytest
import torch

from preftune.errors import UserError
from preftune.losses import LOSSES, combined_loss, loss_params, pair_metrics, rewards

BETA = 0.1
SP = [0.6931471806, 0.6443966601, 0.5981388694]  # sp(0), sp(0.1), sp(0.2)


def example(requires_grad=False):
    def t(values):
        return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)
    return t([-4.0, -3.0, -2.0]), t([-6.0, -6.0, -6.0]), t([-5.0, -5.0, -5.0]), t([-7.0, -7.0, -7.0])


def call(name, logps, **params):
    return LOSSES[name].fn(*logps, **params)


def test_sigmoid_hand_values():
    # −log σ(β·h) with β·h = [0, 0.1, 0.2] → sp(x).
    losses = call("sigmoid", example(), beta=BETA)
    torch.testing.assert_close(losses, torch.tensor(SP, dtype=torch.float64), atol=1e-9, rtol=0)


def test_sigmoid_label_smoothing_is_cdpo():
    # cDPO: (1−ε)·sp(x) + ε·sp(−x) = sp(x) + ε·(sp(−x) − sp(x)) = sp(x) + ε·x.
    # ε = 0.1: [0.6931471806 + 0, 0.6443966601 + 0.01, 0.5981388694 + 0.02]
    losses = call("sigmoid", example(), beta=BETA, label_smoothing=0.1)
    expected = torch.tensor([0.6931471806, 0.6543966601, 0.6181388694], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, atol=1e-9, rtol=0)


def test_ipo_hand_values_with_length_normalisation():
    # chosen lengths [1, 2, 4], rejected lengths [1, 1, 2]:
    #   hc/|c| = [1/1, 2/2, 3/4] = [1, 1, 0.75];  hr/|r| = [1/1, 1/1, 1/2] = [1, 1, 0.5]
    #   difference = [0, 0, 0.25];  1/(2β) = 5  →  (d − 5)² = [25, 25, 4.75² = 22.5625]
    losses = call("ipo", example(), beta=BETA,
                  chosen_lengths=torch.tensor([1, 2, 4]), rejected_lengths=torch.tensor([1, 1, 2]))
    torch.testing.assert_close(losses, torch.tensor([25.0, 25.0, 22.5625], dtype=torch.float64))


def test_ipo_clamps_zero_lengths_to_one():
    # A length of 0 divides by 1 (as TRL's clamp(min=1)): same as lengths [1, 1, 1]:
    #   d = hc − hr = [0, 1, 2] → (d − 5)² = [25, 16, 9]
    losses = call("ipo", example(), beta=BETA,
                  chosen_lengths=torch.tensor([0, 1, 0]), rejected_lengths=torch.tensor([1, 0, 0]))
    torch.testing.assert_close(losses, torch.tensor([25.0, 16.0, 9.0], dtype=torch.float64))


def test_hinge_hand_values():
    # relu(1 − β·h): β = 0.1 → [1, 0.9, 0.8]; β = 1 → relu([1, 0, −1]) = [1, 0, 0]
    torch.testing.assert_close(call("hinge", example(), beta=BETA),
                               torch.tensor([1.0, 0.9, 0.8], dtype=torch.float64))
    torch.testing.assert_close(call("hinge", example(), beta=1.0),
                               torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_robust_hand_values():
    # ((1−ε)·sp(x) − ε·sp(−x)) / (1−2ε) = ((1−ε)·sp(x) − ε·(sp(x) + x)) / (1−2ε) = sp(x) − ε·x/(1−2ε).
    # ε = 0.1: sp(x) − x/8 = [0.6931471806, 0.6443966601 − 0.0125, 0.5981388694 − 0.025]
    losses = call("robust", example(), beta=BETA, label_smoothing=0.1)
    expected = torch.tensor([0.6931471806, 0.6318966601, 0.5731388694], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, atol=1e-9, rtol=0)


def test_robust_rejects_label_smoothing_outside_range():
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(UserError, match="label-smoothing"):
            call("robust", example(), beta=BETA, label_smoothing=bad)


def test_sft_is_chosen_nll():
    # −πc = [4, 3, 2]; nothing else enters.
    torch.testing.assert_close(call("sft", example()), torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("epsilon", [0.0, 0.2])
@pytest.mark.parametrize("name", ["sigmoid", "robust"])
def test_ln2_when_policy_equals_reference(name, epsilon):
    # π = π_ref → h = 0 → (1−ε)·sp(0) ± ε·sp(0) over 1 or (1−2ε): ln 2 for both losses and any ε.
    logps = torch.tensor([-3.0, -12.5]), torch.tensor([-4.0, -1.0])
    losses = LOSSES[name].fn(logps[0], logps[1], logps[0].clone(), logps[1].clone(),
                             beta=0.5, label_smoothing=epsilon)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge", "robust", "sft"])
def test_raising_chosen_logp_lowers_loss(name):
    # d loss / d πc < 0 (raising the chosen log-prob helps) and d loss / d πr ≥ 0, on the example where every
    # loss is in its active region (hinge: β·h < 1; IPO: normalised difference below 1/(2β)).
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = example(requires_grad=True)
    params = {"beta": BETA, "label_smoothing": 0.1,
              "chosen_lengths": torch.tensor([1, 2, 4]), "rejected_lengths": torch.tensor([1, 1, 2])}
    kwargs = {p: params[p] for p in loss_params(name)}
    LOSSES[name].fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, **kwargs).sum().backward()
    assert (policy_chosen.grad < 0).all()
    if name == "sft":
        assert policy_rejected.grad is None or (policy_rejected.grad == 0).all()
    else:
        assert (policy_rejected.grad > 0).all()


def test_loss_params_and_registry():
    assert loss_params("sigmoid") == {"beta", "label_smoothing"}
    assert loss_params("ipo") == {"beta", "chosen_lengths", "rejected_lengths"}
    assert loss_params("hinge") == {"beta"}
    assert loss_params("robust") == {"beta", "label_smoothing"}
    assert loss_params("sft") == set()
    assert {name for name, spec in LOSSES.items() if not spec.needs_reference} == {"sft"}
    assert {name: spec.normalize for name, spec in LOSSES.items()} == {
        "sigmoid": "pairs", "ipo": "pairs", "hinge": "pairs", "robust": "pairs", "sft": "chosen_tokens"}
    assert all(spec.paper for spec in LOSSES.values())


def combined(names, weights, logps, lengths, num_pairs, num_chosen_tokens, label_smoothing=0.0):
    return combined_loss(names, weights, policy_chosen_logps=logps[0], policy_rejected_logps=logps[1],
                         ref_chosen_logps=logps[2], ref_rejected_logps=logps[3],
                         chosen_lengths=lengths[0], rejected_lengths=lengths[1], beta=BETA,
                         label_smoothing=label_smoothing, num_pairs=num_pairs, num_chosen_tokens=num_chosen_tokens)


def test_combined_rpo_value():
    # RPO = sigmoid + 0.2·sft. Chosen lengths [1, 2, 4] → 7 chosen tokens.
    #   sigmoid part: (0.6931471806 + 0.6443966601 + 0.5981388694) / 3 pairs = 0.6452275700
    #   sft part:     0.2 · (4 + 3 + 2) / 7 tokens = 0.2571428571
    #   total = 0.9023704271
    lengths = torch.tensor([1, 2, 4]), torch.tensor([1, 1, 2])
    loss = combined(["sigmoid", "sft"], [1.0, 0.2], example(), lengths, num_pairs=3, num_chosen_tokens=7)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.9023704271, abs=1e-9)


def test_combined_sft_alone_needs_no_reference():
    # 1.0 · (4 + 3 + 2) / 9 tokens = 1.0
    policy_chosen, policy_rejected, _, _ = example()
    loss = combined(["sft"], [1.0], (policy_chosen, policy_rejected, None, None),
                    (torch.tensor([3, 3, 3]), torch.tensor([1, 1, 1])), num_pairs=3, num_chosen_tokens=9)
    assert loss.item() == pytest.approx(1.0)


def test_combined_rejects_mismatched_weights():
    with pytest.raises(ValueError):
        combined(["sigmoid", "sft"], [1.0], example(), (torch.ones(3), torch.ones(3)), 3, 3)


def test_grad_accumulation_equals_one_batch():
    # Two half batches, each normalised by the GLOBAL totals, summed = the full batch: values and gradients.
    torch.manual_seed(0)
    names, weights = ["sigmoid", "ipo", "hinge", "robust", "sft"], [1.0, 0.3, 0.5, 0.7, 0.2]
    leaves = [(-20 * torch.rand(6, dtype=torch.float64)).requires_grad_() for _ in range(2)]
    refs = [-20 * torch.rand(6, dtype=torch.float64) for _ in range(2)]
    lengths = torch.tensor([3, 7, 1, 12, 5, 2]), torch.tensor([4, 4, 9, 1, 6, 3])
    totals = dict(num_pairs=6, num_chosen_tokens=int(lengths[0].sum()))

    full = combined(names, weights, (*leaves, *refs), lengths, label_smoothing=0.1, **totals)
    full_grads = torch.autograd.grad(full, leaves)

    halves = [combined(names, weights, [x[s] for x in (*leaves, *refs)], [x[s] for x in lengths],
                       label_smoothing=0.1, **totals) for s in (slice(0, 2), slice(2, 6))]  # unequal halves
    accumulated = halves[0] + halves[1]
    accumulated_grads = torch.autograd.grad(accumulated, leaves)

    torch.testing.assert_close(accumulated, full)
    for got, want in zip(accumulated_grads, full_grads):
        torch.testing.assert_close(got, want)


def trl_formula(name, pc, pr, rc, rr, lc, lr, beta, eps):
    """TRL 1.16 `_compute_loss` (reverse_kl), one pair, restated independently with Python floats."""
    logsigmoid = lambda x: -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))  # noqa: E731
    delta = (pc - rc) - (pr - rr)
    if name == "sigmoid":  # TRL: -F.logsigmoid(beta * delta_score)
        return -logsigmoid(beta * delta)
    if name == "cdpo":  # the DPO authors' preference_loss with label_smoothing (TRL 1.16 has no cDPO)
        return -logsigmoid(beta * delta) * (1 - eps) - logsigmoid(-beta * delta) * eps
    if name == "hinge":  # TRL: torch.relu(1 - beta * delta_score)
        return max(0.0, 1 - beta * delta)
    if name == "ipo":  # TRL: ((chosen/len_c - rejected/len_r) - 1/(2 beta))**2, lengths clamp(min=1)
        return ((pc - rc) / max(lc, 1) - (pr - rr) / max(lr, 1) - 1 / (2 * beta)) ** 2
    if name == "robust":  # TRL: (clean - flipped) / (1 - 2 eps)
        clean = -(1 - eps) * logsigmoid(beta * delta)
        flipped = -eps * logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * eps)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "ipo", "hinge", "robust"])
def test_parity_with_trl_formulas(name):
    torch.manual_seed(1)
    logps = [-30 * torch.rand(8, dtype=torch.float64) for _ in range(4)]
    lengths = torch.randint(0, 20, (8,)), torch.randint(0, 20, (8,))
    beta = 0.25
    eps = 0.0 if name == "sigmoid" else 0.15  # TRL 1.16's sigmoid has no label smoothing: ε = 0 must match it
    params = {"beta": beta, "label_smoothing": eps, "chosen_lengths": lengths[0], "rejected_lengths": lengths[1]}
    loss = "sigmoid" if name == "cdpo" else name
    got = LOSSES[loss].fn(*logps, **{p: params[p] for p in loss_params(loss)})
    want = [trl_formula(name, *(float(x[i]) for x in (*logps, *lengths)), beta, eps) for i in range(8)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_restated_formulas_are_those_of_installed_trl():
    # Ties `trl_formula` above to the source it restates: if TRL changes a formula, this fails first.
    dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
    source = " ".join(inspect.getsource(dpo_trainer.DPOTrainer._compute_loss).split())
    for line in [
        "per_sequence_loss = -F.logsigmoid(self.beta * delta_score)",
        "per_sequence_loss = torch.relu(1 - self.beta * delta_score)",
        "chosen_avg_score = chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0)",
        "per_sequence_loss = (ipo_delta - 1 / (2 * self.beta)) ** 2",
        "clean_loss_term = -(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta_score)",
        "flipped_loss_term = -self.label_smoothing * F.logsigmoid(-self.beta * delta_score)",
        "per_sequence_loss = (clean_loss_term - flipped_loss_term) / (1 - 2 * self.label_smoothing)",
        "batch_loss = -chosen_per_token_logps[chosen_mask.bool()].mean()",
        "loss += per_sequence_loss.mean() * loss_weight",
    ]:
        assert line in source, line


def test_sft_parity_with_trl_token_mean():
    # TRL: -chosen_per_token_logps[chosen_mask].mean(), the mean over every chosen token of the batch.
    # Per-token log-probs of two chosen responses (3 and 1 tokens): the sequence sums are what preftune gets.
    per_token = [[-0.5, -1.5, -2.0], [-4.0]]
    trl_value = -sum(sum(row) for row in per_token) / 4  # (0.5 + 1.5 + 2 + 4) / 4 = 2.0
    policy_chosen = torch.tensor([sum(row) for row in per_token])
    loss = combined(["sft"], [1.0], (policy_chosen, torch.zeros(2), None, None),
                    (torch.tensor([3, 1]), torch.tensor([1, 1])), num_pairs=2, num_chosen_tokens=4)
    assert loss.item() == pytest.approx(trl_value) == 2.0


def test_rewards_and_pair_metrics():
    # rewards = β·(π − π_ref): chosen 0.1·[1, 2, 3] = [0.1, 0.2, 0.3], rejected 0.1·[1, 1, 1].
    # accuracies: chosen > rejected strictly, so the tie in pair 0 counts as 0 (as TRL).
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = example(requires_grad=True)
    torch.testing.assert_close(rewards(policy_chosen, ref_chosen, BETA).detach(),
                               torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
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

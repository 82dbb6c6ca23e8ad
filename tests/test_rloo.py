"""preftune.rloo: the RLOO math on hand-computed values, the log-probs against a naive loop, and train_round end to
end (learning, exact resume, one-line errors). Parity with TRL's RLOOTrainer: tests/test_trl_rloo_parity.py."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from preftune import rloo
from preftune.errors import UserError
from preftune.loading import load_causal_lm, load_tokenizer
from preftune.rundir import complete_checkpoints

from helpers import assert_same_weights
from toy import save_model_folder

# Two prompts, k = 3. Sequence log-probs of the policy at the batch's start and of the reference, rewards, β = 0.1:
OLD = [-2.0, -3.0, -1.0, -4.0, -2.0, -5.0]
REF = [-2.5, -3.0, -2.0, -4.0, -1.0, -5.0]  # kl = old − ref = [0.5, 0, 1, 0, −1, 0]
REWARDS = [1.0, 2.0, 6.0, 0.0, 0.0, 3.0]
SHAPED = [0.95, 2.0, 5.9, 0.0, 0.1, 3.0]  # r − 0.1·kl
# Leave one out: prompt 1 sums to 8.85, so A = 0.95 − 7.9/2, 2 − 6.85/2, 5.9 − 2.95/2; prompt 2 sums to 3.1.
ADVANTAGES = [-3.0, -1.425, 4.425, -1.55, -1.4, 2.95]
RATIOS = [1.0, 1.5, 0.5, 1.1, 0.7, 1.3]  # ρ = exp(logp − logp_old)
# −min(ρA, clip(ρ, 0.8, 1.2)A): 3, 2.1375 (ρ > 1.2 but A < 0: the unclipped term is the smaller), −2.2125,
# 1.705, 1.12 (clipped at 0.8), −3.54 (clipped at 1.2)
LOSSES = [3.0, 2.1375, -2.2125, 1.705, 1.12, -3.54]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_kl_shaped_rewards_and_leave_one_out_advantages_by_hand():
    kl = rloo.sequence_kl(t(OLD), t(REF))
    assert kl.tolist() == [0.5, 0.0, 1.0, 0.0, -1.0, 0.0]
    shaped = rloo.shaped_rewards(t(REWARDS), kl, beta=0.1)
    assert shaped.tolist() == pytest.approx(SHAPED, abs=1e-12)
    assert rloo.shaped_rewards(t(REWARDS), kl, beta=0.0).tolist() == REWARDS
    advantages = rloo.leave_one_out_advantages(shaped, k=3)
    assert advantages.tolist() == pytest.approx(ADVANTAGES, abs=1e-12)
    # k/(k−1)·(r_i − group mean): the same numbers another way; each group's advantages sum to 0
    assert advantages.tolist() == pytest.approx(
        [1.5 * (r - 2.95) for r in SHAPED[:3]] + [1.5 * (r - 3.1 / 3) for r in SHAPED[3:]]
    )
    # k = 2: each response against the other one
    assert rloo.leave_one_out_advantages(t([1.0, 4.0, 2.0, 2.0]), k=2).tolist() == [-3.0, 3.0, 0.0, 0.0]


def test_normalized_advantages_use_the_batch_mean_and_bessel_std():
    # The advantages sum to 0 over each group, so their batch mean is 0; Σ A² = 43.67625 over 6 − 1 degrees.
    got = rloo.leave_one_out_advantages(t(SHAPED), k=3, normalize=True)
    std = math.sqrt(43.67625 / 5)
    assert got.tolist() == pytest.approx([a / (std + 1e-4) for a in ADVANTAGES], abs=1e-12)


def test_clipped_loss_clip_region_and_gradient_by_hand():
    old = t(OLD)
    logps = (old + t(RATIOS).log()).requires_grad_(True)
    losses, region = rloo.clipped_losses(logps, old, t(ADVANTAGES), epsilon=0.2, epsilon_high=0.2)
    assert losses.tolist() == pytest.approx(LOSSES, abs=1e-12)
    assert region.tolist() == [False, False, False, False, True, True]
    loss = rloo.rloo_loss(logps, old, t(ADVANTAGES), 0.2, 0.2)
    assert loss.item() == pytest.approx(2.21 / 6, abs=1e-12)
    loss.backward()
    # d/dlogp of −ρA/N is −ρA/N where the unclipped term is the minimum, 0 where the clipped one is
    expected = [-r * a / 6 for r, a in zip(RATIOS[:4], ADVANTAGES[:4])] + [0.0, 0.0]
    assert logps.grad.tolist() == pytest.approx(expected, abs=1e-12)
    # epsilon_high 0.4: ρ = 1.3 is inside (1 − 0.2, 1 + 0.4), its term −ρA = −3.835 counts
    losses, region = rloo.clipped_losses(old + t(RATIOS).log(), old, t(ADVANTAGES), 0.2, 0.4)
    assert losses[5].item() == pytest.approx(-3.835, abs=1e-12) and region.tolist()[4:] == [True, False]


# ---------------------------------------------------------------------------------------------------- the models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rloo")
    return {
        "reference": str(save_model_folder(root / "ref", seed=0)),
        "policy": str(save_model_folder(root / "pol", seed=1)),
    }


def naive_logps(model, prompt: list[int], response: list[int], temperature: float) -> float:
    """One unpadded row at a time, log_softmax by hand, in float64."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double() / temperature
    logp = logits.log_softmax(-1)
    return sum(logp[len(prompt) + t - 1, token].item() for t, token in enumerate(response))


PROMPTS = [[1, 3, 4, 9, 5], [1, 3, 4, 16, 5, 16]]
RESPONSES = [[[6, 7, 2], [7, 2], [6, 6, 6, 6]], [[15, 16, 2], [2], [14, 9, 11]]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logps_equal_a_naive_loop_over_unpadded_rows(folders, temperature):
    model = load_causal_lm(folders["policy"])
    rows = rloo.pad_rows([p for p in PROMPTS for _ in range(3)], [r for rs in RESPONSES for r in rs], 0, "cpu")
    assert rows.input_ids.shape == (6, 9) and rows.response_mask.sum().item() == 16
    got = rloo.chunked_logps(model, rows, temperature, chunk=4)
    expected = [naive_logps(model, p, r, temperature) for p, rs in zip(PROMPTS, RESPONSES) for r in rs]
    assert got.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_score_batch_kl_metric_and_micro_batches_give_the_same_step(folders):
    policy, reference = load_causal_lm(folders["policy"]), load_causal_lm(folders["reference"])
    rows = rloo.pad_rows([p for p in PROMPTS for _ in range(3)], [r for rs in RESPONSES for r in rs], 0, "cpu")
    options = rloo.RlooOptions(beta=0.1, micro_batch=4)
    batch = rloo.score_batch(policy, reference, rows, torch.tensor(REWARDS), 3, options)
    old = [naive_logps(policy, p, r, 1.0) for p, rs in zip(PROMPTS, RESPONSES) for r in rs]
    ref = [naive_logps(reference, p, r, 1.0) for p, rs in zip(PROMPTS, RESPONSES) for r in rs]
    kl = [a - b for a, b in zip(old, ref)]
    assert batch.old_logps.tolist() == pytest.approx(old, rel=1e-5, abs=1e-5)
    assert batch.metrics["kl_mean"] == pytest.approx(sum(kl) / 16, rel=1e-5, abs=1e-6)  # 16 response tokens
    shaped = [r - 0.1 * d for r, d in zip(REWARDS, kl)]
    means = [sum(shaped[g : g + 3]) / 3 for g in (0, 0, 0, 3, 3, 3)]
    assert batch.advantages.tolist() == pytest.approx([1.5 * (r - m) for r, m in zip(shaped, means)], abs=1e-5)
    assert batch.metrics["reward_mean"] == pytest.approx(2.0)

    # A moved batch (ratios ≠ 1), one update with 6 rows per forward and one with 1: the same loss and gradient.
    moved = batch._replace(old_logps=batch.old_logps + torch.tensor([0.3, -0.3, 0.05, -0.1, 0.4, 0.0]))
    grads, records = [], []
    for micro in (6, 1):
        model = load_causal_lm(folders["policy"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        records.append(rloo.update(model, optimizer, moved, dataclasses.replace(options, micro_batch=micro)))
        grads.append([p.grad.clone() for p in model.parameters()])
    assert records[0] == pytest.approx(records[1], rel=1e-5, abs=1e-6)
    assert 0 < records[0]["clip_fraction"] < 1 and records[0]["loss"] != 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- train_round


def samples(folder: str, n_prompts: int):
    """Prompts 'count from s :', each with 3 responses ending with EOS: the count (reward 3), the count reversed (1),
    nothing (0)."""
    tokenizer = load_tokenizer(folder)
    prompts, responses, rewards = [], [], []
    for i in range(n_prompts):
        s = i % 10
        prompts.append(tokenizer(f"count from {s} :")["input_ids"])
        good = tokenizer(" ".join(str(s + j) for j in range(3)), add_special_tokens=False)["input_ids"]
        responses.append([good + [2], good[::-1] + [2], [2]])
        rewards.append([3.0, 1.0, 0.0])
    return tokenizer, prompts, responses, rewards


OPTIONS = rloo.RlooOptions(
    beta=0.1, learning_rate=3e-3, num_iterations=2, batch_prompts=2, micro_batch=4, seed=0, save_every=1, device="cpu"
)


def run(folders, out: Path, options=OPTIONS, resume: bool = False, n_prompts: int = 6) -> Path:
    tokenizer, prompts, responses, rewards = samples(folders["reference"], n_prompts)
    return rloo.train_round(
        folders["reference"], folders["reference"], tokenizer, prompts, responses, rewards, options, out, resume
    )


def read(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_round_learns_writes_metrics_and_a_model_folder(folders, tmp_path):
    final = run(folders, tmp_path / "run")
    assert final == tmp_path / "run" / "final" and (final / "model.safetensors").exists()
    assert (final / "tokenizer.json").exists() and complete_checkpoints(tmp_path / "run") == []
    records = read(tmp_path / "run")
    assert [(r["step"], r["batch"], r["iteration"]) for r in records] == [
        (s, (s + 1) // 2, 2 - s % 2) for s in range(1, 7)
    ]
    keys = {"loss", "reward_mean", "kl_mean", "advantage_std", "clip_fraction", "grad_norm", "lr"}
    assert keys <= set(records[0]) and all(math.isfinite(r[k]) for r in records for k in keys)
    # At an iteration's first step ρ = 1 and the advantages sum to 0 per prompt: the loss is 0 up to rounding. The
    # second step's surrogate has improved: its loss is below 0.
    assert all(abs(r["loss"]) < 1e-6 for r in records[::2]) and all(r["loss"] < -1e-3 for r in records[1::2])
    assert records[0]["kl_mean"] == 0.0 and records[2]["kl_mean"] != 0.0  # the policy starts as the reference
    # The best response (the count, reward 3) gained log-probability against the empty one (reward 0).
    tokenizer, prompts, responses, _ = samples(folders["reference"], 6)
    rows = rloo.pad_rows([p for p in prompts for _ in range(3)], [r for rs in responses for r in rs], 2, "cpu")
    before = rloo.chunked_logps(load_causal_lm(folders["reference"]), rows, 1.0, 18).view(6, 3)
    after = rloo.chunked_logps(load_causal_lm(str(final)), rows, 1.0, 18).view(6, 3)
    gain = (after - before)[:, 0] - (after - before)[:, 2]
    assert (gain > 0).all(), gain


@pytest.mark.exactness
@pytest.mark.parametrize("stop", [1, 3], ids=["before-any-checkpoint", "mid-batch"])
def test_a_stopped_and_resumed_round_equals_the_uninterrupted_one(folders, tmp_path, monkeypatch, stop):
    whole = tmp_path / "whole"
    run(folders, whole)

    def interrupt(step: int) -> None:
        if step == stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(rloo, "after_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(folders, tmp_path / "stopped")
    assert len(read(tmp_path / "stopped")) == stop
    # Checkpoints at batch ends only (2 steps per batch): stopped at step 3, the round goes on from step 2.
    assert [p.name for p in complete_checkpoints(tmp_path / "stopped")] == ([] if stop == 1 else ["step-00000002"])
    monkeypatch.setattr(rloo, "after_step", lambda step: None)
    run(folders, tmp_path / "stopped", resume=True)
    # Same process, same kernels, same shapes: bit-identical weights and metrics.
    assert read(tmp_path / "stopped") == read(whole)
    assert_same_weights(whole, tmp_path / "stopped", tol=0)
    # A finished round resumes to its final/ without training again.
    assert run(folders, tmp_path / "stopped", resume=True) == tmp_path / "stopped" / "final"
    assert read(tmp_path / "stopped") == read(whole)


def test_one_line_errors(folders, tmp_path):
    tokenizer, prompts, responses, rewards = samples(folders["reference"], 2)

    def error(prompts=prompts, responses=responses, rewards=rewards, options=OPTIONS, out=tmp_path / "x") -> str:
        with pytest.raises(UserError) as e:
            rloo.train_round(
                folders["reference"], folders["reference"], tokenizer, prompts, responses, rewards, options, out, False
            )
        assert "\n" not in str(e.value)
        return str(e.value)

    one = [[r[0]] for r in responses]
    assert "prompt 0 has 1 response(s); RLOO needs k ≥ 2" in error(responses=one, rewards=[[1.0]] * 2)
    assert "prompt 1 has 2 rewards for 3 responses" in error(rewards=[rewards[0], rewards[1][:2]])
    assert "prompt 1 has 2 responses, prompt 0 has 3" in error(responses=[responses[0], responses[1][:2]])
    assert "2 prompts, 2 response lists, 1 reward lists" in error(rewards=rewards[:1])
    assert "not a finite number" in error(rewards=[rewards[0], [1.0, float("nan"), 0.0]])
    assert error(options=dataclasses.replace(OPTIONS, num_iterations=0)) == "--num-iterations 0: expected ≥ 1"
    assert error(options=dataclasses.replace(OPTIONS, beta=-1.0)) == "--beta -1.0: expected ≥ 0"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "metrics.jsonl").write_text("")
    assert "is not empty" in error(out=tmp_path / "full")
    assert not (tmp_path / "x").exists()  # nothing was written

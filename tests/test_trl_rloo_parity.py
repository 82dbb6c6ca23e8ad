"""preftune.rloo against TRL 1.16's RLOOTrainer, on a fixed batch: 2 prompts × 3 completions (token ids, some
ending with EOS, one only EOS, one cut off) and their rewards, a tiny Llama policy that differs from its reference.

TRL's own code runs on that batch: the trainer is built as usual (a reward function, a dataset of the two prompts),
only its sampler of completions (`_generate_single_turn`) returns the fixed completions, so its tokenization of
the prompts, `_generate_and_score_completions` (old and reference log-probs, KL, shaped rewards, advantages),
`_compute_loss` and `train()` are TRL's. Compared:
- one batch: old log-probs, advantages, the KL and reward metrics; then, at moved weights (ratios away from 1, some
  clipped), the loss, the clip fraction and every parameter's gradient (preftune's `update` in micro-batches of 4
  and 2 rows against TRL's one pass);
- three optimizer steps (num_iterations = 3 on one generation batch, lr 1e-3): per-step loss, grad norm, clip
  fraction and the final weights, `train_round` against `trainer.train()`.

The remaining differences are float32 rounding: TRL left-pads the prompts (the padded rows' positions shift by
one, which RoPE's relative positions undo up to rounding) and scores tokens with its fused LM head; preftune
right-pads and takes log_softmax of the full logits. Log-probs near −10 have a float32 spacing of 1e-6.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from preftune import rloo
from preftune.loading import load_causal_lm, load_tokenizer

from toy import build_model, save_model_folder

pytest.importorskip("trl")  # a dev dependency (pyproject: trl==1.16.0)

pytestmark = pytest.mark.exactness

K = 3
PROMPTS = ["count from 3 :", "count from 10 : 10"]
# Per prompt, K completions: ending with EOS (2), cut off (no EOS), only EOS.
COMPLETIONS = [[[6, 7, 2], [7, 2], [6, 6, 6, 6]], [[15, 16, 2], [2], [14, 9, 11]]]
REWARDS = [[0.5, -1.0, 2.0], [1.0, 0.0, 0.25]]
TOL = {"rel": 1e-5, "abs": 1e-5}
# Final weights after 3 AdamW steps at lr 1e-3: each step moves a weight by about lr whatever its gradient, so an
# element whose gradient nearly cancels over the batch carries its rounding difference into a visible share of a
# step. Measured (AVX-512 kernels): at most 5.3e-6; 5e-5 is 5% of one step (helpers.WEIGHT_TOL, 1e-5, is only 2×
# the measurement; tests/test_reward_model.py's ADAM_TOL explains the same effect).
ADAM_TOL = 5e-5

CASES = {
    "beta-temperature": {"beta": 0.1, "temperature": 0.7, "epsilon": 0.2},
    "no-reference-normalized-dapo-clip": {
        "beta": 0.0,
        "temperature": 1.0,
        "epsilon": 0.2,
        "epsilon_high": 0.28,
        "normalize_advantages": True,
    },
}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Reference (seed 0), policy (seed 1) and the moved weights the loss is taken at: the policy plus noise."""
    root = tmp_path_factory.mktemp("rloo-parity")
    reference = save_model_folder(root / "reference", seed=0)
    policy = save_model_folder(root / "policy", seed=1)
    weights = build_model(len(load_tokenizer(str(policy))), seed=1).state_dict()
    generator = torch.Generator().manual_seed(5)
    moved = {k: v + 0.03 * torch.randn(v.shape, generator=generator) for k, v in weights.items()}
    return {"reference": str(reference), "policy": str(policy), "weights": weights, "moved": moved}


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def trl_trainer(toy, out: Path, case: dict, **config):
    """RLOOTrainer on the two prompts; its policy holds the policy's weights, its reference is loaded by TRL from
    the reference folder (the policy instance's name_or_path); its sampler returns the fixed completions."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import RLOOConfig, RLOOTrainer

    tokenizer = load_tokenizer(toy["reference"])
    model = AutoModelForCausalLM.from_pretrained(toy["reference"], dtype=torch.float32)
    model.load_state_dict(toy["weights"])
    reward_of = {tuple(c): r for cs, rs in zip(COMPLETIONS, REWARDS) for c, r in zip(cs, rs)}

    def reward(prompts, completions, completion_ids, **kwargs):
        return [reward_of[tuple(ids)] for ids in completion_ids]

    args = RLOOConfig(
        output_dir=str(out),
        per_device_train_batch_size=len(PROMPTS) * K,
        num_generations=K,
        max_completion_length=8,
        optim="adamw_torch",  # torch's plain AdamW, as preftune (TRL's default is the fused one)
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        **case,
        **config,
    )
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = RLOOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    by_prompt = {tuple(ids): cs for ids, cs in zip(prompt_ids(tokenizer), COMPLETIONS)}

    def sample(ids_of_rows, images, multimodal_fields):
        seen = Counter()  # rows come as K copies of each prompt
        out = []
        for ids in ids_of_rows:
            out.append(by_prompt[tuple(ids)][seen[tuple(ids)]])  # a KeyError: TRL tokenized a prompt otherwise
            seen[tuple(ids)] += 1
        return out

    trainer._generate_single_turn = sample
    return trainer


def our_rows(tokenizer) -> rloo.Rows:
    ids = prompt_ids(tokenizer)
    return rloo.pad_rows([p for p in ids for _ in range(K)], [c for cs in COMPLETIONS for c in cs], 2, "cpu")


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_one_batch_advantages_kl_loss_and_gradients_match_trl(toy, tmp_path, case):
    trainer = trl_trainer(toy, tmp_path / "trl", case)
    trainer.model.train()  # TRL files the metrics of a model in train mode under "train"
    theirs = trainer._generate_and_score_completions([{"prompt": p} for p in PROMPTS for _ in range(K)])
    their_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    options = rloo.RlooOptions(**case, micro_batch=4, max_grad_norm=1e9)
    tokenizer = load_tokenizer(toy["reference"])
    policy = load_causal_lm(toy["policy"])
    reference = load_causal_lm(toy["reference"]) if case["beta"] else None
    rewards = torch.tensor([r for rs in REWARDS for r in rs])
    batch = rloo.score_batch(policy, reference, our_rows(tokenizer), rewards, K, options)
    assert batch.old_logps.tolist() == pytest.approx(theirs["old_logps"].tolist(), **TOL)
    assert batch.advantages.tolist() == pytest.approx(theirs["advantages"].tolist(), **TOL)
    assert batch.metrics["reward_mean"] == pytest.approx(their_metrics["reward"], **TOL)
    if case["beta"]:
        assert batch.metrics["kl_mean"] == pytest.approx(their_metrics["kl"], **TOL)
        assert abs(batch.metrics["kl_mean"]) > 0.05  # policy ≠ reference: the KL term has teeth
        plain = rloo.leave_one_out_advantages(rewards, K)
        assert (batch.advantages - plain).abs().max() > 0.01

    # At moved weights: the loss, its clip fraction and its gradient. An SGD step of rate 0 leaves the gradient.
    trainer.model.load_state_dict(toy["moved"])
    policy.load_state_dict(toy["moved"])
    their_loss = trainer._compute_loss(trainer.model, theirs)
    their_loss.backward()
    their_clip = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    ours = rloo.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, options)
    assert ours["loss"] == pytest.approx(their_loss.item(), **TOL)
    assert ours["clip_fraction"] == pytest.approx(their_clip, abs=1e-6) and 0 < their_clip < 1  # float32 there
    assert abs(ours["loss"]) > 0.01
    their_grads = dict(trainer.model.named_parameters())
    for name, p in policy.named_parameters():
        assert torch.allclose(p.grad, their_grads[name].grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_three_updates_on_one_batch_match_trl_train(toy, tmp_path, case):
    steps, lr = 3, 1e-3
    trainer = trl_trainer(toy, tmp_path / "trl", case, num_iterations=steps, max_steps=steps, learning_rate=lr)
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r and "step" in r]

    tokenizer = load_tokenizer(toy["reference"])
    options = rloo.RlooOptions(
        **case, learning_rate=lr, num_iterations=steps, batch_prompts=len(PROMPTS), seed=0, device="cpu"
    )
    ids = prompt_ids(tokenizer)
    final = rloo.train_round(
        toy["policy"], toy["reference"], tokenizer, ids, COMPLETIONS, REWARDS, options, tmp_path / "ours", False
    )
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["step"] == b["step"] == step
        assert a["lr"] == b["learning_rate"] == lr
        assert a["loss"] == pytest.approx(b["loss"], **TOL), step
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], **TOL), step
        assert a["clip_fraction"] == pytest.approx(b["clip_ratio/region_mean"], abs=1e-6), step
        if "kl" in b:  # TRL logs it at the step that scores a batch
            assert a["kl_mean"] == pytest.approx(b["kl"], **TOL), step
    assert any(r["clip_fraction"] > 0 for r in ours)  # the later iterations clip: the ratio's branch is covered
    trained = load_causal_lm(str(final)).state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.allclose(trained[name], value, rtol=0, atol=ADAM_TOL), name

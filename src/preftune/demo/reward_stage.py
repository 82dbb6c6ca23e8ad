"""The frontier's learned reward model: `preftune reward-model` on the demo's pairs, and how good it is.

accuracy     its held-out pair accuracy (the run's last eval/rewards/accuracies)
ceiling      what the labels allow: the accuracy of the ground-truth reward itself on the same held-out labels
             (ties count one half), and its expectation Σ σ(|Δr|/τ)/n under the demo's Bradley–Terry noise
agreement    on fresh SFT samples (two per held-out prompt, a seed no stage used): the share of pairs with
             different true rewards that the learned reward orders as the true reward does. This, not the
             pair accuracy, is what iterative DPO and RLOO depend on: they rank the policy's own samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from preftune.demo import pipeline, preferences, sentiment, sft
from preftune.evaluation.stats import wilson_interval
from preftune.rundir import FINAL, METRICS

# Measured on the --quick pairs (held-out accuracy, agreement on fresh samples): 1e-3 × 192 steps 0.62, 0.76;
# 3e-4 × 192 0.61, 0.75; 3e-3 × 128 0.62, 0.73; 1e-3 × 64 (one epoch) 0.60, 0.74. The labels allow 0.78.
RM_LR = 1e-3
RM_EPOCHS = 3


def train_reward_model(out: Path, sft_folder: Path, paths: dict[str, Path], sizes: pipeline.Sizes) -> Path:
    """`preftune reward-model` on the training pairs, evaluated on the held-out pairs → the run folder."""
    from preftune.reward_model import resolve, train

    run = out / "reward-model"
    train(
        resolve(
            {
                "model": str(sft_folder),
                "data": str(paths["train_pairs"]),
                "eval_data": str(paths["heldout_pairs"]),
                "output": str(run),
                "learning_rate": RM_LR,
                "lr_scheduler": "constant",
                "warmup_steps": 5,
                "batch_size": sizes.dpo_batch,
                "max_steps": RM_EPOCHS * sizes.dpo_steps,
                "seed": sizes.seed,
                "device": "cpu",
                "no_report": True,
            }
        )
    )
    return run


def held_out_accuracy(run: Path) -> float:
    records = [json.loads(line) for line in (run / METRICS).read_text(encoding="utf-8").splitlines()]
    return [r for r in records if "eval/rewards/accuracies" in r][-1]["eval/rewards/accuracies"]


def label_ceiling(heldout_pairs: Path, tau: float) -> dict:
    """The true reward as a classifier of the held-out labels: its accuracy (ties ½) and its expectation."""
    rows = [json.loads(line) for line in heldout_pairs.read_text(encoding="utf-8").splitlines()]
    chosen = sentiment.score([r["prompt"] + r["chosen"] for r in rows])
    rejected = sentiment.score([r["prompt"] + r["rejected"] for r in rows])
    hits = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
    expected = [preferences.preference_probability(abs(c - r), 0.0, tau) for c, r in zip(chosen, rejected)]
    return {"accuracy": math.fsum(hits) / len(rows), "expected": math.fsum(expected) / len(rows), "pairs": len(rows)}


def agreement(reward, model, tokenizer, prompts: list[str], sizes: pipeline.Sizes) -> dict:
    """Two fresh SFT samples per prompt: the share of pairs with unequal true rewards that `reward` (a
    preftune.evaluation.rewards.Reward) orders the same way, with its Wilson interval."""
    both = prompts + prompts
    texts = [
        s.text for s in sft.sample(model, tokenizer, both, max_new_tokens=sizes.max_new_tokens, seed=sizes.seed + 9)
    ]
    true = sentiment.score([p + t for p, t in zip(both, texts)])
    learned = reward(both, texts)
    n = len(prompts)
    pairs = [(true[i] - true[n + i], learned[i] - learned[n + i]) for i in range(n) if true[i] != true[n + i]]
    agree = sum((t > 0) == (m > 0) for t, m in pairs)
    low, high = wilson_interval(agree, len(pairs))
    return {"share": agree / len(pairs), "low": low, "high": high, "pairs": len(pairs), "ties_skipped": n - len(pairs)}


def reward_model_stage(out: Path, sft_folder: Path, paths: dict[str, Path], model, tokenizer, sizes) -> dict:
    """Train the reward model and measure it → {"folder", "accuracy", "ceiling", "agreement"}."""
    from preftune.evaluation.rewards import load_reward

    run = train_reward_model(out, sft_folder, paths, sizes)
    prompts = [json.loads(line)["prompt"] for line in paths["prompts"].read_text(encoding="utf-8").splitlines()]
    return {
        "folder": str(run / FINAL),
        "accuracy": held_out_accuracy(run),
        "ceiling": label_ceiling(paths["heldout_pairs"], sizes.tau),
        "agreement": agreement(load_reward(str(run / FINAL), batch_size=64), model, tokenizer, prompts, sizes),
    }

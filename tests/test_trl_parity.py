"""Parity with TRL 1.16's DPOTrainer: same tiny model, same 8 pairs as one full batch, same settings.

For every loss the two share (sigmoid, ipo, hinge, robust, and the RPO combination sigmoid + 0.2·sft), preftune's
per-step `loss`, `logps/*`, `rewards/*`, `grad_norm` and learning rate must equal TRL's over 3 optimizer steps,
within float32 rounding. Steps 2 and 3 run after real AdamW updates (lr 1e-3), so they check the gradients and
the optimizer too, not only the forward pass. Every loss runs with preftune's defaults (packed prefix-shared layout,
reference log-probs computed once and cached); one case also runs the plain padded layout with a live reference
model, the computation closest to TRL's.

Why the settings below make the two runs the same computation:
- All 8 pairs form one batch (batch size 8, 8 pairs), so shuffling cannot change which pairs a step sees; only
  the order inside the batch differs, which moves a mean over 8 values by float rounding at most.
- TRL's default optimizer on torch >= 2.8 is the *fused* AdamW; preftune uses torch's plain AdamW. Both run the
  same update, but in a different order of float operations, so TRL is given `optim="adamw_torch"` (the plain one).
- TRL defaults `bf16=True` and `gradient_checkpointing=True`; both are switched off (preftune runs float32 here;
  transformers 5 spells the second `activation_checkpointing`).
- HF Trainer logs `grad_norm` as returned by `clip_grad_norm_` (the norm before clipping), as preftune does, and
  `learning_rate` as the rate the step used (read before `lr_scheduler.step()`), which is preftune's `lr`.
- With `logging_steps=1` and no gradient accumulation, TRL's logged `loss` is that step's loss, unaveraged and
  unrounded (transformers 5 `_maybe_log_save_evaluate`), and its `rewards/*`, `logps/*` are means over the batch.
- TRL reloads the reference from the model folder; preftune by default scores the pairs with the loaded policy
  before its first update and caches those log-probs (or, with --no-ref-cache, deep-copies it): the same weights.
  Each run gets its own cache folder, so no log-probs computed by another test (another layout) are reused.
The remaining differences are float32 rounding: TRL scores tokens with its chunked fused LM head on 16 rows
(8 chosen, 8 rejected) of one padded length, preftune with its own layouts; sums over the batch run in a different
order. Measured: at most 2e-6 absolute on log-probs near −16 and on grad norms of 1–9 (~1e-7 relative), below
1e-6 on the loss and rewards. The rewards are β·(differences of log-probs near −16), where float32 spacing is
1.9e-6, so their error is absolute, not relative to their (small) size: hence an absolute tolerance too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data.formats import load_pairs
from preftune.data.tokenize import tokenize_pairs
from preftune.demo.toy import save_model_folder

pytest.importorskip("trl")  # a dev dependency (pyproject: trl==1.16.0)

DATA = Path(__file__).parent / "data" / "parity_pairs.jsonl"
STEPS = 3
LEARNING_RATE = 1e-3
MAX_LENGTH = 64  # longer than every pair here (checked below): truncation plays no part
SEED = 0
METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "grad_norm"]  # plus rewards/accuracies, compared exactly
TOL = {"rel": 1e-5, "abs": 1e-5}

# (id, preftune flags, DPOConfig overrides). Beta 0.5 rather than 0.1 so that rewards move visibly in 3 steps.
CASES = [
    ("sigmoid", ["--loss", "sigmoid", "--beta", "0.5"], {"loss_type": ["sigmoid"], "beta": 0.5}),
    ("ipo", ["--loss", "ipo", "--beta", "0.5"], {"loss_type": ["ipo"], "beta": 0.5}),
    ("hinge", ["--loss", "hinge", "--beta", "0.5"], {"loss_type": ["hinge"], "beta": 0.5}),
    ("robust", ["--loss", "robust", "--beta", "0.5", "--label-smoothing", "0.2"],
     {"loss_type": ["robust"], "beta": 0.5, "label_smoothing": 0.2}),
    ("sigmoid+sft", ["--loss", "sigmoid,sft", "--loss-weights", "1,0.2", "--beta", "0.5"],
     {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2], "beta": 0.5}),
    # The plain layout with the reference model run at every step, as TRL does. sigmoid + sft exercises both the
    # pair-normalised and the chosen-token-normalised terms.
    ("sigmoid+sft/padded", ["--loss", "sigmoid,sft", "--loss-weights", "1,0.2", "--beta", "0.5",
                            "--layout", "padded", "--no-ref-cache"],
     {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2], "beta": 0.5}),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("parity") / "model")


def trl_trainer(model_dir: Path, output: Path, **overrides):
    """A TRL DPOTrainer configured as preftune's `train` flags in `run_preftune` (not yet trained)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    args = DPOConfig(output_dir=str(output), per_device_train_batch_size=8, max_steps=STEPS,
                     learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                     activation_checkpointing=False, max_length=MAX_LENGTH, seed=SEED, disable_tqdm=True,
                     dataloader_drop_last=False, **overrides)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer)


def run_trl(model_dir: Path, output: Path, **overrides) -> list[dict]:
    trainer = trl_trainer(model_dir, output, **overrides)
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


def run_preftune(model_dir: Path, output: Path, flags: list[str]) -> list[dict]:
    args = ["train", "--model", str(model_dir), "--data", str(DATA), "--output", str(output), "--batch-size", "8",
            "--max-steps", str(STEPS), "--learning-rate", str(LEARNING_RATE), "--lr-scheduler", "linear",
            "--max-length", str(MAX_LENGTH), "--seed", str(SEED), *flags]
    if "--no-ref-cache" not in flags:
        args += ["--ref-cache", str(output.parent / "ref-cache")]
    assert main(args) == 0
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_tokenization_matches_trl(model_dir, tmp_path):
    """Same ids for every pair, so any metric mismatch below is not a tokenization difference."""
    from preftune.loading import load_tokenizer

    trainer = trl_trainer(model_dir, tmp_path / "trl")
    ours, report = tokenize_pairs(load_pairs(str(DATA))[0], load_tokenizer(str(model_dir)), max_length=MAX_LENGTH)
    assert report.prompts_truncated == report.responses_truncated == report.dropped == 0
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours) == 8
    for row, tp in zip(theirs, ours):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == \
               (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids), tp.where
    # One pair spelled out (toy vocabulary: <s>=1, </s>=2, count=3, from=4, ":"=5, "0"=6, so "n" = 6 + n):
    # "count from 3 :" + " 3 4 5 6</s>" vs " 6 5 4 3</s>".
    assert (ours[0].prompt_ids, ours[0].chosen_ids, ours[0].rejected_ids) == \
           ([1, 3, 4, 9, 5], [9, 10, 11, 12, 2], [12, 11, 10, 9, 2])


@pytest.mark.parametrize("name, flags, trl_overrides", CASES, ids=[c[0] for c in CASES])
def test_per_step_metrics_match_trl(model_dir, tmp_path, name, flags, trl_overrides):
    ours = run_preftune(model_dir, tmp_path / "preftune", flags)
    theirs = run_trl(model_dir, tmp_path / "trl", **trl_overrides)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["step"] == b["step"] == step
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12)
        # A mean of 0/1 values over 8 pairs is k/8, exact in float: any difference is a pair won on one side only.
        assert a["rewards/accuracies"] == b["rewards/accuracies"], (name, step)
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], **TOL), (name, step, key, a[key], b[key])
    # The comparison has teeth only if training moved: at step 1 π = π_ref (every reward 0, every pair a tie, so
    # accuracy 0), by step 3 the loss has moved and the margins have grown. Pair 7 is pair 1 with the labels
    # swapped; pairs 1 and 4 (the same pair twice) outvote it, so it is lost while the others are won: the accuracy
    # is strictly between 0 and 1, and comparing it tests per-pair signs, not just "all won".
    assert ours[0]["rewards/margins"] == 0 and ours[0]["rewards/accuracies"] == 0
    assert abs(ours[2]["loss"] - ours[0]["loss"]) > 1e-2
    assert ours[2]["rewards/margins"] > 0.1
    assert 0 < ours[2]["rewards/accuracies"] < 1

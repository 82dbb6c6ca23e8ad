"""Parity of the unpaired losses with TRL 1.16's KTOTrainer: same tiny model, same data, 3 optimizer steps.

The settings follow tests/test_trl_parity.py (its docstring says why each one makes the two runs the same
computation). Specific to KTO:
- One batch holds every example (batch size 16, 16 examples), so TRL's KL rotation within blocks of
  per_device_train_batch_size and preftune's within blocks of --batch-size pair the same examples, and each step's
  KL estimate and loss are over the same 16 examples. TRL requires its sequential sampler; preftune runs with
  --no-shuffle (with one full batch the order would only move float rounding).
- A file of pairs is unpaired by both (TRL's unpair_preference_dataset): 8 pairs → 16 examples, the 8 chosen
  responses (desirable) first, then the 8 rejected ones.
- TRL logs `kl` (the clamped estimate z), and `rewards/*`, `logps/*` as means over the desirable ("chosen") and
  undesirable ("rejected") examples; preftune logs the same keys with the same meaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main

from toy import save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels

pytest.importorskip("trl")

PAIRS = Path(__file__).parent / "data" / "parity_pairs.jsonl"
STEPS = 3
TOL = {"rel": 1e-5, "abs": 1e-5}
KEYS = [
    "loss",
    "kl",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("kto-parity") / "model")


def unpaired_rows(path: Path) -> Path:
    """16 unpaired examples from the parity pairs, 10 desirable and 6 undesirable, interleaved (not TRL's order
    for pairs, so the rotation pairs other completions)."""
    rows = []
    for i, line in enumerate(PAIRS.read_text().splitlines()):
        pair = json.loads(line)
        rows.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        rows.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": i % 4 == 0})
    return write_jsonl(rows, path)


def run_trl(model_dir: Path, output: Path, data: Path, **overrides) -> list[dict]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    args = KTOConfig(
        output_dir=str(output),
        per_device_train_batch_size=16,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_length=64,
        seed=0,
        disable_tqdm=True,
        beta=0.5,
        **overrides,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


def run_preftune(model_dir: Path, output: Path, data: Path, flags: list[str]) -> list[dict]:
    args = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(output),
        "--batch-size",
        "16",
        "--max-steps",
        str(STEPS),
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "linear",
        "--max-length",
        "64",
        "--seed",
        "0",
        "--no-shuffle",
        "--no-report",
        "--beta",
        "0.5",
        "--ref-cache",
        str(output.parent / "ref-cache"),
        *flags,
    ]
    assert main(args) == 0
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


# (id, data: "pairs" or "unpaired", preftune flags, KTOConfig overrides)
CASES = [
    ("kto/pairs", "pairs", ["--loss", "kto"], {"loss_type": "kto"}),
    (
        "kto/unpaired-weighted",
        "unpaired",
        ["--loss", "kto", "--desirable-weight", "0.8", "--undesirable-weight", "1.3"],
        {"loss_type": "kto", "desirable_weight": 0.8, "undesirable_weight": 1.3},
    ),
    ("apo_zero_unpaired", "unpaired", ["--loss", "apo_zero_unpaired"], {"loss_type": "apo_zero_unpaired"}),
]


@pytest.mark.parametrize("name, data, flags, overrides", CASES, ids=[c[0] for c in CASES])
def test_unpaired_losses_match_trl_kto_trainer(model_dir, tmp_path, name, data, flags, overrides):
    path = PAIRS if data == "pairs" else unpaired_rows(tmp_path / "unpaired.jsonl")
    ours = run_preftune(model_dir, tmp_path / "preftune", path, flags)
    theirs = run_trl(model_dir, tmp_path / "trl", path, **overrides)
    keys = [k for k in KEYS if k != "kl" or name.startswith("kto")]  # apo_zero_unpaired has no KL term
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12)
        for key in keys:
            assert a[key] == pytest.approx(b[key], **TOL), (name, step, key, a[key], b[key])
    # Teeth: training moved, and with the weighted unpaired data the KL estimate z enters the loss after step 1
    # (z = 0 at step 1, where π = π_ref; with the pairs the mean log-ratio stays negative and z is clamped to 0).
    assert abs(ours[2]["loss"] - ours[0]["loss"]) > 1e-3
    assert abs(ours[2]["logps/chosen"] - ours[0]["logps/chosen"]) > 1e-2
    if name == "kto/unpaired-weighted":
        assert ours[0]["kl"] == pytest.approx(0, abs=1e-6) and ours[2]["kl"] > 0.1
    assert ours[0]["desirable_share"] == (0.5 if data == "pairs" else 10 / 16)

"""`preftune reward-model`: a Bradley–Terry reward model, against TRL 1.16's RewardTrainer and on its own.

Parity with TRL (the key test): the tiny toy model, the 8 pairs of tests/data/parity_pairs.jsonl as one full batch,
with and without center_rewards_coefficient. First one batch through both loss functions on the same weights and
the same rows (the tokens are checked equal first), then 3 optimizer steps of the CLI against `trainer.train()`.
Why the two are the same computation:
- Same weights: preftune draws the new head right after seeding with --seed, as RewardTrainer does (set_seed, then
  from_pretrained); the test checks that TRL's own seeded head is ours, and copies our weights into TRL's model
  anyway, so that the comparison does not rest on that.
- Same rows: preftune's padded layout is TRL's DataCollatorForPreference (chosen rows, then rejected rows,
  right-padded with the pad token = EOS), and transformers' classifier pools each row at its last non-pad token on
  both sides.
- Same step: all 8 pairs are one batch, so shuffling changes only their order within it; TRL gets the plain AdamW
  (`optim="adamw_torch"`, not the fused one), bf16 and activation checkpointing off, as in tests/test_trl_parity.py;
  HF Trainer logs the grad norm before clipping and the learning rate the step used, as preftune.
What remains is float32 rounding: TRL's loss is mean(−log σ(m)) + c·mean((r_w + r_l)²), preftune's
Σ[−log σ(m) + c·(r_w + r_l)²] / 8 (one micro-batch's sum over the step's pair count, so that gradient accumulation
and torchrun add up exactly), and the 8 pairs are summed in another order. Measured: the loss differs by at most
one float32 ulp (6e-8 at 0.73), the gradient norms and accuracies are equal; TOL leaves two orders of magnitude.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from preftune.cli import main

from conftest import stopped_after
from helpers import assert_same_run, assert_same_weights, records, torchrun
from toy import counting_pairs, save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs and TRL: CI runs it again under other CPU kernels

PARITY_DATA = Path(__file__).parent / "data" / "parity_pairs.jsonl"
TOL = {"rel": 1e-5, "abs": 1e-6}
TIMING = {"pairs_per_s", "tokens_per_s", "step_time_s"}
# Final weights of runs that split the same steps differently (helpers.WEIGHT_TOL assumes each weight moves by about
# the learning rate whatever its gradient): AdamW divides each element's gradient by its own running RMS, and the
# one-logit head leaves a few elements whose gradient nearly cancels over the step's pairs, so its relative rounding
# error, and that of their ±lr·m/√v updates, is far above float eps. Measured under AVX2 kernels, 3 steps at lr 1e-3:
# one element of 76k off by 1.7e-5, every other below 7e-6. 1e-4 is a tenth of one step; the metrics (loss, grad
# norm, margins) are compared at RUN_TOL besides.
ADAM_TOL = 1e-4


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-model")
    return {
        "model": str(save_model_folder(root / "model")),
        "train": str(write_jsonl(counting_pairs(64, seed=1), root / "train.jsonl")),
        "eval": str(write_jsonl(counting_pairs(32, seed=2), root / "eval.jsonl")),
    }


def args(toy, out: Path, steps: int = 3, *extra: str, data: str | None = None, batch: int = 8) -> list[str]:
    return [
        "reward-model",
        *("--model", toy["model"], "--data", data or toy["train"], "--output", str(out)),
        *("--batch-size", str(batch), "--max-steps", str(steps), "--learning-rate", "1e-3"),
        *("--lr-scheduler", "constant", *extra),
    ]


def without_timing(rs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]


# ---------------------------------------------------------------------------------------------------- TRL parity


def trl_trainer(model_dir: str, output: Path, weights: dict, center: float | None):
    """RewardTrainer on the parity pairs, its model holding `weights`; set up as the CLI run below."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
    from trl import RewardConfig, RewardTrainer

    set_seed(0)  # as RewardTrainer does before it loads a model from a path: the head it would draw
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    assert torch.equal(model.score.weight, weights["score.weight"])  # TRL's own seeded head is preftune's
    model.load_state_dict(weights)
    config = RewardConfig(
        output_dir=str(output),
        per_device_train_batch_size=8,
        max_steps=3,
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
        center_rewards_coefficient=center,
    )
    rows = [json.loads(line) for line in PARITY_DATA.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return RewardTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


@pytest.mark.parametrize("center", [None, 0.5], ids=["plain", "centered"])
def test_loss_accuracy_and_steps_match_trl_reward_trainer(toy, tmp_path, center):
    pytest.importorskip("trl")  # a dev dependency (pyproject: trl==1.16.0)
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from preftune.data.batching import collate_padded
    from preftune.data.formats import load_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.reward_model import batch_loss, load_model, resolve, setup

    centered = {"center_rewards_coefficient": center} if center is not None else {}
    flags = ["--lr-scheduler", "linear", "--max-length", "64", "--seed", "0", "--no-report"]
    flags += ["--center-rewards-coefficient", str(center)] if center is not None else []
    cli = args(toy, tmp_path / "preftune", 3, *flags, data=str(PARITY_DATA))
    options = {"model": toy["model"], "data": str(PARITY_DATA), "output": str(tmp_path / "x"), "seed": 0}
    cfg = resolve({**options, "max_length": 64, **centered})
    s = setup(cfg)  # the CLI run's start: its tokenizer and its model, head included
    ours = load_model(cfg, s.tokenizer.pad_token_id)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), s.policy.state_dict().values()))
    trainer = trl_trainer(toy["model"], tmp_path / "trl", ours.state_dict(), center)

    # One batch: the same token ids, rows and loss function.
    pairs, _ = tokenize_pairs(load_pairs(str(PARITY_DATA))[0], s.tokenizer, max_length=64)
    for row, p in zip(trainer.train_dataset, pairs, strict=True):
        assert (row["chosen_ids"], row["rejected_ids"]) == (p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids)
    batch = collate_padded(pairs, list(range(8)), s.tokenizer.pad_token_id)
    inputs = DataCollatorForPreference(pad_token_id=s.tokenizer.pad_token_id)(list(trainer.train_dataset))
    assert torch.equal(inputs["input_ids"], batch.input_ids) and torch.equal(
        inputs["attention_mask"], batch.attention_mask
    )
    trainer.model.train()  # TRL files the metrics of a model in train mode under "train"
    theirs_loss = trainer.compute_loss(trainer.model, dict(inputs)).item()
    theirs = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    loss, metrics = batch_loss(s, batch, num_pairs=8)
    assert loss.item() == pytest.approx(theirs_loss, rel=1e-6)
    assert metrics["rewards/accuracies"].mean().item() == theirs["accuracy"] == 0.625  # 5 of 8: per-pair signs
    assert metrics["rewards/margins"].mean().item() == pytest.approx(theirs["margin"], **TOL)
    if center is not None:  # the centering term has teeth: it changes the loss by more than rounding
        plain = -torch.nn.functional.logsigmoid(metrics["rewards/margins"]).mean().item()
        assert loss.item() - plain > 0.01
    trainer._metrics["train"].clear()

    # Three optimizer steps, the CLI against trainer.train().
    assert main(cli) == 0
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r and "step" in r]
    ours = records(tmp_path / "preftune")
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["step"] == b["step"] == step
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12)
        assert a["rewards/accuracies"] == b["accuracy"], step
        for key, their_key in (("loss", "loss"), ("grad_norm", "grad_norm"), ("rewards/margins", "margin")):
            assert a[key] == pytest.approx(b[their_key], **TOL), (step, key, a[key], b[their_key])
        assert (a["rewards/chosen"] + a["rewards/rejected"]) / 2 == pytest.approx(b["mean_reward"], **TOL)
    assert abs(ours[2]["loss"] - ours[0]["loss"]) > 0.05 and ours[2]["rewards/margins"] > ours[0]["rewards/margins"]


# ---------------------------------------------------------------------------------------------------- end to end


def independent_rewards(model_dir: str, rows: list[dict], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """r(x, y) of each row, without preftune: the model loaded as transformers loads it after seeding, one text at a
    time (no padding), scored at the last token of prompt + response, i.e. the token before preftune's EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def score(text: str) -> float:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids).logits[0, 0].item()  # one row, no pad token id: its last token

    return tuple(torch.tensor([score(r["prompt"] + r[k]) for r in rows]) for k in ("chosen", "rejected"))


def test_end_to_end_first_loss_run_folder_and_final_reward_folder(toy, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from preftune.data.batching import collate_padded
    from preftune.data.formats import load_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.evaluation.rewards import load_reward
    from preftune.loading import load_tokenizer
    from preftune.reward_model import rewards

    out = tmp_path / "rm"
    assert main(args(toy, out, 2, "--no-shuffle", "--seed", "3", "--eval-data", toy["eval"])) == 0
    first = records(out)[0]
    # Step 1 holds the first 8 pairs (--no-shuffle); its loss is the formula on the seeded model's own logits.
    rows = [json.loads(line) for line in Path(toy["train"]).read_text().splitlines()[:8]]
    chosen, rejected = independent_rewards(toy["model"], rows, seed=3)
    expected = {
        "loss": -torch.nn.functional.logsigmoid(chosen - rejected).mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
    }
    for key, value in expected.items():
        assert first[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert first["rewards/accuracies"] == (chosen > rejected).float().mean().item()
    assert first["grad_norm"] > 0 and first["lr"] == pytest.approx(1e-3)
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= set(records(out)[-1])
    assert {"config.yaml", "metrics.jsonl", "launch.json", "audit.json", "report.html"} <= {
        p.name for p in out.iterdir()
    }
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["objective"] == "reward_model" and config["center_rewards_coefficient"] is None
    assert "beta" not in config and "loss" not in config
    page = (out / "report.html").read_text()
    assert "Bradley–Terry reward model" in page and "? loss" not in page and "β = ?" not in page

    # final/: a sequence-classification folder with its pad token, loaded by `preftune eval --reward`'s loader,
    # which scores a prompt + response (decoded without EOS) as the trained model does.
    final = out / "final"
    assert (final / "model.safetensors").exists() and "reward-model" in (final / "README.md").read_text()
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = load_tokenizer(str(final))
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id == 2
    held = [json.loads(line) for line in Path(toy["eval"]).read_text().splitlines()[:6]]
    pairs, _ = tokenize_pairs(load_pairs(toy["eval"])[0][:6], tokenizer)
    batch = collate_padded(pairs, list(range(6)), tokenizer.pad_token_id)
    s = SimpleNamespace(policy=model.eval(), device=torch.device("cpu"), cfg=SimpleNamespace(dtype="float32"))
    with torch.no_grad():
        ours = torch.cat(rewards(s, batch)).tolist()
    responses = [r[k] for k in ("chosen", "rejected") for r in held]
    scores = load_reward(str(final))([r["prompt"] for r in held] * 2, responses)
    assert scores == pytest.approx(ours, rel=1e-5, abs=1e-5)


def test_learns_the_toy_task(toy, tmp_path):
    out = tmp_path / "rm"
    assert main(args(toy, out, 24, "--eval-data", toy["eval"], "--eval-every", "8", "--no-report")) == 0
    evals = [r for r in records(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["eval/rewards/accuracies"] > evals[0]["eval/rewards/accuracies"]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.8 and evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1
    assert evals[-1]["eval/rewards/margins"] > 0.5


def test_resume_after_interruption_reproduces_the_run(toy, tmp_path):
    def run_args(out):
        return args(toy, out, 6, "--save-every", "2", "--lr-scheduler", "linear", "--warmup-steps", "2", "--no-report")

    whole = tmp_path / "whole"
    assert main(run_args(whole)) == 0
    cut = tmp_path / "cut"
    with stopped_after(5):
        assert main(run_args(cut)) == 130
    assert len(records(cut)) == 5 and not (cut / "final").exists()
    assert main([*run_args(cut), "--resume"]) == 0
    assert without_timing(records(cut)) == without_timing(records(whole))
    assert_same_weights(whole, cut, tol=0)


@pytest.fixture(scope="module")
def base_run(toy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "rm"
    assert main(args(toy, out, 3, "--no-report")) == 0
    return out


SAME_STEPS = {
    "accum": ["--batch-size", "4", "--grad-accum", "2"],  # the loss is divided by the step's pair count
    "stream": ["--stream"],  # the pairs on disk are the in-memory ones
    "checkpointing": ["--gradient-checkpointing"],  # recomputed activations, the same gradients
}


@pytest.mark.parametrize("extra", SAME_STEPS.values(), ids=SAME_STEPS)
def test_other_ways_to_run_the_same_steps_give_the_same_run(toy, base_run, tmp_path, extra):
    other = tmp_path / "other"
    assert main(args(toy, other, 3, "--no-report", *extra)) == 0
    assert_same_run(records(other), records(base_run))
    assert_same_weights(other, base_run, tol=ADAM_TOL)


def test_bfloat16_trains_close_to_float32(toy, base_run, tmp_path):
    """--dtype bfloat16: forward and backward under autocast (8 bits of mantissa), weights float32."""
    out = tmp_path / "bf16"
    assert main(args(toy, out, 3, "--no-report", "--dtype", "bfloat16")) == 0
    for a, b in zip(records(out), records(base_run), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=0.02) and math.isfinite(a["grad_norm"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--beta", "0.1"], "unrecognized arguments: --beta"),
        (["--lora-r", "4"], "unrecognized arguments: --lora-r"),
        (["--layout", "padded"], "unrecognized arguments: --layout"),
        (["--center-rewards-coefficient", "-1"], "--center-rewards-coefficient must be zero or positive, got -1.0"),
        (["--center-rewards-coefficient", "nan"], "--center-rewards-coefficient must be zero or positive"),
        (["--eval-every", "2"], "--eval-every has no effect without --eval-data"),
        (["--max-steps", "0"], "--max-steps must be positive"),
    ],
)
def test_bad_flags_give_one_line_and_write_nothing(toy, tmp_path, capsys, extra, message):
    out = tmp_path / "rm"
    assert main(args(toy, out) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preftune: error:") and message in err[-1], err
    assert "Traceback" not in "\n".join(err) and not out.exists()


def test_bad_config_files_and_folders(toy, tmp_path, capsys):
    out = tmp_path / "rm"
    cases = []
    for text, message in [
        ("beta: 0.2\n", "beta: an option of preftune train's DPO that preftune reward-model does not take"),
        ("lora_r: 4\n", "lora_r: an option of preftune train's DPO"),
        ("learnig_rate: 1\n", "unknown key 'learnig_rate'"),
        ("center_rewards_coefficient: -1\n", "center_rewards_coefficient must be zero or positive, got -1"),
        ("center_rewards_coefficient: yes\n", "center_rewards_coefficient must be zero or positive, got True"),
    ]:
        path = tmp_path / f"c{len(cases)}.yaml"
        path.write_text(text)
        cases.append((["--config", str(path)], message))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases.append((["--model", str(adapter)], "holds a LoRA adapter"))
    for extra, message in cases:
        assert main(args(toy, out) + extra) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1] and "Traceback" not in "\n".join(err), (extra, err)
    # A run folder of another command is not resumed as a reward model, nor a reward model by `preftune train`.
    assert main(args(toy, out, 2, "--save-every", "1", "--no-report")) == 0
    assert main(["train", *args(toy, out, 2, "--save-every", "1", "--no-report", "--resume")[1:]]) == 2
    assert "option objective is None but the run" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_train_as_one(toy, tmp_path):
    """torchrun: each of 2 processes takes half of every step's pairs and of the held-out pairs; the summed
    gradients and metrics are the one-process run's."""
    extra = ("--eval-data", toy["eval"], "--no-report")
    one = tmp_path / "one"
    assert main(args(toy, one, 3, *extra)) == 0
    two = tmp_path / "two"
    done = torchrun(args(toy, two, 3, *extra, batch=4), tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((two / "launch.json").read_text())["processes"] == 2
    assert_same_run(records(two), records(one))
    assert_same_weights(two, one, tol=ADAM_TOL)
    assert math.isfinite(records(two)[-1]["eval/loss"])


def test_center_rewards_coefficient_from_a_config_file_and_the_flag_over_it(toy, tmp_path):
    from preftune.reward_model import resolve

    path = tmp_path / "rm.yaml"
    path.write_text("center_rewards_coefficient: 0.01\nlearning_rate: 0.002\n")
    options = {"model": toy["model"], "data": toy["train"], "output": str(tmp_path / "rm"), "config": str(path)}
    cfg = resolve(options)
    assert cfg.center_rewards_coefficient == 0.01 and cfg.learning_rate == 0.002
    assert resolve({**options, "center_rewards_coefficient": 0.5}).center_rewards_coefficient == 0.5

"""Parity with TRL 1.16: same tiny model, same 8 pairs as one full batch, same settings, 3 optimizer steps.

Covered: every loss type of TRL's DPOTrainer (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair,
sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, and sft in the RPO combination
sigmoid + 0.2·sft), its f-divergences (forward_kl, js_divergence, alpha_divergence), its WPO weighting
(use_weighting, preftune's --wpo), LD-DPO (ld_alpha, preftune's --ld-alpha), TR-DPO's reference
updates (sync_ref_model, preftune's --ref-update soft and hard), and simpo and cpo against trl.experimental's CPOTrainer. preftune's per-step `loss`, `logps/*`, `rewards/*`, `grad_norm` and learning rate
must equal TRL's within float32 rounding, and `rewards/accuracies` exactly. Steps 2 and 3 run after real AdamW
updates (lr 1e-3), so they check the gradients and the optimizer too, not only the forward pass. Every loss runs
with preftune's defaults (packed prefix-shared layout, reference log-probs computed once and cached); one case
also runs the plain padded layout with a live reference model, the computation closest to TRL's.

Where preftune deliberately logs something else, the difference is stated here and tested below:
- `ipo` and `sigmoid_norm` train on per-token log-ratios; preftune logs the rewards of that loss,
  β·(log π − log π_ref)/|y|, where TRL logs β·(log π − log π_ref) for every loss type. Their loss, log-probs and
  grad norm are compared as for the other losses; the rewards are compared on pairs whose responses all have the
  same length L, where preftune's rewards and margins are exactly TRL's divided by L and the accuracies equal.
- `simpo`: TRL's CPOTrainer logs `logps/*` as per-token means (the quantity SimPO trains on); preftune's `logps/*`
  are always sums. Rewards (β × the per-token mean), accuracies, loss and grad norm are compared.
- `rewards/accuracies` is the same definition on both sides: a tie counts as wrong. At step 1 π = π_ref, every
  pair is a tie and both report 0 (preftune's cached reference log-probs come from the same weights and the same
  layout, so the ties are exact here; the README explains the rounding-level wins a cached reference can add).
- Not run against TRL's trainers (formula-level parity only, tests/test_losses.py): `orpo`, whose NLL term in TRL's
  ORPOTrainer also counts the prompt tokens (preftune's is over the chosen response, as `sft` and CPO; the
  log-probs of prompt tokens are never computed); `sft` alone, which in preftune builds no reference, so its
  rewards are β·log π where TRL's DPOTrainer still loads one; ipo_sum, dpop, rdpo, which TRL does not have.

Why the settings below make the two runs the same computation:
- All 8 pairs form one batch (batch size 8, 8 pairs), so shuffling cannot change which pairs a step sees; only
  the order inside the batch differs, which moves a mean over 8 values by float rounding at most (and cannot
  change the sorted quantiles of aot).
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
1.9e-6, so their error is absolute, not relative to their (small) size: hence an absolute tolerance too. The
squared losses (ipo, sppo_hard: values near 1/(2β)² = 1 to 4) and discopop's exponential part carry the same
absolute error times their slope, still well within TOL.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.data.formats import load_pairs
from preftune.data.tokenize import tokenize_pairs
from preftune.losses import LOSSES

from toy import save_model_folder, write_jsonl

pytestmark = pytest.mark.exactness  # compares runs: CI runs it again under other CPU kernels

pytest.importorskip("trl")  # a dev dependency (pyproject: trl==1.16.0)

DATA = Path(__file__).parent / "data" / "parity_pairs.jsonl"
STEPS = 3
LEARNING_RATE = 1e-3
MAX_LENGTH = 64  # longer than every pair here (checked below): truncation plays no part
SEED = 0
REWARDS = ["rewards/chosen", "rewards/rejected", "rewards/margins"]  # plus rewards/accuracies, compared exactly
LOGPS = ["logps/chosen", "logps/rejected"]
METRICS = ["loss", *REWARDS, *LOGPS, "grad_norm"]
TOL = {"rel": 1e-5, "abs": 1e-5}
BETA = ["--beta", "0.5"]  # 0.5 rather than 0.1 so that rewards move visibly in 3 steps

# (id, preftune flags, DPOConfig overrides)
CASES = [
    ("sigmoid", ["--loss", "sigmoid"], {"loss_type": ["sigmoid"]}),
    ("ipo", ["--loss", "ipo"], {"loss_type": ["ipo"]}),
    ("hinge", ["--loss", "hinge"], {"loss_type": ["hinge"]}),
    ("robust", ["--loss", "robust", "--label-smoothing", "0.2"], {"loss_type": ["robust"], "label_smoothing": 0.2}),
    (
        "exo_pair",
        ["--loss", "exo_pair", "--label-smoothing", "1e-3"],
        {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    ),
    ("nca_pair", ["--loss", "nca_pair"], {"loss_type": ["nca_pair"]}),
    ("bco_pair", ["--loss", "bco_pair"], {"loss_type": ["bco_pair"]}),
    ("sppo_hard", ["--loss", "sppo_hard"], {"loss_type": ["sppo_hard"]}),
    ("aot", ["--loss", "aot", "--label-smoothing", "0.1"], {"loss_type": ["aot"], "label_smoothing": 0.1}),
    ("aot_unpaired", ["--loss", "aot_unpaired"], {"loss_type": ["aot_unpaired"]}),
    ("apo_zero", ["--loss", "apo_zero"], {"loss_type": ["apo_zero"]}),
    ("apo_down", ["--loss", "apo_down"], {"loss_type": ["apo_down"]}),
    ("discopop", ["--loss", "discopop", "--discopop-tau", "0.1"], {"loss_type": ["discopop"], "discopop_tau": 0.1}),
    ("sigmoid_norm", ["--loss", "sigmoid_norm"], {"loss_type": ["sigmoid_norm"]}),
    (
        "sigmoid+sft",
        ["--loss", "sigmoid,sft", "--loss-weights", "1,0.2"],
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2]},
    ),
    # The plain layout with the reference model run at every step, as TRL does. sigmoid + sft exercises both the
    # pair-normalised and the chosen-token-normalised terms.
    (
        "sigmoid+sft/padded",
        ["--loss", "sigmoid,sft", "--loss-weights", "1,0.2", "--layout", "padded", "--no-ref-cache"],
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2]},
    ),
    (
        "sigmoid/forward_kl",
        ["--loss", "sigmoid", "--f-divergence", "forward_kl"],
        {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    ),
    (
        "sigmoid/js_divergence",
        ["--loss", "sigmoid", "--f-divergence", "js_divergence"],
        {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    ),
    # α = 0.3, not the default 0.5, where TRL's α and the f-DPO paper's coincide: pins TRL's convention.
    (
        "sigmoid/alpha_divergence",
        ["--loss", "sigmoid", "--f-divergence", "alpha_divergence", "--f-alpha", "0.3"],
        {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    ),
    (
        "ipo/js_divergence",
        ["--loss", "ipo", "--f-divergence", "js_divergence"],
        {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    ),
    # WPO weights each pair by the policy's own likelihood of its responses (TRL's use_weighting).
    ("sigmoid/wpo", ["--loss", "sigmoid", "--wpo"], {"loss_type": ["sigmoid"], "use_weighting": True}),
    # (Not hinge: TRL 1.16 multiplies relu's output in place and fails in backward; preftune's hinge + WPO trains.)
    ("ipo/wpo", ["--loss", "ipo", "--wpo"], {"loss_type": ["ipo"], "use_weighting": True}),
    # LD-DPO: 6 of the 8 pairs have responses of different lengths, so the weighting changes their log-probs; the
    # reference log-probs come from the cache, computed with the same weights.
    ("sigmoid/ld_alpha", ["--loss", "sigmoid", "--ld-alpha", "0.3"], {"loss_type": ["sigmoid"], "ld_alpha": 0.3}),
]
LENGTH_NORMALISED = {"ipo", "sigmoid_norm"}  # preftune logs per-token rewards for these: compared separately


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_folder(tmp_path_factory.mktemp("parity") / "model")


def trl_args(config_class, output: Path, **overrides):
    """TRL training arguments equal to preftune's `train` flags in `run_preftune`."""
    return config_class(
        output_dir=str(output),
        per_device_train_batch_size=8,
        max_steps=STEPS,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_length=MAX_LENGTH,
        seed=SEED,
        disable_tqdm=True,
        dataloader_drop_last=False,
        beta=0.5,
        **overrides,
    )


def trl_trainer(model_dir: Path, output: Path, data: Path = DATA, trainer: str = "dpo", **overrides):
    """A TRL DPOTrainer (or trl.experimental's CPOTrainer) set up as `run_preftune`, not yet trained."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if trainer == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    extra = {"ref_model": None} if trainer == "dpo" else {}
    if trainer == "cpo":  # CPOTrainer refuses a tokenizer without a pad token (DPOTrainer, like preftune, uses EOS)
        tokenizer.pad_token = tokenizer.eos_token
    return Trainer(
        model=model,
        args=trl_args(Config, output, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        **extra,
    )


def run_trl(model_dir: Path, output: Path, data: Path = DATA, trainer: str = "dpo", **overrides) -> list[dict]:
    trl = trl_trainer(model_dir, output, data, trainer, **overrides)
    trl.train()
    records = [r for r in trl.state.log_history if "loss" in r and "step" in r]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return records


def run_preftune(model_dir: Path, output: Path, flags: list[str], data: Path = DATA) -> list[dict]:
    args = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(output),
        "--batch-size",
        "8",
        "--max-steps",
        str(STEPS),
        "--learning-rate",
        str(LEARNING_RATE),
        "--lr-scheduler",
        "linear",
        "--max-length",
        str(MAX_LENGTH),
        "--seed",
        str(SEED),
        "--no-report",
        *BETA,
        *flags,
    ]
    losses = flags[flags.index("--loss") + 1].split(",")
    if not {"--no-ref-cache", "--ref-update"} & set(flags) and any(LOSSES[loss].needs_reference for loss in losses):
        args += ["--ref-cache", str(output.parent / "ref-cache")]
    assert main(args) == 0
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same(ours: list[dict], theirs: list[dict], keys: list[str], name: str, accuracies: bool = True) -> None:
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        assert a["step"] == b["step"] == step
        assert a["lr"] == pytest.approx(b["learning_rate"], rel=1e-12)
        # A mean of 0/1 values over 8 pairs is k/8, exact in float: any difference is a pair won on one side only.
        if accuracies:
            assert a["rewards/accuracies"] == b["rewards/accuracies"], (name, step)
        for key in keys:
            assert a[key] == pytest.approx(b[key], **TOL), (name, step, key, a[key], b[key])


def assert_training_moved(ours: list[dict]) -> None:
    # The comparison has teeth only if training moved: the loss and the log-probs change over the 3 steps.
    assert abs(ours[2]["loss"] - ours[0]["loss"]) > 1e-3
    assert abs(ours[2]["logps/chosen"] - ours[0]["logps/chosen"]) > 1e-2


def test_tokenization_matches_trl(model_dir, tmp_path):
    """Same ids for every pair, so any metric mismatch below is not a tokenization difference."""
    from preftune.loading import load_tokenizer

    trainer = trl_trainer(model_dir, tmp_path / "trl")
    ours, report = tokenize_pairs(load_pairs(str(DATA))[0], load_tokenizer(str(model_dir)), max_length=MAX_LENGTH)
    assert report.prompts_truncated == report.responses_truncated == report.dropped == 0
    theirs = trainer.train_dataset
    assert len(theirs) == len(ours) == 8
    for row, tp in zip(theirs, ours):
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (
            tp.prompt_ids,
            tp.chosen_ids,
            tp.rejected_ids,
        ), tp.where
    # One pair spelled out (toy vocabulary: <s>=1, </s>=2, count=3, from=4, ":"=5, "0"=6, so "n" = 6 + n):
    # "count from 3 :" + " 3 4 5 6</s>" vs " 6 5 4 3</s>".
    assert (ours[0].prompt_ids, ours[0].chosen_ids, ours[0].rejected_ids) == (
        [1, 3, 4, 9, 5],
        [9, 10, 11, 12, 2],
        [12, 11, 10, 9, 2],
    )
    # CPOTrainer tokenizes on its own (prompt, then prompt + response, BOS and EOS added if missing): same ids.
    cpo = trl_trainer(model_dir, tmp_path / "cpo", trainer="cpo").train_dataset
    for row, tp in zip(cpo, ours):
        assert row["chosen_input_ids"] == tp.prompt_ids + tp.chosen_ids, tp.where
        assert row["rejected_input_ids"] == tp.prompt_ids + tp.rejected_ids, tp.where
        assert row["chosen_labels"] == [-100] * len(tp.prompt_ids) + tp.chosen_ids, tp.where


@pytest.mark.parametrize("name, flags, trl_overrides", CASES, ids=[c[0] for c in CASES])
def test_per_step_metrics_match_trl(model_dir, tmp_path, name, flags, trl_overrides):
    ours = run_preftune(model_dir, tmp_path / "preftune", flags)
    theirs = run_trl(model_dir, tmp_path / "trl", **trl_overrides)
    loss = name.split("/")[0]
    normalised = loss in LENGTH_NORMALISED  # rewards differ by design: see test_length_normalised_rewards_...
    keys = [k for k in METRICS if not (normalised and k in REWARDS)]
    assert_same(ours, theirs, keys, name, accuracies=not normalised)
    assert_training_moved(ours)
    # At step 1 π = π_ref: every reward is 0 and every pair a tie, which both count as lost.
    assert ours[0]["rewards/margins"] == 0 and ours[0]["rewards/accuracies"] == 0
    if loss == "sigmoid":
        # Pair 7 is pair 1 with the labels swapped; pairs 1 and 4 (the same pair twice) outvote it, so it is lost
        # while the others are won: the accuracy is strictly between 0 and 1, and comparing it tests per-pair
        # signs, not just "all won".
        assert ours[2]["rewards/margins"] > 0.1
        assert 0 < ours[2]["rewards/accuracies"] < 1


def equal_length_pairs(path: Path) -> Path:
    """8 pairs whose chosen and rejected responses all have 5 tokens (4 numbers and EOS)."""
    rows = []
    for start in (3, 0, 7, 3, 5, 2, 3, 9):
        good = [str(start + i) for i in range(4)]
        rows.append(
            {"prompt": f"count from {start} :", "chosen": " " + " ".join(good), "rejected": " " + " ".join(good[::-1])}
        )
    rows[6]["chosen"], rows[6]["rejected"] = rows[6]["rejected"], rows[6]["chosen"]  # one swapped label
    return write_jsonl(rows, path)


@pytest.mark.parametrize("loss", sorted(LENGTH_NORMALISED))
def test_length_normalised_rewards_are_trls_divided_by_the_length(model_dir, tmp_path, loss):
    """The documented difference: preftune logs β·(log π − log π_ref)/|y| for ipo and sigmoid_norm, TRL the sum.
    With every response 5 tokens long, preftune's rewards and margins are TRL's / 5 and the accuracies equal."""
    data = equal_length_pairs(tmp_path / "equal.jsonl")
    ours = run_preftune(model_dir, tmp_path / "preftune", ["--loss", loss], data)
    theirs = run_trl(model_dir, tmp_path / "trl", data, loss_type=[loss])
    assert_same(ours, theirs, ["loss", *LOGPS, "grad_norm"], loss)
    for a, b in zip(ours, theirs):
        for key in REWARDS:
            assert 5 * a[key] == pytest.approx(b[key], **TOL), (loss, key)
    assert ours[2]["rewards/margins"] != pytest.approx(theirs[2]["rewards/margins"], **TOL)  # it does differ


# (id, preftune flags, CPOConfig overrides); cpo_alpha = 0 is TRL's pure SimPO, 1 its CPO-SimPO (= simpo + sft).
CPO_CASES = [
    (
        "simpo",
        ["--loss", "simpo", "--simpo-gamma", "0.5"],
        {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.5},
    ),
    ("simpo+sft", ["--loss", "simpo,sft", "--loss-weights", "1,1"], {"loss_type": "simpo", "cpo_alpha": 1.0}),
    (
        "cpo",
        ["--loss", "cpo", "--cpo-alpha", "0.5", "--label-smoothing", "0.1"],
        {"loss_type": "sigmoid", "cpo_alpha": 0.5, "label_smoothing": 0.1},
    ),
]


@pytest.mark.parametrize("name, flags, trl_overrides", CPO_CASES, ids=[c[0] for c in CPO_CASES])
def test_reference_free_losses_match_trl_cpo_trainer(model_dir, tmp_path, name, flags, trl_overrides):
    ours = run_preftune(model_dir, tmp_path / "preftune", flags)
    theirs = run_trl(model_dir, tmp_path / "trl", trainer="cpo", **trl_overrides)
    simpo = name.startswith("simpo")  # TRL logs per-token mean log-probs for SimPO, preftune sums: not compared
    assert_same(ours, theirs, [k for k in METRICS if not (simpo and k in LOGPS)], name)
    assert_training_moved(ours)
    # No reference: the rewards are β·log π (per token for SimPO), far from 0 at step 1.
    assert ours[0]["rewards/chosen"] < -0.5


# (id, preftune flags, DPOConfig overrides): TR-DPO's reference updates, small τ so that they matter within 3 steps.
TR_DPO_CASES = [
    (
        "soft",
        ["--ref-update", "soft", "--ref-update-every", "1", "--ref-update-alpha", "0.5"],
        {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
    ),
    (
        "hard",
        ["--ref-update", "hard", "--ref-update-every", "2"],
        {"sync_ref_model": True, "ref_model_sync_steps": 2, "ref_model_mixup_alpha": 1.0},
    ),
]


@pytest.mark.parametrize("name, flags, trl_overrides", TR_DPO_CASES, ids=[c[0] for c in TR_DPO_CASES])
def test_tr_dpo_matches_trl_sync_ref_model(model_dir, tmp_path, name, flags, trl_overrides):
    """TR-DPO against TRL's sync_ref_model: the updated reference shows in the rewards of the steps after it."""
    ours = run_preftune(model_dir, tmp_path / "preftune", ["--loss", "sigmoid", *flags])
    theirs = run_trl(model_dir, tmp_path / "trl", loss_type=["sigmoid"], **trl_overrides)
    assert_same(ours, theirs, METRICS, name)
    assert abs(ours[2]["logps/chosen"] - ours[0]["logps/chosen"]) > 1e-2  # the policy trained
    # The updates have teeth: from the first step after one, the rewards differ from plain DPO's (fixed reference).
    plain = run_preftune(model_dir, tmp_path / "plain", ["--loss", "sigmoid", "--no-ref-cache"])
    first_after = trl_overrides["ref_model_sync_steps"]  # 0-based index of the first step with a moved reference
    assert ours[first_after - 1]["rewards/margins"] == plain[first_after - 1]["rewards/margins"]
    assert abs(ours[first_after]["rewards/margins"] - plain[first_after]["rewards/margins"]) > 1e-3
    if name == "hard":  # the step after a hard update starts from π = π_ref: every reward is 0, the loss log 2
        assert ours[2]["rewards/margins"] == 0 and ours[2]["rewards/accuracies"] == 0
        assert ours[2]["loss"] == pytest.approx(math.log(2), rel=1e-6) and ours[1]["loss"] < ours[0]["loss"] - 1e-3
    else:
        assert abs(ours[2]["loss"] - ours[0]["loss"]) > 1e-3

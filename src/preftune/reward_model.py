"""`preftune reward-model`: a Bradley–Terry reward model trained on the preference pairs of `preftune train`.

The model is the SFT model's body with a new one-logit head (`AutoModelForSequenceClassification`, num_labels=1),
drawn right after seeding with --seed, as TRL's RewardTrainer draws it. The reward r(x, y) is the head's logit at
the last token of prompt x + response y that is not the pad token (transformers' pooling; the pad token id is set
in the config, as TRL sets it). With EOS as the pad token (preftune's and TRL's default when the tokenizer has none)
that is the token before the response's closing EOS: where `preftune eval --reward` scores a decoded response.
Per pair, with c = --center-rewards-coefficient (TRL's center_rewards_coefficient; Eisenstein et al. 2023, eq. 2):

    ℓ = −log σ(r(x, y_w) − r(x, y_l)) + c · (r(x, y_w) + r(x, y_l))²      (Bradley–Terry; Ouyang et al. 2022, eq. 1)

A step's loss is the mean of ℓ over its pairs; each micro-batch's sum is divided by the step's pair count, so
gradient accumulation and torchrun's shares add up to one big batch, as in recipe.py. The rest is `preftune
train`'s own code: data, tokenization and audit, run folder and --resume checks, step order, optimizer, schedule
and checkpoints (recipe.py), torchrun (distributed.py), metrics.jsonl under the names the report draws
(rewards/{chosen,rejected,margins,accuracies}, eval/ the same on --eval-data) and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm.auto import tqdm

from preftune import checkpoint, config, distributed, observe, rundir
from preftune.config import TrainConfig
from preftune.data.batching import PaddedBatch
from preftune.device import autocast, resolve_device
from preftune.errors import UserError
from preftune.loading import carries_adapter, causal_lm_config, checkpoint_activations, load_run_tokenizer
from preftune.malloc import fix_malloc_thresholds
from preftune.metrics import StepMetrics, add_sums, append_records, per_pair, progress_fields, to_records
from preftune.modelcard import CARD, base_model

if TYPE_CHECKING:  # recipe imports transformers: loaded when a run starts, not for `preftune --help`
    from preftune.recipe import Setup

log = logging.getLogger("preftune")
OBJECTIVE = "reward_model"  # config.yaml's `objective`: `preftune train --resume` refuses such a run folder
# The options of `preftune train` that a reward model takes; the others (losses, β, reference, LoRA, layouts,
# sampling evaluation, FSDP) are DPO's or not supported here, and are not flags of `preftune reward-model`.
ACCEPTED = (
    *("model", "data", "output", "eval_data", "tokenizer", "columns", "on_identical", "stream"),
    *("learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "max_grad_norm", "batch_size", "grad_accum"),
    *("max_steps", "epochs", "seed", "no_shuffle", "max_length", "max_prompt_length", "on_overlength"),
    *("group_by_length", "dtype", "gradient_checkpointing", "device", "trust_remote_code", "allow_pickle_weights"),
    *("log_every", "eval_every", "no_report", "report_to", "save_every", "keep_last", "skip_nonfinite", "resume"),
    "config",
)
HELP = {
    "model": "SFT model folder or hub name: the reward model's body (its LM head is replaced by a new one-logit head).",
    "output": "Run directory (config.yaml, metrics.jsonl, checkpoints/, final/: the reward model).",
}
CENTER_HELP = (
    "c ≥ 0: add c · mean((r_chosen + r_rejected)²) to the loss, pulling rewards towards mean zero "
    "(TRL's center_rewards_coefficient; Eisenstein et al. 2023 recommend 0.01). Default: none."
)


@dataclass
class RewardModelConfig(TrainConfig):
    """TrainConfig's options that a reward model takes (`ACCEPTED`), checked by config.validate, and its own."""

    center_rewards_coefficient: float | None = None

    @property
    def losses(self) -> list[str]:
        """None of DPO's losses: the run monitor then judges no loss-specific rule (a start at ln 2)."""
        return []

    def to_dict(self) -> dict[str, Any]:
        """config.yaml: what --resume compares and the report lists; no DPO option that played no part."""
        options = {name: getattr(self, name) for name in ACCEPTED if name != "config"}
        return {"objective": OBJECTIVE, **options, "center_rewards_coefficient": self.center_rewards_coefficient}


def add_arguments(parser) -> None:
    """The flags of `ACCEPTED`, spelled and checked as `preftune train`'s (config.add_arguments), and
    --center-rewards-coefficient. Defaults are suppressed: `resolve` knows which flags were given."""
    config.add_arguments(parser, ACCEPTED, HELP)
    parser.add_argument(
        "--center-rewards-coefficient", type=float, metavar="C", default=argparse.SUPPRESS, help=CENTER_HELP
    )


def resolve(args: dict[str, Any]) -> RewardModelConfig:
    """Flags (and a --config YAML file of `ACCEPTED` keys and center_rewards_coefficient) → the config, checked as
    `preftune train` checks its own; the flag wins over the file."""
    args = dict(args)
    center = args.pop("center_rewards_coefficient", None)
    from_file = {"center_rewards_coefficient": None}
    cfg, given = config.resolve(args, extra=from_file)
    where = "--center-rewards-coefficient"
    if center is None and from_file["center_rewards_coefficient"] is not None:
        center, where = from_file["center_rewards_coefficient"], f"{args['config']}: center_rewards_coefficient"
    number = isinstance(center, (int, float)) and not isinstance(center, bool)
    if center is not None and not (number and math.isfinite(center) and center >= 0):
        raise UserError(f"{where} must be zero or positive, got {center!r}")
    refused = sorted(given - set(ACCEPTED))  # only a --config file (or the Python API) can name them
    if refused:
        raise UserError(f"{refused[0]}: an option of preftune train's DPO that preftune reward-model does not take")
    if carries_adapter(cfg.model):  # a reward model trains every weight, and its folder holds them all
        raise UserError(f"--model {cfg.model}: holds a LoRA adapter; pass the merged model (train --merge)")
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(TrainConfig)}
    return RewardModelConfig(**values, center_rewards_coefficient=center)


# ---------------------------------------------------------------------------------------------------- setup


def load_model(cfg: RewardModelConfig, pad_token_id: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The SFT model's body with a new one-logit head, float32, on `device`. The head is drawn on the CPU right
    after seeding, as TRL's RewardTrainer (set_seed, then from_pretrained) draws it: the same head on any device."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as HEADS
    from transformers.utils import logging as hf_logging

    kind = causal_lm_config(
        cfg.model, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights
    )
    if not getattr(kind, "auto_map", None) and kind.model_type not in HEADS:
        raise UserError(f"--model {cfg.model}: no sequence-classification head for '{kind.model_type}'")
    torch.manual_seed(cfg.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report lists the new head and the unused LM head: both expected
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.model,
            num_labels=1,
            dtype=torch.float32,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if cfg.allow_pickle_weights else True,
        )
    except (OSError, ValueError) as e:
        raise UserError(f"--model {cfg.model}: cannot load it with a reward head ({str(e).strip()[:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.get_text_config().pad_token_id = pad_token_id  # where the pooling finds each row's last token
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    return model.to(device)


def setup(cfg: RewardModelConfig) -> Setup:
    """recipe.Setup of a reward model: checked and loaded before the run folder is touched; rows padded as TRL's."""
    from preftune import recipe

    me = distributed.world()
    run_dir = rundir.prepare_run_dir(cfg, me.size)
    device = distributed.local_device(resolve_device(cfg.device))
    tokenizer = load_run_tokenizer(cfg.model, cfg.model, cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    tokens = rundir.token_dir(run_dir, True, me.rank, me.size) if cfg.stream else None
    train_pairs, eval_pairs, _, audit = recipe.load_pairs(cfg, tokenizer, tokens)
    model = load_model(cfg, tokenizer.pad_token_id, device)
    pairs = {"train_pairs": train_pairs, "eval_pairs": eval_pairs, "audit": audit, "token_dir": tokens}
    return recipe.Setup(
        cfg=cfg, run_dir=run_dir, device=device, tokenizer=tokenizer, policy=model, layout="padded", **pairs
    )


# ---------------------------------------------------------------------------------------------------- one step


def rewards(s: Setup, batch: PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_w, r_l), [B] each: rows 0..B−1 are prompt + chosen, B..2B−1 prompt + rejected, right-padded with the
    pad token (TRL's DataCollatorForPreference lays out the same rows)."""
    with autocast(s.device, s.cfg.dtype):
        logits = s.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits.float().squeeze(-1).chunk(2)


def batch_loss(s: Setup, batch: PaddedBatch, num_pairs: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ ℓ over the micro-batch's pairs / the step's pair count (module docstring), and per-pair metrics. A tie
    r_w = r_l counts as a wrong ranking, as in TRL."""
    chosen, rejected = rewards(s, batch)
    losses = -torch.nn.functional.logsigmoid(chosen - rejected)
    if s.cfg.center_rewards_coefficient is not None:
        losses = losses + s.cfg.center_rewards_coefficient * (chosen + rejected) ** 2
    metrics = {"rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margins": chosen - rejected}
    metrics = {k: v.detach() for k, v in metrics.items()}
    return losses.sum() / num_pairs, {**metrics, "rewards/accuracies": (metrics["rewards/margins"] > 0).float()}


def run_pairs(s: Setup, batches: list[PaddedBatch], num_pairs: int, backward: bool) -> dict[str, torch.Tensor]:
    """Forward (and backward) over this process's micro-batches; device sums of the metrics."""
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        with torch.enable_grad() if backward else torch.no_grad():
            loss, metrics = batch_loss(s, batch, num_pairs)
        if backward:
            loss.backward()
        add_sums(sums, {**metrics, "loss": loss.detach()})
    return sums


def train_step(s: Setup, step: int, optimizer, scheduler) -> StepMetrics:
    """One optimizer step on `recipe.step_pairs` (the pairs `preftune train` would take at this step), shared over
    the processes, gradients summed (`distributed.sum_gradients`), clipped, and the update."""
    from preftune import recipe

    indices, me = recipe.step_pairs(s, step), distributed.world()
    batches = recipe.micro_batches(s, s.train_pairs, distributed.share(indices, me.rank, me.size))
    optimizer.zero_grad(set_to_none=True)
    sums = run_pairs(s, batches, len(indices), backward=True)
    distributed.sum_gradients(s.policy.parameters())
    sums = distributed.sum_scalars(sums, s.device, len(indices))
    max_norm = s.cfg.max_grad_norm if s.cfg.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(s.policy.parameters(), max_norm)
    lr = scheduler.get_last_lr()[0]
    metrics = {**per_pair(sums, len(indices)), "grad_norm": grad_norm.float()}
    skip = s.cfg.skip_nonfinite and not bool(torch.isfinite(sums["loss"]) & torch.isfinite(grad_norm))
    if s.cfg.skip_nonfinite:
        metrics["skipped"] = torch.tensor(float(skip), device=grad_norm.device)
    if skip:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    scheduler.step()  # a skipped step still counts, as in recipe.py
    pairs = (s.train_pairs[i] for i in indices)  # tokens as `preftune train` counts them: the prompt twice
    tokens = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    return StepMetrics(step + 1, lr, len(indices), tokens, list(metrics), torch.stack(list(metrics.values())))


def evaluate(s: Setup) -> dict[str, float]:
    """eval/loss, eval/rewards/{accuracies,margins,chosen,rejected} over --eval-data, split across processes."""
    from preftune import recipe

    s.policy.eval()
    indices, me = list(range(len(s.eval_pairs))), distributed.world()
    batches = recipe.micro_batches(s, s.eval_pairs, distributed.share(indices, me.rank, me.size))
    sums = distributed.sum_scalars(run_pairs(s, batches, len(indices), backward=False), s.device, len(indices))
    metrics = per_pair(sums, len(indices))
    values = torch.stack(list(metrics.values())).tolist()  # one host sync
    s.policy.train()
    return {"eval/" + k: v for k, v in zip(metrics, values)}


# ---------------------------------------------------------------------------------------------------- the run


@distributed.launched  # under torchrun: join the other processes first (a no-op for one process)
def train(cfg: RewardModelConfig, on_log: Callable[[int, dict], None] | None = None) -> Path:
    """Train; return final/. `on_log(step, record)`: called on rank 0 with every metrics record as it is written."""
    from preftune import recipe

    fix_malloc_thresholds(wanted=cfg.gradient_checkpointing)  # as `preftune train` does
    s = setup(cfg)
    optimizer, scheduler = recipe.make_optimizer(s)
    first = recipe.start_or_resume(s, optimizer, scheduler)
    s.policy.train()
    main = distributed.world().is_main
    log.info("training a reward model: %s", recipe.describe(s))
    watcher = observe.watch(cfg, s.total_steps, s.run_dir, on_log) if main else None
    if s.audit is not None:  # None with --stream
        distributed.on_main(observe.write_audit, s.audit, s.run_dir)
    pending, records, clock = [], [], time.perf_counter()
    bar = tqdm(total=s.total_steps, initial=first, desc="reward model", unit="step", disable=not main)
    with bar, open(s.run_dir / rundir.METRICS if main else os.devnull, "a", encoding="utf-8") as metrics_file:
        for step in range(first, s.total_steps):
            pending.append(train_step(s, step, optimizer, scheduler))
            done = step + 1
            last = done == s.total_steps
            evaluate_now = bool(s.eval_pairs) and ((cfg.eval_every and done % cfg.eval_every == 0) or last)
            save_now = bool(cfg.save_every) and done % cfg.save_every == 0 and not last
            if done % cfg.log_every == 0 or evaluate_now or save_now or last:
                records = to_records(pending, time.perf_counter() - clock)  # raises before a NaN model is saved
                if evaluate_now:
                    records[-1].update(evaluate(s))
                if main:
                    watcher.observe(records)
                write = lambda records=records: append_records(metrics_file, records)  # noqa: E731
                distributed.on_main(rundir.writing, s.run_dir, rundir.METRICS, write)
                bar.set_postfix(progress_fields(records[-1]), refresh=False)
                bar.update(len(records))
                pending, clock = [], time.perf_counter()
            if save_now:
                distributed.on_main(recipe.save_checkpoint, s, done, optimizer, scheduler)
                clock = time.perf_counter()
            recipe.after_step(done)
    final = distributed.on_main(
        rundir.writing, s.run_dir, "the final model", lambda: save_final(s), default=s.run_dir / rundir.FINAL
    )
    if main:
        watcher.finish(records[-1] if records else {})
    if not cfg.no_report:
        distributed.on_main(observe.write_report, s.run_dir)
    log.info("done: %s", final)
    return final


def save_final(s: Setup) -> Path:
    """final/: the model (safetensors; its config names the pad token), the tokenizer (with its pad token) and a
    card of its own (`preftune push` replaces only its own DPO card), written atomically."""

    def fill(tmp: Path) -> None:
        s.policy.save_pretrained(tmp, safe_serialization=True)
        s.tokenizer.save_pretrained(tmp)
        meta = {"base_model": base_model(s.cfg.model), "library_name": "transformers", "tags": ["reward-model"]}
        (tmp / CARD).write_text(f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n{CARD_TEXT}", encoding="utf-8")

    checkpoint.write_atomically(s.run_dir / rundir.FINAL, fill)
    return s.run_dir / rundir.FINAL


CARD_TEXT = """# Reward model

A Bradley–Terry reward model trained with `preftune reward-model` on preference pairs. Its one logit at the last
token that is not the pad token is the reward of a prompt + response: `preftune eval --reward PATH` scores sampled
responses with it, and `AutoModelForSequenceClassification.from_pretrained(PATH)` loads it.
"""

"""One typed configuration for `preftune train`: YAML file + command-line flags, validated in one place.

Every field is a flag (`--learning-rate`) and a YAML key (`learning_rate`). Precedence: defaults < `--config`
file < flags. Unknown YAML keys, flags that contradict each other and flags that would have no effect with the
chosen loss are errors that name the flag, never silent no-ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from preftune import trackers
from preftune.data.formats import parse_columns
from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.loading import carries_adapter
from preftune.losses import F_DIVERGENCES, LOSSES, OPTIONS, loss_params


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, required: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "required": required})


@dataclass
class TrainConfig:
    # What to train, on what, where to write.
    model: str = _opt(None, "Policy model: a Hugging Face model folder or hub name.", required=True)
    data: str = _opt(None, "Training pairs: .jsonl/.json/.parquet/.csv file or hub dataset name.", required=True)
    output: str = _opt(None, "Run directory (config.yaml, metrics.jsonl, checkpoints/, final/).", required=True)
    eval_data: str | None = _opt(None, "Held-out pairs evaluated every --eval-every steps and at the end.")
    ref_model: str | None = _opt(None, "Reference model folder. Default: a frozen copy of --model as loaded.")
    tokenizer: str | None = _opt(None, "Tokenizer folder. Default: the one saved with --model.")
    columns: str | None = _opt(None, "Column mapping, e.g. prompt=question,chosen=response_j,rejected=response_k.")
    on_identical: str = _opt("skip", "Pairs whose chosen equals rejected: skip (counted) or error.", ("skip", "error"))
    drop_displacement: float | None = _opt(
        None,
        "Drop the top P% of --data's pairs by likelihood-displacement risk (the reference's length-normalised CHES, "
        "computed in the reference cache pass; counted and logged). See `preftune audit --displacement`.",
    )
    stream: bool = _opt(
        False,
        "Data larger than memory: read --data (and --eval-data) a row at a time into token ids "
        "memory-mapped from OUTPUT/tokens/; skips the data audit at the start (run `preftune audit`).",
    )
    # The objective.
    loss: str = _opt("sigmoid", f"Loss or comma-separated losses (docs/losses.md): {', '.join(LOSSES)}.")
    loss_weights: str | None = _opt(None, "Comma-separated weights, one per loss (default: all 1).")
    beta: float = _opt(
        0.1,
        "β: strength of the tie to the reference (IPO: the regulariser τ; SimPO, CPO: the "
        "reward scale; ORPO: λ, the weight of the odds-ratio term).",
    )
    label_smoothing: float = _opt(
        0.0,
        "ε: assumed share of flipped labels (sigmoid = cDPO, robust, aot, "
        "aot_unpaired, simpo, cpo); EXO's ε (exo_pair, paper: 1e-3).",
    )
    simpo_gamma: float = _opt(0.5, "SimPO's target reward margin γ (as TRL's simpo_gamma).")
    cpo_alpha: float = _opt(1.0, "CPO: weight of the chosen response's NLL term (as TRL's cpo_alpha).")
    dpop_lambda: float = _opt(50.0, "DPO-Positive's λ: penalty on the chosen log-ratio falling below zero.")
    rdpo_alpha: float | None = _opt(
        None,
        "R-DPO's α: weight of the length difference, chosen minus rejected "
        "tokens (required with --loss rdpo; the paper tunes it per dataset).",
    )
    discopop_tau: float = _opt(0.05, "DiscoPOP's temperature τ (the paper's value, TRL's default).")
    f_divergence: str = _opt(
        "reverse_kl", "f-DPO: the divergence to the reference (reverse_kl is standard DPO).", tuple(F_DIVERGENCES)
    )
    f_alpha: float = _opt(
        0.5, "α of --f-divergence alpha_divergence (TRL's f_alpha_divergence_coef: 1 → reverse KL, 0 → forward KL)."
    )
    ld_alpha: float | None = _opt(
        None,
        "LD-DPO's α (TRL's ld_alpha): in policy and reference log-probs, response "
        "tokens beyond the shorter response of the pair count α times, α in (0, 1].",
    )
    ref_update: str | None = _opt(
        None,
        "TR-DPO: update the reference from the policy every --ref-update-every steps: "
        "soft (ref ← α·policy + (1−α)·ref) or hard (ref ← policy). Keeps a live reference.",
        ("soft", "hard"),
    )
    ref_update_every: int = _opt(512, "TR-DPO's τ: steps between reference updates (TRL's ref_model_sync_steps).")
    ref_update_alpha: float = _opt(0.6, "TR-DPO's α of --ref-update soft (TRL's ref_model_mixup_alpha).")
    wpo: bool = _opt(
        False,
        "WPO (TRL's use_weighting): weight each pair's loss by the policy's own length-normalised "
        "probability of both responses, as if sampled from it.",
    )
    desirable_weight: float = _opt(
        1.0, "KTO's λD: weight of the desirable examples' losses (kto, apo_zero_unpaired; as TRL's desirable_weight)."
    )
    undesirable_weight: float = _opt(
        1.0,
        "KTO's λU: weight of the undesirable examples' losses (kto, apo_zero_unpaired; as TRL's undesirable_weight).",
    )
    # Optimisation.
    learning_rate: float = _opt(1e-6, "Peak learning rate of AdamW.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", ("constant", "linear", "cosine"))
    warmup_steps: int = _opt(0, "Steps of linear warmup from 0 to --learning-rate.")
    max_grad_norm: float = _opt(1.0, "Clip the gradient norm to this value (0: no clipping).")
    batch_size: int = _opt(8, "Pairs per micro-batch.")
    grad_accum: int = _opt(1, "Micro-batches per optimizer step (pairs per step = batch × grad-accum).")
    max_steps: int | None = _opt(None, "Optimizer steps to run (instead of --epochs).")
    epochs: float | None = _opt(None, "Passes over the data (default 1 when --max-steps is not given).")
    seed: int = _opt(42, "Seed for shuffling and dropout.")
    no_shuffle: bool = _opt(False, "Keep the data order of the file.")
    # Sequences.
    max_length: int | None = _opt(1024, "Longest prompt + response in tokens (pairs beyond it are cut or dropped).")
    max_prompt_length: int | None = _opt(None, "Longest prompt in tokens; longer prompts lose their beginning.")
    on_overlength: str = _opt(
        "truncate", "Pairs longer than --max-length: truncate (counted) or drop (counted).", ("truncate", "drop")
    )
    # Speed (every choice gives the same losses and gradients).
    layout: str = _opt(
        "packed",
        "packed: each prompt encoded once, LM head on response tokens only; padded: the "
        "plain layout (the packed one falls back to it, with a notice, for models it does not fit).",
        ("packed", "padded"),
    )
    pack_tokens: int = _opt(0, "Packed layout: put several pairs in one row of up to N tokens (0: a row per pair).")
    group_by_length: bool = _opt(False, "Batch pairs of similar length together (less padding; still seeded).")
    ref_cache: str | None = _opt(
        None, "Folder for cached reference log-probs (default: $PREFTUNE_CACHE or ~/.cache/preftune/reference)."
    )
    no_ref_cache: bool = _opt(False, "Run the reference model at every step instead of caching its log-probs.")
    # Precision and device.
    dtype: str = _opt(
        "float32",
        "Compute dtype (weights and optimizer state stay float32 unless --weights-dtype bfloat16).",
        ("float32", "bfloat16"),
    )
    weights_dtype: str = _opt(
        "float32",
        "Dtype of the policy's weights, and so of its gradients and AdamW state (bfloat16: half the memory; "
        "implies --dtype bfloat16; log-sum-exp and loss stay float32).",
        ("float32", "bfloat16"),
    )
    gradient_checkpointing: bool = _opt(
        False,
        "Recompute activations in backward to save memory; on Linux with glibc, freed memory also leaves the "
        "process at once (PREFTUNE_MALLOC_THRESHOLD; ~1.2x the time).",
    )
    device: str = _opt("auto", "cpu, cuda, cuda:N, or auto (cuda when available).")
    fsdp: bool = _opt(
        False,
        "Under torchrun: shard parameters, gradients and optimizer state over the processes "
        "(FSDP2) instead of a whole copy in each; one process: no effect.",
    )
    trust_remote_code: bool = _opt(False, "Allow model code shipped with the model folder to run.")
    allow_pickle_weights: bool = _opt(False, "Load pickle .bin/.pt weights (can run code: only for files you trust).")
    # LoRA.
    lora_r: int = _opt(
        0,
        "LoRA rank: train a low-rank adapter on the frozen model instead of every weight; final/ "
        "then holds the adapter (0: off). A --model folder that holds an adapter trains it further.",
    )
    lora_alpha: float | None = _opt(None, "LoRA α: the adapter's update is scaled by α / r. Default: 2 × --lora-r.")
    lora_dropout: float = _opt(0.0, "LoRA dropout on the adapter's input while training.")
    lora_targets: str = _opt(
        "all-linear",
        "Modules that get an adapter: comma-separated names (e.g. q_proj,v_proj) "
        "or all-linear (every linear layer but the output layer).",
    )
    merge: bool = _opt(
        False, "With LoRA: also write final-merged/, the model with the adapter merged into its weights."
    )
    load_in_4bit: bool = _opt(
        False,
        "QLoRA: load the base model's linear layers in 4 bits (NF4, bitsandbytes); "
        "only the LoRA adapter trains, so it needs --lora-r.",
    )
    load_in_8bit: bool = _opt(
        False,
        "Load the base model's linear layers in 8 bits (LLM.int8(), bitsandbytes); "
        "only the LoRA adapter trains, so it needs --lora-r.",
    )
    # Bookkeeping.
    log_every: int = _opt(
        1, "Bring metrics to the host every N steps (one line per step either way; fewer device syncs)."
    )
    eval_every: int = _opt(0, "Evaluate (--eval-data, --eval-prompts) every N steps (0: only at the end).")
    eval_prompts: str | None = _opt(
        None,
        "Prompts (rows with a 'prompt' field) sampled from policy and reference "
        "at each evaluation: KL to the reference, length, diversity (see `preftune eval`).",
    )
    eval_reward: str | None = _opt(
        None,
        "Score the --eval-prompts samples: a sequence-classification model folder "
        "or a Python module:function (mean rewards, win rate).",
    )
    eval_max_new_tokens: int = _opt(64, "Longest sampled response of --eval-prompts, in tokens.")
    no_report: bool = _opt(False, "Do not write report.html and plots/ at the end of the run.")
    report_to: str = _opt(
        "none",
        "Experiment trackers that also get the metrics and config, comma-separated: tensorboard, wandb, "
        "mlflow, trackio (each an extra: pip install 'preftune[NAME]'), or none.",
    )
    save_every: int = _opt(0, "Checkpoint every N steps (0: no intermediate checkpoints).")
    keep_last: int = _opt(0, "Keep only the newest K checkpoints (0: keep all).")
    skip_nonfinite: bool = _opt(
        False,
        "Skip (and count) a step whose loss or gradient is NaN/inf instead of "
        "stopping the run (costs one device sync per step).",
    )
    resume: bool = _opt(False, "Continue from the newest checkpoint in --output.")
    config: str | None = _opt(None, "YAML file with any of these options (flags override it).")

    @property
    def losses(self) -> list[str]:
        return [name.strip() for name in self.loss.split(",")]

    @property
    def weights(self) -> list[float]:
        if self.loss_weights is None:
            return [1.0] * len(self.losses)
        return [float(w) for w in self.loss_weights.split(",")]

    @property
    def needs_reference(self) -> bool:
        return any(LOSSES[name].needs_reference for name in self.losses)

    @property
    def grouped(self) -> str | None:
        """The grouped loss (`plackett_luce`) among the losses, which trains a row's pairs as one group
        (data/groups.py); None if there is none."""
        return next((name for name in self.losses if LOSSES[name].grouped), None)

    @property
    def needs_kl(self) -> bool:
        """A loss takes KTO's reference point, estimated from each micro-batch (losses.kl_estimate)."""
        return any(LOSSES[name].needs_kl for name in self.losses)

    @property
    def unpaired(self) -> bool:
        """The loss trains on unpaired examples (prompt, completion, label): data/unpaired.py."""
        return any(LOSSES[name].unpaired for name in self.losses)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser, names: Iterable[str] | None = None, helps: dict[str, str] | None = None) -> None:
    """One flag per config field (or per field of `names`; `helps` replaces some help texts). Defaults are
    suppressed so that we know which flags the user gave."""
    for name in FIELDS if names is None else names:
        f = FIELDS[name]
        # argparse formats help with %: a literal one ("the top P%") must be doubled
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": argparse.SUPPRESS,
            "help": (helps or {}).get(name, f.metadata["help"]).replace("%", "%%"),
        }
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = _parser_type(f)
            kwargs["metavar"] = name.upper()
            if f.metadata["choices"]:
                kwargs["choices"] = f.metadata["choices"]
                kwargs["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
        parser.add_argument(flag(name), **kwargs)


def _parser_type(f: dataclasses.Field) -> type:
    kind = str(f.type)
    if kind.startswith("int"):
        return int
    if kind.startswith("float"):
        return float
    return str


def resolve(cli_args: dict[str, Any], extra: dict[str, Any] | None = None) -> tuple[TrainConfig, set[str]]:
    """Merge defaults < YAML < flags; return the config and the names the user set explicitly. `extra`: options
    of a command beyond TrainConfig's (reward-model's own) that a --config file may hold too: the file's values of
    its keys are written into it, for the command to check."""
    values: dict[str, Any] = {}
    if cli_args.get("config"):
        values.update(_read_yaml(cli_args["config"], extra))
    values.update(cli_args)
    cfg = TrainConfig(**values)
    validate(cfg, explicit=set(values))
    return cfg, set(values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice is an error (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key_node.value}' is given twice", key_node.start_mark
                    )
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _read_yaml(path: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: cannot read it ({e})") from None
    try:
        # A SafeLoader: a config file must never run code (no Python tags).
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    for key in [key for key in data if extra is not None and key in extra]:
        extra[key] = data.pop(key)
    for key, value in data.items():
        if key not in FIELDS or key == "config":
            raise UserError(f"{path}: unknown key {key!r} (see `preftune train --help` for the options)")
        data[key] = _check_yaml_type(path, key, value)
    return data


def _check_yaml_type(path: str, key: str, value: Any) -> Any:
    f = FIELDS[key]
    kind = str(f.type)
    if value is None:
        if "None" in kind:
            return None
        raise UserError(f"{path}: key '{key}' cannot be empty")
    if kind.startswith("bool"):
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        value = str(value) if ok else value
    if not ok:
        raise UserError(f"{path}: key '{key}' expects {kind.split(' ')[0]}, got {type(value).__name__} {value!r}")
    if f.metadata["choices"] and value not in f.metadata["choices"]:
        raise UserError(f"{path}: key '{key}' must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
    return value


def validate(cfg: TrainConfig, explicit: set[str]) -> None:
    """Reject missing, out-of-range, contradictory and no-effect options, naming the flag."""
    for name, f in FIELDS.items():
        if f.metadata["required"] and not getattr(cfg, name):
            raise UserError(f"{flag(name)} is required")
    if cfg.output != "-":  # `preftune precompute` passes "-": it writes no run folder
        _check_output(cfg.output)
    _validate_losses(cfg, explicit)
    _positive(cfg, "beta", "learning_rate", "batch_size", "grad_accum", "log_every")
    _non_negative(
        cfg, "label_smoothing", "weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "save_every", "keep_last"
    )
    if "keep_last" in explicit and not cfg.save_every:
        raise UserError("--keep-last has no effect without --save-every")
    if cfg.max_steps is not None and cfg.epochs is not None:
        raise UserError("--max-steps and --epochs contradict each other: give one")
    _positive(cfg, *(n for n in ("max_steps", "epochs") if getattr(cfg, n) is not None))
    if cfg.max_length is not None and cfg.max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {cfg.max_length}")
    if cfg.max_prompt_length is not None:
        _positive(cfg, "max_prompt_length")
        if cfg.max_length is not None and cfg.max_prompt_length >= cfg.max_length:
            raise UserError(
                f"--max-prompt-length ({cfg.max_prompt_length}) must be below --max-length "
                f"({cfg.max_length}) to leave room for the response"
            )
    if "eval_every" in explicit and cfg.eval_every and not (cfg.eval_data or cfg.eval_prompts):
        raise UserError("--eval-every has no effect without --eval-data or --eval-prompts")
    for name in ("eval_reward", "eval_max_new_tokens"):
        if name in explicit and not cfg.eval_prompts:
            raise UserError(f"{flag(name)} has no effect without --eval-prompts")
    _positive(cfg, "eval_max_new_tokens")
    if cfg.ref_model and not cfg.needs_reference:
        raise UserError(f"--ref-model has no effect with --loss {cfg.loss}: it uses no reference model")
    if "pack_tokens" in explicit and cfg.layout != "packed":
        raise UserError("--pack-tokens has no effect with --layout padded")
    if cfg.pack_tokens < 0:
        raise UserError(f"--pack-tokens must be zero or positive, got {cfg.pack_tokens}")
    if not cfg.needs_reference and ("ref_cache" in explicit or "no_ref_cache" in explicit):
        raise UserError(f"--ref-cache/--no-ref-cache have no effect with --loss {cfg.loss}: it uses no reference")
    if cfg.ref_cache and cfg.no_ref_cache:
        raise UserError("--ref-cache and --no-ref-cache contradict each other: give one")
    if "on_overlength" in explicit and cfg.max_length is None and cfg.max_prompt_length is None:
        raise UserError("--on-overlength has no effect without --max-length or --max-prompt-length")
    _validate_weights_dtype(cfg, explicit)
    _validate_lora(cfg, explicit)
    _validate_drop_displacement(cfg)
    _validate_ref_update(cfg, explicit)
    _validate_report_to(cfg)


def _validate_report_to(cfg: TrainConfig) -> None:
    """Names, and that each tracker is installed: a missing one is reported before anything is loaded or written."""
    chosen = trackers.names(cfg.report_to)
    if "none" in chosen:
        raise UserError(f"--report-to none cannot be combined with trackers: {cfg.report_to}")
    unknown = [n for n in chosen if n not in trackers.TRACKERS]
    if unknown:
        raise UserError(
            f"--report-to: unknown tracker '{unknown[0]}' (choose from {', '.join(trackers.TRACKERS)}, or none)"
        )
    if len(set(chosen)) != len(chosen):
        raise UserError(f"--report-to lists a tracker twice: {cfg.report_to}")
    trackers.check_installed(chosen)


def _validate_drop_displacement(cfg: TrainConfig) -> None:
    """CHES comes from the pass that fills the reference cache, over single pairs of the policy as loaded."""
    if cfg.drop_displacement is None:
        return
    if not 0 < cfg.drop_displacement < 100:
        raise UserError(f"--drop-displacement must be a percentage in (0, 100), got {cfg.drop_displacement}")
    refused = [
        (not cfg.needs_reference, f"--loss {cfg.loss}, which uses no reference"),
        (cfg.no_ref_cache or cfg.ref_update, "a live reference (--no-ref-cache, --ref-update): no cache pass"),
        (cfg.ref_model, "--ref-model (CHES is the starting policy's)"),
        (cfg.unpaired or cfg.grouped, f"--loss {cfg.loss}, which does not train single pairs"),
        (cfg.stream, "--stream (the pairs are not held in memory)"),
    ]
    for given, what in refused:
        if given:
            raise UserError(f"--drop-displacement: not supported with {what}")


def _validate_ref_update(cfg: TrainConfig, explicit: set[str]) -> None:
    """TR-DPO needs a live reference with weights of its own, of the policy's shape."""
    if cfg.ref_update is None:
        given = [n for n in ("ref_update_every", "ref_update_alpha") if n in explicit]
        if given:
            raise UserError(f"{flag(given[0])} has no effect without --ref-update")
        return
    if "ref_update_alpha" in explicit and cfg.ref_update == "hard":
        raise UserError("--ref-update-alpha has no effect with --ref-update hard (it copies the policy)")
    if not cfg.needs_reference:
        raise UserError(f"--ref-update has no effect with --loss {cfg.loss}: it uses no reference model")
    if cfg.ref_cache:
        raise UserError("--ref-update and --ref-cache contradict each other: an updated reference cannot be cached")
    if cfg.ref_model:
        raise UserError("--ref-update moves the reference towards the policy: it cannot start from another --ref-model")
    if cfg.lora_r or carries_adapter(cfg.model):
        raise UserError(
            "--ref-update is not supported with LoRA (as in TRL): the reference is the policy's own base, "
            "with no weights of its own to update"
        )
    _positive(cfg, "ref_update_every")
    if not (0 < cfg.ref_update_alpha <= 1):
        raise UserError(f"--ref-update-alpha must be in (0, 1], got {cfg.ref_update_alpha}")


def _validate_lora(cfg: TrainConfig, explicit: set[str]) -> None:
    given = [n for n in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets") if n in explicit]
    if carries_adapter(cfg.model) and given:
        raise UserError(
            f"{flag(given[0])}: --model {cfg.model} already carries a LoRA adapter, which trains further "
            "with its own settings (its adapter_config.json)"
        )
    if cfg.lora_r < 0:
        raise UserError(f"--lora-r must be zero or positive, got {cfg.lora_r}")
    if not cfg.lora_r and not carries_adapter(cfg.model):
        unused = [n for n in given if n != "lora_r"] + (["merge"] if cfg.merge else [])
        if unused:
            raise UserError(f"{flag(unused[0])} has no effect without --lora-r")
    if cfg.lora_alpha is not None:
        _positive(cfg, "lora_alpha")
    if not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    _validate_quantization(cfg)


def _validate_weights_dtype(cfg: TrainConfig, explicit: set[str]) -> None:
    """bfloat16 weights compute in bfloat16 whatever autocast says, so --dtype follows them (a float32 --dtype
    would be a silent no-op, and the reference cache and tie tolerance would be keyed on the wrong precision)."""
    if cfg.weights_dtype != "bfloat16":
        return
    if cfg.dtype != "bfloat16" and "dtype" in explicit:
        raise UserError("--weights-dtype bfloat16 computes in bfloat16: --dtype float32 contradicts it (drop it)")
    cfg.dtype = "bfloat16"
    given = [n for n in ("load_in_4bit", "load_in_8bit", "fsdp") if getattr(cfg, n)]
    if given:
        raise UserError(f"--weights-dtype bfloat16: not supported with {flag(given[0])} yet")


def _validate_quantization(cfg: TrainConfig) -> None:
    """A quantized base cannot take gradient steps: only an adapter on top of it trains (QLoRA)."""
    given = [n for n in ("load_in_4bit", "load_in_8bit") if getattr(cfg, n)]
    if not given:
        return
    if len(given) == 2:
        raise UserError("--load-in-4bit and --load-in-8bit contradict each other: give one")
    if not cfg.lora_r and not carries_adapter(cfg.model):
        raise UserError(
            f"{flag(given[0])}: a quantized model trains only through a LoRA adapter; add --lora-r (e.g. --lora-r 16)"
        )
    if cfg.fsdp:
        raise UserError(f"--fsdp: not supported with {flag(given[0])}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:  # an optional dependency
        raise UserError(f"{flag(given[0])} needs the bitsandbytes package: pip install bitsandbytes") from None


def _check_output(output: str) -> None:
    """--output must be a folder, or not exist yet below a folder we may write in. Checked up front: the run would
    otherwise fail at its first write, after every model and data file was loaded."""
    path = Path(output).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        where = "exists and" if existing == path else f"is inside {existing}, which"
        raise UserError(f"--output {output}: {where} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--output {output}: no permission to write in {existing}")


def _validate_losses(cfg: TrainConfig, explicit: set[str]) -> None:
    names = cfg.losses
    unknown = [n for n in names if n not in LOSSES]
    if unknown:
        raise UserError(f"--loss: unknown loss '{unknown[0]}' (choose from {', '.join(LOSSES)})")
    if len(set(names)) != len(names):
        raise UserError(f"--loss lists a loss twice: {cfg.loss}")
    if cfg.loss_weights is not None:
        try:
            weights = cfg.weights
        except ValueError:
            raise UserError(f"--loss-weights must be comma-separated numbers, got {cfg.loss_weights!r}") from None
        if len(weights) != len(names):
            raise UserError(f"--loss-weights has {len(weights)} values for {len(names)} losses in --loss {cfg.loss}")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
            raise UserError(f"--loss-weights must be finite, non-negative and not all zero, got {cfg.loss_weights}")
    used = set().union(*(loss_params(n) for n in names))
    for option in sorted(OPTIONS):  # every loss option is a field of the same name
        if option in explicit and option not in used:
            raise UserError(f"{flag(option)} has no effect with --loss {cfg.loss}")
    _validate_f_divergence(cfg, explicit)
    if cfg.ld_alpha is not None:
        if not (0 < cfg.ld_alpha <= 1):
            raise UserError(f"--ld-alpha must be in (0, 1], got {cfg.ld_alpha}")
        # As TRL, whose DPOTrainer weights its reference-based losses' log-probs; its NLL term (sft) and the
        # reference-free trainers (CPO, SimPO, ORPO) stay unweighted.
        free = [n for n in names if not LOSSES[n].needs_reference]
        if free:
            raise UserError(
                f"--ld-alpha is not defined for --loss {free[0]} (only for losses with a reference, "
                "as TRL's DPOTrainer)"
            )
    _validate_loss_rules(cfg)
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    _validate_unpaired(cfg)
    _non_negative(
        cfg,
        *(
            o
            for o in ("simpo_gamma", "cpo_alpha", "dpop_lambda", "rdpo_alpha", "desirable_weight", "undesirable_weight")
            if o in used
        ),
    )
    _positive(cfg, *(o for o in ("discopop_tau",) if o in used))
    if "f_alpha" in used and not math.isfinite(cfg.f_alpha):
        raise UserError(f"--f-alpha must be finite, got {cfg.f_alpha}")
    if cfg.wpo:  # WPO weights pair losses: `sft` (a token mean) has no pairs to weight
        if all(LOSSES[n].normalize != "pairs" for n in names):
            raise UserError(f"--wpo has no effect with --loss {cfg.loss}: it weights pair losses only")


def _validate_loss_rules(cfg: TrainConfig) -> None:
    """What each chosen loss declares in its registry entry (losses.LossSpec): its options' ranges, the options it
    needs, the smallest micro-batch it works on, and the options it refuses."""
    for name in cfg.losses:
        spec = LOSSES[name]
        for option, allowed in spec.ranges.items():
            if getattr(cfg, option) not in allowed:
                raise UserError(
                    f"{flag(option)} must be in {allowed} for the {name} loss{allowed.note}, got {getattr(cfg, option)}"
                )
        for option, why in spec.requires.items():
            if getattr(cfg, option) is None:
                raise UserError(f"--loss {name} needs {flag(option)} ({why})")
        smallest, why = spec.min_batch_size
        if smallest > 1 and cfg.batch_size < smallest:
            raise UserError(f"--loss {name} needs --batch-size of at least {smallest}: {why}")
        for option, message in spec.refuses.items():
            if getattr(cfg, option) not in (None, False):
                raise UserError(message.format(name=name))


def _validate_unpaired(cfg: TrainConfig) -> None:
    """An unpaired loss (kto, apo_zero_unpaired) trains on single examples: it cannot be mixed with pair losses, and
    the modifiers defined on pairs do not apply."""
    unpaired = [n for n in cfg.losses if LOSSES[n].unpaired]
    if not unpaired:
        named = [n for n in ("completion", "label") if n in parse_columns(cfg.columns)]
        if named:
            raise UserError(
                f"--columns {named[0]}=...: unpaired examples train only with --loss kto or "
                f"apo_zero_unpaired, not --loss {cfg.loss}"
            )
        return
    if len(cfg.losses) > 1:
        raise UserError(
            f"--loss {unpaired[0]} trains on unpaired examples and cannot be combined with other losses "
            f"(--loss {cfg.loss})"
        )
    for name, active in (("--wpo", cfg.wpo), ("--ld-alpha", cfg.ld_alpha is not None)):
        if active:
            raise UserError(f"{name} is defined for pairs and has no effect with --loss {unpaired[0]}")
    if cfg.desirable_weight == 0 and cfg.undesirable_weight == 0:
        raise UserError("--desirable-weight and --undesirable-weight are both 0: nothing would be trained")


def _validate_f_divergence(cfg: TrainConfig, explicit: set[str]) -> None:
    if "f_alpha" in explicit and cfg.f_divergence != "alpha_divergence":
        raise UserError("--f-alpha has no effect without --f-divergence alpha_divergence")
    if cfg.f_divergence == "reverse_kl":
        return
    # f-DPO leaves a β·log Z(x) term that cancels only in a chosen − rejected difference of the same f'; `sft`
    # has no reward and is fine alongside.
    supported = [n for n in LOSSES if "f_divergence" in loss_params(n)]
    unsupported = [n for n in cfg.losses if LOSSES[n].reward is not None and n not in supported]
    if unsupported:
        raise UserError(
            f"--f-divergence {cfg.f_divergence} is not defined for --loss {unsupported[0]} (only for "
            f"{', '.join(supported)})"
        )


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag(name)} must be positive, got {value}")


def _non_negative(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not (value >= 0 and math.isfinite(value)):
            raise UserError(f"{flag(name)} must be zero or positive, got {value}")


def write_yaml(cfg: TrainConfig, path: Path) -> None:
    """Written atomically: a kill never leaves half a config for --resume to read."""
    write_file_atomically(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

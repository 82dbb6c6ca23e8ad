"""`preftune iterate`'s options: the file names of a run, the options, their checks, and the run folder's
new-or-resume rules. The rounds themselves live in loop.py."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.config import TrainConfig, flag, resolve
from preftune.errors import UserError
from preftune.evaluation.sampling import (
    GenerationSettings,
)
from preftune.files import write_json
from preftune.iterate.pairs import HOW
from preftune.losses import OPTIONS

log = logging.getLogger("preftune")

SETTINGS, SUMMARY, PLOT, REF_CACHE = "iterate-config.json", "iterate.json", "iterate.png", "ref-cache"
SAMPLES, SAMPLES_INFO, PAIRS, PAIRS_INFO = "samples.jsonl", "samples.json", "pairs.jsonl", "pairs.json"
RUN, TRAINED, EVAL, ROUND = "run", "train.json", "eval.json", "round.json"

# The options of `preftune train` that a round's training takes (flags of `preftune iterate`); the others (data
# files, held-out evaluation, LoRA, streaming, torchrun's sharding...) are set by the loop or not supported.
TRAIN_OPTIONS = (
    *("loss", "loss_weights", *sorted(OPTIONS), "ld_alpha", "wpo"),
    *("learning_rate", "weight_decay", "lr_scheduler", "warmup_steps", "max_grad_norm", "batch_size", "grad_accum"),
    *("max_steps", "epochs", "seed", "no_shuffle", "max_length", "max_prompt_length", "on_overlength", "layout"),
    *("ref_cache", "dtype", "gradient_checkpointing", "device", "trust_remote_code", "allow_pickle_weights"),
    *("save_every", "keep_last", "skip_nonfinite", "no_report"),
)
# With --algorithm rloo: the train options that `rloo.RlooOptions` takes when given (else its own defaults, TRL's
# RLOOConfig's; --save-every counts its batches), and those the loop reads (seed, batch, device, prompt length for
# sampling). Its own options have flags of their own.
RLOO_FROM_TRAIN = ("beta", "learning_rate", "max_grad_norm", "save_every")
RLOO_TRAIN = (*RLOO_FROM_TRAIN, "seed", "batch_size", "max_prompt_length", "device")
RLOO_OPTIONS = ("epsilon", "num_iterations", "batch_prompts", "micro_batch", "normalize_advantages")
ALGORITHMS, REFERENCES = ("dpo", "rloo"), ("start", "previous")


@dataclass
class IterateOptions:
    model: str  # the starting model π_0
    prompts: str
    eval_prompts: str
    reward: str
    output: str
    eval_reward: str | None = None  # the evaluations' reward (default: --reward)
    rounds: int = 3
    samples: int = 4  # k
    pairs: str = "best-worst"
    min_gap: float = 0.0
    reference: str = "start"
    algorithm: str = "dpo"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    resume: bool = False
    train: dict[str, Any] = field(default_factory=dict)  # the TRAIN_OPTIONS given, by TrainConfig name
    rloo: dict[str, Any] = field(default_factory=dict)  # the RLOO_OPTIONS given


# ---------------------------------------------------------------------------------------------------- checks


def check_options(opts: IterateOptions) -> TrainConfig:
    """Every mistake in the options, each a one-line UserError naming the flag → the train options resolved."""
    if opts.rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {opts.rounds}")
    if opts.samples < 2:
        raise UserError(f"--samples must be at least 2 (a pair needs two responses per prompt), got {opts.samples}")
    if not (math.isfinite(opts.min_gap) and opts.min_gap >= 0):
        raise UserError(f"--min-gap must be zero or positive, got {opts.min_gap}")
    for name, value, allowed in (
        ("pairs", opts.pairs, HOW),
        ("reference", opts.reference, REFERENCES),
        ("algorithm", opts.algorithm, ALGORITHMS),
    ):
        if value not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
    GenerationSettings(opts.temperature, opts.top_p, opts.max_new_tokens).check()
    _check_algorithm(opts)
    unknown = sorted(set(opts.train) - set(TRAIN_OPTIONS))
    if unknown:
        raise UserError(f"{flag(unknown[0])}: not an option of preftune iterate")
    cfg, _ = resolve({**opts.train, "model": opts.model, "data": opts.prompts, "output": _run_of(opts, 1)})
    if cfg.grouped:
        raise UserError(f"--loss {cfg.grouped}: not supported by preftune iterate (its pairs are single pairs)")
    if opts.algorithm == "rloo":
        rloo_options(opts, cfg)  # checked before anything is sampled
    return cfg


def rloo_options(opts: IterateOptions, cfg: TrainConfig):
    """`rloo.RlooOptions`, checked: the rloo flags and train flags given, the sampling temperature (its ratios are
    of the distribution the samples came from), --seed and --device; RlooOptions' defaults for the rest."""
    from preftune import rloo  # imported only for --algorithm rloo

    given = {name: getattr(cfg, name) for name in RLOO_FROM_TRAIN if name in opts.train}
    options = rloo.RlooOptions(**given, **opts.rloo, temperature=opts.temperature, seed=cfg.seed, device=cfg.device)
    rloo.check_options(options)
    return options


def _check_algorithm(opts: IterateOptions) -> None:
    """A flag that the chosen algorithm does not read is an error, not a silent no-op."""
    if opts.algorithm == "dpo":
        if opts.rloo:
            raise UserError(f"{flag(sorted(opts.rloo)[0])} has no effect with --algorithm dpo (an rloo option)")
        return
    unused = sorted(set(opts.train) - set(RLOO_TRAIN))
    unused += [name for name, default in (("pairs", "best-worst"), ("min_gap", 0.0)) if getattr(opts, name) != default]
    if unused:
        raise UserError(f"{flag(unused[0])} has no effect with --algorithm rloo (it trains on the samples, not pairs)")


def _run_of(opts: IterateOptions, r: int) -> str:
    return str(Path(opts.output) / f"round-{r}" / RUN)


def settings_of(opts: IterateOptions, cfg: TrainConfig) -> dict:
    """What iterate-config.json records and --resume compares: every option, defaults filled in."""
    plain = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("output", "resume", "train", "rloo")}
    if opts.algorithm == "rloo":  # the options a round trains with, not DPO's that play no part
        return {**plain, "rloo": dataclasses.asdict(rloo_options(opts, cfg))}
    return {**plain, "train": {name: getattr(cfg, name) for name in TRAIN_OPTIONS}}


def prepare_output(opts: IterateOptions, settings: dict) -> Path:
    """--output: a new or empty folder, or with --resume an iterate run of the same settings (--rounds aside)."""
    out = Path(opts.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {opts.output}: exists and is not a folder")
    if not opts.resume:
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"--output {opts.output}: folder is not empty; pass --resume to continue it, or choose a new folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / SETTINGS, settings)
        return out
    if not (out / SETTINGS).exists():
        raise UserError(f"--resume: no iterate run to resume in {opts.output} (no {SETTINGS})")
    saved = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    difference = next(_differences(saved, settings), None)
    if difference is not None:
        key, was, now = difference
        raise UserError(
            f"--resume: option {flag(key)} is {now!r} but the run in {opts.output} used {was!r}; "
            "an exact resume needs the same options"
        )
    if saved["rounds"] != opts.rounds:
        write_json(out / SETTINGS, settings)
    return out


def _differences(saved: dict, now: dict):
    """(name, saved value, value now) of every setting but --rounds that differs, train and rloo options
    flattened."""
    nested = ("train", "rloo")  # their options are flags of their own
    flat = lambda s: {  # noqa: E731
        **{k: v for k, v in s.items() if k not in nested},
        **{k: v for part in nested for k, v in s.get(part, {}).items()},
    }
    before, after = flat(saved), flat(json.loads(json.dumps(now)))  # JSON's view of both: tuples are lists
    for key in sorted(before.keys() | after.keys()):
        if key != "rounds" and before.get(key) != after.get(key):
            yield key, before.get(key), after.get(key)

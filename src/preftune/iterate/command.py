"""`preftune iterate`: the flags and the entry point. The rounds themselves live in loop.py."""

from __future__ import annotations

import argparse
from typing import Any

from preftune import config
from preftune.iterate.loop import run
from preftune.iterate.options import (
    ALGORITHMS,
    PLOT,
    REF_CACHE,
    REFERENCES,
    RLOO_OPTIONS,
    SUMMARY,
    TRAIN_OPTIONS,
    IterateOptions,
)
from preftune.iterate.pairs import HOW
from preftune.iterate.summary import round_line

HELP = {
    "model": "Starting model folder (e.g. the SFT model): round 1's policy and, with --reference start, every "
    "round's reference.",
    "max_steps": "Optimizer steps of each round's training (instead of --epochs).",
    "epochs": "Passes over each round's pairs (default 1 when --max-steps is not given).",
    "seed": "Seed of shuffling and dropout, and of sampling: round r samples with seed 1000 × SEED + r, "
    "evaluations with SEED.",
    "batch_size": "Pairs per micro-batch; also prompts × samples per sampling batch and prompts per eval batch.",
    "ref_cache": f"Folder for cached reference log-probs (default: OUTPUT/{REF_CACHE}).",
}
DEFAULT = argparse.SUPPRESS  # defaults suppressed: only the options given reach `config.resolve`, as for train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    ours = parser.add_argument_group("rounds")
    ours.add_argument("--model", required=True, metavar="FOLDER", help=HELP["model"])
    ours.add_argument(
        "--prompts",
        required=True,
        metavar="FILE",
        help="Training prompts: rows with a 'prompt' field (text or "
        "messages); a pairs file works. Each round samples from every one.",
    )
    ours.add_argument(
        "--eval-prompts",
        required=True,
        metavar="FILE",
        help="Held-out prompts: after each round, the policy is "
        "evaluated against the starting model on them (reward ± SE, KL ± SE, win rate).",
    )
    ours.add_argument(
        "--reward",
        required=True,
        metavar="SPEC",
        help="Scores every sample: a sequence-classification model "
        "folder or a Python function module:function (texts → numbers), as `preftune eval --reward`.",
    )
    ours.add_argument(
        "--eval-reward",
        metavar="SPEC",
        help="Scores the evaluations' samples instead of --reward (as --reward): e.g. a judge or ground truth "
        "that --reward, a learned reward model, only estimates.",
    )
    ours.add_argument("--output", required=True, metavar="FOLDER", help="New or empty folder for the rounds.")
    ours.add_argument("--rounds", type=int, default=3, help="Rounds of sample → train → evaluate (default 3).")
    ours.add_argument("--samples", type=int, default=4, metavar="K", help="Responses per prompt, k ≥ 2 (default 4).")
    ours.add_argument(
        "--pairs",
        choices=HOW,
        default="best-worst",
        help="dpo: per prompt, the best response against the worst, or every pair of its k (default best-worst).",
    )
    ours.add_argument(
        "--min-gap",
        type=float,
        default=0.0,
        metavar="GAP",
        help="dpo: skip (and count) pairs whose reward difference is at most GAP (default 0: only exact ties).",
    )
    ours.add_argument(
        "--reference",
        choices=REFERENCES,
        default="start",
        help="The reference each round trains against: the "
        "starting model, or the policy the round starts from (default start).",
    )
    ours.add_argument(
        "--algorithm",
        choices=ALGORITHMS,
        default="dpo",
        help="dpo: pairs and the --loss of `preftune train`; "
        "rloo: REINFORCE leave-one-out on the k rewards (default dpo).",
    )
    ours.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (default 1).")
    ours.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling (default 1: every token).")
    ours.add_argument("--max-new-tokens", type=int, default=64, help="Longest sampled response in tokens (default 64).")
    ours.add_argument("--resume", action="store_true", help="Continue the rounds in --output where they stopped.")
    _rloo_arguments(parser)
    train = parser.add_argument_group("training (each round; as `preftune train`)")
    config.add_arguments(train, TRAIN_OPTIONS, HELP)


def _rloo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of --algorithm rloo that `preftune train` does not have."""
    rloo = parser.add_argument_group(
        "rloo (with --algorithm rloo; it also takes --beta, --learning-rate, --max-grad-norm and --save-every, in "
        "batches, with TRL's RLOOConfig defaults: β 0.05)"
    )
    rloo.add_argument("--epsilon", type=float, default=DEFAULT, help="Clipping range of the ratio (default 0.2).")
    rloo.add_argument(
        "--num-iterations", type=int, default=DEFAULT, help="Optimizer steps per batch of samples (default 1)."
    )
    rloo.add_argument(
        "--batch-prompts", type=int, default=DEFAULT, help="Prompts, each with its k responses, per batch (default 4)."
    )
    rloo.add_argument("--micro-batch", type=int, default=DEFAULT, help="Responses per forward pass (default 8).")
    rloo.add_argument(
        "--normalize-advantages", action="store_true", default=DEFAULT, help="Standardize advantages over a batch."
    )


def options_of(args: dict[str, Any]) -> IterateOptions:
    """Parsed flags → IterateOptions (the train and rloo flags given, each in its dict)."""
    args = dict(args)
    train = {name: args.pop(name) for name in TRAIN_OPTIONS if name in args}
    rloo = {name: args.pop(name) for name in RLOO_OPTIONS if name in args}
    return IterateOptions(**args, train=train, rloo=rloo)


def main(args: dict[str, Any]) -> None:
    """`preftune iterate`: run (or resume) the rounds, print one line per round and where the summary went."""
    opts = options_of(args)
    summary = run(opts)
    for line in map(round_line, summary["rounds"]):
        print(line)
    print(f"wrote {opts.output}/{SUMMARY} and {opts.output}/{PLOT}")

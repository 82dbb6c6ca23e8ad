"""`preftune` command line: one subcommand per job. User mistakes end in one line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys

from preftune import __version__
from preftune.errors import UserError

log = logging.getLogger("preftune")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message}")


def _train(args: dict) -> None:
    from preftune.config import resolve
    from preftune.train import train

    cfg, _ = resolve(args)
    train(cfg)


def _precompute(args: dict) -> None:
    from preftune.config import resolve
    from preftune.train import precompute

    cfg, _ = resolve({"output": "-", **args})  # nothing is written but the cache
    precompute(cfg)


def _demo(args: dict) -> None:
    from preftune.demo.toy import run_demo

    run_demo(args["output"], quick=args["quick"])


def build_parser() -> argparse.ArgumentParser:
    from preftune.config import add_arguments

    parser = _Parser(prog="preftune", description="Align language models on preference pairs (DPO and family).")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model on preference pairs",
                           description="Train a causal LM on preference pairs with DPO or a related loss.")
    add_arguments(train)
    train.set_defaults(run=_train)
    pre = sub.add_parser("precompute", help="compute and cache reference log-probs ahead of training",
                         description="Fill the reference log-prob cache that `preftune train` with the same "
                                     "model, data, length and dtype options then reuses (--output is ignored).")
    add_arguments(pre)
    pre.set_defaults(run=_precompute)
    demo = sub.add_parser("demo", help="the whole pipeline on a built-in toy task, offline",
                          description="Build a tiny model and a toy preference set, then train it with DPO.")
    demo.add_argument("--output", default="runs/demo", help="run folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="fewer steps")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="preftune: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar says nothing useful for small models
    try:
        args = vars(build_parser().parse_args(argv))
        run = args.pop("run")
        args.pop("command")
        run(args)
    except UserError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    return 0

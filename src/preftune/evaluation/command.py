"""`preftune eval`: the flags and the entry point. The evaluation itself lives in evaluate.py, which training and the
demo call without going through the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from preftune.evaluation.evaluate import EvalOptions, run_eval
from preftune.evaluation.table import format_table

log = logging.getLogger("preftune")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per `EvalOptions` field (--max-new-tokens for max_new_tokens)."""
    for f in dataclasses.fields(EvalOptions):
        shown = f" (default {f.default})" if f.default not in (None, False) else ""
        kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": f.metadata["help"] + shown}
        if f.type in ("bool", bool):
            kwargs["action"] = "store_true"
        else:
            kind = str(f.type)
            kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
            kwargs["metavar"] = f.metadata["metavar"] or f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def main(args: dict) -> None:
    """`preftune eval` with parsed flags: evaluate, print the table, say where the JSON went."""
    options = EvalOptions(**args)
    result = run_eval(options)
    print(format_table(result))
    if options.json:
        log.info("eval: wrote %s", options.json)

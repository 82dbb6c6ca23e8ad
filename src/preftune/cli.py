"""`preftune` command line: one subcommand per job. User mistakes end in one line and exit status 2."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from preftune import __version__
from preftune.errors import UserError

log = logging.getLogger("preftune")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + message
        raise UserError(f"{self.prog}: {message}")


def _train(args: dict) -> None:
    from preftune.api import train

    train(args)


def _precompute(args: dict) -> None:
    from preftune.config import resolve
    from preftune.recipe import precompute

    cfg, _ = resolve({"output": "-", **args})  # nothing is written but the cache
    precompute(cfg)


def _reward_model(args: dict) -> None:
    from preftune.reward_model import resolve, train

    train(resolve(args))


def _iterate(args: dict) -> None:
    from preftune.iterate.command import main as iterate_main

    iterate_main(args)


def _demo(args: dict) -> None:
    from preftune.demo.command import run_demo

    print(run_demo(args["output"], quick=args["quick"], risks=args["risks"])["summary"])


def _frontier(args: dict) -> None:
    from preftune.demo.frontier import parse_betas, run_frontier

    run_frontier(args["output"], quick=args["quick"], betas=parse_betas(args["betas"]))


def _audit(args: dict) -> None:
    from preftune.api import audit_inputs, audit_of
    from preftune.ches import audit_displacement, check_displacement
    from preftune.data.audit import write_json
    from preftune.data.features import read_categories
    from preftune.data.show import check_show, show_pairs

    check_show(args["show"], args["model"] is not None or args["tokenizer"] is not None)  # before reading the data
    check_displacement(args["displacement"], args["model"], args["top"])
    inputs = audit_inputs(
        args["data"],
        args["eval_data"],
        model=args["model"],
        tokenizer=args["tokenizer"],
        columns=args["columns"],
        trust_remote_code=args["trust_remote_code"],
    )
    lengths = {"max_length": args["max_length"], "max_prompt_length": args["max_prompt_length"]}
    if args["show"] is not None:  # the pairs first: a template or BOS/EOS mistake explains the findings below
        print("\n".join(show_pairs(inputs.rows, inputs.tokenizer, args["show"], **lengths)))
    report = audit_of(
        inputs,
        **lengths,
        features=args["feature"] or (),
        refusal_detector=args["refusal_detector"],
        categories=read_categories(args["data"], args["columns"]),
    )
    print("\n".join(report.lines()))
    for warning in report.warnings():
        print(f"warning: {warning}")
    if args["json"] is not None:
        write_json(report, args["json"])
    if args["displacement"]:  # last: it runs the model over every pair
        trust = args["trust_remote_code"]
        lines, _ = audit_displacement(inputs, args["model"], top=args["top"], trust_remote_code=trust, **lengths)
        print("\n".join(lines))


def _report(args: dict) -> None:
    from preftune.report import write_comparison, write_report

    run_dirs, output = args["run_dirs"], args["output"]
    print(write_report(run_dirs[0], output) if len(run_dirs) == 1 else write_comparison(run_dirs, output))


def _push(args: dict) -> None:
    from preftune.push import push

    print(push(args["run_dir"], args["repo"], private=args["private"], merged=args["merged"]))


def _eval(args: dict) -> None:
    from preftune.evaluation.command import main as eval_main

    eval_main(args)


def _command(sub, name: str, run: Callable[[dict], None], *, help: str, description: str) -> argparse.ArgumentParser:
    """The subparser of `preftune NAME`, whose parsed arguments `main` hands to `run`."""
    parser = sub.add_parser(name, help=help, description=description)
    parser.set_defaults(run=run)
    return parser


def _add_demo_arguments(parser: argparse.ArgumentParser, folder: str, quick: str) -> None:
    """--output and --quick, which `demo` and `frontier` (the demo's task again) share."""
    parser.add_argument("--output", default=folder, help=f"new or empty folder (default {folder})")
    parser.add_argument("--quick", action="store_true", help=quick)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="preftune", description="Align language models on preference pairs (DPO and family).")
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for add in (_training_commands, _demo_commands, _eval_command, _audit_command, _output_commands):
        add(sub)
    return parser


def _training_commands(sub) -> None:
    """train, precompute, reward-model, iterate: one flag per option of their configs."""
    from preftune.config import add_arguments
    from preftune.iterate.command import add_arguments as add_iterate_arguments
    from preftune.reward_model import add_arguments as add_reward_model_arguments

    add_arguments(
        _command(
            sub,
            "train",
            _train,
            help="train a model on preference pairs",
            description="Train a causal LM on preference pairs with DPO or a related loss.",
        )
    )
    add_arguments(
        _command(
            sub,
            "precompute",
            _precompute,
            help="compute and cache reference log-probs ahead of training",
            description="Fill the reference log-prob cache that `preftune train` with the same "
            "model, data, length and dtype options then reuses (--output is ignored).",
        )
    )
    add_reward_model_arguments(
        _command(
            sub,
            "reward-model",
            _reward_model,
            help="train a reward model on preference pairs",
            description="Train a Bradley-Terry reward model (the model with a one-logit head) on the preference "
            "pairs of `preftune train`, with its data formats, audit, checkpoints, --resume, torchrun and report; "
            "final/ is a reward folder for `preftune eval --reward`.",
        )
    )
    add_iterate_arguments(
        _command(
            sub,
            "iterate",
            _iterate,
            help="rounds of on-policy DPO (or RLOO) from a prompt file and a reward",
            description="Each round samples k responses per prompt from the current policy, scores them with "
            "--reward, trains on the best-vs-worst (or all) pairs as `preftune train` does, and evaluates the policy "
            "against the starting model on --eval-prompts; OUTPUT/iterate.json and iterate.png sum the rounds up.",
        )
    )


def _demo_commands(sub) -> None:
    demo = _command(
        sub,
        "demo",
        _demo,
        help="the whole pipeline on a built-in sentiment task, offline",
        description="The DPO paper's controlled-sentiment experiment in miniature: a review "
        "corpus, a tiny Llama trained on it from scratch (SFT), preference pairs "
        "labelled by a sentiment reward, DPO, evaluation and the run report.",
    )
    _add_demo_arguments(demo, "runs/demo", quick="smaller sizes: about 1 minute on 2 CPU cores instead of 1.5")
    demo.add_argument(
        "--risks",
        action="store_true",
        help="instead of the normal demo, plant four alignment risks (near-duplicate pairs, a spurious '!' "
        "preference, chosen refusals, far eval prompts) and show the audit flag them before training and the "
        "evaluation measure them after: risks.json, risks.html",
    )
    frontier = _command(
        sub,
        "frontier",
        _frontier,
        help="reward vs KL of offline DPO, iterative DPO, RLOO and best-of-N, with their costs",
        description="The demo's corpus, SFT model and pairs; a reward model learned from the pairs; one DPO "
        "run per β sharing one reference cache; three rounds each of iterative DPO (labelled by a judge as noisy "
        "as the pairs, and by the reward model) and of RLOO on the reward model; best-of-N sampling from the SFT "
        "model (N = 2 … 64). The reward-vs-KL frontier of all of them, with each point's wall time, peak memory "
        "and samples, in frontier.png and frontier.json.",
    )
    _add_demo_arguments(frontier, "runs/frontier", quick="the demo's --quick sizes")
    frontier.add_argument("--betas", default="0.05,0.1,0.3,1", help="comma-separated β values (default 0.05,0.1,0.3,1)")


def _eval_command(sub) -> None:
    from preftune.evaluation.command import add_arguments as add_eval_arguments

    add_eval_arguments(
        _command(
            sub,
            "eval",
            _eval,
            help="evaluate a trained model against its reference",
            description="Held-out pair metrics (--data), samples from policy and reference with "
            "KL, length, diversity and reward win rate (--prompts, --reward), and "
            "refusal rates (--refusal-prompts). Prints a table; --json writes it.",
        )
    )


def _audit_command(sub) -> None:
    audit = _command(
        sub,
        "audit",
        _audit,
        help="check a preference dataset before training",
        description="Count duplicates, identical, empty and contradictory pairs, train/eval "
        "prompt leakage, truncation, length bias and encoding problems. Exits 0 "
        "whatever it finds (it is a report).",
    )
    audit.add_argument("data", help="data file (.jsonl, .json, .csv, .parquet) or hub dataset owner/name")
    audit.add_argument("--eval-data", help="eval data: prompts shared with DATA are reported as leakage")
    tokens = audit.add_mutually_exclusive_group()
    tokens.add_argument("--model", help="model folder whose tokenizer measures lengths in tokens")
    tokens.add_argument("--tokenizer", help="tokenizer folder or name (instead of --model)")
    audit.add_argument("--max-length", type=int, help="report pairs training would truncate at this length")
    audit.add_argument("--max-prompt-length", type=int, help="report prompts training would cut to this length")
    audit.add_argument("--columns", help="column mapping, e.g. prompt=question,chosen=response_j,rejected=response_k")
    audit.add_argument("--json", metavar="OUT", help="also write the findings to this JSON file")
    audit.add_argument(
        "--feature",
        action="append",
        metavar="MODULE:FUNCTION",
        help="a feature for the table of what the preferences reward: function(response text) → number; repeatable",
    )
    audit.add_argument(
        "--refusal-detector",
        metavar="MODULE:FUNCTION",
        help="function(response text) → True for a refusal, instead of the default detector of refusal openings "
        "(as in preftune eval)",
    )
    audit.add_argument(
        "--show",
        type=int,
        metavar="N",
        help="first print N pairs token by token as the model sees them (special tokens, truncation), flagging "
        "doubled BOS, missing EOS, a chat template applied twice (needs --model or --tokenizer)",
    )
    audit.add_argument("--trust-remote-code", action="store_true", help="allow tokenizer code shipped with the model")
    audit.add_argument(
        "--displacement",
        action="store_true",
        help="score each pair's likelihood-displacement risk (CHES, Razin et al. 2025) with --model as the "
        "reference, one forward pass per batch, and rank the riskiest pairs (needs --model)",
    )
    audit.add_argument(
        "--top", type=int, metavar="K", help="with --displacement: list the K riskiest pairs (default 10)"
    )


def _output_commands(sub) -> None:
    """report and push: what is done with a run folder afterwards."""
    report = _command(
        sub,
        "report",
        _report,
        help="an HTML report of a run folder, or a comparison of several",
        description="One RUN_DIR: write RUN_DIR/report.html (and RUN_DIR/plots/*.png): the result first "
        "(held-out accuracy, reward before and after, KL, win rate, warnings), then evaluation, sample "
        "continuations, training curves, options and data audit, in one self-contained page. Several: one page "
        "at --output comparing them (curves overlaid, one column per run).",
    )
    report.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder written by `preftune train`; several to compare"
    )
    report.add_argument(
        "--output",
        metavar="FILE",
        help="write the page here (nothing is written into the run folders); required to compare runs",
    )
    publish = _command(
        sub,
        "push",
        _push,
        help="upload a run's final model and its model card to the Hugging Face hub",
        description="Upload RUN_DIR/final (or final-merged) with its model card (README.md) to a hub model "
        "repository, created if missing. Needs a token (`hf auth login` or HF_TOKEN) and the network.",
    )
    publish.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `preftune train`")
    publish.add_argument("--repo", required=True, metavar="OWNER/NAME", help="hub model repository to upload to")
    publish.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (else the owner's default, usually public)",
    )
    publish.add_argument("--merged", action="store_true", help="upload final-merged/ (LoRA with --merge) instead")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="preftune: %(message)s", stream=sys.stderr, force=True)
    # Only preftune's own lines, and other libraries' errors: their notices (matplotlib building its font cache,
    # bitsandbytes failing to fetch optional kernels) would print as if they were ours.
    logging.getLogger().handlers[0].addFilter(
        lambda r: r.name.split(".")[0] == "preftune" or r.levelno >= logging.ERROR
    )
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

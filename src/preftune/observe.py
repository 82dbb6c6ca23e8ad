"""What a training run reports besides its loss: the data audit at the start, generation-based evaluation every
--eval-every steps, plain-language warnings as metrics arrive, and the HTML report at the end.

Kept out of recipe.py so the recipe stays readable; every piece is the same code as the `audit`, `eval` and
`report` commands, not a second implementation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from preftune import trackers
from preftune.config import TrainConfig
from preftune.data.audit import audit_pairs
from preftune.data.audit_examples import audit_examples
from preftune.data.formats import PreferencePair
from preftune.errors import UserError
from preftune.evaluation.evaluate import (
    EvalOptions,
    evaluate_models,
    flat_metrics,
    load_inputs,
)
from preftune.files import write_json
from preftune.loading import carries_adapter
from preftune.monitor import TrainingMonitor
from preftune.rundir import AUDIT, EVAL, METRICS, kept_records

log = logging.getLogger("preftune")


def audit_data(train: list[PreferencePair], held_out: list[PreferencePair], unpaired: bool = False):
    """The cheap part of `preftune audit` (no tokenizer: truncation is reported by tokenization already), of pairs
    or of unpaired examples."""
    report = (audit_examples if unpaired else audit_pairs)(train, held_out or None)
    for warning in report.warnings():
        log.warning("--data audit: %s", warning)
    return report


def write_audit(report, run_dir: Path) -> None:
    write_json(run_dir / AUDIT, report.to_dict())


class Sink(Protocol):
    """Where a run's metrics records go besides metrics.jsonl (rank 0 only): an experiment tracker, a callback."""

    def log(self, records: list[dict]) -> None: ...

    def finish(self, summary: dict) -> None: ...


class Callback:
    """`train(cfg, on_log=...)`: `on_log(step, record)` for every record, as it is written to metrics.jsonl."""

    def __init__(self, on_log: Callable[[int, dict], None]):
        self.on_log = on_log

    def log(self, records: list[dict]) -> None:
        for record in records:
            self.on_log(record["step"], dict(record))

    def finish(self, summary: dict) -> None:
        pass


class Watcher:
    """Feeds every metrics record to a `TrainingMonitor` and logs each new warning once, then to the `sinks`.

    After --resume the records kept from before are replayed silently, so a warning given before the
    interruption is not given again (the sinks saw them in the first run).
    """

    def __init__(self, cfg: TrainConfig, total_steps: int, kept_records: list[dict], sinks: Sequence[Sink] = ()):
        self.monitor = TrainingMonitor(total_steps, cfg.losses, cfg.weights)
        for record in kept_records:
            self.monitor.observe(record)
        self.sinks = list(sinks)

    def observe(self, records: list[dict]) -> None:
        for record in records:
            for warning in self.monitor.observe(record):
                log.warning("%s", warning)
        for sink in self.sinks:
            sink.log(records)

    def finish(self, summary: dict) -> None:
        """The run is over: `summary` (the last record, with the final evaluation) to every sink, which closes."""
        for sink in self.sinks:
            sink.finish(summary)


def watch(cfg: TrainConfig, total_steps: int, run_dir: Path, on_log: Callable[[int, dict], None] | None = None):
    """Rank 0's Watcher: the monitor (replaying a resumed run's records), then the trackers of --report-to and the
    `on_log` callback."""
    sinks = [*trackers.open_trackers(cfg, run_dir, resumed=cfg.resume), *([Callback(on_log)] if on_log else [])]
    return Watcher(cfg, total_steps, kept_records(run_dir / METRICS), sinks)


class GenerationEval:
    """Sampling, KL to the reference and rewards on --eval-prompts, through `preftune eval`'s own functions.

    The reference must be a model here (cached log-probs cannot sample): the live reference when there is one,
    else the reference folder is loaded on the first evaluation and kept.
    """

    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device, live_reference=None):
        self.cfg = cfg
        self.options = EvalOptions(
            model=cfg.output,
            ref=cfg.ref_model or cfg.model,
            prompts=cfg.eval_prompts,
            reward=cfg.eval_reward,
            max_new_tokens=cfg.eval_max_new_tokens,
            max_prompt_length=cfg.max_prompt_length,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            device=str(device),
            trust_remote_code=cfg.trust_remote_code,
        )
        self.inputs = load_inputs(self.options, tokenizer)  # every input error before the first step
        self.tokenizer = tokenizer
        self.device = device
        self.reference = live_reference

    def _reference(self):
        if self.reference is None:
            from preftune.loading import load_causal_lm

            self.reference = load_causal_lm(
                self.options.ref,
                trust_remote_code=self.cfg.trust_remote_code,
                allow_pickle_weights=self.cfg.allow_pickle_weights,
                what="--ref-model" if self.cfg.ref_model else "--model",
            ).to(self.device)
        return self.reference

    def __call__(self, policy, step: int, run_dir: Path | None) -> dict[str, float]:
        """eval/* metrics of the policy now; the full result goes to eval.json (rank 0 passes run_dir)."""
        was_training = policy.training
        policy.eval()
        try:
            result = evaluate_models(self.inputs, policy, self._reference(), self.tokenizer, self.options)
        finally:
            policy.train(was_training)
        result["step"] = step
        if run_dir is not None:
            write_json(run_dir / EVAL, result)
        return {"eval/" + k: v for k, v in flat_metrics(result).items()}


def check_generation_options(cfg: TrainConfig) -> None:
    if cfg.eval_prompts and carries_adapter(cfg.model):
        raise UserError(
            "--eval-prompts: sampling the reference of a model that carries a LoRA adapter is not "
            "supported yet; evaluate final/ afterwards with `preftune eval`"
        )


def write_report(run_dir: Path) -> None:
    from preftune.report import write_report as write

    log.info("report: %s", write(run_dir))

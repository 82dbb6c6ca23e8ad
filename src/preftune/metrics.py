"""A step's metrics: summed on the device over micro-batches, turned into per-pair means, brought to the host once
per log interval and checked to be finite."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError
from preftune.losses import MASKED_MEANS


def add_sums(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> None:
    """Sum per-pair metrics on the device: no host sync until the step is logged."""
    for key, value in metrics.items():
        total = value.float().sum()
        sums[key] = sums[key] + total if key in sums else total


def step_counts(pairs: list[TokenizedPair], indices: list[int]) -> tuple[int, int]:
    """(pairs, chosen response tokens) of a step over all processes: the loss's denominators. Every process holds
    every pair, so each one counts them itself, without communication."""
    return len(indices), sum(len(pairs[i].chosen_ids) for i in indices)


def per_pair(sums: dict[str, torch.Tensor], num_pairs: int) -> dict[str, torch.Tensor]:
    """Per-pair means of summed metrics, still on the device (the loss is already normalised by the step).

    Unpaired examples: the desirable ("chosen") and undesirable ("rejected") metrics are means over their own
    examples (MASKED_MEANS; NaN when the step has none, left out of the log), the margin their difference, and the
    label counts become `desirable_share`."""
    means = {k: v if k == "loss" else v / num_pairs for k, v in sums.items()}
    if "count/desirable" not in sums:
        return means
    for key, count in MASKED_MEANS.items():
        means[key] = sums[key] / sums[count]
    means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    means["desirable_share"] = means.pop("count/desirable")
    del means["count/undesirable"]
    return means


def without_empty_means(metrics: dict[str, float]) -> dict[str, float]:
    """Unpaired examples: drop the means over the desirable (or undesirable) examples of a step that had none (NaN,
    0 / 0), as TRL's KTOTrainer logs nothing for them; pair metrics are returned as they are."""
    if "desirable_share" not in metrics:
        return metrics
    empty = {k for k in (*MASKED_MEANS, "rewards/margins") if math.isnan(metrics[k])}
    return {k: v for k, v in metrics.items() if k not in empty}


def check_finite(record: dict[str, float], step: int) -> None:
    bad = [k for k in ("loss", "grad_norm") if not math.isfinite(record[k])]
    if bad and not record.get("skipped"):
        raise UserError(
            f"step {step}: {bad[0]} is {record[bad[0]]}; stopping before a broken model is saved "
            "(try a lower --learning-rate or --dtype float32)"
        )


@dataclass
class StepMetrics:
    """One optimizer step's metrics, still on the device until the log interval ends."""

    step: int
    lr: float
    pairs: int
    tokens: int
    keys: list[str]
    values: torch.Tensor


def to_records(pending: list[StepMetrics], elapsed: float) -> list[dict[str, float]]:
    """Bring the interval's metrics to the host in one transfer (the only sync) and check they are finite."""
    rows = torch.stack([p.values for p in pending]).tolist()
    per_step = elapsed / len(pending)  # steps of an interval are timed together: timing one would sync
    records = []
    for p, row in zip(pending, rows):
        record = {
            "step": p.step,
            **without_empty_means(dict(zip(p.keys, row))),
            "lr": p.lr,
            "pairs_per_s": p.pairs / per_step,
            "tokens_per_s": p.tokens / per_step,
            "step_time_s": per_step,
        }
        check_finite(record, p.step)
        records.append(record)
    return records


def progress_fields(record: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss, and the pair accuracy (or, for unpaired examples, KTO's KL estimate)."""
    shown = {"loss": f"{record['loss']:.4f}"}
    for key, name in (("rewards/accuracies", "acc"), ("kl", "kl")):
        if key in record:
            shown[name] = f"{record[key]:.2f}"
    return shown


def append_records(metrics_file, records: list[dict]) -> None:
    """metrics.jsonl: one JSON line per step, flushed so a kill loses at most the line being written."""
    metrics_file.write("".join(json.dumps(r) + "\n" for r in records))
    metrics_file.flush()

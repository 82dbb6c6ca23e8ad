"""Unpaired preference data for the unpaired losses (`kto`, `apo_zero_unpaired`): examples (prompt, completion,
label), each completion desirable (label true) or undesirable on its own, with no partner.

Rows, after `--columns` (which may name `completion` and `label` too):
    standard        {"prompt": "Q: hi\\nA: ", "completion": "good", "label": true}
    conversational  {"prompt": [{"role": "user", "content": "hi"}],
                     "completion": [{"role": "assistant", "content": "good"}], "label": false}
`label` is a boolean, 0 or 1, or (as CSV cells are) one of "true", "false", "1", "0" in any case. This is TRL's
unpaired preference format. A source of pairs (any shape `formats.row_to_pair` reads) is unpaired as TRL's
`unpair_preference_dataset` does it through `datasets.map` in batches of 1000 rows: each block of 1000 pairs gives
its chosen responses as desirable examples, then its rejected ones as undesirable, so the same file gives the same
examples in the same order as TRL's KTOTrainer.

Each example travels as a `PreferencePair` whose `rejected` IS its `chosen` (tokenized once, data/tokenize.py) and
whose `label` is set. After tokenization, `with_kl_completions` puts in the rejected slot the mismatched completion
KTO's KL estimate needs, as TRL's KTOTrainer: within consecutive blocks of n examples the completions rotate by one,
(x1, y1) … (xn, yn) → (x1, yn), (x2, y1), …, (xn, yn−1), joining token ids (not re-tokenized text). The trainer
takes n = the global batch (--batch-size × --grad-accum × processes), so the pairing does not depend on how a step is
split into micro-batches and processes; TRL takes its per-device batch size, the same n in one process without
gradient accumulation.
The batching, log-prob code and reference cache then serve examples exactly as pairs: the "chosen" log-prob is
the example's, the "rejected" one the mismatched completion's (losses.py, "unpaired").
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from preftune.data.formats import (
    LoadReport,
    PreferencePair,
    _apply_columns,
    _check_columns,
    _check_encodable,
    _check_kinds,
    _check_message_response,
    _check_messages,
    _check_text_response,
    _column_list,
    _pairs_of_rows,
    _printable,
    _rows_of,
)
from preftune.data.tokenize import TokenizedPair
from preftune.errors import UserError

log = logging.getLogger("preftune")

FIELDS = ("prompt", "completion", "label")
UNPAIR_BLOCK = 1000  # rows per `datasets.map` batch in TRL's unpair_preference_dataset
_LABELS = {"true": True, "1": True, "false": False, "0": False}


@dataclass
class ExampleReport:
    """What `read_examples` read. `pairs` is the report of the pairs read when the source holds pairs."""

    rows: int = 0
    examples: int = 0
    desirable: int = 0
    shapes: Counter = field(default_factory=Counter)  # "standard" / "conversational" (unpaired rows)
    pairs: LoadReport | None = None

    def summary(self) -> str:
        """One line, e.g. "120 rows → 120 examples (70 desirable, 50 undesirable; standard 120)"."""
        counts = f"{self.examples} examples ({self.desirable} desirable, {self.examples - self.desirable} undesirable"
        if self.pairs is not None:
            return f"{self.pairs.summary()} → {counts}; unpaired as TRL's unpair_preference_dataset)"
        shapes = ", ".join(f"{name} {n}" for name, n in sorted(self.shapes.items()))
        return f"{self.rows} rows → {counts}; {shapes})"


def read_examples(
    source: str,
    report: ExampleReport,
    *,
    columns: dict[str, str] | None = None,
    on_identical: str = "skip",
    split: str = "train",
) -> Iterator[PreferencePair]:
    """Every example of `source` (a local file or a hub dataset), one at a time, counted into `report`. The first
    row decides whether the source holds unpaired examples or pairs (which are unpaired, see the module docstring;
    `on_identical` applies to them); a row of the other kind later is an error."""
    columns = dict(columns or {})
    _check_columns(columns)
    rows = _rows_of(source, split)
    first = next(rows, None)
    if first is None:
        raise UserError(f"{source}: holds no data rows (an empty file, blank lines only or an empty list)")
    rows = itertools.chain([first], rows)
    if _is_unpaired(first[0], columns):
        examples = (row_to_example(row, where, columns, report) for row, where in rows)
    else:
        report.pairs = LoadReport()
        examples = _unpair(_pairs_of_rows(source, _only_pairs(rows, columns), report.pairs, columns, on_identical))
    for example in examples:
        report.examples += 1
        report.desirable += example.label
        yield example


def _is_unpaired(row: dict[str, Any], columns: dict[str, str]) -> bool:
    return (columns.get("completion") or "completion") in row and (columns.get("chosen") or "chosen") not in row


def _only_pairs(rows: Iterator[tuple[dict, str]], columns: dict[str, str]) -> Iterator[tuple[dict, str]]:
    for row, where in rows:
        if _is_unpaired(row, columns):
            raise UserError(
                f"{where}: an unpaired example (completion, label) in a source of pairs (its first row is "
                f"a pair); use one format per file"
            )
        yield row, where


def row_to_example(
    row: dict[str, Any],
    where: str,
    columns: dict[str, str],
    report: ExampleReport | None = None,
    *,
    strict: bool = True,
) -> PreferencePair:
    """One unpaired row → PreferencePair(prompt, completion, completion, where, label). Raises UserError naming
    `where` and the field at fault. strict=False is the audit's reading: an empty completion and encoding problems
    are not errors (the audit counts them)."""
    fields = _apply_columns(row, columns, where, names=FIELDS)
    for name in FIELDS:
        if name not in fields:
            hint = (
                "; a pair (chosen, rejected) in a source of unpaired examples? use one format per file"
                if (columns.get("chosen") or "chosen") in row
                else "; rename columns with --columns"
            )
            raise UserError(f"{where}: missing field '{name}' (the row has: {_column_list(row)}){hint}")
    label = _label(fields.pop("label"), where)
    conversational = _check_kinds(fields, where)
    if conversational:
        for name, messages in fields.items():
            _check_messages(messages, name, where)
        # Not strict: every content filled in, so only the structure checks (assistant turn, order) can fire.
        completion = fields["completion"] if strict else [{**m, "content": "x"} for m in fields["completion"]]
        _check_message_response(completion, "completion", where, implicit=False)
    elif strict:
        _check_text_response(fields["completion"], "completion", where, implicit=False)
    if strict:
        _check_encodable(fields, where)
    if report is not None:
        report.rows += 1
        report.shapes["conversational" if conversational else "standard"] += 1
    completion = fields["completion"]
    return PreferencePair(prompt=fields["prompt"], chosen=completion, rejected=completion, where=where, label=label)


def is_unpaired_source(source: str, columns: dict[str, str] | None = None) -> bool:
    """Whether the first row of `source` is an unpaired example (completion, label) rather than a pair."""
    first = next(_rows_of(source, "train"), None)
    return first is not None and _is_unpaired(first[0], dict(columns or {}))


def iter_examples(source: str, columns: dict[str, str] | None = None) -> Iterator[PreferencePair]:
    """Every row of an unpaired `source`, for the audit: empty completions and encoding problems are kept (see
    `row_to_example`); a pair among them is an error, as in training."""
    columns = dict(columns or {})
    _check_columns(columns)
    for row, where in _rows_of(source, "train"):
        yield row_to_example(row, where, columns, strict=False)


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    shown = _printable(repr(value))[:40]
    raise UserError(f"{where}: field 'label' must be true or false (or 1/0), got {shown}")


def _unpair(pairs: Iterator[PreferencePair]) -> Iterator[PreferencePair]:
    """Pairs → examples, TRL's order: per block of UNPAIR_BLOCK pairs, the chosen responses (desirable), then the
    rejected ones (undesirable)."""
    while block := list(itertools.islice(pairs, UNPAIR_BLOCK)):
        for label, side in ((True, "chosen"), (False, "rejected")):
            for pair in block:
                response = getattr(pair, side)
                yield PreferencePair(
                    prompt=pair.prompt, chosen=response, rejected=response, where=pair.where, label=label
                )


# ---------------------------------------------------------------------------------------------------- KL completions


@dataclass
class KLReport:
    """What `with_kl_completions` did: the mismatched completions it cut to --max-length, and those that share the
    example's prompt (then they are not mismatched: the KL estimate is biased towards the rewards)."""

    examples: int = 0
    desirable: int = 0
    cut: int = 0
    same_prompt: int = 0

    def summary(self) -> str:
        return (
            f"{self.examples} examples ({self.desirable} desirable, {self.examples - self.desirable} "
            f"undesirable); KL completions: {self.cut} cut to --max-length, {self.same_prompt} share their "
            f"example's prompt"
        )


def with_kl_completions(
    examples: Iterable[TokenizedPair], block: int, max_length: int | None, report: KLReport
) -> Iterator[TokenizedPair]:
    """Tokenized examples (rejected_ids = chosen_ids) → the same with rejected_ids = the mismatched completion
    (see the module docstring), one block at a time. A last block of a single example takes the completion before
    it (a rotation of one would give the example its own completion). A mismatched completion longer than
    --max-length allows after the example's prompt is cut from the right, and counted."""
    buffer: list[TokenizedPair] = []
    previous: TokenizedPair | None = None
    for example in examples:
        buffer.append(example)
        if len(buffer) == block:
            yield from _rotated(buffer, buffer[-1], max_length, report)
            previous, buffer = buffer[-1], []
    if buffer:
        yield from _rotated(
            buffer, previous if len(buffer) == 1 and previous is not None else buffer[-1], max_length, report
        )


def _rotated(
    block: list[TokenizedPair], before_first: TokenizedPair, max_length: int | None, report: KLReport
) -> Iterator[TokenizedPair]:
    for example, other in zip(block, [before_first, *block[:-1]]):
        kl_ids = other.chosen_ids
        if max_length is not None and len(example.prompt_ids) + len(kl_ids) > max_length:
            kl_ids = kl_ids[: max(1, max_length - len(example.prompt_ids))]
            report.cut += 1
        report.examples += 1
        report.desirable += bool(example.label)
        report.same_prompt += other.prompt_ids == example.prompt_ids
        yield replace(example, rejected_ids=kl_ids)


def check_balance(report: KLReport, desirable_weight: float, undesirable_weight: float) -> None:
    """Warn, as TRL's KTOTrainer, when the desirable and undesirable examples are unbalanced and neither weight lies
    in the range Eq. 8 of the KTO paper (arXiv 2402.01306 v2) recommends: λD·nD / (λU·nU) in [1, 4/3]."""
    n_d, n_u = max(report.desirable, 1), max(report.examples - report.desirable, 1)
    if n_d == n_u:
        return
    d_low, d_high = n_u * undesirable_weight / n_d, n_u * undesirable_weight / n_d * 1.33
    u_low, u_high = n_d * desirable_weight / n_u / 1.33, n_d * desirable_weight / n_u
    if not (d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high):
        log.warning(
            "%d desirable and %d undesirable examples, but the weights are outside the range the KTO paper "
            "recommends: set EITHER --desirable-weight in [%.2f, %.2f] OR --undesirable-weight in "
            "[%.2f, %.2f]",
            n_d,
            n_u,
            d_low,
            d_high,
            u_low,
            u_high,
        )

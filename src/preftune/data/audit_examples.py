"""`preftune audit` for unpaired examples (prompt, completion, label; data/unpaired.py): what would mislead KTO.

`audit_examples(examples)` looks at every row (`unpaired.iter_examples` keeps the empty completions training
refuses) and returns an `ExampleAuditReport`. Findings count examples and name the first rows, as `audit.py` does
for pairs:

    duplicates          examples equal to an earlier one (prompt, completion and label); the first copy is not counted
    empty_completions   a completion that is empty or whitespace only (message lists: no assistant content)
    conflicting_labels  the same prompt and completion labelled desirable in one row and undesirable in another; all
                        such rows count
    eval_leakage        examples whose prompt is also an eval prompt; None without eval examples
    truncated           measured examples whose sequence training would cut (`tokenize.truncate`); None without a
                        tokenizer and a max length
    encoding            as for pairs (audit.py)
Balance: `desirable`, `undesirable` and `desirable_share`; KTO needs both kinds, and its weights should offset an
imbalance (`--desirable-weight`, `--undesirable-weight`).
Length bias: `desirable_longer_probability` is the chance that a random desirable completion is longer than a random
undesirable one, ties counting half (the AUC of "longer is better"): 0.5 means length says nothing about the
label. e.g. desirable lengths [3, 5], undesirable [4]: (0 + 1) / 2 = 0.5. Lengths are in characters, or in tokens
with a tokenizer (completions include their EOS), over the measured examples (non-empty, encodable).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from preftune.data.audit import (
    AuditReport,
    Finding,
    Leakage,
    Truncation,
    _blank_prompt,
    _canonical,
    _distribution,
    _encoding,
    _finding,
    _finding_line,
    _is_blank,
    _pair_encoding_kinds,
    finding_warnings,
    length_bias_warning,
    measure,
)
from preftune.data.formats import PreferencePair
from preftune.errors import UserError


@dataclass
class ExampleAuditReport:
    """Everything `audit_examples` found; `to_dict()` is what `preftune audit --json` writes."""

    rows: int
    desirable: int
    undesirable: int
    desirable_share: float
    duplicates: Finding
    empty_completions: Finding
    conflicting_labels: Finding
    eval_leakage: Leakage | None
    truncated: Truncation | None
    desirable_longer_probability: float | None  # None: no measurable example of one of the kinds
    lengths: dict[str, Any]  # unit, examples, excluded, and prompt / desirable / undesirable distributions
    encoding: dict[str, Finding]

    to_dict = AuditReport.to_dict  # findings as dicts, the rest as it is

    def warnings(self) -> list[str]:
        """As `AuditReport.warnings`, first of all a missing kind (KTO needs both)."""
        out = []
        if not self.desirable or not self.undesirable:
            out.append(f"no {'desirable' if not self.desirable else 'undesirable'} example: KTO needs both kinds")
        return (
            out
            + finding_warnings(
                "examples",
                [
                    (self.duplicates, "repeat an earlier one exactly and count more than once in training"),
                    (self.conflicting_labels, "have the same prompt and completion as an example with the other label"),
                    (self.eval_leakage, "have a prompt that is also in the eval data ({f.prompts} distinct)"),
                    (self.truncated, "are longer than {f.limits} and will be truncated"),
                ],
            )
            + length_bias_warning(
                self.desirable_longer_probability,
                "a desirable completion is longer than an undesirable one with probability {score:.1%}",
            )
        )

    def lines(self) -> list[str]:
        out = [
            (
                f"audit of {self.rows} unpaired examples: {self.desirable} desirable, {self.undesirable} "
                f"undesirable ({self.desirable_share:.1%} desirable)"
            ),
            f"{'finding':<22}{'rows':>7}{'share':>8}  first rows",
        ]
        for name in ("duplicates", "empty_completions", "conflicting_labels"):
            out.append(_finding_line(name, getattr(self, name)))
        leak, cut = self.eval_leakage, self.truncated
        out.append(
            f"{'eval_leakage':<22}  not checked (no --eval-data)"
            if leak is None
            else _finding_line("eval_leakage", leak, f"distinct prompts: {leak.prompts}, eval rows: {leak.eval_rows}")
        )
        out.append(
            f"{'truncated':<22}  not checked (needs --model or --tokenizer, and --max-length)"
            if cut is None
            else _finding_line("truncated", cut, f"at {cut.limits}")
        )
        problems = {kind: f for kind, f in self.encoding.items() if f.count}
        out.append("encoding" + ("" if problems else ": no problems found"))
        out += [_finding_line(f"  {kind}", finding) for kind, finding in problems.items()]
        lengths = self.lengths
        out.append(
            f"lengths in {lengths['unit']} ({lengths['examples']} examples measured, {lengths['excluded']} "
            f"excluded: empty or unencodable)"
        )
        p = self.desirable_longer_probability
        out.append(
            "  length bias: not measurable (needs both kinds)"
            if p is None
            else f"  a desirable completion is the longer one with probability {p:.1%} (ties count half)"
        )
        out.append(f"  {'':<12}{'min':>8}{'median':>8}{'p90':>8}{'max':>8}{'mean':>10}")
        for part in ("prompt", "desirable", "undesirable"):
            d = lengths[part]
            if d is not None:
                out.append(f"  {part:<12}{d['min']:>8}{d['median']:>8}{d['p90']:>8}{d['max']:>8}{d['mean']:>10.1f}")
        return out


def _key(example: PreferencePair) -> tuple:
    return _canonical(example.prompt), _canonical(example.chosen)


def _duplicates(examples: list[PreferencePair]) -> list[str]:
    seen: set[tuple] = set()
    found = []
    for example in examples:
        key = (*_key(example), example.label)
        if key in seen:
            found.append(example.where)
        seen.add(key)
    return found


def _conflicts(examples: list[PreferencePair]) -> list[str]:
    labels: dict[tuple, set[bool]] = {}
    for example in examples:
        labels.setdefault(_key(example), set()).add(example.label)
    return [example.where for example in examples if len(labels[_key(example)]) == 2]


def _leakage(examples: list[PreferencePair], eval_examples: list[PreferencePair]) -> Leakage:
    eval_prompts = {_canonical(e.prompt) for e in eval_examples if not _blank_prompt(e.prompt)}
    leaked = [
        (e.where, _canonical(e.prompt))
        for e in examples
        if not _blank_prompt(e.prompt) and _canonical(e.prompt) in eval_prompts
    ]
    return _finding(
        [where for where, _ in leaked],
        len(examples),
        Leakage,
        eval_rows=len(eval_examples),
        prompts=len({prompt for _, prompt in leaked}),
    )


def longer_probability(desirable: list[int], undesirable: list[int]) -> float | None:
    """P(a random desirable length > a random undesirable one), ties half; None when a list is empty."""
    if not desirable or not undesirable:
        return None
    ordered = sorted(undesirable)
    wins = sum(
        bisect.bisect_left(ordered, d) + 0.5 * (bisect.bisect_right(ordered, d) - bisect.bisect_left(ordered, d))
        for d in desirable
    )
    return wins / (len(desirable) * len(undesirable))


def audit_examples(
    examples: list[PreferencePair],
    eval_examples: list[PreferencePair] | None = None,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> ExampleAuditReport:
    """Check unpaired `examples` (PreferencePairs with a label and rejected = chosen). Pure: reads nothing."""
    if tokenizer is None and (max_length is not None or max_prompt_length is not None):
        raise UserError("--max-length and --max-prompt-length count tokens: give --model or --tokenizer too")
    kinds = [_pair_encoding_kinds(e) for e in examples]
    measured = [e for e, k in zip(examples, kinds) if not _is_blank(e.chosen) and "lone_surrogates" not in k]
    lengths, truncation = measure(measured, tokenizer, max_length, max_prompt_length)  # completion = chosen
    by_label = {label: [c for (_, c, _), e in zip(lengths, measured) if e.label == label] for label in (True, False)}
    desirable = sum(e.label for e in examples)
    return ExampleAuditReport(
        rows=len(examples),
        desirable=desirable,
        undesirable=len(examples) - desirable,
        desirable_share=desirable / len(examples) if examples else 0.0,
        duplicates=_finding(_duplicates(examples), len(examples)),
        empty_completions=_finding([e.where for e in examples if _is_blank(e.chosen)], len(examples)),
        conflicting_labels=_finding(_conflicts(examples), len(examples)),
        eval_leakage=None if eval_examples is None else _leakage(examples, eval_examples),
        truncated=truncation,
        desirable_longer_probability=longer_probability(by_label[True], by_label[False]),
        lengths={
            "unit": "characters" if tokenizer is None else "tokens",
            "examples": len(measured),
            "excluded": len(examples) - len(measured),
            "prompt": _distribution([p for p, _, _ in lengths]),
            "desirable": _distribution(by_label[True]),
            "undesirable": _distribution(by_label[False]),
        },
        encoding=_encoding(examples, kinds),
    )

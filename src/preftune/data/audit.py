"""Dataset checks before training (`preftune audit`): what in the data would mislead a preference loss.

`audit_pairs(pairs)` looks at every pair (use `formats.iter_pairs`, which keeps the rows `load_pairs` skips) and
returns an `AuditReport`. Each finding counts pairs (rows) and names the first 5 (`where` strings, input order);
`share` is the count over the pairs checked (all rows, or the measured pairs for `truncated`):

    duplicates          pairs equal to an earlier pair (prompt, chosen and rejected); the first copy is not counted
    identical_pairs     chosen == rejected (training skips these)
    empty_responses     a chosen or rejected that is empty or whitespace only (message lists: no assistant content)
    conflicting_pairs   pairs contradicted by another: (prompt, A, B) and (prompt, B, A) both present; both count
    eval_leakage        training pairs whose prompt is also an eval prompt (blank prompts, as implicit-prompt rows
                        without a shared beginning have, are not compared); None without eval pairs
    truncated           measured pairs the training truncation rules (`tokenize.truncate`) would cut, prompt or
                        response; None without a tokenizer and a max length
    encoding            per kind, pairs whose prompt or responses hold: replacement_char (U+FFFD), nul (U+0000),
                        control_chars (other C0/C1 controls and DEL; \\n \\t \\r are fine), lone_surrogates,
                        mojibake (UTF-8 read as Latin-1/cp1252: "Ã©", "â€™", "Â°"), zero_width (U+200B/C/D, U+2060,
                        U+FEFF; U+200C/D also occur legitimately in emoji and some scripts)
Texts are compared exactly; message lists by their messages' contents and roles, whatever the key order.

Lengths and length bias are measured on the pairs training can use: not identical, no empty response, no lone
surrogate (not encodable, so not tokenizable); `lengths["excluded"]` counts the others. Unit: characters without a
tokenizer (message lists: the sum of their contents), tokens with one (`tokenize.tokenize_pairs` ids, before
truncation; responses include their EOS). Percentiles are nearest-rank (an even count's median is the lower
middle value).
    chosen_longer_share   share of measured pairs whose chosen is strictly longer than its rejected
    length_only_accuracy  accuracy of a "model" that predicts the longer response wins; ties count half.
                          0.5 means length says nothing; far from 0.5, a model can score well by length alone.

e.g. pairs (chosen, rejected) ("aaa", "b"), ("aa", "bb"), ("a", "bbbb") → chosen_longer_share 1/3,
     length_only_accuracy (1 + 0.5) / 3 = 0.5

What the preferences reward (`features`, from `data/features.py`, on the measured pairs): per surface feature
(length in words, list items, markdown, code blocks, exclamation marks, apologies, refusal, hedging, prompt
repetition, and `--feature module:function`), the shares of pairs whose chosen has more / less of it, and the
accuracy of "the response with more of it is chosen" with its Wilson interval; refusal shares (chosen refuses
while rejected complies, and the reverse), per `label` of the rows when they carry one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from preftune.data.features import PreferenceFeatures, feature_lines, feature_warnings, preference_features
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import TokenizedPair, tokenize_pairs, truncate
from preftune.errors import UserError
from preftune.files import write_json as write_json_file

EXAMPLES = 5  # rows named per finding
TRUNCATED_WARN_SHARE = 0.05
LENGTH_BIAS_WARN = (0.35, 0.65)  # length_only_accuracy outside this range is a strong length bias
ENCODING_KINDS = ("replacement_char", "nul", "control_chars", "lone_surrogates", "mojibake", "zero_width")

# Unicode category Cc (U+0000-U+001F, U+007F-U+009F) less \t \n \r, and NUL (its own kind).
_CONTROL = re.compile("[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# Any character some kind starts with: one scan clears a clean text (most texts), the kinds are checked only after it.
_SUSPECT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff\u200b-\u200d\u2060\ufeffÃÂâ]")
# UTF-8 bytes of é, ’, °, ... decoded as Latin-1/cp1252: a lead byte (Ã, Â, â€) followed by a continuation byte
# shown as a symbol. Real text almost never has "Ã" or "Â" before these characters ("São", "PÂTE" are fine).
_MOJIBAKE = re.compile("Ã[\u0080-\u00bf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ]|Â[\u00a0-\u00bf]|â€")


@dataclass
class Finding:
    """Pairs with one problem: how many, their share of the pairs checked, the first `EXAMPLES` rows."""

    count: int = 0
    share: float = 0.0
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Leakage(Finding):
    """Training pairs whose prompt is also an eval prompt; `prompts` counts the distinct shared prompts."""

    eval_rows: int = 0
    prompts: int = 0


@dataclass
class Truncation(Finding):
    """Measured pairs the truncation rules would cut (`share` is over measured pairs), split by what is cut."""

    max_length: int | None = None
    max_prompt_length: int | None = None
    prompts_cut: int = 0
    responses_cut: int = 0

    @property
    def limits(self) -> str:
        """The limits given, as flags: "--max-length 512 / --max-prompt-length 128"."""
        limits = [
            f"{flag} {value}"
            for flag, value in (("--max-length", self.max_length), ("--max-prompt-length", self.max_prompt_length))
            if value
        ]
        return " / ".join(limits)


def _finding(wheres: list[str], total: int, cls: type = Finding, **extra: Any) -> Finding:
    return cls(count=len(wheres), share=len(wheres) / total if total else 0.0, examples=wheres[:EXAMPLES], **extra)


# ------------------------------------------------------------------------------------------------- pair checks


def _canonical(value: str | list) -> str | tuple:
    """A hashable form: the text itself, or per message its sorted (key, value) items, so that the order of
    "role" and "content" in a row does not matter (a text never equals a tuple)."""
    if isinstance(value, str):
        return value
    return tuple(tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in m.items())) for m in value)


def _key(pair: PreferencePair) -> tuple:
    return _canonical(pair.prompt), _canonical(pair.chosen), _canonical(pair.rejected)


def _is_blank(value: str | list) -> bool:
    """An empty response: empty or whitespace-only text, or a message list with no assistant content."""
    if isinstance(value, str):
        return not value.strip()
    return not any(m["content"].strip() for m in value if m["role"] == "assistant")


def _texts(pair: PreferencePair) -> list[str]:
    parts = (pair.prompt, pair.chosen, pair.rejected)
    return [text for part in parts for text in ([part] if isinstance(part, str) else [m["content"] for m in part])]


def _duplicates(pairs: list[PreferencePair], keys: list[tuple]) -> list[str]:
    seen: set[tuple] = set()
    found = []
    for pair, key in zip(pairs, keys):
        if key in seen:
            found.append(pair.where)
        seen.add(key)
    return found


def _conflicts(pairs: list[PreferencePair], keys: list[tuple]) -> list[str]:
    present = set(keys)
    return [
        pair.where
        for pair, (prompt, chosen, rejected) in zip(pairs, keys)
        if chosen != rejected and (prompt, rejected, chosen) in present
    ]


def _leakage(pairs: list[PreferencePair], keys: list[tuple], eval_pairs: list[PreferencePair]) -> Leakage:
    eval_prompts = {_canonical(p.prompt) for p in eval_pairs if not _blank_prompt(p.prompt)}
    leaked = [
        (pair.where, key[0])
        for pair, key in zip(pairs, keys)
        if key[0] in eval_prompts and not _blank_prompt(pair.prompt)
    ]
    return _finding(
        [where for where, _ in leaked],
        len(pairs),
        Leakage,
        eval_rows=len(eval_pairs),
        prompts=len({prompt for _, prompt in leaked}),
    )


def _blank_prompt(prompt: str | list) -> bool:
    return not prompt.strip() if isinstance(prompt, str) else not any(m["content"].strip() for m in prompt)


def _encoding_kinds(text: str) -> set[str]:
    kinds: set[str] = set()
    if not _SUSPECT.search(text):
        return kinds
    if "\ufffd" in text:
        kinds.add("replacement_char")
    if "\x00" in text:
        kinds.add("nul")
    if _CONTROL.search(text):
        kinds.add("control_chars")
    if _LONE_SURROGATE.search(text):
        kinds.add("lone_surrogates")
    if _MOJIBAKE.search(text):
        kinds.add("mojibake")
    if _ZERO_WIDTH.search(text):
        kinds.add("zero_width")
    return kinds


def _pair_encoding_kinds(pair: PreferencePair) -> set[str]:
    return set().union(*map(_encoding_kinds, _texts(pair)))


def _encoding(pairs: list[PreferencePair], kinds: list[set[str]]) -> dict[str, Finding]:
    found: dict[str, list[str]] = {kind: [] for kind in ENCODING_KINDS}
    for pair, pair_kinds in zip(pairs, kinds):
        for kind in pair_kinds:
            found[kind].append(pair.where)
    return {kind: _finding(wheres, len(pairs)) for kind, wheres in found.items()}


# ----------------------------------------------------------------------------------------------------- lengths


def _measurable(pair: PreferencePair, kinds: set[str]) -> bool:
    """A pair training can use: not identical, no empty response, encodable (a lone surrogate is not)."""
    return (
        pair.chosen != pair.rejected
        and not _is_blank(pair.chosen)
        and not _is_blank(pair.rejected)
        and "lone_surrogates" not in kinds
    )


def _chars(value: str | list) -> int:
    return len(value) if isinstance(value, str) else sum(len(m["content"]) for m in value)


def measure(
    measured: list[PreferencePair], tokenizer: Any, max_length: int | None, max_prompt_length: int | None
) -> tuple[list[tuple[int, int, int]], Truncation | None]:
    """(prompt, chosen, rejected) lengths of each measured pair, and what truncation would cut. Lengths are in
    characters without a tokenizer, else in tokens before truncation; the truncation finding needs tokens and a max
    length (None otherwise). Unpaired examples (rejected = chosen, audit_examples.py) are measured the same way."""
    if tokenizer is None:
        return [(_chars(p.prompt), _chars(p.chosen), _chars(p.rejected)) for p in measured], None
    tokenized, _ = tokenize_pairs(measured, tokenizer)
    lengths = [(len(tp.prompt_ids), len(tp.chosen_ids), len(tp.rejected_ids)) for tp in tokenized]
    return lengths, _truncation(tokenized, max_length, max_prompt_length)


def _truncation(
    tokenized: list[TokenizedPair], max_length: int | None, max_prompt_length: int | None
) -> Truncation | None:
    """The pairs training would cut (None when no max length is given), split by what is cut."""
    if max_length is None and max_prompt_length is None:
        return None
    # The rules training applies, so the audit counts exactly the pairs training would cut.
    cuts = [truncate(tp, max_length=max_length, max_prompt_length=max_prompt_length)[1:] for tp in tokenized]
    return _finding(
        [tp.where for tp, cut in zip(tokenized, cuts) if any(cut)],
        len(tokenized),
        Truncation,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        prompts_cut=sum(prompt for prompt, _ in cuts),
        responses_cut=sum(response for _, response in cuts),
    )


def _distribution(values: list[int]) -> dict[str, float] | None:
    """min, nearest-rank median and p90, max, mean: [4, 5, 5, 23] → min 4, median 5, p90 23, max 23, mean 9.25."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(q: float) -> int:
        return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]

    return {
        "min": ordered[0],
        "median": rank(0.5),
        "p90": rank(0.9),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


def _length_bias(lengths: list[tuple[int, int, int]]) -> tuple[float | None, float | None, int]:
    """(chosen_longer_share, length_only_accuracy with ties counting half, ties)."""
    if not lengths:
        return None, None, 0
    longer = sum(c > r for _, c, r in lengths)
    ties = sum(c == r for _, c, r in lengths)
    return longer / len(lengths), (longer + 0.5 * ties) / len(lengths), ties


# ----------------------------------------------------------------------------------------------------- report


@dataclass
class AuditReport:
    """Everything `audit_pairs` found; `to_dict()` is what `preftune audit --json` writes."""

    rows: int
    duplicates: Finding
    identical_pairs: Finding
    empty_responses: Finding
    conflicting_pairs: Finding
    eval_leakage: Leakage | None  # None: no eval pairs given
    truncated: Truncation | None  # None: no tokenizer or no max length
    chosen_longer_share: float | None  # None: no measurable pair
    length_only_accuracy: float | None
    lengths: dict[str, Any]  # unit, pairs, excluded, ties, prompt/chosen/rejected distributions
    encoding: dict[str, Finding]
    features: PreferenceFeatures | None = None  # None: an audit.json of an older version, rebuilt by the model card

    def __post_init__(self) -> None:
        if isinstance(self.features, dict):  # rebuilt from audit.json
            self.features = PreferenceFeatures.from_dict(self.features)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, (Finding, PreferenceFeatures)):
                value = value.to_dict()
            elif name == "encoding":
                value = {kind: finding.to_dict() for kind, finding in value.items()}
            out[name] = value
        return out

    def warnings(self) -> list[str]:
        """Plain-language one-liners for the findings that can mislead training or evaluation."""
        found = finding_warnings(
            "pairs",
            [
                (self.duplicates, "repeat an earlier pair exactly and count more than once in training"),
                (self.conflicting_pairs, "contradict another pair (A over B and B over A for the same prompt)"),
                (
                    self.eval_leakage,
                    "have a prompt that is also in the eval data ({f.prompts} distinct): eval results "
                    "will look better than they are",
                ),
                (
                    self.truncated,
                    "are longer than {f.limits} and will be truncated (prompt cut in {f.prompts_cut}, "
                    "a response cut in {f.responses_cut})",
                ),
            ],
        )
        length = length_bias_warning(
            self.length_only_accuracy,
            "picking the longer response scores {score:.1%} (chosen is longer in {chosen:.1%} of pairs)",
            chosen=self.chosen_longer_share,
        )
        return found + length + (feature_warnings(self.features, skip=self._said(length)) if self.features else [])

    def _said(self, length: list[str]) -> list[str]:
        """["length"] when the length-bias line already says what the flagged length in words says (same side)."""
        rule = self.features.rules.get("length") if self.features else None
        longer = self.length_only_accuracy is not None and self.length_only_accuracy > 0.5
        return ["length"] if length and rule and (rule.flagged == "more") == longer else []

    def lines(self) -> list[str]:
        """A terminal table: one row per finding, then length bias and length distributions."""
        out = [f"audit of {self.rows} pairs", f"{'finding':<22}{'pairs':>7}{'share':>8}  first rows"]
        for name in ("duplicates", "identical_pairs", "empty_responses", "conflicting_pairs"):
            out.append(_finding_line(name, getattr(self, name)))
        leak, cut = self.eval_leakage, self.truncated
        if leak is None:
            out.append(f"{'eval_leakage':<22}  not checked (no --eval-data)")
        else:
            note = f"distinct prompts: {leak.prompts}, eval pairs: {leak.eval_rows}"
            out.append(_finding_line("eval_leakage", leak, note))
        if cut is None:
            out.append(f"{'truncated':<22}  not checked (needs --model or --tokenizer, and --max-length)")
        else:
            note = (
                f"of {self.lengths['pairs']} measured pairs at {cut.limits}: prompt cut in {cut.prompts_cut}, "
                f"a response cut in {cut.responses_cut}"
            )
            out.append(_finding_line("truncated", cut, note))
        problems = {kind: f for kind, f in self.encoding.items() if f.count}
        out.append("encoding" + ("" if problems else ": no problems found"))
        out += [_finding_line(f"  {kind}", finding) for kind, finding in problems.items()]
        out += self._length_lines()
        if self.features and self.features.pairs:  # nothing to say without a measured pair
            out += feature_lines(self.features)
        return out

    def _length_lines(self) -> list[str]:
        lengths = self.lengths
        head = (
            f"lengths in {lengths['unit']} ({lengths['pairs']} pairs measured, {lengths['excluded']} excluded: "
            f"identical, empty or unencodable)"
        )
        if self.length_only_accuracy is None:
            return [head, "  no pair to measure"]
        bias = (
            f"  chosen longer in {self.chosen_longer_share:.1%} of pairs ({lengths['ties']} ties); "
            f"a length-only model scores {self.length_only_accuracy:.1%} (ties count half)"
        )
        out = [head, bias, f"  {'':<10}{'min':>8}{'median':>8}{'p90':>8}{'max':>8}{'mean':>10}"]
        for part in ("prompt", "chosen", "rejected"):
            d = lengths[part]
            out.append(f"  {part:<10}{d['min']:>8}{d['median']:>8}{d['p90']:>8}{d['max']:>8}{d['mean']:>10.1f}")
        return out


def _short(where: str) -> str:
    """ "data/prefs.jsonl line 4" → "line 4": the table names rows, the source is the same for all."""
    return " ".join(where.rsplit(" ", 2)[-2:])


def _finding_line(name: str, finding: Finding, note: str = "") -> str:
    rows = ", ".join(map(_short, finding.examples)) + (", ..." if finding.count > len(finding.examples) else "")
    line = f"{name:<22}{finding.count:>7}{finding.share:>8.1%}  {rows}"
    return f"{line}  ({note})" if note else line


# --------------------------------------------------------------------------------------------------- warnings


def finding_warnings(rows: str, checks: list[tuple[Finding | None, str]]) -> list[str]:
    """A line per finding found: "<share> of <rows> (<count>) <says>, e.g. <first row>", which reads right for any
    count, 1 included; `says` may name the finding's fields ("{f.prompts} distinct"). A truncation's share is over
    the measured rows, and a few cut rows are normal: it warns above TRUNCATED_WARN_SHARE only. Pairs and unpaired
    examples both warn through here, so their warnings read alike."""
    out = []
    for finding, says in checks:
        measured, above = ("measured ", TRUNCATED_WARN_SHARE) if isinstance(finding, Truncation) else ("", 0.0)
        if finding is not None and finding.count and finding.share > above:
            out.append(
                f"{finding.share:.1%} of {measured}{rows} ({finding.count}) {says.format(f=finding)}, "
                f"e.g. {finding.examples[0]}"
            )
    return out


def length_bias_warning(score: float | None, says: str, **values: Any) -> list[str]:
    """The strong-length-bias line when `score` (0.5: length says nothing about the preference) is outside
    LENGTH_BIAS_WARN, else nothing; `says` may name {score} and `values`."""
    if score is None or LENGTH_BIAS_WARN[0] <= score <= LENGTH_BIAS_WARN[1]:
        return []
    side = "longer" if score > 0.5 else "shorter"
    return [f"strong length bias: {says.format(score=score, **values)}; the model may learn to prefer {side} answers"]


# ----------------------------------------------------------------------------------------------------- entry


def audit_pairs(
    pairs: list[PreferencePair],
    eval_pairs: list[PreferencePair] | None = None,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    features: Iterable[str] = (),
    refusal_detector: str | None = None,
    categories: Mapping[str, str] | None = None,
) -> AuditReport:
    """Check `pairs` (every row, identical ones included: see `formats.iter_pairs`). Pure: reads nothing.

    With a tokenizer, lengths are in tokens, and max_length / max_prompt_length give the `truncated` finding.
    features (`--feature` module:function specs), refusal_detector (`--refusal-detector`) and categories
    (`features.read_categories`: the rows' labels by `where`) shape the `features` part.
    """
    if tokenizer is None and (max_length is not None or max_prompt_length is not None):
        raise UserError("--max-length and --max-prompt-length count tokens: give --model or --tokenizer too")
    keys = [_key(pair) for pair in pairs]
    kinds = [_pair_encoding_kinds(pair) for pair in pairs]
    measured = [pair for pair, pair_kinds in zip(pairs, kinds) if _measurable(pair, pair_kinds)]
    lengths, truncation = measure(measured, tokenizer, max_length, max_prompt_length)
    chosen_longer, accuracy, ties = _length_bias(lengths)
    distributions = {
        part: _distribution([length[i] for length in lengths])
        for i, part in enumerate(("prompt", "chosen", "rejected"))
    }
    return AuditReport(
        rows=len(pairs),
        duplicates=_finding(_duplicates(pairs, keys), len(pairs)),
        identical_pairs=_finding([p.where for p in pairs if p.chosen == p.rejected], len(pairs)),
        empty_responses=_finding([p.where for p in pairs if _is_blank(p.chosen) or _is_blank(p.rejected)], len(pairs)),
        conflicting_pairs=_finding(_conflicts(pairs, keys), len(pairs)),
        eval_leakage=None if eval_pairs is None else _leakage(pairs, keys, eval_pairs),
        truncated=truncation,
        chosen_longer_share=chosen_longer,
        length_only_accuracy=accuracy,
        lengths={
            "unit": "characters" if tokenizer is None else "tokens",
            "pairs": len(measured),
            "excluded": len(pairs) - len(measured),
            "ties": ties,
            **distributions,
        },
        encoding=_encoding(pairs, kinds),
        features=preference_features(measured, features, refusal_detector, categories),
    )


def write_json(report: AuditReport, path: str) -> None:
    """`preftune audit --json`: `report.to_dict()` through `files.write_json`, into a folder created when missing."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--json {path}: cannot write ({e.strerror})") from None
    write_json_file(path, report.to_dict())

"""What the preferences reward besides quality (`preftune audit`): surface features of the responses, and refusal.

DPO learns whatever separates chosen from rejected. If the chosen response is, say, longer or more apologetic in
most pairs, "be longer" is a rule the model can learn instead of the preference itself. Per feature, over the
measured pairs (those training can use, as for the audit's lengths):

    chosen_more / chosen_less / ties   pairs whose chosen has more of the feature than its rejected, less, the same
    decided                            chosen_more + chosen_less: the pairs where the feature differs
    accuracy                           chosen_more / decided: the accuracy of the rule "the response with more of it
                                       is chosen" on the pairs it decides; 0.5 is chance
    ci_low, ci_high                    its Wilson 95% interval (`evaluation.stats.wilson_interval`)
    flagged                            "more" or "less" when the rule ("more" wins, or "less" wins) is a likely
                                       spurious preference: at least FLAG_MIN_DECIDED pairs decided and the whole
                                       interval beyond FLAG_ACCURACY (above 0.65, or below 0.35)

Features (a response's text; a conversation's assistant contents joined by a blank line):
    length             words (whitespace-separated): independent of any tokenizer, and of punctuation and spacing
    list_items         lines starting with -, *, +, • or "1." / "1)" and a space
    markdown           "#" heading lines + **bold** / __bold__ spans + table lines ("| a | b |")
    code_blocks        ``` or ~~~ fenced blocks (an unclosed fence counts) + indented blocks (4 spaces or a tab after
                       a blank line, list items aside)
    exclamations       "!" characters
    apologies          APOLOGIES phrases ("sorry", "I apologize", "my apologies", ...)
    refusal            1 when the refusal detector says the response refuses, else 0: the over-refusal probe's own
                       detector (`evaluation.refusal.is_refusal`, or `--refusal-detector module:function`); never
                       flagged: the refusal shares below judge it, knowing which prompts should be refused
    hedging            HEDGES phrases ("might", "perhaps", "I think", "it depends", ...)
    prompt_repetition  share of the prompt's distinct word 3-grams (lower-cased \\w+ words, per message) that reappear
                       in the response; 0 for a prompt under 3 words
    module:function    `--feature`: any function(text) → number (True/False count as 1/0)

Refusal in the data (same detector): per pair, whether the chosen refuses while the rejected complies (training
rewards refusing), the reverse, or both refuse; over all measured pairs, and per `label` of the rows when the data
carries the over-refusal probe's field (`label`: "safe" or "unsafe", `--columns label=COLUMN` to rename it; any
text value is a category). A group warns when "chosen refuses, rejected complies" exceeds REFUSAL_WARN_SHARE with
at least REFUSAL_WARN_MIN pairs (the group labelled "unsafe" aside: refusing there is the point); the "unsafe"
group warns the other way, when the chosen complies and the rejected refuses. With labels, "all" mixes prompts that
should be answered with prompts that should be refused: only the labelled groups (and "no label") are judged.

Thresholds, and why:
    FLAG_ACCURACY, whole interval   the range the audit's length-bias warning uses. The interval, not the estimate,
                                    must clear it: the feature alone predicts at least 65% of the pairs it decides,
                                    with 95% confidence. A feature without signal has its interval around 0.5, so
                                    checking ten features at once adds next to no false alarm.
    FLAG_MIN_DECIDED = 20           below, the interval is wide and the pairs weigh little in training; at 20 pairs,
                                    18 must agree (17 of 20: lower bound 0.640)
    REFUSAL_WARN_SHARE = 0.05       helpfulness data rarely prefers a refusal (well under 1% of pairs); from one pair
                                    in twenty, "open with a refusal" is rewarded often enough to be learned, and it
                                    spreads to prompts that look alike: over-refusal after training
    REFUSAL_WARN_MIN = 5            fewer is within what the heuristic detector miscounts ("I can't wait to ...")

e.g. chosen "Sure! Here:\\n- a\\n- b", rejected "I think it might be a." → list_items 2 vs 0, exclamations 1 vs 0,
     hedging 0 vs 2 ("I think", "might")
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from preftune.data.formats import PreferencePair, _rows_of, parse_columns, rejected_item
from preftune.errors import UserError
from preftune.evaluation.stats import wilson_interval

FLAG_ACCURACY = (0.35, 0.65)  # the audit's length-bias range: a rule outside it is a strong shortcut
FLAG_MIN_DECIDED = 20  # fewer decided pairs: too little evidence, and too little weight in training to matter
REFUSAL_WARN_SHARE = 0.05  # one pair in 20 teaching "refuse rather than answer"
REFUSAL_WARN_MIN = 5  # fewer is within the heuristic detector's false positives ("I can't wait to ...")
EXAMPLES = 3  # rows named per flagged feature or refusal group
NGRAM = 3  # prompt repetition: word n-grams of this length
NO_LABEL = "(no label)"

APOLOGIES = (r"sorry", r"apologi[sz](?:e|es|ed|ing)", r"apologies", r"forgive me", r"i regret")
HEDGES = (
    r"might",
    r"perhaps",
    r"possibly",
    r"probably",
    r"maybe",
    r"likely",
    r"arguably",
    r"i think",
    r"i believe",
    r"i guess",
    r"i suppose",
    r"i'm not sure",
    r"i am not sure",
    r"not certain",
    r"it depends",
    r"depending on",
    r"it seems",
    r"seems to",
    r"could be",
    r"may be",
    r"in my opinion",
)


def _phrases(phrases: Sequence[str]) -> re.Pattern:
    """Whole words, any case, any run of whitespace between words, ’ for '. The lookahead on the phrases' first
    letters lets most positions fail at once instead of trying every phrase (about 2x faster on English text)."""
    alternatives = (p.replace(" ", r"\s+").replace("'", "['’]") for p in phrases)
    heads = "".join(sorted({p[0] for p in phrases}))  # phrases start with a plain letter
    return re.compile(rf"\b(?=[{heads}])(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


_APOLOGY = _phrases(APOLOGIES)
_HEDGE = _phrases(HEDGES)
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d+[.)])[ \t]+\S", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*(?=\S)[^*\n]+?\*\*|__(?=\S)[^_\n]+?__")
_TABLE_LINE = re.compile(r"^[ \t]*\|.*\|[ \t]*$", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*(?:```|~~~)")
_WORD = re.compile(r"\w+")

# ---------------------------------------------------------------------------------------------------- features


def code_blocks(text: str) -> int:
    """Fenced blocks (an unclosed fence counts) + indented blocks: lines indented by 4 spaces or a tab, after a blank
    line or at the start, the first of them no list item (a nested list is not code); blank lines do not end one.

    e.g. "Run:\n\n    pip install x\n\n    x --help\n\nor\n```\nx\n```" → 2 (one indented, one fenced)
    """
    blocks, fenced, in_block, previous_blank = 0, False, False, True
    for line in text.splitlines():
        if _FENCE.match(line):
            blocks += not fenced  # an opening fence starts a block, a closing one ends it
            fenced, in_block, previous_blank = not fenced, False, False
            continue
        if fenced:
            continue
        blank = not line.strip()
        indented = not blank and line.startswith(("    ", "\t"))
        if indented and (in_block or (previous_blank and not _LIST_ITEM.match(line))):
            blocks += not in_block
            in_block = True
        elif not blank:
            in_block = False
        previous_blank = blank
    return blocks


def markdown(text: str) -> int:
    return len(_HEADING.findall(text)) + len(_BOLD.findall(text)) + len(_TABLE_LINE.findall(text))


def _ngrams(text: str) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + NGRAM]) for i in range(len(words) - NGRAM + 1)}


def prompt_repetition(response: str, prompt_grams: set[tuple[str, ...]]) -> float:
    """Share of the prompt's distinct word n-grams found in the response; 0.0 for a prompt without one.

    e.g. prompt "what is the capital of France", response "The capital of France is Paris": prompt 3-grams
    {what is the, is the capital, the capital of, capital of france}, of which 2 reappear → 0.5
    """
    return len(prompt_grams & _ngrams(response)) / len(prompt_grams) if prompt_grams else 0.0


BUILTIN: dict[str, Callable[[str], float]] = {
    "length": lambda t: len(t.split()),
    "list_items": lambda t: len(_LIST_ITEM.findall(t)),
    "markdown": markdown,
    "code_blocks": code_blocks,
    "exclamations": lambda t: t.count("!"),
    "apologies": lambda t: len(_APOLOGY.findall(t)),
    "hedging": lambda t: len(_HEDGE.findall(t)),
}
LABELS = {  # the table's names of the features
    "length": "length (words)",
    "list_items": "list items",
    "markdown": "markdown",
    "code_blocks": "code blocks",
    "exclamations": "exclamation marks",
    "apologies": "apologies",
    "refusal": "refusal",
    "hedging": "hedging",
    "prompt_repetition": "prompt repetition",
}


def response_text(value: str | list) -> str:
    """A response as text: itself, or its assistant contents joined by a blank line."""
    if isinstance(value, str):
        return value
    return "\n\n".join(m["content"] for m in value if m["role"] == "assistant")


def _prompt_grams(prompt: str | list) -> set[tuple[str, ...]]:
    """A conversation's n-grams message by message: none spans two messages."""
    texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt]
    return set().union(*map(_ngrams, texts))


# ----------------------------------------------------------------------------------------------------- loading


def load_feature(spec: str) -> Callable[[str], float]:
    """--feature module:function → a function whose value is checked to be a finite number (bools count 1/0)."""
    # Imported here: rewards.py loads torch at import, and the audit's report and model card read audit.json
    # through this package without it.
    from preftune.evaluation.rewards import import_function

    function = import_function(spec, "--feature")

    def feature(text: str) -> float:
        value = function(text)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise UserError(f"--feature {spec}: returned {value!r}, expected a finite number")
        return float(value)

    return feature


def _detector(spec: str | None) -> tuple[Callable[[str], bool], str]:
    from preftune.evaluation.refusal import load_detector  # torch, see load_feature

    return load_detector(spec)


def read_categories(source: str, columns: str | dict[str, str] | None = None) -> dict[str, str]:
    """The over-refusal probe's `label` of each pair row of `source` (`--columns label=X` renames it), keyed by the
    row's `where`; {} when no pair row has one. Unpaired rows (no chosen) are skipped: their label is no category.
    Values are kept as text: "safe", "unsafe", or any other category the data uses."""
    mapping = parse_columns(columns) if isinstance(columns, str) or columns is None else columns
    label, chosen = mapping.get("label") or "label", mapping.get("chosen") or "chosen"
    return {
        where: str(row[label]).strip()
        for row, where in _rows_of(source, "train")
        if chosen in row and row.get(label) is not None and str(row[label]).strip()
    }


# ------------------------------------------------------------------------------------------------------ tables


@dataclass
class FeatureRule:
    """How one feature separates chosen from rejected (see the module docstring for each field)."""

    name: str
    label: str
    pairs: int
    chosen_more: int
    chosen_less: int
    ties: int
    chosen_more_share: float
    chosen_less_share: float
    tie_share: float
    decided: int
    accuracy: float | None  # None: no pair decided
    ci_low: float | None
    ci_high: float | None
    flagged: str | None  # "more" / "less": that rule predicts the preference well beyond chance
    examples: list[str] = field(default_factory=list)  # first rows where the flagged rule (else "more") holds


@dataclass
class RefusalShares:
    """Pairs of one group by who refuses: the chosen only (rewards refusing), the rejected only, both."""

    pairs: int
    chosen_refuses: int
    rejected_refuses: int
    both_refuse: int
    chosen_refuses_share: float
    rejected_refuses_share: float
    both_refuse_share: float
    examples: list[str] = field(default_factory=list)  # first rows whose chosen refuses and rejected complies
    compliance_examples: list[str] = field(default_factory=list)  # ... whose chosen complies and rejected refuses


@dataclass
class PreferenceFeatures:
    """The features table and the refusal shares; `to_dict()` goes into audit.json as "features"."""

    pairs: int
    detector: str
    rules: dict[str, FeatureRule]
    refusal: RefusalShares
    refusal_by_label: dict[str, RefusalShares]  # {} when the rows carry no label

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreferenceFeatures:
        """The report again out of `to_dict()` (the model card rebuilds the audit's warnings from audit.json)."""
        return cls(
            pairs=d["pairs"],
            detector=d["detector"],
            rules={name: FeatureRule(**rule) for name, rule in d["rules"].items()},
            refusal=RefusalShares(**d["refusal"]),
            refusal_by_label={name: RefusalShares(**r) for name, r in d["refusal_by_label"].items()},
        )


def _share(count: int, total: int) -> float:
    return count / total if total else 0.0


def _flag(decided: int, low: float, high: float) -> str | None:
    if decided < FLAG_MIN_DECIDED:
        return None
    return "more" if low > FLAG_ACCURACY[1] else "less" if high < FLAG_ACCURACY[0] else None


def feature_rule(
    name: str, values: Sequence[tuple[float, float]], wheres: Sequence[str], flaggable: bool = True
) -> FeatureRule:
    """The rule of one feature from its (chosen, rejected) values per pair; never flagged unless `flaggable`.

    e.g. 40 pairs, chosen more in 36, less in 4 → accuracy 0.9, Wilson [0.769, 0.960], flagged "more"
    """
    more = [w for (c, r), w in zip(values, wheres) if c > r]
    less = [w for (c, r), w in zip(values, wheres) if c < r]
    n, decided = len(values), len(more) + len(less)
    low, high = wilson_interval(len(more), decided) if decided else (None, None)
    flagged = _flag(decided, low, high) if decided and flaggable else None
    return FeatureRule(
        name=name,
        label=LABELS.get(name, name),
        pairs=n,
        chosen_more=len(more),
        chosen_less=len(less),
        ties=n - decided,
        chosen_more_share=_share(len(more), n),
        chosen_less_share=_share(len(less), n),
        tie_share=_share(n - decided, n),
        decided=decided,
        accuracy=len(more) / decided if decided else None,
        ci_low=low,
        ci_high=high,
        flagged=flagged,
        examples=(less if flagged == "less" else more)[:EXAMPLES],
    )


def refusal_shares(refused: Sequence[tuple[float, float]], wheres: Sequence[str]) -> RefusalShares:
    """Who refuses, from the (chosen, rejected) refusal values (1 refuses, 0 complies) of a group's pairs."""
    chosen = [w for (c, r), w in zip(refused, wheres) if c and not r]
    rejected = [w for (c, r), w in zip(refused, wheres) if r and not c]
    both = sum(bool(c and r) for c, r in refused)
    n = len(refused)
    return RefusalShares(
        pairs=n,
        chosen_refuses=len(chosen),
        rejected_refuses=len(rejected),
        both_refuse=both,
        chosen_refuses_share=_share(len(chosen), n),
        rejected_refuses_share=_share(len(rejected), n),
        both_refuse_share=_share(both, n),
        examples=chosen[:EXAMPLES],
        compliance_examples=rejected[:EXAMPLES],
    )


def _by_label(
    refused: Sequence[tuple[float, float]], wheres: Sequence[str], categories: Mapping[str, str]
) -> dict[str, RefusalShares]:
    """Refusal shares per category of the pairs' source rows (a pair of a row's rejected list: that row's)."""
    if not categories:
        return {}
    groups: dict[str, list[int]] = {}
    for i, where in enumerate(wheres):
        groups.setdefault(categories.get(rejected_item(where)[0], NO_LABEL), []).append(i)
    return {
        name: refusal_shares([refused[i] for i in members], [wheres[i] for i in members])
        for name, members in groups.items()
    }


# ------------------------------------------------------------------------------------------------------- entry


def preference_features(
    pairs: Sequence[PreferencePair],
    features: Iterable[str] = (),
    refusal_detector: str | None = None,
    categories: Mapping[str, str] | None = None,
) -> PreferenceFeatures:
    """The features table and refusal shares of `pairs` (the audit's measured pairs).

    features: `--feature` module:function specs, added after the built-in features; refusal_detector: the
    `--refusal-detector` spec (None: the default detector); categories: `read_categories` of the source.
    """
    detector, detector_name = _detector(refusal_detector)
    extra = {spec: load_feature(spec) for spec in dict.fromkeys(features)}  # a spec given twice is one feature
    of_text = {**BUILTIN, "refusal": lambda t: float(detector(t)), **extra}
    wheres = [pair.where for pair in pairs]
    values: dict[str, list[tuple[float, float]]] = {name: [] for name in [*LABELS, *extra]}
    for pair in pairs:
        chosen, rejected = response_text(pair.chosen), response_text(pair.rejected)
        for name, function in of_text.items():
            values[name].append((function(chosen), function(rejected)))
        grams = _prompt_grams(pair.prompt)
        values["prompt_repetition"].append((prompt_repetition(chosen, grams), prompt_repetition(rejected, grams)))
    return PreferenceFeatures(
        pairs=len(pairs),
        detector=detector_name,
        # Refusal is judged by its own shares, which know the labels: preferring refusals on unsafe prompts is right.
        rules={name: feature_rule(name, v, wheres, flaggable=name != "refusal") for name, v in values.items()},
        refusal=refusal_shares(values["refusal"], wheres),
        refusal_by_label=_by_label(values["refusal"], wheres, categories or {}),
    )


# ------------------------------------------------------------------------------------------------------ output


def _short(where: str) -> str:
    """ "data/prefs.jsonl line 4" → "line 4", as the audit's table names rows."""
    return " ".join(where.rsplit(" ", 2)[-2:])


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _rule_line(rule: FeatureRule, width: int) -> str:
    interval = "-" if rule.ci_low is None else f"[{rule.ci_low:.1%}, {rule.ci_high:.1%}]"
    line = (
        f"  {rule.label:<{width}}{rule.chosen_more_share:>8.1%}{rule.chosen_less_share:>8.1%}{rule.tie_share:>8.1%}"
        f"{rule.decided:>9}{_percent(rule.accuracy):>11}  {interval:<16}"
    )
    if rule.flagged:
        line += f"  flagged ({rule.flagged} wins): " + ", ".join(map(_short, rule.examples))
    return line.rstrip()


def _refusal_line(name: str, shares: RefusalShares, warned: list[str]) -> str:
    counts = (
        (shares.chosen_refuses, shares.chosen_refuses_share),
        (shares.rejected_refuses, shares.rejected_refuses_share),
        (shares.both_refuse, shares.both_refuse_share),
    )
    line = f"  {name:<20}{shares.pairs:>7}" + "".join(f"{f'{n} ({share:.1%})':>16}" for n, share in counts)
    return f"{line}  flagged: {', '.join(map(_short, warned))}" if warned else line


def feature_lines(report: PreferenceFeatures) -> list[str]:
    """The features table, then the refusal shares (all pairs, then per label)."""
    width = max(20, *(len(rule.label) + 2 for rule in report.rules.values()))
    out = [
        f"what the preferences reward ({report.pairs} measured pairs)",
        "  more / less / ties: pairs whose chosen has more of the feature than its rejected, less, as much;",
        "  more wins: how often the response with more of it is the chosen one, over the pairs where they differ",
        f"  {'feature':<{width}}{'more':>8}{'less':>8}{'ties':>8}{'decided':>9}{'more wins':>11}  95% CI",
    ]
    out += [_rule_line(rule, width) for rule in report.rules.values()]
    warned = {group: rows for group, _, _, rows in _refusal_flags(report)}
    out += [
        f"refusal in the data (detector: {report.detector})",
        "  chosen only: the chosen response refuses and the rejected one complies; rejected only: the reverse",
        f"  {'':<20}{'pairs':>7}{'chosen only':>16}{'rejected only':>16}{'both refuse':>16}",
    ]
    out += [_refusal_line(group, shares, warned.get(group, [])) for group, shares in _groups(report)]
    return out


def _groups(report: PreferenceFeatures) -> list[tuple[str, RefusalShares]]:
    """("all", every pair's shares), then per label: ("label safe", ...), ("no label", ...)."""
    labelled = [("no label" if name == NO_LABEL else f"label {name}", s) for name, s in report.refusal_by_label.items()]
    return [("all", report.refusal), *labelled]


def _refusal_flags(report: PreferenceFeatures) -> list[tuple[str, RefusalShares, str, list[str]]]:
    """(group, shares, what its pairs teach, first rows) of each group above the refusal thresholds.

    Pairs teach "over_refusal" when the chosen refuses and the rejected complies, except in the group labelled
    "unsafe", where refusing is right and the reverse teaches "unsafe_compliance". With labels, "all" mixes both
    kinds of prompt: only the labelled groups are judged."""
    flags = []
    for group, shares in _groups(report)[1:] if report.refusal_by_label else _groups(report):
        unsafe = group == "label unsafe"
        count, share, rows = (
            (shares.rejected_refuses, shares.rejected_refuses_share, shares.compliance_examples)
            if unsafe
            else (shares.chosen_refuses, shares.chosen_refuses_share, shares.examples)
        )
        if count >= REFUSAL_WARN_MIN and share > REFUSAL_WARN_SHARE:
            flags.append((group, shares, "unsafe_compliance" if unsafe else "over_refusal", rows))
    return flags


def _rule_warning(rule: FeatureRule) -> str:
    """The flagged rule in words, with its own accuracy and interval ("less wins" is 1 − the "more" rule's)."""
    if rule.flagged == "more":
        side, wins, low, high, learns = "more", rule.chosen_more, rule.ci_low, rule.ci_high, "produce more of it"
    else:
        side, wins, low, high, learns = "less", rule.chosen_less, 1 - rule.ci_high, 1 - rule.ci_low, "avoid it"
    return (
        f"likely spurious preference: {rule.label}: the response with {side} of it is chosen in "
        f"{wins / rule.decided:.1%} of the {rule.decided} pairs where it differs (95% CI {low:.1%}-{high:.1%}); "
        f"the model may learn to {learns}, e.g. {rule.examples[0]}"
    )


def feature_warnings(report: PreferenceFeatures, skip: Iterable[str] = ()) -> list[str]:
    """One line per flagged feature but those in `skip` (said by another warning), and per refusal group above the
    thresholds."""
    out = [_rule_warning(rule) for name, rule in report.rules.items() if rule.flagged and name not in skip]
    for group, shares, kind, rows in _refusal_flags(report):
        scope = "pairs" if group == "all" else f"pairs with {group}"
        if kind == "over_refusal":
            out.append(
                f"{shares.chosen_refuses_share:.1%} of {scope} ({shares.chosen_refuses}) choose a refusal over a "
                f"compliant answer (detector: {report.detector}): training rewards refusing, expect more "
                f"over-refusal (measure it with preftune eval --refusal-prompts), e.g. {rows[0]}"
            )
        else:
            out.append(
                f"{shares.rejected_refuses_share:.1%} of {scope} ({shares.rejected_refuses}) choose a compliant "
                f"answer over a refusal (detector: {report.detector}): training rewards answering unsafe prompts, "
                f"e.g. {rows[0]}"
            )
    return out

"""PreferencePair → token ids (prompt / chosen / rejected), with an explicit truncation policy.

Tokenization follows TRL 1.16's `DPOTrainer._prepare_dataset`, so the same data gives the same ids:

    plain text      chosen/rejected get the EOS string appended unless they already end with it;
                    prompt_ids = tok(prompt), full = tok(prompt + chosen) (special tokens added, e.g. a BOS)
    conversational  prompt_ids = apply_chat_template(prompt, add_generation_prompt=True),
                    full = apply_chat_template(prompt + chosen); no EOS or BOS added (the template has them)
    both            P = min(common prefix of prompt_ids with full_chosen, ... with full_rejected);
                    prompt_ids = prompt_ids[:P], chosen_ids = full_chosen[P:], rejected_ids = full_rejected[P:]
The common-prefix rule matters when the prompt's last tokens merge with the response's first (or a template
renders a prompt alone differently): the response then starts where the token sequences diverge, and
`TruncationReport.boundaries_shifted` counts such pairs.

Example with the tests' tiny word-level tokenizer (tests/conftest.py: <s>=1, </s>=2, <|user|>=4,
<|assistant|>=5, ":"=7, Q=12, A=13, hi=16, there=17, good=18, bad=19):
    PreferencePair(prompt="Q: hi there\\nA: ", chosen="good", rejected="bad")
        → prompt_ids [1, 12, 7, 16, 17, 13, 7], chosen_ids [18, 2], rejected_ids [19, 2]
    PreferencePair(prompt=[user "hi"], chosen=[assistant "good"], rejected=[assistant "bad"])
        rendered "<s><|user|> hi</s><|assistant|> good</s>"
        → prompt_ids [1, 4, 16, 2, 5], chosen_ids [18, 2], rejected_ids [19, 2]

Truncation (`truncate`), with P, C, R the prompt, chosen and rejected lengths:
    1. max_prompt_length set and P > max_prompt_length: cut the prompt from the LEFT to max_prompt_length
       (its end, next to the response, is kept).
    2. max_length set and P + max(C, R) > max_length: cut the prompt from the left just enough to fit, but keep
       at least min(P, max_length // 2) prompt tokens; then cut each response from the RIGHT to
       max_length - P (a cut response loses its EOS).
    e.g. P=6, C=5, R=2, max_length=8: the prompt keeps max(8 - 5, min(6, 4)) = 4 tokens (its last 4),
    chosen keeps its first 8 - 4 = 4 tokens, rejected (2) is untouched.
`tokenize_pairs(on_overlength="truncate")` applies these rules and counts the cuts; "drop" drops every pair that
would need a cut and counts it. Nothing is cut or dropped without being counted in `TruncationReport`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from preftune.data.formats import PreferencePair, common_prefix_length
from preftune.errors import UserError

ON_OVERLENGTH = ("truncate", "drop")


@dataclass
class TokenizedPair:
    """Token ids of one pair; prompt_ids then chosen_ids (or rejected_ids) is the full sequence."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    where: str
    label: bool | None = None  # an unpaired example (data/unpaired.py): True desirable; None for a pair


@dataclass
class TruncationReport:
    """What `tokenize_pairs` did to lengths. Counts are pairs; the maxima are measured before truncation."""

    pairs: int = 0  # pairs returned
    prompts_truncated: int = 0  # pairs whose prompt was cut from the left
    responses_truncated: int = 0  # pairs in which chosen and/or rejected was cut from the right
    dropped: int = 0  # pairs dropped as over length (on_overlength="drop")
    max_prompt_tokens: int = 0
    max_response_tokens: int = 0  # max over pairs of max(len(chosen), len(rejected))
    boundaries_shifted: int = 0  # pairs whose prompt tokens merged into the response (common-prefix rule)
    unit: str = "pairs"  # what is counted, for `summary` ("examples" for unpaired data)

    def summary(self) -> str:
        """One line, e.g. "2616 pairs; 12 prompts cut from the left, 3 responses cut, 0 dropped; longest prompt
        700 tokens, longest response 300 tokens"."""
        line = (
            f"{self.pairs} {self.unit}; {self.prompts_truncated} prompts cut from the left, "
            f"{self.responses_truncated} responses cut, {self.dropped} dropped; longest prompt "
            f"{self.max_prompt_tokens} tokens, longest response {self.max_response_tokens} tokens"
        )
        if self.boundaries_shifted:
            line += f"; {self.boundaries_shifted} prompt/response boundaries moved by merged tokens"
        return line


# ---------------------------------------------------------------------------------------------- tokenization


def _text_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list, where: str, **kwargs: Any) -> list[int]:
    from jinja2.exceptions import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as e:  # templates raise on conversations they refuse, e.g. roles not alternating
        raise UserError(f"{where}: the tokenizer's chat template refused this conversation ({e})") from None
    # transformers 5 returns a BatchEncoding here; take its ids whatever the container.
    return list(encoded["input_ids"])


def _full_sequences(pair: PreferencePair, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, prompt+chosen ids, prompt+rejected ids), each tokenized on its own as TRL does. An unpaired
    example (data/unpaired.py: rejected is chosen) is tokenized once."""
    responses = [pair.chosen] if pair.rejected is pair.chosen else [pair.chosen, pair.rejected]
    if isinstance(pair.chosen, list):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{pair.where}: the pair is a conversation (lists of messages) but the tokenizer has no "
                f"chat template; use a tokenizer with a chat_template, or plain-text data"
            )
        prompt_ids = _chat_ids(tokenizer, pair.prompt, pair.where, add_generation_prompt=True)
        fulls = [_chat_ids(tokenizer, pair.prompt + response, pair.where) for response in responses]
        return prompt_ids, fulls[0], fulls[-1]
    eos = tokenizer.eos_token
    if not eos:
        raise UserError(f"{pair.where}: the tokenizer has no eos_token; plain-text responses need one to end them")
    fulls = [
        _text_ids(tokenizer, pair.prompt + (response if response.endswith(eos) else response + eos))
        for response in responses
    ]
    return _text_ids(tokenizer, pair.prompt), fulls[0], fulls[-1]


def _tokenize_pair(pair: PreferencePair, tokenizer: Any) -> tuple[TokenizedPair, bool]:
    """(tokenized pair, whether the prompt/response boundary moved into the tokenized prompt)."""
    prompt_ids, full_chosen, full_rejected = _full_sequences(pair, tokenizer)
    prompt_len = min(common_prefix_length(prompt_ids, full_chosen), common_prefix_length(prompt_ids, full_rejected))
    tp = TokenizedPair(
        prompt_ids=prompt_ids[:prompt_len],
        chosen_ids=full_chosen[prompt_len:],
        rejected_ids=full_rejected[prompt_len:],
        where=pair.where,
        label=pair.label,
    )
    if not tp.prompt_ids:
        # The first token of a sequence is predicted by nothing, so the response needs at least one token before it.
        raise UserError(
            f"{pair.where}: the prompt is empty after tokenization; the first response token would "
            f"have nothing to be predicted from (give a prompt, or a tokenizer that adds a BOS token)"
        )
    for name in ("chosen_ids", "rejected_ids"):
        if not getattr(tp, name):
            raise UserError(f"{pair.where}: {name} is empty after tokenization")
    return tp, prompt_len < len(prompt_ids)


def tokenize_pair(pair: PreferencePair, tokenizer: Any) -> TokenizedPair:
    """One pair → ids, no truncation (see the module docstring for the convention and an example)."""
    return _tokenize_pair(pair, tokenizer)[0]


# ---------------------------------------------------------------------------------------------- truncation


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    if max_length is not None and max_length < 2:
        raise UserError(f"--max-length must be at least 2 (one prompt and one response token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise UserError(f"--max-prompt-length must be at least 1, got {max_prompt_length}")


def _prompt_keep(tp: TokenizedPair, max_length: int | None, max_prompt_length: int | None) -> int:
    """How many prompt tokens (from the end) rules 1 and 2 keep."""
    keep = len(tp.prompt_ids)
    if max_prompt_length is not None:
        keep = min(keep, max_prompt_length)
    longest = max(len(tp.chosen_ids), len(tp.rejected_ids))
    if max_length is not None and keep + longest > max_length:
        keep = max(max_length - longest, min(keep, max_length // 2))
    return keep


def truncate(
    tp: TokenizedPair, *, max_length: int | None, max_prompt_length: int | None
) -> tuple[TokenizedPair, bool, bool]:
    """Apply the truncation rules of the module docstring → (result, prompt_cut, response_cut).

    e.g. prompt_ids [1..6], chosen_ids [7..11], rejected_ids [12, 13], max_length=8, max_prompt_length=None
         → prompt_ids [3, 4, 5, 6], chosen_ids [7, 8, 9, 10], rejected_ids [12, 13], True, True
    """
    _check_lengths(max_length, max_prompt_length)
    keep = _prompt_keep(tp, max_length, max_prompt_length)
    prompt_ids = tp.prompt_ids[len(tp.prompt_ids) - keep :]
    room = None if max_length is None else max_length - keep
    chosen_ids, rejected_ids = tp.chosen_ids[:room], tp.rejected_ids[:room]
    response_cut = len(chosen_ids) < len(tp.chosen_ids) or len(rejected_ids) < len(tp.rejected_ids)
    result = TokenizedPair(
        prompt_ids=prompt_ids, chosen_ids=chosen_ids, rejected_ids=rejected_ids, where=tp.where, label=tp.label
    )
    return result, keep < len(tp.prompt_ids), response_cut


def tokenize_pairs(
    pairs: Iterable[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_overlength: str = "truncate",
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize every pair, then truncate ("truncate") or drop ("drop") the over-length ones, counting each."""
    report = TruncationReport()
    out = list(
        iter_tokenized(
            pairs,
            tokenizer,
            report,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            on_overlength=on_overlength,
        )
    )
    return out, report


def iter_tokenized(
    pairs: Iterable[PreferencePair],
    tokenizer: Any,
    report: TruncationReport,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_overlength: str = "truncate",
) -> Iterator[TokenizedPair]:
    """`tokenize_pairs` one pair at a time, counted into `report` as they go (final once exhausted). The options
    are checked at the call, before any pair is read."""
    if on_overlength not in ON_OVERLENGTH:
        raise UserError(f"--on-overlength must be one of {', '.join(ON_OVERLENGTH)}, got '{on_overlength}'")
    _check_lengths(max_length, max_prompt_length)
    return _tokenized(pairs, tokenizer, report, max_length, max_prompt_length, on_overlength)


def _tokenized(
    pairs, tokenizer, report: TruncationReport, max_length, max_prompt_length, on_overlength
) -> Iterator[TokenizedPair]:
    for pair in pairs:
        tp, shifted = _tokenize_pair(pair, tokenizer)
        report.boundaries_shifted += shifted
        report.max_prompt_tokens = max(report.max_prompt_tokens, len(tp.prompt_ids))
        report.max_response_tokens = max(report.max_response_tokens, len(tp.chosen_ids), len(tp.rejected_ids))
        cut, prompt_cut, response_cut = truncate(tp, max_length=max_length, max_prompt_length=max_prompt_length)
        if on_overlength == "drop" and (prompt_cut or response_cut):
            report.dropped += 1
            continue
        report.prompts_truncated += prompt_cut
        report.responses_truncated += response_cut
        report.pairs += 1
        yield cut

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

Batches (`batch_size`, default BATCH_PAIRS): one pair at a time costs three tokenizer calls, each with its Python
overhead, and tokenizes every prompt three times (alone, then inside each full sequence). So `iter_tokenized` reads up
to `batch_size` pairs (and about BATCH_CHARS characters, so that --stream holds one batch's ids), renders chat
templates per pair as strings, tokenizes the batch's distinct texts in one call per kind (plain text as
`tokenizer(text)` does, special tokens added; rendered chats as `apply_chat_template` does, none added), then splits
each pair as above. A text met twice in a batch (a prompt with several pairs, a row with a list of rejected
responses) is tokenized once, and a fast tokenizer spreads one call over its Rust threads (TOKENIZERS_PARALLELISM).
The common-prefix rule needs each full sequence's ids as the tokenizer makes them, but where data/cuts.py proves a
prompt's text can be cut at b without changing any id (GPT-2's, Llama 3's and Qwen 2's byte-level splits), the
prompt is tokenized as prompt[:b] and prompt[b:], and each full sequence as the same prompt[:b] and its own text[b:]:
the long prompt of real data is tokenized once, not again inside each prompt + response.
Same ids, reports and errors, in the same order, as one pair at a time (`batch_size=None`), which stays the path for
what one call on a list could tokenize differently (`_batchable`): tokenizers that are not transformers' fast ones,
classes that override its encoding methods, BPE dropout. A batch whose tokenizer call raises is redone pair by pair,
so an error names the same row with the same message.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from preftune.data.cuts import Cutter, cutter
from preftune.data.formats import PreferencePair, common_prefix_length
from preftune.errors import UserError

ON_OVERLENGTH = ("truncate", "drop")
BATCH_PAIRS = 512  # pairs per batch of tokenizer calls (see the module docstring)
BATCH_CHARS = 1_000_000  # and at most this many characters of pair text: a batch's ids stay a few tens of MiB
# What a tokenizer class must take from transformers unchanged for one call on a list to equal one call per text.
_ENCODING_METHODS = (
    "__call__",
    "_call_one",
    "encode_plus",
    "batch_encode_plus",
    "_encode_plus",
    "_batch_encode_plus",
    "_convert_encoding",
    "apply_chat_template",
)


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


def _refused(where: str, e: Exception) -> UserError:
    return UserError(f"{where}: the tokenizer's chat template refused this conversation ({e})")


def _chat_ids(tokenizer: Any, messages: list, where: str, **kwargs: Any) -> list[int]:
    from jinja2.exceptions import TemplateError

    try:
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    except TemplateError as e:  # templates raise on conversations they refuse, e.g. roles not alternating
        raise _refused(where, e) from None
    # transformers 5 returns a BatchEncoding here; take its ids whatever the container.
    return list(encoded["input_ids"])


def _chat_text(tokenizer: Any, messages: list, where: str, **kwargs: Any) -> str:
    """`_chat_ids` before its tokenizer call: the rendered template, refused with the same error."""
    from jinja2.exceptions import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except TemplateError as e:
        raise _refused(where, e) from None


def _responses(pair: PreferencePair) -> list:
    """The responses to tokenize: an unpaired example (data/unpaired.py: rejected is chosen) has one."""
    return [pair.chosen] if pair.rejected is pair.chosen else [pair.chosen, pair.rejected]


def _check_template(pair: PreferencePair, tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{pair.where}: the pair is a conversation (lists of messages) but the tokenizer has no "
            f"chat template; use a tokenizer with a chat_template, or plain-text data"
        )


def _eos(pair: PreferencePair, tokenizer: Any) -> str:
    eos = tokenizer.eos_token
    if not eos:
        raise UserError(f"{pair.where}: the tokenizer has no eos_token; plain-text responses need one to end them")
    return eos


def _ended(response: str, eos: str) -> str:
    return response if response.endswith(eos) else response + eos


def _full_sequences(pair: PreferencePair, tokenizer: Any) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, prompt+chosen ids, prompt+rejected ids), each tokenized on its own as TRL does. An unpaired
    example (data/unpaired.py: rejected is chosen) is tokenized once."""
    responses = _responses(pair)
    if isinstance(pair.chosen, list):
        _check_template(pair, tokenizer)
        prompt_ids = _chat_ids(tokenizer, pair.prompt, pair.where, add_generation_prompt=True)
        fulls = [_chat_ids(tokenizer, pair.prompt + response, pair.where) for response in responses]
        return prompt_ids, fulls[0], fulls[-1]
    eos = _eos(pair, tokenizer)
    fulls = [_text_ids(tokenizer, pair.prompt + _ended(response, eos)) for response in responses]
    return _text_ids(tokenizer, pair.prompt), fulls[0], fulls[-1]


def _shared_prefix(prompt_ids: list[int], full: list[int]) -> int:
    """`common_prefix_length(prompt_ids, full)`, compared at C speed in the usual case of the whole prompt."""
    n = len(prompt_ids)
    return n if full[:n] == prompt_ids else common_prefix_length(prompt_ids, full)


def _split(
    pair: PreferencePair, prompt_ids: list[int], full_chosen: list[int], full_rejected: list[int]
) -> tuple[TokenizedPair, bool]:
    """The common-prefix rule → (tokenized pair, whether the prompt/response boundary moved into the prompt)."""
    prompt_len = min(_shared_prefix(prompt_ids, full_chosen), _shared_prefix(prompt_ids, full_rejected))
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


def _tokenize_pair(pair: PreferencePair, tokenizer: Any) -> tuple[TokenizedPair, bool]:
    """(tokenized pair, whether the prompt/response boundary moved into the tokenized prompt)."""
    return _split(pair, *_full_sequences(pair, tokenizer))


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


# ---------------------------------------------------------------------------------------------- batches


def _batchable(tokenizer: Any) -> bool:
    """Whether one call on a list of texts gives exactly the ids of one call per text. True for transformers' fast
    tokenizers, whose single text goes through the same Rust `encode_batch` as a list, unless the class overrides an
    encoding method (e.g. CodeLlama treats a lone string holding its fill token apart) or the BPE model drops merges
    at random (dropout: no two calls agree). Anything else is tokenized pair by pair."""
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast) or not getattr(tokenizer, "is_fast", False):
        return False
    cls = type(tokenizer)
    if any(getattr(cls, name, None) is not getattr(PreTrainedTokenizerFast, name, None) for name in _ENCODING_METHODS):
        return False
    return not getattr(tokenizer.backend_tokenizer.model, "dropout", None)


def _chars(field: Any) -> int:
    return len(field) if isinstance(field, str) else len(str(field))


def _batches(pairs: Iterable[PreferencePair], size: int) -> Iterator[tuple[list[PreferencePair], Exception | None]]:
    """Consecutive pairs, `size` at most and about BATCH_CHARS characters, each with None, except that an error
    raised by reading the next pair comes with the pairs read before it (the last batch): their own errors, if any,
    come first, as when each pair was tokenized before the next was read."""
    batch: list[PreferencePair] = []
    chars = 0
    source = iter(pairs)
    while True:
        try:
            pair = next(source, None)
        except Exception as e:
            yield batch, e
            return
        if pair is None:
            break
        batch.append(pair)
        chars += _chars(pair.prompt) + sum(_chars(r) for r in _responses(pair))
        if len(batch) >= size or chars >= BATCH_CHARS:
            yield batch, None
            batch, chars = [], 0
    if batch:
        yield batch, None


class _Texts(NamedTuple):
    """What `_full_sequences` tokenizes, as text: the prompt, then prompt + each response."""

    chat: bool  # rendered chat templates (tokenized without adding special tokens)
    texts: list[str]


def _pair_texts(pair: PreferencePair, tokenizer: Any) -> _Texts:
    """The texts of `pair`, with `_full_sequences`' errors (no template, a refused conversation, no EOS)."""
    responses = _responses(pair)
    if isinstance(pair.chosen, list):
        _check_template(pair, tokenizer)
        prompt = _chat_text(tokenizer, pair.prompt, pair.where, add_generation_prompt=True)
        return _Texts(True, [prompt] + [_chat_text(tokenizer, pair.prompt + r, pair.where) for r in responses])
    eos = _eos(pair, tokenizer)
    return _Texts(False, [pair.prompt] + [pair.prompt + _ended(response, eos) for response in responses])


def _encode(tokenizer: Any, texts: list[str], chat: bool) -> list[list[int]]:
    """One call for many texts, with the arguments of today's one-text calls: `tokenizer(text)` for plain text, and
    for rendered chats those `apply_chat_template(tokenize=True)` passes (no special tokens added: the template
    writes them)."""
    if chat:
        encoded = tokenizer(
            texts, padding=False, truncation=False, max_length=None, add_special_tokens=False, return_tensors=None
        )
    else:
        encoded = tokenizer(texts)
    return [list(ids) for ids in encoded["input_ids"]]


def _one_batch(batch: list[PreferencePair], tokenizer: Any, cut: Cutter | None) -> Iterator[tuple[TokenizedPair, bool]]:
    """`_tokenize_pair` of each pair of `batch`, in order, each distinct text tokenized once (its prompt part once for
    all the texts that share it, where `cut` allows). A pair whose texts could not be made raises its error when its
    turn comes; a tokenizer call that raises sends the batch pair by pair, where the same error comes from the same
    pair."""
    plans: list[_Texts | Exception] = []
    for pair in batch:
        try:
            plans.append(_pair_texts(pair, tokenizer))
        except Exception as e:
            plans.append(e)
    made = [plan for plan in plans if not isinstance(plan, Exception)]
    try:
        ids = {chat: _encode_plans(tokenizer, [p for p in made if p.chat == chat], chat, cut) for chat in (False, True)}
    except Exception:
        yield from (_tokenize_pair(pair, tokenizer) for pair in batch)
        return
    for pair, plan in zip(batch, plans):
        if isinstance(plan, Exception):
            raise plan
        prompt_ids, *fulls = (ids[plan.chat][text] for text in plan.texts)
        yield _split(pair, prompt_ids, fulls[0], fulls[-1])


def _encode_plans(tokenizer: Any, plans: list[_Texts], chat: bool, cut: Cutter | None) -> dict[str, list[int]]:
    """text → ids for every text of `plans`, each distinct text (or part of one) tokenized once. With a Cutter, a
    prompt is tokenized as prompt[:b] and prompt[b:], and each text that begins as the prompt does as the same
    prompt[:b] and its own text[b:] (data/cuts.py proves the ids equal those of the whole)."""
    texts = list(dict.fromkeys(text for plan in plans for text in plan.texts))
    if not texts:
        return {}
    specials = None if cut is None else ([], []) if chat else cut.specials
    if specials is None:  # no cut, or special tokens that are not a fixed prefix and suffix: whole texts
        return dict(zip(texts, _encode(tokenizer, texts, chat)))
    at = {}  # text → where it is cut
    for plan in plans:
        prompt = plan.texts[0]
        b = at[prompt] if prompt in at else cut.cut(prompt)
        if b:
            guard = prompt[: cut.guard(b)]
            at.update({text: b for text in plan.texts if text.startswith(guard)})
    parts = dict.fromkeys(part for text in texts for part in _parts(text, at.get(text, 0)))
    part_ids = dict(zip(parts, _encode(tokenizer, list(parts), chat=True)))  # no special tokens: added below
    before, after = specials
    return {
        text: before + [i for part in _parts(text, at.get(text, 0)) for i in part_ids[part]] + after for text in texts
    }


def _parts(text: str, b: int) -> tuple[str, ...]:
    return (text[:b], text[b:]) if b else (text,)


def _pair_ids(
    pairs: Iterable[PreferencePair], tokenizer: Any, batch_size: int | None
) -> Iterator[tuple[TokenizedPair, bool]]:
    """`_tokenize_pair` of each pair, in order: by batches when `_batchable`, else one pair at a time."""
    if batch_size is None or not _batchable(tokenizer):
        yield from (_tokenize_pair(pair, tokenizer) for pair in pairs)
        return
    cut = cutter(tokenizer)
    for batch, error in _batches(pairs, batch_size):
        yield from _one_batch(batch, tokenizer, cut)
        if error is not None:
            raise error


# ---------------------------------------------------------------------------------------------- the pairs


def tokenize_pairs(
    pairs: Iterable[PreferencePair],
    tokenizer: Any,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_overlength: str = "truncate",
    batch_size: int | None = BATCH_PAIRS,
) -> tuple[list[TokenizedPair], TruncationReport]:
    """Tokenize every pair, then truncate ("truncate") or drop ("drop") the over-length ones, counting each.
    `batch_size`: pairs per batch of tokenizer calls; None, one pair at a time (the same result, slower)."""
    report = TruncationReport()
    out = list(
        iter_tokenized(
            pairs,
            tokenizer,
            report,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            on_overlength=on_overlength,
            batch_size=batch_size,
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
    batch_size: int | None = BATCH_PAIRS,
) -> Iterator[TokenizedPair]:
    """`tokenize_pairs` one pair at a time, counted into `report` as they go (final once exhausted); pairs are read
    and tokenized `batch_size` at a time (see the module docstring). The options are checked at the call, before
    any pair is read."""
    if on_overlength not in ON_OVERLENGTH:
        raise UserError(f"--on-overlength must be one of {', '.join(ON_OVERLENGTH)}, got '{on_overlength}'")
    _check_lengths(max_length, max_prompt_length)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 or None, got {batch_size}")
    return _tokenized(_pair_ids(pairs, tokenizer, batch_size), report, max_length, max_prompt_length, on_overlength)


def _tokenized(
    split_pairs: Iterator[tuple[TokenizedPair, bool]],
    report: TruncationReport,
    max_length,
    max_prompt_length,
    on_overlength,
) -> Iterator[TokenizedPair]:
    for tp, shifted in split_pairs:
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

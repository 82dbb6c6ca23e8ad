"""`preftune audit --show N`: the first N pairs as the model will see them, token by token, with the classic
chat-template and BOS/EOS mistakes flagged.

These mistakes are the most common DPO bug in the issue trackers of DPO trainers, and nothing fails when they happen: the
loss trains happily on a doubled BOS or a template rendered twice. Reading the tokens is the only way to see them.
Pairs are tokenized exactly as training does (`tokenize.tokenize_pair`, then `tokenize.truncate` with the given
limits). Each pair prints its row, one line per segment (PROMPT, CHOSEN, REJECTED; for unpaired examples DESIRABLE
or UNDESIRABLE) with its token count, the truncation applied, and the mistakes found:

    doubled BOS                  the sequence starts with BOS twice (e.g. a prompt pre-rendered with a template that
                                 writes BOS, then tokenized with the BOS the tokenizer adds)
    missing EOS                  a response (before truncation) does not end with the tokenizer's EOS token (e.g. a
                                 chat template that ends turns with another token): the model never learns to stop
    template applied twice       message text holding the template's own markup (special tokens, its opening or its
                                 generation prompt); for plain text, a prompt starting with the template's opening
                                 twice, or the generation prompt twice in a row
    response repeats the prompt  a response starting with the prompt's text (a conversation's: its last message's)

Tokens are decoded one by one in the context of the tokens before them (so a leading space the decoder adds shows),
special tokens as ⟨their text⟩, spaces as ·, newlines as ↵, tabs as ⇥, ✂ where truncation cut, one space between
tokens. With the tests' tiny word-level tokenizer (tests/conftest.py; its decoder puts a space between words, and
its pre-tokenizer drops the newline), PreferencePair("Q: hi there\\nA: ", "good", "bad", "d.jsonl line 1") shows as

    pair 1: d.jsonl line 1
      PROMPT        7 │ ⟨<s>⟩ ·Q ·: ·hi ·there ·A ·:
      CHOSEN        2 │ ·good ⟨</s>⟩
      REJECTED      2 │ ·bad ⟨</s>⟩
      truncation: none (no --max-length or --max-prompt-length)
      mistakes: none found

For plain text preftune appends the EOS text itself (tokenize.py), so a missing EOS comes from a chat template that
ends a turn with another token (e.g. a base model's tokenizer, EOS <|end_of_text|>, with an instruct template ending
turns with <|eot_id|>), or from an EOS text the tokenizer does not read as the EOS token. A response that truncation
cut loses its EOS by design: that is shown (✂) and not flagged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from preftune.data.formats import PreferencePair
from preftune.data.tokenize import TokenizedPair, tokenize_pair, truncate
from preftune.errors import UserError

MISTAKES = ("doubled BOS", "missing EOS", "template applied twice", "response repeats the prompt")
LEGEND = (
    "token by token: ⟨…⟩ special token, · space, ↵ newline, ⇥ tab, ✂ where truncation cut; "
    "each segment with its token count"
)
CONTEXT = 8  # tokens decoded before each token, so that what the decoder puts between tokens shows
_SENTINEL = "PREFTUNE-SHOW-SENTINEL"  # a user message's content, to find what the template writes around it
_VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥"})


@dataclass
class Markers:
    """What a tokenizer's chat template writes itself, so that finding it in the data means it is written twice."""

    specials: list[str]  # special tokens' texts (the unknown token aside), in id order
    opening: str = ""  # the template's text before a first user message's content, stripped ("" when unknown)
    generation: str = ""  # its generation prompt, stripped ("" when unknown)


@dataclass
class Shown:
    """One pair's lines, and what they found."""

    lines: list[str]
    mistakes: list[str]  # names from MISTAKES
    truncated: bool = False
    tokenized: bool = True


def check_show(n: int | None, has_tokenizer: bool) -> None:
    """Refuse a --show the audit cannot honour, before any data is read."""
    if n is None:
        return
    if not has_tokenizer:
        raise UserError("--show needs --model or --tokenizer: it prints the pairs as the tokenizer cuts them")
    if n < 1:
        raise UserError(f"--show must be at least 1, got {n}")


def show_pairs(
    pairs: list[PreferencePair],
    tokenizer: Any,
    n: int,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> list[str]:
    """The legend, the first `n` pairs as the model sees them, then a summary line over the pairs shown."""
    check_show(n, tokenizer is not None)
    markers = template_markers(tokenizer)
    shown = [
        show_pair(pair, tokenizer, i, markers, max_length=max_length, max_prompt_length=max_prompt_length)
        for i, pair in enumerate(pairs[:n], 1)
    ]
    unit = "examples" if any(pair.label is not None for pair in pairs[:n]) else "pairs"
    return [LEGEND, *(line for one in shown for line in one.lines), summary_line(shown, unit)]


def show_pair(
    pair: PreferencePair,
    tokenizer: Any,
    index: int,
    markers: Markers,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> Shown:
    """One pair: its row, its segments (after truncation), the truncation, and its mistakes (before truncation)."""
    head = f"{'pair' if pair.label is None else 'example'} {index}: {pair.where}"
    if not all(_encodable(text) for _, text in _parts(pair)):
        return Shown([head, "  cannot tokenize: holds a lone surrogate (not valid Unicode)"], [], tokenized=False)
    try:
        full = tokenize_pair(pair, tokenizer)
    except UserError as e:
        return Shown([head, f"  cannot tokenize: {str(e).removeprefix(pair.where + ': ')}"], [], tokenized=False)
    seen, prompt_cut, response_cut = truncate(full, max_length=max_length, max_prompt_length=max_prompt_length)
    found = find_mistakes(pair, full, tokenizer, markers)
    lines = [
        head,
        *segment_lines(full, seen, tokenizer),
        _truncation_line(full, seen, tokenizer, max_length, max_prompt_length),
    ]
    lines += [f"  ! {name}: {detail}" for name, detail in found] or ["  mistakes: none found"]
    return Shown(lines, [name for name, _ in found], truncated=prompt_cut or response_cut)


def summary_line(shown: list[Shown], unit: str = "pairs") -> str:
    """ "shown 2 pairs: doubled BOS in 1, missing EOS in 0, ...; 1 truncated" over the pairs shown."""
    counts = ", ".join(f"{name} in {sum(name in one.mistakes for one in shown)}" for name in MISTAKES)
    unit = unit if len(shown) != 1 else unit[:-1]
    line = f"shown {len(shown)} {unit}: {counts}; {sum(one.truncated for one in shown)} truncated"
    untokenized = sum(not one.tokenized for one in shown)
    return line + (f"; {untokenized} not tokenizable" if untokenized else "")


# ------------------------------------------------------------------------------------------------ token display


def segment_lines(full: TokenizedPair, seen: TokenizedPair, tokenizer: Any) -> list[str]:
    """A line per segment of `seen` (the pair after truncation; `full` before): its name, its token count, its
    tokens, with ✂ where truncation cut. Each segment is decoded after the tokens before it in `full`."""
    cut = len(full.prompt_ids) - len(seen.prompt_ids)
    prompt = token_texts(tokenizer, seen.prompt_ids, before=full.prompt_ids[:cut])
    lines = [_segment_line("PROMPT", ["✂"] * bool(cut) + prompt, len(prompt))]
    for (name, before), (_, after) in zip(_response_ids(full), _response_ids(seen)):
        tokens = token_texts(tokenizer, after, before=seen.prompt_ids)
        lines.append(
            _segment_line(_segment_name(name, seen.label), tokens + ["✂"] * (len(after) < len(before)), len(tokens))
        )
    return lines


def _segment_name(name: str, label: bool | None) -> str:
    """CHOSEN, REJECTED; an unpaired example's completion by its label."""
    return name.upper() if label is None else ("DESIRABLE" if label else "UNDESIRABLE")


def _segment_line(name: str, tokens: list[str], count: int) -> str:
    return f"  {name:<12}{count:>3} │ {' '.join(tokens)}"


def token_texts(tokenizer: Any, ids: list[int], before: list[int] | None = None) -> list[str]:
    """Each token as shown: ⟨text⟩ for a special token, else what decoding it adds after the tokens before it
    (`before`, then the earlier `ids`), whitespace made visible. A token that decodes to nothing or to part of a
    character (U+FFFD) is shown by its vocabulary entry instead."""
    specials = _special_ids(tokenizer)
    context = list(before or [])[-CONTEXT:]
    out = []
    for token_id in ids:
        if token_id in specials:
            out.append(f"⟨{tokenizer.convert_ids_to_tokens(token_id)}⟩")
        else:
            piece = _piece(tokenizer, context, token_id)
            out.append(visible(piece if piece and "\ufffd" not in piece else tokenizer.convert_ids_to_tokens(token_id)))
        context = (context + [token_id])[-CONTEXT:]
    return out


def _piece(tokenizer: Any, context: list[int], token_id: int) -> str:
    """The text `token_id` adds after `context` (decoded alone when decoding rewrites the text before it)."""
    before, after = _decode(tokenizer, context), _decode(tokenizer, context + [token_id])
    return after[len(before) :] if after.startswith(before) else _decode(tokenizer, [token_id])


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def visible(text: str) -> str:
    """Spaces, newlines and tabs as ·, ↵, ⇥: a doubled space or a missing newline is then visible."""
    return text.translate(_VISIBLE)


def _special_ids(tokenizer: Any) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return added | set(tokenizer.all_special_ids)


def _truncation_line(
    full: TokenizedPair, seen: TokenizedPair, tokenizer: Any, max_length: int | None, max_prompt_length: int | None
) -> str:
    """What truncation cut, by comparing the pair before (`full`) and after (`seen`) it."""
    limits = " / ".join(
        f"{flag} {value}"
        for flag, value in (("--max-length", max_length), ("--max-prompt-length", max_prompt_length))
        if value is not None
    )
    if not limits:
        return "  truncation: none (no --max-length or --max-prompt-length)"
    cuts = []
    if len(seen.prompt_ids) < len(full.prompt_ids):
        cuts.append(f"prompt cut {len(full.prompt_ids) - len(seen.prompt_ids)} of {len(full.prompt_ids)} from the left")
    for (name, before), (_, after) in zip(_response_ids(full), _response_ids(seen)):
        if len(after) < len(before):
            eos = " (its EOS among them)" if before[-1] == tokenizer.eos_token_id else ""
            cuts.append(f"{name} cut {len(before) - len(after)} of {len(before)} from the right{eos}")
    return f"  truncation at {limits}: {'; '.join(cuts) or 'nothing cut'}"


def _response_ids(tp: TokenizedPair) -> list[tuple[str, list[int]]]:
    """(name, ids) per response; an unpaired example has one."""
    if tp.label is not None:
        return [("completion", tp.chosen_ids)]
    return [("chosen", tp.chosen_ids), ("rejected", tp.rejected_ids)]


# ----------------------------------------------------------------------------------------------------- mistakes


def template_markers(tokenizer: Any) -> Markers:
    """The special tokens, and the opening and generation prompt the chat template writes around a user message
    (none when the tokenizer has no template, or its template refuses a lone user message)."""
    from jinja2.exceptions import TemplateError

    ids = sorted(_special_ids(tokenizer) - {tokenizer.unk_token_id})
    markers = Markers(specials=list(tokenizer.convert_ids_to_tokens(ids)))
    if not getattr(tokenizer, "chat_template", None):
        return markers
    messages = [{"role": "user", "content": _SENTINEL}]
    try:
        plain = tokenizer.apply_chat_template(messages, tokenize=False)
        prompted = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except (TemplateError, ValueError):
        return markers
    if _SENTINEL in plain:
        markers.opening = plain[: plain.index(_SENTINEL)].strip()
    if prompted.startswith(plain):
        markers.generation = prompted[len(plain) :].strip()
    return markers


def find_mistakes(pair: PreferencePair, full: TokenizedPair, tokenizer: Any, markers: Markers) -> list[tuple[str, str]]:
    """(name, detail) of each mistake of MISTAKES in `pair`, tokenized without truncation as `full`."""
    checks = (
        _doubled_bos(full, tokenizer),
        _missing_eos(full, tokenizer),
        _template_twice(pair, markers),
        _repeats_prompt(pair),
    )
    return [(name, detail) for name, detail in zip(MISTAKES, checks) if detail]


def _doubled_bos(full: TokenizedPair, tokenizer: Any) -> str:
    bos = tokenizer.bos_token_id
    if bos is None or (full.prompt_ids + full.chosen_ids)[:2] != [bos, bos]:
        return ""
    return (
        f"the sequence starts with ⟨{tokenizer.bos_token}⟩ twice: the text already holds the BOS that the tokenizer "
        f"or its chat template adds (a prompt rendered by a chat template, then tokenized with special tokens?)"
    )


def _missing_eos(full: TokenizedPair, tokenizer: Any) -> str:
    eos = tokenizer.eos_token_id
    missing = [name for name, ids in _response_ids(full) if eos is not None and ids[-1] != eos]
    if not missing:
        return ""
    return (
        f"{_they(missing, 'end')} without the EOS ⟨{tokenizer.eos_token}⟩, so the model is not taught to stop "
        f"(does the chat template end a turn with another token?)"
    )


def _template_twice(pair: PreferencePair, markers: Markers) -> str:
    if not isinstance(pair.prompt, list):
        return _text_template_twice(pair, markers)
    held = [(name, found) for name, text in _parts(pair) if (found := markers_in(text, markers))]
    return "; ".join(
        f"the {name}'s message text holds the template's own markup {' '.join(found)} (give plain text: the "
        f"template adds it)"
        for name, found in held
    )


def _text_template_twice(pair: PreferencePair, markers: Markers) -> str:
    """A plain-text prompt rendered twice: the template's opening twice at its start, or its generation prompt twice
    in a row (in the prompt, or across the prompt and a response)."""
    opening, generation = markers.opening, markers.generation
    prompt = pair.prompt.lstrip()
    if opening and prompt.startswith(opening) and prompt[len(opening) :].lstrip().startswith(opening):
        return f"the prompt starts with the template's opening ⟨{visible(opening)}⟩ twice"
    twice = re.compile(re.escape(generation) + r"\s*" + re.escape(generation))
    if generation and any(twice.search(pair.prompt + response) for _, response in _parts(pair)[1:]):
        return f"the template's generation prompt ⟨{visible(generation)}⟩ appears twice in a row"
    return ""


def markers_in(text: str, markers: Markers) -> list[str]:
    """The markers `text` holds, as ⟨marker⟩ in order of appearance; a marker made of smaller ones found (the
    opening "<s><|user|>" when "<s>" and "<|user|>" are found) is left out."""
    candidates = [m for m in (*markers.specials, markers.opening, markers.generation) if m and m in text]
    atomic = [m for m in dict.fromkeys(candidates) if not any(o != m and o in m for o in candidates)]
    return [f"⟨{visible(m)}⟩" for m in sorted(atomic, key=text.index)]


def _repeats_prompt(pair: PreferencePair) -> str:
    if isinstance(pair.prompt, list):
        prompt = pair.prompt[-1]["content"].strip() if pair.prompt else ""
        starts = [(name, messages[0]["content"] if messages else "") for name, messages in _responses_of(pair)]
    else:
        prompt, starts = pair.prompt.strip(), list(_responses_of(pair))
    repeating = [name for name, text in starts if prompt and text.lstrip().startswith(prompt)]
    if not repeating:
        return ""
    return f"{_they(repeating, 'start')} with the prompt's text again: the model is trained to repeat it"


# ------------------------------------------------------------------------------------------------------- texts


def _they(names: list[str], verb: str) -> str:
    """(["chosen"], "end") → "chosen ends"; (["chosen", "rejected"], "end") → "chosen and rejected end"."""
    return f"{' and '.join(names)} {verb if len(names) > 1 else verb + 's'}"


def _responses_of(pair: PreferencePair) -> list[tuple[str, Any]]:
    """(name, response) per response of the pair; an unpaired example (rejected is chosen) has one."""
    if pair.rejected is pair.chosen:
        return [("completion", pair.chosen)]
    return [("chosen", pair.chosen), ("rejected", pair.rejected)]


def _parts(pair: PreferencePair) -> list[tuple[str, str]]:
    """(name, text) of the prompt and each response; a message list's text is its contents, a line each."""
    parts = [("prompt", pair.prompt), *_responses_of(pair)]
    return [
        (name, value if isinstance(value, str) else "\n".join(m["content"] for m in value)) for name, value in parts
    ]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which the tokenizer refuses with a TypeError
        return False
    return True

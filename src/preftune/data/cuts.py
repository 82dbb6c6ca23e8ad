"""Where a text can be cut so that its two parts, tokenized apart, give the ids of the whole: how a batch tokenizes
a prompt once for all its full sequences (data/tokenize.py) instead of again inside each prompt + response.

The common-prefix rule needs tok(prompt) and tok(prompt + response) as the tokenizer makes them, and on real data
(long prompts, short answers, several pairs per prompt) most of the work is the prompt again inside each full
sequence. For the pre-tokenizers below, a cut at a position b where the text has an ASCII letter before b and an
ASCII character that is neither a letter nor a digit at b changes nothing:

    ids(t) = ids(t[:b]) + ids(t[b:])      for every text t with the same t[:b + 1]

so tok(prompt) = H + tok(prompt[b:]) and tok(full) = H + tok(full[b:]) with H = tok(prompt[:b]) computed once.

Why, for the regex splits of GPT-2 (ByteLevel's own), Llama 3 / cl100k and Qwen 2, whose pieces are the matches of a
left-to-right scan that matches every character (each step below is also checked on random text in the tests):
  1. b is the end of a piece in every such text: the only alternatives that match a letter are the contractions
     ('s, 'll, …, which end in letters) and the letter runs (greedy, ending at the first non-letter), so the piece
     holding the letter at b - 1 ends at b.
  2. The pieces before b depend on t[:b + 1] only, and are the pieces of t[:b] alone. To decide a piece the scan
     reads at most a contraction's three characters, or a run of one class and the character that ends it; a run
     before b ends at the latest at the letter at b - 1 or, for a letter run, at t[b]. Where it reads t[b] it finds
     a non-letter, which ends a letter run and fails a contraction, as the end of the text does.
  3. The scan from b on is the scan of t[b:] alone: the patterns have no look-behind and no anchors.
  4. Each piece becomes bytes and then BPE tokens on its own, so equal pieces give equal ids. There is no normalizer,
     or NFC, which never joins an ASCII character to its neighbours.
  5. Added (special) tokens are split out before all this and can match across b: no cut is made within the length
     of the longest added token of one of them (`_clear`).
Anything else (other pre-tokenizers, a Metaspace "▁" prepended to each text, add_prefix_space, other normalizers,
BPE dropout, a post-processor that is not a fixed prefix and suffix) gets no cut, and its texts are tokenized whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

LLAMA3_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# Split patterns; ByteLevel(use_regex=True) has GPT-2's: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_PROVEN = {LLAMA3_SPLIT, QWEN2_SPLIT}
_CUT = re.compile(r"[A-Za-z][\x00-/:-@\[-`{-\x7f]")  # an ASCII letter, then the ASCII non-alphanumeric a cut precedes
_SEARCH = 256  # characters searched back from the end of a prompt for a place to cut


@dataclass(frozen=True)
class Cutter:
    """Cuts for one tokenizer: `cut(text)` → b (0: none); `guard(b)` characters of the text decide the ids of t[:b]."""

    margin: int  # the longest added token's length: no added token may lie within this of a cut
    added: re.Pattern | None  # any added token's text
    specials: tuple[list[int], list[int]] | None  # what tokenizer(text) puts before and after; None: not fixed

    def cut(self, text: str) -> int:
        end = len(text) - self.margin  # so that guard(b) <= len(text)
        for match in reversed(list(_CUT.finditer(text, max(0, end - _SEARCH), end))):
            b = match.start() + 1
            if self._clear(text, b):
                return b
        return 0

    def guard(self, b: int) -> int:
        return b + self.margin + 1

    def _clear(self, text: str, b: int) -> bool:
        """No added token within `margin` of b (one that ends at b or starts at b, a `single_word` one, matters too)."""
        return self.added is None or not self.added.search(text, max(0, b - self.margin - 1), self.guard(b))


def cutter(tokenizer: Any) -> Cutter | None:
    """A Cutter for `tokenizer` (a transformers fast tokenizer) when its pipeline is one the module docstring proves
    cuts exact for; otherwise None."""
    backend = tokenizer.backend_tokenizer
    if not _provable(backend):
        return None
    contents = [token.content for token in backend.get_added_tokens_decoder().values() if token.content]
    added = re.compile("|".join(map(re.escape, contents))) if contents else None
    return Cutter(max(map(len, contents), default=0), added, _fixed_specials(tokenizer))


def _state(component: Any) -> dict | None:
    return None if component is None else json.loads(component.__getstate__())


def _provable(backend: Any) -> bool:
    normalizer = _state(backend.normalizer)
    if normalizer is not None and normalizer != {"type": "NFC"}:
        return False
    if type(backend.model).__name__ != "BPE" or getattr(backend.model, "dropout", None):
        return False
    pre = _state(backend.pre_tokenizer) or {}
    if pre.get("type") == "ByteLevel":
        return pre.get("use_regex") is True and pre.get("add_prefix_space") is False
    if pre.get("type") != "Sequence" or len(pre["pretokenizers"]) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (
        split.get("type") == "Split"
        and split.get("pattern", {}).get("Regex") in _PROVEN
        and split.get("behavior") == "Isolated"
        and split.get("invert") is False
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
        and byte_level.get("add_prefix_space") is False
    )


def _fixed_specials(tokenizer: Any) -> tuple[list[int], list[int]] | None:
    """(before, after) such that tokenizer(text) = before + the text's ids + after, found on two probe texts and
    kept only if both agree; None when the special tokens are not a fixed prefix and suffix."""
    found = set()
    for probe in ("Hello world", "a, b\n\n1"):
        full = list(tokenizer(probe)["input_ids"])
        bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
        starts = [i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare]
        found.add((tuple(full[: starts[0]]), tuple(full[starts[0] + len(bare) :])) if starts else None)
    if len(found) != 1 or None in found:
        return None
    before, after = found.pop()
    return list(before), list(after)

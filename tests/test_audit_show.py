"""`preftune audit --show N`: pairs shown token by token as the model sees them, and the classic chat-template and
BOS/EOS mistakes flagged, with exact output on the tiny tokenizers.

Ids of the tiny tokenizer (tests/conftest.py): <s>=1 </s>=2 <|user|>=4 <|assistant|>=5; its word-level decoder puts
a space between words (shown ·) and its pre-tokenizer drops newlines, so "Q: hi there\\nA: " shows as
⟨<s>⟩ ·Q ·: ·hi ·there ·A ·: (7 tokens).
"""

from __future__ import annotations

import pytest

from preftune.cli import main
from preftune.data.formats import PreferencePair
from preftune.data.show import LEGEND, show_pairs

from conftest import build_tiny_tokenizer
from helpers import assistant, user
from toy import save_model_folder, write_jsonl

NO_CUT = "  truncation: none (no --max-length or --max-prompt-length)"
CLEAN = "  mistakes: none found"
CHOSEN = "  CHOSEN        2 │ ·good ⟨</s>⟩"
REJECTED = "  REJECTED      2 │ ·bad ⟨</s>⟩"
DOUBLED_BOS = (
    "  ! doubled BOS: the sequence starts with ⟨<s>⟩ twice: the text already holds the BOS that the tokenizer or its "
    "chat template adds (a prompt rendered by a chat template, then tokenized with special tokens?)"
)
# The tiny template with no end-of-turn token: nothing ends an assistant turn with EOS.
TEMPLATE_WITHOUT_EOS = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def summary(n: int, bos=0, eos=0, twice=0, repeats=0, truncated=0, unit="pair") -> str:
    return (
        f"shown {n} {unit}{'s' if n != 1 else ''}: doubled BOS in {bos}, missing EOS in {eos}, template applied twice "
        f"in {twice}, response repeats the prompt in {repeats}; {truncated} truncated"
    )


def pair(prompt, chosen, rejected, line: int = 1) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, f"d.jsonl line {line}")


# ---------------------------------------------------------------------------------------------- clean pairs


def test_plain_text_pair(tiny_tokenizer):
    assert show_pairs([pair("Q: hi there\nA: ", "good", "bad")], tiny_tokenizer, 1) == [
        LEGEND,
        "pair 1: d.jsonl line 1",
        "  PROMPT        7 │ ⟨<s>⟩ ·Q ·: ·hi ·there ·A ·:",
        CHOSEN,
        REJECTED,
        NO_CUT,
        CLEAN,
        summary(1),
    ]


def test_conversational_pair_through_the_template(tiny_tokenizer):
    # "<s><|user|> hi</s><|assistant|>" then " good</s>": one BOS (the template's), each turn ends with EOS.
    chat = pair([user("hi")], [assistant("good")], [assistant("bad")])
    assert show_pairs([chat], tiny_tokenizer, 1)[1:] == [
        "pair 1: d.jsonl line 1",
        "  PROMPT        5 │ ⟨<s>⟩ ⟨<|user|>⟩ ·hi ⟨</s>⟩ ⟨<|assistant|>⟩",
        CHOSEN,
        REJECTED,
        NO_CUT,
        CLEAN,
        summary(1),
    ]


def test_whitespace_made_visible():
    # A tokenizer whose spaces, newlines and tabs are tokens of their own, decoded by joining tokens as they are.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<unk>", "</s>", "hi", " ", "\n", "\t"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    lines = show_pairs([pair("hi\n\t", " hi", "\nhi")], tokenizer, 1)
    assert lines[2:5] == [
        "  PROMPT        3 │ hi ↵ ⇥",
        "  CHOSEN        3 │ · hi ⟨</s>⟩",
        "  REJECTED      3 │ ↵ hi ⟨</s>⟩",
    ]


# ---------------------------------------------------------------------------------------------- planted mistakes


def test_doubled_bos(tiny_tokenizer):
    # The prompt already starts with "<s>", and the tokenizer adds its own.
    lines = show_pairs([pair("<s>Q: hi there\nA: ", "good", "bad")], tiny_tokenizer, 1)
    assert lines[1:] == [
        "pair 1: d.jsonl line 1",
        "  PROMPT        8 │ ⟨<s>⟩ ⟨<s>⟩ ·Q ·: ·hi ·there ·A ·:",
        CHOSEN,
        REJECTED,
        NO_CUT,
        DOUBLED_BOS,
        summary(1, bos=1),
    ]


def test_missing_eos_from_a_template_that_ends_turns_without_it():
    """preftune appends the EOS text to plain-text responses itself, so a missing EOS comes from a chat template
    whose turns end with another token (or none): planted here by the tiny template without its "</s>"."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = TEMPLATE_WITHOUT_EOS
    chat = pair([user("hi")], [assistant("good")], [assistant("bad")])
    assert show_pairs([chat], tokenizer, 1)[1:] == [
        "pair 1: d.jsonl line 1",
        "  PROMPT        4 │ ⟨<s>⟩ ⟨<|user|>⟩ ·hi ⟨<|assistant|>⟩",
        "  CHOSEN        1 │ ·good",
        "  REJECTED      1 │ ·bad",
        NO_CUT,
        "  ! missing EOS: chosen and rejected end without the EOS ⟨</s>⟩, so the model is not taught to stop (does "
        "the chat template end a turn with another token?)",
        summary(1, eos=1),
    ]


def test_template_applied_twice_to_messages(tiny_tokenizer):
    # The user message's text is already the rendered prompt, and the template renders it again.
    chat = pair([user("<s><|user|> hi</s><|assistant|>")], [assistant("good")], [assistant("bad")])
    assert show_pairs([chat], tiny_tokenizer, 1)[1:] == [
        "pair 1: d.jsonl line 1",
        "  PROMPT        9 │ ⟨<s>⟩ ⟨<|user|>⟩ ⟨<s>⟩ ⟨<|user|>⟩ ·hi ⟨</s>⟩ ⟨<|assistant|>⟩ ⟨</s>⟩ ⟨<|assistant|>⟩",
        CHOSEN,
        REJECTED,
        NO_CUT,
        "  ! template applied twice: the prompt's message text holds the template's own markup ⟨<s>⟩ ⟨<|user|>⟩ "
        "⟨</s>⟩ ⟨<|assistant|>⟩ (give plain text: the template adds it)",
        summary(1, twice=1),
    ]


def test_template_applied_twice_to_text(tiny_tokenizer):
    # A plain-text prompt rendered twice: the template's opening "<s><|user|>" twice, and the tokenizer's BOS on top.
    twice = pair("<s><|user|> <s><|user|> hi</s><|assistant|></s><|assistant|>", " good", " bad")
    lines = show_pairs([twice], tiny_tokenizer, 1)
    assert lines[2] == (
        "  PROMPT       10 │ ⟨<s>⟩ ⟨<s>⟩ ⟨<|user|>⟩ ⟨<s>⟩ ⟨<|user|>⟩ ·hi ⟨</s>⟩ ⟨<|assistant|>⟩ ⟨</s>⟩ ⟨<|assistant|>⟩"
    )
    assert lines[6:] == [
        DOUBLED_BOS,
        "  ! template applied twice: the prompt starts with the template's opening ⟨<s><|user|>⟩ twice",
        summary(1, bos=1, twice=1),
    ]


def test_generation_prompt_twice_in_a_row(tiny_tokenizer):
    # Rendered once (one BOS, written by hand without the tokenizer's), but the response repeats "<|assistant|>".
    text = pair("<|user|> hi</s><|assistant|>", "<|assistant|> good", " bad")
    assert show_pairs([text], tiny_tokenizer, 1)[6:] == [
        "  ! template applied twice: the template's generation prompt ⟨<|assistant|>⟩ appears twice in a row",
        summary(1, twice=1),
    ]


def test_pre_rendered_text_prompt_is_fine_once(tiny_tokenizer):
    # A plain-text prompt rendered once, without the BOS the tokenizer adds: what the model would see from messages.
    text = pair("<|user|> hi</s><|assistant|>", " good", " bad")
    assert show_pairs([text], tiny_tokenizer, 1)[2:] == [
        "  PROMPT        5 │ ⟨<s>⟩ ⟨<|user|>⟩ ·hi ⟨</s>⟩ ⟨<|assistant|>⟩",
        CHOSEN,
        REJECTED,
        NO_CUT,
        CLEAN,
        summary(1),
    ]


def test_response_repeats_the_prompt(tiny_tokenizer):
    text = pair("Q: hi there\nA:", "Q: hi there\nA: good", " bad")
    chat = pair([user("hi there")], [assistant("hi there good")], [assistant("bad")], line=2)
    lines = show_pairs([text, chat], tiny_tokenizer, 2)
    assert lines[3] == "  CHOSEN        8 │ ·Q ·: ·hi ·there ·A ·: ·good ⟨</s>⟩"
    repeats = (
        "  ! response repeats the prompt: chosen starts with the prompt's text again: the model is trained to repeat it"
    )
    assert lines[6] == lines[12] == repeats
    assert lines[-1] == summary(2, repeats=2)


# ------------------------------------------------------------------------------------------------ truncation


def test_truncation_shown(tiny_tokenizer):
    # Prompt 11 tokens, chosen 6, rejected 2. --max-prompt-length 6 keeps 6; --max-length 8 then keeps
    # max(8 - 6, min(6, 4)) = 4 prompt tokens and cuts chosen to 8 - 4 = 4 (its EOS lost: shown, not flagged).
    long = pair("Q: hi there how are you ?\nA:", " fine thanks a b c", " no")
    assert show_pairs([long], tiny_tokenizer, 1, max_length=8, max_prompt_length=6)[1:] == [
        "pair 1: d.jsonl line 1",
        "  PROMPT        4 │ ✂ ·you ·? ·A ·:",
        "  CHOSEN        4 │ ·fine ·thanks ·a ·b ✂",
        "  REJECTED      2 │ ·no ⟨</s>⟩",
        "  truncation at --max-length 8 / --max-prompt-length 6: prompt cut 7 of 11 from the left; chosen cut 2 of 6 "
        "from the right (its EOS among them)",
        CLEAN,
        summary(1, truncated=1),
    ]


def test_limits_that_cut_nothing(tiny_tokenizer):
    lines = show_pairs([pair("Q: hi there\nA: ", "good", "bad")], tiny_tokenizer, 1, max_length=100)
    assert lines[5] == "  truncation at --max-length 100: nothing cut"


# ------------------------------------------------------------------------------------------------ several pairs


def test_first_n_pairs_and_summary(tiny_tokenizer):
    pairs = [
        pair("Q: hi there\nA: ", "good", "bad", 1),
        pair("<s>Q: hi", " good", " bad", 2),
        pair("Q: a", " b \ud800", " c", 3),  # a lone surrogate: not tokenizable, said so
        pair("<s>Q: b", " c", " d", 4),  # beyond N: not shown, not counted
    ]
    lines = show_pairs(pairs, tiny_tokenizer, 3)
    assert [line for line in lines if line.startswith("pair ")] == [f"pair {i}: d.jsonl line {i}" for i in (1, 2, 3)]
    assert lines[-2:] == [
        "  cannot tokenize: holds a lone surrogate (not valid Unicode)",
        summary(3, bos=1) + "; 1 not tokenizable",
    ]


def test_unpaired_examples(tiny_tokenizer):
    good = " good"
    example = PreferencePair("Q: hi", good, good, "u.jsonl line 1", label=True)
    assert show_pairs([example], tiny_tokenizer, 1)[1:] == [
        "example 1: u.jsonl line 1",
        "  PROMPT        4 │ ⟨<s>⟩ ·Q ·: ·hi",
        "  DESIRABLE     2 │ ·good ⟨</s>⟩",
        NO_CUT,
        CLEAN,
        summary(1, unit="example"),
    ]


# ---------------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(save_model_folder(tmp_path_factory.mktemp("show") / "model"))


def test_cli_show_comes_before_the_audit(model, tmp_path, capsys):
    rows = [
        {"prompt": "count from 3 :", "chosen": " 3 4 5", "rejected": " 5 4 3"},
        {"prompt": "<s>count from 7 :", "chosen": " 7 8", "rejected": " 8 7"},  # doubled BOS
        {"prompt": "<s>count from 1 :", "chosen": " 1 2", "rejected": " 2 1"},  # beyond --show 2
    ]
    data = str(write_jsonl(rows, tmp_path / "data.jsonl"))
    assert main(["audit", data, "--model", model, "--show", "2"]) == 0
    shown, audit = capsys.readouterr().out.split("audit of 3 pairs\n")
    assert shown.splitlines() == [
        LEGEND,
        f"pair 1: {data} line 1",
        "  PROMPT        5 │ ⟨<s>⟩ ·count ·from ·3 ·:",
        "  CHOSEN        4 │ ·3 ·4 ·5 ⟨</s>⟩",
        "  REJECTED      4 │ ·5 ·4 ·3 ⟨</s>⟩",
        NO_CUT,
        CLEAN,
        f"pair 2: {data} line 2",
        "  PROMPT        6 │ ⟨<s>⟩ ⟨<s>⟩ ·count ·from ·7 ·:",
        "  CHOSEN        3 │ ·7 ·8 ⟨</s>⟩",
        "  REJECTED      3 │ ·8 ·7 ⟨</s>⟩",
        NO_CUT,
        DOUBLED_BOS,
        summary(2, bos=1),
    ]
    assert audit.startswith("finding ")  # the usual audit table follows


def test_cli_show_needs_a_tokenizer(capsys):
    # Refused before the data is read: the missing file is not reached.
    assert main(["audit", "missing.jsonl", "--show", "2"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "preftune: error: --show needs --model or --tokenizer: it prints the pairs as the tokenizer cuts them\n"
    )


def test_cli_show_at_least_one(model, capsys):
    assert main(["audit", "missing.jsonl", "--model", model, "--show", "0"]) == 2
    assert capsys.readouterr().err == "preftune: error: --show must be at least 1, got 0\n"

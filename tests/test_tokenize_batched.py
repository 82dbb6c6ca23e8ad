"""Batched tokenization (`iter_tokenized`'s batch_size) against one pair at a time (batch_size=None), the path every
other test of tokenization pins: the same ids, `where`s, labels, TruncationReport and errors, in the same order,
whatever the batch size, and the same store with --stream as in memory.

Ids of the tiny tokenizer (tests/conftest.py): <unk>=0 <s>=1 </s>=2 <|user|>=4 <|assistant|>=5 ":"=7 hi=16
there=17 good=18 bad=19 the=24.
"""

from __future__ import annotations

import random
from dataclasses import astuple

import pytest

from preftune.config import resolve
from preftune.data import load
from preftune.data import tokenize as tok_module
from preftune.data.formats import PreferencePair, common_prefix_length, load_pairs
from preftune.data.tokenize import TruncationReport, iter_tokenized, tokenize_pairs
from preftune.errors import UserError

from conftest import TINY_CHAT_TEMPLATE, build_tiny_tokenizer
from helpers import assistant, user
from toy import build_tokenizer, counting_pairs, write_jsonl

SIZES = (1, 3, 1000)


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def text_pair(prompt: str, chosen: str, rejected: str, line: int) -> PreferencePair:
    return PreferencePair(prompt, chosen, rejected, f"d.jsonl line {line}")


def chat_pair(prompt: list, chosen: str, rejected: str, line: int) -> PreferencePair:
    return PreferencePair(prompt, [assistant(chosen)], [assistant(rejected)], f"d.jsonl line {line}")


def unpaired(prompt: str, completion: str, label: bool, line: int) -> PreferencePair:
    """An unpaired example as data/unpaired.py makes it: rejected is chosen (tokenized once)."""
    return PreferencePair(prompt, completion, completion, f"d.jsonl line {line}", label=label)


HISTORY = [user("hi"), assistant("hello"), user("how are you?")]
MIXED = [
    text_pair("Q: hi there\nA: ", "good", "bad", 1),
    text_pair("Q: hi there\nA: ", "good bad", "bad", 2),  # the same prompt: tokenized once per batch
    text_pair("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:", " fine, thanks", " no", 3),
    text_pair("hi the", "re", " bad", 4),  # "hi the" + "re" = "hi there": the boundary moves into the response
    text_pair("hi the", "re good", "re bad", 5),  # both responses merge
    text_pair("hi ", "yes</s>", "no", 6),  # EOS already there: not doubled
    text_pair("", "yes", "no", 7),  # an empty prompt keeps the BOS
    text_pair("hi ", "", " ", 8),  # empty responses: just the EOS
    text_pair("hi there</s>", "good", "bad", 9),  # this prompt's text is pair 10's prompt + chosen text
    text_pair("hi ", "there", "good", 10),
    text_pair("héllo wörld 你好 🙂 ", "ça va", "ñandú", 11),  # unicode (unknown words: <unk>)
    chat_pair([user("hi")], "good", "bad", 12),
    chat_pair(HISTORY, "fine, thanks", "bad", 13),  # multi-turn
    chat_pair([system("be kind"), user("hi")], "good", "", 14),  # a system turn, an empty response
    chat_pair([user("what color is the sky?")], "blue " * 12, "green", 15),  # long: cut by the length options
    text_pair("count from 1 : " * 8, "1 2 3 4 5", "5 4 3", 16),  # a long prompt
    unpaired("hi ", "good", True, 17),
    unpaired("hi ", "bad", False, 18),
    chat_pair([user("hi")], "good", "bad", 19),  # the same conversation again
]
OPTIONS = [
    {},
    {"max_length": 8},
    {"max_prompt_length": 3},
    {"max_length": 10, "max_prompt_length": 6},
    {"max_length": 8, "on_overlength": "drop"},
]


def outcome(pairs, tokenizer, batch_size, **options) -> tuple[list, TruncationReport, tuple | None]:
    """(pairs yielded before any error, the report as it stood then, (error type, message) or None)."""
    report = TruncationReport()
    got = []
    try:
        for tp in iter_tokenized(pairs, tokenizer, report, batch_size=batch_size, **options):
            got.append(astuple(tp))
    except Exception as e:
        return got, report, (type(e), str(e))
    return got, report, None


def assert_batches_match(pairs, tokenizer, sizes=SIZES, **options) -> tuple:
    expected = outcome(pairs, tokenizer, None, **options)
    for size in sizes:
        assert outcome(pairs, tokenizer, size, **options) == expected, f"batch_size={size}"
    return expected


@pytest.fixture
def encode_calls(monkeypatch) -> list[list[str]]:
    """The texts of each batched tokenizer call."""
    calls = []
    encode = tok_module._encode

    def spy(tokenizer, texts, chat):
        calls.append(list(texts))
        return encode(tokenizer, texts, chat)

    monkeypatch.setattr(tok_module, "_encode", spy)
    return calls


# ------------------------------------------------------------------------------------------------ same results


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "none")
def test_varied_rows_give_the_per_pair_ids_reports_and_order(tiny_tokenizer, options, encode_calls):
    got, report, error = assert_batches_match(MIXED, tiny_tokenizer, **options)
    assert error is None and report.pairs + report.dropped == len(MIXED)
    assert encode_calls  # the batched path ran (not a fallback)


def test_the_rows_cover_what_they_claim(tiny_tokenizer):
    # The hand-made cases above do what their comments say under the per-pair path.
    got, report, _ = outcome(MIXED, tiny_tokenizer, None)
    by_line = {where: (p, c, r) for p, c, r, where, _ in got}
    assert by_line["d.jsonl line 4"] == ([1, 16], [17, 2], [24, 19, 2])  # boundary moved
    assert by_line["d.jsonl line 8"] == ([1, 16], [2], [2])
    assert by_line["d.jsonl line 12"] == ([1, 4, 16, 2, 5], [18, 2], [19, 2])
    assert report.boundaries_shifted >= 2
    assert [label for *_, label in got][-3:] == [True, False, None]
    _, truncated, _ = outcome(MIXED, tiny_tokenizer, None, max_length=8)
    _, dropped, _ = outcome(MIXED, tiny_tokenizer, None, max_length=8, on_overlength="drop")
    assert truncated.prompts_truncated and truncated.responses_truncated and dropped.dropped


def test_toy_tokenizer_and_counting_rows():
    rows = counting_pairs(50, seed=3)
    pairs = [text_pair(r["prompt"], r["chosen"], r["rejected"], i + 1) for i, r in enumerate(rows)]
    assert_batches_match(pairs, build_tokenizer(), sizes=(1, 3, 7, 1000), max_length=9)


def test_random_rows_in_random_batches(tiny_tokenizer):
    rng = random.Random(0)
    words = "hi there good bad the re : ? , yes no </s> <|user|>".split() + ["", " ", "\n"]

    def text(n):
        return "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randrange(n)))

    pairs = [text_pair(text(8), text(4), text(4), i) for i in range(200)]
    pairs = [p for p in pairs if p.chosen != p.rejected]
    for size in (2, 5, 64):
        assert_batches_match(pairs, tiny_tokenizer, sizes=(size,), max_length=12, max_prompt_length=7)


def subword_tokenizer():
    """A byte-level BPE trained here on a few sentences (subwords merge across the prompt/response boundary: "hel" +
    "lo world"), with a BOS added, an EOS and the tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = ["hello world, how are you?", "the sky is blue and the grass is green", "héllo wörld 你好"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", chat_template=TINY_CHAT_TEMPLATE
    )


def test_subword_tokenizer_with_merged_boundaries():
    rng = random.Random(2)
    text = "hello world, how are you? the sky is blue and the grass is green héllo wörld 你好"
    pairs = []
    for i in range(120):
        a, b, c = sorted(rng.sample(range(len(text)), 3))
        prompt, chosen, rejected = text[:a], text[a:b], text[a:c]
        if i % 3 == 0:
            pairs.append(chat_pair([user(prompt)], chosen, rejected, i))
        else:
            pairs.append(text_pair(prompt, chosen, rejected, i))
    tokenizer = subword_tokenizer()
    _, report, error = assert_batches_match(pairs, tokenizer, sizes=(1, 3, 16, 1000), max_length=24)
    assert error is None and report.boundaries_shifted > 10  # merges across the boundary were exercised


def test_batches_cut_by_characters(tiny_tokenizer, monkeypatch, encode_calls):
    monkeypatch.setattr(tok_module, "BATCH_CHARS", 20)  # a batch of one or two pairs
    assert_batches_match(MIXED, tiny_tokenizer, sizes=(1000,), max_length=8)
    assert len(encode_calls) > len(MIXED) // 2


def test_a_text_met_twice_in_a_batch_is_tokenized_once(tiny_tokenizer, encode_calls):
    pairs = [text_pair("Q: hi there\nA: ", response, "bad", i) for i, response in enumerate(["good", "yes", "no"])]
    tokenize_pairs(pairs, tiny_tokenizer)
    assert encode_calls == [["Q: hi there\nA: ", "Q: hi there\nA: good</s>", "Q: hi there\nA: bad</s>"]
                            + ["Q: hi there\nA: yes</s>", "Q: hi there\nA: no</s>"]]  # fmt: skip


def test_chats_are_rendered_per_pair_then_tokenized_together_without_special_tokens(tiny_tokenizer, encode_calls):
    pairs = [chat_pair([user("hi")], "good", "bad", 1), chat_pair(HISTORY, "fine", "bad", 2)]
    out, _ = tokenize_pairs(pairs, tiny_tokenizer)
    assert len(encode_calls) == 1 and encode_calls[0][0] == "<s><|user|> hi</s><|assistant|>"
    assert (out[0].prompt_ids + out[0].chosen_ids).count(1) == 1  # one BOS: the template's


def test_shared_prefix_is_common_prefix_length():
    rng = random.Random(1)
    for _ in range(2000):
        a = [rng.randrange(3) for _ in range(rng.randrange(6))]
        b = [rng.randrange(3) for _ in range(rng.randrange(6))]
        assert tok_module._shared_prefix(a, b) == common_prefix_length(a, b)
        assert tok_module._shared_prefix(a, a + b) == len(a)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_come_from_the_same_row_after_the_same_pairs():
    no_bos = build_tiny_tokenizer()
    no_bos.backend_tokenizer.post_processor = None  # "" → []: an empty prompt is an error
    pairs = MIXED[:3] + [text_pair("", "yes", "no", 20)] + MIXED[3:]
    got, _, error = assert_batches_match(pairs, no_bos)
    assert len(got) == 3 and error[1].startswith("d.jsonl line 20: the prompt is empty after tokenization")


@pytest.mark.parametrize(
    "change, message",
    [
        ("no-template", "d.jsonl line 12: the pair is a conversation (lists of messages) but the tokenizer has no"),
        ("refusing-template", "d.jsonl line 12: the tokenizer's chat template refused this conversation (no!)"),
        ("no-assistant-turns", "d.jsonl line 12: chosen_ids is empty after tokenization"),
        ("no-eos", "d.jsonl line 1: the tokenizer has no eos_token"),
    ],
)
def test_tokenizer_errors_match(change, message):
    tokenizer = build_tiny_tokenizer()
    if change == "no-template":
        tokenizer.chat_template = None
    elif change == "refusing-template":
        tokenizer.chat_template = "{{ raise_exception('no!') }}"
    elif change == "no-assistant-turns":
        tokenizer.chat_template = (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'assistant' %}"
            "<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endif %}{% endfor %}"
        )
    else:
        tokenizer.eos_token = None
    _, _, error = assert_batches_match(MIXED, tokenizer)
    assert error[0] is UserError and error[1].startswith(message)


def test_an_odd_row_raises_what_the_per_pair_path_raises(tiny_tokenizer):
    odd = PreferencePair("hi", [assistant("good")], [assistant("bad")], "d.jsonl line 30")  # str prompt, chat replies
    _, _, error = assert_batches_match(MIXED[:5] + [odd] + MIXED[5:], tiny_tokenizer)
    assert error is not None


def reading(pairs, fail_at: int):
    """The pairs as a reader yields them, with a reading error before pair `fail_at`."""
    for i, pair in enumerate(pairs):
        if i == fail_at:
            raise UserError(f"d.jsonl line {100 + i}: not a row")
        yield pair


def test_a_reading_error_comes_after_the_pairs_read_before_it(tiny_tokenizer):
    for fail_at in (0, 1, 4, 7, len(MIXED) - 1):
        expected = outcome(reading(MIXED, fail_at), tiny_tokenizer, None, max_length=8)
        for size in SIZES:
            assert outcome(reading(MIXED, fail_at), tiny_tokenizer, size, max_length=8) == expected
        assert expected[2] == (UserError, f"d.jsonl line {100 + fail_at}: not a row")


def test_a_row_error_before_a_reading_error_comes_first():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('no!') }}"
    expected = outcome(reading(MIXED, 15), tokenizer, None)
    assert expected[2][1].startswith("d.jsonl line 12: ")
    for size in SIZES:
        assert outcome(reading(MIXED, 15), tokenizer, size) == expected


def test_a_tokenizer_call_that_raises_redoes_the_batch_pair_by_pair(tiny_tokenizer, monkeypatch):
    def broken(tokenizer, texts, chat):
        raise ValueError("cannot batch")

    monkeypatch.setattr(tok_module, "_encode", broken)
    assert outcome(MIXED, tiny_tokenizer, 4, max_length=8) == outcome(MIXED, tiny_tokenizer, None, max_length=8)


def test_bad_batch_size(tiny_tokenizer):
    with pytest.raises(ValueError, match="batch_size must be at least 1 or None, got 0"):
        tokenize_pairs(MIXED, tiny_tokenizer, batch_size=0)


# ------------------------------------------------------------------------------------------------ fallbacks


class NotFast:
    """A tokenizer that is not a transformers fast tokenizer (as a slow, Python one): pair by pair."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.eos_token, self.chat_template = inner.eos_token, inner.chat_template

    def __call__(self, text):
        self.calls += 1
        return self.inner(text)

    def apply_chat_template(self, *args, **kwargs):
        self.calls += 1
        return self.inner.apply_chat_template(*args, **kwargs)


def test_a_tokenizer_that_is_not_fast_goes_pair_by_pair(tiny_tokenizer, encode_calls):
    slow = NotFast(tiny_tokenizer)
    assert outcome(MIXED, slow, 1000) == outcome(MIXED, tiny_tokenizer, None)
    assert not encode_calls and slow.calls == 3 * len(MIXED) - 2  # the two unpaired examples: one response each


def test_what_cannot_batch_exactly_is_not_batched(tiny_tokenizer):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    class OwnEncoding(PreTrainedTokenizerFast):  # e.g. CodeLlama: a lone string with its fill token is split
        def _encode_plus(self, *args, **kwargs):
            return super()._encode_plus(*args, **kwargs)

    assert tok_module._batchable(tiny_tokenizer)
    own = OwnEncoding(tokenizer_object=build_tiny_tokenizer().backend_tokenizer, eos_token="</s>")
    assert not tok_module._batchable(own)
    assert not tok_module._batchable(NotFast(tiny_tokenizer))
    dropout = Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")], dropout=0.5))
    assert not tok_module._batchable(PreTrainedTokenizerFast(tokenizer_object=dropout))


# ------------------------------------------------------------------------------------------------ load and --stream


def test_stream_and_in_memory_give_the_same_pairs(tmp_path, tiny_tokenizer, monkeypatch):
    history = [user("hi"), assistant("hello"), user("how are you?")]
    rows = [
        {"prompt": "Q: hi there\nA: ", "chosen": "good", "rejected": "bad"},
        {"prompt": "hi the", "chosen": "re", "rejected": " bad"},
        {"prompt": [user("hi")], "chosen": [assistant("good")], "rejected": [assistant("bad")]},
        {"chosen": history + [assistant("fine, thanks")], "rejected": history + [assistant("bad")]},
        {"prompt": "count from 1 : " * 6, "chosen": " 1 2 3", "rejected": " 3 2 1"},
    ] * 7
    data = write_jsonl(rows, tmp_path / "d.jsonl")
    cfg, _ = resolve({"model": "m", "data": str(data), "output": str(tmp_path / "run"), "max_length": 12})
    expected, _ = tokenize_pairs(load_pairs(str(data))[0], tiny_tokenizer, max_length=12, batch_size=None)
    in_memory, _ = load.load_data(cfg.data, cfg, tiny_tokenizer, "--data")
    monkeypatch.setattr(tok_module, "BATCH_CHARS", 60)  # --stream in batches of a few pairs
    store = load.stream_data(cfg.data, cfg, tiny_tokenizer, "--data", tmp_path / "tokens")
    assert in_memory == expected and list(store) == expected and len(expected) == 35

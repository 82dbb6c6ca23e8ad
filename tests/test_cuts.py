"""data/cuts.py: a text cut where `Cutter` allows tokenizes as its two parts do, for each pre-tokenizer it accepts
(byte-level BPEs trained here with GPT-2's, Llama 3's and Qwen 2's splits), over random text built to hit every
alternative of those regexes; the places it refuses do not; anything it cannot prove gets no Cutter; and the batched
tokenization that uses the cuts gives the per-pair ids.
"""

from __future__ import annotations

import random

import pytest

from preftune.data import tokenize as tok_module
from preftune.data.cuts import _CUT, LLAMA3_SPLIT, QWEN2_SPLIT, cutter
from preftune.data.formats import PreferencePair
from preftune.data.tokenize import tokenize_pairs

from conftest import TINY_CHAT_TEMPLATE
from helpers import assistant, user

# Pieces of random text: each class the split regexes tell apart, the contractions, Unicode letters that are not
# ASCII (Kelvin sign and long s fold to k and s under Llama 3's (?i:…)), a combining accent, non-ASCII spaces and
# digits, emoji, and the added tokens' own text.
PIECES = (
    list("aAzZsStTdDkKmMlLrReEvV") + ["'s", "'ll", "'RE", "'", "''"] + list("0123456789") + ["123456"]
    + [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\u00a0", "\u3000"]
    + list(".,!?()-_:;\"`~[]{}@#$%^&*+=<>/\\|") + ["é", "ß", "你好", "\u212a", "\u017f", "e\u0301", "٣", "🙂"]
    + ["<|eot|>", "<s>", "</s>", "x.", "<|eot", "|>"]
)  # fmt: skip
SPECIALS = ["<s>", "</s>", "<|eot|>"]


def byte_bpe(split: str | None, normalizer=None, post=None, added=()):
    """A byte-level BPE trained on PIECES text, split by GPT-2's ByteLevel regex (split None) or by `split` then
    ByteLevel without its regex, as Llama 3's and Qwen 2's tokenizer.json do."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.normalizer = normalizer
    backend.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = [random_text(rng, 40) for _ in range(300)] + ["hello world, it's the sky's blue 2024"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    backend.add_tokens([AddedToken(text, **options) for text, options in added])
    backend.post_processor = post or processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", chat_template=TINY_CHAT_TEMPLATE
    )


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(n)))


# An added token that is not special, with each way transformers lets it eat or need its neighbours.
ADDED = [("x.", {"single_word": True}), ("dog", {"lstrip": True, "rstrip": True}), ("q1", {})]
KINDS = {
    "gpt2": {"split": None},
    "llama3": {"split": LLAMA3_SPLIT},
    "qwen2-nfc": {"split": QWEN2_SPLIT, "normalizer": "NFC"},
    "gpt2-added": {"split": None, "added": ADDED},
    "llama3-added": {"split": LLAMA3_SPLIT, "added": ADDED},
}


def build(kind: str):
    from tokenizers import normalizers

    options = dict(KINDS[kind])
    if options.get("normalizer") == "NFC":
        options["normalizer"] = normalizers.NFC()
    return byte_bpe(**options)


@pytest.fixture(scope="module", params=list(KINDS))
def tokenizer(request):
    return build(request.param)


def bare(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def every_cut(cut, text: str) -> list[int]:
    """Every place `cut` accepts in `text` (Cutter.cut takes the last one far enough from the end)."""
    return [m.start() + 1 for m in _CUT.finditer(text) if cut._clear(text, m.start() + 1)]


# ------------------------------------------------------------------------------------------------ the claim


def test_a_cut_text_tokenizes_as_its_parts(tokenizer):
    cut = cutter(tokenizer)
    assert cut is not None
    rng = random.Random(1)
    texts = [random_text(rng, 60) for _ in range(1500)]
    cases = [(t, b) for t in texts for b in every_cut(cut, t)]
    assert len(cases) > 3000
    whole = dict(zip(texts, bare(tokenizer, texts)))
    parts = sorted({p for t, b in cases for p in (t[:b], t[b:])})
    ids = dict(zip(parts, bare(tokenizer, parts)))
    wrong = [(t, b) for t, b in cases if ids[t[:b]] + ids[t[b:]] != whole[t]]
    assert not wrong, wrong[:3]


def test_the_places_a_cut_avoids_would_change_the_ids(tokenizer):
    # The same check at the places the rule refuses finds differences: it can see a wrong cut.
    rng = random.Random(2)
    texts = [random_text(rng, 60) for _ in range(100)]
    cut = cutter(tokenizer)
    refused = [(t, b) for t in texts for b in set(range(1, len(t))) - set(every_cut(cut, t))]
    parts = sorted({p for t, b in refused for p in (t[:b], t[b:])})
    ids = dict(zip(parts, bare(tokenizer, parts)))
    whole = dict(zip(texts, bare(tokenizer, texts)))
    assert sum(ids[t[:b]] + ids[t[b:]] != whole[t] for t, b in refused) > 50


def test_no_cut_near_an_added_token():
    cut = cutter(build("llama3-added"))
    assert cut.margin == len("<|eot|>")
    assert cut.cut("a" * 20 + "b<|eot|>" + " " * 10) == 0  # the only letter-then-other is "b<", at an added token
    assert cut.cut("a" * 20 + " b<|eot|>" + " " * 10) == 20  # "a " is 2 characters from it: enough
    text = "hello world." + " " * 8 + "dog. the end"
    assert cut.cut(text) == 11  # "d." of world: not "g." (within 7 of dog) nor "e " (within 7 of the end)
    assert cut.cut("word x. " + " " * 20) == 0  # "d " is within 7 characters of the added "x."


def test_cut_searches_back_from_the_end_only_so_far():
    cut = cutter(build("gpt2"))
    assert cut.cut("ab " + "1" * 300) == 0
    assert cut.cut("ab " + "1" * 200) == 2


# ------------------------------------------------------------------------------------------------ what gets no cut


def refused_tokenizers():
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    base = build("gpt2").backend_tokenizer
    variants = {
        "add_prefix_space": ("pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "metaspace": ("pre_tokenizer", pre_tokenizers.Metaspace()),
        "other split": (
            "pre_tokenizer",
            pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r"\w+|\s+"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
            ),
        ),
        "split merged": (
            "pre_tokenizer",
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "merged_with_next"),
                    pre_tokenizers.ByteLevel(use_regex=False),
                ]
            ),
        ),
        "lowercase": ("normalizer", normalizers.Lowercase()),
        "nfkc": ("normalizer", normalizers.NFKC()),
    }
    for name, (attribute, value) in variants.items():
        backend = Tokenizer.from_str(base.to_str())
        setattr(backend, attribute, value)
        yield name, PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    word = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    yield "not bpe", PreTrainedTokenizerFast(tokenizer_object=word, unk_token="<unk>")
    both = Tokenizer.from_str(base.to_str())
    both.add_tokens([AddedToken("zz")])
    both.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A $B", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    yield "bos and eos", PreTrainedTokenizerFast(tokenizer_object=both, bos_token="<s>", eos_token="</s>")


def test_what_cannot_be_proven_gets_no_cutter():
    got = {name: cutter(tokenizer) for name, tokenizer in refused_tokenizers()}
    assert [name for name, cut in got.items() if cut is not None] == ["bos and eos"]
    assert got["bos and eos"].specials == ([0], [1]) and got["bos and eos"].added.pattern.endswith("|zz")


def test_special_tokens_around_a_text_are_found():
    from tokenizers import processors

    assert cutter(build("gpt2")).specials == ([0], [])
    roberta = byte_bpe(None, post=processors.RobertaProcessing(("</s>", 1), ("<s>", 0)))
    assert cutter(roberta).specials == ([0], [1])


# ------------------------------------------------------------------------------------------------ tokenize_pairs


def random_pairs(rng: random.Random, n: int) -> list[PreferencePair]:
    """Prompts long enough to cut, each with several pairs, plain text and chats alike."""
    prompts = [random_text(rng, 40) + " the question is: " + random_text(rng, 8) for _ in range(n // 4)]
    pairs = []
    for i in range(n):
        prompt, chosen, rejected = rng.choice(prompts), random_text(rng, 12), random_text(rng, 12)
        if i % 3 == 0:
            pairs.append(PreferencePair([user(prompt)], [assistant(chosen)], [assistant(rejected)], f"line {i}"))
        else:
            pairs.append(PreferencePair(prompt, chosen, rejected, f"line {i}"))
    return [p for p in pairs if p.chosen != p.rejected]


def test_batches_with_cuts_give_the_per_pair_ids(tokenizer, monkeypatch):
    calls = []
    encode = tok_module._encode
    monkeypatch.setattr(tok_module, "_encode", lambda tok, texts, chat: calls.append(texts) or encode(tok, texts, chat))
    pairs = random_pairs(random.Random(3), 240)
    expected = tokenize_pairs(pairs, tokenizer, batch_size=None, max_length=40)
    for size in (1, 7, 1000):
        calls.clear()
        assert tokenize_pairs(pairs, tokenizer, batch_size=size, max_length=40) == expected, size
    tokenized = sum(len(text) for texts in calls for text in texts)
    texts = {text for pair in pairs for text in tok_module._pair_texts(pair, tokenizer).texts}
    assert tokenized < 0.5 * sum(map(len, texts))  # in one batch, each prompt was tokenized about once
    assert expected[1].boundaries_shifted > 0  # merged boundaries were exercised

"""PreferencePair → ids: exact ids per shape, TRL parity, truncation rules worked by hand, report counts.

Ids of the tiny tokenizer (tests/conftest.py): <unk>=0 <s>=1 </s>=2 <|user|>=4 <|assistant|>=5 ":"=7 "?"=8 ","=10
Q=12 A=13 Human=14 Assistant=15 hi=16 there=17 good=18 bad=19 hello=20 what=21 color=22 is=23 the=24 sky=25 it=26
blue=27 green=28 yes=30 no=31 how=32 are=33 you=34 fine=35 thanks=36.
"""

import json
from types import SimpleNamespace

import pytest

from preftune.data.formats import PreferencePair, load_pairs
from preftune.data.tokenize import (
    TokenizedPair,
    TruncationReport,
    common_prefix_length,
    tokenize_pair,
    tokenize_pairs,
    truncate,
)
from preftune.errors import UserError

from conftest import build_tiny_tokenizer
from helpers import assistant, user

HH_PROMPT = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:"
STANDARD = PreferencePair("Q: hi there\nA: ", "good", "bad", "d.jsonl line 1")
HH = PreferencePair(HH_PROMPT, " fine, thanks", " bad", "d.jsonl line 2")
# "hi the" + "re" tokenizes as "hi there": the prompt's last token merges into the response (TRL's common prefix).
MERGED = PreferencePair("hi the", "re", " bad", "d.jsonl line 3")
CHAT = PreferencePair([user("hi")], [assistant("good")], [assistant("bad")], "d.jsonl line 4")
MULTI_TURN = PreferencePair(
    [user("hi"), assistant("hello"), user("how are you?")],
    [assistant("fine, thanks")],
    [assistant("bad")],
    "d.jsonl line 5",
)


def ids(tp: TokenizedPair):
    return tp.prompt_ids, tp.chosen_ids, tp.rejected_ids


# ------------------------------------------------------------------------------------------------ the tokenizer


def test_tiny_tokenizer_fixture(tiny_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert tiny_tokenizer.pad_token is None
    assert (tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id) == (1, 2)
    assert tiny_tokenizer("hi there</s>")["input_ids"] == [1, 16, 17, 2]
    tiny_tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.pad_token is None
    assert reloaded("hi there</s>")["input_ids"] == [1, 16, 17, 2]
    assert ids(tokenize_pair(CHAT, reloaded)) == ids(tokenize_pair(CHAT, tiny_tokenizer))


# ------------------------------------------------------------------------------------------------ exact ids


def test_standard_pair(tiny_tokenizer):
    # "Q: hi there\nA: " → <s> Q : hi there A :, and the EOS string is appended to each response.
    tp = tokenize_pair(STANDARD, tiny_tokenizer)
    assert ids(tp) == ([1, 12, 7, 16, 17, 13, 7], [18, 2], [19, 2])
    assert tp.where == "d.jsonl line 1"


def test_hh_pair(tiny_tokenizer):
    assert ids(tokenize_pair(HH, tiny_tokenizer)) == (
        [1, 14, 7, 16, 15, 7, 20, 14, 7, 32, 33, 34, 8, 15, 7],
        [35, 10, 36, 2],
        [19, 2],
    )


def test_conversational_pair_has_one_bos_and_one_eos(tiny_tokenizer):
    # "<s><|user|> hi</s><|assistant|>" then " good</s>": the template writes BOS and the turn's EOS itself.
    tp = tokenize_pair(CHAT, tiny_tokenizer)
    assert ids(tp) == ([1, 4, 16, 2, 5], [18, 2], [19, 2])
    assert (tp.prompt_ids + tp.chosen_ids).count(1) == 1


def test_multi_turn_conversation(tiny_tokenizer):
    assert ids(tokenize_pair(MULTI_TURN, tiny_tokenizer)) == (
        [1, 4, 16, 2, 5, 20, 2, 4, 32, 33, 34, 8, 2, 5],
        [35, 10, 36, 2],
        [19, 2],
    )


def test_eos_not_doubled(tiny_tokenizer):
    pair = PreferencePair("hi ", "yes</s>", "no", "d.jsonl line 9")
    assert ids(tokenize_pair(pair, tiny_tokenizer)) == ([1, 16], [30, 2], [31, 2])


def test_merged_boundary_moves_into_prompt(tiny_tokenizer):
    # tok("hi the") = [1, 16, 24]; tok("hi there</s>") = [1, 16, 17, 2]; tok("hi the bad</s>") = [1, 16, 24, 19, 2].
    # Common prefixes 2 and 3 → the prompt is the first min = 2 tokens; "the" becomes part of rejected.
    assert ids(tokenize_pair(MERGED, tiny_tokenizer)) == ([1, 16], [17, 2], [24, 19, 2])


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0


def test_pairs_from_file_to_ids(tiny_tokenizer):
    # The shapes file end to end: loader and tokenizer agree on the where strings and the ids.
    from pathlib import Path

    path = str(Path(__file__).parent / "data" / "fmt_shapes.jsonl")
    pairs, _ = load_pairs(path)
    tokenized, report = tokenize_pairs(pairs, tiny_tokenizer)
    assert [t.where for t in tokenized] == [p.where for p in pairs]
    assert ids(tokenized[1]) == ([1, 4, 16, 2, 5], [18, 2], [19, 2])
    # implicit messages: "<s><|user|> what color is the sky?</s><|assistant|>" + " blue</s>" / " green</s>"
    assert ids(tokenized[3]) == ([1, 4, 21, 22, 23, 24, 25, 8, 2, 5], [27, 2], [28, 2])
    assert ids(tokenized[4]) == ([1, 14, 7, 16, 15, 7, 20, 14, 7, 32, 33, 34, 8, 15, 7], [35, 10, 36, 2], [19, 2])
    assert report.pairs == 5


# ------------------------------------------------------------------------------------------------ errors


def test_conversation_without_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(UserError) as e:
        tokenize_pair(CHAT, tokenizer)
    assert str(e.value) == (
        "d.jsonl line 4: the pair is a conversation (lists of messages) but the tokenizer has no "
        "chat template; use a tokenizer with a chat_template, or plain-text data"
    )


def test_chat_template_refusal_names_the_row():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError) as e:
        tokenize_pair(CHAT, tokenizer)
    assert str(e.value) == (
        "d.jsonl line 4: the tokenizer's chat template refused this conversation (roles must alternate)"
    )


def test_empty_response_ids():
    # A template that never renders assistant turns leaves nothing after the prompt.
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'assistant' %}"
        "<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endif %}{% endfor %}"
    )
    with pytest.raises(UserError, match=r"^d\.jsonl line 4: chosen_ids is empty after tokenization$"):
        tokenize_pair(CHAT, tokenizer)


def test_empty_prompt_without_bos():
    tokenizer = build_tiny_tokenizer()
    tokenizer.backend_tokenizer.post_processor = None  # no BOS: "" tokenizes to []
    with pytest.raises(UserError, match=r"^d\.jsonl line 7: the prompt is empty after tokenization; "):
        tokenize_pair(PreferencePair("", "yes", "no", "d.jsonl line 7"), tokenizer)


def test_empty_prompt_with_bos_keeps_the_bos(tiny_tokenizer):
    assert ids(tokenize_pair(PreferencePair("", "yes", "no", "x"), tiny_tokenizer)) == ([1], [30, 2], [31, 2])


def test_text_pair_needs_an_eos_token():
    tokenizer = build_tiny_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(UserError, match=r"^d\.jsonl line 1: the tokenizer has no eos_token"):
        tokenize_pair(STANDARD, tokenizer)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_length": 1}, "--max-length must be at least 2 (one prompt and one response token), got 1"),
        ({"max_prompt_length": 0}, "--max-prompt-length must be at least 1, got 0"),
        ({"on_overlength": "cut"}, "--on-overlength must be one of truncate, drop, got 'cut'"),
    ],
)
def test_bad_length_options(tiny_tokenizer, kwargs, message):
    with pytest.raises(UserError) as e:
        tokenize_pairs([STANDARD], tiny_tokenizer, **kwargs)
    assert str(e.value) == message


# ------------------------------------------------------------------------------------------------ truncation


def pair(p, c, r):
    """Prompt 1..p, chosen 101..100+c, rejected 201..200+r."""
    return TokenizedPair(list(range(1, p + 1)), list(range(101, 101 + c)), list(range(201, 201 + r)), "x")


def test_no_limits_no_cut():
    tp = pair(6, 5, 2)
    assert truncate(tp, max_length=None, max_prompt_length=None) == (tp, False, False)


def test_prompt_cut_from_the_left():
    out, prompt_cut, response_cut = truncate(pair(6, 5, 2), max_length=None, max_prompt_length=3)
    assert ids(out) == ([4, 5, 6], list(range(101, 106)), [201, 202])
    assert (prompt_cut, response_cut) == (True, False)


def test_docstring_example():
    # P=6, C=5, R=2, max_length=8: 6 + 5 > 8; the prompt keeps max(8 - 5, min(6, 8 // 2)) = 4 tokens,
    # each response keeps at most 8 - 4 = 4: chosen loses 1, rejected (2) is untouched.
    out, prompt_cut, response_cut = truncate(pair(6, 5, 2), max_length=8, max_prompt_length=None)
    assert ids(out) == ([3, 4, 5, 6], [101, 102, 103, 104], [201, 202])
    assert (prompt_cut, response_cut) == (True, True)


def test_prompt_only_cut_when_that_is_enough():
    # P=6, C=3, max_length=8: cutting the prompt to 8 - 3 = 5 (>= the floor 4) fits; no response cut.
    out, prompt_cut, response_cut = truncate(pair(6, 3, 1), max_length=8, max_prompt_length=None)
    assert ids(out) == ([2, 3, 4, 5, 6], [101, 102, 103], [201])
    assert (prompt_cut, response_cut) == (True, False)


def test_short_prompt_is_kept_whole():
    # P=2 <= max_length // 2: the prompt keeps all its tokens; chosen (10) is cut to 8 - 2 = 6.
    out, prompt_cut, response_cut = truncate(pair(2, 10, 7), max_length=8, max_prompt_length=None)
    assert ids(out) == ([1, 2], list(range(101, 107)), list(range(201, 207)))
    assert (prompt_cut, response_cut) == (False, True)


def test_exact_fit_is_not_cut():
    tp = pair(5, 3, 1)
    assert truncate(tp, max_length=8, max_prompt_length=5) == (tp, False, False)


def test_both_limits():
    # Rule 1: P 6 → 4. Rule 2: 4 + 3 > 6, keep max(6 - 3, min(4, 3)) = 3 prompt tokens; responses fit in 3.
    out, prompt_cut, response_cut = truncate(pair(6, 3, 2), max_length=6, max_prompt_length=4)
    assert ids(out) == ([4, 5, 6], [101, 102, 103], [201, 202])
    assert (prompt_cut, response_cut) == (True, False)


def test_truncate_rejects_bad_lengths():
    with pytest.raises(UserError, match="--max-length"):
        truncate(pair(2, 2, 2), max_length=1, max_prompt_length=None)


# Lengths (prompt, chosen, rejected): STANDARD (7, 2, 2), HH (15, 4, 2), MERGED (2, 2, 3).
def test_tokenize_pairs_truncate_counts(tiny_tokenizer):
    # max_length=6. STANDARD: keep max(6-2, min(7, 3)) = 4 prompt tokens, responses fit.
    # HH: keep max(6-4, 3) = 3 prompt tokens, chosen cut to 3 (loses its EOS). MERGED: 2 + 3 <= 6, untouched.
    out, report = tokenize_pairs([STANDARD, HH, MERGED], tiny_tokenizer, max_length=6)
    assert [ids(t) for t in out] == [
        ([16, 17, 13, 7], [18, 2], [19, 2]),
        ([8, 15, 7], [35, 10, 36], [19, 2]),
        ([1, 16], [17, 2], [24, 19, 2]),
    ]
    assert report == TruncationReport(
        pairs=3,
        prompts_truncated=2,
        responses_truncated=1,
        dropped=0,
        max_prompt_tokens=15,
        max_response_tokens=4,
        boundaries_shifted=1,
    )
    assert report.summary() == (
        "3 pairs; 2 prompts cut from the left, 1 responses cut, 0 dropped; longest prompt "
        "15 tokens, longest response 4 tokens; 1 prompt/response boundaries moved by "
        "merged tokens"
    )


def test_tokenize_pairs_drop_mode(tiny_tokenizer):
    out, report = tokenize_pairs([STANDARD, HH, MERGED], tiny_tokenizer, max_length=6, on_overlength="drop")
    assert [t.where for t in out] == ["d.jsonl line 3"]
    assert report == TruncationReport(
        pairs=1,
        prompts_truncated=0,
        responses_truncated=0,
        dropped=2,
        max_prompt_tokens=15,
        max_response_tokens=4,
        boundaries_shifted=1,
    )


def test_tokenize_pairs_prompt_limit_only(tiny_tokenizer):
    out, report = tokenize_pairs([STANDARD, CHAT], tiny_tokenizer, max_prompt_length=5)
    assert [t.prompt_ids for t in out] == [[7, 16, 17, 13, 7], [1, 4, 16, 2, 5]]
    assert report.summary() == (
        "2 pairs; 1 prompts cut from the left, 0 responses cut, 0 dropped; longest prompt "
        "7 tokens, longest response 2 tokens"
    )


# ------------------------------------------------------------------------------------------------ TRL parity


def trl_tokenize(rows, tokenizer):
    """Run TRL 1.16's own DPOTrainer preprocessing (prompt extraction, EOS, tokenization) without a model."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DPOTrainer

    trainer = SimpleNamespace(_tokenizer=tokenizer)
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    dataset = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "train")
    return [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in dataset]


def as_row(p: PreferencePair):
    return {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def test_trl_parity_plain_text(tiny_tokenizer):
    pairs = [STANDARD, HH, MERGED, PreferencePair("hi", "yes</s>", "no", "x"), PreferencePair("", "yes", "no", "y")]
    assert [ids(tokenize_pair(p, tiny_tokenizer)) for p in pairs] == trl_tokenize(
        list(map(as_row, pairs)), tiny_tokenizer
    )


def test_trl_parity_conversational(tiny_tokenizer):
    pairs = [CHAT, MULTI_TURN]
    assert [ids(tokenize_pair(p, tiny_tokenizer)) for p in pairs] == trl_tokenize(
        list(map(as_row, pairs)), tiny_tokenizer
    )


def test_trl_parity_implicit_conversational_prompt(tiny_tokenizer, tmp_path):
    # No prompt column: TRL's extract_prompt and our loader must find the same prompt, hence the same ids.
    history = [user("hi"), assistant("hello"), user("what color is the sky?")]
    rows = [
        {"chosen": history + [assistant("blue")], "rejected": history + [assistant("it is green")]},
        {"chosen": [user("hi"), assistant("good")], "rejected": [user("hi"), assistant("bad")]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    pairs, _ = load_pairs(str(path))
    ours, _ = tokenize_pairs(pairs, tiny_tokenizer)
    assert [ids(t) for t in ours] == trl_tokenize(rows, tiny_tokenizer)

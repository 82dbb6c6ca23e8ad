"""Rows → PreferencePair: every shape, every source type, every error message, the identical-pair policy."""

import json
import socket
import time
from pathlib import Path

import pytest

from preftune.data.formats import (
    LoadReport,
    PreferencePair,
    _hub_reachable,
    load_pairs,
    parse_columns,
    shared_text_prompt,
)
from preftune.errors import UserError

from helpers import assistant, user

DATA = Path(__file__).parent / "data"
SHAPES = str(DATA / "fmt_shapes.jsonl")


STANDARD = {"prompt": "Q: hi there\nA: ", "chosen": "good", "rejected": "bad"}
CHAT = {"prompt": [user("hi")], "chosen": [assistant("good")], "rejected": [assistant("bad")]}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def load_one(tmp_path, row, **kwargs):
    pairs, _ = load_pairs(write_jsonl(tmp_path / "data.jsonl", [row]), **kwargs)
    assert len(pairs) == 1
    return pairs[0]


def load_error(tmp_path, row, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        load_pairs(write_jsonl(tmp_path / "data.jsonl", [STANDARD, row]), **kwargs)
    return str(e.value)


# ------------------------------------------------------------------------------------------------ shapes


def test_every_shape_in_one_file():
    # fmt_shapes.jsonl: line 1 standard, 2 conversational, 3 implicit text, 4 blank, 5 implicit messages,
    # 6 multi-turn HH, 7 identical (skipped).
    pairs, report = load_pairs(SHAPES)
    assert [p.where for p in pairs] == [f"{SHAPES} line {i}" for i in (1, 2, 3, 5, 6)]
    assert pairs[0] == PreferencePair("Q: hi there\nA: ", "good", "bad", f"{SHAPES} line 1")
    assert pairs[1] == PreferencePair([user("hi")], [assistant("good")], [assistant("bad")], f"{SHAPES} line 2")
    # "blue" / "blush" share "blu", but the prompt stops at the word boundary before it.
    assert pairs[2] == PreferencePair("the sky is ", "blue", "blush", f"{SHAPES} line 3")
    assert pairs[3] == PreferencePair(
        [user("what color is the sky?")], [assistant("blue")], [assistant("green")], f"{SHAPES} line 5"
    )
    # HH: split after the LAST "\n\nAssistant:", which stays in the prompt; the response keeps its leading space.
    assert pairs[4] == PreferencePair(
        "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:",
        " fine, thanks",
        " bad",
        f"{SHAPES} line 6",
    )
    assert (report.rows, report.pairs, report.identical_skipped) == (6, 5, 1)
    assert report.shapes == {"standard": 1, "conversational": 2, "implicit": 1, "hh": 1}
    assert report.summary() == (
        "6 rows → 5 pairs (conversational 2, hh 1, implicit 1, standard 1); 1 skipped (chosen == rejected)"
    )


@pytest.mark.parametrize(
    "chosen, rejected, prompt",
    [
        ("Q: hi there\nA: good", "Q: hi there\nA: bad", "Q: hi there\nA: "),  # the brief's example
        ("The answer is yes", "The answer is yellow", "The answer is "),  # "ye" is shared but mid-word
        ("yes", "no", ""),  # nothing shared
        ("abc", "abc def", ""),  # all of chosen is shared, but no whitespace precedes the split point
        ("hi\tthere", "hi\tthem", "hi\t"),  # any whitespace is a boundary
    ],
)
def test_implicit_prompt_word_boundary(tmp_path, chosen, rejected, prompt):
    assert shared_text_prompt(chosen, rejected) == len(prompt)
    pair = load_one(tmp_path, {"chosen": chosen, "rejected": rejected})
    assert (pair.prompt, pair.chosen, pair.rejected) == (prompt, chosen[len(prompt) :], rejected[len(prompt) :])


def test_implicit_message_prompt_keeps_whole_messages(tmp_path):
    # Shared: system + user + assistant + user; the assistant replies differ only in their last word,
    # yet the prompt is made of whole messages only.
    history = [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello"), user("sky?")]
    pair = load_one(
        tmp_path, {"chosen": history + [assistant("it is blue")], "rejected": history + [assistant("it is green")]}
    )
    assert pair.prompt == history
    assert (pair.chosen, pair.rejected) == ([assistant("it is blue")], [assistant("it is green")])


def test_conversational_response_may_hold_several_turns(tmp_path):
    tool_turns = [assistant("calling"), {"role": "tool", "content": "42"}, assistant("it is 42")]
    pair = load_one(tmp_path, {"prompt": [user("what?")], "chosen": tool_turns, "rejected": [assistant("no")]})
    assert pair.chosen == tool_turns


def test_extra_columns_are_ignored_and_standard_prompt_may_be_empty(tmp_path):
    pair = load_one(tmp_path, {"id": 7, "score": 0.5, "prompt": "", "chosen": "yes", "rejected": "no"})
    assert (pair.prompt, pair.chosen, pair.rejected) == ("", "yes", "no")


def test_hh_needs_both_markers_in_both_responses(tmp_path):
    # Only "\n\nAssistant:" without "\n\nHuman:": not HH, so the implicit text prompt applies.
    pair = load_one(tmp_path, {"chosen": "x\n\nAssistant: yes", "rejected": "x\n\nAssistant: no"})
    assert (pair.prompt, pair.chosen, pair.rejected) == ("x\n\nAssistant: ", "yes", "no")


# ------------------------------------------------------------------------------------------------ columns


def test_parse_columns():
    assert parse_columns("prompt=question,chosen=response_j,rejected=response_k") == {
        "prompt": "question",
        "chosen": "response_j",
        "rejected": "response_k",
    }
    assert parse_columns(" chosen = good , rejected=bad ") == {"chosen": "good", "rejected": "bad"}
    assert parse_columns("prompt=") == {"prompt": ""}
    assert parse_columns(None) == {} and parse_columns("") == {}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("prompt", "--columns: expected NAME=COLUMN items separated by commas, got 'prompt'"),
        (
            "answer=x",
            "--columns: unknown name 'answer' in 'answer=x'; expected prompt, chosen, rejected, completion or label",
        ),
        ("chosen=a,chosen=b", "--columns: 'chosen' is given twice"),
        ("chosen=", "--columns: 'chosen=' needs a column name (only 'prompt=' may be empty)"),
        ("chosen=x,rejected=x", "--columns: column 'x' is given for both chosen and rejected"),
    ],
)
def test_parse_columns_errors(spec, message):
    with pytest.raises(UserError) as e:
        parse_columns(spec)
    assert str(e.value) == message


def test_pairwise_csv_with_column_mapping():
    # fmt_pairwise.csv holds stack-exchange-like columns and a quoted cell spanning two lines (row 2).
    path = str(DATA / "fmt_pairwise.csv")
    pairs, report = load_pairs(path, columns=parse_columns("prompt=question,chosen=response_j,rejected=response_k"))
    assert pairs == [
        PreferencePair("what color is the sky?", "blue", "green", f"{path} row 1"),
        PreferencePair("how are you,\nfriend?", "fine", "bad", f"{path} row 2"),
    ]
    assert report.shapes == {"standard": 2}


def test_mapped_column_missing(tmp_path):
    rows = [{"question": "q", "response_j": "a", "response_k": "b"}, {"question": "q", "response_j": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_pairs(path, columns=parse_columns("prompt=question,chosen=response_j,rejected=response_k"))
    assert str(e.value) == (
        f"{path} line 2: column 'response_k' (--columns rejected=response_k) not found; "
        f"the row has: question, response_j"
    )


def test_prompt_column_can_be_ignored(tmp_path):
    # HuggingFaceH4/ultrafeedback_binarized style: a string prompt plus whole conversations as responses.
    row = {"prompt": "hi", "chosen": [user("hi"), assistant("good")], "rejected": [user("hi"), assistant("bad")]}
    pair = load_one(tmp_path, row, columns={"prompt": ""})
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("hi")], [assistant("good")], [assistant("bad")])


# ------------------------------------------------------------------------------------------------ sources


ROWS = [STANDARD, {"prompt": "hi", "chosen": "yes", "rejected": "no"}]


def expected(where):
    return [PreferencePair("Q: hi there\nA: ", "good", "bad", where[0]), PreferencePair("hi", "yes", "no", where[1])]


def test_jsonl_blank_lines_crlf_and_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\r\n\r\n  \n" + json.dumps(ROWS[1]).encode())
    pairs, report = load_pairs(str(path))
    assert pairs == expected([f"{path} line 1", f"{path} line 4"])
    assert report.rows == 2


@pytest.mark.parametrize("wrap", [False, True])
def test_json_list_or_single_list_value(tmp_path, wrap):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": ROWS} if wrap else ROWS), encoding="utf-8")
    pairs, _ = load_pairs(str(path))
    assert pairs == expected([f"{path} index 0", f"{path} index 1"])


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,chosen,rejected\n"Q: hi there\nA: ",good,bad\nhi,yes,no\n', encoding="utf-8")
    pairs, _ = load_pairs(str(path))
    assert pairs == expected([f"{path} row 1", f"{path} row 2"])


def test_parquet_plain_and_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    assert load_pairs(str(path))[0] == expected([f"{path} row 1", f"{path} row 2"])
    chat_path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist([CHAT]), chat_path)  # list<struct<role, content>> columns
    assert load_pairs(str(chat_path))[0] == [PreferencePair(**CHAT, where=f"{chat_path} row 1")]


def test_no_such_file_and_unknown_extension(tmp_path):
    with pytest.raises(UserError, match=r"^missing/prefs\.jsonl: no such file$"):
        load_pairs("missing/prefs.jsonl")
    with pytest.raises(UserError, match=r"^\./nope: no such file$"):
        load_pairs("./nope")
    path = tmp_path / "d.txt"
    path.write_text("x")
    with pytest.raises(UserError) as e:
        load_pairs(str(path))
    assert str(e.value) == (
        f"{path}: unsupported file type '.txt'; supported: .jsonl, .json, .csv, .parquet "
        f"or a hub dataset name owner/name"
    )
    with pytest.raises(UserError, match="is a folder"):
        load_pairs(str(tmp_path))


def test_hub_offline_fails_fast_with_one_line(monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    start = time.monotonic()
    with pytest.raises(UserError) as e:
        load_pairs("preftune-tests/no-such-dataset", split="test")
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert message.startswith(
        "hub dataset 'preftune-tests/no-such-dataset': offline mode (HF_HUB_OFFLINE) is on "
        "and it is not in the local cache ("
    )
    assert "\n" not in message
    assert datasets.config.HF_HUB_OFFLINE == before  # the forced offline mode does not leak


def test_hub_unreachable_falls_back_to_cache_then_fails(monkeypatch):
    import datasets
    import huggingface_hub.constants as hub_constants

    port = closed_port()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(UserError) as e:
        load_pairs("preftune-tests/no-such-dataset")
    assert str(e.value).startswith(
        f"hub dataset 'preftune-tests/no-such-dataset': cannot reach the Hugging Face "
        f"hub (http://127.0.0.1:{port}) and it is not in the local cache ("
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_reachable_probe():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert _hub_reachable(f"http://127.0.0.1:{port}", timeout=2)
    assert not _hub_reachable(f"http://127.0.0.1:{port}", timeout=2)


# ------------------------------------------------------------------------------------------------ errors


def test_malformed_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD) + '\n\n{"prompt": "hi",\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_pairs(str(path))
    # line 3 is '{"prompt": "hi",' (16 characters): the next property name was expected at column 17
    assert str(e.value) == (
        f"{path} line 3: not valid JSON (Expecting property name enclosed in double quotes at column 17)"
    )


def test_jsonl_line_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.jsonl line 2: expected a JSON object, got array$"):
        load_pairs(str(path))


def test_json_errors(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "hi",\n  "chosen": }]', encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.json line 3: not valid JSON \(Expecting value at column 13\)$"):
        load_pairs(str(path))
    path.write_text(json.dumps({"train": ROWS, "meta": {}}), encoding="utf-8")
    with pytest.raises(UserError) as e:
        load_pairs(str(path))
    assert str(e.value) == (
        f"{path}: expected a list of objects or an object with a single list value "
        f'(like {{"data": [...]}}), got an object with keys: train, meta'
    )
    path.write_text(json.dumps([STANDARD, "hi"]), encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.json index 1: expected a JSON object, got string$"):
        load_pairs(str(path))
    path.write_text(json.dumps([STANDARD, {"prompt": "hi", "chosen": "a", "rejected": 3}]), encoding="utf-8")
    with pytest.raises(
        UserError,
        match=r"d\.json index 1: field 'rejected' must be a string or a list of "
        r"messages, got int$",
    ):
        load_pairs(str(path))


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_non_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    body = {
        ".jsonl": b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a"}\n',
        ".json": b'[{"prompt": "hi", "chosen": "a", "rejected": "b"},\n{"prompt": "caf\xe9"}]',
        ".csv": b"prompt,chosen,rejected\ncaf\xe9,a,b\n",
    }[suffix]
    path.write_bytes(body)
    with pytest.raises(UserError) as e:
        load_pairs(str(path))
    assert str(e.value) == f"{path} line 2: not valid UTF-8 (byte 0xe9); save the file as UTF-8"


def test_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\nhi,a,b\nhi,a\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv row 2: has 2 values, the header has 3 columns$"):
        load_pairs(str(path))
    path.write_text("prompt,chosen,chosen\nhi,a,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv header: column 'chosen' appears more than once$"):
        load_pairs(str(path))
    path.write_text("prompt,chosen,rejected\nhi,,b\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"d\.csv row 1: field 'chosen' is empty$"):
        load_pairs(str(path))


def test_parquet_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "hi", "chosen": "a", "rejected": None}]), path)
    with pytest.raises(
        UserError,
        match=r"d\.parquet row 1: field 'rejected' must be a string or a list of "
        r"messages, got null$",
    ):
        load_pairs(str(path))
    path.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"d\.parquet: not a readable Parquet file \("):
        load_pairs(str(path))


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"prompt": "hi", "rejected": "no"},
            "line 2: missing field 'chosen' (the row has: prompt, rejected; rename columns with --columns)",
        ),
        (
            {"prompt": "hi", "chosen": 5, "rejected": "no"},
            "line 2: field 'chosen' must be a string or a list of messages, got int",
        ),
        (
            {"prompt": {"text": "hi"}, "chosen": "a", "rejected": "b"},
            "line 2: field 'prompt' must be a string or a list of messages, got dict",
        ),
        ({"prompt": "hi", "chosen": "", "rejected": "no"}, "line 2: field 'chosen' is empty"),
        ({"prompt": "hi", "chosen": "yes", "rejected": " \n\t"}, "line 2: field 'rejected' is empty"),
        (
            {"chosen": "a b ", "rejected": "a b c"},
            "line 2: field 'chosen' is empty once the prompt shared with the other response is removed",
        ),
        (
            {"prompt": [user("hi")], "chosen": "a", "rejected": "b"},
            "line 2: fields mix plain text and message lists (prompt is a list of messages, chosen is a string, "
            "rejected is a string); use one kind",
        ),
        (
            {"prompt": "hi", "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "line 2: fields mix plain text and message lists (prompt is a string, chosen is a list of messages, "
            "rejected is a list of messages); use one kind (to take the prompt from the shared beginning of chosen and "
            "rejected, pass --columns prompt=)",
        ),
        (
            {"prompt": [user("hi")], "chosen": [user("a")], "rejected": [assistant("b")]},
            "line 2: field 'chosen': conversation with no assistant turn",
        ),
        (
            {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [user("hi"), assistant("b")]},
            "line 2: field 'rejected' must start with an assistant turn, got role 'user' (the prompt belongs in 'prompt')",
        ),
        (
            {"chosen": [user("hi"), assistant("a")], "rejected": [user("hey"), assistant("b")]},
            "line 2: field 'chosen' must start with an assistant turn, got role 'user' (chosen and rejected share no "
            "leading messages)",
        ),
        (
            {"prompt": [user("hi")], "chosen": [assistant(" ")], "rejected": [assistant("b")]},
            "line 2: field 'chosen' is empty (its assistant turns have no content)",
        ),
        (
            {"prompt": [], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "line 2: field 'prompt' is an empty list of messages",
        ),
        (
            {"prompt": [user("hi")], "chosen": ["a"], "rejected": [assistant("b")]},
            "line 2: field 'chosen' message 0 must be an object with 'role' and 'content', got str",
        ),
        (
            {"prompt": [{"role": "user"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "line 2: field 'prompt' message 0 has no 'content'",
        ),
        (
            {"prompt": [{"role": "user", "content": 1}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "line 2: field 'prompt' message 0: 'content' must be a string, got int",
        ),
        (
            {
                "prompt": [user("hi"), {"role": "bot", "content": "x"}],
                "chosen": [assistant("a")],
                "rejected": [assistant("b")],
            },
            "line 2: field 'prompt' message 1: unknown role 'bot'; expected one of system, user, assistant, tool",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hey\n\nAssistant: b"},
            "line 2: Anthropic HH transcripts 'chosen' and 'rejected' differ before their last '\\n\\nAssistant:' turn; "
            "the prompt must be shared",
        ),
        (
            {"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
            "line 2: field 'chosen' is empty",
        ),
    ],
)
def test_row_errors_name_file_line_and_field(tmp_path, row, message):
    assert load_error(tmp_path, row) == f"{tmp_path / 'data.jsonl'} {message}"


# ------------------------------------------------------------------------------------------------ identical


IDENTICAL_ROWS = [
    {"prompt": "hi", "chosen": "same", "rejected": "same"},
    {"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
    {"chosen": "hi there ", "rejected": "hi there "},  # implicit: everything is prompt, both responses ""
    {"chosen": [user("hi"), assistant("same")], "rejected": [user("hi"), assistant("same")]},
]


def test_identical_pairs_are_skipped_and_counted(tmp_path):
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [STANDARD] + IDENTICAL_ROWS))
    assert [p.where for p in pairs] == [f"{tmp_path / 'd.jsonl'} line 1"]
    assert (report.rows, report.pairs, report.identical_skipped) == (5, 1, 4)


def test_identical_pair_error_and_bad_policy(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [STANDARD] + IDENTICAL_ROWS)
    with pytest.raises(UserError) as e:
        load_pairs(path, on_identical="error")
    assert str(e.value) == f"{path} line 2: 'chosen' and 'rejected' are identical (--on-identical error)"
    with pytest.raises(UserError) as e:
        load_pairs(path, on_identical="keep")
    assert str(e.value) == "--on-identical must be one of skip, error, got 'keep'"


def test_empty_report_summary():
    assert LoadReport().summary() == "0 rows → 0 pairs (none); 0 skipped (chosen == rejected)"


# ------------------------------------------------------------------------------------- several rejected responses


def test_a_list_of_rejected_texts_becomes_one_pair_each(tmp_path):
    """All-pairs form of a ranking: the chosen response over each rejected one, with the same prompt."""
    several = {"prompt": "Q: 2+2?\nA: ", "chosen": "4", "rejected": ["5", "22", "four?"]}
    path = write_jsonl(tmp_path / "d.jsonl", [several, STANDARD, {**several, "prompt": "Q: 2+2 =\nA: "}])
    pairs, report = load_pairs(path)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
        ("Q: 2+2?\nA: ", "4", "5"),
        ("Q: 2+2?\nA: ", "4", "22"),
        ("Q: 2+2?\nA: ", "4", "four?"),
        ("Q: hi there\nA: ", "good", "bad"),
        ("Q: 2+2 =\nA: ", "4", "5"),
        ("Q: 2+2 =\nA: ", "4", "22"),
        ("Q: 2+2 =\nA: ", "4", "four?"),
    ]
    assert [p.where for p in pairs[:4]] == [
        f"{path} line 1 rejected[0]",
        f"{path} line 1 rejected[1]",
        f"{path} line 1 rejected[2]",
        f"{path} line 2",
    ]
    assert (report.rows, report.pairs) == (3, 7)
    assert report.summary() == (
        "3 rows → 7 pairs (standard 7); 0 skipped (chosen == rejected); 2 rows with 3 rejected each → 6 pairs"
    )


def test_a_list_of_rejected_conversations_and_a_mapped_column(tmp_path):
    row = {"prompt": [user("hi")], "chosen": [assistant("good")], "worse": [[assistant("bad")], [assistant("meh")]]}
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), columns=parse_columns("rejected=worse"))
    assert [p.rejected for p in pairs] == [[assistant("bad")], [assistant("meh")]]
    assert all(p.chosen == [assistant("good")] and p.prompt == [user("hi")] for p in pairs)
    assert report.rejected_lists == {2: 1} and report.shapes == {"conversational": 2}


def test_a_rejected_equal_to_chosen_in_a_list_is_skipped_and_counted(tmp_path):
    row = {"prompt": "Q: ", "chosen": "yes", "rejected": ["no", "yes"]}
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]))
    assert [p.rejected for p in pairs] == ["no"]
    assert (report.rows, report.pairs, report.identical_skipped) == (1, 1, 1)
    with pytest.raises(UserError) as e:
        load_pairs(write_jsonl(tmp_path / "d.jsonl", [row]), on_identical="error")
    assert (
        str(e.value) == f"{tmp_path / 'd.jsonl'} line 1 rejected[1]: 'chosen' and 'rejected' are identical "
        "(--on-identical error)"
    )


def test_a_bad_item_in_a_rejected_list_names_it(tmp_path):
    row = {"prompt": "Q: ", "chosen": "yes", "rejected": ["no", "  "]}
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(UserError) as e:
        load_pairs(path)
    assert str(e.value) == f"{path} line 1 rejected[1]: field 'rejected' is empty"
    mixed = {"prompt": "Q: ", "chosen": "yes", "rejected": ["no", 3]}  # not a list of responses: refused as before
    with pytest.raises(UserError) as e:
        load_pairs(write_jsonl(tmp_path / "m.jsonl", [mixed]))
    assert "field 'rejected' message 0 must be an object with 'role' and 'content', got str" in str(e.value)

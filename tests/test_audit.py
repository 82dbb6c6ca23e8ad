"""`preftune audit`: every finding on a planted dataset with known counts, worked out by hand below."""

import json

import pytest

from preftune.cli import main
from preftune.data.audit import ENCODING_KINDS, audit_pairs
from preftune.data.formats import PreferencePair, iter_pairs
from preftune.errors import UserError

from helpers import assistant, user


def row(prompt, chosen, rejected):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


SKY = [user("what color is the sky ?")]
# Line numbers are 1-based; what each line plants:
PLANTED = [
    row("Q: hi", " hello there", " no"),  # 1
    row("Q: hi", " hello there", " no"),  # 2  duplicate of 1
    row("Q: hi", " hello there", " no"),  # 3  duplicate of 1
    row("Q: how are you ?", " fine thanks", " I am not sure"),  # 4
    row("Q: how are you ?", " fine thanks", " I am not sure"),  # 5  duplicate of 4
    row("Q: tell me a joke", " ok", " ok"),  # 6  identical
    row("Q: why do cats purr ?", " sorry", " sorry"),  # 7  identical
    row("Q: can you help ?", " yes", "  "),  # 8  empty (whitespace-only) response
    row(SKY, [assistant("blue")], [assistant("green")]),  # 9  conflicts with 10
    # 10: blue and green swapped; keys in another order, which must not matter
    {"rejected": [{"content": "blue", "role": "assistant"}], "chosen": [assistant("green")], "prompt": SKY},
    row("Q: what is the answer ?", " here is the answer", " no"),  # 11 prompt also in the eval data
    row("Q: a", " b \ufffd", " c"),  # 12 replacement character
    row("Q: b", " caf\u00c3\u00a9", " tea ok"),  # 13 mojibake ("café" as UTF-8 read as Latin-1)
    row("Q: c\u200b", " d", " e"),  # 14 zero-width space
    row("Q: d", " e\x00", " f\x07"),  # 15 NUL, and a control character (BEL)
    row("Q: e", " f\ud800", " g h"),  # 16 lone surrogate
]
EVAL = [row("Q: what is the answer ?", " yes", " no"), row("Q: other", " yes", " no")]
# Measured pairs (lengths, length bias, truncation): all but 6, 7 (identical), 8 (empty), 16 (lone surrogate).


def write_jsonl(path, rows):
    # json.dumps escapes non-ASCII, so the lone surrogate survives as "\ud800" and the file is valid UTF-8.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", PLANTED), write_jsonl(tmp_path / "eval.jsonl", EVAL)


def lines(path, *numbers):
    return [f"{path} line {n}" for n in numbers]


def read(path):
    return [pair for pair, _ in iter_pairs(path)]


def test_iter_pairs_keeps_every_row(files):
    data, _ = files
    got = list(iter_pairs(data))
    assert len(got) == 16  # load_pairs would skip lines 6 and 7 and refuse line 8
    assert [shape for _, shape in got].count("conversational") == 2
    assert got[5][0] == PreferencePair(prompt="Q: tell me a joke", chosen=" ok", rejected=" ok", where=f"{data} line 6")
    assert got[7][0].rejected == "  "
    assert got[15][0].chosen == " f\ud800"


def test_iter_pairs_still_refuses_malformed_rows(tmp_path):
    blank = write_jsonl(tmp_path / "blank.jsonl", [row([user("hi")], [assistant(" ")], [assistant("bad")])])
    assert [p.chosen for p in read(blank)] == [[assistant(" ")]]  # empty content: counted by the audit, not refused
    bad = write_jsonl(tmp_path / "bad.jsonl", [row([user("hi")], [user("x")], [assistant("bad")])])
    with pytest.raises(UserError, match=r"bad.jsonl line 1: field 'chosen': conversation with no assistant turn"):
        read(bad)
    with pytest.raises(UserError, match=r"^nothing.jsonl: no such file$"):
        read("nothing.jsonl")


def test_planted_findings(files):
    data, eval_data = files
    report = audit_pairs(read(data), eval_pairs=read(eval_data))
    assert report.rows == 16
    assert (report.duplicates.count, report.duplicates.share) == (3, 3 / 16)
    assert report.duplicates.examples == lines(data, 2, 3, 5)  # the first copies (1, 4) are not counted
    assert report.identical_pairs.examples == lines(data, 6, 7)
    assert report.empty_responses.examples == lines(data, 8)
    assert report.conflicting_pairs.examples == lines(data, 9, 10)
    leak = report.eval_leakage
    assert (leak.count, leak.share, leak.examples, leak.eval_rows, leak.prompts) == (1, 1 / 16, lines(data, 11), 2, 1)
    assert report.truncated is None  # no tokenizer
    expected = {
        "replacement_char": [12],
        "nul": [15],
        "control_chars": [15],
        "lone_surrogates": [16],
        "mojibake": [13],
        "zero_width": [14],
    }
    assert {kind: f.examples for kind, f in report.encoding.items()} == {
        kind: lines(data, *numbers) for kind, numbers in expected.items()
    }
    assert all(f.count == 1 and f.share == 1 / 16 for f in report.encoding.values())


def test_examples_stop_at_five():
    pairs = [PreferencePair("p", "a", "b", f"d.jsonl line {i}") for i in range(1, 9)]
    report = audit_pairs(pairs)
    assert (report.duplicates.count, report.duplicates.examples) == (7, [f"d.jsonl line {i}" for i in range(2, 7)])


def test_no_pairs():
    report = audit_pairs([])
    assert (report.rows, report.duplicates.share, report.length_only_accuracy, report.lengths["prompt"]) == (
        0,
        0.0,
        None,
        None,
    )
    assert report.lines()[-1] == "  no pair to measure"
    assert report.warnings() == []


def test_lengths_in_characters(files):
    report = audit_pairs(read(files[0]))
    # (chosen, rejected) characters of the 12 measured pairs:
    #   1-3 (12, 3)  4-5 (12, 14)  9 (4, 5)  10 (5, 4)  11 (19, 3)  12 (4, 2)  13 (6, 7)  14 (2, 2)  15 (3, 3)
    #   chosen longer: 1, 2, 3, 10, 11, 12 = 6; rejected longer: 4, 5, 9, 13 = 4; ties: 14, 15 = 2
    assert report.chosen_longer_share == 6 / 12
    assert report.length_only_accuracy == (6 + 0.5 * 2) / 12
    lengths = report.lengths
    assert (lengths["unit"], lengths["pairs"], lengths["excluded"], lengths["ties"]) == ("characters", 12, 4, 2)
    # prompts: 5 5 5 16 16 23 23 23 4 4 5 4 (line 14: "Q: c" + zero-width space); sorted 4 4 4 5 5 5 5 16 16 23 23 23
    # nearest rank: median = 6th value, p90 = 11th value (ceil(0.9 * 12) = 11)
    assert lengths["prompt"] == {"min": 4, "median": 5, "p90": 23, "max": 23, "mean": 133 / 12}
    # chosen sorted: 2 3 4 4 5 6 12 12 12 12 12 19
    assert lengths["chosen"] == {"min": 2, "median": 6, "p90": 12, "max": 19, "mean": 103 / 12}


def test_tokens_and_truncation(files, tiny_tokenizer):
    data, _ = files
    report = audit_pairs(read(data), tokenizer=tiny_tokenizer, max_length=8)
    # Tiny word-level tokenizer: prompt = <s> + words; response = words + </s>; unknown words are one <unk> each.
    # (prompt, chosen, rejected) tokens: 1-3 (4, 3, 2)  4-5 (7, 3, 5)  9-10 (10, 2, 2) [chat template:
    # <s> <|user|> 6 words </s> <|assistant|>]  11 (8, 5, 2)  12 (4, 3, 2)  13 (4, 3, 3) ["cafÃ" and "©"]
    # 14 (5, 2, 2) [the zero-width space is a token]  15 (4, 3, 3)
    assert report.lengths["unit"] == "tokens"
    assert report.lengths["prompt"] == {"min": 4, "median": 4, "p90": 10, "max": 10, "mean": 71 / 12}
    # chosen longer: 1, 2, 3, 11, 12 = 5; rejected longer: 4, 5 = 2; ties: 9, 10, 13, 14, 15 = 5
    assert (report.chosen_longer_share, report.length_only_accuracy) == (5 / 12, (5 + 2.5) / 12)
    # max_length 8: P + max(C, R) > 8 for 4-5 (12), 9-10 (12), 11 (13). Kept prompt = max(8 - longest, min(P, 4)):
    #   4-5 keep 4 of 7, room 4 < 5: rejected cut too; 9-10 keep 6 of 10, room 2: responses fit; 11 keep 4 of 8,
    #   room 4 < 5: chosen cut. → 5 pairs, 5 prompts cut, 3 responses cut
    cut = report.truncated
    assert (cut.count, cut.share, cut.prompts_cut, cut.responses_cut) == (5, 5 / 12, 5, 3)
    assert cut.examples == lines(data, 4, 5, 9, 10, 11)


def test_prompt_length_only(files, tiny_tokenizer):
    report = audit_pairs(read(files[0]), tokenizer=tiny_tokenizer, max_prompt_length=7)
    # prompts longer than 7 tokens: 9, 10 (10 tokens) and 11 (8); responses are never cut without max_length
    assert (report.truncated.count, report.truncated.prompts_cut, report.truncated.responses_cut) == (3, 3, 0)
    assert report.truncated.examples == lines(files[0], 9, 10, 11)


def test_max_length_needs_a_tokenizer(files):
    with pytest.raises(UserError, match="give --model or --tokenizer"):
        audit_pairs(read(files[0]), max_length=8)


def test_leakage_ignores_blank_prompts():
    # Implicit-prompt rows with no shared beginning have the prompt "": that is not a shared prompt.
    train = [PreferencePair("", "yes", "no", "t line 1"), PreferencePair("Q: hi", "yes", "no", "t line 2")]
    evals = [PreferencePair("", "a", "b", "e line 1"), PreferencePair("Q: hi", "a", "b", "e line 2")]
    assert audit_pairs(train, eval_pairs=evals).eval_leakage.examples == ["t line 2"]


def test_encoding_clean_text_and_mojibake_variants():
    clean = PreferencePair("São Paulo, 20°C\n\tPÂTE", "it’s a café — ok\r\n", "no", "d line 1")
    moji = PreferencePair("itâ€™s", "20Â°C", "no", "d line 2")
    report = audit_pairs([clean, moji])
    assert {kind: f.examples for kind, f in report.encoding.items()} == {
        kind: (["d line 2"] if kind == "mojibake" else []) for kind in ENCODING_KINDS
    }


def test_length_bias_warnings():
    def pairs(lengths):
        return [PreferencePair("p", "a" * c, "b" * r, f"d line {i}") for i, (c, r) in enumerate(lengths, 1)]

    # 3 chosen longer, 1 tie: (3 + 0.5) / 4 = 0.875 > 0.65
    report = audit_pairs(pairs([(3, 1), (4, 2), (2, 1), (1, 1)]))
    assert report.warnings() == [
        (
            "strong length bias: picking the longer response scores 87.5% (chosen is longer "
            "in 75.0% of pairs); the model may learn to prefer longer answers"
        )
    ]
    report = audit_pairs(pairs([(1, 3), (2, 4), (1, 2), (1, 1)]))  # 0.5 / 4 = 0.125 < 0.35
    assert report.length_only_accuracy == 0.125
    assert report.warnings()[0].endswith("prefer shorter answers")
    assert audit_pairs(pairs([(3, 1), (1, 3)])).warnings() == []  # 0.5: no bias, and nothing else found


def test_planted_warnings_and_table(files, tiny_tokenizer):
    data, eval_data = files
    report = audit_pairs(read(data), eval_pairs=read(eval_data), tokenizer=tiny_tokenizer, max_length=8)
    assert report.warnings() == [
        f"18.8% of pairs (3) repeat an earlier pair exactly and count more than once in training, e.g. {data} line 2",
        f"12.5% of pairs (2) contradict another pair (A over B and B over A for the same prompt), e.g. {data} line 9",
        (
            f"6.2% of pairs (1) have a prompt that is also in the eval data (1 distinct): eval results will look "
            f"better than they are, e.g. {data} line 11"
        ),
        (
            f"41.7% of measured pairs (5) are longer than --max-length 8 and will be truncated (prompt cut in 5, "
            f"a response cut in 3), e.g. {data} line 4"
        ),
    ]  # length-only accuracy 0.625 is within [0.35, 0.65]: no length-bias warning
    table = report.lines()
    assert table[0] == "audit of 16 pairs"
    assert "duplicates                  3   18.8%  line 2, line 3, line 5" in table
    assert (
        "truncated                   5   41.7%  line 4, line 5, line 9, line 10, line 11  "
        "(of 12 measured pairs at --max-length 8: prompt cut in 5, a response cut in 3)"
    ) in table
    assert "  zero_width                1    6.2%  line 14" in table
    assert "  chosen longer in 41.7% of pairs (5 ties); a length-only model scores 62.5% (ties count half)" in table


def test_to_dict_keys(files):
    report = audit_pairs(read(files[0]))
    assert list(report.to_dict()) == [
        "rows",
        "duplicates",
        "identical_pairs",
        "empty_responses",
        "conflicting_pairs",
        "eval_leakage",
        "truncated",
        "chosen_longer_share",
        "length_only_accuracy",
        "lengths",
        "encoding",
        "features",  # what the preferences reward: tests/test_audit_features.py
    ]
    assert report.to_dict()["identical_pairs"] == {"count": 2, "share": 0.125, "examples": lines(files[0], 6, 7)}
    assert report.to_dict()["eval_leakage"] is None


def test_cli_end_to_end(files, tiny_tokenizer, tmp_path, capsys):
    data, eval_data = files
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    out = tmp_path / "reports" / "audit.json"
    code = main(
        [
            "audit",
            data,
            "--eval-data",
            eval_data,
            "--tokenizer",
            str(tmp_path / "tok"),
            "--max-length",
            "8",
            "--json",
            str(out),
        ]
    )
    assert code == 0  # findings are a report, not a failure
    stdout = capsys.readouterr().out
    assert "duplicates                  3   18.8%  line 2, line 3, line 5" in stdout
    assert stdout.count("warning: ") == 4
    written = json.loads(out.read_text(encoding="utf-8"))
    assert written["rows"] == 16
    assert written["truncated"] == {
        "count": 5,
        "share": 5 / 12,
        "examples": lines(data, 4, 5, 9, 10, 11),
        "max_length": 8,
        "max_prompt_length": None,
        "prompts_cut": 5,
        "responses_cut": 3,
    }
    assert written["eval_leakage"]["examples"] == lines(data, 11)
    assert written["length_only_accuracy"] == 0.625
    assert written["encoding"]["lone_surrogates"]["examples"] == lines(data, 16)
    assert [p.name for p in out.parent.iterdir()] == ["audit.json"]  # no temporary file left behind


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "{missing}: no such file"),
        (["--max-length", "8"], "--max-length and --max-prompt-length count tokens: give --model or --tokenizer too"),
        (
            ["--model", "m", "--tokenizer", "t"],
            "preftune audit: argument --tokenizer: not allowed with argument --model",
        ),
    ],
)
def test_cli_errors(files, tmp_path, capsys, extra, message):
    missing = str(tmp_path / "missing.jsonl")
    data = missing if not extra else files[0]
    assert main(["audit", data, *extra, "--json", str(tmp_path / "a.json")]) == 2
    err = capsys.readouterr().err
    assert err == f"preftune: error: {message.format(missing=missing)}\n"
    assert not (tmp_path / "a.json").exists()

"""What the preferences reward (`data/features.py` in `preftune audit`): features and refusal shares on planted
pairs whose counts are worked out by hand below."""

from __future__ import annotations

import json

import pytest

from preftune.cli import main
from preftune.data.audit import audit_pairs
from preftune.data.features import (
    BUILTIN,
    code_blocks,
    feature_rule,
    preference_features,
    prompt_repetition,
    read_categories,
)
from preftune.data.formats import PreferencePair, iter_pairs
from preftune.errors import UserError
from preftune.modelcard import audit_warnings

from helpers import assistant, user

LONG, SHORT = "a fairly long and detailed answer", "short answer"  # 6 and 2 words
REFUSE, COMPLY = "I can't help with that.", "Sure, here it is."


def row(prompt, chosen, rejected, **extra):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read(path):
    return [pair for pair, _ in iter_pairs(path)]


def pairs_of(responses, prompt="Q: tell me something"):
    return [PreferencePair(f"{prompt} {i}", c, r, f"d.jsonl line {i}") for i, (c, r) in enumerate(responses, 1)]


# Lines 1-36: the chosen is longer (6 words against 2); 37-40: shorter. Lines 1-20 carry one "!", on the chosen
# side in even lines and on the rejected side in odd lines: 10 more, 10 less, no signal.
LENGTH_ROWS = [
    row(
        f"Q: question number {i} ?",
        (LONG if i <= 36 else SHORT) + ("!" if i <= 20 and i % 2 == 0 else ""),
        (SHORT if i <= 36 else LONG) + ("!" if i <= 20 and i % 2 == 1 else ""),
    )
    for i in range(1, 41)
]


# ------------------------------------------------------------------------------------------ each feature by hand


def test_feature_counts_on_hand_written_responses():
    text = (
        "# Steps\n"  # heading: markdown 1
        "Great question! Here is **the plan**!\n"  # 2 exclamation marks, bold: markdown 2
        "- first\n* second\n• third\n1. fourth\n2) fifth\n"  # 5 list items
        "-not an item\n"  # no space after the dash
        "| a | b |\n|---|---|\n"  # 2 table lines: markdown 4
        "Sorry, I apologize: it might work, perhaps; I think it depends.\n"  # 2 apologies; 4 hedges
        "```python\nprint('hi!')\n```\n"  # a fenced block; its "!" counts too: 3 exclamation marks in all
    )
    assert BUILTIN["exclamations"](text) == 3
    assert BUILTIN["list_items"](text) == 5
    assert BUILTIN["markdown"](text) == 4
    assert BUILTIN["apologies"](text) == 2
    assert BUILTIN["hedging"](text) == 4  # might, perhaps, I think, it depends
    assert BUILTIN["code_blocks"](text) == 1
    assert BUILTIN["length"]("one two\nthree  four ") == 4  # words: whitespace-separated
    assert BUILTIN["hedging"]("Mighty oaks; I’m not sure, maybe. It SEEMS TO work") == 3  # whole words, any case, ’
    assert BUILTIN["apologies"]("My apologies, I'm sorry; we apologised") == 3


def test_code_blocks_fenced_and_indented():
    assert code_blocks("Run:\n\n    pip install x\n\n    x --help\n\nthen\n```\nx\n```\n~~~\ny\n~~~") == 3
    assert code_blocks("```\nunclosed") == 1
    assert code_blocks("text\n    continues a paragraph") == 0  # no blank line before: not code
    assert code_blocks("- item\n\n    - nested item") == 0  # a nested list is not code
    assert code_blocks("\tx = 1\n\ty = 2") == 1


def test_prompt_repetition():
    grams = {("what", "is", "the"), ("is", "the", "capital"), ("the", "capital", "of"), ("capital", "of", "france")}
    # "The capital of France is Paris" holds "the capital of" and "capital of france": 2 of the prompt's 4
    assert prompt_repetition("The capital of France is Paris.", grams) == 0.5
    assert prompt_repetition("Paris.", grams) == 0.0
    assert prompt_repetition("anything", set()) == 0.0
    prompt = [user("What is the capital of France?")]
    pairs = [PreferencePair(prompt, [assistant("The capital of France is Paris.")], [assistant("Paris")], "d 1")]
    rule = preference_features(pairs).rules["prompt_repetition"]
    assert (rule.chosen_more, rule.chosen_less, rule.ties) == (1, 0, 0)


def test_chat_responses_use_the_assistant_text():
    chosen = [user("ignored!!!"), assistant("Hi!"), assistant("Bye!")]  # a conversation's assistant turns only
    report = preference_features([PreferencePair([user("hi")], chosen, [assistant("ok")], "d 1")])
    assert report.rules["exclamations"].chosen_more == 1 and report.rules["length"].chosen_more == 1


# ------------------------------------------------------------------------------------------ the rule and the flag


def test_length_rule_exact_and_flagged(tmp_path):
    pairs = read(write_jsonl(tmp_path / "prefs.jsonl", LENGTH_ROWS))
    rule = audit_pairs(pairs).features.rules["length"]
    assert (rule.pairs, rule.chosen_more, rule.chosen_less, rule.ties, rule.decided) == (40, 36, 4, 0, 40)
    assert (rule.chosen_more_share, rule.chosen_less_share, rule.tie_share) == (36 / 40, 4 / 40, 0.0)
    assert rule.accuracy == 36 / 40
    # Wilson, p̂ = 0.9, n = 40, z = 1.96: centre (0.9 + z²/80) / (1 + z²/40) = 0.86495,
    # half-width z / (1 + z²/40) · √(0.09/40 + z²/6400) = 0.09547 → [0.76948, 0.96042]
    assert rule.ci_low == pytest.approx(0.76948, abs=1e-5) and rule.ci_high == pytest.approx(0.96042, abs=1e-5)
    assert rule.flagged == "more"  # lower bound 0.769 > 0.65, 40 ≥ 20 pairs decided
    assert rule.examples == [f"{tmp_path / 'prefs.jsonl'} line {i}" for i in (1, 2, 3)]


def test_no_signal_is_not_flagged(tmp_path):
    rule = audit_pairs(read(write_jsonl(tmp_path / "prefs.jsonl", LENGTH_ROWS))).features.rules["exclamations"]
    assert (rule.chosen_more, rule.chosen_less, rule.ties, rule.accuracy) == (10, 10, 20, 0.5)
    assert rule.ci_low == pytest.approx(0.2993, abs=1e-4) and rule.flagged is None


def test_flag_thresholds():
    wheres = [f"d line {i}" for i in range(1, 31)]
    assert feature_rule("x", [(1, 0)] * 19, wheres).flagged is None  # 19/19: lower bound 0.83, but 19 < 20 decided
    assert feature_rule("x", [(1, 0)] * 20, wheres).flagged == "more"  # 20/20: lower bound 0.839
    # 30 pairs where the chosen has less: the rule "more wins" scores 0, upper bound 0.114 < 0.35 → "less wins"
    less = feature_rule("x", [(0, 2)] * 30, wheres)
    assert (less.accuracy, less.flagged, less.examples) == (0.0, "less", wheres[:3])
    assert feature_rule("x", [(1, 1)] * 30, wheres).accuracy is None  # all ties: nothing decided


def test_length_in_words_warns_when_characters_do_not():
    # More words in fewer characters: the length-bias line (characters) sees the chosen shorter in every pair.
    report = audit_pairs(pairs_of([("a b c d e f", "extraordinarily")] * 12 + [("x y z", "abcdefghij")] * 12))
    assert report.length_only_accuracy == 0.0 and report.features.rules["length"].flagged == "more"
    assert [w.split(":")[0] for w in report.warnings()] == ["strong length bias", "likely spurious preference"]
    report = audit_pairs(pairs_of([("a b c d e f", "g")] * 24))  # the same bias in both units: said once
    assert [w.split(":")[0] for w in report.warnings()] == ["strong length bias"]


def test_less_wins_warning():
    pairs = pairs_of([("Sure.", "Sorry, no.")] * 30)
    (warning,) = [w for w in audit_pairs(pairs).warnings() if "apologies" in w]
    assert warning == (
        "likely spurious preference: apologies: the response with less of it is chosen in 100.0% of the 30 pairs "
        "where it differs (95% CI 88.6%-100.0%); the model may learn to avoid it, e.g. d.jsonl line 1"
    )


# ---------------------------------------------------------------------------------------------------- refusal


def labelled_rows():
    # label safe, lines 1-10: chosen refuses and rejected complies in 6, both comply in 4
    # label unsafe, lines 11-20: chosen refuses and rejected complies in 8, both refuse in 2
    # no label, lines 21-25: chosen complies and rejected refuses in 1, both comply in 4
    safe = [row(f"Q: safe {i}", REFUSE if i < 6 else COMPLY, COMPLY + f" {i}", label="safe") for i in range(10)]
    unsafe = [row(f"Q: unsafe {i}", REFUSE, REFUSE + " No." if i < 2 else COMPLY, label="unsafe") for i in range(10)]
    other = [
        row(f"Q: other {i}", COMPLY, REFUSE if i == 0 else COMPLY + " ok", category="x") for i in range(5)
    ]  # not "label"
    return safe + unsafe + other


def test_refusal_shares_per_label(tmp_path):
    path = write_jsonl(tmp_path / "prefs.jsonl", labelled_rows())
    categories = read_categories(path)
    assert len(categories) == 20 and categories[f"{path} line 11"] == "unsafe"
    report = audit_pairs(read(path), categories=categories)
    shares = report.features.refusal
    assert (shares.pairs, shares.chosen_refuses, shares.rejected_refuses, shares.both_refuse) == (25, 14, 1, 2)
    assert (shares.chosen_refuses_share, shares.rejected_refuses_share) == (14 / 25, 1 / 25)
    by_label = {
        name: (s.pairs, s.chosen_refuses, s.rejected_refuses, s.both_refuse)
        for name, s in report.features.refusal_by_label.items()
    }
    assert by_label == {"safe": (10, 6, 0, 0), "unsafe": (10, 8, 0, 2), "(no label)": (5, 0, 1, 0)}
    assert report.features.refusal_by_label["safe"].examples == [f"{path} line {i}" for i in (1, 2, 3)]
    refusal = report.features.rules["refusal"]  # the same detector, as a feature: 14 more, 1 less
    assert (refusal.chosen_more, refusal.chosen_less, refusal.ties) == (14, 1, 10)
    # Only "safe" warns: refusing an unsafe prompt is the point, and with labels "all" is not judged.
    assert [w for w in report.warnings() if "refusal" in w] == [
        f"60.0% of pairs with label safe (6) choose a refusal over a compliant answer (detector: default (refusal "
        f"openings)): training rewards refusing, expect more over-refusal (measure it with preftune eval "
        f"--refusal-prompts), e.g. {path} line 1"
    ]


def test_unsafe_compliance_warns(tmp_path):
    rows = [row(f"Q: unsafe {i}", COMPLY, REFUSE + f" {i}", label="unsafe") for i in range(5)]
    rows += [row(f"Q: unsafe {i} again", REFUSE, COMPLY, label="unsafe") for i in range(5)]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    report = audit_pairs(read(path), categories=read_categories(path))
    assert [w for w in report.warnings() if "refusal" in w] == [
        "50.0% of pairs with label unsafe (5) choose a compliant answer over a refusal (detector: default (refusal "
        f"openings)): training rewards answering unsafe prompts, e.g. {path} line 1"
    ]


def test_refusal_is_judged_by_its_shares_not_as_a_feature():
    report = audit_pairs(pairs_of([(REFUSE, COMPLY)] * 30))
    assert report.features.rules["refusal"].accuracy == 1.0 and report.features.rules["refusal"].flagged is None
    assert [w for w in report.warnings() if "refus" in w] == [
        "100.0% of pairs (30) choose a refusal over a compliant answer (detector: default (refusal openings)): "
        "training rewards refusing, expect more over-refusal (measure it with preftune eval --refusal-prompts), "
        "e.g. d.jsonl line 1"
    ]


@pytest.mark.parametrize("refusing, total, warns", [(5, 40, True), (4, 40, False), (5, 100, False)])
def test_refusal_thresholds_without_labels(refusing, total, warns):
    pairs = pairs_of([(REFUSE, COMPLY)] * refusing + [(COMPLY, COMPLY + " ok")] * (total - refusing))
    warnings = [w for w in audit_pairs(pairs).warnings() if "choose a refusal" in w]
    assert bool(warnings) == warns  # needs 5 pairs and more than 5%
    if warns:
        assert warnings[0].startswith("12.5% of pairs (5) choose a refusal over a compliant answer")


def test_categories_follow_rejected_lists_and_columns(tmp_path):
    rows = [{"q": "Q: a", "chosen": REFUSE, "rejected": [COMPLY, COMPLY + " 2"], "kind": "safe"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    categories = read_categories(path, "prompt=q,label=kind")
    pairs = [pair for pair, _ in iter_pairs(path, {"prompt": "q"})]
    by_label = preference_features(pairs, categories=categories).refusal_by_label
    assert by_label["safe"].chosen_refuses == 2  # both pairs of the row's rejected list carry its label
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    assert read_categories(unpaired) == {}  # an unpaired example's label is no category


# ---------------------------------------------------------------------------------------- replaceable functions


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "audit_feature_mod.py").write_text(
        "def please(text):\n    return text.lower().count('please')\n\n"
        "def polite(text):\n    return 'please' in text\n\n"
        "def broken(text):\n    return 'many'\n\n"
        "def says_no(text):\n    return text.startswith('No')\n\n"
        "def maybe(text):\n    return 1\n\n"
        "def detail(text):\n    return text.count('detail')\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "audit_feature_mod"


def test_user_feature_joins_the_table(user_module):
    pairs = pairs_of([("Please, please do", "do it")] * 20 + [("no", "please")] * 2)
    report = audit_pairs(pairs, features=[f"{user_module}:please", f"{user_module}:polite"])
    rule = report.features.rules[f"{user_module}:please"]
    assert (rule.label, rule.chosen_more, rule.chosen_less, rule.decided) == (f"{user_module}:please", 20, 2, 22)
    assert rule.accuracy == 20 / 22 and rule.flagged == "more"  # Wilson lower bound 0.72
    assert report.features.rules[f"{user_module}:polite"].chosen_more == 20  # True/False count 1/0
    assert list(report.features.rules)[-2:] == [f"{user_module}:please", f"{user_module}:polite"]
    with pytest.raises(UserError, match=rf"--feature {user_module}:broken: returned 'many', expected a finite number"):
        audit_pairs(pairs, features=[f"{user_module}:broken"])
    with pytest.raises(UserError, match=r"--feature nowhere:f: cannot import module 'nowhere'"):
        audit_pairs(pairs, features=["nowhere:f"])


def test_refusal_detector_is_replaceable(user_module):
    pairs = pairs_of([("No way.", "Yes.")] * 6 + [(REFUSE, COMPLY)] * 2)
    report = audit_pairs(pairs, refusal_detector=f"{user_module}:says_no")
    assert report.features.detector == f"{user_module}:says_no"
    assert (report.features.refusal.chosen_refuses, report.features.refusal.pairs) == (6, 8)
    with pytest.raises(UserError, match=r"--refusal-detector audit_feature_mod:maybe: returned int"):
        audit_pairs(pairs, refusal_detector=f"{user_module}:maybe")


# -------------------------------------------------------------------------------------- report, CLI, audit.json


def test_rebuilt_from_audit_json_warns_alike(tmp_path):
    report = audit_pairs(read(write_jsonl(tmp_path / "prefs.jsonl", LENGTH_ROWS)))
    saved = json.loads(json.dumps(report.to_dict()))
    assert audit_warnings(saved) == report.warnings()  # the model card's reading of audit.json
    del saved["features"]  # an audit.json of an earlier version
    assert audit_warnings(saved) == [w for w in report.warnings() if "spurious" not in w]


def test_cli_prints_the_table_and_writes_the_numbers(tmp_path, user_module, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", LENGTH_ROWS)
    out = tmp_path / "audit.json"
    assert main(["audit", data, "--feature", f"{user_module}:detail", "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    start = lines.index("what the preferences reward (40 measured pairs)")
    flagged = "    flagged (more wins): line 1, line 2, line 3"
    # "detail" is in the 6-word answer: the user's feature has the length's counts
    assert lines[start + 3 : start + 14] == [
        "  feature                       more    less    ties  decided  more wins  95% CI",
        "  length (words)               90.0%   10.0%    0.0%       40      90.0%  [76.9%, 96.0%]" + flagged,
        "  list items                    0.0%    0.0%  100.0%        0          -  -",
        "  markdown                      0.0%    0.0%  100.0%        0          -  -",
        "  code blocks                   0.0%    0.0%  100.0%        0          -  -",
        "  exclamation marks            25.0%   25.0%   50.0%       20      50.0%  [29.9%, 70.1%]",
        "  apologies                     0.0%    0.0%  100.0%        0          -  -",
        "  refusal                       0.0%    0.0%  100.0%        0          -  -",
        "  hedging                       0.0%    0.0%  100.0%        0          -  -",
        "  prompt repetition             0.0%    0.0%  100.0%        0          -  -",
        "  audit_feature_mod:detail     90.0%   10.0%    0.0%       40      90.0%  [76.9%, 96.0%]" + flagged,
    ]
    assert lines[start + 17] == "  all                      40        0 (0.0%)        0 (0.0%)        0 (0.0%)"
    assert (
        f"warning: likely spurious preference: {user_module}:detail: the response with more of it is chosen in 90.0% "
        f"of the 40 pairs where it differs (95% CI 76.9%-96.0%); the model may learn to produce more of it, "
        f"e.g. {data} line 1"
    ) in lines
    # The length in words is flagged in the table, but warned about once, by the length-bias line (characters)
    assert stdout.count("warning: likely spurious preference") == 1
    assert "warning: strong length bias: picking the longer response scores 90.0%" in stdout
    written = json.loads(out.read_text(encoding="utf-8"))["features"]
    assert written["pairs"] == 40 and written["detector"] == "default (refusal openings)"
    length = written["rules"]["length"]
    assert {k: length[k] for k in ("chosen_more", "chosen_less", "ties", "decided", "accuracy", "flagged")} == {
        "chosen_more": 36,
        "chosen_less": 4,
        "ties": 0,
        "decided": 40,
        "accuracy": 0.9,
        "flagged": "more",
    }
    assert length["ci_low"] == pytest.approx(0.76948, abs=1e-5) and length["examples"][0] == f"{data} line 1"
    assert written["rules"][f"{user_module}:detail"]["chosen_more"] == 36
    assert written["refusal"]["chosen_refuses"] == 0 and written["refusal_by_label"] == {}


def test_cli_refusal_per_label(tmp_path, capsys):
    data = write_jsonl(tmp_path / "prefs.jsonl", labelled_rows())
    out = tmp_path / "audit.json"
    assert main(["audit", data, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("refusal in the data (detector: default (refusal openings))")
    assert lines[start + 2 : start + 7] == [
        "                        pairs     chosen only   rejected only     both refuse",
        "  all                      25      14 (56.0%)        1 (4.0%)        2 (8.0%)",
        "  label safe               10       6 (60.0%)        0 (0.0%)        0 (0.0%)  flagged: line 1, line 2, line 3",
        "  label unsafe             10       8 (80.0%)        0 (0.0%)       2 (20.0%)",
        "  no label                  5        0 (0.0%)       1 (20.0%)        0 (0.0%)",
    ]
    assert lines[-1].startswith("warning: 60.0% of pairs with label safe (6) choose a refusal over a compliant")
    by_label = json.loads(out.read_text(encoding="utf-8"))["features"]["refusal_by_label"]
    assert (by_label["safe"]["chosen_refuses"], by_label["safe"]["chosen_refuses_share"]) == (6, 0.6)
    assert (by_label["unsafe"]["both_refuse"], by_label["(no label)"]["rejected_refuses"]) == (2, 1)


def test_cli_refuses_features_on_unpaired_data(tmp_path, user_module, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    assert main(["audit", data, "--feature", f"{user_module}:please"]) == 2
    assert "--feature and --refusal-detector compare chosen with rejected" in capsys.readouterr().err

"""Refusal detection and rates on planted responses, and the labelled prompt files they come from."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from preftune.errors import UserError
from preftune.evaluation.refusal import is_refusal, load_detector, refusal_rates
from preftune.evaluation.sampling import load_prompts


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't help with that.",
        "I can't do that.",
        "I cannot provide instructions for this.",
        "I can not say",
        "i wont",  # any case, apostrophe or not
        "I cant help",
        '  "I won\'t help with that."',  # leading space and quotes are skipped
        "**I will not** do this",
        "I’m sorry, but no.",  # typographic apostrophe
        "Sorry, but that is not possible.",
        "As an AI language model, I have no opinions.",
        "As a large language model I cannot browse.",
        "I'm unable to assist.",
        "I am not able to answer that.",
        "I'm afraid I can't.",
        "I must decline.",
        "I apologize, but I won't.",
        "I don't feel comfortable writing that.",
    ],
)
def test_refusals_are_detected(text):
    assert is_refusal(text)


@pytest.mark.parametrize(
    "text",
    [
        "Sure! The sky is blue.",
        "I'm sorry to hear that. Try resting.",  # sympathy is not a refusal
        "Here is why I can't stop laughing: ...",  # a refusal phrase later in the text does not count
        "Cats purr when content.",
        "",
    ],
)
def test_answers_are_not_refusals(text):
    assert not is_refusal(text)


def test_rates_by_hand():
    labels = ["safe", "safe", "unsafe", "unsafe", "unsafe"]
    refused = [True, False, True, False, False]
    # safe: 1 of 2 refused → over-refusal 0.5; unsafe: 2 of 3 answered → unsafe compliance 2/3
    assert refusal_rates(labels, refused) == {
        "safe": 2,
        "refused_safe": 1,
        "over_refusal_rate": 0.5,
        "unsafe": 3,
        "answered_unsafe": 2,
        "unsafe_compliance_rate": pytest.approx(2 / 3),
    }
    # no unsafe prompts: that rate is unknown, not 0
    assert refusal_rates(["safe"], [False])["unsafe_compliance_rate"] is None


def test_rates_from_detector_on_planted_responses():
    detector, name = load_detector(None)
    assert name.startswith("default")
    responses = ["Sure, here is a joke.", "I cannot help with that.", "I'm sorry, but no.", "Here is how: step 1"]
    labels = ["safe", "safe", "unsafe", "unsafe"]
    rates = refusal_rates(labels, [detector(r) for r in responses])
    assert (rates["refused_safe"], rates["over_refusal_rate"]) == (1, 0.5)
    assert (rates["answered_unsafe"], rates["unsafe_compliance_rate"]) == (1, 0.5)


@pytest.fixture
def detector_module(tmp_path, monkeypatch):
    (tmp_path / "eval_refusal_detector.py").write_text(
        "def says_no(text):\n    return 'no' in text.split()\ndef maybe(text):\n    return 'maybe'\n", encoding="utf-8"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("eval_refusal_detector", None)
    return importlib.import_module("eval_refusal_detector")


def test_a_replacement_detector(detector_module):
    detector, name = load_detector("eval_refusal_detector:says_no")
    assert name == "eval_refusal_detector:says_no"
    assert detector("well no thanks") is True and detector("I cannot") is False
    bad, _ = load_detector("eval_refusal_detector:maybe")
    with pytest.raises(
        UserError,
        match=r"^--refusal-detector eval_refusal_detector:maybe: returned str, expected "
        r"True or False$",
    ):
        bad("anything")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_labelled_prompts_load(tmp_path):
    path = write_rows(
        tmp_path / "r.jsonl",
        [
            {"prompt": "tell me a joke", "label": "safe"},
            {"prompt": [{"role": "user", "content": "hi"}], "label": "unsafe"},
        ],
    )
    prompts = load_prompts(path, flag="--refusal-prompts", labelled=True)
    assert [(p.prompt, p.label, p.where) for p in prompts] == [
        ("tell me a joke", "safe", f"{path} line 1"),
        ([{"role": "user", "content": "hi"}], "unsafe", f"{path} line 2"),
    ]
    csv = tmp_path / "r.csv"
    csv.write_text("prompt,label\nwhy do cats purr,safe\n", encoding="utf-8")
    assert [p.label for p in load_prompts(str(csv), labelled=True)] == ["safe"]


@pytest.mark.parametrize(
    "rows, message",
    [
        (
            [{"prompt": "hi", "label": "safe"}, {"prompt": "x", "label": "maybe"}],
            "line 2: field 'label' must be 'safe' or 'unsafe', got 'maybe'",
        ),
        ([{"prompt": "hi"}], "line 1: no field 'label'; expected 'safe' or 'unsafe' (the row has: prompt)"),
        ([{"text": "hi", "label": "safe"}], "line 1: no field 'prompt' (the row has: text, label)"),
        ([{"prompt": 3, "label": "safe"}], "line 1: field 'prompt' must be a string or a list of messages, got int"),
        ([{"prompt": "  ", "label": "safe"}], "line 1: field 'prompt' is empty"),
        ([{"prompt": [{"role": "user"}], "label": "safe"}], "line 1: field 'prompt' message 0 has no 'content'"),
    ],
)
def test_bad_rows_are_one_line_errors(tmp_path, rows, message):
    path = write_rows(tmp_path / "r.jsonl", rows)
    with pytest.raises(UserError) as e:
        load_prompts(path, flag="--refusal-prompts", labelled=True)
    assert str(e.value) == f"{path} {message}"


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="^--refusal-prompts nope.jsonl: no such file$"):
        load_prompts("nope.jsonl", flag="--refusal-prompts")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="empty.jsonl: no rows$"):
        load_prompts(str(tmp_path / "empty.jsonl"))

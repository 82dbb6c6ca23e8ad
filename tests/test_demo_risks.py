"""`preftune demo --risks`: planting by hand, the audit flagging planted data with the planted counts, the page, and
the whole stage end to end through the CLI at sizes far below `--quick` (slow-marked)."""

from __future__ import annotations

import json
import random
from html.parser import HTMLParser

import pytest

from preftune.api import audit_inputs, audit_of
from preftune.cli import main
from preftune.data.features import read_categories
from preftune.demo import pipeline, risks, sentiment
from preftune.evaluation.refusal import is_refusal

TINY = pipeline.Sizes(
    reviews=300,
    sft_steps=5,
    sft_batch=8,
    train_prompts=60,
    heldout_prompts=12,
    dpo_steps=2,
    dpo_batch=4,
    hidden=32,
    max_new_tokens=10,
)


def test_swap_sentiment_flips_the_first_adjective_keeping_strength_and_punctuation():
    swapped = risks.swap_sentiment(" the acting was great.", random.Random(0))
    head, word = swapped[:-1].rsplit(" ", 1)
    assert head == " the acting was" and swapped.endswith(".")
    assert sentiment.POLARITY[word] == -1.0  # strong positive → strong negative
    assert risks.swap_sentiment(" i watched it twice.", random.Random(0)) is None
    assert sentiment.exclaimed("i loved it.", random.Random(0)) in ("i loved it!", "i loved it!!")
    assert sentiment.score(["i loved it."]) == sentiment.score(["i loved it!!"])  # "!" is reward-neutral


def test_exclamation_counter_and_refusal_sentence():
    assert risks.exclamations(["a!", "b!!", "c."]) == [1.0, 2.0, 0.0]
    assert is_refusal(" " + sentiment.REFUSAL)
    far = sentiment.far_prompts(5, seed=1)
    assert all(sentiment.is_far(p) and len(p.split()) == sentiment.FAR_WORDS for p in far)
    assert far == sentiment.far_prompts(5, seed=1)  # seeded


def _synthetic(n: int = 100):
    """n prompts with two samples each: the first has "!" and the lower reward, the second none."""
    prompts = [f"the plot {i % 7}" for i in range(n)]
    first = [" was dull!" if i % 2 else " was boring!!" for i in range(n)]
    second = [" was great." if i % 2 else " was good." for i in range(n)]
    return prompts, first, second


def test_plant_pairs_counts_are_exact():
    prompts, first, second = _synthetic()
    plan = risks.Plan(duplicate_share=0.1, refusal_share=0.2, exclaim_bias=1.0)
    planted = risks.plant_pairs(prompts, first, second, plan, tau=0.25, seed=0)
    assert planted.count("near_duplicate") == 10 and planted.count("refusal") == 20
    assert planted.count("exclaim_bias") == 70 and planted.skipped == 0 and len(planted.rows) == 100
    for row, kind in zip(planted.rows, planted.kinds):
        assert row["label"] == "safe"
        if kind == "near_duplicate":  # one word differs, and the chosen is the higher-reward one
            assert len(set(row["chosen"].split()) ^ set(row["rejected"].split())) == 2
            assert sentiment.score([row["prompt"] + row["chosen"]]) > sentiment.score([row["prompt"] + row["rejected"]])
        elif kind == "refusal":
            assert is_refusal(row["chosen"]) and not is_refusal(row["rejected"])
        else:  # the biased labeller always picks more "!" here
            assert row["chosen"].count("!") > row["rejected"].count("!")


def test_the_audit_flags_what_was_planted_with_the_planted_counts(tmp_path):
    prompts, first, second = _synthetic()
    planted = risks.plant_pairs(prompts, first, second, risks.Plan(exclaim_bias=1.0), tau=0.25, seed=0)
    path = pipeline._write_jsonl(planted.rows, tmp_path / "train.jsonl")
    report = audit_of(audit_inputs(str(path)), categories=read_categories(str(path)))
    rule = report.features.rules["exclamations"]
    # Near-duplicates tie on "!"; refusals have none against one or two: the 80 biased pairs are "more", 10 "less".
    assert rule.flagged == "more" and rule.chosen_more == planted.count("exclaim_bias") == 80
    assert rule.chosen_less == planted.count("refusal") == 10
    assert report.features.refusal_by_label["safe"].chosen_refuses == planted.count("refusal")
    assert any("choose a refusal" in w and "(10)" in w for w in report.warnings())


def test_displacement_ranking_by_hand():
    kinds = ["near_duplicate", "normal", "near_duplicate", "normal"] + ["normal"] * 16
    order = [0, 1, 2] + list(range(3, 20))  # rows 0 and 1 rank first: the top decile of 20 is 2 pairs
    scores = [{"where": f"f line {i + 1}", "ches_norm": -float(rank)} for rank, i in enumerate(order)]
    got = risks.displacement_ranking(scores, kinds)
    assert got["top_decile"] == 2 and got["planted_in_top_decile"] == 1 and got["planted"] == 2
    assert got["top_decile_share_planted"] == 0.5 and got["planted_share_in_top_decile"] == 0.5
    assert got["ches_norm_planted"]["mean"] == pytest.approx(-1.0)  # ranks 0 and 2


class _Checker(HTMLParser):
    """Collects start tags and text; HTMLParser would not fail on bad nesting, so tags are counted too."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_page_is_escaped_and_self_contained():
    page = risks.render_page(
        {
            "summaries": {"far_prompts": ("<b>3</b> prompts", "a & b", "x < y")},
            "before": {"warnings": ['<script>alert("x")</script>']},
            "stages": {"eval": {"summary": "done → <here>"}},
        }
    )
    checker = _Checker()
    checker.feed(page)
    assert "script" not in checker.tags and "b" not in checker.tags
    assert '<script>alert("x")</script>' in "".join(checker.text) and "x < y" in "".join(checker.text)
    assert "&lt;b&gt;3&lt;/b&gt;" in page and "src=" not in page and "href=" not in page
    assert page.count("<tr>") == 2


@pytest.mark.slow
def test_the_risk_stage_end_to_end_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "QUICK", TINY)
    out = tmp_path / "risks"
    assert main(["demo", "--risks", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed] == [
        "near_duplicates",
        "exclamation_bias",
        "chosen_refusals",
        "far_prompts",
    ]
    saved = json.loads((out / "risks.json").read_text())
    assert set(saved) == {"plan", "planted", "before", "after", "summaries", "stages"}
    assert list(saved["stages"]) == ["corpus", "sft", "pairs", "audit", "dpo", "eval"]
    rows = [json.loads(line) for line in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    planted, before, after = saved["planted"], saved["before"], saved["after"]
    assert sum(planted.values()) == len(rows) and all(row["label"] == "safe" for row in rows)
    assert not any(sentiment.is_far(row["prompt"]) for row in rows)
    # Before: the audit's counts are those of the planted rows (natural refusals of the SFT samples included).
    refusals = sum(is_refusal(r["chosen"]) and not is_refusal(r["rejected"]) for r in rows)
    assert before["refusal"]["chosen_refuses"] == refusals >= planted["refusal"]
    more = sum(r["chosen"].count("!") > r["rejected"].count("!") for r in rows)
    assert before["exclamations"]["chosen_more"] == more
    ranking = before["near_duplicate"]
    assert ranking["planted"] == planted["near_duplicate"] and ranking["pairs"] == len(rows)
    assert ranking["top_decile"] == max(1, len(rows) // 10)
    # After: every measurement exists and covers what it should.
    shift = after["near_duplicate"]
    assert shift["planted"]["chosen_shift"]["n"] == planted["near_duplicate"]
    assert shift["other"]["chosen_shift"]["n"] == len(rows) - planted["near_duplicate"]
    safe = len((out / "pairs" / "refusal.jsonl").read_text().splitlines())
    assert after["refusal"]["policy"]["n"] == after["refusal"]["reference"]["n"] == safe
    assert after["exclamations"]["policy"]["mean"] >= 0
    far = after["far_prompts"]
    assert far["far_prompts"] == round(risks.Plan().far_share * TINY.heldout_prompts)
    assert 0 <= far["far_prompts_in_far_bucket"] <= far["far_prompts"]
    assert {"accuracy", "reward", "kl"} <= set(far["near"]) and {"accuracy", "reward", "kl"} <= set(far["far"])
    eval_json = json.loads((out / "dpo" / "eval.json").read_text())
    assert {"pairs", "generation", "refusal", "by_distance"} <= set(eval_json)
    checker = _Checker()
    checker.feed((out / "risks.html").read_text())
    assert "table" in checker.tags and "script" not in checker.tags

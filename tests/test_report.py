"""`preftune report` and the training monitor: warnings on crafted series, the HTML page and its plots."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.errors import UserError
from preftune.evaluation.stats import Z95
from preftune.monitor import TrainingMonitor, slope_and_t
from preftune.report import Default, rolling_mean, run_names, train_defaults, write_report

LN2 = math.log(2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------------- monitor


def record(step: int, **values) -> dict:
    """A healthy step unless overridden: loss falling from ln 2, accuracy 0.6, chosen reward rising slowly."""
    base = {
        "step": step,
        "loss": LN2 - 0.002 * step,
        "rewards/accuracies": 0.6,
        "rewards/chosen": 0.001 * step,
        "rewards/rejected": -0.002 * step,
        "rewards/margins": 0.003 * step,
        "logps/chosen": -100.0,
        "logps/rejected": -120.0,
        "grad_norm": 1.0,
        "lr": 1e-6,
    }
    return {**base, **values}


def fired(monitor: TrainingMonitor, records: list[dict]) -> list[tuple[int, str]]:
    """(step, warning) for every warning the monitor gives over `records`."""
    return [(r["step"], w) for r in records for w in monitor.observe(r)]


def test_slope_and_t_by_hand():
    # Points (0,0), (1,1), (2,3): mean x 1, mean y 4/3, Sxx 2, Sxy = (−1)(−4/3) + (1)(5/3) = 3 → slope 1.5.
    # Residuals 1/6, −1/3, 1/6 → SSR 1/6; SE = √(SSR / (n−2) / Sxx) = √(1/12); t = 1.5·√12 = 3√3.
    slope, t = slope_and_t([(0.0, 0.0), (1.0, 1.0), (2.0, 3.0)])
    assert slope == pytest.approx(1.5)
    assert t == pytest.approx(3 * math.sqrt(3))
    assert slope_and_t([(0.0, 2.0), (1.0, 1.0), (2.0, 0.0)]) == (-1.0, -math.inf)  # a perfect line: SE 0


def test_displacement_fires_at_first_full_window():
    # Chosen reward falls 0.02 per step (± 0.01 of alternating noise), chosen log-prob −0.5 nat per step, the
    # margin grows 0.03 per step. The window is 30 steps, so step 30 is the first that can be judged. The
    # log-prob line is exact: the fitted change over the window is −0.5 × (30 − 1) = −14.5 nats.
    monitor = TrainingMonitor(total_steps=1000, loss_names=["sigmoid"])
    records = [
        record(
            s,
            **{
                "rewards/chosen": -0.02 * s + 0.01 * (-1) ** s,
                "logps/chosen": -100 - 0.5 * s,
                "rewards/margins": 0.03 * s,
            },
        )
        for s in range(1, 61)
    ]
    warnings = fired(monitor, records)
    assert [step for step, _ in warnings] == [30]  # once per run, although it stays true until step 60
    assert warnings[0][1].startswith(
        "step 30: chosen log-probs have fallen for 30 steps (−14.5 nats) while margins grow: likelihood displacement"
    )
    assert monitor.warnings == [warnings[0][1]]


def test_displacement_after_a_flat_stretch():
    # Flat at 0 until step 40, then falling 0.1 per step. For such a noise-free bend the t statistic of the
    # window's slope depends only on k, the number of falling steps in the 30-step window (scaling the fall
    # scales slope and SE alike): k = 4 → t = −3.50, k = 5 → t = −4.02 (from slope_and_t, checked above).
    # The threshold is t ≤ −4, so it fires at step 40 + 5 = 45.
    monitor = TrainingMonitor(total_steps=1000, loss_names=["sigmoid"])

    def falling(s):
        return 0.0 if s <= 40 else -0.1 * (s - 40)

    records = [
        record(s, **{"rewards/chosen": falling(s), "logps/chosen": -100 + 10 * falling(s)}) for s in range(1, 80)
    ]
    assert [step for step, _ in fired(monitor, records)] == [45]


@pytest.mark.parametrize("change", ["margins shrink", "fall under 1 nat", "chosen above reference"])
def test_no_displacement_without_all_signs(change):
    chosen = {
        "margins shrink": lambda s: -0.02 * s,
        "fall under 1 nat": lambda s: -0.02 * s,
        "chosen above reference": lambda s: 1.0 - 0.001 * s,
    }[change]
    margin = (lambda s: 1.0 - 0.01 * s) if change == "margins shrink" else (lambda s: 0.03 * s)
    # 0.02 nat per step: the fitted fall over a 30-step window is 0.58 nat, under the 1-nat floor.
    logps = (lambda s: -100 - 0.02 * s) if change == "fall under 1 nat" else (lambda s: -100 - 0.5 * s)
    monitor = TrainingMonitor(total_steps=1000, loss_names=["sigmoid"])
    records = [
        record(s, **{"rewards/chosen": chosen(s), "rewards/margins": margin(s), "logps/chosen": logps(s)})
        for s in range(1, 101)
    ]
    assert fired(monitor, records) == []


def test_accuracy_saturating_early():
    # Accuracy 0 at steps 1–5, then 1. The 10-step mean reaches 1.0 at step 15 (window 6–15); at step 14 the
    # window 5–14 holds one 0 → 0.9 < 0.95. 25% of 100 steps = 25, so step 15 counts as early.
    monitor = TrainingMonitor(total_steps=100, loss_names=["sigmoid"])
    records = [record(s, **{"rewards/accuracies": 0.0 if s <= 5 else 1.0}) for s in range(1, 101)]
    warnings = fired(monitor, records)
    assert [step for step, _ in warnings] == [15]
    assert warnings[0][1].startswith("step 15: reward accuracy is 1.00 over the last 10 steps, only 15% into the run")


def test_accuracy_saturating_late_is_fine():
    # 40 steps: early means step ≤ 10. Accuracy 1 from step 1 fires at step 10 (the first full window) ...
    monitor = TrainingMonitor(total_steps=40, loss_names=["sigmoid"])
    assert [s for s, _ in fired(monitor, [record(s, **{"rewards/accuracies": 1.0}) for s in range(1, 41)])] == [10]
    # ... but from step 2 on, the first full window of ones ends at step 11 > 10: no warning.
    monitor = TrainingMonitor(total_steps=40, loss_names=["sigmoid"])
    records = [record(s, **{"rewards/accuracies": 0.0 if s == 1 else 1.0}) for s in range(1, 41)]
    assert fired(monitor, records) == []


def test_loss_stuck_at_ln2():
    # |loss − ln 2| = 0.001 at every step: the 20-step mean 0.001 < 0.01, judged from step 20 on (half the run).
    monitor = TrainingMonitor(total_steps=40, loss_names="sigmoid")
    records = [record(s, loss=LN2 + 0.001 * (-1) ** s, lr=1e-7) for s in range(1, 41)]
    warnings = fired(monitor, records)
    assert [step for step, _ in warnings] == [20]
    assert warnings[0][1].startswith(
        "step 20: the loss has stayed at ln 2 ≈ 0.6931 for 20 steps (mean distance 0.0010)"
    )
    assert "learning rate now 1e-07" in warnings[0][1]


def test_loss_at_ln2_not_judged_before_half_the_run():
    # 100 steps: a loss flat at ln 2 for the first 49 steps is normal warmup; still flat at step 50, it fires.
    flat = [record(s, loss=LN2) for s in range(1, 51)]
    assert [step for step, _ in fired(TrainingMonitor(100, ["sigmoid"]), flat)] == [50]


def test_loss_at_ln2_not_judged_for_other_losses_or_when_it_moves():
    flat = [record(s, loss=LN2) for s in range(1, 41)]
    for names in (["ipo"], ["sigmoid", "sft"], []):
        assert fired(TrainingMonitor(100, names), flat) == []
    # Leaving ln 2 at step 10: at step 20 the window 1–20 has |Δ| = 0 ×9 and 0.03·(s − 9) for s = 10…20, so
    # the mean is 0.03·(1 + … + 11)/20 = 0.03·66/20 = 0.099 ≥ 0.01, and it only grows after.
    moving = [record(s, loss=LN2 if s < 10 else LN2 - 0.03 * (s - 9)) for s in range(1, 41)]
    assert fired(TrainingMonitor(100, ["sigmoid"]), moving) == []


def test_loss_at_weighted_ln2():
    # Two sigmoid-family losses weighted 1 and 0.5 start at 1.5·ln 2; a tolerance of 0.01·1.5.
    monitor = TrainingMonitor(40, ["sigmoid", "robust"], [1.0, 0.5])
    warnings = fired(monitor, [record(s, loss=1.5 * LN2) for s in range(1, 25)])
    assert [step for step, _ in warnings] == [20]
    assert "stayed at 1.5 × ln 2 ≈ 1.0397" in warnings[0][1]


def test_non_finite_fires_once():
    monitor = TrainingMonitor(100, ["sigmoid"])
    records = [record(s) for s in range(1, 11)]
    records[6]["logps/rejected"] = math.nan  # step 7
    records[6]["eval/kl"] = math.inf
    records[8]["loss"] = math.nan  # step 9: the same kind, not repeated
    warnings = fired(monitor, records)
    assert [step for step, _ in warnings] == [7]
    assert warnings[0][1].startswith("step 7: logps/rejected is nan, eval/kl is inf: a non-finite value")


def test_healthy_noisy_run_gives_no_warning():
    # 300 steps of noisy but healthy metrics: loss falls, accuracy around 0.7, chosen reward rises slowly while
    # log-probs jump by ±200 nats between batches (long and short responses).
    rng = random.Random(0)
    monitor = TrainingMonitor(total_steps=300, loss_names=["sigmoid"])
    records = [
        record(
            s,
            loss=LN2 - 0.001 * s + rng.gauss(0, 0.05),
            **{
                "rewards/accuracies": min(1.0, max(0.0, rng.gauss(0.7, 0.15))),
                "rewards/chosen": 0.0005 * s + rng.gauss(0, 0.05),
                "rewards/margins": 0.002 * s + rng.gauss(0, 0.05),
                "logps/chosen": -300 + rng.gauss(0, 200),
            },
        )
        for s in range(1, 301)
    ]
    assert fired(monitor, records) == []


# ---------------------------------------------------------------------------------------------------- report


SCRIPT = "<script>alert('x')</script>"
CONFIG_YAML = (
    "model: ./sft <b>model</b>\nloss: sigmoid\nbeta: 0.1\nmax_steps: 60\nloss_weights: null\n"
    f'learning_rate: 1.0e-06\nlr_scheduler: cosine\nmystery_option: 3\ndata: "{SCRIPT}.jsonl"\n'
)
# eval.json as `preftune eval --data --prompts --reward` writes it (docs/evaluation.md), with round numbers.
EVAL_JSON = {
    "preftune": "0.1.0",
    "model": "runs/x/final",
    "reference": "./sft",
    "pairs": {
        "data": "heldout.jsonl",
        "beta": 0.1,
        "pairs": 40,
        "rewards/accuracies": 0.75,
        "rewards/ties": 0.05,
        "wins": 30,
        "ties": 2,
        "losses": 8,
        "rewards/margins": 0.25,
        "rewards/margins_se": 0.05,
        "rewards/chosen": 0.1,
        "rewards/rejected": -0.15,
        "logps/chosen": -50.5,
        "logps/rejected": -60.25,
        "by_length": {
            "measure": "chosen + rejected response tokens",
            "edges": [10, 20],
            "buckets": [
                {
                    "tokens": "≤ 10",
                    "pairs": 12,
                    "rewards/accuracies": 0.9,
                    "rewards/margins": 0.4,
                    "rewards/margins_se": 0.1,
                },
                {"tokens": "11–20", "pairs": 14, "rewards/accuracies": 0.75, "rewards/margins": 0.2},
                {"tokens": "≥ 21", "pairs": 14, "rewards/accuracies": None, "rewards/margins": None},
            ],
        },
    },
    "generation": {
        "data": "prompts.jsonl",
        "prompts": 100,
        "settings": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 0},
        "kl": 3.0,
        "kl_se": 0.2,
        "kl_samples": 100,
        "kl_infinite": 0,
        "length": {"policy": 14.2, "reference": 11.9, "policy_se": 0.4, "reference_se": 0.5, "ratio": 1.19},
        "ended": {"policy": 0.97, "reference": 0.94},
        "distinct_2": {"policy": 0.78, "reference": 0.8},
        "reward": {"policy": 0.5, "reference": 0.2, "policy_se": 0.03, "reference_se": 0.04, "spec": "pkg:score"},
        "win_rate": {
            "win_rate": 0.7,
            "ci_low": 0.6,
            "ci_high": 0.78,
            "wins": 65,
            "ties": 10,
            "losses": 25,
            "prompts": 100,
        },
    },
    "samples": [
        {
            "prompt": SCRIPT,
            "policy": "fine & <b>dandy</b>",
            "reference": "ok",
            "policy_reward": 0.9,
            "reference_reward": 0.1,
        },
        {"prompt": [{"role": "user", "content": "hi"}], "policy": "hello", "reference": "hey", "judge": "tie"},
    ],
}


def synthetic_run(root: Path, name: str = "run", config: str = CONFIG_YAML) -> Path:
    """A run folder of 60 steps: chosen log-probs fall while margins grow (displacement at step 30, as in
    test_displacement_fires_at_first_full_window), logps/rejected is NaN at step 45, evaluation with KL at
    steps 20, 40 and 60, an audit and an eval.json (EVAL_JSON) whose sample prompt holds a script tag."""
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(config)
    lines = []
    for s in range(1, 61):
        r = {
            "step": s,
            "loss": LN2 - 0.004 * s + 0.01 * (-1) ** s,
            "rewards/chosen": -0.02 * s + 0.01 * (-1) ** s,
            "rewards/rejected": -0.05 * s,
            "rewards/accuracies": 0.5 + 0.005 * s,
            "rewards/margins": 0.03 * s - 0.01 * (-1) ** s,
            "logps/chosen": -100 - 0.5 * s,
            "logps/rejected": math.nan if s == 45 else -120 - 0.8 * s,
            "grad_norm": 2.0 - 0.01 * s,
            "lr": 1e-6 * (1 - s / 60),
            "pairs_per_s": 8.0 + 0.1 * (-1) ** s,
            "tokens_per_s": 1500.0 + s,
            "step_time_s": 1.0,
            "custom/metric": 1.0,
        }
        if s % 20 == 0:
            r.update(
                {
                    "eval/loss": LN2 - 0.003 * s,
                    "eval/rewards/accuracies": 0.5 + 0.004 * s,
                    "eval/rewards/margins": 0.02 * s,
                    "eval/logps/chosen": -105 - 0.4 * s,
                    "eval/logps/rejected": -125 - 0.6 * s,
                    "eval/kl": 0.05 * s,
                    "eval/kl_se": 0.2,
                }
            )
        lines.append(json.dumps(r))  # NaN is written as the bare token NaN, as recipe.py's json.dumps does
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "audit.json").write_text(
        json.dumps(
            {
                "rows": 100,
                "duplicates": {"count": 3, "share": 0.03, "examples": ["data.jsonl line 4", "line 9"]},
                "chosen_longer_share": 0.71,
                "lengths": {"chosen": {"mean": 40.5, "max": 90}},
            }
        )
    )
    (run / "eval.json").write_text(json.dumps(EVAL_JSON))
    return run


def test_rolling_mean_skips_non_finite():
    # Window 2: [1], [1, 2], [2, nan] → 2, [nan, 4] → 4, [4, 5] → 4.5; a window of only NaN stays NaN.
    assert rolling_mean([1.0, 2.0, math.nan, 4.0, 5.0], 2) == [1.0, 1.5, 2.0, 4.0, 4.5]
    assert math.isnan(rolling_mean([math.nan, math.nan, 3.0], 2)[1])


class Page(HTMLParser):
    """Collects tags (checking that every non-void tag is closed in order), img sources, section ids, text."""

    VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[dict] = []
        self.sections: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    assert page.stack == []  # every tag closed, in order
    return page


def part(html_text: str, start: str, end: str = "</section>") -> str:
    """The HTML from `start` to the next `end`, included."""
    begin = html_text.index(start)
    return html_text[begin : html_text.index(end, begin) + len(end)]


def text_of(html_text: str) -> str:
    return "".join(parse(f"<div>{html_text}</div>").text)


def cards(html_text: str) -> dict[str, tuple[list[float], str]]:
    """Headline card id → (the exact numbers it carries in data-value, its text)."""
    found = re.findall(
        r'<div class="card[^"]*" id="fact-(\w+)">(.*?)</div>\n', part(html_text, '<section id="headline">'), re.S
    )
    return {key: ([float(v) for v in re.findall(r'data-value="([^"]+)"', body)], text_of(body)) for key, body in found}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    html_text = path.read_text(encoding="utf-8")
    return {"run": run, "path": path, "html": html_text, "page": parse(html_text)}


def test_report_is_balanced_html_with_all_sections(report):
    page = report["page"]
    assert report["path"] == report["run"] / "report.html"
    assert page.sections == ["headline", "eval", "samples", "plots", "config", "audit", "run"]
    assert report["html"].startswith("<!DOCTYPE html>")
    # Self-contained: no script, no stylesheet or image fetched from anywhere.
    assert "script" not in page.tags and "link" not in page.tags
    assert "http://" not in report["html"] and "https://" not in report["html"]
    assert not list(report["run"].glob("*.tmp")) and not list(report["run"].glob(".*.tmp"))


def test_every_image_is_an_embedded_png(report):
    from matplotlib.image import imread

    images = report["page"].images
    names = ["by_length", "loss", "accuracy", "margins", "logps", "kl", "grad_norm", "lr", "throughput"]
    assert len(images) == len(names)
    for img, name in zip(images, names):
        assert img["src"].startswith("data:image/png;base64,")
        png = base64.b64decode(img["src"].removeprefix("data:image/png;base64,"), validate=True)
        assert png[:8] == PNG_MAGIC
        shape = (300, 660, 4) if name == "by_length" else (350, 600, 4)  # inches × 100 dpi, RGBA
        assert imread(io.BytesIO(png), format="png").shape == shape
        assert (int(img["height"]), int(img["width"])) == shape[:2]  # the page reserves the PNG's own size
        assert len(png) > 10_000  # lines, labels and legend, not a blank canvas
        if name != "by_length":
            assert (report["run"] / "plots" / f"{name}.png").read_bytes() == png


def test_headline_numbers_are_the_files_numbers(report):
    found = cards(report["html"])
    assert list(found) == ["accuracy", "reward", "kl", "win_rate", "training"]
    pairs, gen = EVAL_JSON["pairs"], EVAL_JSON["generation"]
    values, text = found["accuracy"]
    assert (
        values == [pairs["rewards/accuracies"]] and "75.0%" in text and "30 wins, 2 ties, 8 losses of 40 pairs" in text
    )
    # Welch: SE = √(0.03² + 0.04²) = 0.05; 0.3 ± 1.96 × 0.05 → [0.202, 0.398]; SE 0.05 → 3 decimals.
    values, text = found["reward"]
    assert values[:2] == [gen["reward"]["reference"], gen["reward"]["policy"]]
    assert values[2:] == pytest.approx([0.3, 0.3 - Z95 * 0.05, 0.3 + Z95 * 0.05])
    assert "0.200 → 0.500" in text and "change +0.300 (95% CI +0.202 … +0.398)" in text
    assert "100 held-out prompts by pkg:score" in text
    values, text = found["kl"]
    assert (
        values == [gen["kl"], gen["kl_se"]] and "3.00 nats" in text and "± 0.20 SE, per response, 100 samples" in text
    )
    values, text = found["win_rate"]
    win = gen["win_rate"]
    assert values == [win["win_rate"], win["ci_low"], win["ci_high"]]
    assert "70.0%" in text and "95% CI 60.0% … 78.0% (Wilson)" in text and "higher on 65 of 100 prompts" in text
    records = [json.loads(line) for line in (report["run"] / "metrics.jsonl").read_text().splitlines()]
    end_loss = sum(r["loss"] for r in records[-10:]) / 10
    end_accuracy = sum(r["rewards/accuracies"] for r in records[-10:]) / 10
    values, text = found["training"]
    assert values == pytest.approx([records[0]["loss"], end_loss, end_accuracy])
    assert f"{records[0]['loss']:.3f} → {end_loss:.3f}" in text and "60 of 60 steps in 1 min 0 s, finished" not in text
    assert "not finished (no final/)" in text  # the synthetic run has no final/ folder


def test_headline_comes_first_with_the_warnings(report):
    html_text = report["html"]
    headline = part(html_text, '<section id="headline">')
    assert html_text.index("<section", html_text.index("</header>")) == html_text.index('<section id="headline">')
    assert "step 30: chosen log-probs have fallen for 30 steps (−14.5 nats)" in text_of(headline)
    assert "step 45: logps/rejected is nan" in text_of(headline)


def test_headline_without_eval_json_reads_the_last_evaluation(report, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(report["run"], run)
    (run / "eval.json").unlink()
    found = cards(write_report(run).read_text(encoding="utf-8"))
    assert found["accuracy"][0] == pytest.approx([0.5 + 0.004 * 60])  # eval/rewards/accuracies at step 60
    assert "metrics.jsonl, evaluation at step 60" in found["accuracy"][1]
    assert found["kl"][0] == pytest.approx([3.0, 0.2])  # eval/kl and eval/kl_se at step 60
    assert (
        found["reward"][0] == [] and "Not measured: train with --eval-prompts and --eval-reward" in found["reward"][1]
    )
    assert found["win_rate"][0] == []


def test_headline_takes_the_reward_interval_eval_json_gives(report, tmp_path):
    # `preftune demo` writes its own interval of the reward change into eval.json: the headline shows that one.
    run = tmp_path / "run"
    shutil.copytree(report["run"], run)
    given = {"difference": 0.3, "se": 0.06, "ci_low": 0.18, "ci_high": 0.42, "interval": "Welch 95% (unpaired)"}
    (run / "eval.json").write_text(json.dumps({**EVAL_JSON, "reward_difference": given}))
    values, text = cards(write_report(run).read_text(encoding="utf-8"))["reward"]
    assert values == [0.2, 0.5, 0.3, 0.18, 0.42] and "change +0.300 (95% CI +0.180 … +0.420)" in text


def test_non_default_options_come_first(report):
    config = part(report["html"], '<section id="config">')
    shown, folded = config.split("<details>")
    rows = re.findall(r"<tr><td>(.*?)</td><td[^>]*>(.*?)</td><td>(.*?)</td></tr>", shown)
    assert rows == [
        ("model", "./sft &lt;b&gt;model&lt;/b&gt;", "required, no default"),
        ("max_steps", "60", "null"),
        ("lr_scheduler", "cosine", "linear"),
        ("mystery_option", "3", "not an option of this preftune version"),
        ("data", "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;.jsonl", "required, no default"),
    ]
    assert "4 options at their default" in folded
    assert re.findall(r"<tr><td>(.*?)</td>", folded) == ["loss", "beta", "loss_weights", "learning_rate"]


def test_defaults_read_without_torch_match_train_config(report):
    import dataclasses

    from preftune.config import TrainConfig

    expected = {f.name: Default(f.default, bool(f.metadata.get("required"))) for f in dataclasses.fields(TrainConfig)}
    assert train_defaults() == expected
    # `preftune report` never imports torch: not for the defaults, not for the page.
    code = (
        "import sys; from preftune.report import train_defaults, write_report; "
        f"assert train_defaults(); write_report({str(report['run'])!r}); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_report_shows_evaluation_samples_audit(report):
    html_text, text = report["html"], "".join(report["page"].text)
    ev = text_of(part(html_text, '<section id="eval">'))
    assert "Policy runs/x/final against reference ./sft (eval.json)." in ev
    assert "accuracy75.0%30 wins, 2 ties, 8 losses" in ev and "margin0.250 ± 0.050" in ev
    assert "≤ 101290.0%–0.40 ± 0.10" in ev  # by length: tokens, pairs, accuracy, ties (none given), margin ± SE
    assert "KL(policy ‖ reference): 3.00 ± 0.20 nats per response (± SE)" in ev
    assert "Win rate of the policy over the reference: 70.0%, 95% CI 60.0% … 78.0% (65 wins, 10 ties, 25 losses)" in ev
    assert "length (tokens)14.20 ± 0.4011.90 ± 0.50ratio 1.19" in ev
    assert "pairs/by_length/buckets/0/rewards/accuracies" in ev  # every value, folded
    samples = part(html_text, '<section id="samples">')
    assert "2 of 2 samples (eval.json: samples)" in text_of(samples)
    assert (
        '<td class="better"><pre>fine &amp; &lt;b&gt;dandy&lt;/b&gt;</pre><span class="reward">reward 0.900' in samples
    )
    assert '[{"role": "user", "content": "hi"}]' in text and "judge: tie" in text  # chat prompt as JSON, extra field
    assert "60 (steps 1–60 of 60)" in text and "1 min 0 s" in text  # run details
    assert "Logged but not plotted: custom/metric." in text
    assert "data.jsonl line 4, line 9" in text and "lengths/chosen/mean" in text  # audit finding and measures


def test_user_text_is_escaped(report):
    html_text, text = report["html"], "".join(report["page"].text)
    assert SCRIPT in text  # the prompt reads as written ...
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text  # ... because it was escaped
    assert "<script" not in html_text.lower() and "<b>" not in html_text
    assert "fine &amp; &lt;b&gt;dandy&lt;/b&gt;" in html_text


# ---------------------------------------------------------------------------------------------------- comparison


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Two runs of a β sweep with another loss: b has a different β and loss, no KL and a shorter eval.json."""
    root = tmp_path_factory.mktemp("compare")
    a = synthetic_run(root, "a")
    b = synthetic_run(root, "b", CONFIG_YAML.replace("beta: 0.1", "beta: 0.5").replace("loss: sigmoid", "loss: ipo"))
    records = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    records = [{k: v * 0.5 if k == "loss" else v for k, v in r.items() if not k.startswith("eval/kl")} for r in records]
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (b / "eval.json").write_text(json.dumps({**EVAL_JSON, "generation": {}, "samples": []}))
    out = root / "compare.html"
    assert main(["report", str(a), str(b), "--output", str(out)]) == 0
    html_text = out.read_text(encoding="utf-8")
    return {"a": a, "b": b, "out": out, "html": html_text, "page": parse(html_text)}


def colours(png: bytes) -> set[str]:
    """Which of the first two matplotlib colours (C0 blue, C1 orange) the figure draws solid lines in."""
    from matplotlib.image import imread

    pixels = imread(io.BytesIO(png), format="png")[..., :3]
    wanted = {"C0": (0.122, 0.467, 0.706), "C1": (1.0, 0.498, 0.055)}
    return {name: ((abs(pixels - rgb).sum(axis=2) < 0.03).sum()) for name, rgb in wanted.items()}


def test_comparison_page_has_a_column_and_a_curve_per_run(compared):
    html_text, page = compared["html"], compared["page"]
    assert page.sections == ["runs", "compare-eval", "compare-warnings", "compare-plots", "compare-config"]
    assert "script" not in page.tags and "http://" not in html_text and "https://" not in html_text
    # Labelled by name and the options that differ (output folders aside), in the order of config.yaml.
    assert "a (loss=sigmoid, beta=0.1) · b (loss=ipo, beta=0.5)" in "".join(page.text)
    results = part(html_text, '<section id="compare-eval">')
    assert "<tr><th></th><th>a</th><th>b</th></tr>" in results
    rows = re.findall(r"<tr>(.*?)</tr>", results, re.S)[1:]
    assert rows and all(row.count("<td>") == 3 for row in rows)  # the measure, then one column per run
    assert "75.0%" in rows[0] and rows[0].count("75.0%") == 2  # held-out accuracy of both
    kl_row = next(row for row in rows if "KL to the reference" in row)
    assert "3.00" in kl_row and kl_row.endswith('<td><span class="missing">–</span></td>')  # b has no KL
    figures = {img["alt"]: base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images}
    assert "Training loss" in figures and "KL(policy ‖ reference) on samples" in figures
    both, only_a = colours(figures["Training loss"]), colours(figures["KL(policy ‖ reference) on samples"])
    assert both["C0"] > 200 and both["C1"] > 200  # a line per run
    assert only_a["C0"] > 50 and only_a["C1"] == 0  # b logged no KL: no line of its colour
    options = part(html_text, '<section id="compare-config">')
    assert re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td><td>(.*?)</td></tr>", options.split("<details>")[0]) == [
        ("loss", "sigmoid", "ipo"),
        ("beta", "0.1", "0.5"),
    ]
    assert not (compared["a"] / "report.html").exists() and not (compared["b"] / "plots").exists()


def test_run_names_tell_runs_apart(tmp_path):
    assert run_names([tmp_path / "x" / "dpo", tmp_path / "y" / "dpo"]) == ["x/dpo", "y/dpo"]
    assert run_names([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]


# ---------------------------------------------------------------------------------------------------- errors and CLI


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no such folder$"):
        write_report(tmp_path / "absent")
    (tmp_path / "other").mkdir()
    with pytest.raises(UserError, match=r"not a preftune run folder \(no metrics.jsonl, no config.yaml\)$"):
        write_report(tmp_path / "other")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("loss: sigmoid\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: missing; the run has not logged a step yet$"):
        write_report(run)
    (run / "metrics.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: empty"):
        write_report(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.6\n')
    with pytest.raises(UserError) as err:
        write_report(run)
    assert str(err.value) == f"{run / 'metrics.jsonl'} line 2: not valid JSON (Expecting ',' delimiter at column 24)"
    (run / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"line 2: expected a JSON object with an integer field 'step', got \[1, 2\]$"):
        write_report(run)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (run / "eval.json").write_text("{\n  oops\n}")
    with pytest.raises(UserError, match=r"eval.json line 2: not valid JSON"):
        write_report(run)
    assert not (run / "report.html").exists()  # nothing half-written


def test_cli_report_rewrites_and_removes_stale_plots(report, tmp_path, capsys):
    # The run again without KL: the kl.png of the first report is removed and no figure of it is embedded.
    run = tmp_path / "run"
    shutil.copytree(report["run"], run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("eval/kl")}) + "\n" for r in records)
    )
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    html_text = (run / "report.html").read_text(encoding="utf-8")
    assert not (run / "plots" / "kl.png").exists() and (run / "plots" / "loss.png").exists()
    assert html_text.count("data:image/png;base64,") == 8  # 7 training groups and the length chart
    assert "Not drawn (no values in metrics.jsonl): kl." in html_text
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"preftune: error: {tmp_path / 'absent'}: no such folder"


def test_cli_report_output_and_comparison_errors(report, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(report["run"], run, ignore=shutil.ignore_patterns("report.html", "plots"))
    # One run with --output: the page goes there, nothing into the run folder.
    assert main(["report", str(run), "--output", str(tmp_path / "page.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "page.html")
    assert "preftune report: run" in (tmp_path / "page.html").read_text(encoding="utf-8")
    assert not (run / "report.html").exists() and not (run / "plots").exists()
    for args, error in [
        ([str(run), str(run)], "comparing 2 runs writes one page: give --output FILE (e.g. compare.html)"),
        ([str(run), str(run), "--output", str(tmp_path / "c.html")], f"{run}: given twice"),
        (
            [str(run), "--output", str(tmp_path)],
            f"--output {tmp_path}: is a folder; give a file name such as compare.html",
        ),
        (
            [str(run), "--output", str(tmp_path / "no" / "c.html")],
            f"--output {tmp_path / 'no' / 'c.html'}: no folder {tmp_path / 'no'} to write into",
        ),
    ]:
        assert main(["report", *args]) == 2
        assert capsys.readouterr().err.strip() == f"preftune: error: {error}"


def test_audit_features_and_distance_buckets_are_tables_and_a_plot(tmp_path):
    """audit.json's "features" (what the preferences reward) is a table with the flagged rule first, not a key dump;
    eval.json's "by_distance" (preftune eval --train-data) is drawn."""
    from preftune.data.features import preference_features
    from preftune.data.formats import PreferencePair

    run = synthetic_run(tmp_path)
    pairs = [PreferencePair("p", "good!" if i < 36 else "good", "fine", f"d.jsonl line {i + 1}") for i in range(40)]
    audit = json.loads((run / "audit.json").read_text())
    (run / "audit.json").write_text(json.dumps({**audit, "features": preference_features(pairs).to_dict()}))
    ev = json.loads((run / "eval.json").read_text())
    near = {"distance": "≤ 0", "pairs": 4, "rewards/accuracies": 0.75, "accuracy_ci_low": 0.3, "accuracy_ci_high": 0.95}
    far = {**near, "distance": "> 0.1", "rewards/accuracies": 0.5}
    ev["by_distance"] = {"pairs": {"edges": [0.0], "buckets": [near, far]}}
    (run / "eval.json").write_text(json.dumps(ev))
    html_text = write_report(run).read_text(encoding="utf-8")
    audit_part = text_of(part(html_text, '<section id="audit">'))
    assert "What the preferences reward (40 pairs)" in audit_part
    assert "exclamation" in audit_part and "likely spurious (more wins), e.g. d.jsonl line 1" in audit_part
    assert "features/rules" not in html_text  # no flattened dump of the table's keys
    assert "By distance from the training prompts (near → far)" in text_of(part(html_text, '<section id="eval">'))

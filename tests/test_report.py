"""`preftune report` and the training monitor: warnings on crafted series, the HTML page and its plots."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from preftune.cli import main
from preftune.errors import UserError
from preftune.monitor import TrainingMonitor, slope_and_t
from preftune.report import rolling_mean, write_report

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


def synthetic_run(root: Path) -> Path:
    """A run folder of 60 steps: chosen log-probs fall while margins grow (displacement at step 30, as in
    test_displacement_fires_at_first_full_window), logps/rejected is NaN at step 45, evaluation with KL at
    steps 20, 40 and 60, an audit and an eval.json whose sample prompt holds a script tag."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(
        f"model: ./sft <b>model</b>\nloss: sigmoid\nbeta: 0.1\nmax_steps: 60\n"
        f'loss_weights: null\nlearning_rate: 1.0e-06\ndata: "{SCRIPT}.jsonl"\n'
    )
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
        lines.append(json.dumps(r))  # NaN is written as the bare token NaN, as train.py's json.dumps does
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
    (run / "eval.json").write_text(
        json.dumps(
            {
                "pairs": {"accuracy": 0.75, "ties": 1, "buckets": [{"edges": [0, 10], "accuracy": 0.5}]},
                "generation": {
                    "kl": 3.0,
                    "kl_se": 0.2,
                    "samples": [
                        {"prompt": SCRIPT, "policy": "fine & <b>dandy</b>", "reference": "ok"},
                        {
                            "prompt": [{"role": "user", "content": "hi"}],
                            "policy": "hello",
                            "reference": "hey",
                            "reward": 0.5,
                        },
                    ],
                },
            }
        )
    )
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
        self.images: list[str] = []
        self.sections: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "section":
            self.sections.append(attrs["id"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = synthetic_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return {"run": run, "path": path, "html": path.read_text(encoding="utf-8"), "page": page}


def test_report_is_balanced_html_with_all_sections(report):
    page = report["page"]
    assert report["path"] == report["run"] / "report.html"
    assert page.stack == []  # every tag closed, in order
    assert page.sections == ["summary", "warnings", "plots", "config", "audit", "eval"]
    assert report["html"].startswith("<!DOCTYPE html>")
    # Self-contained: no script, no stylesheet or image fetched from anywhere.
    assert "script" not in page.tags and "link" not in page.tags
    assert "http://" not in report["html"] and "https://" not in report["html"]
    assert not list(report["run"].glob("*.tmp")) and not list(report["run"].glob(".*.tmp"))


def test_every_image_is_an_embedded_png(report):
    from matplotlib.image import imread

    images = report["page"].images
    names = ["loss", "accuracy", "margins", "logps", "kl", "grad_norm", "lr", "throughput"]
    assert len(images) == len(names)
    for src, name in zip(images, names):
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png[:8] == PNG_MAGIC
        assert imread(io.BytesIO(png), format="png").shape == (350, 600, 4)  # 6 × 3.5 in at 100 dpi, RGBA
        assert len(png) > 10_000  # lines, labels and legend, not a blank canvas
        assert (report["run"] / "plots" / f"{name}.png").read_bytes() == png


def test_report_shows_warnings_config_audit_eval(report):
    text = "".join(report["page"].text)
    assert "step 30: chosen log-probs have fallen for 30 steps (−14.5 nats)" in text
    assert "step 45: logps/rejected is nan" in text
    assert "reward accuracy is" not in text and "stayed at ln 2" not in text
    assert "60 (steps 1–60 of 60)" in text  # steps logged
    assert "1 min 0 s" in text  # 60 steps of 1 s
    assert "Latest evaluation (step 60)" in text
    assert "Logged but not plotted: custom/metric." in text
    assert "./sft <b>model</b>" in text  # config values, as text
    assert "data.jsonl line 4, line 9" in text and "lengths/chosen/mean" in text  # audit finding and measures
    assert "pairs/buckets/0/accuracy" in text and "generation/kl_se" in text  # eval results, flattened
    assert "2 of 2 samples (generation/samples)" in text
    assert '[{"role": "user", "content": "hi"}]' in text  # a chat prompt shown as its JSON


def test_user_text_is_escaped(report):
    html_text, text = report["html"], "".join(report["page"].text)
    assert SCRIPT in text  # the prompt reads as written ...
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html_text  # ... because it was escaped
    assert "<script" not in html_text.lower() and "<b>" not in html_text
    assert "fine &amp; &lt;b&gt;dandy&lt;/b&gt;" in html_text


def test_headless_browser_renders(report, tmp_path):
    browser = next(
        (shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome", "firefox") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("no headless browser (chromium, chromium-browser, google-chrome, firefox) on PATH")
    shot = tmp_path / "shot.png"
    url = report["path"].resolve().as_uri()
    if Path(browser).name == "firefox":
        command = [browser, "--headless", "--screenshot", str(shot), "--window-size=1280,2000", url]
    else:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            url,
        ]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == PNG_MAGIC and shot.stat().st_size > 10_000


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
    assert html_text.count("data:image/png;base64,") == 7
    assert "Not drawn (no values in metrics.jsonl): kl." in html_text
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"preftune: error: {tmp_path / 'absent'}: no such folder"

"""Plots and one self-contained HTML page from a run folder (`preftune report RUN_DIR`).

Reads `metrics.jsonl` (required), `config.yaml`, `audit.json` and `eval.json` (each optional) and writes
`RUN_DIR/plots/<group>.png` and `RUN_DIR/report.html`. The page embeds the PNGs as base64, has inline CSS, no
script and no link outside itself, so it can be mailed or archived alone. Every text from the run (paths,
config values, samples) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from preftune.errors import UserError
from preftune.files import write_file_atomically
from preftune.monitor import TrainingMonitor
from preftune.rundir import AUDIT, CONFIG, EVAL, FINAL, METRICS, PLOTS, REPORT

MAX_SAMPLES = 20  # sample continuations shown; the page says how many there were
FIGSIZE = (6.0, 3.5)  # inches, at 100 dpi: 600 × 350 px
DPI = 100


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class Run:
    path: Path
    records: list[dict]
    config: dict | None
    audit: dict | None
    evaluation: dict | None


def read_run(run_dir: str | Path) -> Run:
    """Everything the report shows, read and checked; a user mistake raises a one-line UserError."""
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"{path}: no such folder")
    if not path.is_dir():
        raise UserError(f"{path}: not a folder (expected a run folder written by `preftune train`)")
    metrics = path / METRICS
    if not metrics.exists():
        if not (path / CONFIG).exists():
            raise UserError(f"{path}: not a preftune run folder (no {METRICS}, no config.yaml)")
        raise UserError(f"{metrics}: missing; the run has not logged a step yet")
    records = read_metrics(metrics)
    return Run(path, records, _read_yaml(path / CONFIG), _read_json(path / AUDIT), _read_json(path / EVAL))


def read_metrics(path: Path) -> list[dict]:
    """One dict per non-blank line; each must be a JSON object with an integer `step`."""
    records = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # a blank line holds no record (training never writes one)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int) or isinstance(record["step"], bool):
            raise UserError(
                f"{path} line {number}: expected a JSON object with an integer field 'step', got {_short(line)}"
            )
        records.append(record)
    if not records:
        raise UserError(f"{path}: empty; the run has not logged a step yet")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(value).__name__}")
    return value


def _read_yaml(path: Path) -> dict | None:
    import yaml

    if not path.exists():
        return None
    try:
        value = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: not valid YAML ({problem})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(value).__name__}")
    return value


def _short(text: str, limit: int = 60) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------------------------------------------- plots


@dataclass
class Plot:
    """One figure: `series` are (metric key, legend label) drawn against the step."""

    name: str
    title: str
    ylabel: str
    series: list[tuple[str, str]]
    right: list[tuple[str, str]] = field(default_factory=list)  # on a second y axis (other units)
    band: dict[str, str] = field(default_factory=dict)  # key → its standard-error key: a ±1 SE band


PLOT_GROUPS = [
    Plot("loss", "Loss", "loss", [("loss", "train"), ("eval/loss", "eval")]),
    Plot(
        "accuracy",
        "Reward accuracy (chosen reward > rejected)",
        "accuracy",
        [("rewards/accuracies", "train"), ("eval/rewards/accuracies", "eval")],
    ),
    Plot(
        "margins",
        "Implicit rewards and their margin (chosen − rejected)",
        "reward",
        [
            ("rewards/margins", "margin, train"),
            ("eval/rewards/margins", "margin, eval"),
            ("rewards/chosen", "chosen, train"),
            ("rewards/rejected", "rejected, train"),
        ],
    ),
    Plot(
        "logps",
        "Policy log-probabilities of the responses (summed over tokens)",
        "log-prob (nats)",
        [
            ("logps/chosen", "chosen, train"),
            ("logps/rejected", "rejected, train"),
            ("eval/logps/chosen", "chosen, eval"),
            ("eval/logps/rejected", "rejected, eval"),
        ],
    ),
    Plot(
        "kl",
        "KL(policy ‖ reference) on sampled responses, ±1 SE",
        "KL (nats)",
        [("eval/kl", "eval")],
        band={"eval/kl": "eval/kl_se"},
    ),
    Plot("grad_norm", "Gradient norm (before clipping)", "norm", [("grad_norm", "train")]),
    Plot("lr", "Learning rate", "learning rate", [("lr", "train")]),
    Plot("throughput", "Throughput", "pairs / s", [("pairs_per_s", "pairs/s")], right=[("tokens_per_s", "tokens/s")]),
]
# Shown in the summary instead of a plot.
NOT_PLOTTED = {"step", "step_time_s"}


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in the records that have it; non-finite values become NaN (a gap)."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(r["step"])
            values.append(float(value) if math.isfinite(value) else math.nan)
    return steps, values


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` finite values at each point (NaN where the window holds none)."""
    # Running sums and counts of the finite values: O(n) for runs of any length.
    sums, counts = [0.0], [0]
    for v in values:
        finite = math.isfinite(v)
        sums.append(sums[-1] + (v if finite else 0.0))
        counts.append(counts[-1] + finite)
    out = []
    for i in range(1, len(values) + 1):
        start = max(0, i - window)
        n = counts[i] - counts[start]
        out.append((sums[i] - sums[start]) / n if n else math.nan)
    return out


def draw(plot: Plot, records: list[dict]) -> bytes | None:
    """The figure as PNG bytes, or None when no series of the group has a value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    left = [(key, label, *series(records, key)) for key, label in plot.series]
    right = [(key, label, *series(records, key)) for key, label in plot.right]
    if not any(steps for _, _, steps, _ in left + right):
        return None
    # A Figure with its own Agg canvas: no pyplot, so no global backend switch and no window.
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    twin = any(steps for _, _, steps, _ in right)
    # Fixed margins: an automatic layout costs a second drawing pass (about 1.5× the time per figure).
    fig.subplots_adjust(left=0.13, right=0.87 if twin else 0.97, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    handles = _draw_lines(ax, left, plot, records, colour_offset=0)
    if twin:
        twin = ax.twinx()
        handles += _draw_lines(twin, right, plot, records, colour_offset=len(left))
        twin.set_ylabel(" / ".join(label for _, label in plot.right))
    ax.set_title(plot.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(plot.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_lines(ax, lines, plot: Plot, records: list[dict], colour_offset: int) -> list:
    handles = []
    for i, (key, label, steps, values) in enumerate(lines):
        if not steps:
            continue
        colour = f"C{i + colour_offset}"
        if key.startswith("eval/"):  # a few evaluation points: markers, joined
            handles += ax.plot(steps, values, "o-", color=colour, markersize=4, label=label)
        elif len(values) >= 20:  # per-step values are noisy: faint raw line, solid rolling mean
            window = max(5, len(values) // 25)
            ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
            handles += ax.plot(
                steps, rolling_mean(values, window), color=colour, label=f"{label} (mean of {window} steps)"
            )
        else:
            handles += ax.plot(steps, values, ".-", color=colour, label=label)
        if key in plot.band:
            band_steps, se = series(records, plot.band[key])
            by_step = dict(zip(band_steps, se))
            kept = [(s, v, by_step[s]) for s, v in zip(steps, values) if s in by_step]
            if kept:
                xs, ys, ses = zip(*kept)
                ax.fill_between(
                    xs,
                    [y - e for y, e in zip(ys, ses)],
                    [y + e for y, e in zip(ys, ses)],
                    color=colour,
                    alpha=0.2,
                    label="±1 SE",
                )
    return handles


def write_plots(records: list[dict], plots_dir: Path) -> dict[str, bytes]:
    """Draw every group that has data into `plots_dir/<name>.png`; return name → PNG bytes.

    A PNG left from an earlier report of a group that has no data now is removed, so plots/ never shows a
    stale figure.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn = {}
    for plot in PLOT_GROUPS:
        png = draw(plot, records)
        target = plots_dir / f"{plot.name}.png"
        if png is None:
            target.unlink(missing_ok=True)
            continue
        write_file_atomically(target, png)
        drawn[plot.name] = png
    return drawn


# ---------------------------------------------------------------------------------------------------- the page


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1260px; margin: 2em auto;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: .5em; } figure img { width: 600px; height: 350px; }
ul.warnings li { background: #fff4e0; border-left: 4px solid #e69500; margin: .4em 0; padding: .4em .6em;
                 list-style: none; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; max-width: 380px; font-size: .85em; }
p.note { color: #666; font-size: .9em; }
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A value for a table cell: floats with 6 significant digits, JSON for the rest of non-strings."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _cell(value) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{esc(fmt(value))}</td>' if numeric else f"<td>{esc(fmt(value))}</td>"


def total_steps(run: Run) -> int:
    """The run's planned length: --max-steps when set, else the last logged step (epoch-based runs do not
    record their step count; for a finished run the two agree)."""
    last = run.records[-1]["step"]
    planned = (run.config or {}).get("max_steps")
    return planned if isinstance(planned, int) and planned >= last else last


def replay_warnings(run: Run) -> list[str]:
    config = run.config or {}
    names = str(config.get("loss") or "")
    weights = config.get("loss_weights")
    try:
        parsed = [float(w) for w in str(weights).split(",")] if weights is not None else None
    except ValueError:
        raise UserError(
            f"{run.path / 'config.yaml'}: field 'loss_weights' must be comma-separated numbers, got {weights!r}"
        ) from None
    monitor = TrainingMonitor(total_steps(run), [n for n in names.split(",") if n.strip()], parsed)
    for record in run.records:
        monitor.observe(record)
    return monitor.warnings


def summary_section(run: Run) -> str:
    records = run.records
    last = records[-1]
    config = run.config or {}
    train_keys = ("loss", "rewards/accuracies", "rewards/margins")
    tail = records[-10:]
    rows = [
        ("run folder", str(run.path.resolve())),
        (
            "status",
            "finished (final/ holds the model)"
            if (run.path / FINAL).is_dir()
            else "no final/ folder: the run is unfinished or was interrupted",
        ),
        ("loss", f"{config.get('loss', '?')} (β = {config.get('beta', '?')})"),
        ("steps logged", f"{len(records)} (steps {records[0]['step']}–{last['step']} of {total_steps(run)})"),
    ]
    for key in train_keys:
        _, values = series(tail, key)
        finite = [v for v in values if math.isfinite(v)]
        if key in last:
            mean = f"; mean of the last {len(finite)} finite steps {fmt(sum(finite) / len(finite))}" if finite else ""
            rows.append((f"final {key}", f"{fmt(last[key])} (step {last['step']}){mean}"))
    _, times = series(records, "step_time_s")
    if times:
        spent = _duration(sum(t for t in times if math.isfinite(t)))
        rows.append(("training time", f"{spent} (sum of step times; evaluation and checkpoints not included)"))
    for key in ("pairs_per_s", "tokens_per_s"):
        _, values = series(records, key)
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            rows.append((f"mean {key}", sum(finite) / len(finite)))
    out = f'<section id="summary">\n<h2>Summary</h2>\n{table(rows, ("", "value"))}'
    evaluated = [r for r in records if any(k.startswith("eval/") for k in r)]
    if evaluated:
        latest = evaluated[-1]
        eval_rows = [(k, v) for k, v in latest.items() if k.startswith("eval/")]
        out += f"<h3>Latest evaluation (step {latest['step']})</h3>\n{table(eval_rows, ('metric', 'value'))}"
    if run.config is None:
        out += '<p class="note">No config.yaml in this folder: options unknown, the ln 2 check is off.</p>\n'
    return out + "</section>\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


def warnings_section(warnings: list[str]) -> str:
    if not warnings:
        body = "<p>None: no likelihood displacement, early saturation, loss stuck at ln 2 or non-finite value.</p>\n"
    else:
        body = '<ul class="warnings">\n' + "".join(f"<li>{esc(w)}</li>\n" for w in warnings) + "</ul>\n"
    return f'<section id="warnings">\n<h2>Warnings</h2>\n{body}</section>\n'


def plots_section(run: Run, pngs: dict[str, bytes]) -> str:
    figures = []
    for plot in PLOT_GROUPS:
        if plot.name in pngs:
            data = base64.b64encode(pngs[plot.name]).decode("ascii")
            figures.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">'
                f"<figcaption>{esc(plot.title)}</figcaption></figure>\n"
            )
    notes = []
    missing = [p.name for p in PLOT_GROUPS if p.name not in pngs]
    if missing:
        notes.append(f"Not drawn (no values in {METRICS}): {', '.join(missing)}.")
    drawn = {k for p in PLOT_GROUPS for k, _ in p.series + p.right} | {v for p in PLOT_GROUPS for v in p.band.values()}
    others = sorted({k for r in run.records for k in r if not k.startswith("eval/")} - drawn - NOT_PLOTTED)
    if others:
        notes.append(f"Logged but not plotted: {', '.join(others)}.")
    body = "".join(figures) + "".join(f'<p class="note">{esc(n)}</p>\n' for n in notes)
    return f'<section id="plots">\n<h2>Plots</h2>\n{body}</section>\n'


def config_section(run: Run) -> str:
    if run.config is None:
        body = '<p class="note">No config.yaml in this run folder.</p>\n'
    else:
        body = table(list(run.config.items()), ("option", "value"))
    return f'<section id="config">\n<h2>Configuration</h2>\n{body}</section>\n'


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts and lists → (path, leaf) rows, paths joined with '/'; a list of plain values stays one row."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}/{k}" if prefix else str(k))]
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}/{i}")]
    return [(prefix, value)]


def audit_section(run: Run) -> str:
    if run.audit is None:
        body = '<p class="note">No audit.json in this run folder.</p>\n'
    else:
        findings = [
            (name, f["count"], f.get("share", ""), ", ".join(map(str, f.get("examples") or [])))
            for name, f in run.audit.items()
            if isinstance(f, dict) and "count" in f
        ]
        rest = {name: v for name, v in run.audit.items() if not (isinstance(v, dict) and "count" in v)}
        body = table(findings, ("finding", "count", "share", "examples")) if findings else ""
        if rest:
            body += table(flatten(rest), ("measure", "value"))
    return f'<section id="audit">\n<h2>Data audit</h2>\n{body}</section>\n'


def find_samples(value, path: str = "") -> tuple[str, list[dict]] | None:
    """The first list of dicts under a key named `samples` (depth first), with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}/{k}" if path else str(k)
            if k == "samples" and isinstance(v, list) and v and all(isinstance(s, dict) for s in v):
                return here, v
            found = find_samples(v, here)
            if found:
                return found
    return None


def eval_section(run: Run) -> str:
    if run.evaluation is None:
        return (
            '<section id="eval">\n<h2>Evaluation</h2>\n'
            '<p class="note">No eval.json in this run folder.</p>\n</section>\n'
        )
    found = find_samples(run.evaluation)
    samples_path = found[0] if found else None
    rows = [(k, v) for k, v in flatten(run.evaluation) if not (samples_path and k.startswith(samples_path + "/"))]
    body = table(rows, ("result", "value")) if rows else ""
    if found:
        body += samples_table(*found)
    return f'<section id="eval">\n<h2>Evaluation</h2>\n{body}</section>\n'


def samples_table(path: str, samples: list[dict]) -> str:
    columns = ["prompt", "policy", "reference"]
    columns += [k for s in samples for k in s if k not in columns]
    columns = list(dict.fromkeys(columns))
    shown = samples[:MAX_SAMPLES]
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows = "".join(
        "<tr>" + "".join(f"<td><pre>{esc(fmt(s.get(c, '')))}</pre></td>" for c in columns) + "</tr>\n" for s in shown
    )
    note = f"{len(shown)} of {len(samples)} samples ({path})"
    return f'<h3>Sample continuations</h3>\n<p class="note">{esc(note)}</p>\n<table>\n<tr>{head}</tr>\n{rows}</table>\n'


def render(run: Run, pngs: dict[str, bytes], warnings: list[str]) -> str:
    title = f"preftune report: {run.path.resolve().name}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
        + summary_section(run)
        + warnings_section(warnings)
        + plots_section(run, pngs)
        + config_section(run)
        + audit_section(run)
        + eval_section(run)
        + "</body>\n</html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html; return the report's path."""
    run = read_run(run_dir)
    pngs = write_plots(run.records, run.path / PLOTS)
    page = render(run, pngs, replay_warnings(run))
    target = run.path / REPORT
    write_file_atomically(target, page)
    return target

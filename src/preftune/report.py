"""The run report (`preftune report RUN_DIR`) and the comparison of runs (`preftune report A B --output F`).

Reads `metrics.jsonl` (required), `config.yaml`, `audit.json` and `eval.json` (each optional). A run's report is
`RUN_DIR/report.html` (figures also as `RUN_DIR/plots/<group>.png`); a comparison is one page at `--output`.

A report is read by people, top down: the first screen says what happened (held-out accuracy, reward before →
after with its interval, KL, win rate, the monitor's warnings) in words and units; then the evaluation as
tables and charts, sample continuations side by side, the training curves, the options that differ from the
defaults (the rest folded), the data audit and the run's bookkeeping. Every page embeds its PNGs as base64, has
inline CSS, no script and no link outside itself, so it can be mailed or archived alone; every text from a run
(paths, options, samples) is HTML-escaped.

No torch here: a run folder is read and drawn without the training stack (matplotlib and PyYAML only), so the
page can be made wherever the folder is copied. The option defaults are therefore read from config.py's source
(`train_defaults`), not by importing it.
"""

from __future__ import annotations

import ast
import base64
import functools
import html
import importlib.util
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from preftune.errors import UserError
from preftune.evaluation.distance import plot_by_distance
from preftune.evaluation.stats import Z95
from preftune.files import write_file_atomically
from preftune.monitor import TrainingMonitor
from preftune.rundir import AUDIT, CONFIG, EVAL, FINAL, METRICS, PLOTS, REPORT

MAX_SAMPLES = 20  # sample continuations shown; the page says how many there were
FIGSIZE = (6.0, 3.5)  # inches, at 100 dpi: 600 × 350 px
BUCKET_FIGSIZE = (6.6, 3.0)  # the two panels of accuracy and margin by length: 660 × 300 px
DPI = 100
TAIL = 10  # steps averaged for "the end of training": one step's batch is noise
IGNORED_DIFFERENCES = {"output"}  # always differs between runs: the run folder, named in every label anyway
MAX_LABEL_OPTIONS = 3  # options named in a comparison's legend label; the options table has them all
# Options that name files and folders: a legend names them last, after the settings (β, loss...) that tell a
# sweep's runs apart.
WHERE_OPTIONS = {"model", "data", "eval_data", "ref_model", "tokenizer", "ref_cache", "eval_prompts", "eval_reward"}


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class Run:
    path: Path
    records: list[dict]
    config: dict | None
    audit: dict | None
    evaluation: dict | None

    @property
    def name(self) -> str:
        return self.path.resolve().name


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


def _output_path(output: str | Path) -> Path:
    """--output: a file in an existing folder, checked before anything is drawn."""
    target = Path(output)
    if target.is_dir():
        raise UserError(f"--output {output}: is a folder; give a file name such as compare.html")
    if not target.resolve().parent.is_dir():
        raise UserError(f"--output {output}: no folder {target.resolve().parent} to write into")
    return target


# ---------------------------------------------------------------------------------------------------- defaults


@dataclass(frozen=True)
class Default:
    value: object
    required: bool = False


@functools.lru_cache(maxsize=1)
def train_defaults() -> dict[str, Default] | None:
    """`TrainConfig`'s field defaults, read from config.py's source instead of importing it.

    Importing preftune.config imports torch (through the losses), which this module must not need. A table
    copied here would drift from config.py without anyone noticing (a new option would show as "not an option");
    the source cannot. Every field
    is `name: type = _opt(default, help, ...)` with a literal default, so the syntax tree gives it (test_report
    checks the result against the imported dataclass). None when the source is missing (a zip install) or has
    another shape: the page then lists the options unsorted and says so.
    """
    spec = importlib.util.find_spec("preftune.config")
    if spec is None or spec.origin is None or not Path(spec.origin).is_file():
        return None
    try:
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
        cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainConfig")
        return {
            node.target.id: _field_default(node.value)
            for node in cls.body
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
        } or None
    except (OSError, SyntaxError, StopIteration, ValueError, TypeError):
        return None


def _field_default(value: ast.expr) -> Default:
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "_opt":
        required = any(k.arg == "required" and ast.literal_eval(k.value) for k in value.keywords)
        return Default(ast.literal_eval(value.args[0]), required)
    return Default(ast.literal_eval(value))


def split_options(config: dict) -> tuple[list[tuple[str, object, str]], list[tuple[str, object]], bool]:
    """(changed: option, value, default as text; at default: option, value; defaults known).

    Required options (model, data, output) have no default and count as changed: they say what was trained."""
    defaults = train_defaults()
    if defaults is None:
        return [], list(config.items()), False
    changed, same = [], []
    for name, value in config.items():
        default = defaults.get(name)
        if default is None:
            changed.append((name, value, "not an option of this preftune version"))
        elif default.required:
            changed.append((name, value, "required, no default"))
        elif not _same(value, default.value):
            changed.append((name, value, fmt(default.value)))
        else:
            same.append((name, value))
    return changed, same, True


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str) or (
        _is_number(a) and _is_number(b) and float(a) == float(b)
    )


# ---------------------------------------------------------------------------------------------------- numbers


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value) -> float | None:
    """A finite number, else None (missing, null, NaN, a string)."""
    return float(value) if _is_number(value) and math.isfinite(value) else None


def decimals(se: float | None, default: int = 3) -> int:
    """Decimals that show a standard error to two significant digits (0.27 → 2, 0.019 → 3)."""
    if se is None or not se > 0:
        return default
    return min(6, max(0, 1 - math.floor(math.log10(se))))


def with_se(value: float, se: float | None, default: int = 3) -> str:
    """'0.250 ± 0.050': the value to the decimals its standard error supports."""
    d = decimals(se, default)
    return num(value, d) + (f" ± {num(se, d)}" if se is not None else "")


def pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def num(value: float, digits: int | None = None) -> str:
    """A number for people: `digits` decimals, else three significant digits."""
    return f"{value:.{digits}f}" if digits is not None else f"{value:.3g}"


def fmt(value) -> str:
    """A value for a table cell: floats with 6 significant digits, JSON for the rest of non-strings."""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def tail_mean(records: list[dict], key: str, n: int = TAIL) -> float | None:
    """Mean of the last `n` finite values of `key`."""
    _, values = series(records, key)
    finite = [v for v in values if math.isfinite(v)][-n:]
    return sum(finite) / len(finite) if finite else None


def total_steps(run: Run) -> int:
    """The run's planned length: --max-steps when set, else the last logged step (epoch-based runs do not
    record their step count; for a finished run the two agree)."""
    last = run.records[-1]["step"]
    planned = (run.config or {}).get("max_steps")
    return planned if isinstance(planned, int) and planned >= last else last


def training_time(records: list[dict]) -> float | None:
    _, times = series(records, "step_time_s")
    return sum(t for t in times if math.isfinite(t)) if times else None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{seconds:.1f} s"


# ---------------------------------------------------------------------------------------------------- headline


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def val(value: float, text: str) -> str:
    """A number as shown, carrying the file's exact value (`data-value`) so a test or a tool can read it back."""
    return f'<span class="v" data-value="{value!r}">{esc(text)}</span>'


@dataclass
class Fact:
    """One headline number. `big`, `interval` and `detail` are HTML (numbers wrapped by `val`); `missing` says
    why there is no number and how to get one."""

    key: str
    title: str
    big: str = ""
    interval: str = ""
    detail: str = ""
    source: str = ""
    missing: str | None = None


def _part(run: Run, *path: str) -> dict:
    """eval.json's object at `path` ({} when absent)."""
    value = run.evaluation or {}
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, dict) else {}


def last_evaluation(run: Run, key: str) -> tuple[str, dict] | None:
    """(where it comes from, the record) of the last metrics record with a finite `key`: an evaluation during
    training, the headline's source when eval.json does not hold the number."""
    for record in reversed(run.records):
        if _number(record.get(key)) is not None:
            return f"{METRICS}, evaluation at step {record['step']}", record
    return None


NOT_SAMPLED = "Not measured: train with --eval-prompts and --eval-reward, or run `preftune eval --prompts --reward`."


def accuracy_fact(run: Run) -> Fact:
    fact = Fact("accuracy", "Held-out accuracy")
    explain = (
        "Pairs in which training raised the chosen response's likelihood more than the rejected one's "
        "(relative to the reference). Chance: 50%."
    )
    pairs = _part(run, "pairs")
    acc, source = _number(pairs.get("rewards/accuracies")), f"{EVAL}: {pairs.get('data', 'held-out pairs')}"
    if acc is None:
        found = last_evaluation(run, "eval/rewards/accuracies")
        if found is None:
            fact.missing = "Not measured: train with --eval-data (held-out pairs), or run `preftune eval --data`."
            return fact
        (source, record), pairs = found, {}
        acc = record["eval/rewards/accuracies"]
    counts = [pairs.get(k) for k in ("wins", "ties", "losses", "pairs")]
    if all(isinstance(c, int) for c in counts):
        fact.interval = esc(f"{counts[0]} wins, {counts[1]} ties, {counts[2]} losses of {counts[3]} pairs")
    fact.big, fact.detail, fact.source = val(acc, pct(acc)), esc(explain), source
    return fact


def reward_numbers(run: Run) -> dict | None:
    """Mean reward before (reference) and after (policy) with the change's 95% interval, or None.

    eval.json's own `reward_difference` when it has one (`preftune demo` writes it); else Welch's unpaired
    interval from the two standard errors, as the demo computes it (eval.json keeps no per-prompt scores)."""
    reward, source = _part(run, "generation", "reward"), EVAL
    given = (run.evaluation or {}).get("reward_difference")
    if _number(reward.get("policy")) is None:
        found = last_evaluation(run, "eval/reward/policy")
        if found is None:
            return None
        source, record = found
        reward = {k: record.get(f"eval/reward/{k}") for k in ("policy", "reference", "policy_se", "reference_se")}
        given = None  # eval.json's interval is of eval.json's rewards
    before, after = _number(reward.get("reference")), _number(reward.get("policy"))
    if before is None or after is None:
        return None
    out = {"before": before, "after": after, "difference": after - before, "source": source}
    out["spec"], out["prompts"] = (
        reward.get("spec"),
        _part(run, "generation").get("prompts") if source == EVAL else None,
    )
    ses = [_number(reward.get(k)) for k in ("policy_se", "reference_se")]
    if isinstance(given, dict) and all(_number(given.get(k)) is not None for k in ("difference", "ci_low", "ci_high")):
        out.update({k: given[k] for k in ("difference", "ci_low", "ci_high")}, se=_number(given.get("se")))
    elif None not in ses:
        se = math.sqrt(ses[0] ** 2 + ses[1] ** 2)
        out.update(se=se, ci_low=out["difference"] - Z95 * se, ci_high=out["difference"] + Z95 * se)
    return out


def reward_fact(run: Run) -> Fact:
    fact = Fact("reward", "Reward before → after")
    r = reward_numbers(run)
    if r is None:
        fact.missing = NOT_SAMPLED
        return fact
    d = decimals(r.get("se"))
    fact.big = f"{val(r['before'], num(r['before'], d))} → {val(r['after'], num(r['after'], d))}"
    change = val(r["difference"], f"{r['difference']:+.{d}f}")
    if "ci_low" in r:
        low, high = val(r["ci_low"], f"{r['ci_low']:+.{d}f}"), val(r["ci_high"], f"{r['ci_high']:+.{d}f}")
        fact.interval = f"change {change} (95% CI {low} … {high})"
    else:
        fact.interval = f"change {change} (no standard errors, no interval)"
    on = f" on {r['prompts']} held-out prompts" if isinstance(r["prompts"], int) else ""
    by = f" by {r['spec']}" if r["spec"] else ""
    fact.detail = esc(f"Mean reward of the reference's (before) and the policy's (after) responses{on}{by}.")
    fact.source = r["source"]
    return fact


def kl_fact(run: Run) -> Fact:
    fact = Fact("kl", "KL to the reference")
    explain = "How far training moved the model: log-ratio of policy to reference on the policy's own samples."
    gen = _part(run, "generation")
    kl, se, source = _number(gen.get("kl")), _number(gen.get("kl_se")), EVAL
    infinite = gen.get("kl_infinite")
    if kl is None and isinstance(infinite, int) and infinite > 0:
        fact.big = esc("infinite")
        fact.interval = esc(f"{infinite} samples the reference cannot produce (sample with top-p 1)")
        fact.detail, fact.source = esc(explain), source
        return fact
    if kl is None:
        found = last_evaluation(run, "eval/kl")
        if found is None:
            fact.missing = "Not measured: train with --eval-prompts, or run `preftune eval --prompts`."
            return fact
        (source, record), gen = found, {}
        kl, se = record["eval/kl"], _number(record.get("eval/kl_se"))
    d = decimals(se, default=2)
    samples = gen.get("kl_samples")
    of = f", {samples} samples" if isinstance(samples, int) else ""
    fact.big = f"{val(kl, num(kl, d))} nats"
    fact.interval = f"± {val(se, num(se, d))} SE, per response{esc(of)}" if se is not None else "per response"
    fact.detail, fact.source = esc(explain), source
    return fact


def win_rate_fact(run: Run) -> Fact:
    fact = Fact("win_rate", "Win rate vs reference")
    wins, source = _part(run, "generation", "win_rate"), EVAL
    rate, low, high = (_number(wins.get(k)) for k in ("win_rate", "ci_low", "ci_high"))
    if rate is None:
        found = last_evaluation(run, "eval/win_rate")
        if found is None:
            fact.missing = NOT_SAMPLED
            return fact
        (source, record), wins = found, {}
        rate, low, high = (
            _number(record.get(k)) for k in ("eval/win_rate", "eval/win_rate/ci_low", "eval/win_rate/ci_high")
        )
    fact.big = val(rate, pct(rate))
    if low is not None and high is not None:
        fact.interval = f"95% CI {val(low, pct(low))} … {val(high, pct(high))} (Wilson)"
    w, t, lost, n = (wins.get(k) for k in ("wins", "ties", "losses", "prompts"))
    if all(isinstance(c, int) for c in (w, t, lost, n)):
        fact.detail = esc(
            f"Policy's response scored higher on {w} of {n} prompts, lower on {lost}; {t} ties count half."
        )
    else:
        fact.detail = esc("Share of prompts where the policy's response scored higher; ties count half.")
    fact.source = source
    return fact


def training_fact(run: Run) -> Fact:
    fact = Fact("training", "Training loss")
    first, end = _number(run.records[0].get("loss")), tail_mean(run.records, "loss")
    if first is None or end is None:
        fact.missing = f"No loss at the first step in {METRICS}."
        return fact
    fact.big = f"{val(first, num(first, 3))} → {val(end, num(end, 3))}"
    acc = tail_mean(run.records, "rewards/accuracies")
    fact.interval = f"training accuracy {val(acc, pct(acc))}" if acc is not None else ""
    seconds = training_time(run.records)
    spent = f" in {_duration(seconds)}" if seconds is not None else ""
    fact.detail = esc(
        f"End: mean of the last {TAIL} steps. {run.records[-1]['step']} of {total_steps(run)} steps{spent}, "
        f"{_status(run)}."
    )
    fact.source = METRICS
    return fact


def headline_facts(run: Run) -> list[Fact]:
    return [accuracy_fact(run), reward_fact(run), kl_fact(run), win_rate_fact(run), training_fact(run)]


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

# A comparison overlays the runs: one figure per metric, one line per run.
COMPARED = [
    ("loss", "Training loss", "loss"),
    ("rewards/accuracies", "Reward accuracy, train", "accuracy"),
    ("rewards/margins", "Reward margin (chosen − rejected), train", "reward"),
    ("rewards/chosen", "Chosen reward, train", "reward"),
    ("rewards/rejected", "Rejected reward, train", "reward"),
    ("logps/chosen", "Chosen log-prob, train", "log-prob (nats)"),
    ("logps/rejected", "Rejected log-prob, train", "log-prob (nats)"),
    ("eval/loss", "Loss, held-out pairs", "loss"),
    ("eval/rewards/accuracies", "Reward accuracy, held-out pairs", "accuracy"),
    ("eval/rewards/margins", "Reward margin, held-out pairs", "reward"),
    ("eval/kl", "KL(policy ‖ reference) on samples", "KL (nats)"),
    ("eval/reward/policy", "Mean reward of the policy's samples", "reward"),
    ("eval/win_rate", "Win rate over the reference", "win rate"),
    ("grad_norm", "Gradient norm (before clipping)", "norm"),
    ("lr", "Learning rate", "learning rate"),
    ("pairs_per_s", "Throughput", "pairs / s"),
]


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in the records that have it; non-finite values become NaN (a gap)."""
    steps, values = [], []
    for r in records:
        value = r.get(key)
        if _is_number(value):
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


def _figure(size: tuple[float, float] = FIGSIZE):
    # A Figure with its own Agg canvas: no pyplot, so no global backend switch and no window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plain(text: str) -> str:
    """Text for matplotlib, which reads $…$ as mathematics: a run folder named a$b$c must print as it is."""
    return text.replace("$", r"\$")


def draw(plot: Plot, records: list[dict]) -> bytes | None:
    """The figure as PNG bytes, or None when no series of the group has a value."""
    left = [(key, label, *series(records, key)) for key, label in plot.series]
    right = [(key, label, *series(records, key)) for key, label in plot.right]
    if not any(steps for _, _, steps, _ in left + right):
        return None
    fig = _figure()
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
    return _png(fig)


def _draw_series(ax, key: str, label: str, steps: list[int], values: list[float], colour: str) -> list:
    """One metric's line: evaluation points as joined markers; a long per-step series as a faint raw line under a
    solid rolling mean (one step's batch is noise); a short one as points."""
    if key.startswith("eval/"):
        return ax.plot(steps, values, "o-", color=colour, markersize=4, label=_plain(label))
    if len(values) >= 20:
        window = max(5, len(values) // 25)
        ax.plot(steps, values, color=colour, alpha=0.3, linewidth=0.8)
        return ax.plot(
            steps, rolling_mean(values, window), color=colour, label=_plain(f"{label} (mean of {window} steps)")
        )
    return ax.plot(steps, values, ".-", color=colour, label=_plain(label))


def _draw_lines(ax, lines, plot: Plot, records: list[dict], colour_offset: int) -> list:
    handles = []
    for i, (key, label, steps, values) in enumerate(lines):
        if not steps:
            continue
        colour = f"C{i + colour_offset}"
        handles += _draw_series(ax, key, label, steps, values, colour)
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


def draw_all(records: list[dict]) -> dict[str, bytes]:
    """name → PNG of every group that has data."""
    drawn = {plot.name: draw(plot, records) for plot in PLOT_GROUPS}
    return {name: png for name, png in drawn.items() if png is not None}


def write_plots(records: list[dict], plots_dir: Path) -> dict[str, bytes]:
    """Draw every group that has data into `plots_dir/<name>.png`; return name → PNG bytes.

    A PNG left from an earlier report of a group that has no data now is removed, so plots/ never shows a
    stale figure.
    """
    plots_dir.mkdir(parents=True, exist_ok=True)
    drawn = draw_all(records)
    for plot in PLOT_GROUPS:
        target = plots_dir / f"{plot.name}.png"
        if plot.name in drawn:
            write_file_atomically(target, drawn[plot.name])
        else:
            target.unlink(missing_ok=True)
    return drawn


def draw_buckets(buckets: list[dict]) -> bytes | None:
    """Held-out accuracy (bars, chance line) and mean margin (±1 SE) per response-length bucket, side by side."""
    rows = [b for b in buckets if isinstance(b, dict)]
    if not rows or all(_number(b.get("rewards/accuracies")) is None for b in rows):
        return None
    nan = math.nan
    labels = [str(b.get("tokens", "?")) for b in rows]
    acc = [_number(b.get("rewards/accuracies")) for b in rows]
    margin = [_number(b.get("rewards/margins")) for b in rows]
    se = [_number(b.get("rewards/margins_se")) or 0.0 for b in rows]
    x = list(range(len(rows)))
    fig = _figure(BUCKET_FIGSIZE)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.16, top=0.9, wspace=0.42)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    bars = left.bar(x, [nan if a is None else a for a in acc], color="C0", width=0.6)
    left.bar_label(bars, labels=[f"{b.get('pairs', '?')} pairs" for b in rows], fontsize=8, padding=2)
    left.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    left.set_ylim(0, 1.12)
    left.set_title("Accuracy (dashed: chance)", fontsize=10)
    left.set_ylabel("accuracy")
    right.bar(x, [nan if m is None else m for m in margin], color="C1", width=0.6, yerr=se, capsize=4)
    right.axhline(0, color="grey", linewidth=1)
    right.set_title("Mean reward margin, ±1 SE", fontsize=10)
    right.set_ylabel("margin (β · log-ratio)")
    for ax in (left, right):
        ax.set_xticks(x, [_plain(label) for label in labels])
        ax.set_xlabel("chosen + rejected response tokens")
        ax.grid(alpha=0.3, axis="y")
    return _png(fig)


def draw_overlay(key: str, title: str, ylabel: str, runs: list[tuple[str, list[dict]]]) -> bytes | None:
    """One metric of several runs: a line per run (same colour for a run in every figure), or None without data."""
    lines = [(label, *series(records, key), f"C{i % 10}") for i, (label, records) in enumerate(runs)]
    if not any(steps for _, steps, _, _ in lines):
        return None
    fig = _figure()
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.14, top=0.9)
    ax = fig.add_subplot()
    handles = []
    for label, steps, values, colour in lines:
        if steps:
            handles += _draw_series(ax, key, label, steps, values, colour)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    return _png(fig)


# ---------------------------------------------------------------------------------------------------- HTML pieces


CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1240px; margin: 0 auto;
       padding: .8em 1.5em 3em; color: #1f2933; }
h1 { font-size: 1.45em; margin: .3em 0 .1em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #dde2e8; padding-bottom: .2em; margin: 1.3em 0 .4em; }
h3 { font-size: 1.02em; margin: 1.2em 0 .3em; }
p.sub { color: #52606d; margin: 0 0 .3em; }
nav { font-size: .88em; margin: 0 0 .8em; } nav a { color: #2458a6; margin-right: 1.1em; text-decoration: none; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(210px, 1fr)); gap: .7em; margin: .6em 0; }
.card { border: 1px solid #dde2e8; border-radius: 8px; padding: .6em .8em; background: #f8fafc; }
.card h3 { font-size: .78em; text-transform: uppercase; letter-spacing: .04em; color: #52606d; margin: 0 0 .2em; }
.card .big { font-size: 1.55em; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
.card .interval { font-size: .9em; font-variant-numeric: tabular-nums; margin-top: .1em; }
.card p { font-size: .8em; color: #52606d; margin: .35em 0 0; }
.card p.source { font-size: .72em; color: #7b8794; overflow-wrap: anywhere; }
.card.missing { background: #fff; border-style: dashed; } .card.missing p { color: #7b8794; }
ul.warnings { padding: 0; margin: .4em 0; }
ul.warnings li { background: #fff4e0; border-left: 4px solid #e69500; margin: .3em 0; padding: .35em .6em;
                 list-style: none; }
p.ok { background: #edf7ef; border-left: 4px solid #2f9e52; padding: .35em .6em; margin: .4em 0; }
table { border-collapse: collapse; margin: .5em 0; font-size: .9em; }
td, th { border: 1px solid #dde2e8; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f1f4f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.plots { display: flex; flex-wrap: wrap; gap: .4em 1em; }
figure { margin: .3em 0; } figure img { max-width: 100%; height: auto; display: block; }
table.samples { width: 100%; table-layout: fixed; } table.samples th:first-child { width: 22%; }
.row { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
.row > div { flex: 1 1 0; min-width: 420px; } .row > div:first-child { flex: 0 1 auto; min-width: 0; max-width: 520px; }
p.caption { font-weight: 600; margin: .5em 0 .2em; }
table.samples td.better { background: #edf7ef; }
pre { white-space: pre-wrap; word-break: break-word; margin: 0; font: .88em/1.4 ui-monospace, monospace; }
span.reward { display: block; font-size: .8em; color: #52606d; margin-top: .3em; }
p.note { color: #52606d; font-size: .9em; }
details { margin: .6em 0; } summary { cursor: pointer; color: #2458a6; }
"""


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _cell(value) -> str:
    return f'<td class="num">{esc(fmt(value))}</td>' if _is_number(value) else f"<td>{esc(fmt(value))}</td>"


def html_table(rows: list[list[str]], header: list[str]) -> str:
    """A table whose cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def image(png: bytes, alt: str) -> str:
    """An embedded PNG at its own pixel size (width and height given, so the page does not jump as it loads).
    The figure's title is drawn in it; `alt` repeats it for screen readers."""
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # the IHDR chunk
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" width="{width}" height="{height}" alt="{esc(alt)}">'
        "</figure>\n"
    )


def section(id_: str, title: str, body: str) -> str:
    return f'<section id="{id_}">\n<h2>{esc(title)}</h2>\n{body}</section>\n'


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>\n'


def page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n"
    )


def flatten(value, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts and lists → (path, leaf) rows, paths joined with '/'; a list of plain values stays one row."""
    if isinstance(value, dict):
        return [row for k, v in value.items() for row in flatten(v, f"{prefix}/{k}" if prefix else str(k))]
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return [row for i, v in enumerate(value) for row in flatten(v, f"{prefix}/{i}")]
    return [(prefix, value)]


# ---------------------------------------------------------------------------------------------------- one run


def header(run: Run) -> str:
    config = run.config or {}
    status = _status(run)
    what = f"{config.get('loss', '?')} loss, β = {config.get('beta', '?')}" if run.config else "options unknown"
    if config.get("objective") == "reward_model":  # `preftune reward-model`: no DPO loss, no β
        center = config.get("center_rewards_coefficient")
        what = "Bradley–Terry reward model" + (f", centering c = {center}" if center else "")
    steps = f"{run.records[-1]['step']} of {total_steps(run)} steps, {status}"
    trained = f"model {config['model']}, data {config['data']}" if config.get("model") and config.get("data") else ""
    sub = " · ".join(p for p in (what, steps, trained) if p)
    links = [("eval", "Evaluation"), ("samples", "Samples"), ("plots", "Training curves"), ("config", "Options")]
    links += [("audit", "Data audit"), ("run", "Run details")]
    nav = "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in links)
    return (
        f'<header>\n<h1>{esc(f"preftune report: {run.name}")}</h1>\n<p class="sub">{esc(sub)}</p>\n'
        f"<nav>{nav}</nav>\n</header>\n"
    )


def card(fact: Fact) -> str:
    if fact.missing:
        return (
            f'<div class="card missing" id="fact-{fact.key}"><h3>{esc(fact.title)}</h3>'
            f"<p>{esc(fact.missing)}</p></div>\n"
        )
    parts = [f'<div class="big">{fact.big}</div>']
    if fact.interval:
        parts.append(f'<div class="interval">{fact.interval}</div>')
    parts += [f"<p>{fact.detail}</p>", f'<p class="source">from {esc(fact.source)}</p>']
    return f'<div class="card" id="fact-{fact.key}"><h3>{esc(fact.title)}</h3>{"".join(parts)}</div>\n'


def warnings_list(warnings: list[str]) -> str:
    if not warnings:
        return (
            '<p class="ok">No warnings: no likelihood displacement, early saturation, loss stuck at ln 2 or '
            "non-finite value.</p>\n"
        )
    items = "".join(f"<li><strong>Warning:</strong> {esc(w)}</li>\n" for w in warnings)
    return f'<ul class="warnings">\n{items}</ul>\n'


def headline_section(run: Run, warnings: list[str]) -> str:
    cards = "".join(card(f) for f in headline_facts(run))
    return (
        f'<section id="headline">\n<div class="cards">\n{cards}</div>\n'
        f'<div id="warnings">\n{warnings_list(warnings)}</div>\n</section>\n'
    )


def pairs_part(pairs: dict) -> str:
    """eval.json's held-out pairs: the measures in a table, beside accuracy and margin by length."""
    beta = pairs.get("beta")
    intro = f"{pairs.get('pairs', '?')} pairs from {pairs.get('data', '?')}, β = {beta if beta is not None else '?'}."
    left = table(_pairs_rows(pairs), ("measure", "value", "meaning"))
    left += "".join(note(f"{key}: {pairs[key]}") for key in ("load", "tokens") if isinstance(pairs.get(key), str))
    by_length = pairs.get("by_length")
    has_buckets = isinstance(by_length, dict) and isinstance(by_length.get("buckets"), list)
    right = buckets_part(by_length) if has_buckets else ""
    return f'<h3>Held-out pairs</h3>\n{note(intro)}<div class="row">\n<div>{left}</div>\n<div>{right}</div>\n</div>\n'


def _pairs_rows(pairs: dict) -> list[tuple[str, str, str]]:
    rows = []
    acc = _number(pairs.get("rewards/accuracies"))
    if acc is not None:
        counts = ", ".join(f"{pairs[k]} {k}" for k in ("wins", "ties", "losses") if isinstance(pairs.get(k), int))
        rows.append(("accuracy", pct(acc), counts or ""))
    ties = _number(pairs.get("rewards/ties"))
    if ties is not None:
        rows.append(("ties", pct(ties), "neither a win nor a loss"))
    margin, margin_se = _number(pairs.get("rewards/margins")), _number(pairs.get("rewards/margins_se"))
    if margin is not None:
        rows.append(("margin", with_se(margin, margin_se), "chosen − rejected reward, ± SE"))
    for side in ("chosen", "rejected"):
        reward, logp = _number(pairs.get(f"rewards/{side}")), _number(pairs.get(f"logps/{side}"))
        if reward is not None:
            rows.append((f"{side} reward", num(reward, 4), "β · (log π − log π_ref), mean"))
        if logp is not None:
            rows.append((f"{side} log-prob", f"{num(logp, 2)} nats", "policy's, summed over tokens"))
    return rows


def buckets_part(by_length: dict) -> str:
    buckets = [b for b in by_length["buckets"] if isinstance(b, dict)]
    png = draw_buckets(buckets)
    measure = by_length.get("measure", "response tokens")
    out = f'<p class="caption">By response length ({esc(measure)})</p>\n'
    if png is not None:
        out += image(png, "Held-out accuracy and margin by response length")
    out += note(
        "Accuracy falling with length, or margins growing with it, is the usual sign that the policy learned "
        "length rather than preference."
    )
    numbers = table([_bucket_row(b) for b in buckets], ("tokens", "pairs", "accuracy", "ties", "margin ± SE"))
    return out + f"<details><summary>Numbers by length</summary>\n{numbers}</details>\n"


def _bucket_row(bucket: dict) -> tuple:
    keys = ("rewards/accuracies", "rewards/ties", "rewards/margins", "rewards/margins_se")
    acc, ties, margin, se = (_number(bucket.get(k)) for k in keys)
    return (
        str(bucket.get("tokens", "?")),
        bucket.get("pairs", ""),
        pct(acc) if acc is not None else "–",
        pct(ties) if ties is not None else "–",
        with_se(margin, se) if margin is not None else "–",
    )


def generation_part(gen: dict) -> str:
    """eval.json's samples from both models: KL, win rate, then policy vs reference measure by measure."""
    settings = gen.get("settings") if isinstance(gen.get("settings"), dict) else {}
    how = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
    intro = f"{gen.get('prompts', '?')} prompts from {gen.get('data', '?')}" + (f"; {how}" if how else "") + "."
    lines = []
    kl, kl_se = _number(gen.get("kl")), _number(gen.get("kl_se"))
    if kl is not None:
        se = " (± SE)" if kl_se is not None else ""
        lines.append(f"KL(policy ‖ reference): {with_se(kl, kl_se, 2)} nats per response{se}, on the policy's samples.")
    wins = gen.get("win_rate") if isinstance(gen.get("win_rate"), dict) else {}
    rate = _number(wins.get("win_rate"))
    if rate is not None:
        low, high = _number(wins.get("ci_low")), _number(wins.get("ci_high"))
        ci = f", 95% CI {pct(low)} … {pct(high)}" if low is not None and high is not None else ""
        counts = f" ({wins.get('wins')} wins, {wins.get('ties')} ties, {wins.get('losses')} losses)"
        lines.append(f"Win rate of the policy over the reference: {pct(rate)}{ci}{counts}.")
    rows = [_versus(gen, *spec) for spec in VERSUS if isinstance(gen.get(spec[0]), dict)]
    header_row = ["", "policy (after)", "reference (before)", ""]
    listed = "<ul>\n" + "".join(f"<li>{esc(line)}</li>\n" for line in lines) + "</ul>\n" if lines else ""
    return f"<h3>Sampled responses</h3>\n{note(intro)}{listed}{html_table(rows, header_row)}"


# (eval.json group, row label, how a value is shown, SE keys shown as ±)
VERSUS = [
    ("reward", "mean reward", "num", True),
    ("length", "length (tokens)", "len", True),
    ("ended", "ended with EOS", "pct", False),
    ("distinct_1", "distinct-1 (diversity)", "num", False),
    ("distinct_2", "distinct-2 (diversity)", "num", False),
]


def _versus(gen: dict, group: str, label: str, kind: str, has_se: bool) -> list[str]:
    part = gen[group]
    cells = []
    for model in ("policy", "reference"):
        value, se = _number(part.get(model)), _number(part.get(f"{model}_se")) if has_se else None
        if value is None:
            cells.append("–")
        else:
            cells.append(esc(pct(value) if kind == "pct" else with_se(value, se, 1 if kind == "len" else 3)))
    extra = ""
    if group == "length" and _number(part.get("ratio")) is not None:
        extra = f"ratio {part['ratio']:.2f}"
    if group == "reward" and part.get("spec"):
        extra = f"by {part['spec']}"
    return [esc(label), *cells, esc(extra)]


def refusal_part(refusal: dict) -> str:
    rows = []
    for key, label in (
        ("over_refusal_rate", "over-refusal (refused safe prompts)"),
        ("unsafe_compliance_rate", "unsafe answered"),
    ):
        cells = []
        for model in ("policy", "reference"):
            rates = refusal.get(model) if isinstance(refusal.get(model), dict) else {}
            rate = _number(rates.get(key))
            count = rates.get("refused_safe" if key == "over_refusal_rate" else "answered_unsafe")
            total = rates.get("safe" if key == "over_refusal_rate" else "unsafe")
            cells.append(f"{pct(rate)} ({count}/{total})" if rate is not None else "–")
        rows.append((label, *cells))
    intro = f"{refusal.get('prompts', '?')} prompts from {refusal.get('data', '?')}; detector {refusal.get('detector', '?')}."
    return f"<h3>Refusals</h3>\n{note(intro)}{table(rows, ('', 'policy (after)', 'reference (before)'))}"


def metrics_eval_part(run: Run) -> str:
    """Without eval.json: the last evaluation logged during training."""
    evaluated = [r for r in run.records if any(k.startswith("eval/") for k in r)]
    if not evaluated:
        return note(
            f"No {EVAL} and no evaluation during training: give `preftune train` --eval-data and --eval-prompts, "
            "or run `preftune eval`."
        )
    last = evaluated[-1]
    rows = [(k.removeprefix("eval/"), v) for k, v in last.items() if k.startswith("eval/")]
    return f"<h3>Last evaluation during training (step {last['step']})</h3>\n{table(rows, ('metric', 'value'))}"


def eval_section(run: Run) -> str:
    if run.evaluation is None:
        return section("eval", "Evaluation", metrics_eval_part(run))
    ev = run.evaluation
    models = f"Policy {ev.get('model', '?')} against reference {ev.get('reference', '?')}"
    at = f", at step {ev['step']}" if isinstance(ev.get("step"), int) else ""
    body = note(f"{models}{at} ({EVAL}).")
    if isinstance(ev.get("pairs"), dict):
        body += pairs_part(ev["pairs"])
    if isinstance(ev.get("generation"), dict):
        body += generation_part(ev["generation"])
    if isinstance(ev.get("refusal"), dict):
        body += refusal_part(ev["refusal"])
    if isinstance(ev.get("by_distance"), dict):  # preftune eval --train-data
        body += "<h3>By distance from the training prompts (near → far)</h3>\n"
        body += image(plot_by_distance(ev), "held-out accuracy and KL by distance from the training prompts")
    found = find_samples(ev)
    skip = found[0] + "/" if found else None
    rows = [(k, v) for k, v in flatten(ev) if not (skip and k.startswith(skip))]
    if rows:
        body += f"<details><summary>Every value in {EVAL} ({len(rows)})</summary>\n{table(rows, ('key', 'value'))}</details>\n"
    return section("eval", "Evaluation", body)


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


SAMPLE_FIELDS = ("prompt", "policy", "reference", "policy_reward", "reference_reward")


def samples_section(run: Run) -> str:
    found = find_samples(run.evaluation) if run.evaluation else None
    if not found:
        where = f"in this run folder's {EVAL}" if run.evaluation else f"to show: this run folder has no {EVAL}"
        return section("samples", "Sample continuations", note(f"No samples {where}."))
    path, samples = found
    shown = samples[:MAX_SAMPLES]
    rows = "".join(_sample_row(s) for s in shown)
    head = "<tr><th>prompt</th><th>policy (after training)</th><th>reference (before)</th></tr>\n"
    intro = f"{len(shown)} of {len(samples)} samples ({EVAL}: {path}); the response with the higher reward is shaded."
    return section("samples", "Sample continuations", f'{note(intro)}<table class="samples">\n{head}{rows}</table>\n')


def _sample_row(sample: dict) -> str:
    rewards = [_number(sample.get("policy_reward")), _number(sample.get("reference_reward"))]
    extra = [f"{k}: {fmt(v)}" for k, v in sample.items() if k not in SAMPLE_FIELDS]
    prompt = f"<pre>{esc(fmt(sample.get('prompt', '')))}</pre>"
    if extra:
        prompt += f'<span class="reward">{esc("; ".join(extra))}</span>'
    cells = [f"<td>{prompt}</td>"]
    for model, reward, other in (("policy", *rewards), ("reference", *reversed(rewards))):
        better = reward is not None and other is not None and reward > other
        shown = f'<span class="reward">reward {num(reward, 3)}</span>' if reward is not None else ""
        cls = ' class="better"' if better else ""
        cells.append(f"<td{cls}><pre>{esc(fmt(sample.get(model, '')))}</pre>{shown}</td>")
    return "<tr>" + "".join(cells) + "</tr>\n"


def plots_section(run: Run, pngs: dict[str, bytes]) -> str:
    figures = [image(pngs[p.name], p.title) for p in PLOT_GROUPS if p.name in pngs]
    notes = []
    missing = [p.name for p in PLOT_GROUPS if p.name not in pngs]
    if missing:
        notes.append(f"Not drawn (no values in {METRICS}): {', '.join(missing)}.")
    drawn = {k for p in PLOT_GROUPS for k, _ in p.series + p.right} | {v for p in PLOT_GROUPS for v in p.band.values()}
    others = sorted({k for r in run.records for k in r if not k.startswith("eval/")} - drawn - NOT_PLOTTED)
    if others:
        notes.append(f"Logged but not plotted: {', '.join(others)}.")
    body = f'<div class="plots">\n{"".join(figures)}</div>\n' + "".join(note(n) for n in notes)
    return section("plots", "Training curves", body)


def config_section(run: Run) -> str:
    if run.config is None:
        return section("config", "Options", note("No config.yaml in this run folder: options unknown."))
    changed, same, known = split_options(run.config)
    if not known:
        body = note("The defaults of this preftune version could not be read: every option, as written.")
        return section("config", "Options", body + table(same, ("option", "value")))
    body = note(
        f"{len(changed)} options differ from the defaults of `preftune train`; {len(same)} are at their default."
    )
    body += table(changed, ("option", "value", "default"))
    if same:
        body += f"<details><summary>{len(same)} options at their default</summary>\n{table(same, ('option', 'value'))}</details>\n"
    return section("config", "Options", body)


def audit_section(run: Run) -> str:
    if run.audit is None:
        return section("audit", "Data audit", note("No audit.json in this run folder."))
    findings = [
        (name.replace("_", " "), f["count"], f.get("share", ""), ", ".join(map(str, f.get("examples") or [])))
        for name, f in run.audit.items()
        if isinstance(f, dict) and "count" in f
    ]
    rest = {
        name: v for name, v in run.audit.items() if not (isinstance(v, dict) and "count" in v) and name != "features"
    }
    body = table(findings, ("finding", "count", "share", "examples")) if findings else ""
    body += features_table(run.audit.get("features"))
    if rest:
        rows = flatten(rest)
        body += f"<details><summary>Measures of the data ({len(rows)})</summary>\n{table(rows, ('measure', 'value'))}</details>\n"
    return section("audit", "Data audit", body)


def features_table(features: dict | None) -> str:
    """What the preferences reward (data/features.py): per surface feature, how often the chosen response has more
    of it and how well "more of it wins" predicts the label, flagged rules first; and refusal in the data."""
    if not features or not features.get("rules"):
        return ""
    percent = lambda v: "—" if v is None else pct(v)  # noqa: E731
    rules = sorted(features["rules"].values(), key=lambda r: r["flagged"] is None)
    rows = [
        (
            r["label"],
            percent(r["chosen_more_share"]),
            percent(r["chosen_less_share"]),
            r["decided"],
            percent(r["accuracy"]),
            "—" if r["ci_low"] is None else f"{percent(r['ci_low'])} … {percent(r['ci_high'])}",
            f"likely spurious ({r['flagged']} wins), e.g. {', '.join(r['examples'][:3])}" if r["flagged"] else "",
        )
        for r in rules
    ]
    refusal = features["refusal"]
    return (
        f"<h3>What the preferences reward ({features['pairs']} pairs)</h3>\n"
        + table(rows, ("feature", "chosen has more", "chosen has less", "pairs decided", "more wins", "95% CI", ""))
        + note(
            f"Refusal in the data ({features['detector']}): the chosen response refuses and the rejected complies in "
            f"{refusal['chosen_refuses']} pairs ({percent(refusal['chosen_refuses_share'])}), the reverse in "
            f"{refusal['rejected_refuses']} ({percent(refusal['rejected_refuses_share'])})."
        )
    )


def run_section(run: Run) -> str:
    records, last = run.records, run.records[-1]
    rows = [
        ("run folder", str(run.path.resolve())),
        (
            "status",
            "finished (final/ holds the model)"
            if (run.path / FINAL).is_dir()
            else "no final/ folder: the run is unfinished or was interrupted",
        ),
        ("steps logged", f"{len(records)} (steps {records[0]['step']}–{last['step']} of {total_steps(run)})"),
    ]
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        mean = tail_mean(records, key)
        if key in last:
            tail = f"; mean of the last {TAIL} steps {fmt(mean)}" if mean is not None else ""
            rows.append((f"final {key}", f"{fmt(last[key])} (step {last['step']}){tail}"))
    seconds = training_time(records)
    if seconds is not None:
        rows.append(
            ("training time", f"{_duration(seconds)} (sum of step times; evaluation and checkpoints not included)")
        )
    for key in ("pairs_per_s", "tokens_per_s"):
        mean = tail_mean(records, key, n=len(records))
        if mean is not None:
            rows.append((f"mean {key}", mean))
    body = table(rows, ("", "value"))
    if run.evaluation is not None:
        body += f"<details><summary>Metrics of the evaluations during training</summary>\n{metrics_eval_part(run)}</details>\n"
    if run.config is None:
        body += note("No config.yaml in this folder: options unknown, the ln 2 check is off.")
    return section("run", "Run details", body)


def render(run: Run, pngs: dict[str, bytes], warnings: list[str]) -> str:
    body = (
        header(run)
        + headline_section(run, warnings)
        + eval_section(run)
        + samples_section(run)
        + plots_section(run, pngs)
        + config_section(run)
        + audit_section(run)
        + run_section(run)
    )
    return page(f"preftune report: {run.name}", body)


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html; return the report's path.

    With `output`, the page goes there instead and nothing is written into RUN_DIR (a run folder may be
    read-only, or another person's)."""
    target = None if output is None else _output_path(output)
    run = read_run(run_dir)
    if target is None:
        pngs, target = write_plots(run.records, run.path / PLOTS), run.path / REPORT
    else:
        pngs = draw_all(run.records)
    write_file_atomically(target, render(run, pngs, replay_warnings(run)))
    return target


# ---------------------------------------------------------------------------------------------------- comparison


def run_names(paths: list[Path]) -> list[str]:
    """The shortest trailing parts of the paths that tell the runs apart (runs/a/dpo, runs/b/dpo → a/dpo, b/dpo)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def differing_options(runs: list[Run]) -> list[str]:
    """Options whose values are not the same in every run, in the order of the first config naming them."""
    keys = dict.fromkeys(k for r in runs for k in (r.config or {}) if k not in IGNORED_DIFFERENCES)
    return [k for k in keys if len({option_text(r, k) for r in runs}) > 1]


def option_text(run: Run, name: str) -> str:
    """An option's value as the page shows it; '–' when the run's config.yaml does not have it."""
    config = run.config or {}
    return fmt(config[name]) if name in config else "–"


def run_labels(runs: list[Run], names: list[str]) -> list[str]:
    """A legend label per run: its name and the options that differ between the runs (the first few)."""
    differing = sorted(differing_options(runs), key=lambda k: k in WHERE_OPTIONS)  # stable: file order otherwise
    labels = []
    for run, name in zip(runs, names):
        shown = [f"{k}={option_text(run, k)}" for k in differing[:MAX_LABEL_OPTIONS]]
        more = ", …" if len(differing) > MAX_LABEL_OPTIONS else ""
        labels.append(f"{name} ({', '.join(shown)}{more})" if shown else name)
    return labels


def _fact_cell(fact: Fact) -> str:
    if fact.missing:
        return '<span class="missing">–</span>'
    return fact.big + (f"<br>{fact.interval}" if fact.interval else "")


def _extra_rows(runs: list[Run]) -> list[list[str]]:
    """Comparison rows beyond the headline: held-out margin, length drift, diversity, time."""
    rows = []
    margins = []
    for run in runs:
        pairs = _part(run, "pairs")
        m, se = _number(pairs.get("rewards/margins")), _number(pairs.get("rewards/margins_se"))
        margins.append(esc(with_se(m, se)) if m is not None else "–")
    rows.append(["held-out margin ± SE", *margins])
    ratios = [_number(_part(r, "generation", "length").get("ratio")) for r in runs]
    rows.append(["length ratio, policy / reference", *[f"{x:.2f}" if x is not None else "–" for x in ratios]])
    distinct = [_number(_part(r, "generation", "distinct_2").get("policy")) for r in runs]
    rows.append(["distinct-2 of the policy", *[f"{x:.3f}" if x is not None else "–" for x in distinct]])
    times = [training_time(r.records) for r in runs]
    rows.append(["training time", *[esc(_duration(t)) if t is not None else "–" for t in times]])
    return [row for row in rows if any(cell != "–" for cell in row[1:])]  # a measure no run has: no row


def compare_eval_table(runs: list[Run], names: list[str], warnings: list[list[str]]) -> str:
    facts = [headline_facts(r) for r in runs]
    rows = [[esc(facts[0][i].title), *(_fact_cell(f[i]) for f in facts)] for i in range(len(facts[0]))]
    rows += _extra_rows(runs)
    rows.append(["warnings", *(str(len(w)) for w in warnings)])
    return html_table(rows, ["", *(esc(n) for n in names)])


def compare_options(runs: list[Run], names: list[str]) -> str:
    differing = differing_options(runs)
    rows = [[esc(k), *(esc(option_text(r, k)) for r in runs)] for k in differing]
    body = note(f"{len(differing)} options differ between the runs (output folders aside).")
    body += html_table(rows, ["option", *(esc(n) for n in names)]) if rows else ""
    shared = [(k, v) for k, v in (runs[0].config or {}).items() if k not in differing and k not in IGNORED_DIFFERENCES]
    if shared:
        body += f"<details><summary>{len(shared)} options the same in every run</summary>\n{table(shared, ('option', 'value'))}</details>\n"
    return section("compare-config", "Options", body)


def runs_section(runs: list[Run], names: list[str]) -> str:
    rows = [
        (name, str(r.path.resolve()), f"{r.records[-1]['step']} of {total_steps(r)}", _status(r))
        for name, r in zip(names, runs)
    ]
    return section("runs", "Runs", table(rows, ("run", "folder", "steps", "status")))


def _status(run: Run) -> str:
    return "finished" if (run.path / FINAL).is_dir() else "not finished (no final/)"


def render_comparison(runs: list[Run]) -> str:
    names = run_names([r.path for r in runs])
    labels = run_labels(runs, names)
    warnings = [replay_warnings(r) for r in runs]
    intro = (
        f"<header>\n<h1>{esc(f'preftune comparison: {len(runs)} runs')}</h1>\n"
        f'<p class="sub">{esc(" · ".join(labels))}</p>\n</header>\n'
    )
    body = intro + runs_section(runs, names)
    body += section("compare-eval", "Results", compare_eval_table(runs, names, warnings))
    items = "".join(f"<h3>{esc(n)}</h3>\n{warnings_list(w)}" for n, w in zip(names, warnings))
    body += section("compare-warnings", "Warnings", items)
    pairs = list(zip(labels, [r.records for r in runs]))
    figures = [(title, draw_overlay(key, title, ylabel, pairs)) for key, title, ylabel in COMPARED]
    shown = "".join(image(png, title) for title, png in figures if png is not None)
    legend = note("One line per run; long per-step series: faint per step, solid a rolling mean.")
    body += section("compare-plots", "Curves", legend + f'<div class="plots">\n{shown}</div>\n')
    body += compare_options(runs, names)
    return page(f"preftune comparison: {', '.join(names)}", body)


def write_comparison(run_dirs: list[str | Path], output: str | Path | None) -> Path:
    """One page comparing the runs at `output`; nothing is written into the run folders."""
    if output is None:
        raise UserError(f"comparing {len(run_dirs)} runs writes one page: give --output FILE (e.g. compare.html)")
    resolved = [Path(d).resolve() for d in run_dirs]
    twice = next((d for i, d in enumerate(run_dirs) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise UserError(f"{twice}: given twice")
    target = _output_path(output)
    runs = [read_run(d) for d in run_dirs]
    write_file_atomically(target, render_comparison(runs))
    return target

"""Plain-language warnings about a training run, from its per-step metrics (pure Python, no torch).

`TrainingMonitor.observe(record)` takes one `metrics.jsonl` record (a dict: `step`, `loss`, `rewards/...`,
`logps/...`, ...) per optimizer step, in step order, and returns the warnings that became true at that step.
Each kind of warning is given at most once per run. `preftune report` replays a finished run through it.

Per-step values are noisy (each step sees a different handful of pairs, and summed log-probs differ by
hundreds of nats between long and short responses), so every rule looks at a window of recent steps, never at
one step:

- **likelihood displacement** (window 30 steps): the chosen responses become less likely while the margin
  grows, i.e. the model wins the preference by pushing both responses down. Fires when, over the last 30
  steps, the least-squares slope of `rewards/chosen` against the step is negative with t ≤ −4 (steady, not
  noise: a flat noisy series reaches it with p ≈ 2·10⁻⁴ per window), the mean of `rewards/chosen` over the
  window's second half is below 0 (chosen is now less likely than under the reference), the fitted change
  of `logps/chosen` over the window is a fall of at least 1 nat, and the slope of `rewards/margins` is
  positive. `rewards/chosen` = β·(log π − log π_ref) carries the trend of the chosen log-prob without the
  batch-to-batch length noise of `logps/chosen`, so it decides; `logps/chosen` gives the size in nats.
- **accuracy saturating early** (window 10 steps): the mean `rewards/accuracies` of the last 10 steps is
  ≥ 0.95 at a step ≤ 25% of `total_steps` (runs shorter than 40 steps are never judged: the window does not
  fit in their first quarter).
- **loss stuck at ln 2** (window 20 steps; losses whose value at π = π_ref is ln 2 only — the sigmoid
  family, see `AT_LN2`): halfway through the run or later, the mean of |loss − w·ln 2| over the last 20
  steps is < 0.01·w, with w the sum of the loss weights (1 for a single loss). Judged no earlier than half the
  run: with a small learning rate or warmup the loss legitimately stays near ln 2 for a while. A combination with any other loss (e.g. `sigmoid,sft`) has no fixed
  starting value and is not judged.
- **non-finite values**: any numeric field of a record (train or eval) is NaN or ±inf.

A window holding a non-finite or missing value is not judged (the non-finite warning covers it).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

LN2 = math.log(2)
# Losses equal to ln 2 when the policy equals the reference (h = 0): −log σ(0) = ln 2. cDPO and robust DPO
# keep that value for any ε; length normalisation and DPO-Positive's penalty (0 at π = π_ref) change nothing.
AT_LN2 = frozenset({"sigmoid", "robust", "sigmoid_norm", "dpop", "aot", "aot_unpaired"})

DISPLACEMENT_WINDOW = 30
DISPLACEMENT_T = -4.0
DISPLACEMENT_MIN_DROP = 1.0  # nats of the summed chosen log-prob
ACCURACY_WINDOW = 10
ACCURACY_LEVEL = 0.95
ACCURACY_EARLY = 0.25  # share of the run
LN2_WINDOW = 20
LN2_TOLERANCE = 0.01
LN2_FROM = 0.5  # share of the run before the rule is judged

_TRACKED = ("loss", "rewards/accuracies", "rewards/chosen", "rewards/margins", "logps/chosen")


class TrainingMonitor:
    """Watches per-step metrics; `observe(record)` returns the warnings new at that step (each kind once).

    total_steps: optimizer steps the run will take (for "early"). loss_names: the losses trained, e.g.
    ["sigmoid"] or "sigmoid,sft"; loss_weights: their weights (default 1 each). `warnings` keeps every warning
    given so far, in order.
    """

    def __init__(self, total_steps: int, loss_names: Iterable[str] | str, loss_weights: Iterable[float] | None = None):
        self.total_steps = total_steps
        names = [n.strip() for n in loss_names.split(",")] if isinstance(loss_names, str) else list(loss_names)
        weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
        # The ln 2 rule needs a known starting value: only losses that all start at ln 2.
        self.start_loss = LN2 * sum(weights) if names and set(names) <= AT_LN2 else None
        self.history: dict[str, deque[tuple[float, float]]] = {
            key: deque(maxlen=DISPLACEMENT_WINDOW) for key in _TRACKED
        }
        self.given: set[str] = set()
        self.warnings: list[str] = []
        self._count = 0

    def observe(self, record: dict) -> list[str]:
        """Take one step's record (in step order); return the warnings that are new at this step."""
        self._count += 1
        step = record.get("step", self._count)
        for key in _TRACKED:
            self.history[key].append((float(step), _number(record.get(key))))
        checks = {
            "non_finite": lambda: self._non_finite(step, record),
            "displacement": lambda: self._displacement(step),
            "accuracy": lambda: self._accuracy(step),
            "ln2": lambda: self._stuck_at_ln2(step, record),
        }
        new = []
        for kind, check in checks.items():
            if kind in self.given:
                continue
            message = check()
            if message:
                self.given.add(kind)
                new.append(message)
        self.warnings.extend(new)
        return new

    def _window(self, key: str, size: int) -> list[tuple[float, float]] | None:
        """The last `size` (step, value) points of `key`, or None when fewer or any is not finite."""
        points = list(self.history[key])[-size:]
        if len(points) < size or not all(math.isfinite(v) for _, v in points):
            return None
        return points

    def _non_finite(self, step, record: dict) -> str | None:
        bad = [
            f"{key} is {value}"
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value)
        ]
        if not bad:
            return None
        return (
            f"step {step}: {', '.join(bad)}: a non-finite value means something overflowed or a response "
            "has no tokens; try a lower learning rate, --dtype float32 or gradient clipping (--max-grad-norm), "
            "and check the data with `preftune audit`"
        )

    def _displacement(self, step) -> str | None:
        rewards = self._window("rewards/chosen", DISPLACEMENT_WINDOW)
        logps = self._window("logps/chosen", DISPLACEMENT_WINDOW)
        margins = self._window("rewards/margins", DISPLACEMENT_WINDOW)
        if rewards is None or logps is None or margins is None:
            return None
        t = slope_and_t(rewards)[1]
        second_half = [v for _, v in rewards[DISPLACEMENT_WINDOW // 2 :]]
        drop = slope_and_t(logps)[0] * (logps[-1][0] - logps[0][0])
        if not (
            t <= DISPLACEMENT_T
            and sum(second_half) / len(second_half) < 0
            and drop <= -DISPLACEMENT_MIN_DROP
            and slope_and_t(margins)[0] > 0
        ):
            return None
        return (
            f"step {step}: chosen log-probs have fallen for {DISPLACEMENT_WINDOW} steps ({_signed(drop)} nats) "
            "while margins grow: likelihood displacement — the model is lowering both responses; consider a "
            "smaller learning rate, adding 'sft' (RPO: --loss sigmoid,sft) or dpop"
        )

    def _accuracy(self, step) -> str | None:
        points = self._window("rewards/accuracies", ACCURACY_WINDOW)
        if points is None or step > ACCURACY_EARLY * self.total_steps:
            return None
        mean = sum(v for _, v in points) / len(points)
        if mean < ACCURACY_LEVEL:
            return None
        return (
            f"step {step}: reward accuracy is {mean:.2f} over the last {ACCURACY_WINDOW} steps, only "
            f"{100 * step / self.total_steps:.0f}% into the run: the pairs may be too easy to tell apart (e.g. "
            "by length or format: see `preftune audit`) or the learning rate too high; the remaining steps "
            "mostly grow margins and may overfit — watch eval accuracy, consider fewer steps or a smaller "
            "learning rate"
        )

    def _stuck_at_ln2(self, step, record: dict) -> str | None:
        points = self._window("loss", LN2_WINDOW)
        if self.start_loss is None or points is None or step < LN2_FROM * self.total_steps:
            return None
        level = self.start_loss
        deviation = sum(abs(v - level) for _, v in points) / len(points)
        if deviation >= LN2_TOLERANCE * level / LN2:
            return None
        name = "ln 2" if abs(level - LN2) < 1e-12 else f"{level / LN2:g} × ln 2"
        lr = _number(record.get("lr"))
        at_lr = f" (learning rate now {lr:.3g})" if math.isfinite(lr) else ""
        return (
            f"step {step}: the loss has stayed at {name} ≈ {level:.4f} for {LN2_WINDOW} steps (mean distance "
            f"{deviation:.4f}): the policy is not moving away from the reference — the learning rate may be "
            f"too small to matter{at_lr}, β too small, or chosen and rejected too alike"
        )


def slope_and_t(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of value on step and its t statistic (slope / standard error), from ≥ 3 points.

    A perfect line has standard error 0: t is then ±inf (or 0 for a zero slope).
    """
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return 0.0, 0.0
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for x, y in points)
    se = math.sqrt(residual / (n - 2) / sxx) if n > 2 else 0.0
    if se == 0:
        return slope, math.copysign(math.inf, slope) if slope else 0.0
    return slope, slope / se


def _number(value) -> float:
    """A metric value as a float; NaN for a missing or non-numeric one (so its window is not judged)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def _signed(x: float) -> str:
    return f"{x:.1f}".replace("-", "−")

"""Likelihood displacement and CHES on the demo task: does the claim of Razin et al. ("Unintentional Unalignment:
Likelihood Displacement in Direct Preference Optimization", ICLR 2025) hold here?

The claim: pairs whose chosen and rejected responses have similar hidden representations (high CHES) make DPO
lower the chosen response's log-probability (likelihood displacement), and dropping the highest-CHES pairs
mitigates it.

    python benchmarks/displacement.py                      # seeds 0,1,2 into benchmarks/out/displacement
    python benchmarks/displacement.py --seeds 0 --out /tmp/disp

1. Builds the demo task at --quick size (`preftune demo --quick`), or reuses the one in OUT/demo.
2. Scores every training pair with the SFT model (`preftune.ches.score_pairs`): CHES and CHES_norm.
3. Splits the top and the bottom decile by CHES_norm and trains DPO on each (β 0.1, the demo's learning rate
   and schedule; --subset-steps × --subset-batch, the same for both, so that each run sees its ~200 pairs a few
   times). As a sensitivity check, the same with the deciles of raw (unnormalised) CHES, which the paper ranks
   by in its Section 5 (runs top_raw, bottom_raw); and, as a length control, the deciles of CHES_norm minus its
   mean over the pairs with the same chosen and rejected lengths (runs top_matched, bottom_matched).
4. Trains on all pairs and with --drop-displacement 10, the demo's own settings (64 steps × 32 pairs).
5. For every run: per pair, log π(chosen) of the trained policy minus that of the SFT model (and the same for
   the rejected response), on the run's own training pairs and on the held-out pairs; mean ± SE and a 95%
   t interval; whether the training monitor's likelihood-displacement warning fired (captured from the log,
   and checked by replaying metrics.jsonl through `TrainingMonitor`, as `preftune report` does).

Everything is repeated for each --seeds value (the seed of `preftune train`: data order; the SFT model, the pairs
and the deciles stay the same). Writes OUT/displacement.json (every number) and OUT/displacement.md (the tables,
also printed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from preftune import refcache
from preftune.api import train
from preftune.ches import score_pairs
from preftune.data.batching import collate
from preftune.data.formats import load_pairs
from preftune.data.tokenize import tokenize_pairs
from preftune.loading import load_causal_lm, load_tokenizer
from preftune.logps import choose_layout, compute_logps
from preftune.monitor import DISPLACEMENT_WINDOW, TrainingMonitor, slope_and_t

log = logging.getLogger("displacement")
BETA = 0.1
LR = 5e-4  # the demo's --quick DPO learning rate (pipeline.QUICK.dpo_lr), constant after 5 warmup steps
FULL_STEPS, FULL_BATCH = 64, 32  # the demo's --quick DPO run: one pass over the ~2,000 pairs
RUNS = ("top", "bottom", "top_raw", "bottom_raw", "top_matched", "bottom_matched", "all", "drop10")


# ------------------------------------------------------------------------------------------------ statistics


def t975(n: int) -> float:
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1))
    except ImportError:  # n is in the hundreds here: the normal quantile is within 0.5% of t's
        return 1.96


def summary(values: np.ndarray) -> dict:
    """mean, SE, 95% t interval, n, and the share of pairs whose value is below 0."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n))
    half = t975(n) * se
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half, "n": n, "fell": float((values < 0).mean())}


def welch(a: dict, b: dict) -> dict:
    """a − b of two independent means (Welch; the normal quantile: both n are in the hundreds)."""
    diff, se = a["mean"] - b["mean"], math.hypot(a["se"], b["se"])
    return {"mean": diff, "se": se, "lo": diff - 1.96 * se, "hi": diff + 1.96 * se}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = (np.argsort(np.argsort(v, kind="stable"), kind="stable").astype(np.float64) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def fmt(s: dict, digits: int = 2) -> str:
    return f"{s['mean']:+.{digits}f} ± {s['se']:.{digits}f} ({s['lo']:+.{digits}f} … {s['hi']:+.{digits}f})"


# ------------------------------------------------------------------------------------------------ models, log-probs


def response_logps(model: torch.nn.Module, pairs: list, pad_id: int) -> np.ndarray:
    """[N, 2] summed log π(chosen), log π(rejected) of each pair: the reference-cache pass (no grad, eval mode)."""
    layout = choose_layout("packed", model, pairs, pad_id)
    with tempfile.TemporaryDirectory(prefix="displacement-") as tmp:
        out = refcache.compute(
            model,
            pairs,
            batch_size=64,
            logps_fn=compute_logps,
            collate_fn=lambda ps, idx: collate(layout, ps, idx, pad_id),
            device="cpu",
            dtype="float32",
            out=Path(tmp) / "logps.npy",
            progress=False,
        )
        return np.array(out.array, dtype=np.float64)


class WarningCatcher(logging.Handler):
    """Every record the 'preftune' logger emits at INFO or above, kept as text."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def replay_monitor(run_dir: Path, total_steps: int) -> dict:
    """The monitor replayed over metrics.jsonl, and its displacement statistics on the run's last window: the t of
    the rewards/chosen slope (fires at ≤ −4), the mean rewards/chosen of the window's second half (< 0), the fitted
    change of logps/chosen (≤ −1 nat) and the rewards/margins slope (> 0)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    monitor = TrainingMonitor(total_steps, ["sigmoid"])
    for record in records:
        monitor.observe(record)
    window = records[-DISPLACEMENT_WINDOW:]

    def series(key):
        return [(float(r["step"]), float(r[key])) for r in window]

    logps = series("logps/chosen")
    second = [v for _, v in series("rewards/chosen")[DISPLACEMENT_WINDOW // 2 :]]
    return {
        "fired": any("likelihood displacement" in w for w in monitor.warnings),
        "last_window": {
            "t_rewards_chosen": slope_and_t(series("rewards/chosen"))[1],
            "rewards_chosen_second_half": sum(second) / len(second),
            "logps_chosen_change": slope_and_t(logps)[0] * (logps[-1][0] - logps[0][0]),
            "margin_slope": slope_and_t(series("rewards/margins"))[0],
        },
        "first_loss": records[0]["loss"],
        "last_loss": records[-1]["loss"],
    }


# ------------------------------------------------------------------------------------------------ the experiment


def build_demo(demo: Path) -> float:
    """`preftune demo --quick` into `demo` unless it is there already; its wall seconds (0 when reused)."""
    if (demo / "sft").is_dir() and (demo / "pairs" / "train.jsonl").is_file():
        log.info("reusing the demo task in %s", demo)
        return 0.0
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preftune", "demo", "--output", str(demo), "--quick"], check=True)
    return time.perf_counter() - start


def write_rows(rows: list[str], indices: np.ndarray, path: Path) -> Path:
    path.write_text("".join(rows[i] + "\n" for i in sorted(indices.tolist())), encoding="utf-8")
    return path


def run_one(name: str, data: Path, out: Path, seed: int, steps: int, batch: int, drop: float | None = None) -> dict:
    config = {
        "model": str(out / "demo" / "sft"),
        "data": str(data),
        "output": str(out / "runs" / f"seed{seed}" / name),
        "beta": BETA,
        "learning_rate": LR,
        "lr_scheduler": "constant",
        "warmup_steps": 5,
        "batch_size": batch,
        "max_steps": steps,
        "seed": seed,
        "ref_cache": str(out / "ref-cache"),
        "device": "cpu",
        "no_report": True,
    }
    if drop is not None:
        config["drop_displacement"] = drop
    catcher = WarningCatcher()
    logger = logging.getLogger("preftune")
    logger.addHandler(catcher)
    start = time.perf_counter()
    try:
        final = train(config)
    finally:
        logger.removeHandler(catcher)
    seconds = time.perf_counter() - start
    logged = [line for line in catcher.lines if "likelihood displacement" in line]
    fired_step = int(logged[0].split(":")[0].removeprefix("step ")) if logged else None
    dropped = [line for line in catcher.lines if line.startswith("--drop-displacement")]
    monitor = replay_monitor(Path(config["output"]), steps)
    log.info("%s seed %d: %.1f s, displacement warning %s", name, seed, seconds, "FIRED" if logged else "no")
    return {
        "final": str(final),
        "seconds": seconds,
        "steps": steps,
        "batch": batch,
        "warning_logged": bool(logged),
        "warning": logged[0] if logged else None,
        "warning_step": fired_step,
        "drop_log": dropped[0] if dropped else None,
        "monitor": monitor,
    }


def deltas(final: str, pairs: list, pad_id: int, sft_logps: np.ndarray) -> np.ndarray:
    """[N, 2] per pair: log π(y) of the trained policy − log π_SFT(y), chosen and rejected."""
    model = load_causal_lm(final)
    return response_logps(model, pairs, pad_id) - sft_logps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/displacement"))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of `preftune train`")
    parser.add_argument("--decile", type=float, default=10.0, help="percent of the pairs in the top/bottom split")
    parser.add_argument("--subset-steps", type=int, default=48, help="steps of each decile run (monitor needs ≥ 30)")
    parser.add_argument("--subset-batch", type=int, default=16, help="pairs per step of each decile run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    demo = out / "demo"
    demo_seconds = build_demo(demo)

    # -- score every training pair, and the SFT log-probs of the training and held-out pairs
    tokenizer = load_tokenizer(str(demo / "sft"))
    pad = tokenizer.pad_token_id
    train_file, heldout_file = demo / "pairs" / "train.jsonl", demo / "pairs" / "heldout.jsonl"
    raw = [line for line in train_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    train_pairs, _ = tokenize_pairs(load_pairs(str(train_file))[0], tokenizer, max_length=1024)
    heldout_pairs, _ = tokenize_pairs(load_pairs(str(heldout_file))[0], tokenizer, max_length=1024)
    if len(train_pairs) != len(raw):
        raise SystemExit(f"{train_file}: {len(raw)} rows but {len(train_pairs)} pairs loaded; rows were skipped")
    sft_model = load_causal_lm(str(demo / "sft"))
    ches = score_pairs(sft_model, train_pairs, pad, progress=False).astype(np.float64)
    sft_train = response_logps(sft_model, train_pairs, pad)
    sft_heldout = response_logps(sft_model, heldout_pairs, pad)
    del sft_model

    n = len(train_pairs)
    k = math.floor(args.decile / 100 * n)
    order = np.argsort(-ches[:, 1], kind="stable")  # as --drop-displacement ranks them
    top, bottom = np.sort(order[:k]), np.sort(order[-k:])
    order_raw = np.argsort(-ches[:, 0], kind="stable")  # sensitivity check: ranked by raw (unnormalised) CHES
    subsets = {
        "top": top,
        "bottom": bottom,
        "top_raw": np.sort(order_raw[:k]),
        "bottom_raw": np.sort(order_raw[-k:]),
    }
    # Length control: CHES_norm here follows the two responses' lengths closely, so rank also by CHES_norm minus
    # its mean over the pairs of the same (chosen tokens, rejected tokens); a pair alone in its cell scores 0.
    lengths = np.array([[len(p.chosen_ids), len(p.rejected_ids)] for p in train_pairs])
    cell = lengths[:, 0] * 100_000 + lengths[:, 1]
    residual = np.zeros(n)
    for value in np.unique(cell):
        members = np.flatnonzero(cell == value)
        residual[members] = ches[members, 1] - ches[members, 1].mean()
    order_matched = np.argsort(-residual, kind="stable")
    subsets["top_matched"] = np.sort(order_matched[:k])
    subsets["bottom_matched"] = np.sort(order_matched[-k:])
    data = {name: write_rows(raw, idx, out / f"{name}.jsonl") for name, idx in subsets.items()}

    def describe_split(idx: np.ndarray) -> dict:
        lengths = np.array([[len(train_pairs[i].chosen_ids), len(train_pairs[i].rejected_ids)] for i in idx])
        return {
            "pairs": len(idx),
            "ches_norm": summary(ches[idx, 1]),
            "ches": summary(ches[idx, 0]),
            "chosen_tokens": float(lengths[:, 0].mean()),
            "rejected_tokens": float(lengths[:, 1].mean()),
            "sft_logp_chosen": float(sft_train[idx, 0].mean()),
            "sft_logp_rejected": float(sft_train[idx, 1].mean()),
        }

    splits = {"all": describe_split(np.arange(n)), **{name: describe_split(idx) for name, idx in subsets.items()}}
    splits["top_and_top_raw_shared"] = len(np.intersect1d(top, subsets["top_raw"]))
    log.info(
        "%d training pairs; CHES_norm top decile ≥ %.4g, bottom decile ≤ %.4g",
        n,
        ches[order[k - 1], 1],
        ches[order[-k], 1],
    )

    # -- the runs
    results: dict = {"seeds": {}}
    for seed in seeds:
        per: dict = {}
        for name, idx in subsets.items():
            run = run_one(name, data[name], out, seed, args.subset_steps, args.subset_batch)
            d_train = deltas(run["final"], [train_pairs[i] for i in idx], pad, sft_train[idx])
            d_held = deltas(run["final"], heldout_pairs, pad, sft_heldout)
            run.update(
                train_chosen=summary(d_train[:, 0]),
                train_rejected=summary(d_train[:, 1]),
                heldout_chosen=summary(d_held[:, 0]),
                heldout_rejected=summary(d_held[:, 1]),
            )
            per[name] = run
        for suffix in ("", "_raw", "_matched"):
            per[f"top_minus_bottom{suffix}"] = {
                key: welch(per[f"top{suffix}"][key], per[f"bottom{suffix}"][key])
                for key in ("train_chosen", "heldout_chosen")
            }
        full: dict = {}
        for name, drop in (("all", None), ("drop10", 10.0)):
            run = run_one(name, train_file, out, seed, FULL_STEPS, FULL_BATCH, drop)
            d_train = deltas(run["final"], train_pairs, pad, sft_train)
            d_held = deltas(run["final"], heldout_pairs, pad, sft_heldout)
            run.update(
                train_chosen=summary(d_train[:, 0]),
                train_rejected=summary(d_train[:, 1]),
                heldout_chosen=summary(d_held[:, 0]),
                heldout_rejected=summary(d_held[:, 1]),
                top_decile_chosen=summary(d_train[top, 0]),
                bottom_decile_chosen=summary(d_train[bottom, 0]),
                spearman_ches_norm_vs_chosen_change=spearman(ches[:, 1], d_train[:, 0]),
            )
            if drop is not None:  # the pairs --drop-displacement dropped are this script's top decile
                threshold = float(run["drop_log"].split("CHES_norm ≥ ")[1].split()[0])
                run["drop_matches_top_decile"] = f"{ches[top, 1].min():.4g}" == f"{threshold:.4g}"
            full[name] = (run, d_train, d_held)
            per[name] = run
        # the same pairs under both runs: paired differences (drop10 − all)
        per["drop10_minus_all"] = {
            "train_chosen": summary(full["drop10"][1][:, 0] - full["all"][1][:, 0]),
            "heldout_chosen": summary(full["drop10"][2][:, 0] - full["all"][2][:, 0]),
            "top_decile_chosen": summary(full["drop10"][1][top, 0] - full["all"][1][top, 0]),
        }
        results["seeds"][seed] = per

    wall = time.perf_counter() - wall
    results.update(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        machine={
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
            "platform": platform.platform(),
            "torch": torch.__version__,
            "loadavg_end": os.getloadavg(),
        },
        settings={
            "beta": BETA,
            "learning_rate": LR,
            "schedule": "constant, 5 warmup steps",
            "subset_steps": args.subset_steps,
            "subset_batch": args.subset_batch,
            "full_steps": FULL_STEPS,
            "full_batch": FULL_BATCH,
            "decile_percent": args.decile,
        },
        pairs={"train": n, "heldout": len(heldout_pairs), "decile": k},
        splits=splits,
        demo_seconds=demo_seconds,
        wall_seconds=wall,
    )
    (out / "displacement.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    text = markdown(results)
    (out / "displacement.md").write_text(text, encoding="utf-8")
    print(text)


# ------------------------------------------------------------------------------------------------ report


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"{r['pairs']['train']} training pairs, {r['pairs']['heldout']} held-out; deciles of {r['pairs']['decile']}"
        f" pairs. Wall time {r['wall_seconds']:.0f} s (demo build {r['demo_seconds']:.0f} s).",
        "",
        "| split | CHES_norm | chosen tokens | rejected tokens | SFT log π(chosen) | SFT log π(rejected) |",
        "|---|---|---|---|---|---|",
    ]
    for name, sp in r["splits"].items():
        if not isinstance(sp, dict):
            continue
        lines.append(
            f"| {name} | {sp['ches_norm']['mean']:.3g} | {sp['chosen_tokens']:.1f} | {sp['rejected_tokens']:.1f} | "
            f"{sp['sft_logp_chosen']:.2f} | {sp['sft_logp_rejected']:.2f} |"
        )
    lines += [
        "",
        f"Decile runs: {s['subset_steps']} steps × {s['subset_batch']} pairs; full runs: {s['full_steps']} steps × "
        f"{s['full_batch']} pairs; β {s['beta']}, lr {s['learning_rate']:g} ({s['schedule']}). Δ = log π − log "
        "π_SFT per pair, nats, mean ± SE (95% CI); 'fell' = share of pairs with Δ < 0.",
        "",
        "| seed | run | Δ chosen, own training pairs | fell | Δ rejected, own | Δ chosen, held-out | Δ rejected,"
        " held-out | warning | monitor t / Δlogp (last 30 steps) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, per in r["seeds"].items():
        for name in RUNS:
            run = per[name]
            w = run["monitor"]["last_window"]
            fired = f"step {run['warning_step']}" if run["warning_logged"] else "no"
            if run["warning_logged"] != run["monitor"]["fired"]:
                fired += " (replay disagrees)"
            lines.append(
                f"| {seed} | {name} | {fmt(run['train_chosen'])} | {run['train_chosen']['fell']:.2f} | "
                f"{fmt(run['train_rejected'])} | {fmt(run['heldout_chosen'])} | {fmt(run['heldout_rejected'])} | "
                f"{fired} | {w['t_rewards_chosen']:+.1f} / "
                f"{w['logps_chosen_change']:+.2f} | {run['seconds']:.0f} |"
            )
    lines += [
        "",
        "Differences of Δ chosen between runs; drop10 − all per pair (the same pairs under both policies).",
        "",
        "| seed | comparison | own/all training pairs | held-out pairs | top-decile pairs |",
        "|---|---|---|---|---|",
    ]
    for seed, per in r["seeds"].items():
        da = per["drop10_minus_all"]
        for suffix in ("", "_raw", "_matched"):
            tb = per[f"top_minus_bottom{suffix}"]
            lines.append(
                f"| {seed} | top{suffix} − bottom{suffix} (Welch) | {fmt(tb['train_chosen'])} | "
                f"{fmt(tb['heldout_chosen'])} | |"
            )
        lines.append(
            f"| {seed} | drop10 − all (paired) | {fmt(da['train_chosen'])} | {fmt(da['heldout_chosen'])} | "
            f"{fmt(da['top_decile_chosen'])} |"
        )
    lines += [
        "",
        "Within one run, on the same policy: the top- and bottom-decile pairs by CHES_norm among all training pairs.",
        "",
        "| seed | run | Δ chosen of top-decile pairs | Δ chosen of bottom-decile pairs | top − bottom (Welch) | "
        "Spearman(CHES_norm, Δ chosen) |",
        "|---|---|---|---|---|---|",
    ]
    for seed, per in r["seeds"].items():
        for name in ("all", "drop10"):
            run = per[name]
            lines.append(
                f"| {seed} | {name} | {fmt(run['top_decile_chosen'])} | {fmt(run['bottom_decile_chosen'])} | "
                f"{fmt(welch(run['top_decile_chosen'], run['bottom_decile_chosen']))} | "
                f"{run['spearman_ches_norm_vs_chosen_change']:+.3f} |"
            )
    seeds = list(r["seeds"].values())
    if len(seeds) > 1:
        lines += [
            "",
            f"Across the {len(seeds)} seeds: mean of the per-seed means [smallest … largest].",
            "",
            "| run | Δ chosen, own training pairs | Δ chosen, held-out | warning fired |",
            "|---|---|---|---|",
        ]
        for name in RUNS:
            own = [per[name]["train_chosen"]["mean"] for per in seeds]
            held = [per[name]["heldout_chosen"]["mean"] for per in seeds]
            fired = sum(per[name]["warning_logged"] for per in seeds)
            lines.append(
                f"| {name} | {np.mean(own):+.2f} [{min(own):+.2f} … {max(own):+.2f}] | {np.mean(held):+.2f} "
                f"[{min(held):+.2f} … {max(held):+.2f}] | {fired} of {len(seeds)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""KTO on CPU: preftune against TRL 1.16's KTOTrainer, each run a whole process, on the same model, data, settings.

    python benchmarks/fixture.py --out benchmarks/out/fixture          # once: model + pairs
    python benchmarks/bench_kto.py --pairs 24 --json benchmarks/out/kto24.json

The first --pairs pairs of the fixture are given to both as pairs; both unpair them the same way (TRL's
unpair_preference_dataset: the chosen responses desirable, then the rejected ones), so 24 pairs are 48 examples.
Runs (float32, CPU, 1 epoch, the same batch size, learning rate and max_length, data in file order: TRL's KTO needs
its sequential sampler, preftune gets --no-shuffle, so both see the same batches and KL completions):
    preftune   `python -m preftune train --loss kto --no-shuffle ...`: reference log-probs cached before training,
               the packed layout (each prompt encoded once for the completion and the KL completion)
    trl        KTOTrainer with KTOConfig's defaults: a reference model run at every step, gradient checkpointing
    trl-fast   precompute_ref_log_probs=True, gradient_checkpointing=False
Measured: the wall time and peak RSS of the whole process (bench_dpo.run_process), the loop time, the final loss
(the same on all three up to float rounding: a check that they trained the same thing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bench_dpo import HERE, OUT, first_pairs, machine, run_one

RUNS = ("preftune", "trl-fast", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="KTO on CPU: preftune vs TRL 1.16 (see the module docstring).")
    ap.add_argument("--model", default=str(OUT / "fixture" / "model"))
    ap.add_argument("--data", default=str(OUT / "fixture" / "pairs.jsonl"))
    ap.add_argument("--pairs", type=int, default=24, help="use the first N pairs of --data (2N examples)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--only", action="append", choices=RUNS)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", default=str(OUT / "work-kto"))
    ap.add_argument("--json", default=str(OUT / "bench_kto.json"))
    return ap.parse_args(argv)


def command(name: str, args: argparse.Namespace, data: Path, out: Path) -> list[str]:
    common = [
        "--model",
        args.model,
        "--data",
        str(data),
        "--output",
        str(out),
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        "1",
        "--max-length",
        str(args.max_length),
        "--learning-rate",
        str(args.learning_rate),
    ]
    if name == "preftune":
        return [
            sys.executable,
            "-m",
            "preftune",
            "train",
            *common,
            "--loss",
            "kto",
            "--no-shuffle",
            "--device",
            "cpu",
            "--no-report",
        ]
    mode = {"trl": "default", "trl-fast": "fast"}[name]
    return [
        sys.executable,
        str(HERE / "trl_run.py"),
        *common,
        "--trainer",
        "kto",
        "--mode",
        mode,
        "--stats",
        str(out) + ".stats.json",
    ]


def table(runs: list[dict]) -> str:
    base = next((r for r in runs if r["name"] == "preftune" and r["rc"] == 0), None)
    lines = [
        "| run | wall s | × preftune's time | training loop s | peak RSS MiB | × preftune's memory | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        if r["rc"] != 0:
            lines.append(f"| {r['name']} | failed (exit {r['rc']}) | | | | | |")
            continue
        ratio = f"{r['wall_s'] / base['wall_s']:.1f}×" if base else "—"
        memory = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.1f}×" if base else "—"
        loss = f"{r['final_loss']:.4f}" if r.get("final_loss") is not None else "—"
        lines.append(
            f"| {r['name']} | {r['wall_s']:.1f} | {ratio} | {r.get('loop_s', 0):.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {memory} | {loss} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = first_pairs(args.data, args.pairs, work / "pairs.jsonl")
    runs = [run_one(name, args, data, work, build=command) for name in (args.only or RUNS)]
    result = {"machine": machine(args.threads), "args": vars(args), "runs": runs}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(table(runs))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

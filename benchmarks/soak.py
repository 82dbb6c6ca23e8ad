"""Soak test: thousands of tiny optimizer steps through `preftune.recipe.train`, resident memory sampled as it goes.

    python benchmarks/soak.py --steps 5000

A leak of even a few hundred bytes per step (a tensor kept in a list, a growing history) shows as a steady rise
of resident memory after warm-up. Prints RSS every --every steps and the growth from the first sample after
warm-up to the last; writes benchmarks/out/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from preftune import recipe as train_module
from preftune.config import resolve

# The toy model and data builders are test fixtures in tests/toy.py, not part of the package.
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from toy import counting_pairs, save_model_folder, write_jsonl  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=250, help="steps before the baseline sample")
    args = parser.parse_args()

    root = OUT / "soak"
    if root.exists():
        import shutil

        shutil.rmtree(root)
    model = save_model_folder(root / "model")
    data = write_jsonl(counting_pairs(256, seed=0), root / "train.jsonl")
    samples: list[tuple[int, float]] = []

    def sample(step: int) -> None:
        if step % args.every == 0:
            samples.append((step, rss_mib()))

    train_module.after_step = sample
    cfg, _ = resolve(
        {
            "model": str(model),
            "data": str(data),
            "output": str(root / "run"),
            "batch_size": 2,
            "max_steps": args.steps,
            "learning_rate": 1e-4,
            "log_every": 1,
            "ref_cache": str(root / "cache"),
        }
    )
    start = time.perf_counter()
    train_module.train(cfg)
    elapsed = time.perf_counter() - start
    base = next(rss for step, rss in samples if step >= args.warmup)
    growth = samples[-1][1] - base
    for step, rss in samples:
        print(f"step {step:6d}  RSS {rss:8.1f} MiB")
    per_step = growth * 2**20 / max(1, samples[-1][0] - args.warmup)
    print(
        f"{args.steps} steps in {elapsed:.0f} s; RSS {base:.1f} MiB at step {args.warmup} → {samples[-1][1]:.1f} MiB "
        f"at step {samples[-1][0]}: {growth:+.1f} MiB ({per_step:+.0f} bytes/step)"
    )
    (OUT / "soak.json").write_text(
        json.dumps(
            {
                "steps": args.steps,
                "seconds": elapsed,
                "samples": samples,
                "growth_mib": growth,
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

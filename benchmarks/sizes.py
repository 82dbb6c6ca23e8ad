"""preftune against TRL 1.16 at the model sizes users train: bench_dpo.py per size, one table over the sizes.

    python benchmarks/sizes.py --size 29m --size 162m --repeat 2       # fixtures if missing, then bench_dpo
    python benchmarks/sizes.py --size 162m --only preftune --only trl \\
        --variant ckpt="--gradient-checkpointing" --variant bf16="--weights-dtype bfloat16"
    python benchmarks/sizes.py --size 411m --pairs 8                   # the largest, fewer pairs
    python benchmarks/sizes.py --table-only                            # the table from the JSONs written so far

Per size S: `fixture.py --size S` into benchmarks/out/size-S (built once: the same qa-feedback pairs at every size,
a random Llama of that shape), then `bench_dpo.py` on its first --pairs pairs (batch 4, fp32, 1 epoch, each run a
whole process from cold caches), numbers to benchmarks/out/sizes/S.json. Each invocation rewrites the table
benchmarks/out/sizes.md from every S.json there, so sizes can be run one at a time (the machine is shared).

The table: medians over bench_dpo's --repeat rounds for times and memory, and the median of the ratios measured
within each round (TRL default ÷ preftune) with their range; loop MFU and the FLOP bound as bench_dpo defines them
(its docstring): the bound is TRL default's executed FLOPs ÷ the useful FLOPs, the most any implementation could
gain over TRL's defaults at TRL's own FLOP rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import bench_dpo
import fixture

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
RESULTS = OUT / "sizes"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", action="append", default=[], choices=sorted(fixture.SIZES), help="repeatable")
    ap.add_argument("--pairs", type=int, default=16, help="the first N qa-feedback pairs (default 16)")
    ap.add_argument("--repeat", type=int, default=1, help="bench_dpo's interleaved rounds (default 1)")
    ap.add_argument("--only", action="append", choices=bench_dpo.RUNS, help="bench_dpo's runs (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS", help="bench_dpo's --variant")
    ap.add_argument("--threads", type=int, help="torch threads per process (bench_dpo's default: all cores)")
    ap.add_argument("--tag", default="", help="suffix of the JSON's name (S-TAG.json), to keep several runs of S")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table from benchmarks/out/sizes")
    return ap.parse_args(argv)


def ensure_fixture(size: str) -> Path:
    folder = OUT / f"size-{size}"
    if not (folder / "fixture.json").exists():
        fixture.main(["--out", str(folder), "--size", size])
    return folder


def bench(size: str, args: argparse.Namespace) -> int:
    folder = ensure_fixture(size)
    name = f"{size}-{args.tag}" if args.tag else size
    argv = [
        *("--model", str(folder / "model"), "--data", str(folder / "pairs.jsonl"), "--pairs", str(args.pairs)),
        *(
            "--repeat",
            str(args.repeat),
            "--work",
            str(RESULTS / f"work-{name}"),
            "--json",
            str(RESULTS / f"{name}.json"),
        ),
        *(x for run in args.only or [] for x in ("--only", run)),
        *(x for v in args.variant for x in ("--variant", v)),
        *(("--threads", str(args.threads)) if args.threads else ()),
    ]
    return bench_dpo.main(argv)


# ----------------------------------------------------------------------------------------------------- the table


def by_name(report: dict) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for r in report["runs"]:
        if r["rc"] == 0:
            runs.setdefault(r["name"], []).append(r)
    return runs


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def within_rounds(runs: list[dict], key: str, top: str, bottom: str) -> list[float]:
    """top's `key` ÷ bottom's, for each round that has both."""
    rounds = {}
    for r in runs:
        rounds.setdefault(r["round"], {})[r["name"]] = r
    return [
        pair[top][key] / pair[bottom][key]
        for pair in rounds.values()
        if top in pair and bottom in pair and pair[top].get(key) and pair[bottom].get(key)
    ]


def ratio_text(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    mid = f"{statistics.median(values):.{digits}f}×"
    return mid if len(values) == 1 else f"{mid} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def size_label(report: dict) -> str:
    m = report["model"]
    return (
        f"{m['params'] / 1e6:.0f}M ({m['non_embedding_params'] / 1e6:.0f}M body; h {m['hidden_size']}, {m['layers']} L)"
    )


def stem(report: dict) -> str:
    """The run set: the JSON's name (size, and --tag)."""
    return Path(report["settings"]["json"]).stem


def num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def main_rows(reports: list[dict]) -> list[str]:
    head = (
        "| model | set | pairs | run | wall s | s / step | reference pass s | peak RSS GiB | tokens/s | loop MFU | "
        "final loss | TRL default ÷ it: wall | per step | its memory ÷ TRL default's | FLOP bound: epoch (per step) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for report in reports:
        runs, ex = by_name(report), report["executed_flops"]
        all_runs = [r for rs in runs.values() for r in rs]
        for name in ("trl", "trl-fast", "preftune"):
            if name not in runs:
                continue
            rs = runs[name]
            mfu = median(rs, "loop_mfu")
            is_pt = name == "preftune"
            lines.append(
                f"| {size_label(report)} | {stem(report)} | {report['tokens']['pairs']} | {LABELS[name]} | "
                f"{num(median(rs, 'wall_s'), '.1f')} | {num(median(rs, 's_per_step'), '.1f')} | "
                f"{num(median(rs, 'reference_s'), '.1f') if is_pt else '—'} | "
                f"{num(median(rs, 'peak_rss_mib') / 1024, '.2f')} | {num(median(rs, 'tokens_per_s'), '.0f')} | "
                f"{num(mfu and 100 * mfu, '.0f')} % | {num(median(rs, 'final_loss'), '.4f')} | "
                f"{ratio_text(within_rounds(all_runs, 'wall_s', 'trl', name)) if name != 'trl' else '1'} | "
                f"{ratio_text(within_rounds(all_runs, 's_per_step', 'trl', name)) if name != 'trl' else '1'} | "
                f"{ratio_text(within_rounds(all_runs, 'peak_rss_mib', name, 'trl'), 3) if name != 'trl' else '1'} | "
                + (
                    f"{ex['bound_vs_useful']:.2f}× ({ex['per_step_bound_vs_preftune']:.2f}×) |"
                    if is_pt and ex["trl_positions_counted"]
                    else "— (no TRL run in this set: its padded positions unknown) |"
                    if is_pt
                    else f"{ex['trl_default'] / 1e12:.1f} TFLOP executed |"
                    if name == "trl"
                    else "|"
                )
            )
    return lines


LABELS = {"trl": "TRL default", "trl-fast": "TRL fastest", "preftune": "preftune"}


def variant_rows(reports: list[dict]) -> list[str]:
    """The preftune runs with extra flags (memory options), against TRL default and plain preftune in their round."""
    head = (
        "| model | set | run | flags | peak RSS GiB | ÷ TRL default's | wall s | s / step | s / step ÷ preftune's | "
        "final loss |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for report in reports:
        runs = by_name(report)
        all_runs = [r for rs in runs.values() for r in rs]
        for name, rs in runs.items():
            if not name.startswith("preftune-"):
                continue
            lines.append(
                f"| {size_label(report)} | {stem(report)} | {name} | `{rs[0]['extra_args']}` | "
                f"{median(rs, 'peak_rss_mib') / 1024:.2f} | {ratio_text(within_rounds(all_runs, 'peak_rss_mib', name, 'trl'), 3)} | "
                f"{median(rs, 'wall_s'):.1f} | {num(median(rs, 's_per_step'), '.1f')} | "
                f"{ratio_text(within_rounds(all_runs, 's_per_step', name, 'preftune'))} | "
                f"{num(median(rs, 'final_loss'), '.4f')} |"
            )
    return lines if len(lines) > 2 else []


def write_table() -> str:
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(RESULTS.glob("*.json"))]
    reports.sort(key=lambda r: (r["model"]["params"], r["tokens"]["pairs"], stem(r)))
    ceilings = ", ".join(f"{stem(r)} {r['ceiling_gflops']['used']:.0f}" for r in reports)
    text = "\n".join(
        [
            *main_rows(reports),
            "",
            f"Matmul ceiling used (best fp32 GFLOP/s measured in each run): {ceilings}.",
            "",
            *variant_rows(reports),
        ]
    )
    (OUT / "sizes.md").write_text(text + "\n", encoding="utf-8")
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    status = 0 if args.table_only else max((bench(size, args) for size in args.size), default=0)
    print(write_table())
    print(f"\ntable: {OUT / 'sizes.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())

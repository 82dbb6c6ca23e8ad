"""Tokenizing speed: pairs one at a time (three tokenizer calls each) against batches, side by side in one run.

    python benchmarks/tokenize_speed.py                          # FineGrainedRLHF qa-feedback pairs, GPT-2 tokenizer
    python benchmarks/tokenize_speed.py --repeats 5 --batch-size 256
    python benchmarks/tokenize_speed.py --tokenizer llama3.2             # Llama 3's split and 256 special tokens

Times `tokenize_pairs` on the same pairs three ways, each with a freshly loaded tokenizer (so that no run inherits
another's BPE cache):
    per pair     batch_size=None: three tokenizer calls per pair (the only path before batching)
    batched, no cuts   batches with every distinct text tokenized whole (data/cuts.py switched off): batching alone
    batched      the default batches (BATCH_PAIRS pairs), each prompt tokenized once for all its full sequences where
                 data/cuts.py proves it exact; tokenizers' own Rust threads as the environment sets them
    batched, 1 thread   the same with TOKENIZERS_PARALLELISM=false: what batching gives without a second core
on two workloads of the qa-feedback dev set (benchmarks/fixture.py builds the same pairs):
    all pairs    the 2,616 strict pairs: each question's prompt comes with ~5 pairs, so a batch tokenizes it (and
                 each prompt + answer) once instead of once per pair
    one per question   the first pair of each question: no text repeats, the gain of batching alone
and on the hh-rlhf sample (100 single-turn pairs, prompts of ~70 characters, answers of ~280), tokenized --passes
times per timing (each pass its own `tokenize_pairs` call: no text repeats within one): short rows, where the
Python cost of a tokenizer call weighs most.
The order of the three rotates from one repeat to the next and the machine is shared, so each repeat's ratio
(per pair / batched) is computed within the repeat and the median over repeats is reported. The first repeat also
checks that every way gives the same ids, `where`s and TruncationReport.

MB are the UTF-8 bytes of prompt + chosen + rejected, the text of the data (a .jsonl of these pairs is ~3 % larger).
Writes benchmarks/out/tokenize_speed.json (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # measure this checkout, whichever copy of preftune is installed
from fixture import SHARED, TOKENIZERS, qa_pairs  # noqa: E402

from preftune.data import tokenize as tok_module  # noqa: E402
from preftune.data.formats import PreferencePair  # noqa: E402
from preftune.data.tokenize import BATCH_PAIRS, tokenize_pairs  # noqa: E402

WAYS = ("per pair", "batched, no cuts", "batched", "batched, 1 thread")
HH_FILE = "preference/hh_rlhf_sample100.jsonl"


def hh_pairs(shared: Path) -> list[PreferencePair]:
    """The hh-rlhf sample as pairs: prompt "Human: …\n\n", the preferred "Assistant: …" answer chosen."""
    lines = (shared / HH_FILE).read_text(encoding="utf-8").splitlines()
    pairs = []
    for i, row in enumerate(map(json.loads, lines)):
        other = "Answer2" if row["Preference"] == "Answer1" else "Answer1"
        pairs.append(PreferencePair(row["Question"] + "\n\n", row[row["Preference"]], row[other], f"hh line {i + 1}"))
    return pairs


def workloads(shared: Path, passes: int) -> dict[str, tuple[list[PreferencePair], int]]:
    """name → (pairs, passes). The qa-feedback pairs, all of them and the first of each question (the rows of one
    question are adjacent), once each; the hh-rlhf sample `passes` times."""
    rows, _ = qa_pairs(shared)
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], f"qa line {i + 1}") for i, r in enumerate(rows)]
    firsts = [p for i, p in enumerate(pairs) if i == 0 or p.prompt != pairs[i - 1].prompt]
    return {
        "qa, all pairs": (pairs, 1),
        "qa, one per question": (firsts, 1),
        "hh-rlhf sample": (hh_pairs(shared), passes),
    }


def run_once(way: str, pairs: list[PreferencePair], passes: int, shared: Path, batch_size: int, tokenizer_name: str):
    """Seconds of `passes` `tokenize_pairs` calls, and what the last returned (for the equality check)."""
    tokenizer = TOKENIZERS[tokenizer_name](shared)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    if way == "batched, 1 thread":
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at each call
    cutter = tok_module.cutter
    if way == "batched, no cuts":
        tok_module.cutter = lambda tokenizer: None
    try:
        start = time.perf_counter()
        for _ in range(passes):
            out, report = tokenize_pairs(pairs, tokenizer, batch_size=None if way == "per pair" else batch_size)
        seconds = time.perf_counter() - start
    finally:
        tok_module.cutter = cutter
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    return seconds, ([(t.prompt_ids, t.chosen_ids, t.rejected_ids, t.where, t.label) for t in out], report)


def measure(pairs: list[PreferencePair], passes: int, shared: Path, batch_size: int, repeats: int, name: str) -> dict:
    """Each way `repeats` times, the order rotating; per-repeat ratios; medians."""
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for repeat in range(repeats):
        results = {}
        for way in WAYS[repeat % len(WAYS) :] + WAYS[: repeat % len(WAYS)]:
            took, results[way] = run_once(way, pairs, passes, shared, batch_size, name)
            seconds[way].append(took)
        if repeat == 0 and any(results[way] != results["per pair"] for way in WAYS):
            raise SystemExit("the batched ids, wheres or report differ from the per-pair ones")
    mb = passes * sum(len((p.prompt + p.chosen + p.rejected).encode("utf-8")) for p in pairs) / 1e6
    out = {"pairs": passes * len(pairs), "passes": passes, "mb": mb, "seconds": seconds, "ways": {}}
    for way in WAYS:
        median = statistics.median(seconds[way])
        ratios = [a / b for a, b in zip(seconds["per pair"], seconds[way])]
        out["ways"][way] = {
            "median_s": median,
            "mb_per_s": mb / median,
            "pairs_per_s": out["pairs"] / median,
            "ratios": ratios,
            "median_ratio": statistics.median(ratios),
        }
    return out


def table(results: dict) -> str:
    lines = [
        "| workload | way | median s | MB/s | pairs/s | speed-up (median of per-repeat ratios) | ratios |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        for way, w in r["ways"].items():
            ratios = ", ".join(f"{x:.2f}" for x in w["ratios"])
            lines.append(
                f"| {name} ({r['pairs']} pairs, {r['mb']:.2f} MB) | {way} | {w['median_s']:.2f} | "
                f"{w['mb_per_s']:.2f} | {w['pairs_per_s']:.0f} | {w['median_ratio']:.2f}× | {ratios} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (preference/, tokenizers/)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=BATCH_PAIRS)
    ap.add_argument("--passes", type=int, default=20, help="passes over the hh-rlhf sample per timing")
    ap.add_argument("--tokenizer", choices=["gpt2", "llama3.2"], default="gpt2")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "tokenize_speed.json")
    args = ap.parse_args()
    load = os.getloadavg()
    results = {
        name: measure(pairs, passes, args.shared, args.batch_size, args.repeats, args.tokenizer)
        for name, (pairs, passes) in workloads(args.shared, args.passes).items()
    }
    print(table(results))
    machine = {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tokenizers_parallelism_env": os.environ.get("TOKENIZERS_PARALLELISM"),
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
    }
    print(f"load average before {load[0]:.2f}, after {machine['loadavg_after'][0]:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        "tokenizer": args.tokenizer,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "hh_passes": args.passes,
    }
    args.json.write_text(json.dumps({"settings": settings, "machine": machine, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()

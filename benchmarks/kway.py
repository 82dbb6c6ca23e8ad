"""k-way prefix sharing: one training step (forward + backward) on 4-response data, today's packed layout against
k-way rows, time and peak memory side by side.

    OMP_NUM_THREADS=1 python benchmarks/kway.py --repeats 5          # the RESULTS.md run: 8 rows × 4 rejected,
                                                                     # prompts ~300 tokens, responses ~80
    OMP_NUM_THREADS=2 python benchmarks/kway.py --repeats 5 --pack-tokens 2048

Measured on: AMD EPYC, 2 cores shared with other jobs (load average 4-5 while it ran), Python 3.11.7, torch 2.13
(CPU), transformers 5.25; the numbers are in benchmarks/RESULTS.md ("k-way prefix sharing").

The model is the benchmark fixture's default shape (benchmarks/fixture.py --size 29m) built from its config with
random weights: Llama, hidden 256, MLP 768, 4 layers, 4 heads, GPT-2's vocabulary of 50,257, untied head, 29.1M
parameters, float32, SDPA attention. The data are random token ids: `--rows` data rows, each a prompt of
`--prompt` ± 10% tokens, a chosen response and `--k` rejected ones of `--response` ± 25% tokens, i.e. k pairs per
row, all of one micro-batch. Layouts (`preftune.data.batching.collate_packed`):
    one segment per pair   today's packed layout: [prompt | chosen | rejected_j], one segment per row
                           (share=False): each row's prompt and chosen response encoded k times
    k-way                  [prompt | chosen | rejected_1 … rejected_k] per data row: encoded once
A step is `packed_logps` → `combined_loss(["plackett_luce"], group_size=k)` → backward, as `preftune train --loss
plackett_luce` runs it (reference log-probs fixed numbers, as from the cache); the first step of each process is a
warm-up (allocator, kernel choice) and not timed.

Each measurement is a fresh process (one layout, `--steps` timed steps after the warm-up, their median), so that
its peak resident memory (ru_maxrss) is its own: `peak_rss_mib` is the whole process, `step_mib` the growth of the
peak from before the warm-up step to the end (activations, the logits chunks, gradients). The two layouts'
processes alternate, their order swapped each repeat, and the reported figures are medians over `--repeats`
(≥ 3); `ratio` is the median of the per-repeat ratios of step times, so a busy moment on the shared cores weighs
on both sides of one ratio. Each line printed is one JSON result; the last one is the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # measure this checkout, whichever copy of preftune is installed

LAYOUTS = ("one segment per pair", "k-way")
VOCAB = 50257


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8, help="data rows (groups) in the micro-batch")
    parser.add_argument("--k", type=int, default=4, help="rejected responses per row")
    parser.add_argument("--prompt", type=int, default=300, help="mean prompt tokens")
    parser.add_argument("--response", type=int, default=80, help="mean response tokens")
    parser.add_argument("--pack-tokens", type=int, default=0, help="several segments per row (0: one per row)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="processes per layout, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child", choices=LAYOUTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_model(seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).train()


def build_pairs(args: argparse.Namespace) -> list:
    """`args.rows` rows of `args.k` pairs: one prompt and chosen response per row, k rejected responses."""
    from preftune.data.tokenize import TokenizedPair

    rng = random.Random(args.seed)
    ids = lambda mean, spread: [rng.randrange(3, VOCAB) for _ in range(rng.randint(*spread(mean)))]  # noqa: E731
    prompt_range = lambda m: (int(m * 0.9), int(m * 1.1))  # noqa: E731
    response_range = lambda m: (int(m * 0.75), int(m * 1.25))  # noqa: E731
    pairs = []
    for r in range(args.rows):
        prompt, chosen = ids(args.prompt, prompt_range), ids(args.response, response_range)
        pairs += [
            TokenizedPair(prompt, chosen, ids(args.response, response_range), f"row {r} rejected[{j}]")
            for j in range(args.k)
        ]
    return pairs


def step(model, batch, k: int) -> float:
    """One forward + backward of plackett_luce on `batch`; seconds."""
    import torch

    from preftune.logps import packed_logps
    from preftune.losses import combined_loss

    start = time.perf_counter()
    model.zero_grad(set_to_none=False)
    logps = packed_logps(model, batch)
    offsets = torch.linspace(-0.5, 0.5, len(logps.chosen))  # reference log-probs: fixed numbers
    loss = combined_loss(
        ["plackett_luce"],
        [1.0],
        policy_chosen_logps=logps.chosen,
        policy_rejected_logps=logps.rejected,
        ref_chosen_logps=logps.chosen.detach() + offsets,
        ref_rejected_logps=logps.rejected.detach() - offsets,
        chosen_lengths=logps.chosen_lengths,
        rejected_lengths=logps.rejected_lengths,
        beta=0.1,
        num_pairs=len(logps.chosen),
        num_chosen_tokens=int(logps.chosen_lengths.sum()),
        group_size=k,
    )
    loss.backward()
    return time.perf_counter() - start


def child(args: argparse.Namespace) -> dict:
    """One layout in this process: `args.steps` timed steps after a warm-up; times and memory."""
    import torch

    from preftune.data.batching import collate_packed

    model = build_model(args.seed)
    pairs = build_pairs(args)
    batch = collate_packed(pairs, list(range(len(pairs))), 0, args.pack_tokens or None, share=args.child == "k-way")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(model, batch, args.k)  # warm-up: gradients allocated, kernels chosen
    times = [step(model, batch, args.k) for _ in range(args.steps)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "layout": args.child,
        "step_s": statistics.median(times),
        "step_s_all": [round(t, 4) for t in times],
        "peak_rss_mib": peak / 1024,
        "step_mib": (peak - before) / 1024,
        "rows": batch.input_ids.shape[0],
        "row_length": batch.input_ids.shape[1],
        "encoded_tokens": int((batch.segment >= 0).sum()),
        "padded_cells": batch.input_ids.numel(),
        "plain_tokens": batch.num_tokens,
        "head_rows": len(batch.head_rows) if batch.head_rows is not None else len(batch.target_ids),
        "threads": torch.get_num_threads(),
    }


def measure(layout: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", layout], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "")
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.repeats < 3:
        raise SystemExit("--repeats must be at least 3: the medians need them")
    argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    results: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    for repeat in range(args.repeats):
        for layout in LAYOUTS if repeat % 2 == 0 else LAYOUTS[::-1]:
            result = {**measure(layout, argv), "repeat": repeat + 1}
            results[layout].append(result)
            print(json.dumps(result), flush=True)
    median = lambda name, key: statistics.median(r[key] for r in results[name])  # noqa: E731
    ratios = [old["step_s"] / new["step_s"] for old, new in zip(*results.values())]
    summary = {
        "summary": True,
        "config": {k: v for k, v in vars(args).items() if k != "child"},
        "machine": machine(),
        **{
            name: {key: median(name, key) for key in ("step_s", "peak_rss_mib", "step_mib")}
            | {
                key: results[name][0][key]
                for key in ("rows", "row_length", "encoded_tokens", "padded_cells", "head_rows")
            }
            for name in LAYOUTS
        },
        "speedup_median_of_ratios": statistics.median(ratios),
        "ratios": [round(r, 3) for r in ratios],
        "step_mib_ratio": median(LAYOUTS[0], "step_mib") / median(LAYOUTS[1], "step_mib"),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory per process of `preftune train --fsdp`, 2 processes on the CPU (gloo): sharded loading and saving
against the code before it, and one process without --fsdp for reference; the losses of the three side by side.

    python benchmarks/fsdp_memory.py                   # a random Llama of 0.43B parameters (float32, 1.7 GB)
    python benchmarks/fsdp_memory.py --layers 4        # a smaller one, to try it out

The model is a random Llama built from a config (untied embeddings, vocabulary 32,000), saved once as an ordinary
model folder; the data are 16 counting pairs of the test suite's toy task (short sequences: the memory is that of
the weights, gradients and AdamW state, not of activations). Three runs of 2 steps of 8 pairs, a checkpoint after
step 1, final/ at the end, each with its own empty reference cache (so each computes the reference log-probs):
    one process   `preftune train --batch-size 8` (no --fsdp): the whole model, its gradients and AdamW state
    before        2 processes, `--fsdp --batch-size 4`, with the code of commit --before (extracted by `git archive`
                  into a temporary folder, the checkout untouched): each process loads the whole model, then
                  shards it; checkpoints and final/ are gathered whole on rank 0
    after         the same with this checkout: each process reads only its rows; saving gathers one tensor at a time
Each process records its peak resident memory (VmHWM, /proc/self/status) per phase and resets it between phases
(`/proc/self/clear_refs`): setup (loading, the layout check, the reference log-probs), step 1 with the
checkpoint after it, step 2, and the end (final/). The run's peak is the largest.

With glibc's default settings a process keeps much of the memory that FSDP's gathers freed (blocks of a few MB go
to the heap once a larger one has raised the mmap threshold, and stay resident); `--malloc-threshold 131072`
fixes the thresholds in every run, so that the peaks are those of the memory in use.

Writes benchmarks/out/fsdp_memory.json (--json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "6ec5e1e"  # the last commit that loaded the whole model before sharding

# Run by each process: `preftune train` with its peak memory recorded per phase into OUT.rankN.json.
DRIVER = """
import json, os, re, sys

out, argv, phases = sys.argv[1], sys.argv[2:], []


def mark(phase):
    status = open("/proc/self/status").read()
    phases.append([phase, int(re.search(r"VmHWM:\\s+(\\d+)", status).group(1)) / 2**20])  # GiB
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from the memory in use now


mark("imports")  # the interpreter, before preftune and torch
from preftune import recipe
from preftune.cli import main

make_optimizer = recipe.make_optimizer
recipe.make_optimizer = lambda s: (mark("setup"), make_optimizer(s))[1]
recipe.after_step = lambda step: mark(f"step {step}")
code = main(argv)
mark("final")
with open(f"{out}.rank{os.environ.get('RANK', '0')}.json", "w") as f:
    json.dump({"code": code, "phases": phases}, f)
"""


def build_model(folder: Path, args) -> int:
    """A random Llama saved as a model folder with the toy tokenizer; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from toy import build_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    count = model.num_parameters()
    model.save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return count


def run(name: str, src: Path, work: Path, argv: list[str], processes: int, malloc: dict) -> dict:
    """One training run; returns each process's phases and the run's losses."""
    out = work / name
    env = {
        **os.environ,
        **malloc,
        "PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "tests")]),
        "PREFTUNE_CACHE": str(work / f"cache-{name}"),
        "OMP_NUM_THREADS": "1",
    }
    driver = work / "driver.py"
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*launch, str(driver), str(work / f"{name}-memory"), *argv, "--output", str(out)]
    print(f"{name}: {' '.join(command)}", file=sys.stderr, flush=True)
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    ranks = [json.loads((work / f"{name}-memory.rank{r}.json").read_text()) for r in range(processes)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "phases": [dict(r["phases"]) for r in ranks],
        "peak_gib": [max(dict(r["phases"]).values()) for r in ranks],
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "final": str(out / "final"),
    }


def max_difference(a: Path, b: Path) -> float:
    """The largest |difference| between the tensors of two final/ folders (one tensor in memory at a time)."""
    from safetensors import safe_open

    worst = 0.0
    with safe_open(a / "model.safetensors", "pt") as fa, safe_open(b / "model.safetensors", "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for name in fa.keys():
            worst = max(worst, (fa.get_tensor(name) - fb.get_tensor(name)).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--before", default=BEFORE, help="the commit whose --fsdp is measured as 'before'")
    parser.add_argument(
        "--malloc-threshold",
        type=int,
        help="bytes: fix glibc's mmap and trim thresholds in every run (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_); "
        "by default glibc raises them as large blocks are freed and keeps freed memory of FSDP's gathers",
    )
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "fsdp_memory.json")
    args = parser.parse_args()
    threshold = str(args.malloc_threshold)
    malloc = {"MALLOC_MMAP_THRESHOLD_": threshold, "MALLOC_TRIM_THRESHOLD_": threshold} if args.malloc_threshold else {}
    sys.path.insert(0, str(ROOT / "tests"))
    from toy import counting_pairs, write_jsonl

    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as tmp:
        work = Path(tmp)
        (work / "driver.py").write_text(DRIVER)
        before = work / "before-code"
        before.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", args.before, "src"], capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)
        parameters = build_model(work / "model", args)
        data = write_jsonl(counting_pairs(16, seed=1), work / "train.jsonl")
        common = ["train", "--model", str(work / "model"), "--data", str(data), "--no-shuffle", "--max-steps", "2"]
        common += ["--learning-rate", "1e-5", "--save-every", "1"]
        runs = {
            "one process": run("one", ROOT / "src", work, [*common, "--batch-size", "8"], 1, malloc),
            "before": run("before", before / "src", work, [*common, "--batch-size", "4", "--fsdp"], 2, malloc),
            "after": run("after", ROOT / "src", work, [*common, "--batch-size", "4", "--fsdp"], 2, malloc),
        }
        final = {name: Path(r.pop("final")) for name, r in runs.items()}
        differences = {
            "after vs one process": max_difference(final["after"], final["one process"]),
            "after vs before": max_difference(final["after"], final["before"]),
        }
    result = {
        "parameters": parameters,
        "weights_gib": parameters * 4 / 2**30,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "malloc": malloc,
        "runs": runs,
        "final_max_abs_difference": differences,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{parameters / 1e9:.2f}B parameters, {result['weights_gib']:.2f} GiB of float32 weights")
    phases = list(runs["after"]["phases"][0])
    print("| run | process | " + " | ".join(phases) + " | peak (GiB) |")
    print("|---|---|" + "---|" * (len(phases) + 1))
    for name, r in runs.items():
        for rank, ph in enumerate(r["phases"]):
            print(f"| {name} | {rank} | " + " | ".join(f"{ph[p]:.2f}" for p in phases) + f" | {max(ph.values()):.2f} |")
    print("| step | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for step in range(len(runs["after"]["loss"])):
        print(f"| {step + 1} | " + " | ".join(f"{r['loss'][step]:.7f}" for r in runs.values()) + " |")
    print("final/ max |Δ|:", ", ".join(f"{k} {v:.3g}" for k, v in differences.items()))


if __name__ == "__main__":
    main()

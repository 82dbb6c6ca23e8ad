"""DPO on CPU: preftune against TRL 1.16, each run a whole process, on the same model, pairs and settings.

    python benchmarks/fixture.py --out benchmarks/out/fixture          # once: model + pairs
    python benchmarks/bench_dpo.py --pairs 32                          # preftune, TRL default, TRL fastest
    python benchmarks/bench_dpo.py --pairs 8 --only preftune --preftune-args "--gradient-checkpointing"

Runs (each in its own process, float32, CPU, 1 epoch, the same batch size, learning rate and max_length):
    preftune   `python -m preftune train --device cpu ...` (+ --preftune-args)
    trl        TRL's DPOTrainer with DPOConfig's defaults: reference model in memory, reference forward in every
               step, gradient checkpointing on (benchmarks/trl_run.py --mode default)
    trl-fast   TRL's fastest: precompute_ref_log_probs=True, gradient_checkpointing=False (--mode fast)
    preftune-cached  (only with --only) preftune again, reusing the reference log-probs the `preftune` run cached
Every run but preftune-cached starts with empty caches: preftune's reference cache ($PREFTUNE_CACHE) and the
datasets cache live under --work and are emptied first, so no run profits from an earlier one.

Measured per run: wall time of the whole process (imports, model load, tokenization, reference, training, save),
its peak resident memory (/usr/bin/time -v, else wait4's rusage), the training loop's own time where the trainer
reports it. Derived: seconds per pair, tokens/s over the wall time, and the share of the machine's matmul ceiling.

Tokens: the real tokens of a DPO step, prompt+chosen and prompt+rejected of each pair (no padding), counted with
preftune's tokenization (the same rules as TRL's); TRL's own count after its truncation is checked against it.

Useful FLOPs of one epoch (the work any implementation must do; attention scores and the optimizer are left out):
    T  = Σ_pairs (P + C + R)       tokens the transformer body must encode (P prompt, C chosen, R rejected tokens;
                                   the prompt once: both responses can attend to one copy of it)
    Tr = Σ_pairs (C + R)           response tokens: the only positions whose logits enter the loss
    N  = non-embedding parameters (all but the embedding table and the LM head); h = hidden size; V = vocabulary
    policy    = 6·N·T + 6·h·V·Tr   forward + backward (2 + 4 FLOPs per parameter per token)
    reference = 2·N·T + 2·h·V·Tr   forward only
    useful    = policy + reference = 8·N·T + 8·h·V·Tr
Tokens/s counts the plain layout's tokens (2·P + C + R per pair), so that it compares with other tools.
Share of the ceiling = useful / (wall time × ceiling), the ceiling being the best fp32 torch.matmul rate measured in
this run (before and after the runs, on a square 2048³ product and on the LM-head shape [tokens × h] @ [h × V]).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
RUNS = ("preftune", "trl", "trl-fast", "preftune-cached")
DEFAULT_RUNS = RUNS[:3]
TIME_BIN = "/usr/bin/time"


# ----------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="DPO on CPU: preftune vs TRL 1.16 (see the module docstring).")
    ap.add_argument("--model", default=str(OUT / "fixture" / "model"), help="model folder (default: the fixture's)")
    ap.add_argument("--data", default=str(OUT / "fixture" / "pairs.jsonl"), help="pairs jsonl (default: the fixture's)")
    ap.add_argument("--pairs", type=int, default=32, help="use the first N pairs of --data (default 32)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--only", action="append", choices=RUNS, help="run only this one (repeatable)")
    ap.add_argument("--skip-trl", action="store_true", help="run preftune only")
    ap.add_argument("--preftune-args", default="", help='extra flags for `preftune train`, e.g. "--dtype bfloat16"')
    ap.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch threads in every process (default: all cores this process may use)",
    )
    ap.add_argument("--ceiling-reps", type=int, default=3, help="timed repetitions per matmul shape")
    ap.add_argument("--work", default=str(OUT / "work"), help="scratch folder for the runs (emptied per run)")
    ap.add_argument("--json", default=str(OUT / "bench_dpo.json"), help="where to write all numbers")
    args = ap.parse_args(argv)
    args.runs = ["preftune"] if args.skip_trl else (args.only or list(DEFAULT_RUNS))
    return args


# ----------------------------------------------------------------------------------------------------- the ceiling


def matmul_gflops(m: int, k: int, n: int, reps: int) -> float:
    """Best fp32 rate of [m × k] @ [k × n] over `reps` timed products (after one warm-up), in GFLOP/s."""
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    out = a @ b  # warm-up: thread pool, page faults of the output
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def ceiling(hidden: int, vocab: int, reps: int) -> dict[str, float]:
    shapes = {"square_2048": (2048, 2048, 2048), f"lm_head_2048x{hidden}x{vocab}": (2048, hidden, vocab)}
    return {name: round(matmul_gflops(*shape, reps), 2) for name, shape in shapes.items()}


# ----------------------------------------------------------------------------------------------------- the work


def model_facts(model: str) -> dict:
    """Sizes and parameter counts from the config alone (a meta-device model: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in m.parameters())
    embed, head = m.get_input_embeddings().weight, m.get_output_embeddings().weight
    vocab_params = embed.numel() + (0 if config.tie_word_embeddings else head.numel())
    return {
        "model_type": config.model_type,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "params": total,
        "non_embedding_params": total - vocab_params,
        "tied_embeddings": bool(config.tie_word_embeddings),
    }


def first_pairs(data: str, n: int, dest: Path) -> Path:
    lines = [line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(lines) < n:
        raise SystemExit(f"--data {data}: {len(lines)} pairs, fewer than --pairs {n}")
    dest.write_text("\n".join(lines[:n]) + "\n", encoding="utf-8")
    return dest


def token_counts(model: str, data: Path, max_length: int) -> dict:
    """Tokens per pair as preftune trains on them (after its truncation to max_length)."""
    from preftune.data.formats import load_pairs
    from preftune.data.tokenize import tokenize_pairs
    from preftune.loading import load_tokenizer

    tokenizer = load_tokenizer(model)
    pairs, load = load_pairs(str(data))
    tokenized, trunc = tokenize_pairs(pairs, tokenizer, max_length=max_length)
    p = [len(t.prompt_ids) for t in tokenized]
    c = [len(t.chosen_ids) for t in tokenized]
    r = [len(t.rejected_ids) for t in tokenized]
    return {
        "pairs": len(tokenized),
        "load": load.summary(),
        "truncation": trunc.summary(),
        "prompt_tokens": sum(p),
        "chosen_tokens": sum(c),
        "rejected_tokens": sum(r),
        "tokens": 2 * sum(p) + sum(c) + sum(r),
        "response_tokens": sum(c) + sum(r),
        "mean_prompt": sum(p) / len(p),
        "mean_response": (sum(c) + sum(r)) / (2 * len(p)),
    }


def useful_flops(facts: dict, tokens: dict) -> dict[str, float]:
    n, h, v = facts["non_embedding_params"], facts["hidden_size"], facts["vocab_size"]
    # The prompt needs encoding once per pair: the plain layout's second copy is not useful work.
    t = tokens["prompt_tokens"] + tokens["response_tokens"]
    tr = tokens["response_tokens"]
    policy = 6 * n * t + 6 * h * v * tr
    reference = 2 * n * t + 2 * h * v * tr
    return {
        "policy": policy,
        "reference": reference,
        "useful": policy + reference,
        "formula": "8·N·Σ(P+C+R) + 8·h·V·Σ(C+R)",
    }


# ----------------------------------------------------------------------------------------------------- one run


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
    if name.startswith("preftune"):
        return [sys.executable, "-m", "preftune", "train", *common, "--device", "cpu", *shlex.split(args.preftune_args)]
    mode = {"trl": "default", "trl-fast": "fast"}[name]
    return [sys.executable, str(HERE / "trl_run.py"), *common, "--mode", mode, "--stats", str(out) + ".stats.json"]


def child_env(threads: int, work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / "hf_datasets"),  # fresh: no cached tokenization or reference log-probs
        PREFTUNE_CACHE=str(work / "preftune_cache"),  # emptied before `preftune`, kept for `preftune-cached`
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p),
    )
    return env


def run_process(cmd: list[str], env: dict, log: Path) -> tuple[int, float, int]:
    """Run `cmd` with its output in `log`; return (exit status, wall seconds, peak RSS in KiB)."""
    timing = log.with_suffix(".time")
    use_time = os.access(TIME_BIN, os.X_OK)
    full = [TIME_BIN, "-v", "-o", str(timing), *cmd] if use_time else cmd
    with open(log, "w", encoding="utf-8") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss  # KiB on Linux; with /usr/bin/time this is time's own, so read its report instead
    if use_time:
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timing.read_text(encoding="utf-8"))
        rss = int(match.group(1)) if match else -1
    return proc.returncode, wall, rss


def preftune_details(out: Path, log: Path) -> dict:
    metrics = out / "metrics.jsonl"
    if not metrics.exists():
        return {}
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
    details = {
        "steps": len(records),
        "loop_s": sum(r["step_time_s"] for r in records),
        "trained_tokens": round(sum(r["tokens_per_s"] * r["step_time_s"] for r in records)),
        "final_loss": records[-1]["loss"] if records else None,
    }
    # The reference pass happens before the loop; its log line says whether the cache already held it.
    found = re.search(r"--data reference log-probs: (reused|computed in ([\d.]+) s)", log.read_text(errors="replace"))
    if found:
        details["reference"] = "reused" if found.group(1) == "reused" else "computed"
        details["reference_s"] = float(found.group(2)) if found.group(2) else 0.0
    return details


def trl_details(out: Path) -> dict:
    stats = Path(str(out) + ".stats.json")
    if not stats.exists():
        return {}
    s = json.loads(stats.read_text(encoding="utf-8"))
    losses = [r["loss"] for r in s["log"] if "loss" in r]
    return {
        "steps": s["steps"],
        "loop_s": s["train_s"],
        "init_s": s["init_s"],
        "import_s": s["import_s"],
        "trained_tokens": s["tokens"],
        "examples": s["examples"],
        "dropped_by_trl": s["dropped_by_trl"],
        "sequences_cut": s["sequences_cut"],
        "gradient_checkpointing": s["gradient_checkpointing"],
        "precompute_ref_log_probs": s["precompute_ref_log_probs"],
        "reference_model_loaded": s["reference_model_loaded"],
        "final_loss": losses[-1] if losses else None,
    }


def run_one(name: str, args: argparse.Namespace, data: Path, work: Path, build=None) -> dict:
    """Run `name` (its command line from `build`, default `command`) from clean caches; its numbers."""
    out = work / name
    stale_paths = [out, Path(str(out) + ".stats.json"), work / "hf_datasets"]
    if name == "preftune":  # starts with no cached reference log-probs; preftune-cached reuses what it leaves
        stale_paths.append(work / "preftune_cache")
    for stale in stale_paths:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    cmd = (build or command)(name, args, data, out)
    print(f"[bench] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]  # other processes on the machine slow a run down: keep the evidence
    rc, wall, rss = run_process(cmd, child_env(args.threads, work), work / f"{name}.log")
    details = preftune_details(out, work / f"{name}.log") if name.startswith("preftune") else trl_details(out)
    result = {
        "name": name,
        "command": shlex.join(cmd),
        "rc": rc,
        "wall_s": wall,
        "peak_rss_mib": rss / 1024,
        "load_avg_1m": [load_before, os.getloadavg()[0]],
        "log": str(work / f"{name}.log"),
        **details,
    }
    if rc != 0:
        tail = (work / f"{name}.log").read_text(encoding="utf-8", errors="replace").splitlines()[-5:]
        result["error_tail"] = tail
        print(f"[bench] {name} FAILED (exit {rc}):\n  " + "\n  ".join(tail), file=sys.stderr, flush=True)
    else:
        print(f"[bench] {name}: {wall:.1f} s, peak RSS {rss / 1024:.0f} MiB", file=sys.stderr, flush=True)
    return result


# ----------------------------------------------------------------------------------------------------- report


def derive(run: dict, tokens: dict, flops: dict, ceiling_gflops: float) -> None:
    if run["rc"] != 0:
        return
    wall = run["wall_s"]
    run["s_per_pair"] = wall / tokens["pairs"]
    run["tokens_per_s"] = tokens["tokens"] / wall
    run["useful_gflops_per_s"] = flops["useful"] / wall / 1e9
    run["share_of_ceiling"] = flops["useful"] / (wall * ceiling_gflops * 1e9)
    if run.get("loop_s"):
        run["loop_share_of_ceiling"] = flops["useful"] / (run["loop_s"] * ceiling_gflops * 1e9)
    run["tokens_match"] = run.get("trained_tokens") in (None, tokens["tokens"])


def notes(run: dict) -> str:
    """What the run did around its loop: the reference pass, checkpointing, anything dropped."""
    parts = []
    if run.get("reference") == "reused":
        parts.append("reference log-probs reused from cache")
    elif "reference_s" in run:
        parts.append(f"reference pass {run['reference_s']:.1f} s, written to cache")
    if "gradient_checkpointing" in run:
        parts.append("grad ckpt" if run["gradient_checkpointing"] else "no grad ckpt")
        parts.append(
            f"reference precomputed (init {run['init_s']:.1f} s)"
            if run["precompute_ref_log_probs"]
            else "reference model every step"
        )
    if run.get("dropped_by_trl"):
        parts.append(f"{run['dropped_by_trl']} pairs dropped")
    if not run.get("tokens_match", True):
        parts.append(f"trained on {run['trained_tokens']:,} tokens")
    return "; ".join(parts)


def table(runs: list[dict]) -> str:
    head = (
        "| run | wall s | s/pair | tokens/s | loop s | peak RSS MiB | useful GFLOP/s | % of ceiling | "
        "% of ceiling (loop) | steps | final loss | notes |"
    )
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in runs:
        if r["rc"] != 0:
            lines.append(f"| {r['name']} | failed (exit {r['rc']}) |" + " |" * (columns - 2))
            continue
        loss = r.get("final_loss")
        lines.append(
            f"| {r['name']} | {r['wall_s']:.1f} | {r['s_per_pair']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r.get('loop_s', float('nan')):.1f} | {r['peak_rss_mib']:.0f} | {r['useful_gflops_per_s']:.2f} | "
            f"{100 * r['share_of_ceiling']:.1f} | {100 * r.get('loop_share_of_ceiling', float('nan')):.1f} | "
            f"{r.get('steps', '?')} | {loss if loss is None else f'{loss:.4f}'} | {notes(r)} |"
        )
    return "\n".join(lines)


def machine(threads: int) -> dict:
    import torch
    import transformers
    import trl

    cpu = ""
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else ""
    return {
        "cpu": cpu,
        "cores_usable": len(os.sched_getaffinity(0)),
        "threads": threads,
        "load_avg_1m": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = first_pairs(args.data, args.pairs, work / f"pairs_{args.pairs}.jsonl")
    facts = model_facts(args.model)
    tokens = token_counts(args.model, data, args.max_length)
    flops = useful_flops(facts, tokens)
    report = {
        "settings": {k: v for k, v in vars(args).items()},
        "machine": machine(args.threads),
        "model": facts,
        "tokens": tokens,
        "flops": flops,
    }
    print(
        f"[bench] {tokens['pairs']} pairs, {tokens['tokens']:,} tokens ({tokens['response_tokens']:,} response); "
        f"useful work {flops['useful'] / 1e12:.3f} TFLOP; measuring the matmul ceiling …",
        file=sys.stderr,
        flush=True,
    )
    before = ceiling(facts["hidden_size"], facts["vocab_size"], args.ceiling_reps)
    runs = [run_one(name, args, data, work) for name in args.runs]
    after = ceiling(facts["hidden_size"], facts["vocab_size"], args.ceiling_reps)
    best = max(*before.values(), *after.values())
    report["ceiling_gflops"] = {"before": before, "after": after, "used": best}
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    for run in runs:
        derive(run, tokens, flops, best)
    report["runs"] = runs

    text = table(runs)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    Path(args.json).with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(
        f"\n{tokens['pairs']} pairs ({tokens['mean_prompt']:.0f}-token prompts, {tokens['mean_response']:.0f}-token "
        f"responses), batch {args.batch_size}, {args.threads} threads, {facts['params'] / 1e6:.1f}M params "
        f"(vocab {facts['vocab_size']:,}); ceiling {best:.1f} GFLOP/s (fp32 matmul); useful work "
        f"{flops['useful'] / 1e9:.1f} GFLOP\n"
    )
    print(text)
    for run in runs:
        if run["rc"] == 0 and not run["tokens_match"]:
            print(f"note: {run['name']} trained on {run['trained_tokens']:,} tokens, not {tokens['tokens']:,}")
        if run.get("dropped_by_trl"):
            print(f"note: {run['name']}: TRL dropped {run['dropped_by_trl']} pairs (prompt ≥ max_length)")
    print(f"\nall numbers: {args.json}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

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
this run (before and after each round of runs, on a square 2048³ product and on the LM-head shape
[tokens × h] @ [h × V]).

Executed FLOPs: what each trainer's matmuls actually do, padding and recomputation included.
    T2 = Σ_batches rows × padded length   TRL's positions: chosen and rejected rows of 2·P+C+R real tokens, padded to
                                   the batch's longest (counted by trl_run.py; Σ(2·P+C+R) when unknown). Its LM
                                   head (TRL 1.16's chunked `add_fused_lm_head`) scores every position on CPU,
                                   padding included: T2h = T2 − rows.
    Tp, Tph                        preftune's positions: packed rows [prompt | chosen | rejected] padded to the
                                   batch's longest, and the response positions its head runs on, replayed with its
                                   own epoch order and collate (its reference pass counted as the same positions).
    Nr = N − layers·h·I            the body's parameters a checkpointed layer recomputes: torch's non-reentrant
                                   checkpoint stops before the layer's last matmul (the MLP's down projection,
                                   h × I), whose output backward does not need
    TRL default  = 8·N·T2 + 2·Nr·T2 + 10·h·V·T2h   policy forward 2 + backward 4 + reference forward in every step 2
                                   + gradient-checkpointing recompute 2·Nr; the head: forward 2, backward 6 (logits
                                   recomputed, ∂hidden, ∂W), reference 2 — all inside its training loop
    TRL fast     = loop 6·N·T2 + 8·h·V·T2h, reference precomputed before it 2·N·T2 + 2·h·V·T2h
    preftune     = loop 6·N·Tp + 8·h·V·Tph (+ 2·Nr·Tp with --gradient-checkpointing; the chunked head recomputes its
                   logits in backward, as TRL's does), reference pass before it 2·N·Tp + 2·h·V·Tph
    FLOP bound   = TRL default / useful: the largest speed-up over TRL's defaults any implementation could reach at
                   the same FLOP rate as TRL (it skips the second copy of the prompt, the head on prompt and padding
                   positions, the reference in every step and the recomputation); TRL default / preftune's executed
                   FLOPs is the same for preftune as built, and TRL default / preftune's loop FLOPs the bound on the
                   ratio of time per step (TRL's step includes its reference forward, preftune's does not).
`--check-flops` checks these formulas against torch's FlopCounterMode on a tiny Llama and 4 random pairs: one TRL
default step (TRL's fused head, gradient checkpointing, the reference forward) and preftune's packed step with and
without checkpointing and its reference pass; matmul FLOPs, with the in-place addmm_ both heads accumulate ∂W with
counted as addmm (torch's table leaves it out). They agree exactly.
Loop MFU = a run's executed loop FLOPs / (its training loop's seconds × the ceiling): how close the matmuls it chose
to do run to the machine's best fp32 rate. For --weights-dtype bfloat16 it is still against the fp32 ceiling.

--variant NAME=ARGS adds a preftune run `preftune-NAME` with these extra flags (each starts cold, like `preftune`);
ARGS may begin with VAR=VALUE words, set in that run's environment only (e.g.
nofix="PREFTUNE_MALLOC_THRESHOLD=0 --gradient-checkpointing": glibc's own malloc thresholds, see preftune.malloc);
--repeat K runs the whole list K times, interleaved (round 1: every run, round 2: every run, ...), and reports the
ratios within each round: on a shared machine those are the result, not absolute seconds.
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
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help='an extra preftune run `preftune-NAME` with these flags, e.g. ckpt="--gradient-checkpointing"',
    )
    ap.add_argument("--repeat", type=int, default=1, help="rounds of all runs, interleaved (default 1)")
    ap.add_argument("--check-flops", action="store_true", help="check the FLOP formulas on a tiny model, then exit")
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
    args.variants = {}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_.]+", name):
            ap.error(f"--variant {spec!r}: expected NAME=ARGS with NAME of letters, digits, _ or .")
        args.variants[f"preftune-{name}"] = flags
    args.runs += list(args.variants)
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
        "intermediate_size": getattr(config, "intermediate_size", None),
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


def token_counts(model: str, data: Path, max_length: int, batch_size: int) -> dict:
    """Tokens per pair as preftune trains on them (after its truncation to max_length), and the positions its
    training loop runs (`preftune_positions`)."""
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
        **preftune_positions(tokenized, model, data, batch_size, tokenizer.pad_token_id),
    }


def preftune_positions(tokenized: list, model: str, data: Path, batch_size: int, pad_id: int) -> dict:
    """Positions of epoch 1 as `preftune train` lays them out by default (its epoch order, packed layout, seed 42):
    body = rows × padded row length, head = response positions (a chosen response shared by k pairs once)."""
    from preftune.config import TrainConfig
    from preftune.data.batching import collate
    from preftune.data.load import epoch_order

    cfg = TrainConfig(model=model, data=str(data), output="unused", batch_size=batch_size)
    order = [int(i) for i in epoch_order(tokenized, cfg, 0)]
    body = head = 0
    for k in range(0, len(order), batch_size):
        chunk = order[k : k + batch_size]
        batch = collate("packed", [tokenized[i] for i in chunk], chunk, pad_id)
        body += batch.input_ids.numel()
        head += len(batch.head_rows if batch.head_rows is not None else batch.target_pos)
    return {"preftune_body_positions": body, "preftune_head_positions": head}


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


def executed_flops(facts: dict, tokens: dict, trl: dict | None = None) -> dict[str, float]:
    """What each trainer's matmuls do in one epoch (the module docstring's second model). `trl`: a TRL run's
    counts of its batches (`padded_positions`, `batch_rows`), else its positions are taken as Σ(2·P+C+R)."""
    n, h, v = facts["non_embedding_params"], facts["hidden_size"], facts["vocab_size"]
    if trl and trl.get("padded_positions"):
        t2, t2h, counted = trl["padded_positions"], trl["padded_positions"] - trl["batch_rows"], True
    else:
        t2 = t2h = tokens["tokens"]
        counted = False
    tp, tph = tokens["preftune_body_positions"], tokens["preftune_head_positions"]
    useful = useful_flops(facts, tokens)["useful"]
    # torch's non-reentrant checkpoint stops recomputing a layer once backward has what it needs: the layer's last
    # matmul (the MLP's down projection, h × intermediate) is not redone.
    nr = n - facts["layers"] * h * (facts["intermediate_size"] or 0)
    trl_default = 8 * n * t2 + 2 * nr * t2 + 10 * h * v * t2h
    preftune = {"loop": 6 * n * tp + 8 * h * v * tph, "reference": 2 * n * tp + 2 * h * v * tph}
    return {
        "trl_positions": t2,
        "trl_positions_counted": counted,
        "trl_default": trl_default,
        "trl_fast_loop": 6 * n * t2 + 8 * h * v * t2h,
        "trl_fast_reference": 2 * n * t2 + 2 * h * v * t2h,
        "preftune_loop": preftune["loop"],
        "preftune_reference": preftune["reference"],
        "checkpointing_recompute": 2 * nr * tp,
        "useful": useful,
        "bound_vs_useful": trl_default / useful,
        "bound_vs_preftune": trl_default / (preftune["loop"] + preftune["reference"]),
        # TRL's step holds its whole epoch's work; preftune's step only the loop's (its reference ran before).
        "per_step_bound_vs_preftune": trl_default / preftune["loop"],
    }


def loop_flops(run: dict, ex: dict) -> float:
    """Executed FLOPs of this run's training loop."""
    if run["name"] == "trl":
        return ex["trl_default"]
    if run["name"] == "trl-fast":
        return ex["trl_fast_loop"]
    checkpointing = "--gradient-checkpointing" in shlex.split(run.get("extra_args", ""))
    return ex["preftune_loop"] + (ex["checkpointing_recompute"] if checkpointing else 0)


def counted_flops(fn) -> int:
    """Matmul FLOPs torch counts while `fn` runs, in-place addmm_ included."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    addmm_ = {torch.ops.aten.addmm_: lambda s, a, b, *_, out_shape=None, **kw: 2 * a[0] * a[1] * b[1]}
    with FlopCounterMode(display=False, custom_mapping=addmm_) as counter:
        fn()
    return counter.get_total_flops()


def check_flops(seed: int = 0) -> int:
    """--check-flops: executed_flops against counted FLOPs of one step of each trainer on a tiny Llama."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from preftune.data.batching import collate_packed
    from preftune.data.tokenize import TokenizedPair
    from preftune.logps import packed_logps

    rng, (v, h, layers, inter) = random.Random(seed), (3000, 64, 2, 176)
    config = LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers)
    config.num_attention_heads = config.num_key_value_heads = 4
    ids = lambda k: [rng.randrange(3, v) for _ in range(k)]  # noqa: E731
    pairs = [
        TokenizedPair(ids(rng.randint(20, 40)), ids(rng.randint(5, 15)), ids(rng.randint(5, 15)), f"{i}")
        for i in range(4)
    ]
    models = [LlamaForCausalLM(config) for _ in range(2)]
    n = sum(p.numel() for name, p in models[0].named_parameters() if p.dim() == 2 and "embed" not in name) - h * v

    # TRL's batch: chosen rows then rejected rows, right-padded; labels -100 on prompt and padding.
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    input_ids = torch.tensor([a + b + [0] * (width - len(a) - len(b)) for a, b in rows])
    mask = torch.tensor([[1] * (len(a) + len(b)) + [0] * (width - len(a) - len(b)) for a, b in rows])
    labels = torch.tensor([[-100] * len(a) + b + [-100] * (width - len(a) - len(b)) for a, b in rows])
    policy, ref = models
    for m in models:
        add_fused_lm_head(m)
    policy.gradient_checkpointing_enable()
    policy.train()

    def trl_step():
        kw = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "fused_lm_head": True}
        out = policy(**kw, use_cache=False)
        with torch.no_grad():
            ref(**kw, use_cache=False)
        out.log_probs.sum().backward()

    batch = collate_packed(pairs, list(range(4)), 0)

    def preftune_step():
        chosen, rejected = packed_logps(policy, batch)[:2]
        (chosen - rejected).sum().backward()

    counted = {"trl_default": counted_flops(trl_step), "preftune_loop+ckpt": counted_flops(preftune_step)}
    policy.gradient_checkpointing_disable()
    counted["preftune_loop"] = counted_flops(preftune_step)
    with torch.no_grad():
        counted["preftune_reference"] = counted_flops(lambda: packed_logps(policy, batch))
    facts = {"non_embedding_params": n, "hidden_size": h, "vocab_size": v, "layers": layers, "intermediate_size": inter}
    heads = len(batch.head_rows if batch.head_rows is not None else batch.target_pos)
    tokens = {"preftune_body_positions": batch.input_ids.numel(), "preftune_head_positions": heads, "tokens": 1}
    tokens.update(prompt_tokens=1, response_tokens=1)
    ex = executed_flops(facts, tokens, {"padded_positions": input_ids.numel(), "batch_rows": len(rows)})
    ex["preftune_loop+ckpt"] = ex["preftune_loop"] + ex["checkpointing_recompute"]
    for key, got in counted.items():
        print(f"{key}: counted {got:,}, formula {ex[key]:,}" + ("" if got == ex[key] else "  MISMATCH"))
    return 0 if all(got == ex[key] for key, got in counted.items()) else 1


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
        extra = split_env(preftune_flags(name, args))[1]
        return [sys.executable, "-m", "preftune", "train", *common, "--device", "cpu", *extra]
    mode = {"trl": "default", "trl-fast": "fast"}[name]
    return [sys.executable, str(HERE / "trl_run.py"), *common, "--mode", mode, "--stats", str(out) + ".stats.json"]


def preftune_flags(name: str, args: argparse.Namespace) -> str:
    """--preftune-args, then the variant's own flags (bench_kto's arguments have neither)."""
    flags = (getattr(args, "preftune_args", ""), getattr(args, "variants", {}).get(name, ""))
    return " ".join(x for x in flags if x)


def split_env(flags: str) -> tuple[dict[str, str], list[str]]:
    """A variant's leading VAR=VALUE words (its process's environment) and the flags after them."""
    words = shlex.split(flags)
    env = {}
    while words and re.match(r"[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return env, words


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
        "padded_positions": s.get("padded_positions"),
        "batch_rows": s.get("batch_rows"),
        "gradient_checkpointing": s["gradient_checkpointing"],
        "precompute_ref_log_probs": s["precompute_ref_log_probs"],
        "reference_model_loaded": s["reference_model_loaded"],
        "final_loss": losses[-1] if losses else None,
    }


def source_hash() -> str:
    """A hash of preftune's source as a run starts: other work in the same tree may change it between runs."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((ROOT / "src" / "preftune").rglob("*.py")):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def run_one(name: str, args: argparse.Namespace, data: Path, work: Path, build=None) -> dict:
    """Run `name` (its command line from `build`, default `command`) from clean caches; its numbers."""
    out = work / name
    stale_paths = [out, Path(str(out) + ".stats.json"), work / "hf_datasets"]
    if name.startswith("preftune") and name != "preftune-cached":
        # Starts with no cached reference log-probs; preftune-cached reuses what the last of them left.
        stale_paths.append(work / "preftune_cache")
    for stale in stale_paths:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    cmd = (build or command)(name, args, data, out)
    print(f"[bench] {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    source = source_hash()
    load_before = os.getloadavg()[0]  # other processes on the machine slow a run down: keep the evidence
    env = {
        **child_env(args.threads, work),
        **split_env(preftune_flags(name, args) if name.startswith("preftune") else "")[0],
    }
    rc, wall, rss = run_process(cmd, env, work / f"{name}.log")
    details = preftune_details(out, work / f"{name}.log") if name.startswith("preftune") else trl_details(out)
    result = {
        "name": name,
        "source": source,
        "extra_args": preftune_flags(name, args) if name.startswith("preftune") else "",
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


def derive(run: dict, tokens: dict, flops: dict, ex: dict, ceiling_gflops: float) -> None:
    if run["rc"] != 0:
        return
    wall = run["wall_s"]
    run["s_per_pair"] = wall / tokens["pairs"]
    run["tokens_per_s"] = tokens["tokens"] / wall
    run["useful_gflops_per_s"] = flops["useful"] / wall / 1e9
    run["share_of_ceiling"] = flops["useful"] / (wall * ceiling_gflops * 1e9)
    if run.get("loop_s"):
        run["s_per_step"] = run["loop_s"] / run["steps"]
        run["loop_flops"] = loop_flops(run, ex)
        run["loop_mfu"] = run["loop_flops"] / (run["loop_s"] * ceiling_gflops * 1e9)
    run["tokens_match"] = run.get("trained_tokens") in (None, tokens["tokens"])


def notes(run: dict) -> str:
    """What the run did around its loop: the reference pass, checkpointing, anything dropped."""
    parts = [f"`{run['extra_args']}`"] if run.get("extra_args") else []
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
        "| run | round | wall s | s/pair | tokens/s | loop s | s/step | peak RSS MiB | useful GFLOP/s | % of ceiling | "
        "loop MFU % | steps | final loss | notes |"
    )
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    nan = float("nan")
    for r in runs:
        if r["rc"] != 0:
            lines.append(f"| {r['name']} | {r.get('round', 1)} | failed (exit {r['rc']}) |" + " |" * (columns - 3))
            continue
        loss = r.get("final_loss")
        lines.append(
            f"| {r['name']} | {r.get('round', 1)} | {r['wall_s']:.1f} | {r['s_per_pair']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {r.get('loop_s', nan):.1f} | {r.get('s_per_step', nan):.2f} | "
            f"{r['peak_rss_mib']:.0f} | {r['useful_gflops_per_s']:.2f} | {100 * r['share_of_ceiling']:.1f} | "
            f"{100 * r.get('loop_mfu', nan):.1f} | {r.get('steps', '?')} | "
            f"{loss if loss is None else f'{loss:.4f}'} | {notes(r)} |"
        )
    return "\n".join(lines)


def round_ratios(runs: list[dict], base: str = "preftune") -> list[dict]:
    """Within each round, every other run against `base`: wall time, time per step and peak memory, as
    other / base (so > 1 means `base` is faster or leaner)."""
    out = []
    for number in sorted({r["round"] for r in runs}):
        ok = {r["name"]: r for r in runs if r["round"] == number and r["rc"] == 0}
        if base not in ok:
            continue
        b = ok[base]
        for name, r in ok.items():
            if name == base:
                continue
            step = r.get("s_per_step") and b.get("s_per_step") and r["s_per_step"] / b["s_per_step"]
            out.append(
                {
                    "round": number,
                    "run": name,
                    "wall": r["wall_s"] / b["wall_s"],
                    "per_step": step,
                    "peak_rss": r["peak_rss_mib"] / b["peak_rss_mib"],
                }
            )
    return out


def ratio_table(ratios: list[dict]) -> str:
    lines = ["| round | run | its wall ÷ preftune's | its s/step ÷ preftune's | its peak RSS ÷ preftune's |"]
    lines.append("|---|---|---|---|---|")
    for x in ratios:
        step = f"{x['per_step']:.2f}" if x["per_step"] else "—"
        lines.append(f"| {x['round']} | {x['run']} | {x['wall']:.2f} | {step} | {x['peak_rss']:.2f} |")
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


def rounds(args: argparse.Namespace, data: Path, facts: dict) -> tuple[list[dict], list[dict]]:
    """--repeat rounds of every run (work/roundK when K > 1); the ceiling before each round and after the last."""
    work, runs, ceilings = Path(args.work), [], []
    for number in range(1, args.repeat + 1):
        ceilings.append(ceiling(facts["hidden_size"], facts["vocab_size"], args.ceiling_reps))
        folder = work / f"round{number}" if args.repeat > 1 else work
        folder.mkdir(parents=True, exist_ok=True)
        for name in args.runs:
            runs.append({**run_one(name, args, data, folder), "round": number})
    ceilings.append(ceiling(facts["hidden_size"], facts["vocab_size"], args.ceiling_reps))
    return runs, ceilings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.check_flops:
        return check_flops()
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = first_pairs(args.data, args.pairs, work / f"pairs_{args.pairs}.jsonl")
    facts = model_facts(args.model)
    tokens = token_counts(args.model, data, args.max_length, args.batch_size)
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
    runs, ceilings = rounds(args, data, facts)
    best = max(v for c in ceilings for v in c.values())
    report["ceiling_gflops"] = {"measured": ceilings, "used": best}
    report["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    trl = next((r for r in runs if r["name"] in ("trl", "trl-fast") and r.get("padded_positions")), None)
    ex = executed_flops(facts, tokens, trl)
    for run in runs:
        derive(run, tokens, flops, ex, best)
    report["executed_flops"] = ex
    report["runs"] = runs
    report["ratios"] = round_ratios(runs)

    text = table(runs) + "\n\n" + ratio_table(report["ratios"])
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    Path(args.json).with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    print(
        f"\n{tokens['pairs']} pairs ({tokens['mean_prompt']:.0f}-token prompts, {tokens['mean_response']:.0f}-token "
        f"responses), batch {args.batch_size}, {args.threads} threads, {facts['params'] / 1e6:.1f}M params "
        f"(vocab {facts['vocab_size']:,}); ceiling {best:.1f} GFLOP/s (fp32 matmul); useful work "
        f"{flops['useful'] / 1e9:.1f} GFLOP; TRL default executes {ex['trl_default'] / 1e9:.1f} GFLOP: FLOP bound "
        f"{ex['bound_vs_useful']:.2f}× (against preftune's executed {ex['bound_vs_preftune']:.2f}×)\n"
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

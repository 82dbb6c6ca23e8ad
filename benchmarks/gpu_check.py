"""GPU check: exactness, speed, MFU and memory of the padded, packed-SDPA and packed-Flex layouts on a lent GPU.

    python benchmarks/gpu_check.py [--quick] [--size 1b|0.5b] [--pairs 8] [--prompt 512] [--response 128]
    torchrun --nproc-per-node N benchmarks/gpu_check.py [--quick]     # more than one GPU: adds --fsdp training
    python benchmarks/gpu_check.py --device cpu --tiny [--no-train]   # the script's own smoke test (tests run it)

A random Llama shaped like Llama-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192,
vocabulary 128,256, tied embeddings; `--size 0.5b`: hidden 1024, 24 layers) and random token pairs (lengths
±20%). Variants: the plain padded layout, the packed layout with one pair per row through SDPA's dense mask and
through FlexAttention's block mask, and the same two with `--pack-tokens` rows of several pairs.

1. `matmul`: the bf16 ceiling, a large torch.matmul timed; MFU is measured against it, not a datasheet.
2. `exact` (float32, `--exact-pairs` pairs): per-sequence log-probs and the gradient of a DPO loss of every
   variant against the padded layout: max |Δ logp| / |logp| ≤ 1e-4 and ‖Δ grad‖ / ‖grad‖ ≤ 1e-3, else the check
   fails. On a CPU the Flex variants run forward only (torch has no CPU FlexAttention backward), eagerly.
3. `speed` (bfloat16 autocast over float32 weights, `--pairs` pairs): the first step (compiling included),
   then the best of `--steps` forward + backward steps and of two no-grad reference passes: tokens/s (tokens of
   the plain layout, so layouts compare), MFU (the FLOPs each layout executes / time / the matmul ceiling) and
   the effective MFU (the plain layout's FLOPs for the same pairs / time), peak memory; log-probs within 2e-2
   relative of the padded layout's (bfloat16 rounds differently per layout).
4. `auto`: the attention `preftune` picks for the model (Flex on CUDA when its probe passes).
5. `train`: `preftune train` end to end: the toy model in float32, padded against packed (the packed one takes
   the automatic attention: Flex on CUDA), losses per step within 1e-4 relative; then the 1B-shaped model in
   bfloat16 for a few steps. Under torchrun with several processes the same runs are data-parallel, plus a
   `--fsdp` run of the 1B-shaped model (sharded loading; of the toy model with --quick or --tiny).

One JSON line per result on stdout (rank 0 only), a final `summary` line; exit status 1 when a check failed.
Timings are those of the card named on the first line: compare numbers from one card only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.attention import flex_unsuitable, packed_attention, set_packed_attention
from preftune.data.batching import collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.device import autocast
from preftune.logps import packed_logps, padded_logps
from preftune.losses import combined_loss

SIZES = {
    # Llama-3.2-1B's shape (1.24B parameters with tied embeddings).
    "1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192
    ),
    "0.5b": dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4, intermediate_size=4096
    ),
    "tiny": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
    ),
}
VOCAB = 128256
TINY_VOCAB = 1000
# (name, layout, attention, rows of several pairs)
VARIANTS = [
    ("padded", "padded", None, False),
    ("packed_sdpa", "packed", "sdpa", False),
    ("packed_flex", "packed", "flex", False),
    ("pack_tokens_sdpa", "packed", "sdpa", True),
    ("pack_tokens_flex", "packed", "flex", True),
]
EXACT_LOGPS, EXACT_GRAD, BF16_LOGPS = 1e-4, 1e-3, 2e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the smoke test, with --tiny)")
    parser.add_argument("--size", choices=("1b", "0.5b"), default="1b")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short pairs: the smoke test")
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps, no 1B-shaped training run")
    parser.add_argument("--pairs", type=int, default=None, help="pairs of the speed batch (default 8; quick 4)")
    parser.add_argument("--exact-pairs", type=int, default=None, help="pairs of the float32 check (default 4)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens, ±20%% (default 512)")
    parser.add_argument("--response", type=int, default=None, help="response tokens, ±20%% (default 128)")
    parser.add_argument("--pack-tokens", type=int, default=None, help="row size of the pack_tokens variants")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 5; quick 2)")
    parser.add_argument("--no-train", action="store_true", help="skip the `preftune train` runs")
    parser.add_argument("--workdir", default=None, help="folder for the model and run folders (default: a temp)")
    args = parser.parse_args(argv)
    small = args.tiny or args.device == "cpu"  # a CPU runs the smoke test only
    few = args.quick or small
    defaults = {"pairs": 4 if few else 8, "exact_pairs": 2 if small else 4, "steps": 2 if few else 5}
    defaults |= {"prompt": 24, "response": 8} if small else {"prompt": 512, "response": 128}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.pack_tokens is None:
        args.pack_tokens = 4 * (args.prompt + 2 * args.response)  # about four pairs per row
    args.tiny = small
    return args


# ----------------------------------------------------------------------------------------------------- setup
def rank() -> int:
    return int(os.environ.get("RANK", "0"))


STARTED = time.perf_counter()


def emit(record: dict) -> None:
    """One JSON line, from rank 0 only, with the seconds since the start (`at_s`: the time each section took)."""
    if rank() == 0:
        print(json.dumps({**record, "at_s": round(time.perf_counter() - STARTED, 1)}), flush=True)


def model_config(args: argparse.Namespace) -> LlamaConfig:
    shape = SIZES["tiny" if args.tiny else args.size]
    return LlamaConfig(
        vocab_size=TINY_VOCAB if args.tiny else VOCAB,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        **shape,
    )


def make_pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    """n pairs of random token ids (3 … vocab − 1), each length drawn within ±20% of the given one."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(3, vocab) for _ in range(k)]  # noqa: E731
    vary = lambda k: max(1, round(k * rng.uniform(0.8, 1.2)))  # noqa: E731
    return [TokenizedPair(ids(vary(prompt)), ids(vary(response)), ids(vary(response)), str(i)) for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, n: int, reps: int) -> float:
    """FLOP/s of an n × n bfloat16 matmul (float32 on a CPU), the best of `reps` after a warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    torch.matmul(a, b)
    best = math.inf
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------------------------------- FLOPs
def forward_flops(config: LlamaConfig, pairs: list[TokenizedPair], layout: str) -> int:
    """Matmul FLOPs of one forward pass over `pairs` in `layout` (padding excluded: it is waste, not work).

    Per token the decoder's linear layers cost 2 × their weights (q, k, v, o projections and the 3 MLP matrices);
    the LM head 2 × hidden × vocabulary per scored position; attention 4 × hidden per (query, key) pair it
    computes (scores and the weighted sum). The padded layout runs every sequence (prompt + response) in full and
    scores every position; the packed one runs each prompt once and scores response positions only, and each
    response attends to its prompt and itself."""
    h, layers, v = config.hidden_size, config.num_hidden_layers, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size)
    tri = lambda n: n * (n + 1) // 2  # noqa: E731
    tokens = head = attended = 0
    for pair in pairs:
        p, c, r = len(pair.prompt_ids), len(pair.chosen_ids), len(pair.rejected_ids)
        if layout == "padded":
            tokens += 2 * p + c + r
            head += 2 * p + c + r
            attended += tri(p + c) + tri(p + r)
        else:
            tokens += p + c + r
            head += c + r
            attended += tri(p) + c * p + tri(c) + r * p + tri(r)
    return 2 * linear * tokens + 2 * h * v * head + 4 * h * layers * attended


def train_flops(config: LlamaConfig, pairs: list[TokenizedPair], layout: str) -> int:
    """Forward + backward: backward costs twice the forward's matmuls (gradients of inputs and of weights)."""
    return 3 * forward_flops(config, pairs, layout)


def mfu(flops: float, seconds: float, ceiling: float) -> float:
    return flops / seconds / ceiling


# ------------------------------------------------------------------------------------------------ the variants
def batch_of(variant: tuple, pairs: list[TokenizedPair], pack_tokens: int, device: torch.device):
    _, layout, _, several = variant
    indices = list(range(len(pairs)))
    if layout == "padded":
        return collate_padded(pairs, indices, 0).to(device)
    return collate_packed(pairs, indices, 0, pack_tokens if several else None).to(device)


def logps_fn(variant: tuple):
    return padded_logps if variant[1] == "padded" else packed_logps


def dpo_loss(chosen, rejected, chosen_len, rejected_len):
    return combined_loss(
        ["sigmoid"],
        [1.0],
        policy_chosen_logps=chosen,
        policy_rejected_logps=rejected,
        ref_chosen_logps=chosen.detach() - 0.5,
        ref_rejected_logps=rejected.detach() + 0.5,
        chosen_lengths=chosen_len,
        rejected_lengths=rejected_len,
        beta=0.1,
        label_smoothing=0.0,
        num_pairs=len(chosen),
        num_chosen_tokens=int(chosen_len.sum()),
    )


def run_step(model, variant, batch, dtype: str, grad: bool) -> Tensor:
    """[2B] log-probs (chosen, then rejected) of one pass; with `grad` a DPO loss's backward fills .grad."""
    if variant[2]:
        set_packed_attention(model, variant[2])
    # torch has no CPU FlexAttention backward, and its CPU compile takes ~20 s: a CPU's Flex passes are forward
    # passes run eagerly (exact, unfused), the smoke test of this script.
    cpu_flex = batch.input_ids.device.type == "cpu" and variant[2] == "flex"
    model.zero_grad(set_to_none=True)
    stance = torch.compiler.set_stance("force_eager") if cpu_flex else nullcontext()
    with stance, warnings.catch_warnings(), torch.set_grad_enabled(grad), autocast(batch.input_ids.device, dtype):
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")  # on purpose, above
        out = logps_fn(variant)(model, batch)
    if grad:
        dpo_loss(*out).backward()
    return torch.cat(out[:2]).detach().float()


def can_train(variant: tuple, device: torch.device) -> bool:
    return not (device.type == "cpu" and variant[2] == "flex")


def exactness(model, config, args, device) -> list[dict]:
    """Float32 log-probs and gradients of every variant against the padded layout's."""
    pairs = make_pairs(args.exact_pairs, args.prompt, args.response, config.vocab_size, seed=1)
    records, want, want_grads = [], None, None
    for variant in VARIANTS:
        grad = can_train(variant, device)
        batch = batch_of(variant, pairs, args.pack_tokens, device)
        got = run_step(model, variant, batch, "float32", grad)
        grads = [p.grad for p in model.parameters()] if grad else None
        if want is None:
            want, want_grads = got, [g.clone() for g in grads]
            continue
        record = {"exact": variant[0], "dtype": "float32", "pairs": len(pairs)}
        record["logps_max_rel_diff"] = ((got - want).abs() / want.abs()).max().item()
        record["grad_rel_diff"] = grad_rel_diff(grads, want_grads) if grad else None
        record["ok"] = record["logps_max_rel_diff"] <= EXACT_LOGPS and (
            not grad or record["grad_rel_diff"] <= EXACT_GRAD
        )
        records.append(record)
        emit(record)
    model.zero_grad(set_to_none=True)
    return records


def grad_rel_diff(got: list, want: list) -> float:
    """‖got − want‖ / ‖want‖ over all parameters, without concatenating them (a 1B model's gradient is 5 GB)."""
    diff = sum((g.float() - w.float()).pow(2).sum() for g, w in zip(got, want))
    norm = sum(w.float().pow(2).sum() for w in want)
    return (diff / norm).sqrt().item()


def speed(model, config, args, device, ceiling: float) -> list[dict]:
    """bfloat16 speed, MFU and memory of every variant; log-probs against the padded layout's within 2e-2."""
    pairs = make_pairs(args.pairs, args.prompt, args.response, config.vocab_size, seed=2)
    plain = train_flops(config, pairs, "padded")
    records, want = [], None
    for variant in VARIANTS:
        grad = can_train(variant, device)
        batch = batch_of(variant, pairs, args.pack_tokens, device)
        first, got = timed(device, lambda: run_step(model, variant, batch, "bfloat16", grad))
        reset_peak(device)
        step_s = min(
            timed(device, lambda: run_step(model, variant, batch, "bfloat16", grad))[0] for _ in range(args.steps)
        )
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        timed(device, lambda: run_step(model, variant, batch, "bfloat16", False))  # the no-grad pass compiles apart
        ref_s = min(timed(device, lambda: run_step(model, variant, batch, "bfloat16", False))[0] for _ in range(2))
        flops = train_flops(config, pairs, variant[1]) if grad else forward_flops(config, pairs, variant[1])
        want = got if want is None else want
        record = {
            "speed": variant[0],
            "dtype": "bfloat16",
            "pairs": len(pairs),
            "rows": tuple(batch.input_ids.shape),
            "backward": grad,
            "first_step_s": round(first, 3),
            "step_s": round(step_s, 4),
            "ref_pass_s": round(ref_s, 4),
            "tokens_per_s": round(batch.num_tokens / step_s),
            "mfu": round(mfu(flops, step_s, ceiling), 4),
            "effective_mfu": round(mfu(plain if grad else plain / 3, step_s, ceiling), 4),
            "peak_GiB": round(peak, 2) if peak is not None else None,
            "logps_max_rel_diff": ((got - want).abs() / want.abs()).max().item(),
        }
        record["ok"] = record["logps_max_rel_diff"] <= BF16_LOGPS
        records.append(record)
        emit(record)
    model.zero_grad(set_to_none=True)
    return records


def timed(device: torch.device, fn) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------------------- preftune train
def train_runs(args, device: torch.device, root: Path) -> list[dict]:
    """`preftune train` end to end: the toy model padded vs packed in float32 (losses within 1e-4), then the
    1B-shaped model folder root/big in bfloat16 (and with --fsdp under torchrun)."""
    from preftune.cli import main

    sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
    from toy import build_tokenizer, counting_pairs, save_model_folder, write_jsonl

    data, toy = root / "train.jsonl", root / "toy"
    if rank() == 0:  # every process reads the same files: one writes them
        write_jsonl(counting_pairs(64, seed=1), data)
        save_model_folder(toy)
    barrier()
    common = ["--data", str(data), "--device", device.type, "--batch-size", "8", "--ref-cache", str(root / "cache")]
    runs, records = {}, []
    for layout in ("padded", "packed"):
        out = root / f"toy-{layout}"
        argv = ["train", "--model", str(toy), "--output", str(out), "--layout", layout, "--max-steps", "6"]
        argv += [*common, "--learning-rate", "1e-3"] + (["--pack-tokens", "64"] if layout == "packed" else [])
        code = main(argv)
        runs[layout] = (code, losses(out) if code == 0 else [])
    (a_code, a), (b_code, b) = runs["padded"], runs["packed"]
    worst = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=math.inf)
    record = {
        "train": "toy padded vs packed",
        "dtype": "float32",
        "exit": [a_code, b_code],
        "losses_max_rel_diff": worst,
    }
    record["ok"] = a_code == b_code == 0 and len(a) == len(b) == 6 and worst <= EXACT_LOGPS
    records.append(record)
    emit(record)
    big = root / "big"  # main() saved the 1B-shaped model there, unless --quick or --tiny
    runs = [] if args.quick or args.tiny else [(big, [])]
    if world_size() > 1:  # sharded training; with the 1B-shaped folder sharded loading too
        runs.append((toy if args.quick or args.tiny else big, ["--fsdp"]))
    if rank() == 0 and runs and runs[0][0] == big:
        build_tokenizer().save_pretrained(big)
    barrier()
    for folder, extra in runs:
        name = f"{'toy' if folder == toy else args.size}{' --fsdp' if extra else ''}"
        out = root / name.replace(" --", "-")
        argv = ["train", "--model", str(folder), "--output", str(out), "--dtype", "bfloat16", "--max-steps", "3"]
        argv += [*common, "--learning-rate", "1e-5", "--pack-tokens", "64", *extra]
        start = time.perf_counter()
        code = main(argv)
        got = losses(out) if code == 0 else []
        record = {"train": name, "dtype": "bfloat16", "exit": code, "losses": got}
        record["wall_s"] = round(time.perf_counter() - start, 1)
        record["ok"] = code == 0 and len(got) == 3 and all(math.isfinite(x) for x in got)
        records.append(record)
        emit(record)
    return records


def workdir(args: argparse.Namespace, tmp: str) -> Path:
    """--workdir, else this process's temporary folder, or under torchrun one folder all processes name alike."""
    root = Path(args.workdir or tmp)
    if not args.workdir and world_size() > 1:
        root = Path(tempfile.gettempdir()) / f"preftune-gpu-check-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    root.mkdir(parents=True, exist_ok=True)
    return root


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    global STARTED
    STARTED = time.perf_counter()
    args = parse_args(argv)
    device = start(args.device)
    import transformers

    emit({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "processes": world_size(), "torch": torch.__version__, "transformers": transformers.__version__})  # fmt: skip
    ceiling = matmul_ceiling(device, 8192 if device.type == "cuda" else 256, reps=10)
    emit({"matmul_tflops": round(ceiling / 1e12, 3), "dtype": "bfloat16" if device.type == "cuda" else "float32"})
    torch.manual_seed(0)
    config = model_config(args)
    model = LlamaForCausalLM(config).to(device).train()
    emit(
        {
            "model": "tiny" if args.tiny else args.size,
            "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        }
    )
    records = exactness(model, config, args, device)
    records += speed(model, config, args, device, ceiling)
    records.append(auto_choice(model, device))
    emit(records[-1])
    with tempfile.TemporaryDirectory() as tmp:
        root = workdir(args, tmp)
        if not (args.no_train or args.quick or args.tiny) and rank() == 0:  # the model above, as a folder to train
            model.to(torch.bfloat16).save_pretrained(root / "big")
        del model
        if not args.no_train:
            records += train_runs(args, device, root)
        barrier()
        if root != Path(tmp) and not args.workdir and rank() == 0:  # torchrun's shared folder
            shutil.rmtree(root)
    failed = [r for r in records if not r["ok"]]
    emit({"summary": "FAILED" if failed else "ok", "checks": len(records), "failed": failed})
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failed else 0


def start(name: str) -> torch.device:
    """The device of this process; under torchrun the process group is joined here, by the script, so that the
    `preftune train` runs leave it standing between them (they leave only a group they joined themselves)."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device (run with --device cpu --tiny for the smoke test)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size() > 1:
        torch.distributed.init_process_group(backend="cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return device


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def auto_choice(model, device: torch.device) -> dict:
    """The attention `preftune` picks for this model by itself, and why (the probe's verdict on CUDA)."""
    set_packed_attention(model, "auto")
    choice = packed_attention(model)
    why = flex_unsuitable(model.get_decoder())  # cached: the probe ran once, for the choice
    return {
        "auto_attention": choice,
        "why_not_flex": why,
        "ok": choice == ("flex" if device.type == "cuda" else "sdpa"),
    }


if __name__ == "__main__":
    sys.exit(main())

"""CUDA check: the packed layout's exactness and speed against the plain padded layout on a GPU.

    python benchmarks/gpu_check.py [--pairs 8] [--prompt 550] [--response 90] [--steps 5]

Random 29M-parameter Llama with the GPT-2 vocabulary size (50,257), random token pairs of the given lengths
(responses ±20%), float32 and bfloat16 autocast. For each dtype: the largest difference in per-sequence log-probs
and the relative difference of the gradient, then the time of a forward + backward step and the peak GPU memory
of each layout. Then `preftune train` end to end on CUDA with the toy model. Prints one JSON line per result.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from preftune.data.batching import collate_packed, collate_padded
from preftune.data.tokenize import TokenizedPair
from preftune.logps import packed_logps, padded_logps
from preftune.losses import combined_loss


def make_pairs(n: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[TokenizedPair]:
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab) for _ in range(k)]  # noqa: E731
    vary = lambda k: max(1, int(k * rng.uniform(0.8, 1.2)))  # noqa: E731
    return [TokenizedPair(ids(vary(prompt)), ids(vary(response)), ids(vary(response)), str(i)) for i in range(n)]


def step(model, batch, fn, dtype):
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
    with ctx:
        chosen, rejected, chosen_len, rejected_len = fn(model, batch)
    loss = combined_loss(
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
    loss.backward()
    return torch.cat([chosen, rejected]).detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def measure(model, batch, fn, dtype, steps):
    step(model, batch, fn, dtype)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        logps, grad = step(model, batch, fn, dtype)
    torch.cuda.synchronize()
    return logps, grad, (time.perf_counter() - start) / steps, torch.cuda.max_memory_allocated() / 2**30


def layouts(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50257,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).cuda().train()
    pairs = make_pairs(args.pairs, args.prompt, args.response, config.vocab_size)
    idx = list(range(len(pairs)))
    padded = collate_padded(pairs, idx, 0).to("cuda")
    packed = collate_packed(pairs, idx, 0).to("cuda")
    for dtype in ("float32", "bfloat16"):
        a_logps, a_grad, a_time, a_mem = measure(model, padded, padded_logps, dtype, args.steps)
        b_logps, b_grad, b_time, b_mem = measure(model, packed, packed_logps, dtype, args.steps)
        print(
            json.dumps(
                {
                    "dtype": dtype,
                    "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                    "pairs": args.pairs,
                    "logps_max_abs_diff": (a_logps - b_logps).abs().max().item(),
                    "logps_max_rel_diff": ((a_logps - b_logps).abs() / a_logps.abs()).max().item(),
                    "grad_rel_diff": ((a_grad - b_grad).norm() / a_grad.norm()).item(),
                    "padded_step_s": round(a_time, 4),
                    "packed_step_s": round(b_time, 4),
                    "speedup": round(a_time / b_time, 2),
                    "padded_peak_GiB": round(a_mem, 2),
                    "packed_peak_GiB": round(b_mem, 2),
                }
            ),
            flush=True,
        )


def end_to_end():
    from preftune.cli import main

    # The toy model and data builders are test fixtures in tests/toy.py, not part of the package.
    sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
    from toy import counting_pairs, save_model_folder, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = save_model_folder(root / "model")
        data = write_jsonl(counting_pairs(64, seed=1), root / "train.jsonl")
        for dtype in ("float32", "bfloat16"):
            out = root / f"run-{dtype}"
            code = main(
                [
                    "train",
                    "--model",
                    str(model),
                    "--data",
                    str(data),
                    "--output",
                    str(out),
                    "--device",
                    "cuda",
                    "--dtype",
                    dtype,
                    "--max-steps",
                    "8",
                    "--batch-size",
                    "8",
                    "--learning-rate",
                    "1e-3",
                    "--ref-cache",
                    str(root / "cache"),
                ]
            )
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            print(
                json.dumps(
                    {
                        "end_to_end": dtype,
                        "exit": code,
                        "first_loss": records[0]["loss"],
                        "last_loss": records[-1]["loss"],
                        "final_exists": (out / "final").exists(),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=550)
    parser.add_argument("--response", type=int, default=90)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    layouts(args)
    end_to_end()

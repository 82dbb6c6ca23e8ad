"""One TRL 1.16 DPOTrainer (or KTOTrainer) run on CPU, float32, for bench_dpo.py and bench_kto.py (which time it
as a whole process).

    python benchmarks/trl_run.py --model M --data pairs.jsonl --output DIR --mode default|fast --stats stats.json
    python benchmarks/trl_run.py --trainer kto ...      # KTOTrainer: the pairs are unpaired by TRL itself

--mode default: DPOConfig's defaults — a reference model loaded next to the policy, reference log-probs computed
                in every step, gradient checkpointing on (TRL's default, `_BaseConfig.gradient_checkpointing=True`).
--mode fast:    precompute_ref_log_probs=True (one reference pass over the data before training, then no reference
                model) and gradient_checkpointing=False.
Both: the given batch size, learning rate, max_length and epochs; use_cpu=True and bf16=False (TRL would default
bf16 to True), no checkpoints, no reporting, a log record every step.

--stats gets what TRL itself did: examples left after its filter (prompts of max_length tokens or more are
dropped), the tokens it trained on after its keep_start truncation, the positions its training batches fed the
model (rows × padded length, summed over the batches: the body and, on CPU, TRL 1.16's chunked LM head
`add_fused_lm_head` run on every one of them, padding included), the trainer's own timings and its log.
"""

from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: the whole process is what is measured

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

MODES = {
    "default": {},
    "fast": {"precompute_ref_log_probs": True, "gradient_checkpointing": False},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="One TRL DPOTrainer run (see the module docstring).")
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="jsonl of prompt/chosen/rejected strings")
    ap.add_argument("--output", required=True)
    ap.add_argument("--mode", choices=sorted(MODES), default="default")
    ap.add_argument("--trainer", choices=("dpo", "kto"), default="dpo")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--learning-rate", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--stats", help="write a JSON of what TRL did here")
    return ap.parse_args(argv)


def trained_tokens(dataset, max_length: int | None) -> dict[str, int]:
    """Tokens of prompt+chosen and prompt+rejected after TRL's collator cuts each sequence to max_length
    (keep_start: the end of the sequence, i.e. the response, is what gets cut)."""
    total = response = cut = 0
    for ex in dataset:
        p = len(ex["prompt_ids"])
        # KTO: the example's completion and its mismatched KL completion, both after the example's prompt.
        names = ("completion_ids", "KL_completion_ids") if "completion_ids" in ex else ("chosen_ids", "rejected_ids")
        for r in (len(ex[names[0]]), len(ex[names[1]])):
            n = p + r if max_length is None else min(p + r, max_length)
            cut += n < p + r
            total += n
            response += max(0, n - p)
    return {"tokens": total, "response_tokens": response, "sequences_cut": cut}


class CountingCollator:
    """The trainer's collator, counting what each training batch feeds the model: rows and padded positions."""

    def __init__(self, inner):
        self.inner, self.batches, self.rows, self.positions = inner, 0, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        ids = batch["input_ids"]  # DPO: chosen rows then rejected rows, right-padded to the batch's longest
        self.batches, self.rows, self.positions = (
            self.batches + 1,
            self.rows + ids.shape[0],
            self.positions + ids.numel(),
        )
        return batch


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    # An in-memory dataset: no on-disk datasets cache, so a second run cannot reuse the first's tokenization
    # or its precomputed reference log-probs.
    dataset = Dataset.from_list(rows)
    config_class, trainer_class = (KTOConfig, KTOTrainer) if args.trainer == "kto" else (DPOConfig, DPOTrainer)
    config = config_class(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **MODES[args.mode],
    )
    t0 = time.perf_counter()
    trainer = trainer_class(model=args.model, args=config, train_dataset=dataset)
    t1 = time.perf_counter()
    # Wrapped after __init__: with --mode fast, the reference precompute's batches are not counted.
    trainer.data_collator = counting = CountingCollator(trainer.data_collator)
    result = trainer.train()
    t2 = time.perf_counter()
    stats = {
        "mode": args.mode,
        "trainer": args.trainer,
        "torch_threads": torch.get_num_threads(),
        "rows": len(rows),
        "examples": len(trainer.train_dataset),
        "dropped_by_trl": len(rows) - len(trainer.train_dataset),
        **trained_tokens(trainer.train_dataset, args.max_length),
        "batches": counting.batches,
        "batch_rows": counting.rows,
        "padded_positions": counting.positions,
        "gradient_checkpointing": config.gradient_checkpointing,
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "reference_model_loaded": trainer.ref_model is not None,
        "import_s": t0 - START,
        "init_s": t1 - t0,  # model + reference load, tokenization, and with --mode fast the reference pass
        "train_s": t2 - t1,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "steps": trainer.state.global_step,
        "log": trainer.state.log_history,
    }
    if args.stats:
        Path(args.stats).write_text(json.dumps(stats, indent=1, default=str) + "\n", encoding="utf-8")
    print(
        f"trl {args.mode}: {stats['examples']} examples, {stats['steps']} steps, init {stats['init_s']:.1f} s, "
        f"train {stats['train_s']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

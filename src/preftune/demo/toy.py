"""A built-in toy task that runs offline in seconds: a tiny Llama learns, from preference pairs alone, to count.

Prompt: "count from 3 :"; chosen: "3 4 5 6"; rejected: the same numbers shuffled or shifted. The model starts
from random weights (it is a stand-in for an SFT model) and DPO must raise the chosen responses above the
rejected ones relative to that frozen start. The same builders make the tiny models of the test suite.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

log = logging.getLogger("preftune")

WORDS = ["count", "from", ":"] + [str(i) for i in range(20)]
SPECIALS = ["<unk>", "<s>", "</s>"]


def build_tokenizer():
    """A word-level tokenizer with BOS/EOS and no pad token (preftune then pads with EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, tie: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def save_model_folder(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    """A complete Hugging Face model folder (config, safetensors weights, tokenizer)."""
    tokenizer = build_tokenizer()
    model = build_model(len(tokenizer), seed=seed, tie=tie)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def counting_pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(0, 12), rng.randrange(3, 7)
        good = [str(start + i) for i in range(length)]
        bad = good[:]
        while bad == good:
            bad = rng.sample(good, len(good)) if rng.random() < 0.5 else [str(int(w) + 1) for w in good[::-1]]
        rows.append({"prompt": f"count from {start} :", "chosen": " " + " ".join(good),
                     "rejected": " " + " ".join(bad)})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_demo(output: str, quick: bool = False) -> None:
    from preftune.config import resolve
    from preftune.train import train

    out = Path(output)
    if out.exists() and any(out.iterdir()):
        from preftune.errors import UserError

        raise UserError(f"--output {output}: folder is not empty; choose a new folder")
    work = out / "inputs"
    work.mkdir(parents=True)
    model = save_model_folder(work / "model")
    train_file = write_jsonl(counting_pairs(256, seed=1), work / "train.jsonl")
    eval_file = write_jsonl(counting_pairs(64, seed=2), work / "eval.jsonl")
    log.info("demo: tiny Llama in %s, %s, %s", model, train_file, eval_file)
    cfg, _ = resolve({"model": str(model), "data": str(train_file), "eval_data": str(eval_file),
                      "output": str(out / "run"), "learning_rate": 1e-3, "batch_size": 16, "beta": 0.1,
                      "max_steps": 16 if quick else 64, "eval_every": 8, "lr_scheduler": "constant"})
    train(cfg)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    log.info("demo: loss %.4f → %.4f, held-out reward accuracy %.2f, margin %.3f (run folder: %s)",
             first["loss"], last["loss"], last["eval/rewards/accuracies"], last["eval/rewards/margins"], out / "run")

"""A toy task for the test suite: a tiny random Llama, and preference pairs that teach it to count.

Prompt: "count from 3 :"; chosen: "3 4 5 6"; rejected: the same numbers shuffled or shifted. The model starts
from random weights (a stand-in for an SFT model). `preftune demo` itself is the sentiment task of
`preftune.demo.pipeline`; these builders make the tiny models and data sets of the tests, so they live with the
tests and not in the package: tests import them as `from toy import ...` (pytest puts tests/ on sys.path), and
the benchmarks put tests/ on sys.path themselves.
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
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
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
        rows.append(
            {"prompt": f"count from {start} :", "chosen": " " + " ".join(good), "rejected": " " + " ".join(bad)}
        )
    return rows


def counting_rows_with_rejected_lists(n: int, k: int, seed: int) -> list[dict]:
    """As `counting_pairs`, each row with a list of k distinct rejected responses."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        start, length = rng.randrange(0, 12), rng.randrange(3, 7)
        good = [str(start + i) for i in range(length)]
        bad = {" ".join(rng.sample(good, length)) for _ in range(8)} | {" ".join(str(int(w) + 1) for w in good[::-1])}
        bad = sorted(bad - {" ".join(good)})
        if len(bad) >= k:
            rows.append(
                {
                    "prompt": f"count from {start} :",
                    "chosen": " " + " ".join(good),
                    "rejected": [" " + b for b in rng.sample(bad, k)],
                }
            )
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path

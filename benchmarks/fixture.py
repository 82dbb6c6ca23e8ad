"""Benchmark fixture: a random Llama model with a real vocabulary, and preference pairs of realistic lengths.

    python benchmarks/fixture.py --out benchmarks/out/fixture                       # GPT-2 vocab, qa-feedback pairs
    python benchmarks/fixture.py --out benchmarks/out/fix-l3 --vocab llama3.2       # 128k vocabulary
    python benchmarks/fixture.py --out benchmarks/out/syn --synthetic 512,128,128   # random words, exact lengths
    python benchmarks/fixture.py --out benchmarks/out/size-162m --size 162m         # GPT-2-small-shaped Llama

Writes into --out:
    model/        a Hugging Face model folder (config.json, model.safetensors, tokenizer files): random weights,
                  the real tokenizer. Default size: hidden 256, MLP 768, 4 layers, 4 heads, untied embeddings:
                  29.1M parameters with the GPT-2 vocabulary, of which 25.7M are the embedding and the LM head —
                  as in real small models, the vocabulary dominates a preference step.
    pairs.jsonl   {"prompt", "chosen", "rejected"} strings, one pair a line
    fixture.json  what was built: sizes, parameter counts, pair counts and mean token lengths

The qa-feedback pairs (FineGrainedRLHF dev set, read from --shared): 500 questions, each with grounding passages,
4 sampled answers and 6 pairwise human preferences (1 = first preferred, 2 = second, 0 = none). Every strict
preference becomes one pair: 1,577 + 1,039 = 2,616. The prompt is the question and the first two passages
("question: … context: wikipage: <title> text: <sentences> wikipage: … answer:"), ~520 GPT-2 tokens; the answers are
~90 tokens. Strict preferences between two identical answer strings are left out and counted (preftune would skip
them and TRL would train on them, so the two would not see the same data).

--synthetic P,C,R writes pairs whose prompt has P tokens and whose chosen and rejected responses have C and R tokens
counting the EOS both trainers append: random words, each a single token of the chosen vocabulary.

--size picks a model shape (the flags --hidden, --intermediate, --layers, --heads still override one part of it);
parameter counts with the GPT-2 vocabulary, untied head:
    29m    hidden 256,  MLP 768,  4 layers,  4 heads    29.1M (25.7M of them embedding + head): the default
    162m   hidden 768,  MLP 2048, 12 layers, 12 heads   162.2M (77.2M): GPT-2 small's shape, Llama blocks
    411m   hidden 1024, MLP 2816, 24 layers, 16 heads   411.3M (102.9M): GPT-2 medium's depth and width
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
QA_FILE = "preference/finegrainedrlhf_qa_feedback_dev.json"
# The Llama-3 pre-tokenizer split (tiktoken's cl100k pattern with digit groups of 1-3).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128009: "<|eot_id|>",
}
LLAMA3_VOCAB = 128256  # 128,000 BPE entries + 256 special tokens, as in the released Llama 3.2 models
# Model shapes by name: hidden, intermediate (MLP), layers, heads. The MLP is Llama's 8/3 of hidden, rounded up
# to a multiple of 256 (Llama's own rule), except the 29m default kept from the first benchmarks (3 × 256).
SIZES = {
    "29m": {"hidden": 256, "intermediate": 768, "layers": 4, "heads": 4},
    "162m": {"hidden": 768, "intermediate": 2048, "layers": 12, "heads": 12},
    "411m": {"hidden": 1024, "intermediate": 2816, "layers": 24, "heads": 16},
}


# ----------------------------------------------------------------------------------------------------- tokenizers


def gpt2_tokenizer(shared: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared / "tokenizers/gpt2/tokenizer.json"),
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def llama2_tokenizer(shared: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(shared / "tokenizers/llama2/tokenizer.json"),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def llama3_tokenizer(shared: Path):
    """Byte-level BPE from encoder.json + vocab.bpe with the Llama-3 split; special tokens 128000-128255."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    folder = shared / "tokenizers/llama3.2"
    vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(line.split(" "))
        for line in (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#version")
    ]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [LLAMA3_NAMED.get(i, f"<|reserved_special_token_{i - 128000}|>") for i in range(128000, LLAMA3_VOCAB)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    # Llama 3 puts <|begin_of_text|> before every text, as its tokenizer.json post-processor does.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", 128000)]
    )
    if tok.encode("Hello world", add_special_tokens=False).ids != [9906, 1917]:
        raise SystemExit("llama3.2 tokenizer: 'Hello world' should encode to [9906, 1917]")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")


TOKENIZERS = {"gpt2": gpt2_tokenizer, "llama2": llama2_tokenizer, "llama3.2": llama3_tokenizer}


# ----------------------------------------------------------------------------------------------------- model


def count_params(model) -> dict[str, int]:
    """Total, embedding (input table) + LM head, and the rest ("non-embedding": what 6·N·tokens counts)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    vocab_params = embed.numel() + (head.numel() if head.data_ptr() != embed.data_ptr() else 0)
    return {"total": total, "embedding_and_head": vocab_params, "non_embedding": total - vocab_params}


def build_model(args, vocab_size: int, tokenizer, folder: Path) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return {
        "size": args.size,
        "vocab_size": vocab_size,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "layers": args.layers,
        "heads": args.heads,
        "params": count_params(model),
    }


# ----------------------------------------------------------------------------------------------------- pairs


def qa_prompt(example: dict) -> str:
    passages = " ".join(f"wikipage: {p[0]} text: {' '.join(p[1:])}" for p in example["passages"][:2])
    return f"question: {example['question']} context: {passages} answer:"


def qa_pairs(shared: Path) -> tuple[list[dict], dict]:
    """Every strict human preference of the dev set as a pair; ties (0) and identical answers are counted."""
    data = json.loads((shared / QA_FILE).read_text(encoding="utf-8"))
    comparisons = [(a, b) for a in range(1, 5) for b in range(a + 1, 5)]  # the README's order: 1v2 … 3v4
    counts = {"questions": len(data), "comparisons": 0, "no_preference": 0, "identical_answers": 0, "pairs": 0}
    pairs = []
    for example in data:
        prompt = qa_prompt(example)
        for (a, b), label in zip(comparisons, example["preference"], strict=True):
            counts["comparisons"] += 1
            if label == 0:
                counts["no_preference"] += 1
                continue
            win, lose = (a, b) if label == 1 else (b, a)
            chosen, rejected = example[f"prediction {win}"], example[f"prediction {lose}"]
            if chosen.strip() == rejected.strip():
                counts["identical_answers"] += 1
                continue
            pairs.append({"prompt": prompt, "chosen": " " + chosen.strip(), "rejected": " " + rejected.strip()})
    counts["pairs"] = len(pairs)
    return pairs, counts


def single_token_words(tokenizer) -> list[str]:
    """Lower-case words w such that " w" is one token and a run of them tokenizes word by word."""
    candidates = sorted({t.lstrip("Ġ▁") for t in tokenizer.get_vocab() if t[:1] in ("Ġ", "▁")})
    candidates = [w for w in candidates if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8]
    # " w" for byte-level BPEs; "w" for SentencePiece, whose normalizer already turns the space before it into "▁".
    spaced = tokenizer([" " + w for w in candidates], add_special_tokens=False).input_ids
    bare = tokenizer(candidates, add_special_tokens=False).input_ids
    words = [w for w, a, b in zip(candidates, spaced, bare) if min(len(a), len(b)) == 1]
    sample = random.Random(0).sample(words, min(len(words), 2000))
    lengths = {
        len(tokenizer(t, add_special_tokens=False).input_ids) for t in (" ".join(sample), " " + " ".join(sample))
    }
    if len(sample) not in lengths:
        raise SystemExit("--synthetic: this tokenizer merges single-token words; cannot build exact lengths")
    return sample


def synthetic_pairs(spec: str, n: int, tokenizer, seed: int) -> tuple[list[dict], dict]:
    """n pairs of P prompt tokens (BOS included if the tokenizer adds one) and C-1 / R-1 response words (+ the EOS
    the trainers append = C / R tokens)."""
    try:
        p, c, r = (int(x) for x in spec.split(","))
    except ValueError:
        raise SystemExit(f"--synthetic: expected three token counts P,C,R, got {spec!r}") from None
    specials = len(tokenizer("").input_ids)  # e.g. Llama 3's <|begin_of_text|>
    if p <= specials or c < 2 or r < 2:
        raise SystemExit(f"--synthetic: P must be > {specials} and C, R ≥ 2 (one token is the EOS)")
    words = single_token_words(tokenizer)
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    def prompt() -> str:
        # A leading space keeps the first word one token with byte-level BPEs; SentencePiece adds its own.
        words_text = text(p - specials)
        for candidate in (words_text, words_text.lstrip(" ")):
            if len(tokenizer(candidate).input_ids) == p:
                return candidate
        raise SystemExit(f"--synthetic: cannot make a prompt of exactly {p} tokens with this tokenizer")

    pairs = [{"prompt": prompt(), "chosen": text(c - 1), "rejected": text(r - 1)} for _ in range(n)]
    return pairs, {"synthetic": [p, c, r], "word_pool": len(words), "pairs": n}


def token_stats(pairs: list[dict], tokenizer, max_length: int | None) -> dict:
    """Token lengths as `preftune train` sees them (same rules as TRL: EOS appended, common-prefix split)."""
    from preftune.data.formats import PreferencePair
    from preftune.data.tokenize import tokenize_pairs, truncate

    objs = [PreferencePair(d["prompt"], d["chosen"], d["rejected"], f"pair {i}") for i, d in enumerate(pairs)]
    raw, report = tokenize_pairs(objs, tokenizer)
    cuts = [truncate(t, max_length=max_length, max_prompt_length=None)[1:] for t in raw]
    prompt = [len(t.prompt_ids) for t in raw]
    response = [len(t.chosen_ids) for t in raw] + [len(t.rejected_ids) for t in raw]
    return {
        "mean_prompt_tokens": statistics.mean(prompt),
        "max_prompt_tokens": max(prompt),
        "mean_response_tokens": statistics.mean(response),
        "max_response_tokens": max(response),
        "mean_pair_tokens": statistics.mean(
            2 * len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in raw
        ),
        "truncation_at_max_length": {
            "max_length": max_length,
            "prompts_cut": sum(c[0] for c in cuts),
            "responses_cut": sum(c[1] for c in cuts),
            "boundaries_shifted": report.boundaries_shifted,
        },
    }


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (model/, pairs.jsonl, fixture.json)")
    ap.add_argument("--shared", default=str(SHARED), help=f"the shared data folder (default {SHARED})")
    ap.add_argument("--vocab", choices=sorted(TOKENIZERS), default="gpt2", help="tokenizer and vocabulary")
    ap.add_argument("--size", choices=sorted(SIZES), default="29m", help="model shape by name (default 29m)")
    for name in SIZES["29m"]:
        ap.add_argument(f"--{name}", type=int, help=f"override the {name} of --size")
    ap.add_argument("--synthetic", metavar="P,C,R", help="random-word pairs of these token lengths instead")
    ap.add_argument("--num-pairs", type=int, default=256, help="pairs to write with --synthetic (default 256)")
    ap.add_argument("--max-length", type=int, default=1024, help="length limit the stats report cuts for")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name, value in SIZES[args.size].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shared, out = Path(args.shared), Path(args.out)
    if args.hidden % args.heads:
        raise SystemExit(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    tokenizer = TOKENIZERS[args.vocab](shared)
    vocab_size = LLAMA3_VOCAB if args.vocab == "llama3.2" else len(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model_info = build_model(args, vocab_size, tokenizer, out / "model")
    if args.synthetic:
        pairs, counts = synthetic_pairs(args.synthetic, args.num_pairs, tokenizer, args.seed)
    else:
        pairs, counts = qa_pairs(shared)
    with open(out / "pairs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
    info = {
        "vocab": args.vocab,
        "model": model_info,
        "data": counts,
        "tokens": token_stats(pairs, tokenizer, args.max_length),
    }
    (out / "fixture.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print_summary(out, info)
    return 0


def print_summary(out: Path, info: dict) -> None:
    m, t, d = info["model"], info["tokens"], info["data"]
    p = m["params"]
    print(
        f"model  {out / 'model'}: Llama, vocab {m['vocab_size']:,} ({info['vocab']}), hidden {m['hidden_size']}, "
        f"MLP {m['intermediate_size']}, {m['layers']} layers, {m['heads']} heads, untied"
    )
    print(
        f"       params {p['total']:,} = embedding+head {p['embedding_and_head']:,} + non-embedding "
        f"{p['non_embedding']:,}"
    )
    print(f"pairs  {out / 'pairs.jsonl'}: " + ", ".join(f"{k} {v}" for k, v in d.items()))
    tr = t["truncation_at_max_length"]
    print(
        f"tokens prompt mean {t['mean_prompt_tokens']:.1f} (max {t['max_prompt_tokens']}), response mean "
        f"{t['mean_response_tokens']:.1f} (max {t['max_response_tokens']}), per pair (2P+C+R) "
        f"{t['mean_pair_tokens']:.1f}; at max_length {tr['max_length']}: {tr['prompts_cut']} prompts cut, "
        f"{tr['responses_cut']} responses cut, {tr['boundaries_shifted']} boundaries shifted"
    )


if __name__ == "__main__":
    sys.exit(main())

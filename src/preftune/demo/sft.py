"""The demo's "SFT" model: a word-level tokenizer fitted to the review corpus, a tiny Llama trained on it from scratch
with a plain AdamW loop, and temperature-1 sampling of continuations.

This stage is ordinary language modelling (next-token cross-entropy on whole reviews), not DPO: it stands in for
the supervised model the DPO paper starts from (GPT-2 fine-tuned on IMDb).
"""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
BOS_ID, EOS_ID = 1, 2


@contextmanager
def one_cpu_thread():
    """Run torch on one CPU thread, then restore the setting. The matrices are 64 wide, little to split between
    threads, and when other processes share the cores, threads spinning while they wait for each other made
    training steps over 10× slower (measured on 2 busy cores: 0.35 s/step on one thread, 4.6 s/step on two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- tokenizer


def _backend(vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Byte-level pieces keep a word's leading space ("Ġgood"), as GPT-2 does: a response decodes to " good." and
    # prompt + response is the review's text again, which is what the reward reads. The prefix space makes a
    # text's first word the same token as anywhere else ("the" → "Ġthe"), so every word has one id.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    backend.add_special_tokens(SPECIALS)  # "</s>" inside a text stays one token
    return backend


def word_pieces(texts: list[str]) -> Counter:
    """Counts of the byte-level pieces of the texts: "the acting was good." → Ġthe, Ġacting, Ġwas, Ġgood, ."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.ByteLevel(add_prefix_space=True).pre_tokenize_str
    return Counter(piece for text in texts for piece, _ in split(text))


def build_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on `texts`: ids 0–2 are <unk> <s> </s>, then every piece by falling count
    (ties alphabetically), so the same corpus always gives the same ids. BOS is prepended; EOS is not appended
    (preftune appends it to responses) and there is no pad token (preftune pads with EOS)."""
    from transformers import PreTrainedTokenizerFast

    counts = word_pieces(texts)
    ordered = sorted(counts, key=lambda piece: (-counts[piece], piece))
    vocab = {token: i for i, token in enumerate(SPECIALS + ordered)}
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(vocab),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


# ---------------------------------------------------------------------------------------------- model


def build_model(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A tiny Llama with random weights (hidden 64, 2 layers, 4 heads: ~0.1 M parameters plus 2 × vocab × hidden)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=128,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text → BOS + its ids + EOS: "the acting was good." → [1, Ġthe, Ġacting, Ġwas, Ġgood, ., 2]."""
    return [list(ids) + [EOS_ID] for ids in tokenizer(texts)["input_ids"]]


def lm_batch(sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids and attention_mask [B, T]; labels [B, T] with -100 at padding (the model
    shifts them: position t predicts labels[t + 1]). Padding uses EOS ids, never scored."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), EOS_ID, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@dataclass
class LMTrainReport:
    steps: int
    first_loss: float  # mean next-token cross-entropy (nats/token) of the first step
    last_loss: float  # mean of the last 10% of steps (one step's loss is noisy)


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warmup over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_order(
    lengths: list[int], *, steps: int, batch_size: int, generator: torch.Generator, window: int = 8
) -> list[list[int]]:
    """`steps` batches of random sequence indices, drawn `window` batches at a time and sorted by length within the
    draw, so a batch holds similar lengths: padding fell from about half of the tokens to a few percent (each
    step costs what its tokens cost). The batches of a draw then run in random order."""
    batches: list[list[int]] = []
    while len(batches) < steps:
        drawn = torch.randint(len(lengths), (window * batch_size,), generator=generator).tolist()
        drawn.sort(key=lambda i: lengths[i])
        group = [drawn[k * batch_size : (k + 1) * batch_size] for k in range(window)]
        batches += [group[k] for k in torch.randperm(window, generator=generator).tolist()]
    return batches[:steps]


def train_lm(model, sequences: list[list[int]], *, steps: int, batch_size: int, lr: float, seed: int) -> LMTrainReport:
    """Plain next-token training: `steps` AdamW steps on random batches of `sequences` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    batches = batch_order([len(s) for s in sequences], steps=steps, batch_size=batch_size, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    losses = []
    with tqdm(total=steps, desc="sft", unit="step", dynamic_ncols=True) as bar:
        for step, rows in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr)
            loss = model(**lm_batch([sequences[i] for i in rows])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
    model.eval()
    tail = losses[-max(1, steps // 10) :]
    return LMTrainReport(steps, losses[0], sum(tail) / len(tail))


def save_model(model, tokenizer, folder: Path) -> Path:
    """A normal Hugging Face folder: config.json, model.safetensors, tokenizer files."""
    # A plain `generate` then samples at temperature 1 from the whole distribution, as every stage of the demo does
    # (transformers would otherwise keep only the 50 likeliest tokens).
    model.generation_config.do_sample = True
    model.generation_config.top_k = 0
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class Sample:
    text: str  # the continuation as decoded, with its leading space (" great acting."), without the EOS
    ids: list[int]  # its token ids, without the EOS
    finished: bool  # ended with EOS (False: cut at max_new_tokens)


@torch.no_grad()
def _sample_group(
    model, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """[B, P] prompts of one length (no padding) → [B, max_new_tokens] sampled ids, EOS repeated after the end."""
    out = model(input_ids=prompt_ids, use_cache=True)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        probs = torch.softmax(out.logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, EOS_ID), token)
        new.append(token)
        done |= token == EOS_ID
        if done.all():
            break
        out = model(input_ids=token[:, None], cache=out.cache, use_cache=True)
    return torch.stack(new, dim=1)


def sample(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    batch_size: int = 256,
    desc: str = "sample",
) -> list[Sample]:
    """One continuation per prompt, sampled at `temperature` from the full distribution (no top-k/top-p).

    Prompts are tokenized as preftune tokenizes them (BOS + text) and grouped by token length, so no batch needs
    padding; a pure function of (model, prompts, seed, batch_size)."""
    model.eval()
    prompt_ids = tokenizer(prompts)["input_ids"]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    chunks = [
        rows[k : k + batch_size] for _, rows in sorted(by_length.items()) for k in range(0, len(rows), batch_size)
    ]
    generator = torch.Generator().manual_seed(seed)
    results: list[Sample | None] = [None] * len(prompts)
    for rows in tqdm(chunks, desc=desc, unit="batch", dynamic_ncols=True):
        batch = torch.tensor([prompt_ids[i] for i in rows], dtype=torch.long)
        for i, ids in zip(rows, _sample_group(model, batch, max_new_tokens, temperature, generator).tolist()):
            end = ids.index(EOS_ID) if EOS_ID in ids else len(ids)
            # Special tokens are kept in the text (skip_special_tokens would hide a sampled <unk>).
            results[i] = Sample(tokenizer.decode(ids[:end]), ids[:end], end < len(ids))
    return results

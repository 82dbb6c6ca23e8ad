"""Prompts → sampled responses, and the log-probs of responses under the distribution they were sampled from.

Prompts are plain text (tokenized as training does: `tokenizer(text)`, so a BOS is added when the tokenizer adds
one) or lists of chat messages (`apply_chat_template(add_generation_prompt=True)`). Sampling is
`model.generate(do_sample=True)` on left-padded batches, seeded per batch, stopping at the tokenizer's EOS or
after `max_new_tokens`.

The sampling distribution is exactly softmax(logits / temperature), restricted to the top-p nucleus when
top_p < 1, and nothing else: the model folder's own `generation_config.json` (its top-k, repetition penalty,
suppressed tokens...) is set aside for the call, so that `sampled_logps` can score responses under the very
distribution they came from (HF's own temperature and top-p warpers, applied to a fresh forward pass).
"""

from __future__ import annotations

import inspect
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from preftune.data.formats import _check_messages, _rows_local
from preftune.data.tokenize import _chat_ids, _text_ids
from preftune.errors import UserError

LABELS = ("safe", "unsafe")


@dataclass(frozen=True)
class GenerationSettings:
    """How responses are sampled. The same prompts, settings and batch size give the same responses."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def check(self) -> None:
        if not self.temperature > 0:
            raise UserError(f"--temperature must be greater than 0 (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    @property
    def processed(self) -> bool:
        """True when the sampling distribution differs from the model's own (temperature ≠ 1 or top_p < 1)."""
        return self.temperature != 1.0 or self.top_p < 1.0


@dataclass
class Prompt:
    """One prompt row: text or messages; `label` ("safe"/"unsafe") in refusal prompt sets only."""

    prompt: str | list[dict[str, str]]
    where: str
    label: str | None = None


@dataclass
class Samples:
    """Responses sampled for n prompts. `response_ids[i]` holds the generated tokens up to and including the
    first EOS (`ended[i]`), or `max_new_tokens` tokens without one."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    ended: list[bool]
    texts: list[str]  # decoded responses, special tokens skipped

    @property
    def content_ids(self) -> list[list[int]]:
        """The responses without their final EOS: what length and distinct-n count."""
        return [ids[:-1] if end else ids for ids, end in zip(self.response_ids, self.ended)]

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.content_ids]


# ------------------------------------------------------------------------------------------------ prompt files


def _check_prompt(prompt: Any, where: str) -> None:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError(f"{where}: field 'prompt' is empty")
    elif isinstance(prompt, list):
        _check_messages(prompt, "prompt", where)
    else:
        kind = "null" if prompt is None else type(prompt).__name__
        raise UserError(f"{where}: field 'prompt' must be a string or a list of messages, got {kind}")


def _check_label(row: dict, where: str) -> str:
    if "label" not in row:
        raise UserError(
            f"{where}: no field 'label'; expected 'safe' or 'unsafe' (the row has: "
            f"{', '.join(map(str, row)) or 'no columns'})"
        )
    label = row["label"]
    if label not in LABELS:
        raise UserError(f"{where}: field 'label' must be 'safe' or 'unsafe', got {label!r}")
    return label


def load_prompts(path: str, *, flag: str = "--prompts", labelled: bool = False) -> list[Prompt]:
    """Rows of a .jsonl/.json/.csv/.parquet file with a `prompt` field (text or messages), and with `labelled`
    a `label` field, "safe" or "unsafe". A pairs file works too: its other fields are ignored."""
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    prompts = []
    for row, where in _rows_local(path):
        if "prompt" not in row:
            raise UserError(f"{where}: no field 'prompt' (the row has: {', '.join(map(str, row)) or 'no columns'})")
        _check_prompt(row["prompt"], where)
        prompts.append(Prompt(row["prompt"], where, _check_label(row, where) if labelled else None))
    if not prompts:
        raise UserError(f"{flag} {path}: no rows")
    return prompts


# ------------------------------------------------------------------------------------------------ encoding


def prompt_text(prompt: Prompt, tokenizer) -> str:
    """The prompt as text: itself, or the chat template's rendering that the model is given."""
    if isinstance(prompt.prompt, str):
        return prompt.prompt
    return tokenizer.apply_chat_template(prompt.prompt, tokenize=False, add_generation_prompt=True)


def encode_prompts(
    prompts: list[Prompt], tokenizer, max_prompt_length: int | None = None
) -> tuple[list[list[int]], int]:
    """Token ids of each prompt, cut from the left to `max_prompt_length` ≥ 1 (as training cuts prompts)
    → (ids, number of prompts cut)."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    encoded, cut = [], 0
    for p in prompts:
        if isinstance(p.prompt, list):
            if not getattr(tokenizer, "chat_template", None):
                raise UserError(f"{p.where}: the prompt is a list of messages but the tokenizer has no chat template")
            ids = _chat_ids(tokenizer, p.prompt, p.where, add_generation_prompt=True)
        else:
            ids = _text_ids(tokenizer, p.prompt)
        if not ids:
            raise UserError(f"{p.where}: the prompt is empty after tokenization")
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            ids, cut = ids[-max_prompt_length:], cut + 1
        encoded.append(ids)
    return encoded, cut


def decode_response(tokenizer, prompt_ids: list[int], content_ids: list[int]) -> str:
    """The response's text as it continues the prompt: decode(prompt + response) minus decode(prompt), which
    keeps the leading space that word-piece and byte-level tokenizers only show in context."""
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + content_ids, skip_special_tokens=True)
    if full.startswith(prompt):
        return full[len(prompt) :]
    return tokenizer.decode(content_ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ sampling


@contextmanager
def _only_these_settings(model):
    """Set the model folder's generation defaults aside during a call: only our settings shape the distribution."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def pad_id_of(tokenizer) -> int:
    """The pad id, or EOS when the tokenizer has none (as `loading.load_tokenizer` sets it): pads are masked out."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def _cut_at_eos(tokens: list[int], eos_id: int) -> tuple[list[int], bool]:
    if eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens, False


@torch.no_grad()
def generate(
    model, tokenizer, prompt_ids: list[list[int]], settings: GenerationSettings, batch_size: int = 8
) -> Samples:
    """Sample one response per prompt. Batch b (prompts b·batch_size …) is seeded with (seed, b) inside a forked
    RNG, so the caller's random state (training's dropout, data order) is untouched."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, pad_id_of(tokenizer)
    config = GenerationConfig(
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=True,
    )
    responses: list[list[int]] = []
    ended: list[bool] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)), _only_these_settings(model):
            for b, start in enumerate(range(0, len(prompt_ids), batch_size)):
                rows = prompt_ids[start : start + batch_size]
                ids, mask = _left_padded(rows, pad_id, device)
                torch.manual_seed(settings.seed * 1_000_003 + b)
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
                for tokens in out[:, ids.shape[1] :].tolist():
                    cut, end = _cut_at_eos(tokens, eos_id)
                    responses.append(cut)
                    ended.append(end)
    finally:
        model.train(was_training)
    samples = Samples(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses, ended=ended, texts=[])
    samples.texts = [decode_response(tokenizer, p, c) for p, c in zip(samples.prompt_ids, samples.content_ids)]
    return samples


# ------------------------------------------------------------------------------------------------ log-probs


def processed_log_softmax(logits: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    """log-probs [N, V] of the sampling distribution from raw logits [N, V]: HF's temperature then top-p warpers
    (the ones `generate` applies, in its order), then log-softmax. Tokens outside the nucleus get −inf."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    scores = logits.float()
    if settings.temperature != 1.0:
        scores = TemperatureLogitsWarper(settings.temperature)(None, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return scores.log_softmax(-1)


def _forward_kwargs(model) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


@torch.no_grad()
def sampled_logps(
    model, samples: Samples, settings: GenerationSettings, pad_id: int, batch_size: int = 8
) -> list[float]:
    """log p(response | prompt) summed over each response's tokens (its EOS included) under `model`'s sampling
    distribution for `settings` (see `processed_log_softmax`); −inf when a token lies outside the nucleus.

    Rows are laid out as generation laid them out: [left padding | prompt | response | right padding], position
    ids counted from the first real token. Only the logits at the G + 1 last positions are computed (G: longest
    response of the batch), one row at a time through the warpers.
    """
    device = next(model.parameters()).device
    accepts = _forward_kwargs(model)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(samples.response_ids), batch_size):
            prompts = samples.prompt_ids[start : start + batch_size]
            responses = samples.response_ids[start : start + batch_size]
            out.extend(_batch_logps(model, prompts, responses, settings, pad_id, device, accepts))
    finally:
        model.train(was_training)
    return out


def _batch_logps(model, prompts, responses, settings, pad_id, device, accepts) -> list[float]:
    prompt_ids, prompt_mask = _left_padded(prompts, pad_id, device)
    width = max(len(r) for r in responses)
    response_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in responses], dtype=torch.long, device=device)
    response_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in responses], device=device).bool()
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "use_cache" in accepts:  # one forward pass: a key/value cache would only cost memory
        kwargs["use_cache"] = False
    if "position_ids" in accepts:  # left padding: positions start at each row's first real token
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in accepts:
        kwargs["logits_to_keep"] = width + 1
    logits = model(**kwargs).logits[:, -(width + 1) : -1]  # column P−1+k predicts response token k
    totals = []
    for row_logits, row_targets, row_mask in zip(logits, response_ids, response_mask):
        token_logps = processed_log_softmax(row_logits, settings).gather(-1, row_targets[:, None]).squeeze(-1)
        # masked_fill, not multiply: a −inf log-prob at a padded position times 0 would be nan
        totals.append(token_logps.masked_fill(~row_mask, 0.0).sum().item())
    return totals

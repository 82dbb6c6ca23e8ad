"""Reward functions for scoring sampled responses: `--reward SPEC` → `Reward`, a callable
(prompts: list[str], responses: list[str]) → list[float], one score per (prompt, response).

SPEC is either
    module:function   an importable Python function taking a list of texts (each prompt + response, concatenated
                      as the model sees them) and returning one number per text, e.g.
                          def score(texts: list[str]) -> list[float]: ...
                      `preftune eval --reward mypackage.rewards:score`. The module must be importable (installed,
                      or on PYTHONPATH).
    a folder          a Hugging Face `AutoModelForSequenceClassification` saved with safetensors weights and its
                      tokenizer (pickle weights are refused: they can run code when loaded). The score of a text is
                      the logit of the last label (the single logit of a one-label reward model) at its last token.
Chat prompts reach the reward as text rendered by the policy's chat template.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from preftune.errors import UserError
from preftune.loading import _check_weights

Reward = Callable[[Sequence[str], Sequence[str]], list[float]]


def check_scores(scores, n: int, what: str) -> list[float]:
    """`scores` as n finite floats, or a one-line UserError naming `what` (the reward or detector spec)."""
    if hasattr(scores, "tolist"):  # a tensor or numpy array
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise UserError(f"{what}: expected a list of {n} numbers, got {type(scores).__name__}")
    if len(scores) != n:
        raise UserError(f"{what}: returned {len(scores)} scores for {n} texts")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise UserError(f"{what}: score {i} is {type(s).__name__}, expected a number")
        if not math.isfinite(s):
            raise UserError(f"{what}: score {i} is {s}, expected a finite number")
        out.append(float(s))
    return out


def import_function(spec: str, flag: str) -> Callable:
    """`module:function` → the function, with one-line errors for each way the spec can be wrong."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise UserError(f"{flag} {spec}: expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"{flag} {spec}: cannot import module '{module_name}' ({e})") from None
    function = getattr(module, name, None)
    if function is None:
        raise UserError(f"{flag} {spec}: module '{module_name}' has no attribute '{name}'")
    if not callable(function):
        raise UserError(f"{flag} {spec}: '{name}' is not callable")
    return function


def callable_reward(spec: str) -> Reward:
    function = import_function(spec, "--reward")

    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses)]
        return check_scores(function(texts), len(texts), f"--reward {spec}")

    return reward


@contextmanager
def _pool_last_column(model):
    """Make the classifier pool at the last column of every row (left padding puts each text's last token there).

    HF sequence classifiers pool at the rightmost token that is not `pad_token_id`; when the pad token is also the
    EOS a text may end with, that picks the wrong token. −1 is no token id, so every column counts as real.
    """
    config = model.config.get_text_config()
    saved = config.pad_token_id
    config.pad_token_id = -1
    try:
        yield
    finally:
        config.pad_token_id = saved


def model_reward(
    folder: str, *, trust_remote_code: bool = False, device: torch.device | str = "cpu", batch_size: int = 8
) -> Reward:
    """A sequence-classification model folder → `Reward` (score: logit of the last label at the last token)."""
    from transformers import (
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    what = f"--reward {folder}"
    if not (Path(folder) / "config.json").exists():
        raise UserError(f"{what}: not a Hugging Face model folder (no config.json)")
    _check_weights(folder, "--reward")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            folder, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        text = str(e).strip()
        detail = text.splitlines()[0] if text else type(e).__name__
        hint = "; pass --trust-remote-code if you trust its author" if "trust_remote_code" in text else ""
        raise UserError(f"{what}: cannot load a sequence-classification model ({detail}){hint}") from None
    model = model.to(device).eval().requires_grad_(False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        pad_id = 0  # left padding is masked out and the pooled column is the last, so any id does
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters

    @torch.no_grad()
    def reward(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        texts = [p + r for p, r in zip(prompts, responses)]
        scores: list[float] = []
        with _pool_last_column(model):
            for start in range(0, len(texts), batch_size):
                rows = [list(tokenizer(t)["input_ids"]) for t in texts[start : start + batch_size]]
                width = max(len(r) for r in rows)
                ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
                kwargs = {"input_ids": ids, "attention_mask": mask}
                if takes_positions:  # left padding: positions start at each text's first token
                    kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(**kwargs).logits
                scores.extend(logits[:, -1].float().tolist())
        return check_scores(scores, len(texts), what)

    return reward


def load_reward(
    spec: str, *, trust_remote_code: bool = False, device: torch.device | str = "cpu", batch_size: int = 8
) -> Reward:
    """--reward SPEC (see the module docstring) → `Reward`."""
    if os.path.isdir(spec):
        return model_reward(spec, trust_remote_code=trust_remote_code, device=device, batch_size=batch_size)
    if ":" in spec:
        return callable_reward(spec)
    if os.path.exists(spec):
        raise UserError(f"--reward {spec}: expected a model folder or module:function, got a file")
    raise UserError(f"--reward {spec}: no such folder; expected a reward model folder or module:function")

"""Load models and tokenizers safely, with one-line errors for the usual mistakes.

Safety: weights are read from safetensors only (a pickle `.bin` can run code when unpickled), and model code
shipped inside a model folder runs only with `--trust-remote-code`. A name that is not a local path is a hub
name: only then may the network be used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from preftune.errors import UserError

log = logging.getLogger("preftune")


def _check_source(path: str, what: str) -> None:
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise UserError(f"{what} {path}: expected a model folder, got a file")
        if not (p / "config.json").exists() and what != "--tokenizer":
            raise UserError(f"{what} {path}: not a Hugging Face model folder (no config.json)")
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{what} {path}: no such folder")


def _check_weights(path: str, what: str) -> None:
    p = Path(path)
    if not p.is_dir():
        return  # a hub name: from_pretrained(use_safetensors=True) refuses pickle weights there
    if list(p.glob("*.safetensors")):
        return
    pickles = [f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickles:
        raise UserError(f"{what} {path}: holds only pickle weights ({pickles[0]}), which can run code when loaded; "
                        "convert them to safetensors")
    raise UserError(f"{what} {path}: no weights (*.safetensors) in the folder")


def load_tokenizer(path: str, *, trust_remote_code: bool = False, what: str = "--model"):
    """The tokenizer saved with a model, with a pad token (EOS when it has none: pads never enter a loss)."""
    from transformers import AutoTokenizer

    _check_source(path, what)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: cannot load a tokenizer ({_first_line(e)})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"{what} {path}: the tokenizer has no EOS token; responses must end with one")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        log.info("the tokenizer has no pad token: using EOS (%r) for padding", tokenizer.eos_token)
    return tokenizer


def causal_lm_config(path: str, *, trust_remote_code: bool = False, what: str = "--model"):
    """The model's config, after checking that `path` holds a causal LM with safe weights (cheap: no weights read)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_source(path, what)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(f"{what} {path}: the model needs its own code to run; pass --trust-remote-code "
                            "if you trust its author") from None
        raise UserError(f"{what} {path}: unreadable config ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot load ({_first_line(e)})") from None
    remote = bool(getattr(config, "auto_map", None)) and trust_remote_code
    if not remote and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{what} {path}: model type '{config.model_type}' is not a causal language model")
    _check_weights(path, what)
    return config


def load_causal_lm(path: str, *, trust_remote_code: bool = False, what: str = "--model") -> torch.nn.Module:
    """A float32 causal LM in eval mode on the CPU. Raises UserError when `path` is not one."""
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(path, trust_remote_code=trust_remote_code, what=what)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: cannot load the weights ({_first_line(e)})") from None
    return model.eval()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

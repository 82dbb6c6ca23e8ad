"""LoRA adapters through peft: wrap the policy, run it as its own reference, save the adapter or a merged model.

Two ways in, one reference rule (π_ref is the policy before its first update, never a second copy of the base):
- a fresh adapter (`--lora-r R` on a plain model folder): A random (seeded by --seed), B = 0, so the policy
  starts equal to its base. The reference is the same model with the adapter disabled (`disable_adapter()`),
  cached or live. Its cache key is the digest of the base weights alone, so the cache is shared with full
  fine-tuning runs and LoRA sweeps (rank, α, targets, seed) of the same base.
- a folder that already carries an adapter (adapter_config.json + adapter_model.safetensors, e.g. the final/
  of an earlier LoRA run): that adapter is trained further with its own settings, and the reference is the model
  as loaded (base + the adapter's initial weights), so the first loss is ln 2 again. The cache is computed by
  the policy before its first update, keyed by base + adapter weights + adapter settings; with --no-ref-cache a
  frozen copy of the adapter (a few MB, never the base) is loaded beside it and switched in for each reference
  pass. final/ is then a drop-in replacement for the adapter it started from (same base, same settings).

    policy = wrap(load_causal_lm(base_model_path(cfg.model)), cfg)   # a PeftModel, only adapter weights train
    save_adapter(policy, "runs/x/final", cfg)                         # PeftModel.from_pretrained(base, ...) loads it
    merge(policy, cfg).save_pretrained("runs/x/final-merged")         # a plain model folder
"""

from __future__ import annotations

import hashlib
import json
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from preftune import refcache
from preftune.errors import UserError
from preftune.loading import base_model_path, carries_adapter, load_causal_lm, read_adapter_config
from preftune.reference import PolicyReference

if TYPE_CHECKING:
    from preftune.config import TrainConfig

TRAINED = "default"  # peft's name for the adapter that trains
FROZEN = "reference"  # the frozen copy of a loaded adapter, used as the live reference with --no-ref-cache
# Settings in adapter_config.json that do not change what the adapter computes (left out of the cache key).
_NOT_FUNCTIONAL = {"base_model_name_or_path", "revision", "inference_mode", "peft_version"}


# ---------------------------------------------------------------------------------------------------- folders


def enabled(cfg: TrainConfig) -> bool:
    """Whether the policy trains an adapter: a fresh one (--lora-r) or the one --model carries."""
    return cfg.lora_r > 0 or carries_adapter(cfg.model)


# ---------------------------------------------------------------------------------------------------- wrapping


def load_policy(base: str, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The policy of a run: the model at `base` (quantized with --load-in-4bit/8bit) with its adapter if any, on
    `device`, its weights in --weights-dtype. Wrapped on the CPU, before moving: a fresh LoRA adapter starts from the same seeded weights on any
    device (a quantized base is loaded onto the device directly; peft still draws the adapter's weights on the
    CPU)."""
    model = load_causal_lm(
        base,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle_weights=cfg.allow_pickle_weights,
        bits=bits(cfg),
        compute_dtype=cfg.dtype,
        device=device,
        dtype=getattr(torch, cfg.weights_dtype),
    )
    return wrap(model, cfg).to(device)


def wrap(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The policy to train: `model` itself without LoRA, else a PeftModel whose adapter alone is trainable.

    `model` must still be on the CPU: a fresh adapter's random A is then the same on every device.
    """
    if not enabled(cfg):
        return model
    try:
        import peft  # noqa: F401
    except ImportError:  # not a dependency of preftune itself
        raise UserError(
            "LoRA (--lora-r, or a --model folder holding an adapter) needs the peft package: pip install peft"
        ) from None
    return _load_adapter(model, cfg.model) if carries_adapter(cfg.model) else _add_adapter(model, cfg)


def bits(cfg: TrainConfig) -> int | None:
    """4 or 8 when the base is loaded quantized (--load-in-4bit, --load-in-8bit), else None."""
    return 4 if cfg.load_in_4bit else 8 if cfg.load_in_8bit else None


def alpha(cfg: TrainConfig) -> float:
    """α of a fresh adapter (its update is scaled by α / r): --lora-alpha, default 2r (a rank sweep then keeps
    the same scale)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_r


def _add_adapter(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=alpha(cfg),
        lora_dropout=cfg.lora_dropout,
        target_modules=_targets(model, cfg.lora_targets),
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), _quiet():
        torch.manual_seed(cfg.seed)  # A's init: reproducible, and the run's own RNG stream is left untouched
        policy = get_peft_model(model, config)
    policy.peft_config[TRAINED].base_model_name_or_path = _portable(model.name_or_path)
    return policy


@contextmanager
def _quiet():
    """peft asks transformers a deprecated question while wrapping: a warning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _targets(model: torch.nn.Module, spec: str) -> str | list[str]:
    """--lora-targets → peft's target_modules, after checking every name matches a module that can take an adapter.

    Names match the end of a module's dotted name (peft's rule): `q_proj` or `self_attn.q_proj`.
    """
    if spec == "all-linear":  # peft: every linear layer except the output layer
        return spec
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    kinds = (torch.nn.Linear, torch.nn.Embedding, Conv1D)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    names = [n.strip() for n in spec.split(",")]
    for name in names:
        matched = [m for key, m in modules.items() if key == name or key.endswith("." + name)]
        if not name or not matched:
            known = sorted({key.rsplit(".", 1)[-1] for key, m in modules.items() if m is not head})
            raise UserError(
                f"--lora-targets: no linear or embedding module named {name!r} in the model "
                f"(its modules: {', '.join(known)}; or all-linear)"
            )
        if any(m is head for m in matched):
            # The packed layout runs the LM head in its own chunked kernel on head.weight: an adapter there
            # would be skipped without a word.
            raise UserError(
                f"--lora-targets: {name} is the output layer, which cannot take an adapter here; leave it out"
            )
    return names


def _load_adapter(model: torch.nn.Module, folder: str) -> torch.nn.Module:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    read_adapter_config(folder)
    try:
        with _quiet():
            policy = PeftModel.from_pretrained(model, folder, adapter_name=TRAINED, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as e:  # e.g. shapes that do not fit the base
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--model {folder}: the adapter does not fit its base model ({first})") from None
    if isinstance(policy.get_output_embeddings(), BaseTunerLayer):
        raise UserError(
            f"--model {folder}: the adapter adapts the output layer, which preftune runs in its own "
            "kernel; merge it into the model first"
        )
    policy.peft_config[TRAINED].base_model_name_or_path = _portable(model.name_or_path)
    return policy


def _portable(name_or_path: str) -> str:
    """An absolute path for a local base (a relative one would depend on the working directory of whoever loads
    the adapter), a hub name unchanged."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if name_or_path and path.is_dir() else name_or_path


# ---------------------------------------------------------------------------------------------------- reference


def reference_digest(policy: torch.nn.Module, cfg: TrainConfig) -> str:
    """The cache key's weights digest of what computes π_ref for an adapter policy.

    Fresh adapter: the base alone, under its own parameter names, so the digest equals
    `refcache.weights_digest` of the unwrapped model. Loaded adapter: base + adapter weights + the adapter
    settings that change its output (α, rank pattern, ...: they are not tensors). A quantized base (--load-in-4bit,
    --load-in-8bit) adds its quantization settings: its log-probs are not the full-precision base's.
    """
    if not carries_adapter(cfg.model):
        digest = refcache.weights_digest(SimpleNamespace(state_dict=lambda: _base_state_dict(policy)))
    else:
        settings = {k: v for k, v in policy.peft_config[TRAINED].to_dict().items() if k not in _NOT_FUNCTIONAL}
        digest = _mixed(refcache.weights_digest(policy), settings)
    quantization = getattr(policy.get_base_model().config, "quantization_config", None)
    return digest if quantization is None else _mixed(digest, {"quantization": _as_dict(quantization)})


def _mixed(digest: str, settings: dict) -> str:
    """`digest` combined with `settings` (json with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    return hashlib.blake2b(f"{digest} {text}".encode(), digest_size=32).hexdigest()


def _as_dict(quantization) -> dict:
    """A model config's quantization_config: a dict once saved and reloaded, a BitsAndBytesConfig when just loaded."""
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def _base_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under the names they had before peft wrapped it (adapter tensors left out)."""
    state = {}
    for name, tensor in policy.get_base_model().state_dict().items():
        parts = name.split(".")
        if not any(part.startswith("lora_") for part in parts):
            state[".".join(part for part in parts if part != "base_layer")] = tensor
    return state


def cache_context(policy: torch.nn.Module, cfg: TrainConfig):
    """The context in which the policy, before its first update, computes π_ref for the cache: adapter
    disabled for a fresh adapter (the base), as loaded for a loaded one (its initial state)."""
    return nullcontext() if carries_adapter(cfg.model) else policy.disable_adapter()


def live_reference(policy: torch.nn.Module, cfg: TrainConfig) -> PolicyReference:
    """π_ref at every step from the policy itself: adapter disabled (fresh adapter), or switched to a frozen
    copy of the loaded adapter (loaded once more from its folder: adapter-sized, the base is shared)."""
    if not carries_adapter(cfg.model):
        return PolicyReference(policy, policy.disable_adapter, dtype=cfg.dtype)
    device = str(next(policy.parameters()).device)
    with _quiet():
        policy.load_adapter(cfg.model, adapter_name=FROZEN, is_trainable=False, torch_device=device)
    return PolicyReference(policy, lambda: _switched_to(policy, FROZEN), dtype=cfg.dtype)


@contextmanager
def _switched_to(policy: torch.nn.Module, name: str):
    # set_adapter flips requires_grad, as disable_adapter() does; it is restored before any backward pass
    policy.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        policy.set_adapter(TRAINED)


# ---------------------------------------------------------------------------------------------------- saving


def save_adapter(policy: torch.nn.Module, folder: Path, cfg: TrainConfig) -> None:
    """adapter_config.json + adapter_model.safetensors of the trained adapter (not the frozen reference copy)."""
    # With an embedding among the targets peft would also save the whole (frozen, unchanged) embedding matrix, in
    # case the vocabulary was resized: never so for a fresh adapter; a loaded adapter keeps peft's own choice.
    embeddings = "auto" if carries_adapter(cfg.model) else False
    policy.save_pretrained(
        folder, selected_adapters=[TRAINED], safe_serialization=True, save_embedding_layers=embeddings
    )


def merge(policy: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """The base model with the trained adapter merged into its weights: a plain transformers model.

    In place (no second copy of the model): `policy` is unusable afterwards, so save the adapter first. A quantized
    base is not merged into: W + BA rounded back to 4 or 8 bits would lose most of the small update BA, and the
    result would be a quantized folder. The adapter is merged into the full-precision base instead, read again
    from disk onto the CPU (a float32 copy beside the quantized policy); it differs from the trained model by the
    base's quantization error.
    """
    if bits(cfg) is None:
        return policy.merge_and_unload(adapter_names=[TRAINED])
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = get_peft_model_state_dict(policy, adapter_name=TRAINED)
    config = policy.peft_config[TRAINED]
    full = load_causal_lm(
        base_model_path(cfg.model),
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle_weights=cfg.allow_pickle_weights,
    )
    with _quiet():
        merged = PeftModel(full, config, adapter_name=TRAINED)
    loaded = set_peft_model_state_dict(merged, adapter, adapter_name=TRAINED)
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # the same base architecture: every tensor fits
    return merged.merge_and_unload(adapter_names=[TRAINED])

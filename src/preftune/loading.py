"""Load models and tokenizers safely, with one-line errors for the usual mistakes.

Safety: weights are read from safetensors only (a pickle `.bin` can run code when unpickled) unless
`--allow-pickle-weights` is given, and model code shipped inside a model folder runs only with `--trust-remote-code`
(a folder whose config.json names such code in `auto_map` is refused without it). A name that is not a local path
is a hub name: only then may the network be used.
"""

from __future__ import annotations

import json
import logging
import math
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


def _check_weights(path: str, what: str, allow_pickle: bool = False) -> None:
    p = Path(path)
    if not p.is_dir():
        return  # a hub name: from_pretrained(use_safetensors=True) refuses pickle weights there
    safe = sorted(p.glob("*.safetensors"))
    if safe:
        for f in safe:
            _check_safetensors_header(f, what, path)
        return
    pickles = sorted(f.name for f in p.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles and allow_pickle:
        log.warning("%s %s: loading pickle weights (%s) as --allow-pickle-weights asks", what, path, pickles[0])
        return
    if pickles:
        raise UserError(
            f"{what} {path}: holds only pickle weights ({pickles[0]}), which can run code when loaded; "
            "convert them to safetensors (or pass --allow-pickle-weights if you trust the files)"
        )
    raise UserError(f"{what} {path}: no weights (*.safetensors) in the folder")


def _check_safetensors_header(file: Path, what: str, path: str) -> None:
    """Read the header only (cheap): a truncated or corrupt file fails here, before the data is read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise UserError(f"{what} {path}: {file.name} is damaged or cut short ({_first_line(e)})") from None


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


def causal_lm_config(
    path: str, *, trust_remote_code: bool = False, allow_pickle_weights: bool = False, what: str = "--model"
):
    """The model's config, after checking that `path` holds a causal LM with safe weights (cheap: no weights read).

    allow_pickle_weights: accept a folder whose only weights are pickle files (.bin, .pt, ...)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    _check_source(path, what)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise UserError(
                f"{what} {path}: the model needs its own code to run; pass --trust-remote-code if you trust its author"
            ) from None
        raise UserError(f"{what} {path}: unreadable config ({_first_line(e)})") from None
    except OSError as e:
        raise UserError(f"{what} {path}: cannot load ({_first_line(e)})") from None
    remote = bool(getattr(config, "auto_map", None))
    if remote and not trust_remote_code:
        # For a model type it knows, transformers would quietly load its own code instead: maybe another model.
        native = (
            f", or delete auto_map from config.json to use transformers' own '{config.model_type}' code"
            if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            else ""
        )
        raise UserError(
            f"{what} {path}: the model ships its own code (auto_map in config.json); pass "
            f"--trust-remote-code if you trust its author{native}"
        )
    if not remote and config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{what} {path}: model type '{config.model_type}' is not a causal language model")
    if not remote and _is_bidirectional_encoder(config):
        raise UserError(
            f"{what} {path}: model type '{config.model_type}' is a bidirectional encoder (config.json "
            "does not set is_decoder: true), not a causal language model"
        )
    _check_weights(path, what, allow_pickle_weights)
    return config


def _is_bidirectional_encoder(config) -> bool:
    """BERT-like encoders are registered as causal LMs too (BertLMHeadModel), but attend causally only when their
    config sets is_decoder; otherwise every position sees the tokens after it. Encoder-decoder models (BART) are
    loaded as their causal decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return (
        config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_encoder_decoder", False)
        and not getattr(config, "is_decoder", False)
    )


def load_causal_lm(
    path: str,
    *,
    trust_remote_code: bool = False,
    allow_pickle_weights: bool = False,
    what: str = "--model",
    bits: int | None = None,
    compute_dtype: str = "float32",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A causal LM in eval mode on the CPU, float32 unless `dtype` says otherwise (--weights-dtype bfloat16: the
    weights are then stored, trained and saved in it). Raises UserError when `path` is not one.

    bits: 4 or 8 loads its linear layers (all but the output layer) quantized by bitsandbytes, straight onto
    `device` (each weight is quantized as it arrives there), computing in `compute_dtype`; the other weights
    (embeddings, norms, output layer) stay float32.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(
        path, trust_remote_code=trust_remote_code, allow_pickle_weights=allow_pickle_weights, what=what
    )
    quantized = (
        {}
        if bits is None
        else {"quantization_config": bnb_config(bits, compute_dtype), "device_map": {"": str(device)}}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            # None: safetensors when the folder has them, pickle only when it has nothing else.
            use_safetensors=None if allow_pickle_weights else True,
            **quantized,
        )
    except (OSError, ValueError, SafetensorError) as e:
        raise UserError(f"{what} {path}: cannot load the weights ({_first_line(e)})") from None
    if bits == 4:
        _keep_4bit_weights_as_loaded(model)
    return model.eval()


def checkpoint_activations(model) -> None:
    """Non-reentrant activation checkpointing. transformers 5 renamed `gradient_checkpointing_enable` to
    `activation_checkpointing_enable` (the old name warns and goes in 6); 4.x has only the old one."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _keep_4bit_weights_as_loaded(model: torch.nn.Module) -> None:
    """On a CPU with AVX-512 BF16, bitsandbytes repacks a 4-bit layer's weights the first time it runs in eval mode
    without gradients (a reference pass), rounding its block scales to bfloat16, and re-quantizes them whenever the
    layer is saved: the frozen base would change in the middle of a run, differently on different CPUs. We keep
    the format it was loaded in (the plain dequantizing kernel, as on every other CPU)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def bnb_config(bits: int, compute_dtype: str):
    """transformers' BitsAndBytesConfig for 4 bits (QLoRA's NF4 with double quantization) or 8 bits (LLM.int8())."""
    from transformers import BitsAndBytesConfig

    if bits == 8:
        # LLM.int8() casts every float32 input of a quantized layer to float16 and bitsandbytes logs that at each
        # call: a warning per layer per step that says nothing new (the README says it once).
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
    )


# ---------------------------------------------------------------------------------------------------- weight files
# --fsdp reads each process's rows of each tensor straight from the files (`fsdp.load_sharded`), with plain reads:
# a memory-mapped file would count every page it touched in the process's memory until it is closed.

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # a model saved in several files: tensor name → file
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightFiles:
    """The tensors of a model folder's safetensors file(s) (`model.safetensors`, or the files its index names), read
    a range of rows at a time. Raises ValueError when the folder holds no such file or one it cannot read."""

    def __init__(self, folder: str | Path, file: str | None = None):
        """`file`: that one file of `folder` only."""
        folder = Path(folder)
        index = folder / WEIGHTS_INDEX
        try:
            names = (
                [file] if file else sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            )
        except FileNotFoundError:
            names = [WEIGHTS]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: unreadable ({e})") from None
        self.where: dict[str, tuple[Path, int, dict]] = {}  # name → (file, data start, header entry)
        for name in names:
            self._read_header(folder / name)

    def _read_header(self, file: Path) -> None:
        try:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size))
        except (OSError, ValueError) as e:
            raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if entry.get("dtype") not in DTYPES:
                raise ValueError(f"{file}: tensor {name} has dtype {entry.get('dtype')}, which is not read here")
            self.where[name] = (file, 8 + size, entry)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][2]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.where[name][2]["dtype"]]

    def read_rows(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Fill `out` with rows start … start + len(out) − 1 of tensor `name` (the whole tensor for a 0-d `out`),
        converted to `out`'s dtype. Only those bytes are read."""
        file, data, entry = self.where[name]
        dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
        if out.dim() != len(shape) or list(out.shape[1:]) != shape[1:] or (shape and start + len(out) > shape[0]):
            raise ValueError(
                f"{file}: tensor {name} has shape {shape}, not room for rows {start}+ of {list(out.shape)}"
            )
        row = math.prod(shape[1:]) * dtype.itemsize
        direct = out.dtype == dtype and out.is_contiguous() and out.device.type == "cpu"  # read in place
        buffer = out.detach() if direct else torch.empty(out.shape, dtype=dtype)
        view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
        with open(file, "rb") as f:
            f.seek(data + entry["data_offsets"][0] + start * row)
            if f.readinto(view) != len(view):
                raise ValueError(f"{file}: tensor {name} is cut short")
        if not direct:
            out.detach().copy_(buffer)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------- adapter folders
# A --model folder may hold a LoRA adapter (e.g. an earlier run's final/) instead of, or beside, a whole model.

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def carries_adapter(path: str) -> bool:
    """True when the --model folder holds a LoRA adapter (adapter_config.json), with or without its base."""
    return Path(path, ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: str) -> dict:
    """The adapter_config.json of `folder`, after checking it is a LoRA adapter with safetensors weights."""
    path = Path(folder, ADAPTER_CONFIG)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--model {folder}: unreadable {ADAPTER_CONFIG} ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"--model {folder}: {ADAPTER_CONFIG} field 'peft_type' must be LORA, got {kind!r}")
    if not Path(folder, ADAPTER_WEIGHTS).is_file():
        pickled = Path(folder, "adapter_model.bin").is_file()
        raise UserError(
            f"--model {folder}: "
            + (
                "holds only pickle adapter weights (adapter_model.bin), which can "
                "run code when loaded; convert them to safetensors"
                if pickled
                else f"no adapter weights ({ADAPTER_WEIGHTS})"
            )
        )
    return config


def base_model_path(model: str) -> str:
    """Where the base weights of --model are: `model` itself, unless it holds only an adapter; then the base that
    its adapter_config.json names (a folder, or a hub name)."""
    if not carries_adapter(model) or Path(model, "config.json").is_file():
        return model
    base = read_adapter_config(model).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise UserError(
            f"--model {model}: {ADAPTER_CONFIG} field 'base_model_name_or_path' must name the base model, got {base!r}"
        )
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local and not Path(base).expanduser().is_dir():
        raise UserError(
            f"--model {model}: {ADAPTER_CONFIG} field 'base_model_name_or_path' names {base!r}, which "
            "is not a folder here"
        )
    return str(Path(base).expanduser()) if looks_local else base


def load_run_tokenizer(model: str, base: str, tokenizer: str | None, trust_remote_code: bool = False):
    """--tokenizer if given, else the one saved with --model (for a folder holding only an adapter: see
    `load_adapter_tokenizer`; `base`: `base_model_path(model)`)."""
    if tokenizer or base == model:
        return load_tokenizer(
            tokenizer or model, trust_remote_code=trust_remote_code, what="--tokenizer" if tokenizer else "--model"
        )
    return load_adapter_tokenizer(model, base, trust_remote_code=trust_remote_code)


def load_adapter_tokenizer(folder: str, base: str, trust_remote_code: bool = False):
    """The tokenizer saved with an adapter (its run may have set a chat template), else the base model's."""
    if not Path(folder, "tokenizer_config.json").is_file():
        return load_tokenizer(base, trust_remote_code=trust_remote_code)
    try:
        # what="--tokenizer" is the only way to load from a folder without config.json; the error names --model
        return load_tokenizer(folder, trust_remote_code=trust_remote_code, what="--tokenizer")
    except UserError as e:
        raise UserError("--model" + str(e).removeprefix("--tokenizer")) from None

"""The packed layout's attention: FlexAttention block masks on CUDA, a dense mask through SDPA elsewhere.

SDPA with the packed layout's dense [R, 1, L, L] mask computes every masked block too, so its cost grows with the
row length squared whatever the segments. FlexAttention skips the 128 × 128 blocks the mask rules out entirely
(other segments, the sibling response): with `--pack-tokens` rows most blocks are skipped. The rule is the dense
mask's (`PackedBatch.attention_mask`): causal within a segment; a response token sees its segment's prompt and
its own response, never the other response of its pair nor other segments; padding sees only padding.

Which path a model takes (`packed_attention`): Flex on CUDA when torch has it, the model's decoder supports it
(`_supports_flex_attn`), runs SDPA and no attention dropout, and a small compiled forward + backward on this
device gives SDPA's numbers (`flex_problem`, once per shape of heads and dtype); otherwise SDPA, today's path
unchanged. On a CPU, torch 2.13 has no FlexAttention backward and its compiled forward is no faster than SDPA's,
so the CPU keeps SDPA. `set_packed_attention` forces either (the GPU check compares them; the tests force Flex on
a CPU for forward passes).

How the model runs it: transformers' attention functions are chosen by name per call, and a 4-D mask (a
`BlockMask` has 4 dimensions) is passed to them untouched. `_install` wraps the "sdpa" entry so that a
`BlockMask` goes to compiled `flex_attention` and anything else to the original SDPA function. No config is
switched, so the padded layout, generation and gradient checkpointing's recomputation see what they saw before.
Rows are padded to a bucketed length (`bucket_length`), so the compiled kernel sees few distinct shapes.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import LongTensor, Tensor

from preftune.data.batching import PackedBatch, collate_packed, visible
from preftune.data.tokenize import TokenizedPair

log = logging.getLogger("preftune")

MODES = ("auto", "sdpa", "flex")
BLOCK = 128  # FlexAttention's sparse block: rows are padded to a multiple of it
_MODE = "_preftune_attention"  # attribute of the decoder module: the requested mode, then the decided path


def bucket_length(length: int) -> int:
    """The padded row length Flex runs: a multiple of 128, and of 1/8 of the length's power of two beyond 2048,
    so at most 8 lengths per doubling are compiled and the padding adds under 1/8 (e.g. 300 → 384, 1000 → 1024,
    3000 → 3072, 5000 → 5120)."""
    step = max(BLOCK, 1 << max(0, length.bit_length() - 4))
    return -(-length // step) * step


def mask_mod(segment: LongTensor, part: LongTensor):
    """FlexAttention's mask_mod for rows with these [R, L] segment and part numbers (-1 on padding): True where
    query q may attend to key kv: causal and `batching.visible`, the rule of `PackedBatch.attention_mask` (padding,
    segment -1, sees earlier padding only; the dense mask's diagonal on padding is then implied)."""

    def allowed(b, h, q, kv):
        return (q >= kv) & visible(segment[b, q], segment[b, kv], part[b, q], part[b, kv])

    return allowed


def block_mask(batch: PackedBatch, length: int):
    """The `BlockMask` [R, 1, length, length] of `batch`'s rows padded to `length` columns of padding."""
    from torch.nn.attention.flex_attention import create_block_mask

    rows, width = batch.segment.shape
    segment, part = (F.pad(x, (0, length - width), value=-1) for x in (batch.segment, batch.part))
    device = batch.segment.device
    # Uncompiled, it holds a few [R, L, L] boolean tensors at once (as the dense mask does): compiled on CUDA, where
    # rows are long; on a CPU compiling costs seconds per shape and saves milliseconds.
    create = _compiled(create_block_mask) if device.type == "cuda" else create_block_mask
    return create(mask_mod(segment, part), rows, None, length, length, device=device)


@functools.cache
def _compiled(fn):
    """torch.compile(fn), one per process: a new wrapper per call would compile again."""
    return torch.compile(fn)


def flex_inputs(batch: PackedBatch) -> tuple[dict, LongTensor]:
    """(the decoder's keyword arguments, the flat positions of the states predicting response tokens) for the Flex
    path: rows padded to `bucket_length` (padding ids 0, masked), the `BlockMask` as attention mask."""
    width = batch.input_ids.shape[1]
    length = bucket_length(width)
    pad = functools.partial(F.pad, pad=(0, length - width), value=0)
    target_pos = batch.target_pos // width * length + batch.target_pos % width
    inputs = {
        "input_ids": pad(batch.input_ids),
        "position_ids": pad(batch.position_ids),
        "attention_mask": block_mask(batch, length),
    }
    return inputs, target_pos


def sdpa_inputs(model: torch.nn.Module, batch: PackedBatch) -> tuple[dict, LongTensor]:
    """`flex_inputs` for the dense path: the rows as they are, the dense mask (bool for SDPA, additive otherwise)."""
    sdpa = model.config._attn_implementation == "sdpa"
    mask = batch.attention_mask(None if sdpa else next(model.parameters()).dtype)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "attention_mask": mask}
    return inputs, batch.target_pos


def packed_inputs(model: torch.nn.Module, batch: PackedBatch) -> tuple[dict, LongTensor]:
    """The decoder's keyword arguments for `batch` and the flat positions of its output that predict response
    tokens, by `packed_attention(model)`."""
    if packed_attention(model) == "flex":
        _install()
        return flex_inputs(batch)
    return sdpa_inputs(model, batch)


def set_packed_attention(model: torch.nn.Module, mode: str) -> None:
    """Force the packed layout's attention of `model`: "flex", "sdpa", or "auto" (decided again on next use)."""
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r}: expected one of {', '.join(MODES)}")
    setattr(model.get_decoder(), _MODE, mode)


def packed_attention(model: torch.nn.Module) -> str:
    """ "flex" or "sdpa": the path `model`'s packed passes take (decided on first use, then kept)."""
    decoder = model.get_decoder()
    mode = getattr(decoder, _MODE, "auto")
    if mode == "auto":
        problem = flex_unsuitable(decoder)
        mode = "sdpa" if problem else "flex"
        # Said on CUDA, where Flex is the rule and SDPA the exception; on a CPU SDPA is the rule.
        cuda = next(decoder.parameters()).device.type == "cuda"
        say = f"SDPA with a dense mask (no FlexAttention: {problem})" if problem else "FlexAttention block masks"
        log.log(logging.INFO if cuda else logging.DEBUG, "packed layout: %s", say)
        setattr(decoder, _MODE, mode)
    return mode


def flex_unsuitable(decoder: torch.nn.Module) -> str | None:
    """None when `decoder` should run the packed layout through Flex, else why not."""
    from transformers.utils import is_torch_flex_attn_available

    config = decoder.config
    param = next(decoder.parameters())
    reasons = [
        (not getattr(decoder, "_supports_flex_attn", False), f"{type(decoder).__name__} does not support it"),
        (config._attn_implementation != "sdpa", f"the model runs {config._attn_implementation} attention"),
        (getattr(config, "attention_dropout", 0.0), "attention dropout"),
        (not is_torch_flex_attn_available(), "not in this torch"),
        (param.device.type != "cuda", f"not on CUDA ({param.device.type})"),
    ]
    for given, why in reasons:
        if given:
            return why
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return flex_problem(param.device, heads, kv_heads, head_dim, param.dtype)


# ------------------------------------------------------------------------------------------- running it in the model
_sdpa = None  # transformers' own SDPA function, which `_dispatch` wraps


def _install() -> None:
    """Route a `BlockMask` given to transformers' "sdpa" attention to Flex (idempotent; see the module docstring)."""
    global _sdpa
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    if ALL_ATTENTION_FUNCTIONS["sdpa"] is not _dispatch:
        _sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register("sdpa", _dispatch)


def _dispatch(module, query, key, value, attention_mask, **kwargs):
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        return flex_forward(module, query, key, value, attention_mask, **kwargs)
    return _sdpa(module, query, key, value, attention_mask, **kwargs)


def flex_forward(module, query, key, value, mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: [B, H, L, D] query, key, value and a BlockMask → ([B, L, H, D]
    output, None). Casts as SDPA does under autocast, so both paths see the same dtypes."""
    if dropout or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError("the packed layout's FlexAttention has no dropout, soft-capping or attention sinks")
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    query, key, value = (x.to(dtype) for x in (query, key, value))
    gqa = query.shape[1] != key.shape[1]
    if gqa and query.shape[1] & (query.shape[1] - 1):  # Flex's grouped kernels want a power-of-two head count
        repeat = query.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(repeat, dim=1) for x in (key, value))
        gqa = False
    with torch.autocast(device, enabled=False):
        out = _flex()(query, key, value, block_mask=mask, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None


def _flex():
    """Compiled `flex_attention` (uncompiled, it materialises every score), or the plain function inside a graph
    already being compiled."""
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention if torch.compiler.is_compiling() else _compiled(flex_attention)


# ---------------------------------------------------------------------------------------------------- the probe
# Two pairs (77 and 50 tokens) in one --pack-tokens row of 130, a third in a padded row: segments, both responses
# and padding.
_PROBE = [
    TokenizedPair(list(range(1, 40)), list(range(5, 30)), list(range(7, 20)), "probe 0"),
    TokenizedPair(list(range(2, 20)), list(range(3, 9)), list(range(4, 30)), "probe 1"),
    TokenizedPair(list(range(1, 9)), list(range(2, 5)), list(range(2, 7)), "probe 2"),
]


@functools.cache
def flex_problem(device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """None when compiled Flex gives SDPA's attention output (and, on CUDA, input gradients) on a small packed
    problem with these shapes, else why not: whether this device and torch build compile and run it."""
    # The first packed pass, which decides, may run under no_grad (the start-up layout check) or autocast: the probe
    # runs the same wherever it is called.
    try:
        with torch.autocast(device.type, enabled=False), torch.inference_mode(False), torch.enable_grad():
            got, want = flex_and_sdpa(device, heads, kv_heads, head_dim, dtype, grad=device.type == "cuda")
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to compile or run means: use SDPA
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    # Loose enough for TF32 matmuls, tight enough for a broken kernel or mask (wrong by whole units, not 1e-3).
    rtol, atol = (1e-3, 1e-3) if dtype == torch.float32 else (2e-2, 2e-2)
    for a, b in zip(got, want):
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol):
            return f"differs from SDPA by up to {(a.float() - b.float()).abs().max().item():.3g}"
    return None


def flex_and_sdpa(
    device: torch.device, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, grad: bool, seed: int = 0
) -> tuple[list[Tensor], list[Tensor]]:
    """(Flex's, SDPA's) [attention output on real positions, then with `grad` the gradients of query, key and
    value] for random inputs on the packed rows of `_PROBE`: Flex on the rows padded to `bucket_length`, SDPA on
    the rows as they are with the dense mask."""
    batch = collate_packed(_PROBE, list(range(len(_PROBE))), 0, max_row_tokens=130).to(device)
    rows, width = batch.segment.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = lambda h: (rows, h, width, head_dim)  # noqa: E731
    leaves = [
        torch.randn(shape(h), generator=generator, device=device, dtype=dtype) for h in (heads, kv_heads, kv_heads)
    ]
    weight = torch.randn(rows, width, heads, head_dim, generator=generator, device=device, dtype=dtype)
    length = bucket_length(width)
    mask = block_mask(batch, length)

    def run(fn):
        inputs = [x.detach().requires_grad_(grad) for x in leaves]
        out = fn(*inputs)[:, :width]
        if grad:
            (out.float() * weight).sum().backward()
        return [out.detach()] + ([x.grad for x in inputs] if grad else [])

    def flex(q, k, v):
        padded = [F.pad(x, (0, 0, 0, length - width)) for x in (q, k, v)]
        return flex_forward(None, *padded, mask)[0]

    def sdpa(q, k, v):
        repeat = heads // kv_heads
        k, v = (x.repeat_interleave(repeat, dim=1) for x in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.attention_mask())
        return out.transpose(1, 2)

    return run(flex), run(sdpa)

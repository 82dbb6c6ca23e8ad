"""Model → per-sequence log-probs of the response tokens.

Two layouts give the same numbers (tests/test_packed.py checks values and gradients):
- `padded_logps`: the plain layout, full logits for every position. The reference for exactness. This is where
  the DPO authors' original code counted padding in the log-probs; tests check against a naive loop and that
  extra padding changes nothing.
- `packed_logps`: prefix-shared packed rows; the LM head runs only on the positions that predict response
  tokens, in chunks, and recomputes its logits in backward, so no [tokens × vocabulary] tensor is ever held.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
from torch import LongTensor, Tensor

from preftune.attention import packed_inputs
from preftune.data.batching import PackedBatch, PaddedBatch
from preftune.data.tokenize import TokenizedPair

log = logging.getLogger("preftune")


class SequenceLogps(NamedTuple):
    """Per-pair results of a log-prob pass, each [B]: summed response log-probs and response token counts."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


class WeightedLogps(NamedTuple):
    """`SequenceLogps` and WPO's log-weights of the chosen and rejected responses (see "WPO weights" below)."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_log_weights: Tensor
    rejected_log_weights: Tensor


def _token_logps(logits: Tensor, targets: LongTensor) -> Tensor:
    """log p(targets[n, t]) under logits[n, t], [N, T] float32, from logits [N, T, V] of any float dtype.

    One row at a time, so a bf16 batch never has a full float32 copy of its [N, T, V] logits in memory.
    """
    rows = []
    for row_logits, row_targets in zip(logits, targets):
        row_logits = row_logits.float()  # log_softmax in bf16 loses ~3 significant digits per token
        picked = row_logits.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - row_logits.logsumexp(-1))
    return torch.stack(rows)


def sequence_logps(
    logits: Tensor, input_ids: LongTensor, response_mask: LongTensor, token_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Sum of log p(token_t | tokens_<t) over response tokens, per row.

    logits [N, T, V], input_ids [N, T], response_mask [N, T] (1 on response tokens) → (logps [N] float32,
    lengths [N] long: response tokens counted). Token t is predicted by the logits at t − 1, so a response
    token at position 0 cannot be scored and is not counted (batching never puts one there). With
    `token_weights` [N, T], token t's log-prob counts token_weights[:, t] times (LD-DPO).
    """
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool()
    token_logps = _token_logps(logits[:, :-1], targets)
    # masked_fill rather than multiply: 0 · (−inf) at a padded position would be nan
    token_logps = token_logps.masked_fill(~mask, 0.0)
    if token_weights is not None:
        token_logps = token_logps * token_weights[:, 1:]
    return token_logps.sum(-1), mask.sum(-1)


def padded_logps(model: torch.nn.Module, batch: PaddedBatch, ld_alpha: float | None = None) -> SequenceLogps:
    """Run `model` on a `PaddedBatch` → (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [B].

    With `ld_alpha`, the log-probs are LD-DPO's (see `_ld_weights`)."""
    return SequenceLogps(*_padded(model, batch, wpo=False, ld_alpha=ld_alpha)[:4])


def _padded(model: torch.nn.Module, batch: PaddedBatch, wpo: bool, ld_alpha: float | None) -> tuple[Tensor, ...]:
    """`padded_logps`, plus the chosen and rejected WPO log-weights ([B] each) when `wpo`."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return padded_from_logits(logits, batch, wpo, ld_alpha)


def padded_from_logits(logits: Tensor, batch: PaddedBatch, wpo: bool, ld_alpha: float | None) -> tuple[Tensor, ...]:
    """`_padded` from the logits [2B, T, V] of the batch's rows: a caller that also needs the hidden states of the
    same forward (`preftune.ches`) runs the model once."""
    weights = None
    if ld_alpha is not None:
        position = batch.response_mask.cumsum(-1)  # 1, 2, ... along each response; its length at the end
        weights = _ld_weights(position - 1, _shared_lengths(position[:, -1])[:, None], ld_alpha)
    logps, lengths = sequence_logps(logits, batch.input_ids, batch.response_mask, weights)
    out = (*logps.chunk(2), *lengths.chunk(2))
    if not wpo:
        return out
    targets, mask = batch.input_ids[:, 1:], batch.response_mask[:, 1:].bool()
    aligned = torch.stack([_aligned_logps(row, row_targets) for row, row_targets in zip(logits[:, :-1], targets)])
    log_weights = aligned.masked_fill(~mask, 0.0).sum(-1) / lengths.clamp(min=1)
    return (*out, *log_weights.chunk(2))


def _ld_weights(rank: LongTensor, shared: LongTensor, ld_alpha: float) -> Tensor:
    """LD-DPO's token weights (Liu et al. 2024, Length Desensitization in DPO, arXiv 2409.06411), as TRL's ld_alpha:
    1 for the first min(|yw|, |yl|) tokens of a response, `ld_alpha` beyond, so the extra length of the longer
    response counts only α times. rank: each token's 0-based place in its response; shared: min(|yw|, |yl|) of
    its pair (broadcastable to rank) → float32 weights shaped as rank."""
    return torch.where(rank < shared, 1.0, ld_alpha)


def _shared_lengths(lengths: LongTensor) -> LongTensor:
    """[2B] min(|yw|, |yl|) of each sequence's pair, from the [2B] response lengths (chosen, then rejected)."""
    return torch.minimum(*lengths.chunk(2)).repeat(2)


class ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weightᵀ + bias)[target] for N positions, chunk rows at a time.

    Forward keeps only the log-sum-exp per position ([N] floats); backward recomputes each chunk's logits, so
    peak memory is chunk × vocabulary instead of N × vocabulary. Logits are computed in `dtype` and reduced in
    float32 (the log-sum-exp of 50k–128k bf16 terms loses precision otherwise).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, dtype: torch.dtype):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            logits = _chunk_logits(hidden[start : start + chunk], weight, bias, dtype)
            picked = logits.gather(-1, targets[start : start + chunk, None]).squeeze(-1)
            lse[start : start + chunk] = _logsumexp_(logits)
            out[start : start + chunk] = picked - lse[start : start + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] else None
        )
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = start + ctx.chunk
            h = hidden[start:end]
            # d logp[target] / d logits = onehot(target) − softmax(logits), scaled by grad_out, in place:
            # every pass over the [chunk × vocabulary] logits costs as much as a small matmul on a CPU.
            g = grad_out[start:end, None]
            grad_logits = _chunk_logits(h, weight, bias, ctx.dtype).sub_(lse[start:end, None]).exp_().mul_(-g)
            grad_logits.scatter_add_(-1, targets[start:end, None], g)
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(ctx.dtype) @ weight.to(ctx.dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.float())
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
        grad_bias = grad_bias.to(bias.dtype) if grad_bias is not None else None
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _logsumexp_(logits: Tensor) -> Tensor:
    """Row-wise log-sum-exp [n] of logits [n, V], overwriting them: no [n, V] temporaries, two fewer passes
    over memory than `torch.logsumexp`, which matters on a CPU where these passes cost as much as the matmul."""
    top = logits.amax(-1, keepdim=True)
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    logits = hidden.to(dtype) @ weight.to(dtype).t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    return logits.float()


# Logits held at once by the chunked head: 2**25 floats = 128 MiB whatever the vocabulary, so memory stays flat
# from 32k to 128k tokens (~1,000 rows of logits at 32k, ~260 at 128k; fewer rows per chunk cost little time).
CHUNK_ELEMENTS = 2**25


def token_logps(
    hidden: Tensor,
    head: torch.nn.Linear,
    targets: LongTensor,
    chunk: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-position log p(targets) [N] float32 from hidden states [N, H] through the LM head `head`.

    `chunk` rows of logits exist at a time (default: CHUNK_ELEMENTS // vocabulary)."""
    chunk = chunk or max(16, CHUNK_ELEMENTS // head.weight.shape[0])
    dtype = dtype or (
        torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    )
    return ChunkedTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk, dtype)


def packed_logps(
    model: torch.nn.Module, batch: PackedBatch, chunk: int | None = None, ld_alpha: float | None = None
) -> SequenceLogps:
    """Run `model` on a `PackedBatch` → (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [B].

    The decoder runs once over the packed rows; hidden states are gathered at the N positions that predict
    response tokens, and only those go through the LM head. With `ld_alpha`, the log-probs are LD-DPO's.
    """
    return SequenceLogps(*_packed(model, batch, chunk, wpo=False, ld_alpha=ld_alpha)[:4])


# A sharded model's (fsdp.py) method that runs `packed_run` with the LM head's and embeddings' weights gathered.
FSDP_PACKED = "preftune_sharded_packed"


def _packed(
    model: torch.nn.Module, batch: PackedBatch, chunk: int | None, wpo: bool, ld_alpha: float | None
) -> tuple[Tensor, ...]:
    """`packed_logps`, plus the chosen and rejected WPO log-weights ([B] each) when `wpo`."""
    sharded = getattr(model, FSDP_PACKED, None)  # reads head.weight outside forward: FSDP must gather it first
    return (sharded or functools.partial(packed_run, model))(batch, chunk, wpo, ld_alpha)


def packed_run(
    model: torch.nn.Module, batch: PackedBatch, chunk: int | None, wpo: bool, ld_alpha: float | None
) -> tuple[Tensor, ...]:
    """`_packed` on a model whose weights are all present here."""
    return packed_from_hidden(model, batch, packed_hidden(model, batch), chunk, wpo, ld_alpha)


def packed_hidden(model: torch.nn.Module, batch: PackedBatch) -> Tensor:
    """[N, H] the decoder's last hidden states (after its final norm: what the LM head multiplies) at the N
    positions that predict response tokens, in `batch.target_pos` order. One decoder pass over the packed rows."""
    inputs, target_pos = packed_inputs(model, batch)  # FlexAttention's block mask on CUDA, else SDPA's dense mask
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, target_pos)


def packed_from_hidden(
    model: torch.nn.Module, batch: PackedBatch, picked: Tensor, chunk: int | None, wpo: bool, ld_alpha: float | None
) -> tuple[Tensor, ...]:
    """`packed_run` from `packed_hidden`'s states: the LM head and the sums per sequence. Apart, so that a caller
    that also needs the hidden states (`preftune.ches`) runs the decoder once."""
    head = model.get_output_embeddings()
    per_token = _head_logps(picked, head, batch, chunk)
    sequences = 2 * batch.num_pairs
    weighted = per_token if ld_alpha is None else per_token * _packed_ld_weights(batch, ld_alpha)
    logps = torch.zeros(sequences, dtype=torch.float32, device=per_token.device).index_add(
        0, batch.target_seq, weighted
    )
    out = (*logps.chunk(2), *batch.lengths.chunk(2))
    if not wpo:
        return out
    aligned = _chunked_aligned_logps(picked, head, batch.target_ids, chunk)
    sums = torch.zeros(sequences, dtype=torch.float32, device=aligned.device).index_add(0, batch.target_seq, aligned)
    return (*out, *(sums / batch.lengths.clamp(min=1)).chunk(2))


def _head_logps(picked: Tensor, head: torch.nn.Linear, batch: PackedBatch, chunk: int | None) -> Tensor:
    """[N] log-probs of the batch's targets from their hidden states [N, H]. A k-way segment lists its shared chosen
    tokens once per pair (`PackedBatch.head_rows`): the head scores each once, and indexing hands the copies the
    result, so backward sums the k pairs' gradients into the one row, as the separate copies would."""
    if batch.head_rows is None:
        return token_logps(picked, head, batch.target_ids, chunk)
    rows = batch.head_rows
    return token_logps(picked[rows], head, batch.target_ids[rows], chunk)[batch.head_index]


def _packed_ld_weights(batch: PackedBatch, ld_alpha: float) -> Tensor:
    """[N] LD-DPO weight of each response token of a `PackedBatch`. A sequence's targets come in token order
    (collate_packed), so a stable sort by sequence gives each token's place in its response."""
    order = torch.argsort(batch.target_seq, stable=True)
    starts = torch.cumsum(batch.lengths, 0) - batch.lengths
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device) - starts[batch.target_seq[order]]
    return _ld_weights(rank, _shared_lengths(batch.lengths)[batch.target_seq], ld_alpha)


def compute_logps(
    model: torch.nn.Module, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
) -> SequenceLogps:
    """(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths) for either layout; LD-DPO's log-probs
    with `ld_alpha` (None: plain sums)."""
    if isinstance(batch, PackedBatch):
        return packed_logps(model, batch, ld_alpha=ld_alpha)
    return padded_logps(model, batch, ld_alpha=ld_alpha)


# ---------------------------------------------------------------------------------------------------- WPO weights
# WPO (Zhou et al. 2024, arXiv 2406.11827, Eq. 2) weights a pair by how likely the policy itself is to produce its
# responses, w(y) = exp(mean over y's tokens of log p(y_t) − log Σ_v p(v)²): the token's probability relative to
# that of a token the policy would sample (Σ_v p(v)² = E_v~p[p(v)]). As in TRL, the weights carry no gradient.


def compute_logps_wpo(
    model: torch.nn.Module, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
) -> WeightedLogps:
    """`compute_logps` plus the WPO log-weights of the chosen and rejected responses: (chosen_logps,
    rejected_logps, chosen_lengths, rejected_lengths, chosen_log_weights, rejected_log_weights), each [B].

    The log-probs are those of `compute_logps`, computed the same way; the log-weights (never LD-weighted, as in
    TRL) cost one more pass of the LM head over the response positions (packed layout), without gradient.
    """
    if isinstance(batch, PackedBatch):
        return WeightedLogps(*_packed(model, batch, None, wpo=True, ld_alpha=ld_alpha))
    return WeightedLogps(*_padded(model, batch, wpo=True, ld_alpha=ld_alpha))


@torch.no_grad()
def _aligned_logps(logits: Tensor, targets: LongTensor) -> Tensor:
    """log p(target) − log Σ_v p(v)², [n] float32, from logits [n, V] of any float dtype."""
    logp = torch.log_softmax(logits.float(), -1)
    return logp.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(2 * logp, -1)


@torch.no_grad()
def _chunked_aligned_logps(hidden: Tensor, head: torch.nn.Linear, targets: LongTensor, chunk: int | None) -> Tensor:
    """`_aligned_logps` [N] of the hidden states [N, H] through the LM head, chunk rows of logits at a time."""
    chunk = chunk or max(16, CHUNK_ELEMENTS // head.weight.shape[0])
    dtype = (
        torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    )
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(
        [
            _aligned_logps(
                _chunk_logits(hidden[start : start + chunk], head.weight, head.bias, dtype),
                targets[start : start + chunk],
            )
            for start in range(0, hidden.shape[0], chunk)
        ]
    )


@torch.no_grad()
def packed_layout_works(model: torch.nn.Module, pairs: list, pad_id: int) -> str | None:
    """None when the packed layout gives the plain layout's log-probs on `pairs` for this model, else why not.

    Models whose forward does more than `lm_head(decoder(x))` (logit soft-capping or scaling), or whose
    attention ignores custom 4-D masks or position ids, fail this check and keep the plain layout.
    """
    from preftune.data.batching import collate_packed, collate_padded

    indices = list(range(len(pairs)))
    was_training = model.training
    model.eval()
    try:
        plain = padded_logps(model, collate_padded(pairs, indices, pad_id).to(model.device))[:2]
        packed = packed_logps(model, collate_packed(pairs, indices, pad_id).to(model.device))[:2]
    except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        model.train(was_training)
    # Two orders of the same sums: float32 weights agree to ~1e-6 of a log-prob, bfloat16 ones (--weights-dtype) to
    # ~1e-3 of it (0.012 nats measured on the demo's model); a layout that feeds a token the wrong context is off by
    # whole nats on these 8-token pieces either way.
    rtol, atol = (1e-4, 1e-3) if next(model.parameters()).dtype == torch.float32 else (5e-3, 2e-2)
    for a, b in zip(plain, packed):
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            return f"log-probs differ by up to {(a - b).abs().max().item():.3g}"
    return None


def choose_layout(requested: str, policy, pairs: list[TokenizedPair], pad_id: int) -> str:
    """The packed layout when it gives this model's exact log-probs on a few pairs, else the plain one (`--layout`
    padded: the plain one)."""
    if requested == "padded":
        return "padded"
    # Short pieces of two real pairs: the check is about the model, and full-length plain logits are large.
    probe = [TokenizedPair(p.prompt_ids[-16:], p.chosen_ids[:8], p.rejected_ids[:8], p.where) for p in pairs[:2]]
    problem = packed_layout_works(policy, probe, pad_id)
    if problem:
        log.warning("packed layout does not fit %s (%s): using the plain padded layout", type(policy).__name__, problem)
        return "padded"
    return "packed"

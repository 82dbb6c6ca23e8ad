"""Logits → per-sequence log-probs of the response tokens.

This is where the DPO authors' original code counted padding in the log-probs; `tests/test_logps.py` checks
against a naive loop and checks that extra padding changes nothing.
"""

from __future__ import annotations

import torch
from torch import LongTensor, Tensor

from preftune.data.batching import PaddedBatch


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


def sequence_logps(logits: Tensor, input_ids: LongTensor, response_mask: LongTensor) -> tuple[Tensor, Tensor]:
    """Sum of log p(token_t | tokens_<t) over response tokens, per row.

    logits [N, T, V], input_ids [N, T], response_mask [N, T] (1 on response tokens) → (logps [N] float32,
    lengths [N] long: response tokens counted). Token t is predicted by the logits at t − 1, so a response
    token at position 0 cannot be scored and is not counted (batching never puts one there).
    """
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].bool()
    token_logps = _token_logps(logits[:, :-1], targets)
    # masked_fill rather than multiply: 0 · (−inf) at a padded position would be nan
    logps = token_logps.masked_fill(~mask, 0.0).sum(-1)
    return logps, mask.sum(-1)


def padded_logps(model: torch.nn.Module, batch: PaddedBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run `model` on a `PaddedBatch` → (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths), each [B]."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logps, lengths = sequence_logps(logits, batch.input_ids, batch.response_mask)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return chosen_logps, rejected_logps, chosen_lengths, rejected_lengths

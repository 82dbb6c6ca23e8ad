"""The frozen reference model whose log-probs anchor the policy (the π_ref of the DPO loss)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from preftune.data.batching import PackedBatch, PaddedBatch
from preftune.logps import compute_logps
from preftune.refcache import RefLogps


class ReferenceModel:
    """A model that never trains: eval mode (dropout off), no gradients, no grad graph."""

    def __init__(self, model: torch.nn.Module, dtype: str = "float32"):
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype

    @torch.no_grad()
    def logps(self, batch: PackedBatch | PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs [B] of the chosen and rejected rows of `batch`."""
        device = next(self.model.parameters()).device
        bf16 = self.dtype == "bfloat16"
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext():
            chosen, rejected, _, _ = compute_logps(self.model, batch)
        return chosen, rejected


class CachedReference:
    """Reference log-probs read from the on-disk cache by dataset position (see `refcache`)."""

    def __init__(self, logps: RefLogps):
        self.cached = logps

    def logps(self, batch: PackedBatch | PaddedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cached.lookup(batch.index, batch.input_ids.device)

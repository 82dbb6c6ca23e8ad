"""The frozen reference model whose log-probs anchor the policy (the π_ref of the DPO loss).

Three kinds, one interface (`Reference`): a frozen copy of a model (`ReferenceModel`), the policy itself inside a
context such as a disabled LoRA adapter (`PolicyReference`), and log-probs read from the on-disk cache
(`CachedReference`, the default).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import torch

from preftune.data.batching import PackedBatch, PaddedBatch
from preftune.device import autocast
from preftune.logps import compute_logps
from preftune.refcache import RefLogps


class Reference(Protocol):
    def logps(
        self, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs [B] of the chosen and rejected rows of `batch` (LD-DPO's with `ld_alpha`)."""


class ReferenceModel:
    """A model that never trains: eval mode (dropout off), no gradients, no grad graph."""

    def __init__(self, model: torch.nn.Module, dtype: str = "float32"):
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype

    @torch.no_grad()
    def logps(
        self, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs [B] of the chosen and rejected rows of `batch` (LD-DPO's with `ld_alpha`)."""
        with autocast(next(self.model.parameters()).device, self.dtype):
            result = compute_logps(self.model, batch, ld_alpha=ld_alpha)
        return result.chosen, result.rejected

    @torch.no_grad()
    def update(self, policy: torch.nn.Module, alpha: float) -> None:
        """TR-DPO (Gorbatovski et al. 2024): ref ← α·policy + (1−α)·ref, parameter by parameter; α = 1 copies the
        policy. In place and in TRL's order of operations (`SyncRefModelCallback`), so the numbers are TRL's."""
        for ref, live in zip(self.model.parameters(), policy.parameters(), strict=True):
            if alpha == 1.0:
                ref.copy_(live)
            else:
                ref.mul_(1.0 - alpha).add_(live, alpha=alpha)


class PolicyReference:
    """The policy run as its own reference inside `context()`, e.g. a LoRA policy under `model.disable_adapter`:
    the reference shares every weight with the policy, no second copy exists.

    Each pass is no-grad and in eval mode (no dropout); the model's previous mode is restored after it.
    """

    def __init__(self, model: torch.nn.Module, context: Callable[[], AbstractContextManager], dtype: str = "float32"):
        self.model = model
        self.context = context
        self.dtype = dtype

    @torch.no_grad()
    def logps(
        self, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs [B] of the chosen and rejected rows of `batch` (LD-DPO's with `ld_alpha`)."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.context(), autocast(next(self.model.parameters()).device, self.dtype):
                result = compute_logps(self.model, batch, ld_alpha=ld_alpha)
        finally:
            self.model.train(was_training)
        return result.chosen, result.rejected


class CachedReference:
    """Reference log-probs read from the on-disk cache by dataset position (see `refcache`)."""

    def __init__(self, logps: RefLogps, ches: RefLogps | None = None):
        self.cached = logps
        self.ches = ches  # the pairs' CHES rows, when --drop-displacement asked the cache pass for them

    def logps(
        self, batch: PackedBatch | PaddedBatch, ld_alpha: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached rows; `ld_alpha` is part of the cache key, so they were computed with it."""
        return self.cached.lookup(batch.index, batch.input_ids.device)

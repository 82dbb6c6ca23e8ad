"""Which device a run uses, and the compute precision on it (`--device`, `--dtype`)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from preftune.errors import UserError


def resolve_device(name: str) -> torch.device:
    """`--device`: cpu, cuda, cuda:N, or auto (cuda when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}' (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return device


def autocast(device: torch.device | str, dtype: str):
    """`--dtype bfloat16`: forward (and so backward) under bfloat16 autocast, weights staying float32; float32: no
    context. The one place a pass chooses its precision: policy, live reference, cache and padding rounds alike."""
    if dtype == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()

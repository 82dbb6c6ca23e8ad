"""`--fsdp`: parameters, gradients and optimizer state sharded over the processes with FSDP2 (`fully_shard`).

Units: each decoder layer is one FSDP unit (its weights are gathered just before it runs and freed after); the
rest of the model (embeddings, final norm, LM head) is the root unit. Tied embeddings are one parameter, so
they must sit in one unit: the root holds both names.

The packed layout (logps.py) runs the decoder and then reads the LM head's `.weight` directly, outside the
root's `forward`, where FSDP2 would see only this process's shard. So the packed log-prob pass is registered as
a second forward method of the root (`register_fsdp_forward_method`): FSDP gathers the root's weights around it
and reduce-scatters their gradients in backward, as for `forward`. The padded layout calls `forward` itself.

Gradients are reduce-scattered in each backward: `distributed.sum_gradients` must not add them up again. A
process with fewer micro-batches in a step than another runs as many all-zero-loss rounds as it lacks
(`run_empty_rounds`), because every process must take part in every gather.

Checkpoints and final/ hold the whole model, gathered to rank 0 on the CPU, in the files a run without --fsdp
writes; the optimizer state is saved in `torch.optim`'s own (integer-keyed) layout. Either kind of run, with any
number of processes, resumes either kind of checkpoint.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from preftune import distributed, logps, lora
from preftune.device import autocast
from preftune.errors import UserError

log = logging.getLogger("preftune")


def check_supported(cfg) -> None:
    """One-line refusals of what --fsdp does not handle (validation runs on every process, before any exchange).
    Refused with one process too, where --fsdp does nothing: a config then behaves alike under torchrun."""
    if not cfg.fsdp:
        return
    refused = [
        (lora.enabled(cfg), "LoRA (--lora-r, or a --model that holds an adapter): train adapters without it"),
        (cfg.ref_update, "--ref-update (the live reference would be updated from sharded weights)"),
        (cfg.eval_prompts, "--eval-prompts (sampling on rank 0 alone would wait for the other processes)"),
    ]
    for given, what in refused:
        if given:
            raise UserError(f"--fsdp: not supported with {what}")
    if cfg.needs_kl:
        raise UserError(
            f"--fsdp: not supported with --loss {cfg.loss} (its KL estimate is exchanged between "
            "processes in the middle of each micro-batch)"
        )


SHARDED_PACKED = logps.FSDP_PACKED  # the packed pass, as a method of the sharded model (see `logps._packed`)


def enabled(model: torch.nn.Module) -> bool:
    """Whether `model` was sharded by `shard`."""
    return getattr(model, SHARDED_PACKED, None) is not None


def shard(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard `model` (already on `device`) in place over all processes: one unit per decoder layer, the rest the
    root. Returns the model (its class becomes FSDP's subclass of the model's class). One process: nothing to
    shard, the model is returned as it is."""
    if distributed.world().size == 1:
        log.info("--fsdp: one process, nothing to shard")
        return model
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"--fsdp: {type(model).__name__} has no list of decoder layers (decoder.layers) to shard")
    mesh = init_device_mesh(device.type, (distributed.world().size,))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)  # save_pretrained drops the "FSDP" of the new class's name in config.json
    for unit in [*layers, model]:
        # FSDP averages gradients over processes by default; each process's loss is already divided by the whole
        # step's pair count, so the one-process gradient is their sum (as `distributed.sum_gradients` computes).
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    setattr(model, SHARDED_PACKED, MethodType(_packed_method, model))
    register_fsdp_forward_method(model, SHARDED_PACKED)
    return model


def _packed_method(model, batch, chunk, wpo, ld_alpha):
    # Copies: FSDP warns about outputs that are views (an in-place op on one would lose its backward hook).
    return tuple(t.clone() for t in logps.packed_run(model, batch, chunk, wpo, ld_alpha))


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole of a DTensor (e.g. the replicated total norm of `clip_grad_norm_`), else itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def run_empty_rounds(
    model: torch.nn.Module, batch, rounds: int, backward: bool, dtype: str, ld_alpha: float | None
) -> None:
    """Run `rounds` micro-batches that this process lacks in a step (`distributed.missing_rounds`) on `batch` (any
    pair), with the loss multiplied by zero: the gathers and reduce-scatters of every process then match, and the
    gradients and metrics are unchanged."""
    for _ in range(rounds):
        with torch.no_grad() if not backward else torch.enable_grad(), autocast(batch.input_ids.device, dtype):
            result = logps.compute_logps(model, batch, ld_alpha=ld_alpha)
        if backward:
            ((result.chosen.sum() + result.rejected.sum()) * 0.0).backward()


# ---------------------------------------------------------------------------------------------------- state dicts


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names of the state-dict entries that are one parameter (tied embeddings), each group sorted; the first
    name is the one a saved file keeps, as `safetensors.torch.save_model` does."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [sorted(group) for group in names.values() if len(group) > 1]


def full_model_state(model: torch.nn.Module, drop_tied: bool) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU on rank 0 (empty elsewhere); a collective: every process calls it.

    Tied names (`tied_groups`) share one tensor, as in the model's own state dict, so `save_pretrained` writes the
    file it writes for the unsharded model; with `drop_tied` only the first name is kept, as in the file
    `safetensors.torch.save_model` writes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    for group in tied_groups(model) if state else []:
        for name in group[1:]:
            if drop_tied:
                del state[name]
            else:
                state[name] = state[group[0]]
    return state


def full_states(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, optimizer state) of a checkpoint, whole, on rank 0; a collective."""
    return full_model_state(model, drop_tied=True), full_optimizer_state(model, optimizer)


def full_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's whole state on rank 0, in `optimizer.state_dict()`'s own layout (parameters numbered in
    `param_groups` order), so a run without --fsdp loads it; a collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options())
    if not distributed.world().is_main:
        return {}
    number = {name: i for i, name in enumerate(n for g in state["param_groups"] for n in g["params"])}
    return {
        "state": {number[name]: value for name, value in state["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_full_states(model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Shard a whole saved model and optimizer state (read by every process) into `model` and `optimizer`."""
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    for group in tied_groups(model):
        for name in group[1:]:
            model_state[name] = model_state[group[0]]
    set_model_state_dict(model, model_state, options=_options())
    # The names of the parameters in `param_groups` order; a sharded (not full) state dict needs no exchange.
    names = [n for g in get_optimizer_state_dict(model, optimizer)["param_groups"] for n in g["params"]]
    state = {
        "state": {names[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, state, options=_options())

"""`--fsdp`: parameters, gradients and optimizer state sharded over the processes with FSDP2 (`fully_shard`).

Units: each decoder layer is one FSDP unit (its weights are gathered just before it runs and freed after); the
rest of the model (embeddings, final norm, LM head) is the root unit. Tied embeddings are one parameter, so
they must sit in one unit: the root holds both names.

Loading (`load_sharded`): the model is built from its config on the meta device (no memory), sharded, and each
process then allocates its shard and reads only its rows of each tensor from the safetensors files: no process
ever holds the whole model. The layout check and the reference log-probs run on the sharded model, every process
taking part. A hub name, or a folder whose tensor names are not the model's (transformers converts some models'
weights as it loads them), is loaded whole on each process and then sharded.

The packed layout (logps.py) runs the decoder and then reads the LM head's `.weight` directly, outside the
root's `forward`, where FSDP2 would see only this process's shard. So the packed log-prob pass is registered as
a second forward method of the root (`register_fsdp_forward_method`): FSDP gathers the root's weights around it
and reduce-scatters their gradients in backward, as for `forward`. The padded layout calls `forward` itself.

Gradients are reduce-scattered in each backward: `distributed.sum_gradients` must not add them up again. A
process with fewer micro-batches in a step than another runs as many all-zero-loss rounds as it lacks
(`run_empty_rounds`, the live reference too), because every process must take part in every gather.

Checkpoints and final/ are the files a run without --fsdp writes, the whole model, but never gathered whole: each
tensor in turn is gathered (to every process, `DTensor.full_tensor`) and written by rank 0 (`checkpoint.Streamed`),
so saving costs one tensor's memory. The optimizer's tensors go the same way into optimizer.safetensors. Resuming
reads each process's rows of those files. Either kind of run, with any number of processes, resumes either kind
of checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import MethodType

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

from preftune import checkpoint, distributed, logps, lora
from preftune.device import autocast
from preftune.errors import UserError
from preftune.loading import WeightFiles, causal_lm_config, load_causal_lm

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
    """Shard `model` (on `device`, or on the meta device: `load_sharded`) in place over all processes: one unit per
    decoder layer, the rest the root. Returns the model (its class becomes FSDP's subclass of the model's class)."""
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
    # FSDP leaves the root's weights gathered after its forward, for the backward that follows. A pass without
    # gradients (the layout check, the reference, evaluation) has no backward to free them, and a training step
    # that then starts with them gathered got wrong gradients for them (measured: step 2 after the reference pass).
    # So such a pass frees them as it ends, also for the packed pass.
    model.register_forward_hook(lambda module, args, output: _resharded_without_grad(module, output))
    gathered = getattr(model, SHARDED_PACKED)
    setattr(model, SHARDED_PACKED, lambda *args: _resharded_without_grad(model, gathered(*args)))
    return model


def _resharded_without_grad(model, output):
    if not torch.is_grad_enabled():
        model.reshard()
    return output


def _packed_method(model, batch, chunk, wpo, ld_alpha):
    # Copies: FSDP warns about outputs that are views (an in-place op on one would lose its backward hook).
    return tuple(t.clone() for t in logps.packed_run(model, batch, chunk, wpo, ld_alpha))


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole of a DTensor (e.g. the replicated total norm of `clip_grad_norm_`), else itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def run_empty_rounds(
    model: torch.nn.Module, batch, rounds: int, backward: bool, dtype: str, ld_alpha: float | None, reference=None
) -> None:
    """Run `rounds` micro-batches that this process lacks in a step (`distributed.missing_rounds`) on `batch` (any
    pair), with the loss multiplied by zero: the gathers and reduce-scatters of every process then match, and the
    gradients and metrics are unchanged. A sharded live `reference` runs too, after the policy as in a real round."""
    for _ in range(rounds):
        with torch.no_grad() if not backward else torch.enable_grad(), autocast(batch.input_ids.device, dtype):
            result = logps.compute_logps(model, batch, ld_alpha=ld_alpha)
        if enabled(getattr(reference, "model", None)):
            reference.logps(batch, ld_alpha=ld_alpha)
        if backward:
            ((result.chosen.sum() + result.rejected.sum()) * 0.0).backward()


# ---------------------------------------------------------------------------------------------------- loading


def load_policy(base: str, cfg, device: torch.device) -> torch.nn.Module:
    """The policy of an --fsdp run, sharded as it is loaded (`load_sharded`); with one process the plain one."""
    if distributed.world().size == 1:
        log.info("--fsdp: one process, nothing to shard")
        return lora.load_policy(base, cfg, device)
    return load_sharded(base, cfg, device)


def load_sharded(path: str, cfg, device: torch.device, what: str = "--model") -> torch.nn.Module:
    """The model at `path` (as `loading.load_causal_lm` loads it: eval mode, --weights-dtype), sharded over the
    processes, each of which reads only its rows of each tensor (see the module's docstring)."""
    from transformers import AutoModelForCausalLM

    config = causal_lm_config(
        path, trust_remote_code=cfg.trust_remote_code, allow_pickle_weights=cfg.allow_pickle_weights, what=what
    )
    dtype = getattr(torch, cfg.weights_dtype)
    files = _weight_files(path)
    if files is not None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
        sources = _sources(model, files)
    if files is None or sources is None:
        log.info(
            "--fsdp: %s %s is read whole by each process, then sharded (not a folder of the model's tensors)",
            what,
            path,
        )
        whole = load_causal_lm(
            path,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle_weights=cfg.allow_pickle_weights,
            what=what,
            dtype=dtype,
        )
        return shard(whole.to(device), device)
    shard(model, device)
    model.to_empty(device=device)
    try:
        fill(model, files, sources)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path}: cannot load the weights ({e})") from None
    # Tensors the files do not hold (rotary inv_freq, a non-persistent buffer) were left empty: transformers' own
    # initialisation computes them, as `from_pretrained` does after loading (it skips the tensors marked loaded).
    model.initialize_weights()
    model._weight_conversions = []  # as `from_pretrained` records that it converted nothing (save_pretrained reads it)
    if model.can_generate() and Path(path, "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)  # as `from_pretrained` reads it
    held = sum(_local_rows(p)[0].numel() for p in model.parameters())
    log.info("--fsdp: %s %s loaded sharded (%d of its %d weights here)", what, path, held, model.num_parameters())
    return model.eval()


def _weight_files(path: str) -> WeightFiles | None:
    """The safetensors files of the folder `path`; None for a hub name or a folder without them."""
    try:
        return WeightFiles(path) if Path(path).is_dir() else None
    except ValueError:
        return None  # the whole load reports what is wrong with them


def _state_groups(model: torch.nn.Module) -> list[list[str]]:
    """The names of each tensor of the state dict (tied names together, sorted: the first is the one a checkpoint
    keeps, as `safetensors.torch.save_model` does)."""
    names: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(name)
    return [sorted(group) for group in names.values()]


def _sources(model: torch.nn.Module, files) -> dict[str, str] | None:
    """For each tensor of `model`'s state dict, by its first name, the name it has in `files`; None when a parameter
    is missing there or has another shape (the files need transformers' conversions)."""
    state = model.state_dict(keep_vars=True)
    sources = {}
    for names in _state_groups(model):
        found = [name for name in names if name in files.where]
        tensor = state[names[0]]
        if not found and isinstance(tensor, torch.nn.Parameter):
            return None
        if found and files.shape(found[0]) != tuple(tensor.shape):
            return None
        if found:  # a persistent buffer that the files lack is initialised as `from_pretrained` does
            sources[names[0]] = found[0]
    return sources


@torch.no_grad()
def fill(model: torch.nn.Module, files, sources: dict[str, str]) -> None:
    """Read this process's rows of each tensor of `sources` (`_sources`) from `files` into the sharded `model`."""
    state = model.state_dict(keep_vars=True)
    for name, source in sources.items():
        local, start = _local_rows(state[name])
        files.read_rows(source, local, start)
        state[name]._is_hf_initialized = True  # transformers' initialisation leaves it alone


def _local_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this process's part of `tensor`, the first row of the whole that it holds): FSDP2 splits dimension 0 as
    `torch.chunk` does, ⌈n / P⌉ rows per process, the last ones fewer or none."""
    if not isinstance(tensor, DTensor):
        return tensor, 0  # a buffer: every process holds it whole
    if tuple(tensor.placements) != (Shard(0),):
        raise RuntimeError(f"--fsdp: unexpected placement {tensor.placements} of a sharded tensor")
    me, rows = distributed.world(), tensor.shape[0]
    start = min(me.rank * -(-rows // me.size), rows)
    local = tensor.to_local()
    if len(local) != min(rows, start + -(-rows // me.size)) - start:
        raise RuntimeError(f"--fsdp: a shard of {len(local)} rows of {rows} on rank {me.rank}, expected another")
    return local, start


# ---------------------------------------------------------------------------------------------------- saving


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of `tensor` on the CPU (a DTensor is gathered from every process: a collective)."""
    whole = tensor.detach().full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    return whole.cpu()


def _stream(named: list[tuple[str, torch.Tensor]]) -> checkpoint.Streamed:
    """`named`'s tensors as a file to write, each gathered whole only when its turn comes."""
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in named]
    return checkpoint.Streamed(entries, (_gathered(t) for _, t in named))


def checkpoint_states(model: torch.nn.Module, optimizer) -> checkpoint.ShardedStates:
    """What `checkpoint.save` writes for the sharded `model`: its tensors under the names a run without --fsdp
    saves (the first of tied names), and the optimizer's tensors, numbered as in `optimizer.state_dict()`."""
    state = model.state_dict(keep_vars=True)
    named = sorted((group[0], state[group[0]]) for group in _state_groups(model))
    rest = {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}
    tensors = []
    for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                tensors.append((f"{index}.{key}", value))
            else:
                rest["state"].setdefault(index, {})[key] = value
    return checkpoint.ShardedStates(_stream(named), _stream(tensors), rest)


def final_weights(model: torch.nn.Module, max_shard_size: int | str = "50GB") -> checkpoint.ModelFiles | dict:
    """The weight files `save_pretrained` writes for `model` (tied and ignored names dropped, several files above
    `max_shard_size`, its default), each tensor gathered as it is written. A model whose files transformers writes
    under other names (weight conversions) is gathered whole on rank 0 instead (`full_model_state`)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict(keep_vars=True)
    shapes = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in state.items()}
    for name in model._keys_to_ignore_on_save or []:
        shapes.pop(name, None)
    kept = remove_tied_weights_from_state_dict(shapes, model)
    order = list(revert_weight_conversion(model, dict(kept)))  # the order save_pretrained fills its files in
    if set(order) != set(kept):
        return full_model_state(model, drop_tied=False)
    kept = {name: kept[name] for name in order}
    split = split_torch_state_dict_into_shards(
        kept, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    files = {file: _stream([(n, state[n]) for n in names]) for file, names in split.filename_to_tensors.items()}
    total = {"total_parameters": model.num_parameters(), **split.metadata}
    return checkpoint.ModelFiles(
        files, {"metadata": total, "weight_map": split.tensor_to_filename} if split.is_sharded else None
    )


def on_main(pending, write, *args, default=None):
    """`distributed.on_main(write, *args)` for a write that consumes the streams of `pending` (`checkpoint_states`,
    `final_weights`; or None, or a dict: nothing to gather): each of their tensors is gathered from every process,
    so the other processes take part in each gather while rank 0 writes, and rank 0 finishes the gathers that a
    failed write left, so that no process waits forever."""
    streams = getattr(pending, "streams", [])

    def write_then_finish():
        try:
            return write(*args)
        finally:
            for stream in streams:
                stream.drain()

    if streams and not distributed.world().is_main:
        for stream in streams:
            stream.drain()
    return distributed.on_main(write_then_finish, default=default)


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names of the state-dict entries that are one parameter (tied embeddings), each group sorted; the first
    name is the one a saved file keeps, as `safetensors.torch.save_model` does."""
    return [group for group in _state_groups(model) if len(group) > 1]


def full_model_state(model: torch.nn.Module, drop_tied: bool) -> dict[str, torch.Tensor]:
    """The whole model's state dict on the CPU on rank 0 (empty elsewhere); a collective: every process calls it.

    Tied names (`tied_groups`) share one tensor, as in the model's own state dict, so `save_pretrained` writes the
    file it writes for the unsharded model; with `drop_tied` only the first name is kept, as in the file
    `safetensors.torch.save_model` writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    for group in tied_groups(model) if state else []:
        for name in group[1:]:
            if drop_tied:
                del state[name]
            else:
                state[name] = state[group[0]]
    return state


# ---------------------------------------------------------------------------------------------------- resuming


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, saved: dict) -> None:
    """Restore a checkpoint written by any run into the sharded `model` and its `optimizer`, each process reading
    only its rows of each tensor (`checkpoint.load`'s `load_states`). `saved`: state.pt's optimizer entry."""
    files = WeightFiles(path)
    sources = _sources(model, files)
    if sources is None:
        raise ValueError(f"{path}: its tensors are not those of the model")
    fill(model, files, sources)
    optimizer.load_state_dict(_optimizer_state(path, optimizer, saved))


def _optimizer_state(path: Path, optimizer, saved: dict) -> dict:
    """`saved` with this process's rows of each optimizer tensor shaped as its parameter (a DTensor like it): from
    optimizer.safetensors, or from state.pt itself (written without --fsdp; memory-mapped, so only these rows are
    read)."""
    if (path / checkpoint.OPTIMIZER).exists():
        tensors = WeightFiles(path, checkpoint.OPTIMIZER)
    else:
        tensors = _Tensors({f"{i}.{k}": v for i, s in saved["state"].items() for k, v in s.items()})
    state = {int(i): {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)} for i, s in saved["state"].items()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for name in tensors.where:
        index, key = name.split(".", 1)
        param = params[int(index)]
        if isinstance(param, DTensor) and tensors.shape(name) == tuple(param.shape):
            local, start = _local_rows(param)
            part = torch.empty(local.shape, dtype=tensors.dtype(name), device=local.device)
            tensors.read_rows(name, part, start)
            value = DTensor.from_local(
                part, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        else:
            value = torch.empty(tensors.shape(name), dtype=tensors.dtype(name))
            tensors.read_rows(name, value)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": saved["param_groups"]}


class _Tensors:
    """Whole tensors by name, read as `loading.WeightFiles` reads its files."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.where = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.where[name].dtype

    def read_rows(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        whole = self.where[name]
        out.copy_(whole[start : start + len(out)] if whole.dim() else whole)

"""Checkpoints that are written atomically and resume exactly.

A checkpoint is a folder `checkpoints/step-00000012/` holding the model weights (safetensors), the optimizer
and scheduler state, the RNG states and the step number; the data position follows from the step (see
`train.step_pairs`). It is written under a temporary name and renamed when complete, so a kill at any moment
leaves either the previous checkpoint or the new one, never a half-written one.

A sharded model (--fsdp) is written as it is gathered, one tensor at a time (`Streamed`): the same model.safetensors,
and its optimizer's tensors in optimizer.safetensors (named "INDEX.KEY", INDEX the parameter's number in
`optimizer.state_dict()`) beside the rest of its state in state.pt. `load` reads either layout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from preftune import lora
from preftune.files import fsync, fsync_tree, give_default_modes
from preftune.loading import DTYPES, WEIGHTS, WEIGHTS_INDEX
from preftune.modelcard import CARD, model_card_text
from preftune.rundir import CHECKPOINTS, FINAL, FINAL_MERGED, complete_checkpoints


def write_atomically(final: Path, fill) -> None:
    """Call `fill(tmp_dir)` to write a folder, then move it to `final` in one rename."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        give_default_modes(tmp)
        fsync_tree(tmp)
    except BaseException:  # a full disk, or an interrupt: free the space, keep what was there
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # only when re-saving the same step after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync(final.parent)


# ---------------------------------------------------------------------------------------------------- streamed files

OPTIMIZER = "optimizer.safetensors"  # a sharded model's optimizer tensors (see the module's docstring)


@dataclass
class Streamed:
    """The tensors of one safetensors file, produced one at a time as `write_safetensors` writes them (--fsdp gathers
    each from the processes' shards just before): `entries` (name, dtype, shape) in file order, `tensors` the
    values in that order."""

    entries: list[tuple[str, torch.dtype, tuple[int, ...]]]
    tensors: Iterator[torch.Tensor]

    def drain(self) -> None:
        """Produce what has not been written (the other processes of a gather take part without writing)."""
        for _ in self.tensors:
            pass


@dataclass
class ShardedStates:
    """A checkpoint of a sharded model: model.safetensors, optimizer.safetensors, and `optimizer_rest`, the rest of
    `optimizer.state_dict()` (param_groups, non-tensor state values) for state.pt."""

    model: Streamed
    optimizer: Streamed
    optimizer_rest: dict

    @property
    def streams(self) -> list[Streamed]:
        return [self.model, self.optimizer]  # the order `save` writes them in


@dataclass
class ModelFiles:
    """The weight files `save_pretrained` writes for a sharded model: file name → its tensors, and the index of a
    model saved in several files (None for one file)."""

    files: dict[str, Streamed]
    index: dict | None = None

    @property
    def streams(self) -> list[Streamed]:
        return list(self.files.values())

    def write(self, folder: Path) -> None:
        for name, stream in self.files.items():
            write_safetensors(folder / name, stream)
        if self.index is not None:
            text = json.dumps(self.index, indent=2, sort_keys=True) + "\n"
            (folder / WEIGHTS_INDEX).write_text(text, encoding="utf-8")


def write_safetensors(path: Path, stream: Streamed) -> None:
    """A safetensors file (the layout `safetensors.torch.save_file` writes, metadata {"format": "pt"}) written one
    tensor at a time: the header first, from the entries, then each tensor as it arrives."""
    codes = {dtype: code for code, dtype in DTYPES.items()}
    header, end = {}, 0
    for name, dtype, shape in stream.entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [end, end + size]}
        end += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for (name, dtype, shape), tensor in zip(stream.entries, stream.tensors, strict=True):
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} came as {tensor.dtype} {list(tensor.shape)}")
            f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


def optimizer_state(path: Path, saved: dict) -> dict:
    """The optimizer state of the checkpoint at `path` for `optimizer.load_state_dict`: state.pt's entry `saved`,
    with the tensors of optimizer.safetensors when a sharded model wrote it."""
    if not (path / OPTIMIZER).exists():
        return saved
    state = {int(i): dict(values) for i, values in saved["state"].items()}
    for name, tensor in load_file(path / OPTIMIZER).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor
    return {**saved, "state": state}


# ---------------------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


REFERENCE = "reference.safetensors"  # TR-DPO's updated reference, when it has drifted from the loaded model


def _quantized(model) -> bool:
    """A model loaded 4/8-bit (bitsandbytes): its frozen base holds packed weights and quantization state."""
    return getattr(model, "is_quantized", False) or getattr(getattr(model, "base_model", None), "is_quantized", False)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save(
    run_dir: Path, step: int, model, optimizer, scheduler, reference=None, states: ShardedStates | None = None
) -> Path:
    """`states`: a sharded model's (`fsdp.checkpoint_states`), written as it is gathered. A quantized base (QLoRA)
    is frozen and is read again from its folder on resume, exactly: only the trainable (adapter) tensors are
    written."""

    def fill(tmp: Path) -> None:
        if states is None and _quantized(model):
            save_file(_trainable(model), str(tmp / WEIGHTS))
        elif states is None:
            save_model(model, str(tmp / WEIGHTS))  # handles tied embeddings
        else:
            write_safetensors(tmp / WEIGHTS, states.model)
            write_safetensors(tmp / OPTIMIZER, states.optimizer)
        if reference is not None:
            save_model(reference, str(tmp / REFERENCE))
        torch.save(
            {
                "optimizer": optimizer.state_dict() if states is None else states.optimizer_rest,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "step": step,
            },
            tmp / "state.pt",
        )

    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    write_atomically(final, fill)
    return final


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (the newest is written before older ones go)."""
    done = complete_checkpoints(run_dir)
    removed = done[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed


def load(path: Path, model, optimizer, scheduler, reference=None, load_states=None) -> int:
    """Restore everything saved by `save` and return the step it was taken at. `reference` is restored when the
    checkpoint holds one (else it stays as loaded: it had not drifted yet). `load_states(path, optimizer_state)`:
    how a sharded model reads its rows of the files (`fsdp.load_checkpoint`; state.pt is then memory-mapped, so
    its tensors are read only where that process's rows lie); None: loaded here."""
    # weights_only: even our own files are loaded without executing pickled code
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu", mmap=load_states is not None)
    if load_states is not None:
        load_states(path, state["optimizer"])
    elif _quantized(model):
        _load_trainable(model, path / WEIGHTS)
        optimizer.load_state_dict(optimizer_state(path, state["optimizer"]))
    else:
        load_model(model, str(path / WEIGHTS), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(optimizer_state(path, state["optimizer"]))
    if reference is not None and (path / REFERENCE).exists():
        load_model(reference, str(path / REFERENCE), device=str(next(reference.parameters()).device))
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])


def _load_trainable(model, file: Path) -> None:
    """The trainable tensors `save` wrote for a quantized base; exactly those, or a ValueError."""
    saved = load_file(file, device=str(next(model.parameters()).device))
    expected = set(_trainable(model))
    if set(saved) != expected:
        raise ValueError(
            f"{file}: holds {len(saved)} tensors, the model trains {len(expected)} "
            f"(e.g. {sorted(set(saved) ^ expected)[:1]})"
        )
    model.load_state_dict(saved, strict=False)


def save_final(run_dir: Path, policy, tokenizer, cfg, state: ModelFiles | dict | None = None) -> Path:
    """final/: the model, or with LoRA the adapter (PeftModel.from_pretrained loads it onto its base); with
    --merge also final-merged/, the base with the adapter merged in (a plain model folder). Tokenizer and model card
    (README.md, see modelcard.py) in both.
    `state`: a sharded model's weights (`fsdp.final_weights`): files written as they are gathered, or the whole
    state dict gathered on rank 0."""
    final = run_dir / FINAL
    adapter = lora.enabled(cfg)

    def fill(tmp: Path) -> None:
        if adapter:
            lora.save_adapter(policy, tmp, cfg)
        elif isinstance(state, ModelFiles):
            policy.save_pretrained(tmp, safe_serialization=True, state_dict={})  # config files only
            state.write(tmp)
        else:
            policy.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(tmp)
        # Last: peft's save_pretrained writes a template README.md of its own. In `fill`, so that final/ appears
        # complete; metrics.jsonl, audit.json, eval.json and launch.json are written by then.
        (tmp / CARD).write_text(model_card_text(run_dir, adapter), encoding="utf-8")

    write_atomically(final, fill)
    if adapter and cfg.merge:  # after final/: merging changes the policy in place

        def fill_merged(tmp: Path) -> None:
            lora.merge(policy, cfg).save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / CARD).write_text(model_card_text(run_dir, False, merged=True), encoding="utf-8")

        write_atomically(run_dir / FINAL_MERGED, fill_merged)
    return final

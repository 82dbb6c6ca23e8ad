"""Checkpoints that are written atomically and resume exactly.

A checkpoint is a folder `checkpoints/step-00000012/` holding the model weights (safetensors), the optimizer
and scheduler state, the RNG states and the step number; the data position follows from the step (see
`train.step_pairs`). It is written under a temporary name and renamed when complete, so a kill at any moment
leaves either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from preftune import lora
from preftune.files import fsync, fsync_tree, give_default_modes
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


def save(run_dir: Path, step: int, model, optimizer, scheduler, reference=None, states=None) -> Path:
    """`states`: (model state, optimizer state) gathered whole from a sharded model (`fsdp.full_states`) to be
    written in the same files as an unsharded model's. A quantized base (QLoRA) is frozen and is read again from
    its folder on resume, exactly: only the trainable (adapter) tensors are written."""

    def fill(tmp: Path) -> None:
        if states is None and _quantized(model):
            save_file(_trainable(model), str(tmp / "model.safetensors"))
        elif states is None:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        else:
            save_file({k: v.contiguous() for k, v in states[0].items()}, str(tmp / "model.safetensors"))
        if reference is not None:
            save_model(reference, str(tmp / REFERENCE))
        torch.save(
            {
                "optimizer": optimizer.state_dict() if states is None else states[1],
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
    checkpoint holds one (else it stays as loaded: it had not drifted yet). `load_states(model_state,
    optimizer_state)`: how a sharded model takes the whole saved states (`fsdp.load_full_states`: every process
    reads the whole files and keeps its shard); None: loaded here."""
    # weights_only: even our own files are loaded without executing pickled code
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    if load_states is not None:
        load_states(load_file(path / "model.safetensors"), state["optimizer"])
    elif _quantized(model):
        _load_trainable(model, path / "model.safetensors")
        optimizer.load_state_dict(state["optimizer"])
    else:
        load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
        optimizer.load_state_dict(state["optimizer"])
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


def save_final(run_dir: Path, policy, tokenizer, cfg, state: dict | None = None) -> Path:
    """final/: the model, or with LoRA the adapter (PeftModel.from_pretrained loads it onto its base); with
    --merge also final-merged/, the base with the adapter merged in (a plain model folder). Tokenizer and model card
    (README.md, see modelcard.py) in both.
    `state`: the whole model's state dict, gathered from --fsdp's shards."""
    final = run_dir / FINAL
    adapter = lora.enabled(cfg)

    def fill(tmp: Path) -> None:
        if adapter:
            lora.save_adapter(policy, tmp, cfg)
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

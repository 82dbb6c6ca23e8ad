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
from safetensors.torch import load_model, save_model

CHECKPOINTS = "checkpoints"


def fsync(path: Path) -> None:
    """Flush a file or folder to disk (a folder: so that a rename in it survives a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        fsync(f)
    fsync(path)


def write_atomically(final: Path, fill) -> None:
    """Call `fill(tmp_dir)` to write a folder, then move it to `final` in one rename."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        _fsync_tree(tmp)
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


def save(run_dir: Path, step: int, model, optimizer, scheduler, reference=None) -> Path:
    def fill(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
        if reference is not None:
            save_model(reference, str(tmp / REFERENCE))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_state(), "step": step}, tmp / "state.pt")

    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    write_atomically(final, fill)
    return final


def complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted write are ignored)."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and not p.name.endswith(".tmp"))


def latest(run_dir: Path) -> Path | None:
    done = complete(run_dir)
    return done[-1] if done else None


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (the newest is written before older ones go)."""
    done = complete(run_dir)
    removed = done[:-keep] if keep > 0 else []
    for path in removed:
        shutil.rmtree(path)
    return removed


def load(path: Path, model, optimizer, scheduler, reference=None) -> int:
    """Restore everything saved by `save` and return the step it was taken at. `reference` is restored when the
    checkpoint holds one (else it stays as loaded: it had not drifted yet)."""
    load_model(model, str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    if reference is not None and (path / REFERENCE).exists():
        load_model(reference, str(path / REFERENCE), device=str(next(reference.parameters()).device))
    # weights_only: even our own files are loaded without executing pickled code
    state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(state["step"])

"""Reference log-probs computed once per example, ever: cached on disk under a hash of everything they depend on.

The reference model is frozen, so log π_ref(y|x) of a pair never changes. One no-grad pass stores them as an
[N, 2] float32 .npy file (column 0 chosen, column 1 rejected, row i = dataset position i), memory-mapped, so
epochs, resumed runs and β sweeps read them back instead of running the reference, and the reference model can
be freed. The file name is `cache_key(...)`: a hash of the weights, the exact token ids of every pair (they
capture the data, tokenizer and truncation), the compute dtype and any extra options, e.g.

    key = cache_key(weights=weights_digest(ref), pairs=pairs, dtype="float32")
    ref_logps, hit = load_or_compute(default_cache_dir(), key, lambda out: compute(ref, pairs, ..., out=out))
    ref_chosen, ref_rejected = ref_logps.lookup(batch.index, device)        # [B], [B]

A file only ever appears complete: rows are written to a temporary file that is renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import LongTensor, Tensor
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from preftune import distributed
from preftune.data.tokenize import TokenizedPair
from preftune.device import autocast
from preftune.files import fsync

log = logging.getLogger("preftune")

FORMAT_VERSION = 1  # bump when what is hashed or stored changes meaning: old files then simply stop matching


# ---------------------------------------------------------------------------------------------------- keys


def _tensor_bytes(tensor: Tensor) -> memoryview:
    """The raw bytes of a tensor of any dtype (bf16 and fp8 included: numpy has no such types, so view as uint8)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _frame(hasher, data: bytes | memoryview) -> None:
    """Length-prefixed update: fields can never run into each other ([1, 2] + [3] ≠ [1] + [2, 3])."""
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)


def weights_digest(model: torch.nn.Module) -> str:
    """blake2b hex digest of the state dict: sorted names, dtype, shape and raw bytes of each tensor.

    A tensor tied to an earlier one (e.g. lm_head.weight = embed_tokens.weight) is recorded by name as an alias,
    not hashed twice. Non-persistent buffers (e.g. rotary inv_freq) are not in the state dict: they come from the
    config, which the caller adds to `cache_key(extra=...)` if it may differ for the same weights.
    """
    hasher = hashlib.blake2b(digest_size=32)
    seen: dict[tuple | int, str] = {}
    state = model.state_dict()
    if any(isinstance(t, DTensor) for t in state.values()):
        state = model.state_dict(keep_vars=True)  # --fsdp: tied names hold one parameter; each is gathered in turn
    for name, tensor in sorted(state.items()):
        _frame(hasher, name.encode())
        sharded = isinstance(tensor, DTensor)
        identity = (
            id(tensor)
            if sharded
            else (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        )
        if identity in seen:
            _frame(hasher, f"tied to {seen[identity]}".encode())
            continue
        seen[identity] = name
        _frame(hasher, f"{tensor.dtype} {tuple(tensor.shape)}".encode())
        _frame(hasher, _tensor_bytes(tensor.detach().full_tensor() if sharded else tensor))
    return hasher.hexdigest()


def cache_key(*, weights: str, pairs: list[TokenizedPair], dtype: str, extra: dict | None = None) -> str:
    """Hex digest naming the cached log-probs of `pairs` in this order under weights `weights` and `dtype`.

    `extra` holds any other option that changes the reference log-probs (json with sorted keys, so key order
    does not matter). `where` is not hashed: the same ids from another file give the same log-probs.
    """
    hasher = hashlib.blake2b(digest_size=32)
    header = {"format": FORMAT_VERSION, "weights": weights, "dtype": dtype, "extra": extra or {}, "pairs": len(pairs)}
    _frame(hasher, json.dumps(header, sort_keys=True).encode())
    for pair in pairs:
        for ids in (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids):
            _frame(hasher, np.asarray(ids, dtype=np.int64).tobytes())
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------------- the file


class RefLogps:
    """Reference log-probs of a dataset: an [N, 2] float32 array (chosen, rejected) on disk, memory-mapped.

    Opening checks the file (readable .npy, [N, 2] float32 with N = `num_pairs` when given, every value finite)
    and raises ValueError otherwise.
    """

    def __init__(self, path: Path, num_pairs: int | None = None):
        self.path = Path(path)
        try:
            array = np.load(self.path, mmap_mode="r")  # a truncated file fails here: its data is shorter than mapped
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{self.path}: not a readable .npy file ({e})") from None
        if array.dtype != np.float32 or array.ndim != 2 or array.shape[1] != 2:
            raise ValueError(f"{self.path}: expected an [N, 2] float32 array, got {array.dtype} {array.shape}")
        if num_pairs is not None and array.shape[0] != num_pairs:
            raise ValueError(f"{self.path}: {array.shape[0]} rows, expected {num_pairs}")
        if not np.isfinite(array).all():  # compute never writes a non-finite value, so this is damage
            raise ValueError(f"{self.path}: holds non-finite values")
        self.array = array

    def __len__(self) -> int:
        return self.array.shape[0]

    def lookup(self, index: LongTensor, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Rows at dataset positions `index` [B] → (ref_chosen_logps [B], ref_rejected_logps [B]), float32 on
        `device`."""
        positions = index.detach().to("cpu").numpy()
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            # numpy would wrap a negative index silently and pair a batch with another pair's log-probs
            raise IndexError(f"{self.path}: index out of range 0..{len(self) - 1}: {positions.tolist()}")
        rows = torch.from_numpy(self.array[positions]).to(device)  # fancy indexing reads only these rows
        return rows[:, 0], rows[:, 1]


# ---------------------------------------------------------------------------------------------------- compute


def sorted_order(pairs: list[TokenizedPair]) -> list[int]:
    """Dataset positions, longest padded row first: similar lengths share a batch (less padding), and an
    out-of-memory error shows up in the first batch rather than near the end."""

    def row_length(i: int) -> int:
        return len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids))

    return sorted(range(len(pairs)), key=row_length, reverse=True)


@torch.no_grad()
def _fill(
    array: np.ndarray,
    model,
    pairs,
    order,
    *,
    batch_size,
    logps_fn,
    collate_fn,
    device,
    dtype,
    progress,
    ches_array: np.ndarray | None = None,
):
    """Write the [N, 2] rows of `array` (and of `ches_array`, when given) batch by batch, at their dataset
    positions."""
    with tqdm(total=len(pairs), desc="reference", unit="pair", disable=not progress) as bar, autocast(device, dtype):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = collate_fn([pairs[i] for i in chunk], chunk).to(device)
            result = logps_fn(model, batch)
            array[chunk] = _finite_rows(result[0], result[1], pairs, chunk, "log-prob")
            if ches_array is not None:
                ches_array[chunk] = _finite_rows(result.ches, result.ches_norm, pairs, chunk, "CHES score")
            bar.update(len(chunk))


def _finite_rows(first: Tensor, second: Tensor, pairs, chunk: list[int], what: str) -> np.ndarray:
    """[B, 2] float32 rows of two [B] columns; ValueError naming the first pair with a non-finite value."""
    rows = torch.stack([first, second], dim=1).float().cpu().numpy()
    bad = ~np.isfinite(rows).all(axis=1)
    if bad.any():
        where = pairs[chunk[int(bad.argmax())]].where
        raise ValueError(f"{where}: the reference model gives a non-finite {what} {rows[bad][0].tolist()}")
    return rows


def compute(
    model: torch.nn.Module,
    pairs: list[TokenizedPair],
    *,
    batch_size: int,
    logps_fn: Callable,
    collate_fn: Callable,
    device: torch.device | str,
    dtype: str,
    out: Path,
    progress: bool = True,
    ches_out: Path | None = None,
) -> RefLogps:
    """One no-grad, eval-mode pass of `model` over `pairs` → RefLogps at `out`, row i = pairs[i].

    logps_fn(model, batch) → (chosen [B], rejected [B], chosen_lengths [B], rejected_lengths [B]) as
    `preftune.logps.padded_logps`; collate_fn(pairs, indices) → a batch with `.to(device)`. Rows go straight to
    a memory-mapped temporary file (N need not fit in memory), which is flushed, fsynced and renamed to `out`:
    an interrupted pass leaves no file at `out`.

    With `ches_out`, the same batches of the same pass also give each pair's likelihood-displacement scores:
    logps_fn must then return fields `ches` and `ches_norm` too ([B] each; `preftune.ches.logps_and_ches` does,
    from the one forward that gives the log-probs), written as an [N, 2] float32 .npy at `ches_out` (column 0
    CHES, 1 length-normalised CHES; `RefLogps(ches_out)` reads and checks it). It is renamed into place before
    `out`, so a log-probs file written with `ches_out` always has its CHES file; `out` is byte for byte the
    file written without `ches_out`.
    """
    if not pairs:
        raise ValueError("no pairs to compute reference log-probs for")
    targets = [Path(out)] + ([Path(ches_out)] if ches_out is not None else [])
    # per process: two ranks never write one file
    tmps = [target.with_name(f"{target.name}.{os.getpid()}.tmp") for target in targets]
    was_training = model.training
    model.eval()
    try:
        arrays = [np.lib.format.open_memmap(t, mode="w+", dtype=np.float32, shape=(len(pairs), 2)) for t in tmps]
        _fill(
            arrays[0],
            model,
            pairs,
            sorted_order(pairs),
            batch_size=batch_size,
            logps_fn=logps_fn,
            collate_fn=collate_fn,
            device=torch.device(device),
            dtype=dtype,
            progress=progress,
            ches_array=arrays[1] if ches_out is not None else None,
        )
        for array in arrays:
            array.flush()
        del arrays, array
        for tmp, target in reversed(list(zip(tmps, targets))):  # the CHES file first (see above)
            _publish(tmp, target)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        model.train(was_training)
    return RefLogps(targets[0], len(pairs))


def _publish(tmp: Path, target: Path) -> None:
    """fsync the complete file `tmp` and rename it to `target`, durably."""
    fsync(tmp)
    os.replace(tmp, target)
    if os.name == "posix":
        fsync(target.parent)  # make the rename itself durable


def load_or_compute(
    cache_dir: Path, key: str, compute_fn: Callable[[Path], RefLogps], num_pairs: int | None = None
) -> tuple[RefLogps, bool]:
    """(RefLogps of cache_dir/<key>.npy, True) if that file is complete and valid, else
    (compute_fn(that path), False). A damaged file is logged and recomputed, never used."""
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.npy"
    if path.exists():
        try:
            return RefLogps(path, num_pairs), True
        except ValueError as e:
            log.warning("reference log-probs: ignoring a damaged cache file, recomputing (%s)", e)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return compute_fn(path), False


def load_or_compute_sharded(path: Path, pairs: list[TokenizedPair], batch_size: int, compute, pad=None):
    """`load_or_compute` for several processes: all of them reuse the file, or all compute it together.

    Process r runs batches r, r + P, r + 2P, ... of the one-process pass (P processes; the same batches, so the
    same values), the [N, 2] rows are summed over the processes (a row is non-zero on one process only, so the sum
    is exact) and one file is written: byte for byte the file of one process with the same --batch-size.
    `pad(k)`: run k more passes whose results are dropped, called with the batches this process has fewer than
    rank 0 (a sharded model's passes are collectives: every process runs as many).
    """
    try:
        found = RefLogps(path, len(pairs)) if path.exists() else None
    except ValueError as e:
        log.warning("reference log-probs: ignoring a damaged cache file, recomputing (%s)", e)
        found = None
    if distributed.all_true(found is not None):  # a file that appeared meanwhile must not split the processes
        return found, True
    me = distributed.world()
    order = sorted_order(pairs)  # the one-process pass's batches, longest first
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    # Still longest first, so `compute`, which sorts its pairs the same (stable) way, forms exactly these batches.
    mine = [i for batch in batches[me.rank :: me.size] for i in batch]
    rows = torch.zeros(len(pairs), 2)
    if mine:
        with tempfile.TemporaryDirectory(prefix="preftune-ref-") as tmp:
            part = compute([pairs[i] for i in mine], Path(tmp) / "part.npy", progress=me.is_main)
            rows[mine] = torch.from_numpy(np.array(part.array))
    if pad is not None:
        pad(len(batches[:: me.size]) - len(batches[me.rank :: me.size]))
    distributed.all_reduce_sum(rows)
    if me.local_rank == 0:  # one writer per machine: the cache folder may be local to each
        write_rows(rows.numpy(), path)
    distributed.barrier()
    return RefLogps(path, len(pairs)), False


def write_rows(rows: np.ndarray, path: Path) -> None:
    """[N, 2] float32 rows as a refcache .npy file, written under a temporary name and renamed when complete."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def default_cache_dir() -> Path:
    """$PREFTUNE_CACHE, else $XDG_CACHE_HOME/preftune/reference, else ~/.cache/preftune/reference."""
    if os.environ.get("PREFTUNE_CACHE"):
        return Path(os.environ["PREFTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "preftune" / "reference"

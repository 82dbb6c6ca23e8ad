"""Many processes, one recipe: data parallelism with torch.distributed, launched by `torchrun`.

`torchrun --nproc-per-node N -m preftune train ...` starts N copies of the same command with RANK, WORLD_SIZE
and LOCAL_RANK set. Every process holds the whole model and every pair; an optimizer step's pairs are split
between the processes (`share`), each runs forward and backward on its share, then `sum_gradients` adds the
gradients up so that every replica takes the same update. Each share's loss is already divided by the whole
step's pair (or token) count, so the sum is exactly the one-process gradient:

    step pairs [p0 … p7], 2 processes:  rank 0 → ∇ Σ_{p0..p3} ℓ / 8,  rank 1 → ∇ Σ_{p4..p7} ℓ / 8,  sum → ∇ Σ ℓ / 8

Without torchrun (no WORLD_SIZE, or 1) nothing here communicates and every helper is a no-op, so a single
process runs exactly the code it ran before this module existed.

Only rank 0 writes files and logs progress (`on_main`); the other ranks log warnings and errors only. Small
control messages (a write failed, which parameters have gradients, metric names) go through a CPU group on
gloo; tensors go through the default group, gloo for CPU tensors and NCCL for CUDA tensors.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from preftune.errors import UserError

log = logging.getLogger("preftune")
T = TypeVar("T")

BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32 per all_reduce: few large calls, a bounded extra copy
ERROR_WAIT = timedelta(seconds=60)  # how long a failing rank waits for the others before it speaks for itself

_control: dist.ProcessGroup | None = None  # the CPU (gloo) group for control messages, set by `init`


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run: rank 0 … size − 1, and its rank on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The current world: one process (rank 0 of 1) unless `init` joined a process group."""
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init() -> World:
    """Join the process group that torchrun's environment describes (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Gloo carries CPU tensors and, where CUDA exists, NCCL carries CUDA tensors (each process on cuda:LOCAL_RANK).
    One process (no torchrun, or --nproc-per-node 1) joins nothing.
    """
    global _control
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or dist.is_initialized():
        return world()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local_rank < torch.cuda.device_count():  # too few GPUs is reported by `local_device`, as a UserError
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group(backend="gloo")
    _control = dist.new_group(backend="gloo")
    if dist.get_rank() != 0:
        log.setLevel(logging.WARNING)  # one progress log, from rank 0; warnings and errors from every rank
    return world()


def teardown() -> None:
    """Leave the process group that `init` joined (one joined by the caller is left alone)."""
    global _control
    if _control is not None and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def launched(command: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a command run by every process: join the process group first, leave it at the end.

    A UserError reaches the user once. Errors are raised identically on every rank (validation runs everywhere
    before anything is exchanged; a rank-0 write failure is shared by `on_main`), so rank 0 prints the line, every
    rank waits for that, and all exit with status 2 (SystemExit: a rank that left early would get rank 0 killed
    by torchrun before it printed). One process raises the UserError as usual, for the CLI to print.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        me = init()
        try:
            return command(*args, **kwargs)
        except UserError as e:
            if me.size == 1:
                raise
            _report_once(e, me)
            raise SystemExit(2) from None
        finally:
            teardown()

    return run


def _report_once(error: UserError, me: World) -> None:
    if me.is_main:
        print(f"preftune: error: {error}", file=sys.stderr, flush=True)  # the CLI's format
    try:
        dist.monitored_barrier(group=_control, timeout=ERROR_WAIT, wait_all_ranks=True)
    except RuntimeError:  # some rank did not fail with us: nobody else will report this one
        if not me.is_main:
            print(f"preftune: error (rank {me.rank}): {error}", file=sys.stderr, flush=True)


def local_device(device: torch.device) -> torch.device:
    """The device of this process: with several processes a CUDA device is cuda:LOCAL_RANK, one GPU each."""
    me = world()
    if me.size == 1 or device.type != "cuda":
        return device
    if device.index is not None:
        raise UserError(
            f"--device {device}: with {me.size} processes each one uses cuda:LOCAL_RANK; pass --device cuda (or auto)"
        )
    # Every process of a machine sees the same counts: all of them stop here together, or none does.
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", me.size))
    if per_machine > torch.cuda.device_count():
        raise UserError(
            f"--device cuda: {per_machine} processes on this machine but only "
            f"{torch.cuda.device_count()} CUDA devices; start one process per GPU"
        )
    return torch.device("cuda", me.local_rank)


# ---------------------------------------------------------------------------------------------------- data


def share(items: list[T], rank: int, size: int, unit: int = 1) -> list[T]:
    """Rank `rank`'s contiguous part of `items` when `size` ranks split them; parts differ by at most one
    item, the first ones larger: share([a, b, c, d, e], r, 2) → [a, b, c] for r = 0, [d, e] for r = 1.
    A rank gets nothing only when there are fewer items than ranks; rank 0 always gets one if any exist.
    With `unit` > 1 the items are split in whole runs of `unit` (a grouped loss's groups, see data/groups.py):
    share([a, b, c, d, e, f], r, 2, unit=2) → [a, b, c, d] for r = 0, [e, f] for r = 1."""
    base, extra = divmod(len(items) // unit, size)
    start = rank * base + min(rank, extra)
    return items[start * unit : (start + base + (rank < extra)) * unit]


def missing_rounds(num_items: int, batch_size: int, done: int) -> int:
    """Micro-batches this process lacks in a step of `num_items` items over all processes, having run `done`: the
    largest share runs ⌈⌈num_items / size⌉ / batch_size⌉ of them. A collective inside each micro-batch (FSDP's
    gathers, KTO's KL estimate) needs every process, so the others run as many empty rounds as they lack."""
    largest_share = -(-num_items // world().size)
    return max(0, -(-largest_share // batch_size) - done)


# ---------------------------------------------------------------------------------------------------- reductions


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """tensor ← Σ over ranks, in place (gloo for a CPU tensor, NCCL for a CUDA one); returns it."""
    if world().size > 1:
        dist.all_reduce(tensor)
    return tensor


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    if world().size == 1:
        return flag
    value = torch.tensor([int(flag)])
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=_control)
    return bool(value.item())


def barrier() -> None:
    if world().size > 1:
        dist.barrier(group=_control)


def sum_scalars(sums: dict[str, torch.Tensor], device: torch.device, num_items: int) -> dict[str, torch.Tensor]:
    """Σ over ranks of each 0-d tensor in `sums`, as one all_reduce of the stacked vector (on `device`: no host
    sync). `num_items` items (pairs, or a grouped loss's groups) were shared out; with fewer items than ranks some
    rank has none and so no sums and no names: rank 0, which always has items, sends the names first."""
    size = world().size
    if size == 1:
        return sums
    names = list(sums)
    if num_items < size:
        box = [names]
        dist.broadcast_object_list(box, src=0, group=_control)
        names = box[0]
    zero = torch.zeros((), device=device)
    vector = torch.stack([sums.get(name, zero).float() for name in names])
    dist.all_reduce(vector)
    return dict(zip(names, vector.unbind()))


def sum_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """grad ← Σ over ranks for every trainable parameter, flattened into few large all_reduce calls.

    A parameter with a gradient on some rank but none here (a rank without pairs this step) counts as zeros here;
    one with a gradient on no rank keeps none, so AdamW skips it as it would in one process.
    """
    if world().size == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=_control)
    params = [p for p, has in zip(params, has_grad.tolist()) if has]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(params):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        for p, summed in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(summed.view_as(p.grad))


def _buckets(params: list[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive parameters of one device and dtype, up to BUCKET_ELEMENTS each (a bigger one alone)."""
    buckets: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        last = buckets[-1][-1] if buckets else None
        fits = last is not None and (last.device, last.grad.dtype) == (p.device, p.grad.dtype)
        if fits and size + p.numel() <= BUCKET_ELEMENTS:
            buckets[-1].append(p)
            size += p.numel()
        else:
            buckets.append([p])
            size = p.numel()
    return buckets


# ---------------------------------------------------------------------------------------------------- rank 0 writes


def on_main(write: Callable[..., T], *args, default: T | None = None) -> T | None:
    """Run `write(*args)` on rank 0 only (files, logs) and return its result there, `default` elsewhere.

    Every rank learns whether it failed: rank 0 raises its error, the others raise a UserError too (silenced by
    `launched`), instead of waiting forever in their next collective for a rank that has gone.
    """
    me = world()
    if me.size == 1:
        return write(*args)
    result, failure = default, None
    if me.is_main:
        try:
            result = write(*args)
        except BaseException as e:  # noqa: BLE001 (re-raised below, after the others know)
            failure = e
    failed = torch.tensor([int(failure is not None)])
    dist.broadcast(failed, src=0, group=_control)
    if failure is not None:
        raise failure
    if failed.item():
        raise UserError("rank 0 failed to write; it reports why")
    return result

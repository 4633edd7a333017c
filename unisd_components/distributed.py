"""Data-parallel training: what the trainer needs from ``torch.distributed``, and nothing when alone.

Each process (one per GPU) holds a full student and teacher, samples and scores its own share of every
global batch, and the processes average their gradients before each optimizer step, so the weights (and
an EMA teacher, which follows them) stay identical everywhere. The trainer calls these functions; they
are no-ops when no process group is initialised, so one code path serves one process and many.

Why not ``DistributedDataParallel``: the trainer calls the decoder and the LM head separately (logits at
completion positions only) and generates with ``model.generate``; DDP only synchronises gradients of
forwards that go through its own wrapper. One bucketed all-reduce after the backward passes does the same
job without constraining how the model is called.

Launch with accelerate (or torchrun) and call :func:`init_data_parallel` first::

    # accelerate launch --num_processes 8 train.py
    from unisd_components.distributed import init_data_parallel
    device = init_data_parallel()           # NCCL on GPUs, gloo on CPU (accelerate launch --cpu)
    model = model.to(device)
    train_variant(model, tok, examples, variant, training)   # batch_size is per process

Statistics that the method computes "over the batch" (the agreement weights' 0.95 quantile, the adaptive
clipping cap) are computed over each process's micro-batch, as under gradient accumulation. A process that
raises outside the loss checks (out of memory) leaves the others waiting until the process group's timeout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = [
    "all_reduce_gradients_",
    "broadcast_parameters_",
    "first_failure",
    "init_data_parallel",
    "main_process_first",
    "mean_metrics",
    "shard",
    "world",
]

# Elements per all-reduce bucket (fp32: 100 MiB): few calls, bounded extra memory.
_BUCKET_ELEMENTS = 25_000_000


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if not _active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def init_data_parallel() -> torch.device:
    """Join the process group a launcher (``accelerate launch``, ``torchrun``) described in the environment.

    Returns this process's device (``cuda:<local rank>``, or the CPU under ``accelerate launch --cpu``).
    A plain ``python script.py`` gets a group of one.
    """
    from accelerate import PartialState

    return PartialState().device


def broadcast_parameters_(params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values into every process (LoRA adapters are initialised at random per process)."""
    if not _active():
        return
    with torch.no_grad():
        for tensors in _buckets(list(params)):
            flat = torch.cat([t.detach().reshape(-1) for t in tensors])
            torch.distributed.broadcast(flat, src=0)
            _unflatten_into(flat, tensors)


def all_reduce_gradients_(params: Sequence[nn.Parameter]) -> None:
    """Replace every gradient by its mean over the processes (a missing gradient counts as zeros)."""
    if not _active():
        return
    size = torch.distributed.get_world_size()
    for bucket in _buckets(list(params)):
        for p in bucket:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        torch.distributed.all_reduce(flat)
        flat /= size
        _unflatten_into(flat, [p.grad for p in bucket])


def mean_metrics(row: dict[str, float], sum_keys: Sequence[str] = ()) -> dict[str, float]:
    """The metrics averaged over the processes (``sum_keys`` summed), identical on every process."""
    if not _active():
        return dict(row)
    rows: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, row)
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        values = [float(r[key]) for r in rows if key in r]
        out[key] = sum(values) if key in sum_keys else sum(values) / len(values)
    return out


def first_failure(error: BaseException | None) -> tuple[int, BaseException] | None:
    """Every process learns whether any failed: ``(rank, error)`` of the first one, else ``None``.

    Lets all processes stop together on a loss check instead of leaving the healthy ones blocked in the
    next all-reduce.
    """
    if not _active():
        return None if error is None else (0, error)
    errors: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, None if error is None else repr(error))
    for rank, message in enumerate(errors):
        if message is not None:
            return rank, error if rank == torch.distributed.get_rank() else RuntimeError(message)
    return None


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (writing shared caches), the others after it (reading them)."""
    rank, size = world()
    if size > 1 and rank != 0:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if size > 1 and rank == 0:
            torch.distributed.barrier()


def shard(batch: list, rank: int, size: int) -> list:
    """This process's share of a global batch: every ``size``-th item from ``rank``.

    A global batch shorter than ``size`` (the last one of an epoch) is filled by cycling, so every process
    gets at least one example and the collective calls stay matched.
    """
    if size == 1:
        return batch
    if not batch:
        raise ValueError("cannot shard an empty batch")
    filled = [batch[i % len(batch)] for i in range(max(len(batch), size))]
    return filled[rank::size]


def _buckets(tensors: list[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of same dtype and device of about ``_BUCKET_ELEMENTS`` elements."""
    bucket: list[torch.Tensor] = []
    count = 0
    for t in tensors:
        if bucket and (
            count + t.numel() > _BUCKET_ELEMENTS or (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)
        ):
            yield bucket
            bucket, count = [], 0
        bucket.append(t)
        count += t.numel()
    if bucket:
        yield bucket


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()

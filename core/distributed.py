"""torchrun support: the same code runs as one process or as N ranks (docs/SCALING.md). A leaf module.

Launched by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` in the environment), :func:`init` joins the process group: NCCL
with one GPU per rank (``LOCAL_RANK``) on CUDA, gloo on CPU. Every helper here is a no-op in a single process,
so callers never branch on it. Work is split by rank with :meth:`World.shard` (every size-th item, so that
each rank gets a like mix), and rank 0 alone writes the run store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")
TIMEOUT_ENV = "WBC_DIST_TIMEOUT_S"  # a collective waits this long for a rank that stopped answering


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        """The rank that writes the store, logs and reports progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """In a torchrun process group (also of one rank: ``--nproc-per-node 1`` runs the DDP path on one GPU)."""
        return self.backend is not None

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share: items rank, rank + size, ... (interleaved, so every rank gets a like mix)."""
        return items[self.rank::self.size]


_WORLD = World()


def world() -> World:
    return _WORLD


def launched() -> bool:
    """True in a process started by torchrun (which sets WORLD_SIZE and RANK for every rank)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str) -> World:
    """Join torchrun's process group (once); single-process: the 1-rank world. ``device``: "cuda" | "cpu"."""
    global _WORLD
    if not launched() or _WORLD.active:
        return _WORLD
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(local)
        timeout = timedelta(seconds=_timeout_s())
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    _WORLD = World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, backend=dist.get_backend())
    return _WORLD


def _timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: give the seconds a collective may wait for a silent rank, e.g. 1800")
    return value


def shutdown() -> None:
    global _WORLD
    if _WORLD.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = World()


def describe(device: torch.device) -> dict:
    """World size, backend and every rank's device, for run.json (a collective: every rank calls it)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mine = {"rank": _WORLD.rank, "host": os.uname().nodename, "device": str(device), "name": name}
    return {"world_size": _WORLD.size, "backend": _WORLD.backend, "ranks": all_gather_object(mine)}


def barrier() -> None:
    if _WORLD.active:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not _WORLD.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    if not _WORLD.active:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * _WORLD.size
    dist.all_gather_object(out, obj)
    return out


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks, in place (``t`` on the backend's device: CUDA for NCCL)."""
    if _WORLD.active:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def unshard(parts: list, n: int):
    """Put back together what :meth:`World.shard` split: ``parts[r]`` holds items r, r + size, ..."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if isinstance(first, torch.Tensor):
        out = first.new_empty((n, *first.shape[1:]))
    else:
        out = np.empty((n, *np.asarray(first).shape[1:]), dtype=np.asarray(first).dtype)
    for r, p in enumerate(parts):
        if len(p):  # a rank with no share (fewer items than ranks) sent nothing
            out[r::len(parts)] = p
    return out


def gather_shards(local, n: int):
    """Every rank's shard (of an ``n``-row array or tensor split by :meth:`World.shard`), whole, on every rank."""
    if not _WORLD.active:
        return local
    if isinstance(local, torch.Tensor):
        return unshard(_all_gather_tensor(local, n), n)
    return unshard(all_gather_object(local), n)


def _all_gather_tensor(local: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Tensor all-gather (no pickling: decoded image sets are large). NCCL needs the tensors on the GPU."""
    import torch.distributed as dist

    rows = -(-n // _WORLD.size)  # the first shards are one row longer when n is not a multiple
    comm = torch.device("cuda") if _WORLD.backend == "nccl" else torch.device("cpu")
    buf = local.new_zeros((rows, *local.shape[1:]), device=comm)
    buf[: len(local)] = local.to(comm)
    out = [torch.empty_like(buf) for _ in range(_WORLD.size)]
    dist.all_gather(out, buf)
    return [o[: len(range(r, n, _WORLD.size))].to(local.device) for r, o in enumerate(out)]

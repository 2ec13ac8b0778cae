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

    def mine(self, n: int) -> np.ndarray:
        """Which of ``n`` items :meth:`shard` gives this rank: bool (n,)."""
        return np.arange(n) % self.size == self.rank


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


@dataclass
class Held:
    """The rows of an N-row image set that this rank holds in memory: ``x`` is the rows where ``mine`` is True,
    in order (one process: all of them). Under torchrun each rank decodes and keeps only its own images, so
    the uint8 set is split across the ranks, not copied to each."""

    x: torch.Tensor
    mine: np.ndarray  # bool (N,)

    def __post_init__(self):
        self.mine = np.asarray(self.mine, dtype=bool)
        self._local = np.cumsum(self.mine) - 1  # global row -> row of x (where mine)

    def __len__(self) -> int:
        return len(self.mine)

    @classmethod
    def split(cls, x: torch.Tensor, world: World) -> "Held":
        """A whole set held by every rank -> this rank's share (:meth:`World.shard`'s rows)."""
        return cls(world.shard(x), world.mine(len(x)))

    def subset(self, pos: np.ndarray) -> "Held":
        """The rows at global positions ``pos``, as a set of their own (what this rank holds of them)."""
        pos = np.asarray(pos, dtype=np.int64)
        mine = self.mine[pos]
        return Held(self.x[torch.from_numpy(self._local[pos[mine]])], mine)

    def take(self, gidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Of the global rows ``gidx``: the positions (in ``gidx``) of the ones held here, and their images."""
        g = gidx.numpy()
        pos = np.nonzero(self.mine[g])[0]
        return torch.from_numpy(pos), self.x[torch.from_numpy(self._local[g[pos]])]


def gather_rows(local, mine: np.ndarray):
    """Every rank's values for the rows it holds (``mine``, see :class:`Held`), as one array in global order."""
    if not _WORLD.active:
        return local
    parts = all_gather_object((np.nonzero(mine)[0], np.asarray(local)))
    first = next((v for _, v in parts if len(v)), np.asarray(local))
    out = np.zeros((len(mine), *first.shape[1:]), dtype=first.dtype)
    for pos, vals in parts:
        if len(pos):
            out[pos] = vals
    return out

"""Data-parallel training on PyTorch's own engine: torchrun, process groups, sharding, reductions.

A run becomes distributed when it is started by ``torchrun`` (or ``python -m
torch.distributed.run``), which sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in every worker; ``hybridcls train --nproc N`` starts torchrun
itself (:func:`launch`). Nothing here is a launcher or a communication layer
of its own: ``torch.distributed.run`` starts and watches the workers,
``torch.distributed`` (gloo on the CPU, NCCL on CUDA) moves the numbers and
``DistributedDataParallel`` averages the gradients (see ``Trainer``).

What is ours is the glue a training run needs around them:

* :func:`process_group` joins (and leaves, through :mod:`hybridcls.torchrun`) the
  group the environment describes, each worker on its GPU (``cuda:LOCAL_RANK``);
* :class:`DistributedBalancedSampler` gives each rank its disjoint share of the
  very draw :class:`~hybridcls.train.data.BalancedSampler` makes for one process;
* :func:`reduce_sums` / :func:`gather_dicts` / :func:`broadcast_object` turn
  per-rank counts into run-wide metrics that every rank agrees on.

Without a process group every helper is the identity, so a one-process run
computes exactly what it did before distributed training existed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hybridcls.device import resolve_device
from hybridcls.errors import InputError, ParameterError
from hybridcls.torchrun import torchrun_group, torchrun_local_rank, torchrun_world
from hybridcls.train.data import BalancedSampler

__all__ = [
    "DistContext",
    "DistributedBalancedSampler",
    "broadcast_object",
    "current",
    "gather_dicts",
    "launch",
    "process_group",
    "reduce_sums",
    "strip_nproc",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the run.

    Attributes:
        rank: Global rank (0 writes the files).
        world_size: Number of processes.
        local_rank: Rank on this machine (picks the GPU).
        device: This rank's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics and curves."""
        return self.rank == 0


def current(device: str | torch.device = "auto") -> DistContext:
    """The context of this process: the live process group's, or a single process on ``device``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        local_rank = torchrun_local_rank()
        return DistContext(
            dist.get_rank(), dist.get_world_size(), local_rank, _rank_device(device, local_rank)
        )
    return DistContext(device=resolve_device(device))


def _rank_device(device: str | torch.device, local_rank: int) -> torch.device:
    dev = resolve_device(device)
    # One GPU per worker: "cuda" / "auto" become this worker's GPU; an explicit
    # "cuda:K" is respected (the user placed the workers).
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


@contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[DistContext]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), for the block's duration.

    Gloo serves CPU workers, NCCL CUDA workers; each CUDA worker is pinned to
    ``cuda:LOCAL_RANK``. A group that already exists (the caller's own
    ``init_process_group``) is used as it is and left open; without
    ``WORLD_SIZE`` (or with 1) the block runs as a single process.

    Args:
        device: The ``--device`` value.

    Yields:
        This process's :class:`DistContext`.

    Raises:
        InputError: torchrun's variables are incomplete, or there are more CUDA
            workers on this machine than GPUs.

    Example:
        >>> with process_group("cpu") as ctx:  # no torchrun: one process
        ...     ctx.world_size, ctx.is_main
        (1, True)
    """
    # A group that exists already is the caller's: its environment is not ours to check.
    if dist.is_available() and dist.is_initialized():
        yield current(device)
        return
    # init_process_group reads the rendezvous (MASTER_*) from the environment too.
    world = torchrun_world(
        require=("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"),
        hint="start distributed training with torchrun (or `hybridcls train` with nproc=N)",
    )
    if world is None:
        yield current(device)
        return
    local_rank = world[2]
    dev = _rank_device(device, local_rank)
    if dev.type == "cuda":  # noqa: SIM102
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(
                f"worker {local_rank} wants {dev} but this machine has "
                f"{torch.cuda.device_count()} GPU(s); start one worker per GPU at most "
                f"(nproc={torch.cuda.device_count()}, or torchrun's nproc_per_node)"
            )
    with torchrun_group(dev):
        yield DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


class DistributedBalancedSampler(BalancedSampler):
    """This rank's share of :class:`~hybridcls.train.data.BalancedSampler`'s epoch draw.

    Every rank computes the same ``(seed, epoch)`` draw a single process would
    make and keeps positions ``rank, rank + N, rank + 2N, ...`` of it. With a
    per-rank batch of ``B / N`` images, the ``N`` ranks' ``k``-th batches
    together are exactly the single process's ``k``-th batch of ``B``. The draw
    is padded with its own first indices up to a multiple of ``N`` (at most
    ``N - 1`` repeats, as ``torch.utils.data.DistributedSampler`` does), so
    that every rank runs the same number of steps.

    Args:
        labels: Label of each dataset index.
        mode: One of ``"sampler"``, ``"oversample"``, ``"none"``.
        seed: Run seed.
        rank: This process's rank.
        world_size: Number of processes.

    Example:
        >>> shares = [DistributedBalancedSampler([0, 0, 0, 1], "none", 0, r, 2) for r in (0, 1)]
        >>> whole = BalancedSampler([0, 0, 0, 1], "none", 0)
        >>> sorted(list(shares[0]) + list(shares[1])) == sorted(whole)
        True
    """

    def __init__(
        self, labels: Sequence[int], mode: str, seed: int, rank: int, world_size: int
    ) -> None:
        super().__init__(labels, mode, seed)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        return math.ceil(super().__len__() / self.world_size)

    def __iter__(self) -> Iterator[int]:
        order = list(super().__iter__())
        padding = len(self) * self.world_size - len(order)
        order += order[:padding]
        return iter(order[self.rank :: self.world_size])


def _live() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_sums(values: Sequence[float], device: torch.device | None = None) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64); the values themselves alone.

    Every rank gets the same sums, so decisions taken from them agree.

    Example:
        >>> reduce_sums([1.5, 2])  # one process
        [1.5, 2]
    """
    if not _live():
        return list(values)
    backend_device = device if device is not None and device.type == "cuda" else None
    tensor = torch.tensor(list(values), dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def reduce_min(value: int, device: torch.device | None = None) -> int:
    """The smallest ``value`` over all ranks (``value`` itself in one process)."""
    if not _live():
        return value
    backend_device = device if device is not None and device.type == "cuda" else None
    tensor = torch.tensor([value], dtype=torch.int64, device=backend_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def gather_dicts(local: dict[str, T]) -> dict[str, T]:
    """The union of every rank's dict (lower ranks' values win); ``local`` alone in one process."""
    if not _live():
        return local
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict[str, T] = {}
    for part in parts:
        for key, value in part.items():
            merged.setdefault(key, value)
    return merged


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process)."""
    if not _live():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``: what each worker runs.

    Example:
        >>> strip_nproc(["train", "data", "--nproc", "2", "-o", "run"])
        ['train', 'data', '-o', 'run']
    """
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m hybridcls ARGV`` in ``nproc`` workers on this machine, through torchrun.

    The same as ``torchrun --standalone --nproc_per_node NPROC -m hybridcls ARGV``:
    ``torch.distributed.run`` starts the workers, gives them a rendezvous on a
    free local port and stops them all if one fails.

    Args:
        nproc: Workers (GPUs, or CPU processes).
        argv: The subcommand and its arguments, without ``--nproc``.

    Returns:
        0 when every worker succeeded, else the exit status of the first worker
        that failed (2 for an error in the input; each worker printed its own).

    Raises:
        InputError: ``nproc`` below 1, or already inside a torchrun worker.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ParameterError("nproc", nproc, "must be >= 1")
    if "WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
        raise ParameterError("nproc", nproc, "given inside a torchrun worker: start either "
                             "torchrun or nproc=N, not both")
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--module", "hybridcls", *argv]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items())]
        return next((c for c in codes if c > 0), 1)
    return 0

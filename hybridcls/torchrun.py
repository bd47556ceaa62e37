"""torchrun's environment and the process group it describes, for training and prediction.

``torchrun`` (``python -m torch.distributed.run``) sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK`` (and the rendezvous, ``MASTER_ADDR`` /
``MASTER_PORT``) in every worker. This module is their one reader
(:func:`torchrun_world`, :func:`torchrun_local_rank`) and the one place that
joins and leaves the group they describe (:func:`torchrun_group`), for its
two uses:

* prediction (:func:`hybridcls.sharding.predict_to_output`) exchanges no
  tensors, only barriers: gloo on CPU and GPU nodes alike, with a long timeout;
* training (:func:`hybridcls.train.distributed.process_group`) averages
  gradients: NCCL on CUDA (gloo on the CPU), each worker pinned to its GPU.

Nothing here imports torch at import time: ``hybridcls merge`` and
``hybridcls predict``'s flag checks read the environment and must not pay for
torch; the group's contexts import it when they are entered.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from hybridcls.errors import InputError

if TYPE_CHECKING:  # typing only: importing this module must not import torch
    import torch

__all__ = [
    "BARRIER_TIMEOUT",
    "local_gpu",
    "torchrun_group",
    "torchrun_local_rank",
    "torchrun_world",
]

#: How long a prediction rank waits at a barrier: ranks finish their parts at
#: different times, and the first must wait for the last.
BARRIER_TIMEOUT = datetime.timedelta(hours=24)

_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


def _environment() -> dict[str, int | None]:
    """torchrun's integer variables (``None`` when unset)."""
    values = {}
    for name in _VARIABLES:
        raw = os.environ.get(name)
        try:
            values[name] = int(raw) if raw is not None else None
        except ValueError:
            raise InputError(f"environment variable {name}={raw!r} is not an integer") from None
    return values


def torchrun_world(
    *, require: Sequence[str] = (), hint: str = "start with torchrun"
) -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` when started by torchrun with more than one process.

    Args:
        require: Further variables that must be set when ``WORLD_SIZE`` > 1
            (``RANK`` always must). Without ``LOCAL_RANK`` among them, a missing
            ``LOCAL_RANK`` is taken to be ``RANK`` (one machine).
        hint: How to start the run properly; ends the error messages.

    Returns:
        ``None`` without ``WORLD_SIZE`` or with ``WORLD_SIZE`` <= 1: one process.

    Raises:
        InputError: ``WORLD_SIZE`` / ``RANK`` / ``LOCAL_RANK`` set but not integers,
            ``RANK`` or a required variable missing, or ``RANK`` outside the world.

    Example:
        >>> import os
        >>> os.environ.get("WORLD_SIZE") is None and torchrun_world() is None  # one process
        True
    """
    values = _environment()
    world = values["WORLD_SIZE"]
    if world is None or world <= 1:
        return None
    missing = [name for name in dict.fromkeys(("RANK", *require)) if name not in os.environ]
    if missing:
        raise InputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; {hint}")
    rank = values["RANK"]
    assert rank is not None  # RANK is set (checked above), and parsed
    if not 0 <= rank < world:
        raise InputError(f"WORLD_SIZE={world} but RANK={os.environ.get('RANK')!r}; {hint}")
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    return rank, world, local


def torchrun_local_rank() -> int:
    """``LOCAL_RANK``: this worker's rank on its machine (0 when unset: a group made without torchrun).

    Raises:
        InputError: ``LOCAL_RANK`` (or ``WORLD_SIZE`` / ``RANK``) set but not an integer.
    """
    return _environment()["LOCAL_RANK"] or 0


def local_gpu(local_rank: int) -> torch.device | None:
    """The GPU of worker ``local_rank`` on a machine with GPUs (``cuda:LOCAL_RANK % count``), else ``None``.

    More workers than GPUs share them round-robin: prediction's workers only
    meet at barriers, which do not claim a GPU.
    """
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@contextmanager
def torchrun_group(device: torch.device | None = None, *, barriers_only: bool = False) -> Iterator[Any]:
    """Join the process group torchrun's environment describes, for the block's duration.

    A group that already exists (the caller's own ``init_process_group``) is
    used as it is and left open; otherwise the group is made here (the
    rendezvous, ``MASTER_ADDR`` / ``MASTER_PORT``, comes from the environment)
    and destroyed when the block ends.

    Args:
        device: This worker's device. A CUDA device becomes the process's
            current device (one GPU per worker) and, for training, NCCL's.
        barriers_only: The group carries barriers and no tensors (prediction):
            gloo on CPU and GPU nodes alike (an NCCL barrier would hold a GPU
            stream and its watchdog) and :data:`BARRIER_TIMEOUT`. Otherwise
            (training) NCCL on a CUDA ``device``, gloo elsewhere, torch's
            default timeout.

    Yields:
        ``torch.distributed``.
    """
    import torch
    import torch.distributed as dist

    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    owned = not dist.is_initialized()
    if owned:
        if barriers_only:
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
        else:
            dist.init_process_group(backend="nccl" if cuda else "gloo",
                                    device_id=device if cuda else None)
    try:
        yield dist
    finally:
        if owned:
            dist.destroy_process_group()

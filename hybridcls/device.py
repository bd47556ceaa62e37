"""The torch side of :class:`~hybridcls.runtime.RuntimeSettings`: devices and numeric precision.

One rule each, for every command and class: which device a ``device`` string
names (:func:`resolve_device`), and which autocast a ``precision`` means on it
(:func:`autocast_dtype`, :func:`autocast`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from hybridcls.errors import ParameterError
from hybridcls.runtime import PRECISIONS

__all__ = ["autocast", "autocast_dtype", "resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else the CPU; any other torch device string is checked.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ... or a ``torch.device``.

    Returns:
        The device.

    Raises:
        ParameterError: Not a device name, or a device this machine does not have (names
            ``device``).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ParameterError("device", device, f"not a torch device name ({exc})") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ParameterError("device", str(device), "CUDA is not available on this machine; "
                                 "use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParameterError("device", str(device), f"this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ParameterError("device", str(device), "MPS is not available on this machine; "
                             "use device='cpu'")
    return dev


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast type ``precision`` means on ``device`` (``None``: no autocast, float32).

    ``auto`` is bfloat16 on a CUDA device that supports it (float16 on one that does
    not) and float32 elsewhere; ``fp32`` never autocasts; ``bf16`` and ``fp16`` autocast
    in that type on any device that supports it.

    Raises:
        ParameterError: An unknown precision, or one the device cannot run.

    Example:
        >>> autocast_dtype(torch.device("cpu"), "auto") is None
        True
        >>> autocast_dtype(torch.device("cpu"), "bf16")
        torch.bfloat16
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not torch.amp.is_autocast_available(device.type):
        raise ParameterError("precision", precision, f"torch has no autocast on {device.type} "
                             "devices; use precision='fp32'")
    return dtype


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a null context for float32).

    Example:
        >>> with autocast(torch.device("cpu"), "bf16"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    dtype = autocast_dtype(device, precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)

"""Choosing the torch device from a ``--device`` value, one rule for every command."""

from __future__ import annotations

import torch

from hybridcls.errors import InputError

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; any other name is checked.

    Raises:
        InputError: the device does not exist here (names ``--device``).

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
            raise InputError(f"--device {device!r}: not a device name ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    return dev

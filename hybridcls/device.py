"""The torch side of :class:`~hybridcls.runtime.RuntimeSettings`: devices and numeric precision.

One rule each, for every command and class: which device a ``device`` string
names (:func:`resolve_device`), which autocast a ``precision`` means on it
(:func:`autocast_dtype`, :func:`autocast`, per tower; on the CPU ``auto`` asks
:func:`cpu_native_bf16` and :data:`AUTO_BF16_CPU_TOWERS`), and the reduced copies of a tower that the CPU runs
faster than autocast (:func:`bf16_copy`, :func:`int8_linear_copy`).
"""

from __future__ import annotations

import copy
import inspect
import platform
import re
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

from hybridcls.errors import ParameterError
from hybridcls.runtime import PRECISIONS

__all__ = [
    "AUTO_BF16_CPU_TOWERS",
    "TOWERS",
    "autocast",
    "autocast_dtype",
    "bf16_copy",
    "cpu_native_bf16",
    "int8_linear_copy",
    "resolve_device",
]

#: The towers of the inference engine, each with its own precision rule under ``auto``.
TOWERS = ("supervised", "clip")

#: The towers ``precision="auto"`` runs in bfloat16 on a CPU that computes it natively
#: (:func:`cpu_native_bf16`). The rule (issue 15): on by default only where top-1 agreement
#: with float32 is at least 99.5% and the harmonic mean H moves by at most 0.2 points on the
#: synthetic world (docs/benchmarks.md). Measured: the supervised CNN under bfloat16 autocast
#: keeps 99.7% of its top-1 and the hybrid's 99.9% (H +0.05); the CLIP image tower in bfloat16
#: keeps 97.9% of the zero-shot top-1 (zero-shot H +0.30): it stays float32 under ``auto``.
AUTO_BF16_CPU_TOWERS: frozenset[str] = frozenset({"supervised"})


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


def cpu_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively, so that bf16 runs faster than float32.

    x86: AVX-512 BF16 or AMX (``torch.cpu``'s checks); Arm: the BF16 extension
    (oneDNN's check, which on x86 also accepts AVX-512 without BF16, where bfloat16
    is emulated and no faster). Any other CPU, or a torch without these checks: False.

    Example:
        >>> isinstance(cpu_native_bf16(), bool)
        True
    """
    if platform.machine().lower() in ("arm64", "aarch64"):
        check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def autocast_dtype(device: torch.device, precision: str, *, tower: str) -> torch.dtype | None:
    """The autocast type ``precision`` means for ``tower`` on ``device`` (``None``: float32).

    ``auto`` is bfloat16 on a CUDA device that supports it (float16 on one that does
    not); on a CPU that computes bfloat16 natively (:func:`cpu_native_bf16`) bfloat16
    for the towers of :data:`AUTO_BF16_CPU_TOWERS`; float32 elsewhere. ``fp32`` never
    autocasts; ``bf16`` and ``fp16`` autocast in that type on any device that supports
    it; ``int8`` has no autocast (its towers are :func:`int8_linear_copy`) and runs on
    the CPU only.

    Args:
        device: Where the tower runs.
        precision: One of :data:`~hybridcls.runtime.PRECISIONS`.
        tower: One of :data:`TOWERS`.

    Raises:
        ParameterError: An unknown precision, or one the device cannot run.

    Example:
        >>> autocast_dtype(torch.device("cpu"), "fp32", tower="clip") is None
        True
        >>> autocast_dtype(torch.device("cpu"), "bf16", tower="clip")
        torch.bfloat16
    """
    if precision not in PRECISIONS:
        raise ParameterError("precision", precision, f"expected one of {', '.join(PRECISIONS)}")
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r}: expected one of {', '.join(TOWERS)}")
    if precision == "fp32":
        return None
    if precision == "int8":
        if device.type != "cpu":
            raise ParameterError("precision", precision, f"int8 dynamic quantisation runs on the CPU "
                                 f"only, not on {device.type}; use precision='auto' or 'bf16' there")
        if _quantize_dynamic() is None or torch.backends.quantized.engine == "none":
            raise ParameterError("precision", precision, f"this torch ({torch.__version__}) has no "
                                 "dynamic int8 quantisation; use precision='bf16' or 'fp32'")
        return None
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and tower in AUTO_BF16_CPU_TOWERS and cpu_native_bf16():
            return torch.bfloat16
        return None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if not torch.amp.is_autocast_available(device.type):
        raise ParameterError("precision", precision, f"torch has no autocast on {device.type} "
                             "devices; use precision='fp32'")
    return dtype


def autocast(device: torch.device, precision: str, *, tower: str) -> AbstractContextManager:
    """The autocast context of ``precision`` for ``tower`` on ``device`` (a null context for float32).

    Example:
        >>> with autocast(torch.device("cpu"), "bf16", tower="supervised"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """
    dtype = autocast_dtype(device, precision, tower=tower)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every floating-point weight in bfloat16 (inputs must be bfloat16).

    For the CPU, where autocast is slower than float32 for open_clip's vision
    transformers: under autocast torch's ``nn.MultiheadAttention`` leaves its
    fused path, and the slow path's projections, on transposed bfloat16 inputs,
    copy their weights once per batch row (0.8 times float32's speed measured on
    ViT-B-32, against 1.8 times for this copy; docs/benchmarks.md). Normalisation
    layers compute in float32 inside and store bfloat16.

    Example:
        >>> bf16_copy(torch.nn.Linear(2, 2)).weight.dtype
        torch.bfloat16
    """
    return copy.deepcopy(module).to(torch.bfloat16)


def _quantize_dynamic():
    """torch's ``quantize_dynamic``, or None where this torch has removed it."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        return None
    return quantize_dynamic


def _reads_weights_directly(parent: torch.nn.Module, name: str) -> bool:
    """Whether ``parent.forward`` reads its child ``name``'s ``weight`` or ``bias`` itself.

    Such a layer is not called as a module (open_clip's ResNet attention pooling hands
    ``q_proj.weight`` to ``F.multi_head_attention_forward``): a quantised copy, whose
    ``weight`` is a method, would break the model. Without the source (a compiled or
    built-in module), the layer is taken as called.
    """
    try:
        source = inspect.getsource(type(parent).forward)
    except (OSError, TypeError):
        return False
    return re.search(rf"\b{re.escape(name)}\.(weight|bias)\b", source) is not None


def int8_linear_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` layers run in int8 with dynamic activation scales.

    ``torch.ao.quantization.quantize_dynamic`` (weights quantised per tensor once,
    activations per batch): the MLPs of transformers and ConvNeXt's pointwise
    layers. Convolutions, ``nn.MultiheadAttention``'s projections, and Linear layers
    whose owner reads their weights itself (attention pooling) stay float32. The CPU only.

    Raises:
        ParameterError: This torch has no dynamic quantisation (names ``precision``).

    Example:
        >>> layer = int8_linear_copy(torch.nn.Sequential(torch.nn.Linear(2, 2)))[0]
        >>> type(layer).__module__.startswith("torch.ao.nn.quantized.dynamic")
        True
    """
    quantize = _quantize_dynamic()
    if quantize is None:
        raise ParameterError("precision", "int8", f"this torch ({torch.__version__}) has no dynamic "
                             "int8 quantisation; use precision='bf16' or 'fp32'")
    names = {f"{prefix}.{child}" if prefix else child
             for prefix, parent in module.named_modules()
             for child, layer in parent.named_children()
             if type(layer) is torch.nn.Linear and not _reads_weights_directly(parent, child)}
    with warnings.catch_warnings():
        # torch marks torch.ao.quantization as deprecated in favour of torchao, a package we do
        # not depend on; the call is still torch's own and is tested here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions")
        return quantize(module, names, dtype=torch.qint8, inplace=False)

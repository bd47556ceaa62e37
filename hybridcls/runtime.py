"""How a run uses the machine: one settings object, declared once, shared by every entry point.

:class:`RuntimeSettings` holds what changes where and how fast the models run
but never what they predict beyond floating-point noise: the device, the
batch size, the decoding workers, the numeric precision, ``torch.compile``,
where JPEG files are decoded and whether at a reduced scale, the cache folder
and progress bars. The command
line builds one from its flags (:mod:`hybridcls.cli.common`), both classifiers
from their parameters of the same names (whose defaults are read from here),
and the inference engine and training read it. A default is written once, in
this class.

This module imports no torch; :func:`resolve_device` (in
:mod:`hybridcls.device`) turns the device string into a ``torch.device``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from hybridcls.errors import ParameterError

__all__ = ["DECODERS", "PRECISIONS", "RUNTIME_FIELDS", "RuntimeSettings"]

#: ``precision`` values: ``auto`` (bfloat16 autocast on a CUDA device that supports it, float16
#: on one that does not; on a CPU that computes bfloat16 natively, bfloat16 for the CNN and
#: float32 for the CLIP tower, float32 elsewhere: :func:`hybridcls.device.autocast_dtype`),
#: ``fp32`` (no autocast), ``bf16`` and
#: ``fp16`` (autocast in that type on any device; on the CPU the CLIP image tower runs a bfloat16
#: copy of its weights instead), ``int8`` (the CPU only: the Linear layers of both towers
#: quantised to int8 with dynamic activation scales, ``torch.ao.quantization.quantize_dynamic``).
#: Weights stay in float32 in the models the classifiers hold; reduced copies are the engine's.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")

#: ``decode`` values: ``cpu`` (Pillow, in the loader workers) or ``device`` (JPEG files decoded in
#: batches on the models' device by ``torchvision.io.decode_jpeg``: nvjpeg on CUDA; every other
#: file by Pillow).
DECODERS = ("cpu", "device")


@dataclass(frozen=True)
class RuntimeSettings:
    """Where and how the models run.

    Attributes:
        device: Any torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) or
            ``"auto"`` (CUDA when available, else the CPU).
        batch_size: Images per forward pass (lowered, with a warning, when the device runs
            out of memory).
        workers: Image-decoding processes (0 decodes in the calling process).
        precision: One of :data:`PRECISIONS`.
        compile: Wrap the towers in ``torch.compile`` (fixed batch shapes; pays back on long
            runs). Off by default: on a 2-core CPU it made ConvNeXt-Tiny 1.25 times faster after
            two minutes of compiling (paid back after about 800 images) and ViT-B-32 no
            faster (docs/benchmarks.md).
        decode: One of :data:`DECODERS` (the command line's ``--gpu-decode`` is ``"device"`` on CUDA).
        draft: Decode a JPEG much larger than the towers' input at a reduced scale (libjpeg's DCT
            scaling, 1/2 to 1/8 of each side) that keeps both sides at least twice the towers'
            resize (:func:`hybridcls.data.load_image`'s ``target_side``); ``False`` decodes every
            file at full size. CPU decoding only (``decode="device"`` decodes JPEG files whole).
        cache_dir: Root of the weights download cache and the text-classifier cache (``None``:
            ``$HYBRIDCLS_CACHE_DIR`` or ``~/.cache/hybridcls``, and the Hugging Face cache for
            weights).
        progress: Show progress bars on standard error.

    Raises:
        ParameterError: A value out of its range, naming the parameter.

    Example:
        >>> RuntimeSettings(batch_size=32).batch_size
        32
        >>> RuntimeSettings(batch_size=0)
        Traceback (most recent call last):
        ...
        hybridcls.errors.ParameterError: batch_size=0: expected a positive integer
    """

    device: str = "auto"
    batch_size: int = 64
    workers: int = 2
    precision: str = "auto"
    compile: bool = False
    decode: str = "cpu"
    draft: bool = True
    cache_dir: str | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ParameterError("device", self.device, "expected a torch device string such as "
                                 "'cpu', 'cuda', 'cuda:1', 'mps' or 'auto'")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            raise ParameterError("batch_size", self.batch_size, "expected a positive integer")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0:
            raise ParameterError("workers", self.workers, "expected an integer >= 0")
        if self.precision not in PRECISIONS:
            raise ParameterError("precision", self.precision, f"expected one of {', '.join(PRECISIONS)}")
        if self.decode not in DECODERS:
            raise ParameterError("decode", self.decode, f"expected one of {', '.join(DECODERS)}")
        if not isinstance(self.compile, bool):
            raise ParameterError("compile", self.compile, "expected True or False")
        if not isinstance(self.draft, bool):
            raise ParameterError("draft", self.draft, "expected True or False")
        if not isinstance(self.progress, bool):
            raise ParameterError("progress", self.progress, "expected True or False")
        if self.cache_dir is not None:
            # Paths arrive as pathlib objects too; one spelling keeps settings comparable.
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))

    @classmethod
    def of(cls, owner: Any) -> RuntimeSettings:
        """The settings held by an object with attributes of the same names (an estimator).

        Example:
            >>> from types import SimpleNamespace
            >>> RuntimeSettings.of(SimpleNamespace(device="cpu", batch_size=8)).batch_size
            8
        """
        return cls(**{f.name: getattr(owner, f.name) for f in fields(cls) if hasattr(owner, f.name)})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RuntimeSettings:
        """Settings from a mapping; an unknown key is an error naming it."""
        unknown = sorted(set(values) - set(RUNTIME_FIELDS))
        if unknown:
            raise ParameterError(unknown[0], values[unknown[0]],
                                 f"not a runtime setting; known: {', '.join(RUNTIME_FIELDS)}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> RuntimeSettings:
        """A copy with some settings changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON-able values."""
        return asdict(self)


#: The names of the runtime settings, in declaration order.
RUNTIME_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RuntimeSettings))

"""Batched inference over both towers: decode once, two views, normalise on the device.

The one inference path of the package: the hybrid runs both towers through it,
zero-shot-only prediction runs it with no supervised tower, calibration,
``explain``, ``audit`` and the benchmarks run it too. Each image is read and
decoded once (by :mod:`hybridcls.data`); each tower's preprocessing is split
into a geometry (resize + crop to ``uint8`` pixels, in the loader workers) and
a normalisation (mean / std, on the device). The geometries are timm's own
eval transforms built with ``use_prefetcher=True`` (:func:`timm_view`), for
open_clip towers from the model's ``preprocess_cfg`` (:func:`open_clip_view`),
so the pixels are those of each library's preprocessing; when both towers'
geometries are equal the resize is done once and shared. Each geometry starts
with :func:`~hybridcls.data.bound_aspect`'s step, so that the work per image is
bounded by the towers' input size whatever its aspect ratio.

The CLIP image tower can be spent only where it is needed: ``clip="all"``
runs it on every image, ``clip="none"`` on none, and a callable receives the
supervised outputs of a batch (a :class:`~hybridcls.gate.BranchOutputs`) and
returns the mask of images to encode (lazy zero-shot, the cascade; see
:meth:`hybridcls.gate.Gate.clip_policy`).

A caller that needs something else of every image (the audit's small
thumbnails) passes ``extra_views``: PIL -> tensor functions run in the same
workers on the same decoded image, whose stacked outputs come back beside
the towers' outputs, so no file is decoded a second time for them.

How it runs comes from one :class:`~hybridcls.runtime.RuntimeSettings`:
the device (any torch device), autocast in the asked ``precision`` for both
towers (on the CPU, bfloat16 runs the CLIP image tower as a bfloat16 copy
instead, and ``int8`` both towers as copies with int8 Linear layers: see
:mod:`hybridcls.device`), ``channels_last`` for the CNN on CUDA and the CPU,
``draft`` (a JPEG much larger than the towers' resize decoded at a reduced
scale, down to twice that resize: :func:`~hybridcls.data.resize_side`), ``compile`` (``torch.compile``
with fixed batch shapes: short batches are padded), and ``decode="device"``
(JPEG files decoded on the engine's device by ``torchvision.io.decode_jpeg``:
nvjpeg on CUDA, libjpeg-turbo on the CPU; the same geometry run on the decoded tensors with antialiased tensor resizing, so
pixels differ slightly from Pillow's; a file the device decoder refuses falls
back to the CPU decoder; a file that fails both becomes an error row). A batch
the device cannot hold is run in halves, with a warning naming
``batch_size``; one image that does not fit is an error.
:attr:`InferenceEngine.applied` says what was applied, for the run's record.
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from hybridcls.data import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    Sample,
    Source,
    bound_aspect,
    decode_image_bytes,
    image_from_memory,
    load_image,
    load_source,
    make_loader,
    resize_side,
)
from hybridcls.device import (
    TOWERS,
    autocast,
    autocast_dtype,
    bf16_copy,
    int8_linear_copy,
    resolve_device,
)
from hybridcls.errors import ImageDecodeError, InputError, ParameterError, ResourceUseWarning
from hybridcls.gate.branches import BranchOutputs
from hybridcls.runtime import RuntimeSettings

__all__ = [
    "ClipPolicy",
    "EncodedBatch",
    "EncodedDataset",
    "EngineBatch",
    "InferenceEngine",
    "View",
    "ViewsTransform",
    "collate_encoded",
    "open_clip_view",
    "timm_view",
]

# What decides, per batch, which images the CLIP tower sees (see Gate.clip_policy).
ClipPolicy = str | Callable[[BranchOutputs], np.ndarray]

# open_clip's resize modes as timm's eval crop modes: the same torchvision / timm steps.
_CROP_MODE = {"shortest": "center", "squash": "squash", "longest": "border"}


@dataclass(frozen=True)
class View:
    """How one tower sees an image: a geometry to ``uint8`` pixels, then mean / std on the device.

    Attributes:
        geometry: PIL RGB image (or ``uint8 [3, H, W]`` tensor, for device decoding) ->
            ``uint8 [3, h, w]`` tensor: resize and crop only.
        mean: Per-channel mean, in ``[0, 1]`` units.
        std: Per-channel standard deviation, in ``[0, 1]`` units.
    """

    geometry: Callable[[Any], torch.Tensor]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def key(self) -> str:
        """Equal for two views whose geometry gives the same pixels."""
        return repr(self.geometry)

    def pixels(self, image: Any) -> torch.Tensor:
        """``uint8 [3, h, w]``: the crop this tower sees of a decoded image."""
        out = self.geometry(image)
        return pil_to_tensor(out) if isinstance(out, Image.Image) else out

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``float32``: ``(pixels / 255 - mean) / std`` of ``uint8 [..., 3, h, w]`` pixels."""
        mean = torch.tensor(self.mean, device=pixels.device).view(-1, 1, 1) * 255
        std = torch.tensor(self.std, device=pixels.device).view(-1, 1, 1) * 255
        return (pixels.float() - mean) / std


def timm_view(data_config: Mapping[str, Any]) -> View:
    """A timm model's eval preprocessing as a :class:`View`.

    The geometry is ``timm.data.create_transform(**data_config, is_training=False,
    use_prefetcher=True)`` (resize, crop, to ``uint8``; normalisation is left to the
    device, as timm's own prefetcher does), behind :func:`~hybridcls.data.bound_aspect`.

    Args:
        data_config: timm's data config (``input_size``, ``interpolation``, ``mean``,
            ``std``, ``crop_pct``, ``crop_mode``), as ``resolve_data_config`` gives it.

    Example:
        >>> v = timm_view({"input_size": (3, 32, 32), "interpolation": "bicubic",
        ...                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 1.0})
        >>> tuple(v.pixels(Image.new("RGB", (64, 48))).shape)
        (3, 32, 32)
    """
    cfg = dict(data_config)
    cfg["input_size"] = tuple(cfg["input_size"])
    geometry = timm.data.create_transform(**cfg, is_training=False, use_prefetcher=True)
    return View(bound_aspect(geometry), _triple(cfg["mean"]), _triple(cfg["std"]))


def open_clip_view(preprocess_cfg: Mapping[str, Any]) -> View:
    """An open_clip model's eval preprocessing (``model.visual.preprocess_cfg``) as a :class:`View`.

    open_clip's ``resize_mode`` maps onto timm's eval crop modes, which are built of
    the same steps (``shortest`` -> ``center``, ``squash`` -> ``squash``, ``longest`` ->
    ``border``, padded with open_clip's ``fill_color``), at ``crop_pct`` 1.

    Raises:
        InputError: A ``resize_mode`` or colour ``mode`` this mapping does not know.

    Example:
        >>> cfg = {"size": 32, "mode": "RGB", "mean": (0.5,) * 3, "std": (0.5,) * 3,
        ...        "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
        >>> tuple(open_clip_view(cfg).pixels(Image.new("RGB", (64, 48))).shape)
        (3, 32, 32)
    """
    size = preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in _CROP_MODE or preprocess_cfg.get("mode", "RGB") != "RGB":
        raise InputError(f"open_clip preprocess_cfg with resize_mode={mode!r}, "
                         f"mode={preprocess_cfg.get('mode')!r} is not supported")
    mean, std = _triple(preprocess_cfg["mean"]), _triple(preprocess_cfg["std"])
    # In prefetcher mode timm reads the mean only for the letterbox's padding colour.
    fill = float(preprocess_cfg.get("fill_color", 0) or 0) / 255.0
    geometry = timm.data.create_transform(
        input_size=(3, h, w), is_training=False, use_prefetcher=True, crop_pct=1.0,
        crop_mode=_CROP_MODE[mode], interpolation=preprocess_cfg.get("interpolation", "bicubic"),
        mean=(fill,) * 3 if mode == "longest" else mean, std=std)
    return View(bound_aspect(geometry), mean, std)


def _triple(values: Any) -> tuple[float, float, float]:
    v = [float(x) for x in np.asarray(values, dtype=np.float64).reshape(-1)]
    return (v[0], v[0], v[0]) if len(v) == 1 else (v[0], v[1], v[2])


class ViewsTransform:
    """PIL RGB image -> one ``uint8`` tensor per distinct geometry, then one per extra view.

    Picklable for workers when the extra views are.

    Args:
        views: The towers' views; equal geometries are computed once.
        extras: Further ``PIL image -> tensor`` functions of the same decoded image.
    """

    def __init__(self, views: Sequence[View],
                 extras: Sequence[Callable[[Image.Image], torch.Tensor]] = ()) -> None:
        keys = list(dict.fromkeys(v.key for v in views))
        self.views = [next(v for v in views if v.key == k) for k in keys]
        self.extras = list(extras)

    @property
    def n_views(self) -> int:
        return len(self.views)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(v.pixels(image) for v in self.views) + tuple(f(image) for f in self.extras)


_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class EncodedBatch:
    """A batch for device decoding: per decoded row, either its JPEG bytes or its CPU views.

    Attributes:
        indices: Every dataset index of the batch, in order.
        ok: Indices of the readable inputs, in order.
        errors: Index -> reason for each input that could not be read.
        items: Aligned with ``ok``: a 1-D ``uint8`` tensor of JPEG bytes (to decode on the
            device) or a tuple of ``uint8`` view tensors (already decoded on the CPU).
    """

    indices: list[int]
    ok: list[int]
    errors: dict[int, str]
    items: list[Any]


class EncodedDataset(ImageDataset):
    """Read JPEG files as bytes for device decoding; decode anything else with PIL here.

    The header is read (cheap) so that the pixel limit still applies before
    decoding, and so that only what the device decoder handles is sent to it:
    baseline/progressive JPEG in RGB or greyscale. CMYK, other formats, images
    given in memory and unreadable headers take the CPU path, whose errors become rows.
    """

    def __getitem__(self, index: int) -> Sample:
        source = self.sources[index]
        if source.error is not None or source.image is not None:
            return super().__getitem__(index)
        data = b""
        try:
            with open(source.path, "rb") as f:
                data = f.read()
            if data[:3] == _JPEG_MAGIC:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    if im.format == "JPEG" and im.mode in ("RGB", "L") and (
                            self.max_pixels is None or w * h <= self.max_pixels):
                        return Sample(index, torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except OSError:
            pass  # the CPU decoder below gives the precise reason
        try:
            image = (decode_image_bytes(data, source.path, max_pixels=self.max_pixels,
                                        target_side=self.target_side) if data
                     else load_image(source.path, max_pixels=self.max_pixels, target_side=self.target_side))
        except ImageDecodeError as err:
            return Sample(index, None, err.reason)
        return Sample(index, self.transform(image))


def collate_encoded(samples: Sequence[Sample]) -> EncodedBatch:
    """Gather :class:`EncodedDataset` samples (mixed bytes and views) into an :class:`EncodedBatch`."""
    good = [s for s in samples if s.image is not None]
    return EncodedBatch(
        indices=[s.index for s in samples],
        ok=[s.index for s in good],
        errors={s.index: s.error or "unknown error" for s in samples if s.image is None},
        items=[s.image for s in good],
    )


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class EngineBatch:
    """One batch of the engine's stream: every input index, the decoded ones' tower outputs.

    Attributes:
        indices: Every input index of the batch, in order.
        ok: The decoded ones, in order; rows of ``outputs`` follow it.
        errors: Index -> reason for each input that could not be decoded.
        outputs: Both towers' outputs for the ``ok`` rows (``None`` when none decoded).
        extra_views: One stacked array per ``extra_views`` function given to the engine.
    """

    indices: list[int]
    ok: list[int]
    errors: dict[int, str]
    outputs: BranchOutputs | None = None
    extra_views: tuple[np.ndarray, ...] = field(default_factory=tuple)


class InferenceEngine:
    """Run the supervised tower and/or the CLIP image tower over image sources.

    Args:
        supervised: A :class:`~hybridcls.supervised.SupervisedModel` (``forward_with_features``),
            or ``None`` (zero-shot only, the audit).
        sup_view: Its :class:`View` (:func:`timm_view` of the checkpoint's data config).
        clip: A :class:`~hybridcls.zeroshot.ClipTower`, or ``None``.
        settings: How to run (device, batch size, workers, precision, compile, decode).
        extra_views: ``PIL RGB image -> tensor`` functions (one shape each, picklable for
            workers) run on each decoded image beside the towers' geometry; their outputs
            come back in :attr:`EngineBatch.extra_views`. CPU decoding only.

    Attributes:
        device: The device both towers run on.
        clip_images_encoded: How many images the CLIP image tower has encoded (lazy
            routing and the cascade are checked against it).
        device_decoded: How many images the device decoder has decoded.

    Raises:
        ParameterError: A setting this device cannot honour (a precision without autocast
            there), naming the parameter.

    Example:
        >>> engine = InferenceEngine(clip=tower, settings=RuntimeSettings(device="cpu"))  # doctest: +SKIP
        >>> for b in engine.iter_batches(expand_inputs(["photos/"])):  # doctest: +SKIP
        ...     print(b.ok, b.outputs.clip_logits.shape)
    """

    def __init__(
        self,
        *,
        supervised: torch.nn.Module | None = None,
        sup_view: View | None = None,
        clip: Any = None,
        settings: RuntimeSettings | None = None,
        extra_views: Sequence[Callable[[Image.Image], torch.Tensor]] = (),
    ) -> None:
        if supervised is None and clip is None:
            raise InputError("InferenceEngine needs at least one of supervised= or clip=")
        if supervised is not None and sup_view is None:
            raise InputError("InferenceEngine needs sup_view= with supervised=")
        self.settings = settings = settings or RuntimeSettings()
        self.device = resolve_device(settings.device)
        if extra_views and settings.decode != "cpu":
            # The device decoder hands the geometry tensors, not PIL images, and its pixels differ
            # slightly from Pillow's: extra views computed there would not be the ones asked for.
            raise ParameterError("decode", settings.decode, "extra views need decode='cpu'")
        # each tower's autocast type (refuses a precision the device cannot run, early)
        self._autocast_dtype = {t: autocast_dtype(self.device, settings.precision, tower=t) for t in TOWERS}
        self.supervised = supervised
        self.clip = clip
        self.batch_size = settings.batch_size
        self.clip_images_encoded = 0
        self.device_decoded = 0
        # Rows per forward pass; lowered (and said so) when the device runs out of memory.
        self._rows = settings.batch_size
        views: list[View] = []
        if supervised is not None:
            views.append(sup_view)
        if clip is not None:
            views.append(open_clip_view(clip.bundle.model.visual.preprocess_cfg))
        self._transform = ViewsTransform(views, extra_views)
        keys = [v.key for v in self._transform.views]
        self._views = views
        self._geometry_of = [keys.index(v.key) for v in views]
        sides = [resize_side(v.geometry) for v in views]
        # Extra views (the audit's pixel thumbnails) say nothing of the pixels they need.
        #: The side both towers' resizes need, given to the decoder (``load_image``'s
        #: ``target_side``); None: every file decoded at full size.
        self.target_side = (max(sides) if settings.draft and not extra_views and None not in sides
                            else None)
        # oneDNN's convolutions run faster in channels_last, on the CPU as on CUDA.
        channels_last = self.device.type in ("cuda", "cpu") and supervised is not None
        if channels_last:
            supervised.to(memory_format=torch.channels_last)
        self._channels_last = channels_last
        int8 = settings.precision == "int8"
        sup_model = int8_linear_copy(supervised) if int8 and supervised is not None else supervised
        #: A reduced copy of the CLIP image tower (CPU: bfloat16, or int8 Linear layers) run
        #: instead of the model's own, or None.
        self._clip_visual = None
        if clip is not None and self.device.type == "cpu":
            if int8:
                self._clip_visual = int8_linear_copy(clip.bundle.model.visual)
            elif self._autocast_dtype["clip"] == torch.bfloat16:
                self._clip_visual = bf16_copy(clip.bundle.model.visual)
        self._sup_forward = sup_model.forward_with_features if supervised is not None else None
        self._clip_encode = clip.encode_images if clip is not None else None
        if self._clip_visual is not None:
            self._clip_encode = functools.update_wrapper(
                functools.partial(clip.encode_images, visual=self._clip_visual), clip.encode_images)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if settings.compile:
            # dynamic=False: one graph per batch shape, and every batch is padded to one shape.
            if supervised is not None:
                self._sup_forward = torch.compile(self._sup_forward, dynamic=False)
            if clip is not None:
                self._clip_encode = torch.compile(self._clip_encode, dynamic=False)
        #: What this engine applies, for a run's record (a flag that did nothing shows here).
        self.applied: dict[str, Any] = {
            "device": str(self.device),
            "batch_size": settings.batch_size,
            "workers": settings.workers,
            "precision": settings.precision,
            "autocast": {t: None if d is None else str(d).split(".")[-1] for t, d in self._autocast_dtype.items()
                         if (supervised, clip)[TOWERS.index(t)] is not None},
            "compile": settings.compile,
            "decode": settings.decode,
            "draft_target_side": self.target_side,
            "channels_last": channels_last,
            "weights": {
                **({"supervised": "int8 linear" if int8 else "float32"} if supervised is not None else {}),
                **({"clip": "float32" if self._clip_visual is None else "int8 linear" if int8
                    else "bfloat16"} if clip is not None else {}),
            },
            "towers": [t for t, m in (("supervised", supervised), ("clip", clip)) if m is not None],
        }

    @property
    def views(self) -> list[View]:
        """Each tower's view, in tower order (supervised first, when there is one)."""
        return list(self._views)

    # ------------------------------------------------------------------ forward passes

    @property
    def _clip_view(self) -> int:
        return 0 if self.supervised is None else 1

    def _on_device(self, images: Sequence[torch.Tensor], view: int) -> torch.Tensor:
        pixels = images[self._geometry_of[view]].to(self.device, non_blocking=True)
        x = self._views[view].normalise(pixels)
        if self._channels_last and view == 0:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _sup_fn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), autocast(self.device, self.settings.precision, tower="supervised"):
            logits, feats = self._sup_forward(x)
        return logits.float(), feats.float()

    def _clip_fn(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        # A reduced copy runs in its own types: autocast would take torch's attention off its
        # fused path (see hybridcls.device.bf16_copy).
        precision = nullcontext() if self._clip_visual is not None else autocast(
            self.device, self.settings.precision, tower="clip")
        with torch.inference_mode(), precision:
            return (self._clip_encode(x).float(),)

    def _call(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor
              ) -> tuple[torch.Tensor, ...]:
        """``fn`` over ``x`` in chunks of ``self._rows``, padded when compiled, halved on out-of-memory."""
        while True:
            try:
                parts = [self._padded(fn, chunk) for chunk in x.split(self._rows)]
                return tuple(torch.cat(p) for p in zip(*parts))
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not _is_oom(err):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self._rows == 1:
                    raise InputError(
                        f"out of memory on {self.device} with one image per forward pass (batch_size="
                        f"{self.batch_size}): the models do not fit this device; try device='cpu'") from None
                self._rows = max(1, min(self._rows, len(x)) // 2)
                warnings.warn(
                    f"out of memory on {self.device} at batch_size={self.batch_size}: running the "
                    f"models on {self._rows} images at a time; pass a smaller batch_size to skip "
                    "this retry", ResourceUseWarning, stacklevel=2)

    def _padded(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        n = len(x)
        if not self.settings.compile or n == self._rows:
            return tuple(o.cpu() for o in fn(x))
        # Fixed shapes: a compiled graph would otherwise recompile for every short batch.
        pad = x.new_zeros((self._rows - n, *x.shape[1:]))
        return tuple(o[:n].cpu() for o in fn(torch.cat([x, pad])))

    def run_supervised(self, images: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """The supervised tower on a batch of decoded views: ``([n, S] logits, [n, F] features)``.

        Args:
            images: The ``uint8`` views of :class:`ViewsTransform`, stacked per view.
        """
        logits, feats = self._call(self._sup_fn, self._on_device(images, 0))
        return logits.numpy(), feats.numpy()

    def run_clip(self, images: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """The CLIP tower on a batch of decoded views: ``([n, D] embeddings, [n, C] logits)``."""
        x = self._on_device(images, self._clip_view)
        self.clip_images_encoded += len(x)
        emb = self.clip_embeddings(x)
        logits = self.clip.logits_from_embeddings(emb)
        return emb.numpy(), logits.cpu().numpy()

    def clip_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` L2-normalised float32 embeddings (on the CPU) of normalised ``[N, 3, H, W]`` images.

        The CLIP image tower as the engine runs it: in its precision (or reduced
        copy), ``batch_size`` rows at a time, halved on out-of-memory.
        """
        (emb,) = self._call(self._clip_fn, x.to(self.device))
        return emb

    def decoded_views(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        """The ``uint8`` views of one decoded image, as the loader workers make them."""
        return self._transform(image)

    def load(self, source: Source) -> Image.Image:
        """A source decoded as the loader workers decode it (at a reduced scale where they do).

        Raises:
            ImageDecodeError: It cannot be read.
        """
        return load_source(source, target_side=self.target_side)

    # ------------------------------------------------------------------ the stream

    def _loader(self, sources: Sequence[Source]) -> DataLoader:
        s = self.settings
        if s.decode == "cpu":
            return make_loader(sources, self._transform, batch_size=s.batch_size,
                               workers=s.workers, pin_memory=self.device.type == "cuda",
                               target_side=self.target_side)
        return DataLoader(EncodedDataset(sources, self._transform, max_pixels=DEFAULT_MAX_PIXELS,
                                         target_side=self.target_side),
                          batch_size=s.batch_size, shuffle=False, num_workers=s.workers,
                          collate_fn=collate_encoded)

    def _decode_on_device(self, batch: EncodedBatch, sources: Sequence[Source]
                          ) -> tuple[list[int], dict[int, str], tuple[torch.Tensor, ...]]:
        """Decode a batch's JPEG bytes on the device; refused files go to the CPU decoder.

        Returns:
            ``(ok, errors, views)``: the rows decoded, new error rows, one stacked
            ``uint8`` tensor per geometry on the device, aligned with ``ok``.
        """
        pos = [j for j, it in enumerate(batch.items) if not isinstance(it, tuple)]
        decoded: dict[int, torch.Tensor] = {}
        if pos:
            datas = [batch.items[j] for j in pos]
            try:
                # One batched call: nvjpeg decodes the whole batch at once on CUDA.
                images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device,
                                     apply_exif_orientation=True)
                decoded = dict(zip(pos, images))
            except RuntimeError:
                for j, d in zip(pos, datas):  # find the culprit(s); the rest stay on the device
                    try:
                        decoded[j] = decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device,
                                                 apply_exif_orientation=True)
                    except RuntimeError:
                        pass
        ok: list[int] = []
        errors: dict[int, str] = {}
        rows: list[tuple[torch.Tensor, ...]] = []
        for j, (idx, item) in enumerate(zip(batch.ok, batch.items)):
            if isinstance(item, tuple):
                rows.append(tuple(v.to(self.device, non_blocking=True) for v in item))
            elif j in decoded:
                self.device_decoded += 1
                rows.append(tuple(v.pixels(decoded[j]) for v in self._transform.views))
            else:
                try:  # the CPU decoder takes what the device decoder refused
                    src = sources[idx]
                    image = (decode_image_bytes(item.numpy().tobytes(), src.path,
                                                target_side=self.target_side) if src.image is None
                             else image_from_memory(src.image, src.path))
                except ImageDecodeError as err:
                    errors[idx] = err.reason
                    continue
                rows.append(tuple(v.to(self.device) for v in self._transform(image)))
            ok.append(idx)
        views = tuple(torch.stack(parts) for parts in zip(*rows)) if rows else ()
        return ok, errors, views

    def iter_batches(
        self,
        sources: Sequence[Source],
        *,
        clip: ClipPolicy = "all",
        progress: bool | None = None,
        desc: str = "predict",
    ) -> Iterator[EngineBatch]:
        """Stream both towers' outputs, one :class:`EngineBatch` per batch, in input order.

        Memory stays flat: each batch is yielded (and may be written out) before
        the next is decoded.

        Args:
            sources: Inputs from :func:`~hybridcls.data.as_sources`.
            clip: ``"all"``, ``"none"``, or ``f(outputs) -> [n] bool`` choosing the images
                the CLIP tower encodes from the batch's supervised outputs.
            progress: Show a progress bar on stderr (default: the settings' ``progress``).
            desc: The bar's label.
        """
        if self.supervised is not None:
            self.supervised.eval()
        show = self.settings.progress if progress is None else progress
        bar = tqdm(total=len(sources), unit="img", desc=desc, disable=not show)
        n_geometries = self._transform.n_views
        try:
            for batch in self._loader(sources):
                if isinstance(batch, EncodedBatch):
                    ok, late, images = self._decode_on_device(batch, sources)
                    errors = {**batch.errors, **late}
                else:
                    ok, errors = list(batch.ok), dict(batch.errors)
                    images = batch.images if isinstance(batch.images, tuple) else (batch.images,)
                out = EngineBatch(indices=list(batch.indices), ok=ok, errors=errors)
                if ok:
                    # The extra views come after the geometries; they stay on the CPU.
                    out.extra_views = tuple(v.numpy() for v in images[n_geometries:])
                    out.outputs = self._outputs(images[:n_geometries], len(ok), clip)
                bar.update(len(batch.indices))
                yield out
        finally:
            bar.close()

    def _outputs(self, images: Sequence[torch.Tensor], n: int, clip: ClipPolicy) -> BranchOutputs:
        sup_logits = sup_features = None
        if self.supervised is not None:
            sup_logits, sup_features = self.run_supervised(images)
        if self.clip is None or clip == "none":
            return BranchOutputs(sup_logits, sup_features)
        if callable(clip):
            mask = np.asarray(clip(BranchOutputs(sup_logits, sup_features)), dtype=bool)
        elif clip == "all":
            mask = np.ones(n, dtype=bool)
        else:
            raise InputError(f"clip policy {clip!r}: expected 'all', 'none' or a function")
        emb = np.full((n, self.clip.embed_dim), np.nan, dtype=np.float32)
        logits = np.full((n, len(self.clip.classes)), np.nan, dtype=np.float32)
        if mask.any():
            rows = torch.from_numpy(np.flatnonzero(mask))
            e, lg = self.run_clip(tuple(im[rows.to(im.device)] for im in images))
            emb[mask], logits[mask] = e, lg
        return BranchOutputs(sup_logits, sup_features, logits, emb)

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Leave :attr:`clip_images_encoded` as it was after the block: for images the engine
        runs on the side of a prediction (held-out images, support images), so that the count
        stays that of the images predicted.

        Example:
            >>> with clf.engine_.uncounted():  # doctest: +SKIP
            ...     clf.engine_.extract(held_out_sources)
        """
        encoded = self.clip_images_encoded
        try:
            yield
        finally:
            self.clip_images_encoded = encoded

    def extract(self, sources: Sequence[Source], *, clip: ClipPolicy = "all",
                progress: bool | None = None, desc: str = "features"
                ) -> tuple[BranchOutputs | None, dict[int, str]]:
        """Both towers' outputs of every decoded source, stacked in input order.

        Returns:
            ``(outputs or None when nothing decoded, {index: reason} for the others)``.
        """
        parts: list[BranchOutputs] = []
        errors: dict[int, str] = {}
        for b in self.iter_batches(sources, clip=clip, progress=progress, desc=desc):
            errors.update(b.errors)
            if b.outputs is not None:
                parts.append(b.outputs)
        return (BranchOutputs.concat(parts) if parts else None), errors

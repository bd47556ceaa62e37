"""Batched inference over both branches: decode once, two views, normalise on the device.

Each image is read and decoded once (by :mod:`hybridcls.data`). The two
towers' preprocessing is split into a geometric part (resize + centre crop,
run on the PIL image in the loader workers, giving ``uint8`` tensors) and a
normalisation (mean/std, run on the device per tower). When the two towers'
geometry is the same, the resize is done once and shared. Because torchvision
and timm resize the PIL image (``uint8`` in, ``uint8`` out) before
``ToTensor``, the result is identical to running each tower's own transform.
Each geometry starts with :func:`~hybridcls.data.bound_aspect`'s step for images
longer than 16:1 (a centre cut, or a box reduction before a squash), so that the
work per image is bounded by the towers' input size whatever its aspect ratio.

The CLIP image tower can be spent only where it is needed: ``clip="all"``
runs it on every image, ``clip="none"`` on none, and a callable receives the
supervised outputs of a batch and returns the mask of images to encode
(lazy zero-shot, the cascade).

A caller that needs something else of every image (the audit's small
thumbnails) passes ``extra_views``: PIL -> tensor functions run in the same
workers on the same decoded image, whose stacked outputs come back beside
the towers' outputs, so no file is decoded a second time for them.

On CUDA the engine can also decode JPEG files on the GPU (``decode="device"``):
the workers only read the bytes and the header, ``torchvision.io.decode_jpeg``
decodes the batch on the device, and the same geometry runs on the decoded
tensors (antialiased tensor resize, so pixels differ slightly from PIL's).
Any file the device decoder refuses falls back to the CPU decoder; a file
that fails both becomes an error row like everywhere else. ``compile=True``
wraps both towers in ``torch.compile`` with fixed batch shapes (short
batches are padded). A batch the device cannot hold is run in halves, with
a warning naming ``--batch-size``; one image that does not fit is an error.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from hybridcls.data import (
    DEFAULT_MAX_PIXELS,
    ImageDataset,
    Sample,
    Source,
    bound_aspect,
    decode_image_bytes,
    load_image,
    make_loader,
)
from hybridcls.errors import ImageDecodeError, InputError

__all__ = [
    "DECODERS",
    "ClipPolicy",
    "EncodedBatch",
    "EncodedDataset",
    "EngineBatch",
    "InferenceEngine",
    "View",
    "ViewsTransform",
    "collate_encoded",
    "split_transform",
]

# What decides, per batch, which images the CLIP tower sees.
ClipPolicy = Union[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]

#: Where images are decoded: ``"cpu"`` (PIL in the workers) or ``"device"`` (JPEG on the engine's device).
DECODERS = ("cpu", "device")

_TO_TENSOR_NAMES = ("ToTensor", "MaybeToTensor", "PILToTensor", "ToImage")
_MODE_NAMES = ("MaybeConvertMode", "_convert_to_rgb", "function")


@dataclass(frozen=True)
class View:
    """How one tower sees an image: PIL geometry, then mean/std on the device."""

    geometry: Compose
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def key(self) -> str:
        """Equal for two views whose geometric part gives the same pixels."""
        return repr(self.geometry)


def split_transform(transform: Any) -> View:
    """Split a torchvision/timm/open_clip eval transform into geometry and normalisation.

    Both timm's ``create_transform(is_training=False)`` and open_clip's
    preprocess are ``Compose([Resize, CenterCrop, (mode), ToTensor, Normalize])``.
    The geometry is bounded by :func:`~hybridcls.data.bound_aspect` (a no-op for a
    transform that already is), on PIL images and on the device decoder's tensors alike.

    Raises:
        ValueError: For a transform of another shape (the caller may then
            fall back to running it whole).
    """
    steps = list(getattr(bound_aspect(transform), "transforms", []))
    names = [type(t).__name__ for t in steps]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR_NAMES), None)
    if cut is None or cut + 1 >= len(steps) or not isinstance(steps[-1], Normalize):
        raise ValueError(f"cannot split transform into geometry + normalisation: {transform!r}")
    geometry = [t for t in steps[:cut] if type(t).__name__ not in _MODE_NAMES]
    norm = steps[-1]
    mean = tuple(float(v) for v in torch.as_tensor(norm.mean).flatten())
    std = tuple(float(v) for v in torch.as_tensor(norm.std).flatten())
    return View(Compose(geometry), mean, std)  # type: ignore[arg-type]


class ViewsTransform:
    """PIL RGB image -> one ``uint8`` tensor per distinct geometry, then one per extra view.

    Picklable for workers when the extra views are.

    Args:
        geometries: The towers' geometric parts (see :func:`split_transform`).
        extras: Further ``PIL image -> tensor`` functions of the same decoded image.
    """

    def __init__(self, geometries: Sequence[Compose],
                 extras: Sequence[Callable[[Image.Image], torch.Tensor]] = ()) -> None:
        self.geometries = list(geometries)
        self.extras = list(extras)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return (tuple(pil_to_tensor(g(image)) for g in self.geometries)
                + tuple(f(image) for f in self.extras))


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
    baseline/progressive JPEG in RGB or greyscale. CMYK, other formats and
    unreadable headers take the CPU path, whose errors become rows.
    """

    def __getitem__(self, index: int) -> Sample:
        source = self.sources[index]
        if source.error is not None:
            return Sample(index, None, source.error)
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
            image = (decode_image_bytes(data, source.path, max_pixels=self.max_pixels) if data
                     else load_image(source.path, max_pixels=self.max_pixels))
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
    """Both branches' raw outputs for one batch; arrays have one row per ``ok`` index.

    Rows of the CLIP arrays are NaN where the CLIP tower did not run
    (``clip_ran`` is False). ``extra_views`` holds one stacked array per
    ``extra_views`` function given to the engine (empty when none decoded).
    """

    indices: list[int]
    ok: list[int]
    errors: dict[int, str]
    sup_logits: np.ndarray | None = None
    sup_features: np.ndarray | None = None
    clip_embeddings: np.ndarray | None = None
    clip_logits: np.ndarray | None = None
    clip_ran: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    extra_views: tuple[np.ndarray, ...] = ()


class InferenceEngine:
    """Run the supervised model and/or the CLIP image tower over image sources.

    Args:
        supervised: A :class:`~hybridcls.supervised.SupervisedModel` (or None).
        sup_transform: Its eval transform (from the checkpoint's data config).
        clip: A fitted :class:`~hybridcls.zeroshot.ZeroShotClassifier` (or None).
        device: Torch device for both towers.
        batch_size: Images per batch.
        workers: Decoding processes.
        amp: Autocast dtype on CUDA (``"bf16"``, ``"fp16"``) or ``"off"``.
        compile: Wrap both towers in ``torch.compile`` (fixed shapes: short
            batches are padded to ``batch_size``).
        decode: ``"cpu"`` (PIL in the workers) or ``"device"`` (JPEG decoded on
            ``device`` by ``torchvision.io.decode_jpeg``, CPU fallback per file).
        extra_views: ``PIL RGB image -> tensor`` functions (one shape each, picklable
            for workers) run on each decoded image beside the towers' geometry;
            their outputs come back in :attr:`EngineBatch.extra_views`. CPU decoding only.

    Attributes:
        clip_images_encoded: How many images the CLIP image tower has encoded
            (lazy routing and the cascade are checked against it).
        device_decoded: How many images the device decoder has decoded.

    Example:
        >>> engine = InferenceEngine(supervised=model, sup_transform=tf, clip=zs)  # doctest: +SKIP
        >>> for b in engine.iter_batches(expand_inputs(["photos/"])):  # doctest: +SKIP
        ...     print(b.ok, b.sup_logits.shape, b.clip_logits.shape)
    """

    def __init__(
        self,
        *,
        supervised: torch.nn.Module | None = None,
        sup_transform: Any = None,
        clip: Any = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        workers: int = 0,
        amp: str = "bf16",
        compile: bool = False,
        decode: str = "cpu",
        extra_views: Sequence[Callable[[Image.Image], torch.Tensor]] = (),
    ) -> None:
        if supervised is None and clip is None:
            raise ValueError("InferenceEngine needs at least one of supervised= or clip=")
        if decode not in DECODERS:
            raise InputError(f"--decode {decode!r}: expected one of {', '.join(DECODERS)}")
        if extra_views and decode != "cpu":
            # The device decoder hands the geometry tensors, not PIL images, and its pixels differ
            # slightly from PIL's: extra views computed there would not be the ones asked for.
            raise ValueError("extra_views need decode='cpu'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"--batch-size {batch_size!r}: expected a positive integer")
        self.device = torch.device(device)
        self.supervised = supervised
        self.clip = clip
        self.batch_size = batch_size
        self.workers = workers
        self.amp = amp
        self.compile = compile
        self.decode = decode
        self.clip_images_encoded = 0
        self.device_decoded = 0
        # Rows per forward pass; lowered (and said so) when the device runs out of memory.
        self._rows = batch_size
        views: list[View] = []
        if supervised is not None:
            views.append(split_transform(sup_transform))
        if clip is not None:
            views.append(split_transform(clip.bundle_.preprocess))
        # Distinct geometries are decoded into separate tensors; equal ones are shared.
        keys = list(dict.fromkeys(v.key for v in views))
        self._geometry_of = [keys.index(v.key) for v in views]
        self._views = views
        self._transform = ViewsTransform([next(v.geometry for v in views if v.key == k) for k in keys],
                                         extra_views)
        self._norm = [
            (torch.tensor(v.mean, device=self.device).view(1, 3, 1, 1) * 255,
             torch.tensor(v.std, device=self.device).view(1, 3, 1, 1) * 255)
            for v in views
        ]
        self._sup_forward = supervised.forward_with_features if supervised is not None else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if supervised is not None:
                supervised.to(memory_format=torch.channels_last)
        if compile:
            # dynamic=False: one graph per batch shape, and every batch is padded to one shape.
            if supervised is not None:
                self._sup_forward = torch.compile(supervised.forward_with_features, dynamic=False)
            if clip is not None:
                model = clip.bundle_.model
                # An instance attribute shadows the method, so the classifier's own
                # encode_images (used below) runs the compiled graph too.
                model.encode_image = torch.compile(model.encode_image, dynamic=False)

    # Index of each tower in ``self._views``.
    @property
    def _sup_view(self) -> int:
        return 0

    @property
    def _clip_view(self) -> int:
        return 0 if self.supervised is None else 1

    def _on_device(self, images: tuple[torch.Tensor, ...], view: int) -> torch.Tensor:
        x = images[self._geometry_of[view]].to(self.device, non_blocking=True).float()
        mean, std = self._norm[view]
        x = (x - mean) / std
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _autocast(self):
        if self.device.type != "cuda" or self.amp == "off":
            return nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _sup_fn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(), self._autocast():
            logits, feats = self._sup_forward(x)
        return logits.float(), feats.float()

    def _clip_fn(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.clip.encode_images(x),)

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
                        f"out of memory on {self.device} with one image per forward pass (--batch-size "
                        f"{self.batch_size}): the models do not fit this device; try --device cpu") from None
                self._rows = max(1, min(self._rows, len(x)) // 2)
                warnings.warn(
                    f"out of memory on {self.device} at --batch-size {self.batch_size}: running the "
                    f"models on {self._rows} images at a time; pass a smaller --batch-size to skip "
                    "this retry", RuntimeWarning, stacklevel=2)

    def _padded(self, fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], x: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        n = len(x)
        if not self.compile or n == self._rows:
            return tuple(o.cpu() for o in fn(x))
        # Fixed shapes: a compiled graph would otherwise recompile for every short batch.
        pad = x.new_zeros((self._rows - n, *x.shape[1:]))
        return tuple(o[:n].cpu() for o in fn(torch.cat([x, pad])))

    def _run_supervised(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        logits, feats = self._call(self._sup_fn, x)
        return logits.numpy(), feats.numpy()

    def _run_clip(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.clip_images_encoded += len(x)
        (emb,) = self._call(self._clip_fn, x)
        logits = self.clip.logits_from_embeddings(emb)
        return emb.numpy(), logits.cpu().numpy()

    def _loader(self, sources: Sequence[Source]) -> DataLoader:
        if self.decode == "cpu":
            return make_loader(sources, self._transform, batch_size=self.batch_size,
                               workers=self.workers, pin_memory=self.device.type == "cuda")
        return DataLoader(EncodedDataset(sources, self._transform, max_pixels=DEFAULT_MAX_PIXELS),
                          batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
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
                rows.append(tuple(g(decoded[j]) for g in self._transform.geometries))
            else:
                try:  # the CPU decoder takes what the device decoder refused
                    image = decode_image_bytes(item.numpy().tobytes(), sources[idx].path)
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
        progress: bool = False,
        desc: str = "predict",
    ) -> Iterator[EngineBatch]:
        """Stream both branches' outputs, one :class:`EngineBatch` per batch, in input order.

        Memory stays flat: each batch is yielded (and may be written out) before
        the next is decoded.

        Args:
            sources: Inputs from :func:`~hybridcls.data.expand_inputs`.
            clip: ``"all"``, ``"none"``, or ``f(sup_logits, sup_features) -> bool mask``
                choosing the images the CLIP tower encodes.
            progress: Show a progress bar on stderr.
            desc: The bar's label.
        """
        if self.supervised is not None:
            self.supervised.eval()
        bar = tqdm(total=len(sources), unit="img", desc=desc, disable=not progress)
        for batch in self._loader(sources):
            if isinstance(batch, EncodedBatch):
                ok, late, images = self._decode_on_device(batch, sources)
                errors = {**batch.errors, **late}
            else:
                ok, errors = list(batch.ok), dict(batch.errors)
                images = batch.images if isinstance(batch.images, tuple) else (batch.images,)
            out = EngineBatch(indices=list(batch.indices), ok=ok, errors=errors)
            n = len(ok)
            if n:
                # The extra views come after the geometries; they stay on the CPU.
                n_geometries = len(self._transform.geometries)
                out.extra_views = tuple(v.numpy() for v in images[n_geometries:])
                images = images[:n_geometries]
                if self.supervised is not None:
                    out.sup_logits, out.sup_features = self._run_supervised(
                        self._on_device(images, self._sup_view))
                if self.clip is not None and clip != "none":
                    if callable(clip):
                        mask = np.asarray(clip(out.sup_logits, out.sup_features), dtype=bool)
                    else:
                        mask = np.ones(n, dtype=bool)
                    out.clip_ran = mask
                    d, c = self.clip.bundle_.embed_dim, len(self.clip.classes_)
                    out.clip_embeddings = np.full((n, d), np.nan, dtype=np.float32)
                    out.clip_logits = np.full((n, c), np.nan, dtype=np.float32)
                    if mask.any():
                        sel = torch.from_numpy(np.flatnonzero(mask))
                        x = self._on_device(tuple(im[sel.to(im.device)] for im in images), self._clip_view)
                        emb, logits = self._run_clip(x)
                        out.clip_embeddings[mask] = emb
                        out.clip_logits[mask] = logits
                else:
                    out.clip_ran = np.zeros(n, dtype=bool)
            bar.update(len(batch.indices))
            yield out
        bar.close()

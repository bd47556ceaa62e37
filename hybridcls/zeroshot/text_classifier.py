"""The class-text matrix of the zero-shot branch, and its on-disk cache.

Each class becomes one L2-normalised column built as open_clip's
``build_zero_shot_classifier`` builds it (template ensembling: the mean of the
normalised embeddings of the class in every template, normalised). A class with synonyms
or a description contributes several *phrases* (see :func:`class_phrases`);
each phrase is ensembled over the templates like a plain class name, and the
class column is the re-normalised mean of its phrases. A class with only a
name gets open_clip's column (within float rounding).

The text encoder runs on every phrase x template together, sorted by length,
each batch cut to the tokens it needs (:func:`trimmed_text_encoder`) instead of
the model's whole context (77 tokens for CLIP, where most prompts take under
20): exact for text towers with a causal attention mask, since no token then
sees the padding after it; a tower without one gets open_clip's own function.

The matrix is cached in ``<cache_dir>/text/<key>.safetensors``; the key
hashes everything the matrix depends on (see :func:`text_cache_key`), so a
second run with the same model, weights, prompts and templates does not run
the text encoder at all. The file also carries the SHA-256 of the matrix's
bytes (metadata ``sha256``): a cache file that was tampered with, truncated
or corrupted does not match and is rebuilt, never used.

Before the cache is read or the encoder run, every class text is checked
against the model's context length, and classes whose text reaches the
encoder as the same tokens are refused
(:func:`~hybridcls.zeroshot.text_checks.check_class_text`), so a matrix cached
by an older version for text the model cannot see is never used; once the
matrix is there, near-identical columns of a model with weights are warned
about.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip import CLIP, build_zero_shot_classifier
from open_clip.transformer import TextTransformer, text_global_pool
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from hybridcls.cache import atomic_path, resolve_cache_dir, stable_hash
from hybridcls.errors import ResourceUseWarning
from hybridcls.zeroshot.defaults import LOCAL_DIR_PREFIX
from hybridcls.zeroshot.loading import ClipBundle
from hybridcls.zeroshot.prompts import (
    PromptSet,
    TemplateSet,
    as_prompt_set,
    as_template_set,
    class_phrases,
)
from hybridcls.zeroshot.text_checks import check_class_text, warn_similar_classes

__all__ = [
    "TEXT_CACHE_VERSION",
    "build_text_classifier",
    "class_phrases",
    "text_cache_key",
    "text_cache_path",
    "trimmed_text_encoder",
]

# Bump when the way columns are computed changes, so old cache files are ignored.
TEXT_CACHE_VERSION = 1
_TENSOR_NAME = "text_features"
# open_clip's path (towers the trimmed encoder does not cover): phrases per text-encoder call,
# x the number of templates = sequences per batch.
_PHRASES_PER_BATCH = 10
# The trimmed path: sequences per text-encoder call, and phrases tokenized at a time (which bounds
# the token and length arrays, however many classes a prompts file names).
_SEQUENCES_PER_BATCH = 256
_PHRASES_PER_GROUP = 512

_log = logging.getLogger(__name__)


def _model_identity(bundle: ClipBundle) -> str:
    # A local-dir folder is fully described by its config hash and weights
    # fingerprint; leaving its path out lets a moved or copied folder keep its cache.
    return "local-dir" if bundle.model_id.startswith(LOCAL_DIR_PREFIX) else bundle.model_id


def text_cache_key(
    bundle: ClipBundle, prompts: PromptSet, templates: TemplateSet | Sequence[str]
) -> str:
    """SHA-256 over everything the class-text matrix depends on.

    Cache format version, model identity, pretrained tag, weights fingerprint,
    model config hash, weight precision, every class (name, description,
    synonyms, in order) and every template (in order).
    """
    return stable_hash(
        {
            "version": TEXT_CACHE_VERSION,
            "model": _model_identity(bundle),
            # A tag also sets QuickGELU, which changes the text encoder; a weights
            # file is already covered by its fingerprint, wherever it lies.
            "pretrained": "<file>"
            if bundle.pretrained == bundle.weights_path
            else bundle.pretrained,
            "fingerprint": bundle.fingerprint,
            "config": bundle.config_hash,
            "precision": bundle.precision,
            "classes": [[c.name, c.description, list(c.synonyms)] for c in prompts],
            "templates": list(templates),
        }
    )


def text_cache_path(cache_dir: str | os.PathLike[str] | None, key: str) -> Path:
    """Where the matrix for ``key`` lives under a cache root (None = default root)."""
    return resolve_cache_dir(cache_dir) / "text" / f"{key}.safetensors"


def _load_cached(path: Path, key: str, shape: tuple[int, int]) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensor = fh.get_tensor(_TENSOR_NAME)
    # A torn or foreign file is rebuilt, never fatal.
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as exc:
        _log.warning("ignoring unreadable text cache %s: %s", path, exc)
        return None
    if (
        meta.get("key") != key
        or tuple(tensor.shape) != shape
        or tensor.dtype != torch.float32
        or not bool(torch.isfinite(tensor).all())
        or meta.get("sha256") != _content_hash(tensor)
    ):
        _log.warning("ignoring text cache %s: it does not match the current inputs", path)
        return None
    return tensor


def _content_hash(matrix: torch.Tensor) -> str:
    return hashlib.sha256(matrix.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _save_cached(
    path: Path,
    key: str,
    matrix: torch.Tensor,
    bundle: ClipBundle,
    prompts: PromptSet,
    n_templates: int,
) -> None:
    meta = {
        "key": key,
        "hybridcls_cache_version": str(TEXT_CACHE_VERSION),
        "model_id": bundle.model_id,
        "pretrained": bundle.pretrained or "",
        "fingerprint": bundle.fingerprint,
        "classes": json.dumps(prompts.names, ensure_ascii=False),
        "n_templates": str(n_templates),
        "sha256": _content_hash(matrix),
    }
    try:
        with atomic_path(path) as tmp:
            save_file({_TENSOR_NAME: matrix.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    except OSError as exc:
        # A read-only or full cache disk costs a rebuild next time, not this prediction.
        warnings.warn(f"could not write the text cache {path}: {exc}", ResourceUseWarning, stacklevel=3)


def trimmed_text_encoder(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The model's text encoder on tokens cut to the length their pooled token needs, when exact.

    open_clip pads every prompt to the model's context (77 tokens for CLIP)
    and pools one token of the output (the end-of-text token for CLIP). In a
    text tower whose attention is causal, a token's output depends on the
    tokens before it only, so the pooled token's output is the same whether
    the padding after it is there or not: encoding ``tokens[:, :L]``, with
    ``L`` one past the last pooled position of the batch, gives the same
    embeddings as the full context, at a fraction of the cost (attention
    grows with the square of the length). The pooled position is found by
    open_clip's own pooling rule (``text_global_pool``), so that ``argmax``,
    ``eos``, ``first`` and ``last`` pooling are all cut right (``last`` keeps the
    whole context).

    Args:
        model: An open_clip model.

    Returns:
        ``f(tokens [N, context]) -> [N, embed_dim]`` L2-normalised float32 embeddings,
        or None for a tower where cutting would change the result: no causal mask
        (bidirectional text towers, SigLIP's), a class token appended after the
        text (CoCa), a padding mask, no pooling, or a text tower other than
        open_clip's own (Hugging Face encoders).
    """
    if isinstance(model, CLIP):
        tower, pool, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", None)
    elif isinstance(getattr(model, "text", None), TextTransformer):
        tower, pool, eos_id = model.text, model.text.pool_type, model.text.eos_id
        if tower.cls_emb is not None or tower.use_pad_mask:
            return None
    else:
        return None
    if getattr(tower, "attn_mask", None) is None or pool not in ("argmax", "eos", "first", "last"):
        return None

    def encode(tokens: torch.Tensor) -> torch.Tensor:
        n, context = tokens.shape
        # open_clip's rule picks each row's pooled position out of a tensor of positions.
        positions = torch.arange(context, device=tokens.device).expand(n, context).unsqueeze(-1)
        length = int(text_global_pool(positions, tokens, pool, eos_token_id=eos_id).max()) + 1
        text = tokens[:, :length]
        cast_dtype = tower.transformer.get_cast_dtype()
        # CLIP.encode_text / TextTransformer.forward, with the positions and the mask cut to length.
        x = tower.token_embedding(text).to(cast_dtype)
        x = x + tower.positional_embedding[:length].to(cast_dtype)
        x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
        x = text_global_pool(tower.ln_final(x), text, pool, eos_token_id=eos_id)
        if isinstance(tower.text_projection, torch.nn.Linear):
            x = tower.text_projection(x)
        elif tower.text_projection is not None:
            x = x @ tower.text_projection
        return F.normalize(x.float(), dim=-1)

    return encode


def _encode_phrases(bundle: ClipBundle, phrases: list[str], templates: list[str], progress: bool
                    ) -> torch.Tensor:
    """``[embed_dim, n_phrases]``: each phrase's normalised mean over the templates.

    Through :func:`trimmed_text_encoder` when it applies (every phrase x template
    sorted by its pooled length, batched, each batch cut to its longest), else
    through open_clip's ``build_zero_shot_classifier``.
    """
    encode = trimmed_text_encoder(bundle.model)
    if encode is None:
        return build_zero_shot_classifier(
            bundle.model, bundle.tokenizer, phrases, templates, num_classes_per_batch=_PHRASES_PER_BATCH,
            device=bundle.device, use_tqdm=progress).float()
    sums = torch.zeros(len(phrases), bundle.embed_dim, device=bundle.device)
    with torch.inference_mode(), tqdm(total=len(phrases) * len(templates), unit="text",
                                      desc="class text", disable=not progress) as bar:
        for g in range(0, len(phrases), _PHRASES_PER_GROUP):
            group = phrases[g:g + _PHRASES_PER_GROUP]
            tokens = bundle.tokenizer([t.format(p) for p in group for t in templates]).to(bundle.device)
            owner = torch.arange(len(group), device=bundle.device).repeat_interleave(len(templates)) + g
            # Shortest first, so that a batch holds texts of similar lengths (open_clip pads with
            # 0; this is only the order: each batch's cut is the pooling rule's, in encode).
            order = torch.argsort((tokens != 0).sum(dim=1), stable=True)
            for rows in order.split(_SEQUENCES_PER_BATCH):
                sums.index_add_(0, owner[rows], encode(tokens[rows]))
                bar.update(len(rows))
    # build_zero_shot_classifier's ensemble: the mean of the normalised embeddings, normalised.
    means = sums / len(templates)
    return (means / means.norm(dim=1, keepdim=True)).T.contiguous()


def _encode(
    bundle: ClipBundle, prompts: PromptSet, templates: list[str], progress: bool
) -> torch.Tensor:
    phrases: list[str] = []
    owners: list[int] = []
    for i, cp in enumerate(prompts):
        for phrase in class_phrases(cp):
            phrases.append(phrase)
            owners.append(i)
    per_phrase = _encode_phrases(bundle, phrases, templates, progress)
    if len(phrases) == len(prompts):
        return per_phrase  # names only: open_clip's matrix
    owner = torch.tensor(owners, device=per_phrase.device)
    summed = torch.zeros(per_phrase.shape[0], len(prompts), device=per_phrase.device)
    summed.index_add_(1, owner, per_phrase)
    return summed / summed.norm(dim=0, keepdim=True)


def build_text_classifier(
    bundle: ClipBundle,
    prompts: PromptSet | str | os.PathLike[str] | Sequence[str],
    templates: TemplateSet | str | os.PathLike[str] | Sequence[str] | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    progress: bool = False,
    truncate_prompts: bool = False,
) -> torch.Tensor:
    """The ``[embed_dim, n_classes]`` matrix of L2-normalised class text embeddings.

    Args:
        bundle: The loaded CLIP (:func:`~hybridcls.zeroshot.loading.load_clip`).
        prompts: A :class:`PromptSet`, a prompts file, or a list of class lines.
        templates: ``str.format`` templates with one ``{}``: a :class:`TemplateSet`,
            a templates file, a list, or None for the bundled default.
        cache_dir: Cache root (None = :func:`~hybridcls.cache.default_cache_dir`).
        use_cache: Read and write ``<cache_dir>/text/<key>.safetensors``. Randomly
            initialised models are never cached: their weights differ every run.
        progress: Show a progress bar while encoding.
        truncate_prompts: Let the tokenizer cut class texts longer than the
            model's context (with one warning that counts them) instead of refusing them.

    Returns:
        A float32 tensor on ``bundle.device``, columns in prompts order.

    Raises:
        PromptFileError: A class or template text longer than the model's context
            (without ``truncate_prompts``), or two classes whose texts reach the
            encoder as the same tokens; see
            :func:`~hybridcls.zeroshot.text_checks.check_class_text`.

    Warns:
        ClassTextWarning: Texts cut (``truncate_prompts=True``); two columns of a
            trained model with cosine similarity at least
            :data:`~hybridcls.zeroshot.text_checks.NEAR_IDENTICAL_COSINE`.

    Example:
        >>> bundle = load_clip("local-dir:tiny_clip")  # doctest: +SKIP
        >>> w = build_text_classifier(bundle, ["cat", "dog"], read_templates())  # doctest: +SKIP
        >>> w.shape  # doctest: +SKIP
        torch.Size([32, 2])
    """
    prompt_set = as_prompt_set(prompts)
    template_set = as_template_set(templates)
    template_list = list(template_set)
    # Before the cache: a matrix cached for text the model cannot see must not slip through.
    check_class_text(
        bundle.tokenizer,
        prompt_set,
        template_set,
        model=bundle.model_id,
        truncate_prompts=truncate_prompts,
    )
    cacheable = use_cache and not bundle.random_init
    matrix = None
    if cacheable:
        key = text_cache_key(bundle, prompt_set, template_list)
        path = text_cache_path(cache_dir, key)
        matrix = _load_cached(path, key, (bundle.embed_dim, len(prompt_set)))
    if matrix is None:
        matrix = _encode(bundle, prompt_set, template_list, progress)
        if cacheable:
            _save_cached(path, key, matrix, bundle, prompt_set, len(template_list))
    if not bundle.random_init:
        warn_similar_classes(matrix, prompt_set)
    return matrix.to(bundle.device)

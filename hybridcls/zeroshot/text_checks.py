"""Class text against the loaded model: what it cannot see, and what it cannot tell apart.

A CLIP text encoder reads a fixed number of tokens, its *context length*
(77 for ViT-B-32, 12 for the synthetic world's tiny CLIP), counting the start
and end tokens its tokenizer adds. open_clip's tokenizers cut a longer text
without a word, so a class whose distinguishing words come after the cut is
encoded as if they were not there, and two such classes get the same column:
every image scores exactly the same for both.

:func:`check_class_text` runs before the class-text matrix is encoded (or read
from the cache) and refuses, with ``FILE:LINE`` of every offending prompts or
templates line:

* every phrase of every class (name, synonyms, ``"NAME, DESCRIPTION"``) put
  into every template that is longer than the context; a template that is
  too long even with the shortest class text is blamed on the templates file.
  ``truncate_prompts=True`` accepts the cut and warns once, with the count;
* two classes whose texts reach the encoder as the same tokens: their
  columns are identical whatever the weights. No option allows it: their
  predictions would be decided by column order, not by the image.

:func:`warn_similar_classes` runs on the finished matrix: two columns whose
cosine similarity reaches :data:`NEAR_IDENTICAL_COSINE` get a
:class:`~hybridcls.errors.ClassTextWarning`. Randomly initialised models are
skipped: their text columns are all alike (a random ViT-B-32 with one template
puts the 50 AwA2 class names at cosine 0.88-0.99 of each other, ``class 0`` ...
``class 49`` up to 0.996), which says nothing about the prompts.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from open_clip.tokenizer import (
    HFTokenizer,
    SigLipTokenizer,
    SimpleTokenizer,
    basic_clean,
    canonicalize_text,
)

from hybridcls.errors import ClassTextWarning, PromptFileError
from hybridcls.zeroshot.prompts import PromptSet, TemplateSet, as_template_set, labelled_phrases

__all__ = [
    "NEAR_IDENTICAL_COSINE",
    "check_class_text",
    "context_length",
    "similar_column_pairs",
    "token_counts",
    "warn_similar_classes",
]

#: Cosine similarity of two class columns from which :func:`warn_similar_classes` warns.
#: Distinct class names of a trained CLIP stay well below it (at most 0.89 between the
#: 144 compositions of the synthetic world's tiny CLIP).
NEAR_IDENTICAL_COSINE = 0.999

# Problems quoted in one message before "... and N more".
_MAX_LISTED = 5
# Longest class or template text quoted in a message; longer ones keep both ends.
_QUOTE_WIDTH = 60
# Columns compared per block in similar_column_pairs: bounds memory at 1024 x n floats.
_BLOCK = 1024


def context_length(tokenizer: Callable[..., torch.Tensor]) -> int:
    """The number of tokens the model's text encoder reads (open_clip's ``context_length``).

    Raises:
        TypeError: The tokenizer does not say (not one of open_clip's).
    """
    n = getattr(tokenizer, "context_length", None)
    if not isinstance(n, int) or n < 1:
        raise TypeError(
            f"{type(tokenizer).__name__} has no context_length; use open_clip.get_tokenizer"
        )
    return n


def _token_ids(tokenizer: Callable[..., torch.Tensor], texts: list[str]) -> list[list[int]]:
    """Each text's token ids as ``tokenizer`` builds them before cutting to the context.

    Start, end and class tokens included, exactly those the tokenizer adds,
    after the same text cleaning it applies.
    """
    if isinstance(tokenizer, SimpleTokenizer):
        sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        return [[sot, *tokenizer.encode(t), eot] for t in texts]
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer
        cleaned = [tokenizer.clean_fn(t) for t in texts]
        if tokenizer.tokenizer_mode == "clips":
            # open_clip's "clips" mode adds BOS + EOS around the text and a class token at the end.
            ids = hf(cleaned, add_special_tokens=False, truncation=False)["input_ids"]
            return [[hf.bos_token_id, *x, hf.eos_token_id, hf.cls_token_id] for x in ids]
        return list(hf(cleaned, truncation=False)["input_ids"])
    if isinstance(tokenizer, SigLipTokenizer):
        cleaned = [canonicalize_text(basic_clean(t)) for t in texts]
        return list(tokenizer.tokenizer(cleaned, truncation=False)["input_ids"])
    raise TypeError(
        f"cannot count the tokens of {type(tokenizer).__name__}; "
        "expected a tokenizer from open_clip.get_tokenizer"
    )


def token_counts(tokenizer: Callable[..., torch.Tensor], texts: Sequence[str]) -> list[int]:
    """How many tokens each text takes in the model's context, start and end tokens included.

    A text fits when its count is at most :func:`context_length`; open_clip's
    tokenizers cut longer ones.

    Example:
        >>> tok = open_clip.get_tokenizer("ViT-B-32")  # doctest: +SKIP
        >>> token_counts(tok, ["a photo of a cat."])  # doctest: +SKIP
        [8]
    """
    return [len(ids) for ids in _token_ids(tokenizer, list(texts))]


def _quote(text: str) -> str:
    if len(text) <= _QUOTE_WIDTH:
        return repr(text)
    keep = (_QUOTE_WIDTH - 5) // 2
    return repr(f"{text[:keep]} ... {text[-keep:]}")


@dataclass(frozen=True)
class _Problem:
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def _listing(problems: list[_Problem]) -> str:
    """The first few ``problems``, one per line, and how many more there are."""
    shown = "\n".join(map(str, problems[:_MAX_LISTED]))
    more = len(problems) - _MAX_LISTED
    return shown + (f"\n... and {more} more" if more > 0 else "")


def _error(problems: list[_Problem], summary: str) -> PromptFileError:
    """One error for all ``problems``, located at the first; ``summary`` last."""
    first = problems[0]
    # PromptFileError writes the first problem's FILE:LINE itself.
    listing = _listing(problems)[len(f"{first.path}:{first.line}: ") :]
    return PromptFileError(first.path, first.line, f"{listing}\n{summary}")


def _overflows(
    tokenizer: Callable[..., torch.Tensor],
    counts: np.ndarray,
    limit: int,
    phrases: list[tuple[int, str, str]],
    prompts: PromptSet,
    templates: TemplateSet,
) -> list[_Problem]:
    """One problem per phrase, or template, whose texts are longer than ``limit``.

    A template is at fault (its own line) when it overflows even with the
    shortest phrase and takes more tokens than that phrase; any other
    overflow is the phrase's (its class's line, with its longest template).
    """
    own_template = np.array(token_counts(tokenizer, [t.format("") for t in templates]))
    own_phrase = np.array(token_counts(tokenizer, [text for _, _, text in phrases]))
    shortest_k = counts.argmin(axis=0)
    shortest = counts.min(axis=0)
    template_fault = (shortest > limit) & (own_template > own_phrase[shortest_k])
    # Templates first: one template at fault overflows with every class.
    problems: list[_Problem] = []
    for j in np.flatnonzero(template_fault):
        k = int(shortest_k[j])
        cp = prompts[phrases[k][0]]
        problems.append(
            _Problem(
                templates.source,
                templates.lines[j],
                f"template {_quote(templates[j])}: {int(shortest[j])} tokens even with the shortest class "
                f"text {_quote(phrases[k][2])} ({prompts.source}:{cp.line}); the limit is {limit}",
            )
        )
    for k, (ci, what, _) in enumerate(phrases):
        row = np.where(template_fault, 0, counts[k])
        n_over = int((row > limit).sum())
        if not n_over:
            continue
        j = int(row.argmax())
        cp = prompts[ci]
        others = f", and {n_over - 1} other template(s)" if n_over > 1 else ""
        label = what if what != "description" else f"description {_quote(cp.description or '')}"
        problems.append(
            _Problem(
                prompts.source,
                cp.line,
                f"class {_quote(cp.name)}, {label}: {int(counts[k, j])} tokens with template "
                f"{_quote(templates[j])} ({templates.source}:{templates.lines[j]}){others}; the limit is {limit}",
            )
        )
    return problems


def _identical_classes(
    prompts: PromptSet,
    phrases: list[tuple[int, str, str]],
    seqs: list[tuple[Any, ...]],
    n_templates: int,
) -> list[_Problem]:
    """Classes whose phrases reach the encoder as the same tokens (in the same proportions)."""
    per_class: list[Counter[tuple[Any, ...]]] = [Counter() for _ in range(len(prompts))]
    for k, (ci, _, _) in enumerate(phrases):
        per_class[ci][tuple(seqs[k * n_templates : (k + 1) * n_templates])] += 1
    first_of: dict[frozenset[Any], int] = {}
    problems: list[_Problem] = []
    for ci, phrase_tokens in enumerate(per_class):
        total = sum(phrase_tokens.values())
        # A column is the mean of its phrases' embeddings: only their proportions matter.
        key = frozenset((seq, Fraction(n, total)) for seq, n in phrase_tokens.items())
        other = first_of.setdefault(key, ci)
        if other != ci:
            a, b = prompts[other], prompts[ci]
            problems.append(
                _Problem(
                    prompts.source,
                    b.line,
                    f"class {_quote(b.name)} reaches the text encoder as exactly the same tokens as class "
                    f"{_quote(a.name)} ({prompts.source}:{a.line}) with every template",
                )
            )
    return problems


def _shortening_advice(problems: list[_Problem], templates: TemplateSet) -> str:
    """What to do about texts too long for the context, for what the user can edit."""
    if templates.source != as_template_set(None).source:
        return "Shorten them, or pass truncate_prompts=True to accept the cut."
    # The bundled templates ship inside the package: the user cannot shorten them.
    own = ("pass your own, shorter templates with templates=FILE (a templates file; in Python "
           "also a list of strings with {} for the class text)")
    if any(p.path == templates.source for p in problems):
        return (f"The bundled default templates are too long for this model and cannot be "
                f"edited: {own}, or pass truncate_prompts=True to accept the cut.")
    return f"Shorten the class text, {own}, or pass truncate_prompts=True to accept the cut."


def check_class_text(
    tokenizer: Callable[..., torch.Tensor],
    prompts: PromptSet,
    templates: TemplateSet,
    *,
    model: str,
    truncate_prompts: bool = False,
) -> None:
    """Refuse class text the model cannot see, and classes it cannot tell apart.

    Every phrase of every class (:func:`~hybridcls.zeroshot.prompts.labelled_phrases`)
    is put into every template and counted with :func:`token_counts`; nothing is encoded.

    Args:
        tokenizer: The loaded model's open_clip tokenizer.
        prompts: The classes.
        templates: The templates, with their lines.
        model: The model's name, for messages.
        truncate_prompts: Let the tokenizer cut texts longer than the context
            (one :class:`~hybridcls.errors.ClassTextWarning` with the count) instead
            of refusing them.

    Raises:
        PromptFileError: Texts longer than the context (without ``truncate_prompts``):
            ``FILE:LINE`` of each class (which phrase, which template) or template,
            its token count and the limit, the first few and the total; or two
            classes whose texts give the encoder the same tokens (names both lines).
    """
    limit = context_length(tokenizer)
    phrases = [
        (ci, what, text) for ci, cp in enumerate(prompts) for what, text in labelled_phrases(cp)
    ]
    texts = [t.format(text) for _, _, text in phrases for t in templates]
    ids = _token_ids(tokenizer, texts)
    counts = np.array([len(x) for x in ids]).reshape(len(phrases), len(templates))
    seqs: list[tuple[Any, ...]] = [tuple(x) for x in ids]
    cut = ""
    if (counts > limit).any():
        problems = _overflows(tokenizer, counts, limit, phrases, prompts, templates)
        if not truncate_prompts:
            raise _error(
                problems,
                f"{len(problems)} class phrase(s) or template(s) make texts longer than the "
                f"{limit}-token context of {model} (start and end tokens included): the tokenizer "
                "would cut them without a word and the model would never see the rest. "
                + _shortening_advice(problems, templates),
            )
        n_texts = int((counts > limit).sum())
        warnings.warn(
            f"{n_texts} of {counts.size} class texts (phrases in templates) are cut to the {limit}-token context of {model} "
            f"(truncate_prompts=True); the model does not see their ends:\n{_listing(problems)}",
            ClassTextWarning,
            stacklevel=3,
        )
        # What the encoder really receives, once cut.
        seqs = [tuple(row) for row in tokenizer(texts).tolist()]
        cut = f" once cut to its {limit}-token context"
    same = _identical_classes(prompts, phrases, seqs, len(templates))
    if same:
        n = len(same)
        raise _error(
            same,
            f"{n} class{'es reach' if n > 1 else ' reaches'} the text encoder of {model} as the same tokens "
            f"as another class{cut}: their text columns would be identical and every image would "
            f"score the same for both. Make their text differ{' within the context' if cut else ''}.",
        )


def similar_column_pairs(matrix: torch.Tensor, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs of columns whose cosine similarity is at least ``threshold``, most similar first.

    Args:
        matrix: ``[embed_dim, n_classes]`` L2-normalised columns.
        threshold: Cosine similarity in [-1, 1].

    Returns:
        ``(i, j, cosine)`` with ``i < j``, in blocks so memory stays
        ``O(block x n_classes)`` for large class lists.
    """
    w = matrix.detach().float().cpu()
    n = w.shape[1]
    pairs: list[tuple[int, int, float]] = []
    for start in range(0, n, _BLOCK):
        sims = w[:, start : start + _BLOCK].T @ w  # [block, n]
        rows, cols = torch.nonzero(sims >= threshold, as_tuple=True)
        for r, c in zip(rows.tolist(), cols.tolist()):
            if start + r < c:
                pairs.append((start + r, c, float(sims[r, c])))
    return sorted(pairs, key=lambda p: -p[2])


def warn_similar_classes(
    matrix: torch.Tensor, prompts: PromptSet, *, threshold: float | None = None
) -> None:
    """Warn (:class:`~hybridcls.errors.ClassTextWarning`) about near-identical class columns.

    Names both classes and their lines; the first few pairs and the total count.
    Call it only for trained models (see the module docstring).

    Args:
        matrix: ``[embed_dim, n_classes]`` L2-normalised columns, in ``prompts`` order.
        prompts: The classes, for their names and lines.
        threshold: Cosine similarity from which to warn (None: :data:`NEAR_IDENTICAL_COSINE`).
    """
    threshold = NEAR_IDENTICAL_COSINE if threshold is None else threshold
    pairs = similar_column_pairs(matrix, threshold)
    if not pairs:
        return
    problems = [
        _Problem(
            prompts.source,
            prompts[j].line,
            f"class {_quote(prompts[j].name)} and class {_quote(prompts[i].name)} "
            f"({prompts.source}:{prompts[i].line}): cosine similarity {sim:.5f}",
        )
        for i, j, sim in pairs
    ]
    warnings.warn(
        f"{len(pairs)} pair(s) of classes whose text columns are nearly identical (cosine >= "
        f"{threshold}); the model can hardly tell them apart, so make their text more distinct:\n"
        f"{_listing(problems)}",
        ClassTextWarning,
        stacklevel=3,
    )

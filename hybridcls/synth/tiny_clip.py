"""A tiny open_clip CLIP that knows the synthetic world, and how to remake it.

Web-scale pretraining knows a moose without ever seeing the challenge's
training set; the tiny CLIP plays that part for the synthetic world. It is
trained contrastively on an image stream independent of any world (same
renderer, its own seed stream) captioned with *every* attribute composition,
including the many that are not among a world's classes. It ships inside the
package in open_clip's ``local-dir:`` layout, so tests and the demo load it
with ``open_clip.create_model_and_transforms(TINY_CLIP_MODEL_ID)``.

Regenerate the shipped copy (a few minutes on 2 CPU cores)::

    python -m hybridcls.synth.tiny_clip --out hybridcls/synth/assets/tiny_clip

Weaker CLIPs (fewer training steps) are trained once into the cache folder and
reused: :func:`tiny_clip_model_id` (``bench quality --zoo`` varies the CLIP's
quality with them).

Example:
    >>> import open_clip
    >>> from hybridcls.synth import TINY_CLIP_MODEL_ID
    >>> model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_MODEL_ID)  # doctest: +SKIP
    >>> tokenizer = open_clip.get_tokenizer(TINY_CLIP_MODEL_ID)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from safetensors.torch import save_file
from timm.loss import SoftTargetCrossEntropy
from timm.scheduler import CosineLRScheduler

from hybridcls.cache import atomic_path, atomic_write_json, resolve_cache_dir
from hybridcls.errors import InputError
from hybridcls.synth.render import all_attributes, render
from hybridcls.synth.world import CAPTION_TEMPLATES, image_rng, make_world
from hybridcls.zeroshot.text_checks import context_length, token_counts

__all__ = [
    "DEFAULT_STEPS",
    "STREAM_CLIP",
    "TINY_CLIP_CFG",
    "TINY_CLIP_DIR",
    "TINY_CLIP_MODEL_ID",
    "TINY_CLIP_PREPROCESS",
    "caption_tokens",
    "main",
    "pretraining_batch",
    "save_tiny_clip",
    "tiny_clip_model_id",
    "train_tiny_clip",
]

TINY_CLIP_DIR: Path = Path(__file__).resolve().parent / "assets" / "tiny_clip"
TINY_CLIP_MODEL_ID: str = "local-dir:" + str(TINY_CLIP_DIR)

# open_clip model config. Most of the ~3.4 M parameters are the 49,408-row
# token table that open_clip's BPE tokenizer requires; the towers are tiny.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
# A 32 px view of the world's 64 px images: fine texture partly washes out,
# which is what keeps the zero-shot branch below a trained supervised one.
TINY_CLIP_PREPROCESS: dict[str, Any] = {
    "size": 32,
    "mode": "RGB",
    "mean": list(open_clip.OPENAI_DATASET_MEAN),
    "std": list(open_clip.OPENAI_DATASET_STD),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
# Seed stream of the pretraining images; worlds use streams 1-3 (see world.py).
STREAM_CLIP = 101
_RENDER_SIZE = 64
_EVAL_SEED = 1000
# The shipped recipe. More steps give a stronger CLIP (about 93% zero-shot at
# 1,000); 500 keeps it clearly below a trained supervised branch, as real
# CLIPs are against a fine-tuned backbone on its own classes.
DEFAULT_STEPS = 500
_BATCH_SIZE = 128


def caption_tokens(tokenizer: open_clip.SimpleTokenizer) -> torch.Tensor:
    """Token ids of every caption: shape (compositions, templates, context length).

    Raises:
        ValueError: A caption would be truncated by the context length, which
            would silently cut off the shape word.
    """
    names = [a.name for a in all_attributes()]
    captions = [t.format(n) for n in names for t in CAPTION_TEMPLATES]
    longest, limit = max(token_counts(tokenizer, captions)), context_length(tokenizer)
    if longest > limit:
        raise ValueError(f"captions need {longest} tokens; context length is {limit}")
    flat = tokenizer(captions)
    return flat.view(len(names), len(CAPTION_TEMPLATES), -1)


def pretraining_batch(
    seed: int, step: int, batch_size: int, preprocess: Any, tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of the pretraining stream: images, caption tokens, composition ids.

    Compositions are drawn uniformly from *all* of them and captioned with a
    random template; the images come from the world renderer on a seed stream
    that no world uses.
    """
    rng = image_rng(seed, STREAM_CLIP, step)
    compositions = all_attributes()
    idx = rng.integers(len(compositions), size=batch_size)
    tmpl = rng.integers(tokens.shape[1], size=batch_size)
    images = torch.stack(
        [preprocess(render(compositions[i], rng, _RENDER_SIZE)) for i in idx.tolist()]
    )
    ids = torch.from_numpy(idx)
    return images, tokens[ids, torch.from_numpy(tmpl)], ids


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # Decay only matrices: gains, biases, embeddings and the logit scale stay free.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_tiny_clip(
    *,
    steps: int = DEFAULT_STEPS,
    seed: int = 0,
    batch_size: int = _BATCH_SIZE,
    lr: float = 1e-2,
    weight_decay: float = 0.05,
    warmup: int = 50,
    log_every: int = 100,
) -> open_clip.CLIP:
    """Train the tiny CLIP contrastively on the independent pretraining stream.

    Two images of the same composition in one batch are both correct matches
    for each other's captions, so the targets are soft: each row spreads its
    mass over all same-composition entries instead of calling them negatives.

    Args:
        steps: Optimisation steps; fewer steps give a weaker CLIP.
        seed: Seeds the initial weights and the image stream.
        batch_size: Image-caption pairs per step.
        lr: Peak AdamW learning rate (cosine decay after a linear warmup).
        weight_decay: AdamW weight decay on weight matrices.
        warmup: Warmup steps.
        log_every: Print the loss every this many steps (0: never).

    Returns:
        The trained model, in float32, in eval mode.

    Example:
        >>> model = train_tiny_clip(steps=10, log_every=0)  # doctest: +SKIP
    """
    torch.manual_seed(seed)
    model = open_clip.CLIP(**copy.deepcopy(TINY_CLIP_CFG))
    preprocess = image_transform_v2(PreprocessCfg(**TINY_CLIP_PREPROCESS), is_train=False)
    tokenizer = open_clip.SimpleTokenizer(
        context_length=TINY_CLIP_CFG["text_cfg"]["context_length"]
    )
    tokens = caption_tokens(tokenizer)

    optimizer = torch.optim.AdamW(
        _param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = CosineLRScheduler(
        optimizer, t_initial=steps, lr_min=lr * 0.02, warmup_t=warmup, warmup_lr_init=lr * 0.01
    )
    loss_fn = SoftTargetCrossEntropy()
    model.train()
    start = time.monotonic()
    for step in range(steps):
        images, texts, ids = pretraining_batch(seed, step, batch_size, preprocess, tokens)
        image_features, text_features, logit_scale = model(images, texts)
        logits = logit_scale * image_features @ text_features.T
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        # ``same`` is symmetric, so the text-to-image direction shares the target.
        loss = (loss_fn(logits, target) + loss_fn(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(step + 1)
        with torch.no_grad():
            # As in CLIP: a temperature above 100 destabilises training.
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step + 1) % log_every == 0:
            print(
                f"step {step + 1}/{steps}  loss {loss.item():.3f}  "
                f"scale {model.logit_scale.exp().item():.1f}  {time.monotonic() - start:.0f}s",
                flush=True,
            )
    return model.eval()


def save_tiny_clip(
    model: open_clip.CLIP, out_dir: str | os.PathLike[str], *, info: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` in open_clip's ``local-dir:`` layout.

    ``open_clip_config.json`` holds ``model_cfg`` and ``preprocess_cfg`` (what
    open_clip reads) plus ``hybridcls`` (the recipe and measured figures, for
    people). Weights go to ``open_clip_model.safetensors`` in float16, which
    keeps the folder under 10 MB; open_clip casts them back to float32.

    Args:
        model: A model built from :data:`TINY_CLIP_CFG`.
        out_dir: Directory to write (created if needed).
        info: Extra provenance stored under the ``hybridcls`` key.

    Returns:
        ``out_dir`` as a ``Path``; load it with ``"local-dir:" + str(path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Integer buffers (BatchNorm's num_batches_tracked) keep their dtype.
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_path(out / "open_clip_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    _write_config(out, info or {})
    return out


def _write_config(out: Path, info: dict[str, Any]) -> None:
    config = {"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_CLIP_PREPROCESS, "hybridcls": info}
    atomic_write_json(out / "open_clip_config.json", config)


def _recipe(steps: int, seed: int, batch_size: int) -> dict[str, int]:
    """The ``hybridcls.recipe`` entry of a tiny CLIP's config: what identifies its weights."""
    return {"steps": steps, "seed": seed, "batch_size": batch_size}


def tiny_clip_model_id(steps: int = DEFAULT_STEPS, *, seed: int = 0, batch_size: int = _BATCH_SIZE,
                       cache_dir: str | os.PathLike[str] | None = None, log_every: int = 0) -> str:
    """The open_clip model id of the tiny CLIP trained for ``steps`` steps with ``seed``.

    The shipped recipe (:data:`DEFAULT_STEPS` steps, seed 0, batch 128) is the shipped
    folder (:data:`TINY_CLIP_MODEL_ID`); any other is trained once
    (:func:`train_tiny_clip`) into
    ``<cache_dir>/tiny_clip/steps<steps>-seed<seed>-batch<batch_size>/`` and reused from
    there afterwards: a folder is reused only when its config records that recipe.
    Fewer steps give a weaker CLIP (docs/synthetic.md measures them).

    Args:
        steps: Training steps (at least 1).
        seed: Training seed.
        batch_size: Image-caption pairs per step (at least 2).
        cache_dir: The cache folder (default: :func:`hybridcls.cache.default_cache_dir`).
        log_every: Print the loss every this many steps while training (0: never).

    Returns:
        ``"local-dir:<folder>"``.

    Raises:
        InputError: ``steps`` below 1 or ``batch_size`` below 2.

    Example:
        >>> weak = tiny_clip_model_id(200)  # doctest: +SKIP
        >>> weak.startswith("local-dir:")  # doctest: +SKIP
        True
    """
    for name, value, least in (("steps", steps, 1), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name} must be a whole number of at least {least}, got {value!r}")
    recipe = _recipe(steps, seed, batch_size)
    if recipe == _recipe(DEFAULT_STEPS, 0, _BATCH_SIZE):
        return TINY_CLIP_MODEL_ID
    folder = resolve_cache_dir(cache_dir) / "tiny_clip" / f"steps{steps}-seed{seed}-batch{batch_size}"
    if _trained_with(folder) != recipe:
        model = train_tiny_clip(steps=steps, seed=seed, batch_size=batch_size, log_every=log_every)
        # Written beside the final folder, then renamed into place: a reader never sees
        # half a model, and a folder whose recipe differs (or a torn one) is replaced.
        tmp = folder.parent / f".{folder.name}.{secrets.token_hex(6)}.tmp"
        save_tiny_clip(model, tmp, info={"recipe": recipe})
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process put the same model there first
            shutil.rmtree(tmp, ignore_errors=True)
    return "local-dir:" + str(folder)


def _trained_with(folder: Path) -> dict[str, Any] | None:
    """The recipe a cached tiny CLIP folder records, or None when it holds no complete model."""
    try:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (folder / "open_clip_model.safetensors").is_file():
        return None
    return config.get("hybridcls", {}).get("recipe")


def main(argv: Sequence[str] | None = None) -> int:
    """Train, save and evaluate the tiny CLIP: ``python -m hybridcls.synth.tiny_clip --out DIR``.

    Example:
        >>> main(["--out", "tiny_clip", "--steps", "1000"])  # doctest: +SKIP
    """
    # Imported here: evaluate imports this module for TINY_CLIP_MODEL_ID.
    from hybridcls.synth.evaluate import zero_shot_accuracy

    parser = argparse.ArgumentParser(
        prog="python -m hybridcls.synth.tiny_clip",
        description="Train the synthetic world's tiny CLIP, save it in local-dir: layout, "
        "and print its zero-shot top-1 on a fresh world.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write the model into")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        help=f"training steps (default: {DEFAULT_STEPS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    parser.add_argument("--batch-size", type=int, default=_BATCH_SIZE,
                        help=f"pairs per step (default: {_BATCH_SIZE})")
    parser.add_argument(
        "--eval-seed",
        type=int,
        default=_EVAL_SEED,
        help=f"seed of the evaluation world (default: {_EVAL_SEED})",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2:
        parser.error("--steps must be >= 1 and --batch-size >= 2")

    start = time.monotonic()
    model = train_tiny_clip(steps=args.steps, seed=args.seed, batch_size=args.batch_size)
    minutes = (time.monotonic() - start) / 60
    recipe = _recipe(args.steps, args.seed, args.batch_size)
    save_tiny_clip(model, args.out, info={"recipe": recipe})

    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(Path(tmp) / "world", seed=args.eval_seed, train_per_class=(1, 1))
        acc = zero_shot_accuracy(world, "local-dir:" + str(args.out))
    _write_config(args.out, {"recipe": recipe, "zero_shot": {"eval_seed": args.eval_seed, **acc}})
    size_mb = (args.out / "open_clip_model.safetensors").stat().st_size / 1e6
    print(f"saved {args.out} ({size_mb:.1f} MB) after {minutes:.1f} min of training")
    print(
        f"zero-shot top-1 on a fresh world (seed {args.eval_seed}, 50 classes): "
        f"overall {acc['overall']:.1%}  seen {acc['seen']:.1%}  unseen {acc['unseen']:.1%}"
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

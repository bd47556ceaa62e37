"""``hybridcls models``: the open_clip models and pretrained tags, and which are already cached.

Offline: the caches are read, nothing is downloaded. A model marked cached
loads with ``HF_HUB_OFFLINE=1`` (the same files ``predict`` looks for first,
:func:`~hybridcls.zeroshot.loading.list_pretrained_weights`).
"""

from __future__ import annotations

import argparse
import sys

from hybridcls.cli.common import UsageError
from hybridcls.runtime import RuntimeSettings
from hybridcls.zeroshot.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "models",
        help="list the open_clip models and pretrained tags, and which are in the local cache",
        description="List every model and pretrained tag open_clip knows (open_clip.list_pretrained()) "
                    "and the hf-hub: open_clip models found in the Hugging Face cache, with the "
                    "weights file already on this machine ('-' when predict would download it). "
                    "Offline: nothing is downloaded.",
    )
    parser.add_argument("--cached", action="store_true", help="only the models already in the cache")
    parser.add_argument("--filter", metavar="TEXT", default=None,
                        help="only models or tags containing TEXT (case-insensitive), e.g. ViT-B-32")
    parser.add_argument("--cache-dir", default=RuntimeSettings.cache_dir, metavar="DIR",
                        help="the weights cache predict's --cache-dir names (default: the Hugging "
                             "Face cache and open_clip's ~/.cache/clip)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # open_clip and huggingface_hub are imported when the command runs
    from hybridcls.zeroshot.loading import cached_hub_models, list_pretrained_weights

    if args.filter is not None and not args.filter.strip():
        raise UsageError("--filter needs some text, e.g. --filter ViT-B")
    entries = list_pretrained_weights(args.cache_dir) + cached_hub_models(args.cache_dir)
    if args.filter:
        needle = args.filter.strip().lower()
        entries = [e for e in entries if needle in e.model.lower() or needle in (e.pretrained or "").lower()]
    n_cached = sum(e.path is not None for e in entries)
    shown = [e for e in entries if e.path is not None or not args.cached]
    rows = [("MODEL", "PRETRAINED", "CACHED")]
    for e in shown:
        tag = e.pretrained or "-"
        if (e.model, e.pretrained) == (DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED):
            tag += " (default)"
        rows.append((e.model, tag, e.path or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for model, tag, path in rows:
        print(f"{model:<{widths[0]}}  {tag:<{widths[1]}}  {path}")
    print(f"hybridcls models: {n_cached} of {len(entries)} in the cache "
          f"({args.cache_dir or 'Hugging Face cache and ~/.cache/clip'})", file=sys.stderr)
    return 0

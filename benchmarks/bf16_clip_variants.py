"""Could the CLIP image tower run in bfloat16 under ``precision="auto"``? (issue 15)

The agreement rule for ``auto`` is top-1 agreement with float32 of at least 99.5% on the
synthetic world. The bfloat16 copy of the CLIP image tower that ``precision="bf16"``
runs (:func:`hybridcls.device.bf16_copy`: every weight and activation in bfloat16) keeps
97.9% of the tiny CLIP's zero-shot answers (docs/benchmarks.md). This script measures two
gentler variants on the same 1,000 test images, against float32:

* bfloat16 autocast (torch's own: matrix products in bfloat16, normalisation and the
  residual stream in float32);
* ``mixed``: a copy whose Linear, Conv2d and MultiheadAttention layers run in bfloat16 on
  bfloat16 inputs and hand float32 back, everything else float32 (what autocast does,
  without taking ``nn.MultiheadAttention`` off its fused path). Layers whose owner reads
  their weights itself (attention pooling) stay float32.

Usage (from the repository root; reuses ``--out`` from ``benchmarks.cpu_agreement``'s world
run when it is there):
    python -m benchmarks.bf16_clip_variants --out runs/cpu-agreement
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hybridcls.bench.quality import labelled_test_set, prepare_world_run
from hybridcls.device import _reads_weights_directly, bf16_copy

__all__ = ["main", "mixed_bf16_copy"]

_HEAVY = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)


class _Bf16Layer(torch.nn.Module):
    """One layer in bfloat16 between float32 neighbours: inputs cast down, outputs cast back."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer).to(torch.bfloat16)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = next(a.dtype for a in args if torch.is_tensor(a))

        def down(a: Any) -> Any:
            return a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a

        out = self.layer(*map(down, args), **{k: down(v) for k, v in kwargs.items()})
        if isinstance(out, tuple):
            return tuple(o.to(dtype) if torch.is_tensor(o) else o for o in out)
        return out.to(dtype)


def mixed_bf16_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose Linear, Conv2d and MultiheadAttention layers run in bfloat16."""
    out = copy.deepcopy(module)

    def walk(parent: torch.nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if type(child) in _HEAVY and not _reads_weights_directly(parent, name):
                setattr(parent, name, _Bf16Layer(child))
            else:
                walk(child)

    walk(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cpu-agreement"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    world, clf, _ = prepare_world_run(args.out / "world_run", seed=0)
    sources, y = labelled_test_set(world, clf)
    preprocess = clf.tower_.bundle.preprocess
    with torch.inference_mode():
        x = torch.stack([preprocess(Image.open(s.path).convert("RGB")) for s in sources])
        visual = clf.tower_.bundle.model.visual.eval()

        def zero_shot(fn: Any) -> np.ndarray:
            emb = torch.nn.functional.normalize(fn(x).float(), dim=-1)
            return clf.tower_.logits_from_embeddings(emb).numpy().argmax(axis=1)

        def autocast(t: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return visual(t)

        ref = zero_shot(visual)
        copied = bf16_copy(visual)
        variants = {"bf16 copy (precision='bf16')": zero_shot(lambda t: copied(t.to(torch.bfloat16))),
                    "bf16 autocast": zero_shot(autocast),
                    "mixed (bf16 layers, float32 stream)": zero_shot(mixed_bf16_copy(visual))}
    def percent(hits: np.ndarray) -> float:
        return round(100 * float(np.mean(hits)), 2)

    results = {"float32 zero-shot top-1": percent(ref == y), **{
        name: {"top-1 agreement with float32": percent(p == ref), "zero-shot top-1": percent(p == y)}
        for name, p in variants.items()}}
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

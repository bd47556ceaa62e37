"""The offline synthetic open-set world and its tiny CLIP.

:func:`make_world` writes a deterministic open-set problem shaped like the
animal challenge (by default 50 attribute-composed classes, 40 seen, 10
unseen); :data:`TINY_CLIP_MODEL_ID` names a tiny open_clip model, shipped in
the package, that knows every composition from its own pretraining stream;
:func:`zero_shot_accuracy` measures it on a world. See ``docs/synthetic.md``.

Importing this package loads only numpy and PIL; torch and open_clip load on
first use of the tiny-CLIP names.

Example:
    >>> from hybridcls.synth import make_world, zero_shot_accuracy
    >>> world = make_world("synthetic-world", seed=0)  # doctest: +SKIP
    >>> zero_shot_accuracy(world)["unseen"] >= 0.7  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hybridcls._lazy import lazy_getattr
from hybridcls.synth.world import World, make_world

if TYPE_CHECKING:
    from hybridcls.synth.evaluate import zero_shot_accuracy
    from hybridcls.synth.hierarchy import hierarchy_prompts, write_hierarchy_prompts
    from hybridcls.synth.tiny_clip import TINY_CLIP_DIR, TINY_CLIP_MODEL_ID

__all__ = ["TINY_CLIP_DIR", "TINY_CLIP_MODEL_ID", "World", "hierarchy_prompts", "make_world",
           "write_hierarchy_prompts", "zero_shot_accuracy"]

# Names whose modules import torch and open_clip: resolved on first access
# (PEP 562) so that generating a world stays a numpy + PIL affair.
_LAZY = {
    "TINY_CLIP_DIR": "hybridcls.synth.tiny_clip",
    "TINY_CLIP_MODEL_ID": "hybridcls.synth.tiny_clip",
    "zero_shot_accuracy": "hybridcls.synth.evaluate",
    "hierarchy_prompts": "hybridcls.synth.hierarchy",
    "write_hierarchy_prompts": "hybridcls.synth.hierarchy",
}


__getattr__ = lazy_getattr(__name__, _LAZY)

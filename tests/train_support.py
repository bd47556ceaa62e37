"""Helpers shared by the tests that start training subprocesses (faults, distributed)."""

from __future__ import annotations

import os
from pathlib import Path

from hybridcls.synth import World, make_world

__all__ = ["REPO_ROOT", "small_world", "worker_env"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def worker_env() -> dict[str, str]:
    """The environment for a ``python -m hybridcls`` subprocess: this checkout first, 1 thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def small_world(folder: Path, seed: int, n_seen: int) -> World:
    """A synthetic world of ``n_seen`` seen classes with 20 to 30 training images each, 32 px."""
    return make_world(
        folder / "world",
        seed=seed,
        n_classes=n_seen + 1,
        n_unseen=1,
        train_per_class=(20, 30),
        test_per_class=1,
        image_size=32,
    )

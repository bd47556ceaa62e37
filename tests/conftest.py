"""Shared test setup: offline, deterministic, and fair to 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a model hub; loading code has to fail fast and clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS_DIR = Path(os.environ.get("HYBRIDCLS_PHOTOS", REPO_ROOT.parent / "shared" / "data" / "photos"))


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread per test process: with tiny models, thread start-up and contention
    # (pytest-xdist runs one process per core) cost far more than they give.
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """The real photos shared beside the repository; skips when they are absent."""
    if not PHOTOS_DIR.is_dir():
        pytest.skip(f"real photos not found at {PHOTOS_DIR} (set HYBRIDCLS_PHOTOS)")
    return PHOTOS_DIR


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory: pytest.TempPathFactory):
    """The default synthetic open-set world, generated once per test session."""
    from hybridcls.synth import make_world

    return make_world(tmp_path_factory.mktemp("world") / "world", seed=0)


@pytest.fixture(scope="session")
def world_run(tmp_path_factory: pytest.TempPathFactory):
    """The synthetic world with a trained, calibrated hybrid (shipped tiny CLIP), built once.

    Returns ``(world, classifier)``; the classifier is calibrated by leave-classes-out.
    """
    from hybridcls.bench.quality import prepare_world_run

    out = tmp_path_factory.mktemp("world_run")
    world, clf, _ = prepare_world_run(out, seed=0)
    return world, clf

"""Shared test setup: offline, deterministic, and fair to 2 cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach a model hub; loading code has to fail fast and clearly instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS_DIR = Path(os.environ.get("HYBRIDCLS_PHOTOS", REPO_ROOT.parent / "shared" / "data" / "photos"))
#: hybridcls.device.AUTO_BF16_CPU_TOWERS as shipped (pytest_configure empties it for the tests).
SHIPPED_AUTO_BF16_CPU_TOWERS: frozenset[str] = frozenset()


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread per test process: with tiny models, thread start-up and contention
    # (pytest-xdist runs one process per core) cost far more than they give.
    import torch

    torch.set_num_threads(1)
    # precision="auto" runs the CNN in bfloat16 on CPUs that compute it natively: the tests'
    # figures must not depend on the machine's instruction set, so here "auto" is float32 on
    # every CPU (tests of that rule set it themselves).
    import hybridcls.device

    global SHIPPED_AUTO_BF16_CPU_TOWERS
    SHIPPED_AUTO_BF16_CPU_TOWERS = hybridcls.device.AUTO_BF16_CPU_TOWERS
    hybridcls.device.AUTO_BF16_CPU_TOWERS = frozenset()


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


@pytest.fixture(scope="session")
def tiny_hybrid(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small world (4 seen + 2 unseen classes, 32 px) with a one-epoch ``test_convnext`` run,
    calibrated with the defaults and the shipped tiny CLIP, built once (seconds).

    Returns ``{"root", "world", "run", "common"}``; ``common`` are the CLIP and runtime flags
    of ``predict`` / ``calibrate`` for it.
    """
    from hybridcls.cli import main
    from hybridcls.synth import TINY_CLIP_MODEL_ID, make_world
    from hybridcls.train import train

    root = tmp_path_factory.mktemp("tiny_hybrid")
    world = make_world(root / "world", seed=1, n_classes=6, n_unseen=2, train_per_class=(10, 12),
                       test_per_class=2, image_size=32)
    train(world.train_dir, root / "run", model="test_convnext", pretrained=False, freeze=None,
          image_size=32, epochs=1, seed=0, device="cpu", workers=0)
    common = ["--prompts", str(world.prompts_file), "--templates", str(world.templates_file),
              "--clip-model", TINY_CLIP_MODEL_ID, "--cache-dir", str(root / "cache"),
              "--device", "cpu", "--workers", "0"]
    assert main(["calibrate", str(root / "run"), *common, "-q"]) == 0
    return {"root": root, "world": world, "run": root / "run", "common": common}

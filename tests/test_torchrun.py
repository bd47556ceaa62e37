"""torchrun's environment and process group: the one reader and the one join, for training and prediction."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from hybridcls.errors import InputError
from hybridcls.torchrun import (
    BARRIER_TIMEOUT,
    torchrun_group,
    torchrun_local_rank,
    torchrun_world,
)

VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def env(monkeypatch):
    """A clean torchrun environment; returns a setter."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_


def test_one_process_without_or_with_a_world_of_one(env):
    assert torchrun_world() is None
    env(WORLD_SIZE=1, RANK=0)
    assert torchrun_world() is None


def test_world_reads_rank_size_and_local_rank(env):
    env(WORLD_SIZE=4, RANK=3, LOCAL_RANK=1)
    assert torchrun_world() == (3, 4, 1)
    assert torchrun_local_rank() == 1


def test_missing_local_rank_is_the_rank_unless_required(env):
    env(WORLD_SIZE=2, RANK=1)
    assert torchrun_world() == (1, 2, 1)
    with pytest.raises(InputError, match=r"^WORLD_SIZE=2 but LOCAL_RANK, MASTER_PORT not set; go$"):
        torchrun_world(require=("LOCAL_RANK", "MASTER_PORT"), hint="go")
    assert torchrun_local_rank() == 0  # a group made without torchrun: its first worker


@pytest.mark.parametrize("values, message", [
    ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": 2, "RANK": 1, "LOCAL_RANK": "x"}, "environment variable LOCAL_RANK='x' is not an integer"),
    ({"WORLD_SIZE": 2}, "WORLD_SIZE=2 but RANK not set; start with torchrun"),
    ({"WORLD_SIZE": 2, "RANK": 2}, "WORLD_SIZE=2 but RANK='2'; start with torchrun"),
    ({"WORLD_SIZE": 2, "RANK": -1}, "WORLD_SIZE=2 but RANK='-1'; start with torchrun"),
])
def test_an_incomplete_or_wrong_environment_is_refused(env, values, message):
    env(**values)
    with pytest.raises(InputError) as info:
        torchrun_world()
    assert str(info.value) == message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("barriers_only, init", [
    # prediction: barriers only, and the first rank waits for the last at them
    (True, {"backend": "gloo", "timeout": BARRIER_TIMEOUT}),
    # training: torch's default timeout; NCCL (and its device) only for a CUDA worker
    (False, {"backend": "gloo", "device_id": None}),
])
def test_group_on_the_cpu_is_gloo_and_left_behind_as_found(env, monkeypatch, barriers_only, init):
    import torch.distributed as dist

    calls = []
    real = dist.init_process_group

    def spy(*args, **kwargs):
        calls.append(dict(zip(("backend",), args), **kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(dist, "init_process_group", spy)
    env(WORLD_SIZE=1, RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    with torchrun_group(None, barriers_only=barriers_only) as group:
        assert group is dist and dist.get_backend() == "gloo"
        with torchrun_group(None, barriers_only=barriers_only):  # the caller's group: used, kept
            pass
        assert dist.is_initialized()
    assert not dist.is_initialized()
    assert calls == [init]


def test_reading_the_environment_does_not_import_torch():
    # `hybridcls merge` and predict's flag checks read it and must not pay for torch.
    code = ("import sys, hybridcls.torchrun, hybridcls.sharding; "
            "hybridcls.torchrun.torchrun_world(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

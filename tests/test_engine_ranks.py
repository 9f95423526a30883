"""The parts of one-engine-per-rank that need no engine: which devices a rank's engine sees, the
launch checks, and how an engine that fails on one rank stops every rank. The engines themselves
run in tests/test_vllm_ranks.py (vLLM environment)."""

from __future__ import annotations

import pytest

from repo_rl.config import build_config
from repo_rl.config.checks import check_launch
from repo_rl.engines.vllm import engine_devices
from repo_rl.errors import UserError
from repo_rl.run.distributed import Dist


@pytest.mark.parametrize(
    "visible,index,count,tp,expected",
    [
        (None, 0, 4, 1, "0"),
        (None, 3, 4, 1, "3"),
        ("4,5,6,7", 1, 4, 1, "5"),  # the trainer's cuda:1 is physical device 5
        ("4, 5,6,7", 0, 4, 2, "4,5"),
        ("2", 0, 1, 1, "2"),
    ],
)
def test_each_rank_engine_sees_its_own_device(visible, index, count, tp, expected):
    assert engine_devices(visible, index, count, tp) == expected


@pytest.mark.parametrize("visible,index,count,tp", [(None, 4, 4, 1), ("0,1", 1, 2, 2), ("", 0, 0, 1)])
def test_more_engines_than_devices_is_one_line(visible, index, count, tp):
    with pytest.raises(UserError, match="launch at most one process per device") as e:
        engine_devices(visible, index, count, tp)
    assert "\n" not in str(e.value)


def _cfg(**over):
    return build_config({}, [f"{k}={v}" for k, v in over.items()])


def test_launch_checks():
    check_launch(_cfg(**{"train.prompts_per_step": 4}), 2)
    with pytest.raises(UserError, match="expected a multiple of the 3 processes"):
        check_launch(_cfg(**{"train.prompts_per_step": 4}), 3)
    tp2 = {"generation.backend": "vllm", "generation.vllm_tensor_parallel_size": 2, "train.prompts_per_step": 4}
    check_launch(_cfg(**tp2), 1)  # one process: one tensor-parallel engine
    with pytest.raises(UserError, match="vllm_tensor_parallel_size=2 with 2 processes: not supported"):
        check_launch(_cfg(**tp2), 2)
    check_launch(_cfg(**dict(tp2, **{"generation.backend": "hf"})), 2)  # the HF sampler has no engine to split


def _two_ranks(rank, other_error):
    d = Dist()
    d.world, d.rank = 2, rank
    d.gather = lambda mine: [mine, other_error] if rank == 0 else [other_error, mine]
    return d


def test_an_engine_that_fails_on_one_rank_stops_every_rank_with_its_error():
    closed = []
    d = _two_ranks(0, "RuntimeError: no free port")
    with pytest.raises(UserError, match=r"the engine failed to start on rank 1 of 2: RuntimeError: no free port"):
        d.on_every_rank("the engine", lambda: "built", close=closed.append)
    assert closed == ["built"]  # what rank 0 started is released

    # The failing rank raises its own exception, after telling the others.
    told = []
    d = _two_ranks(1, None)
    d.gather = lambda mine: told.append(mine) or [None, mine]
    with pytest.raises(ValueError, match="bad weights"):
        d.on_every_rank("the engine", lambda: (_ for _ in ()).throw(ValueError("bad weights")))
    assert told == ["ValueError: bad weights"]

    # Every rank started: each gets its own engine.
    assert _two_ranks(0, None).on_every_rank("the engine", lambda: "mine") == "mine"


def test_one_process_gets_the_original_exception():
    with pytest.raises(KeyError):
        Dist().on_every_rank("the engine", lambda: {}["x"])


def test_the_weights_file_goes_to_shared_memory_only_when_it_fits(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from repo_rl.engines.vllm import sync_dir

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert sync_dir(400 * 10**6, str(tmp_path)) == str(tmp_path)  # room for the file and the next one
    assert sync_dir(600 * 10**6, str(tmp_path)) is None  # a 64 MB-style /dev/shm: the temporary directory instead
    assert sync_dir(1, str(tmp_path / "missing")) is None

"""glibc mmap threshold lever (``train.mmap_threshold_kb``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repo_rl.config import ConfigError, build_config
from repo_rl.run.malloc import set_mmap_threshold


def test_zero_leaves_glibc_alone():
    assert set_mmap_threshold(0) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_threshold_is_set_in_a_fresh_process():
    # A subprocess, so the test process keeps glibc's default behaviour.
    code = (
        "from repo_rl.run.malloc import set_mmap_threshold; import platform;"
        "ok = set_mmap_threshold(128);"
        "print(ok, platform.libc_ver()[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(out[1:] == ["glibc"])  # True exactly where glibc is the C library


@pytest.mark.parametrize("bad", [-1, 32 * 1024 + 1])
def test_out_of_range_values_are_refused(bad):
    with pytest.raises(ConfigError, match="train.mmap_threshold_kb"):
        build_config({}, [f"train.mmap_threshold_kb={bad}"])

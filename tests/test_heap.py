"""The allocator settings of the command line and its dask workers (gpucal/heap.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpucal.heap import MALLOC_ENV, MMAP_MAX, TRIM, keep_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_keep_heap_takes_effect_on_glibc_and_not_when_told(monkeypatch):
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_heap() is True
    monkeypatch.setenv("GPUCAL_MALLOC", "system")
    assert keep_heap() is False


def test_workers_spawn_with_the_heap_settings_not_dasks_trim(monkeypatch):
    pytest.importorskip("distributed")
    from gpucal.distributed import _worker_environ

    env = _worker_environ()
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(TRIM) != "65536"
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(MMAP_MAX)
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("GPUCAL_MALLOC", "system")
    assert not set(MALLOC_ENV) & set(_worker_environ())  # nor dask's 65536: the C library's defaults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's environment variables")
def test_a_process_started_with_the_environment_runs():
    """glibc accepts the values (an out-of-range MALLOC_MMAP_THRESHOLD_ is ignored, not fatal; this
    checks the spawned interpreter starts and computes)."""
    code = "import numpy as np; a = np.ones((40, 8, 4000)); print(float((a * 2).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env={**MALLOC_ENV, "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and float(out.stdout) == 2.0 * 40 * 8 * 4000, out.stderr

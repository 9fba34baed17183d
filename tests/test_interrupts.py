"""Interrupts and temporary files (issue 19): one line and 130/143, nothing half-written left behind.

* A real ``gpucal demo`` subprocess signalled mid-run (SIGINT, SIGTERM) ends
  with one line on stderr, ``gpucal: interrupted`` / ``gpucal: terminated``,
  exit status 130 / 143, no traceback, no temporary file and no output.
* Temporary files of atomic writes carry a recognisable name
  (``.<name>.gpucal-<host>-<pid>-<random>.tmp``); a run removes the stale
  ones a killed run left for the file it writes — and nothing else (files of
  live processes, of other names, of other hosts, other patterns).
* A process SIGKILLed while writing leaves a temporary file; the next run
  leaves none.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpucal.io import write_text
from gpucal.io.files import remove_stale_temps, temp_prefix

ROOT = Path(__file__).resolve().parent.parent


def _env(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               GPUCAL_CACHE_DIR=str(tmp_path / "cache"), GPUCAL_BACKEND="numpy")
    env.pop("PYTHONWARNINGS", None)
    return env


def _dead_pid() -> int:
    """A pid that no process has (a child that has exited and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temps(d: Path):
    return sorted(p.name for p in d.iterdir() if ".gpucal-" in p.name and p.name.endswith(".tmp"))


@pytest.mark.parametrize("sig, line, status", [(signal.SIGINT, "gpucal: interrupted", 130),
                                               (signal.SIGTERM, "gpucal: terminated", 143)])
def test_signal_mid_run_is_one_line_and_its_exit_status(tmp_path, sig, line, status):
    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "gpucal.cli", "demo", "--out", str(out), "--no-plots",
                             "--backend", "numpy"], cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # working: the simulated frame is written (atomically), the calibration has begun
        deadline = time.monotonic() + 120
        while not (out / "demo_frame.fits").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"demo ended before it was signalled: {proc.communicate()}"
        time.sleep(0.5)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == status, (proc.returncode, stderr)
    assert [ln for ln in stderr.splitlines() if ln.strip()][-1] == line, stderr
    assert [ln for ln in stderr.splitlines() if ln.startswith("gpucal: ") and "INFO" not in ln] == [line], stderr
    assert not (out / "calibrated.fits").exists()
    assert _temps(out) == []


def test_debug_interrupt_shows_the_traceback(tmp_path):
    """--debug: the interrupt propagates (KeyboardInterrupt, Python's own traceback and status)."""
    code = ("import sys, gpucal.cli as c\n"
            "def boom(args): raise KeyboardInterrupt\n"
            "c._info = boom\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    run = subprocess.run([sys.executable, "-c", code, "info", "--debug"], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert "Traceback" in run.stderr and "KeyboardInterrupt" in run.stderr
    run = subprocess.run([sys.executable, "-c", code, "info"], env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr.strip()) == (130, "gpucal: interrupted")


def test_temporary_file_name_is_recognisable(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append(os.path.basename(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    write_text(tmp_path / "s.json", "{}")
    assert len(seen) == 1 and seen[0].startswith(temp_prefix(tmp_path / "s.json")) and seen[0].endswith(".tmp")
    assert seen[0].startswith(".s.json.gpucal-") and f"-{os.getpid()}-" in seen[0]


def test_a_run_removes_only_its_own_stale_temporary_files(tmp_path):
    dead = _dead_pid()
    host_prefix = temp_prefix(tmp_path / "s.json").rsplit("-", 2)[0]  # .s.json.gpucal-<host>
    stale = [f"{host_prefix}-{dead}-abc123_x.tmp", f"{host_prefix}-{dead}-zz9.tmp"]
    keep = [
        f"{host_prefix}-{os.getpid()}-abc123.tmp",          # a live process (this one) is still writing it
        f"{host_prefix.replace('.s.json.', '.other.json.')}-{dead}-abc123.tmp",  # another file's
        f".s.json.gpucal-some-other-host-{dead}-abc123.tmp",  # made on another host (a shared disk)
        ".s.json.abc123.tmp",                                  # not gpucal's pattern (an older run, an editor)
        "s.json.gpucal-x-1-a.tmp",                             # not hidden: not ours
        "notes.txt",
    ]
    for name in stale + keep:
        (tmp_path / name).write_text("partial")
    (tmp_path / f"{host_prefix}-{dead}-adir.tmp").mkdir()   # a directory of that name is never removed
    keep.append(f"{host_prefix}-{dead}-adir.tmp")
    write_text(tmp_path / "s.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["s.json"])
    assert remove_stale_temps(tmp_path / "s.json") == []


_KILLED_WRITER = """
import os, sys, time
from gpucal.io import write_text
import gpucal.io.files as files
real = os.fsync
def stall(fd):
    real(fd)
    print("writing", flush=True)
    time.sleep(60)
os.fsync = stall
write_text(sys.argv[1], "x" * 100000, overwrite=True)
"""


def test_sigkill_mid_write_then_a_new_run_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "cal.json"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target)], env=_env(tmp_path),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert len(_temps(tmp_path)) == 1 and not target.exists()  # what a killed run leaves
    write_text(target, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json"]

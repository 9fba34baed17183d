"""``gpucal bench frames`` at a tiny size: the runs, the stage table and the JSON hold numbers that add up."""

import json

import numpy as np

from gpucal.benchmark_frames import STAGES, after_first, bench_grid
from gpucal.containers import FrameRecord
from gpucal.cli import main


def test_bench_grid_cuts_near_the_standards_and_tiles_distinct_nodes():
    cut = np.asarray(bench_grid(12).params)
    assert cut.shape == (12, 4) and np.all(np.abs(cut[:, 0] - 6000.0) <= 500.0)
    tiled = bench_grid(500)
    p = np.asarray(tiled.params)
    assert p.shape == (500, 4) and len({tuple(r) for r in p}) == 500
    np.testing.assert_array_equal(np.asarray(tiled.flux)[240 + 7], np.asarray(tiled.flux)[7])
    np.testing.assert_allclose(p[240 + 7] - p[7], [0.0, 0.0, 0.0, 0.01])


def test_after_first_times_from_the_last_workers_first_frame():
    """Two workers: A ends frames at 3, 4, 5 s, B at 3.5, 4.5; the steady window opens at B's first end (3.5)."""
    def rec(pid, t):
        return FrameRecord(path=f"f{t}", ok=True, worker={"host": "h", "pid": pid}, finished_unix=t)

    recs = [rec(1, 3.0), rec(2, 3.5), rec(1, 4.0), rec(2, 4.5), rec(1, 5.0)]
    k, seconds = after_first(recs)
    assert k == 3 and abs(seconds - 1.5) < 1e-12
    assert after_first([rec(1, 2.0)]) == (0, 0.0)


def test_cli_bench_frames_serial_writes_a_stage_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPUCAL_BACKEND", "numpy")
    out = tmp_path / "frames.json"
    rc = main(["bench", "frames", "--frames", "3", "--templates", "12", "--standards", "3", "--fibres", "6",
               "--pixels", "1000", "--workers", "0", "--no-fresh", "--label", "test machine", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "median seconds per stage" in text and "test_machine" in text
    r = json.loads(out.read_text())
    assert r["label"] == "test_machine" and r["cpu_count"] >= 1 and r["parallel_capacity"]["effective_cores"] > 0
    assert r["frame"] == {"n_templates": 12, "n_standards": 3, "n_fibres": 6, "n_pix": 1000, "n_frames": 3, "fwhm": 2.0}
    serial = r["best"]["serial"]
    assert serial["n_ok"] == 3 and "cluster" not in r["best"]
    stages = serial["stages_median_s"]
    assert set(stages) <= set(STAGES) and {"read", "prepare", "scan", "vectors", "write"} <= set(stages)
    assert all(v >= 0 for v in stages.values())
    # the laps cover the frame: their sum is the frame's wall time less what lies outside calibrate_frame
    assert 0.5 * serial["median_frame_s"] < sum(stages.values()) <= serial["median_frame_s"] + 1e-3
    # the first frame prepares the working grid; the others find it in memory
    assert serial["stages_first_s"]["prepare"] > stages["prepare"]
    assert abs(serial["frames_per_min_steady"] * serial["s_per_frame_steady"] - 60.0) < 1e-6
    # one process: after its first frame, the same window as the steady rate's (to the frames' ends)
    assert 0.5 * serial["s_per_frame_steady"] < serial["s_per_frame_after_first"] <= 1.01 * serial["s_per_frame_steady"]

"""Many frames: calibrate_frames on a 2-worker LocalCluster against serial calibration,
per-frame failures, the batch summary and panel, and the command-line entry point."""

import argparse
import functools
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpucal.cli import run_calibrate_many
from gpucal.distributed import _ONE_THREAD_ENV, calibrate_frames
from gpucal.errors import BackendError, InputError
from gpucal.io import read_calibrated_frame, write_frame
from gpucal.simulate import simulate_frame, write_catalogue_csv

N_GOOD = 5
BROKEN_AT = 3
OPTIONS = dict(templates="demo", photometry="{dir}/{stem}_cat.csv", fwhm=2.0, backend="numpy")


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """Six frames: five demo frames (each with its own catalogue) and, at index 3, a file that is not FITS."""
    d = tmp_path_factory.mktemp("night")
    paths = []
    for seed in range(N_GOOD):
        sim = simulate_frame(seed=seed, n_program=3, n_sky=2)
        write_frame(d / f"frame{seed}.fits", sim.flux, sim.var, sim.wave, sim.fibres)
        write_catalogue_csv(sim.catalogue, d / f"frame{seed}_cat.csv")
        paths.append(str(d / f"frame{seed}.fits"))
    broken = d / "broken.fits"
    broken.write_bytes(b"this is not a FITS file\n" * 10)
    paths.insert(BROKEN_AT, str(broken))
    return d, paths


@pytest.fixture(scope="module")
def serial_outputs(night):
    """Serial calibrate_frame() of the good frames, in a fresh process whose BLAS runs one thread
    as the cluster workers' do (the grid scan's last bits depend on the BLAS thread count)."""
    d, paths = night
    good = [p for i, p in enumerate(paths) if i != BROKEN_AT]
    outs = [str(d / "serial" / (os.path.basename(p)[:-5] + "_fluxcal.fits")) for p in good]
    script = textwrap.dedent("""
        import json, sys
        from gpucal.pipeline import calibrate_frame
        for p, o in json.loads(sys.argv[1]):
            calibrate_frame(p, out=o, templates="demo", photometry=p[:-5] + "_cat.csv", fwhm=2.0, backend="numpy")
    """)
    (d / "serial").mkdir()
    env = dict(os.environ, **_ONE_THREAD_ENV)
    subprocess.run([sys.executable, "-c", script, json.dumps(list(zip(good, outs)))], env=env, check=True,
                   timeout=120)
    return dict(zip(good, outs))


def test_cluster_matches_serial_and_reports_the_broken_frame(night, serial_outputs):
    d, paths = night
    res = calibrate_frames(paths, outputs=d / "dist", workers=2, progress=False,
                           summary_path=d / "batch.json", panel_path=d / "batch.png", **OPTIONS)
    assert [r.path for r in res.records] == paths
    assert res.n_ok == N_GOOD and res.n_failed == 1
    bad = res.records[BROKEN_AT]
    assert not bad.ok and bad.error_type == "InputError" and "not a readable FITS file" in bad.error
    assert bad.out_path is None and bad.traceback is None
    assert not (d / "dist" / "broken_fluxcal.fits").exists()

    ex = res.summary["execution"]
    assert ex["mode"] == "local" and ex["n_workers"] == 2
    # The grid is loaded once per worker process, and the tasks ran in those processes, not here.
    assert {r.worker["template_loads"] for r in res.records} == {1}
    assert os.getpid() not in {r.worker["pid"] for r in res.records}

    for r in res.ok:
        mine, ref = read_calibrated_frame(r.out_path), read_calibrated_frame(serial_outputs[r.path])
        np.testing.assert_array_equal(mine.flux, ref.flux)
        np.testing.assert_array_equal(mine.var, ref.var)
        for col in ("CAL", "CAL_VAR", "MEASURED"):
            np.testing.assert_array_equal(np.asarray(mine.cal[col]), np.asarray(ref.cal[col]))
        np.testing.assert_array_equal(r.cal, np.asarray(ref.cal["CAL"]))
        assert r.summary["n_stars_used"] == int(ref.header["FCALNSTD"])

    js = json.loads((d / "batch.json").read_text())
    assert js == res.summary
    assert js["n_frames"] == 6 and js["n_ok"] == 5 and js["n_failed"] == 1
    row = js["frames"][BROKEN_AT]
    assert row["ok"] is False and row["error_type"] == "InputError"
    for row in (f for f in js["frames"] if f["ok"]):
        assert row["n_stars_used"] + row["n_stars_rejected"] == row["n_standards"] == 5
        assert 0 < row["rms_scatter"] < 0.1
        assert row["shape_rms_vs_night"] < 0.05
    assert (d / "batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_existing_scheduler_address_and_client(night):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    d, paths = night
    broken = [paths[BROKEN_AT], str(d / "missing.fits")]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        res = calibrate_frames(broken, outputs=d / "sched", scheduler=cluster.scheduler_address,
                               progress=False, **OPTIONS)
        assert res.summary["execution"]["mode"] == "scheduler"
        assert [r.ok for r in res.records] == [False, False]
        assert all(r.error_type == "InputError" for r in res.records)
        with distributed.Client(cluster) as client:
            res = calibrate_frames(broken[:1], outputs=d / "sched", scheduler=client, progress=False, **OPTIONS)
            assert res.summary["execution"]["mode"] == "client" and res.n_failed == 1
            assert client.status == "running"  # a client we were given is not closed


def test_serial_without_dask_records_unexpected_errors(night, monkeypatch):
    import gpucal.pipeline

    d, paths = night
    for name in ("distributed", "dask"):
        monkeypatch.setitem(sys.modules, name, None)  # importing either now fails

    @functools.wraps(gpucal.pipeline.calibrate_frame)
    def boom(*args, **kwargs):
        raise RuntimeError("something unexpected")

    monkeypatch.setattr(gpucal.pipeline, "calibrate_frame", boom)
    res = calibrate_frames(paths[:2], outputs=d / "boom", workers=1, progress=False, **OPTIONS)
    assert res.summary["execution"]["mode"] == "serial"
    assert [r.error_type for r in res.records] == ["RuntimeError", "RuntimeError"]
    assert res.records[0].error == "something unexpected"
    assert "Traceback" in res.records[0].traceback
    with pytest.raises(BackendError, match=r"gpucal\[dist\]"):
        calibrate_frames(paths[:2], outputs=d / "boom", workers=2, progress=False, **OPTIONS)
    with pytest.raises(BackendError, match=r"gpucal\[dist\]"):
        calibrate_frames(paths[:2], outputs=d / "boom", scheduler="tcp://127.0.0.1:1", progress=False, **OPTIONS)


def test_arguments_are_checked_before_any_work(night):
    from gpucal.templates.demo import demo_grid

    d, paths = night
    with pytest.raises(InputError, match="no frames"):
        calibrate_frames([])
    with pytest.raises(InputError, match="unknown calibration option 'fwhm_angstrom'"):
        calibrate_frames(paths, fwhm_angstrom=2.0)
    with pytest.raises(InputError, match="use outputs="):
        calibrate_frames(paths, out="x.fits")
    with pytest.raises(InputError, match="templates must be a spec"):
        calibrate_frames(paths, workers=2, templates=demo_grid(), fwhm=2.0)
    with pytest.raises(InputError, match="would both be written"):
        calibrate_frames(paths[:2], outputs=[str(d / "same.fits")] * 2, fwhm=2.0)
    with pytest.raises(InputError, match="overwrite the input"):
        calibrate_frames(paths[:1], outputs=paths[:1], fwhm=2.0)
    with pytest.raises(InputError, match="2 catalogue"):
        calibrate_frames(paths[:3], photometry=["a.csv", "b.csv"], fwhm=2.0)
    with pytest.raises(InputError, match="workers"):
        calibrate_frames(paths, workers=-1, fwhm=2.0)


def test_run_calibrate_many_command_line(night, capsys):
    from gpucal.cli import add_batch_options

    d, paths = night
    parser = argparse.ArgumentParser()
    parser.add_argument("frames", nargs="+")
    for opt in ("--templates", "--photometry", "--out", "--summary", "--qc", "--backend"):
        parser.add_argument(opt)
    parser.add_argument("--fwhm", type=float)
    add_batch_options(parser)
    args = parser.parse_args([paths[0], paths[BROKEN_AT], "--templates", "demo", "--fwhm", "2",
                              "--photometry", "{dir}/{stem}_cat.csv", "--backend", "numpy",
                              "--out", str(d / "cli"), "--batch-summary", str(d / "cli" / "night.json"),
                              "--batch-panel", str(d / "cli" / "night.png")])
    assert args.workers is None and parser.parse_args([paths[0], "--workers"]).workers == "auto"
    assert parser.parse_args([paths[0], "--workers", "3"]).workers == 3
    assert run_calibrate_many(args) == 1
    out = capsys.readouterr().out
    assert f"ok      {paths[0]} -> {d / 'cli' / 'frame0_fluxcal.fits'}" in out
    assert f"FAILED  {paths[BROKEN_AT]}: InputError:" in out
    assert "calibrated 1 of 2 frame(s) serially" in out
    assert (d / "cli" / "frame0_fluxcal.fits").is_file()
    assert json.loads((d / "cli" / "night.json").read_text())["n_ok"] == 1
    assert (d / "cli" / "night.png").is_file()


def test_gpu_workers_use_dask_cuda_when_there(monkeypatch):
    """One worker per GPU through dask-cuda (faked here: no cluster is started)."""
    import types

    import gpucal.distributed as gd

    made = []
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: made.append(kw) or "cuda-cluster"
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(gd, "_n_gpus", lambda: 2)
    assert gd._local_cluster(None, "auto", "cupy") == ("cuda-cluster", "local-cuda")
    assert gd._local_cluster(None, 2, "cupy") == ("cuda-cluster", "local-cuda")
    assert [m["n_workers"] for m in made] == [None, 2]
    with pytest.raises(InputError, match="only 2 GPU"):
        gd._local_cluster(None, 3, "cupy")
    assert not gd._wants_gpu("numpy") and gd._wants_gpu("cupy")

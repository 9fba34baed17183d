"""The command line: every `gpucal calibrate` option reaches calibrate_frame (one frame, a batch run
serially and on two workers), a batch equals the single-frame run, --summary with --batch-summary,
--version, Python warnings kept off the terminal, and a --help that imports neither matplotlib nor dask.

How options are seen arriving: in this process calibrate_frame is replaced by a spy (with its
signature) that records its keyword arguments; in dask worker processes, where no monkeypatch
reaches, each FrameRecord carries the options the worker passed to calibrate_frame
(``worker["options"]``, also in the batch summary), and the calibrated outputs are compared with a
single-frame run of the same options.
"""

import argparse
import contextlib
import functools
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gpucal
import gpucal.pipeline
from conftest import small_demo_cache
from gpucal.cli import API_ONLY, PER_FRAME, build_parser, main
from gpucal.distributed import _ONE_THREAD_ENV
from gpucal.errors import CalibrationError
from gpucal.io.frames import read_calibrated_frame, write_frame
from gpucal.simulate import simulate_frame, write_catalogue_csv

#: Every calibrate_frame option of `gpucal calibrate` at a value that is not its default:
#: dest -> (argv, the value calibrate_frame must receive). The LSF options exclude each other (LSF).
OPTIONS = {
    "overwrite": (["--overwrite"], True),
    "backend": (["--backend", "numpy"], "numpy"),
    "combine": (["--combine", "median"], "median"),
    "smooth": (["--smooth", "11"], 11),
    "metric": (["--metric", "huber"], "huber"),
    "vrange": (["--vrange", "-300:300:10"], (-300.0, 300.0, 10.0)),
    "min_stars": (["--min-stars", "2"], 2),
    "max_chi2_dof": (["--max-chi2-dof", "1e6"], 1e6),
    "max_memory": (["--max-memory", "512M"], "512M"),
    "ebv": (["--ebv", "0.05"], 0.05),
    "teff_prior": (["--no-teff-prior"], False),
    "fast": (["--fast"], True),
    "max_frame_chi2_dof": (["--max-frame-chi2-dof", "none"], None),
    "max_scatter": (["--max-scatter", "0.5"], 0.5),
    "medium": (["--medium", "air"], "air"),  # issue 15: these frames state no medium
    "telluric": (["--telluric", "mask"], "mask"),
    "recalibrate": (["--recalibrate"], True),
    "fit": (["--fit", "nodes"], "nodes"),
}
LSF = {
    "fwhm": (["--fwhm", "2.0"], 2.0),
    "fwhm_poly": (["--fwhm-poly", "2.0,0"], [2.0, 0.0]),
    "resolution": (["--resolution", "3000"], 3000.0),
    "frame_lsf": (["--frame-lsf"], True),
}
#: Options given per test (paths): the grid and the catalogues.
PATH_OPTIONS = {"templates", "photometry"}
#: `gpucal calibrate` options that are not calibrate_frame parameters.
CLI_ONLY = {"help", "frames", "out", "summary", "qc", "workers", "scheduler", "batch_summary", "batch_panel", "debug"}
#: calibrate_frame parameters the demo supplies itself (its own frame, grid, catalogue and LSF).
DEMO_SUPPLIED = {"templates", "photometry", "fwhm", "fwhm_poly", "resolution", "overwrite", "medium", "frame_lsf"}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Two small frames (3 standards, 1500 pixels) with catalogues, and a 30-template cache cut
    from the demo grid (F/G dwarfs around the standards): a calibration takes a second or two."""
    d = tmp_path_factory.mktemp("cli")
    cache = small_demo_cache(d / "grid")
    frames = []
    for seed in (0, 1):
        sim = simulate_frame(seed=seed, n_standards=3, n_program=1, n_sky=1, n_pix=1500, wave_range=(3800.0, 9200.0))
        write_frame(d / f"frame{seed}.fits", sim.flux, sim.var, sim.wave, sim.fibres)
        write_catalogue_csv(sim.catalogue, d / f"frame{seed}_cat.csv")
        frames.append(str(d / f"frame{seed}.fits"))
    return d, cache, frames


def _cat(frame):
    return frame[:-5] + "_cat.csv"


def _argv(cache, lsf):
    """Every option at a non-default value, with the LSF option ``lsf``."""
    return ["--templates", cache, *LSF[lsf][0], *(tok for argv, _ in OPTIONS.values() for tok in argv)]


def _expected(lsf):
    return dict({k: v for k, (_, v) in OPTIONS.items()}, **{lsf: LSF[lsf][1]})


def _dests(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices[command]._actions}


def test_every_calibrate_frame_parameter_is_an_option_or_excluded():
    params = inspect.signature(gpucal.pipeline.calibrate_frame).parameters
    keyword = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    assert set(PER_FRAME) <= set(params) and set(API_ONLY) <= keyword  # no stale exclusions
    calibrate = _dests("calibrate")
    assert keyword - set(PER_FRAME) - set(API_ONLY) <= calibrate, "a calibrate_frame parameter has no option"
    assert not set(API_ONLY) & calibrate, "an option is also listed as Python-API only"
    assert calibrate - (keyword - set(PER_FRAME)) <= CLI_ONLY, "an option's dest is no calibrate_frame parameter: it would be dropped"
    # this file's table holds every option, so the tests below try each one
    assert (keyword - set(PER_FRAME)) & calibrate == set(OPTIONS) | set(LSF) | PATH_OPTIONS
    assert keyword - set(PER_FRAME) - set(API_ONLY) - DEMO_SUPPLIED <= _dests("demo")


@pytest.fixture
def spy(monkeypatch):
    """calibrate_frame replaced by a recorder with its signature, which then fails the frame."""
    calls = []

    @functools.wraps(gpucal.pipeline.calibrate_frame)
    def record(frame, **kwargs):
        calls.append((str(frame), kwargs))
        raise CalibrationError("spied")

    monkeypatch.setattr(gpucal.pipeline, "calibrate_frame", record)
    return calls


@pytest.mark.parametrize("lsf", sorted(LSF))
def test_every_option_reaches_calibrate_frame_for_one_frame_and_a_serial_batch(small, spy, lsf, capsys):
    d, cache, frames = small
    argv = _argv(cache, lsf)
    out = d / f"spy-{lsf}"
    assert main(["calibrate", frames[0], *argv, "--photometry", _cat(frames[0]), "--out", str(out) + ".fits"]) == 2
    assert main(["calibrate", *frames, *argv, "--photometry", "{dir}/{stem}_cat.csv", "--out", str(out),
                 "--summary", str(out) + ".json"]) == 1
    assert [frame for frame, _ in spy] == [frames[0], *frames]
    for frame, kwargs in spy:
        assert {k: v for k, v in kwargs.items() if k not in ("templates", "photometry", "out")} == _expected(lsf)
        assert kwargs["photometry"] == _cat(frame)
    single, *batch = (kwargs for _, kwargs in spy)
    assert single["templates"] == cache and single["out"] == str(out) + ".fits"
    assert [kw["out"] for kw in batch] == [str(out / f"frame{i}_fluxcal.fits") for i in (0, 1)]
    assert all(kw["templates"].n_templates == 30 for kw in batch)  # the grid, loaded once per process
    # in a batch --summary is the batch summary, and it records the options each frame ran with
    js = json.loads((d / f"spy-{lsf}.json").read_text())
    assert js["n_frames"] == 2 and js["n_failed"] == 2
    assert js["options"] == json.loads(json.dumps(dict(_expected(lsf), templates=cache)))
    for row, frame in zip(js["frames"], frames):
        assert row["worker"]["options"] == json.loads(json.dumps(dict(_expected(lsf), photometry=_cat(frame))))


def test_summary_with_batch_summary_is_refused_before_any_work(small, spy, capsys):
    d, cache, frames = small
    rc = main(["calibrate", *frames, "--templates", cache, "--photometry", "{dir}/{stem}_cat.csv", "--fwhm", "2",
               "--out", str(d / "both"), "--summary", str(d / "a.json"), "--batch-summary", str(d / "b.json")])
    assert rc == 2 and spy == []
    err = capsys.readouterr().err
    assert err.startswith("gpucal: error: --summary and --batch-summary both given") and err.count("\n") == 1
    assert not (d / "a.json").exists() and not (d / "b.json").exists()


def test_batch_on_two_workers_gets_every_option_and_equals_the_single_frame_run(small, capsys):
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    d, cache, frames = small
    argv = _argv(cache, "fwhm")
    rc = main(["calibrate", *frames, *argv, "--photometry", "{dir}/{stem}_cat.csv", "--workers", "2",
               "--out", str(d / "w2"), "--batch-summary", str(d / "w2.json")])
    assert rc == 0, capsys.readouterr()
    js = json.loads((d / "w2.json").read_text())
    assert js["execution"]["mode"] == "local" and js["execution"]["n_workers"] == 2
    assert os.getpid() not in {row["worker"]["pid"] for row in js["frames"]}
    for row, frame in zip(js["frames"], frames):
        assert row["ok"] and row["worker"]["options"] == json.loads(
            json.dumps(dict(_expected("fwhm"), photometry=_cat(frame))))

    # The single-frame command on frame 0, in a process whose BLAS runs one thread as the workers'
    # do (the scan's last bits depend on the BLAS thread count).
    ref = d / "single.fits"
    subprocess.run([sys.executable, "-m", "gpucal.cli", "calibrate", frames[0], *argv, "--photometry",
                    _cat(frames[0]), "--out", str(ref)], env=dict(os.environ, **_ONE_THREAD_ENV), check=True,
                   timeout=300, capture_output=True)
    mine, single = read_calibrated_frame(d / "w2" / "frame0_fluxcal.fits"), read_calibrated_frame(ref)
    for col in ("CAL", "CAL_VAR", "MEASURED"):
        np.testing.assert_array_equal(np.asarray(mine.cal[col]), np.asarray(single.cal[col]))
    np.testing.assert_array_equal(mine.flux, single.flux)
    assert mine.per_star.colnames == single.per_star.colnames
    for col in single.per_star.colnames:
        np.testing.assert_array_equal(np.asarray(mine.per_star[col]), np.asarray(single.per_star[col]), err_msg=col)
    assert js["frames"][0]["n_stars_used"] == int(single.header["FCALNSTD"])


def test_local_workers_route_warnings_to_the_debug_log():
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    from gpucal.cli import _worker_warnings_to_debug_log

    where = "(lambda w: w.__module__ + '.' + w.__name__)(__import__('warnings').showwarning)"
    with _worker_warnings_to_debug_log(argparse.Namespace(debug=False, workers=2)):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            assert list(client.run(eval, where).values()) == ["gpucal.cli._log_warning"]
    # with --debug (or without --workers) the workers are left alone
    for debug, workers in ((True, 2), (False, None), (False, 1)):
        ctx = _worker_warnings_to_debug_log(argparse.Namespace(debug=debug, workers=workers))
        assert isinstance(ctx, contextlib.nullcontext)


_NOISY = textwrap.dedent("""
    import functools, sys
    import numpy as np
    import gpucal.pipeline
    from gpucal.errors import CalibrationError

    @functools.wraps(gpucal.pipeline.calibrate_frame)
    def noisy(frame, **kwargs):
        np.log(np.zeros(1))  # RuntimeWarning: divide by zero
        raise CalibrationError("no usable standard")

    gpucal.pipeline.calibrate_frame = noisy
    from gpucal.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_warnings_stay_off_the_terminal_unless_debug(small, monkeypatch, caplog):
    d, _, frames = small
    argv = ["calibrate", frames[0], "--photometry", _cat(frames[0]), "--fwhm", "2", "--out", str(d / "noisy.fits")]
    run = subprocess.run([sys.executable, "-c", _NOISY, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == "gpucal: error: no usable standard\n"
    # with --debug the warning is in the debug log, and the error comes with its traceback
    @functools.wraps(gpucal.pipeline.calibrate_frame)
    def noisy(frame, **kwargs):
        np.log(np.zeros(1))
        raise CalibrationError("no usable standard")

    monkeypatch.setattr(gpucal.pipeline, "calibrate_frame", noisy)
    with caplog.at_level("DEBUG", logger="gpucal"), pytest.raises(CalibrationError, match="no usable standard"):
        main([*argv, "--debug"])
    assert any("RuntimeWarning: divide by zero" in r.getMessage() for r in caplog.records if r.levelname == "DEBUG")


def test_help_imports_neither_matplotlib_nor_dask():
    script = textwrap.dedent("""
        import json, sys
        from gpucal.cli import main
        for argv in (["--help"], ["calibrate", "--help"], ["demo", "--help"], ["info", "--help"],
                     ["templates", "prepare", "--help"], ["bench", "--help"]):
            try:
                main(argv)
            except SystemExit as exc:
                assert exc.code == 0, (argv, exc.code)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("matplotlib", "dask", "distributed"))))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(run.stdout.splitlines()[-1]) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"gpucal {gpucal.__version__}\n"

"""Frame-level sanity bounds (issue 19): a frame that fits absurdly is an error, not a calibration.

When every used standard's best χ²/dof is above ``max_frame_chi2_dof``
(default :data:`~gpucal.calibration.verdicts.MAX_FRAME_CHI2_DOF`), or the used
standards' vectors scatter more than ``max_scatter`` (default
:data:`~gpucal.calibration.verdicts.MAX_SCATTER`), calibrate_frame raises a
CalibrationError naming the likely causes (transposed frame, wrong LSF, wrong
medium) and writes nothing. Clean frames — the demo, S/N 1000 — still
calibrate, with the numbers they had without the bounds.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from gpucal.calibration.verdicts import LIKELY_CAUSES, MAX_FRAME_CHI2_DOF, MAX_SCATTER, frame_verdict
from gpucal.cli import build_parser, main
from gpucal.errors import CalibrationError, InputError
from gpucal.io import write_frame
from gpucal.pipeline import calibrate_frame
from gpucal.simulate import simulate_frame, write_catalogue_csv

SMALL = dict(n_pix=1000, wave_range=(5000.0, 6500.0), n_standards=3, n_program=2, n_sky=2)
VRANGE = (-200.0, 200.0, 5.0)
OFF = dict(max_frame_chi2_dof=None, max_scatter=None)


def _write(tmp_path, name, sim, flux=None, var=None):
    frame, cat = tmp_path / f"{name}.fits", tmp_path / f"{name}.csv"
    write_frame(frame, sim.flux if flux is None else flux, sim.var if var is None else var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, cat)
    return str(frame), str(cat)


def _cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(argv))
    return rc, err.getvalue()


@pytest.fixture(scope="module")
def transposed(tmp_path_factory):
    """A 1000 x 1000 frame (6 standards, every other fibre a star too) stored transposed.

    Rows are then pixels and columns fibres. The 992 further fibres are copies
    of the simulated stars at 5-100 % of their flux (simulating 992 stars
    takes minutes), so that each transposed "spectrum" is positive. Without
    the bounds it calibrates: 3 standards used, RMS scatter 1.10, χ²/dof 382-1070.
    """
    d = tmp_path_factory.mktemp("transposed")
    sim = simulate_frame(seed=1, snr=50.0, n_pix=1000, n_standards=6, n_program=2, n_sky=992, square=True)
    types = np.asarray(sim.fibres["TYPE"])
    stars, others = np.flatnonzero(types != "S"), np.flatnonzero(types == "S")
    rng = np.random.default_rng(0)
    src, k = rng.choice(stars, others.size), rng.uniform(0.05, 1.0, (others.size, 1))
    flux, var = sim.flux.copy(), sim.var.copy()
    flux[others], var[others] = sim.flux[src] * k, sim.var[src] * k
    sim.fibres["TYPE"][others] = "P"
    frame, cat = _write(d, "transposed", sim, np.ascontiguousarray(flux.T), np.ascontiguousarray(var.T))
    return d, frame, cat, float(sim.truth["fwhm"])


def test_transposed_frame_is_an_error_naming_the_likely_cause(transposed):
    d, frame, cat, fwhm = transposed
    out = d / "out.fits"
    rc, err = _cli(["calibrate", frame, "--photometry", cat, "--fwhm", str(fwhm), "--backend", "numpy",
                    "--out", str(out)])
    lines = [ln for ln in err.splitlines() if ln.startswith("gpucal: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    # the frame-level verdict: its standards disagree, or (the continuous fit rejecting each of them on
    # its own: photometry inconsistent, velocity at the scan's edge) none is usable; both name the causes
    assert frame in lines[0] and LIKELY_CAUSES in lines[0]
    assert ("the standards disagree" in lines[0] and "--max-scatter" in lines[0]) or "no standard is usable" in lines[0]
    assert not out.exists()


def test_every_standard_with_absurd_chi2_is_an_error(tmp_path):
    """Variances 10^4 too small: every star's χ²/dof ~10^4 — the frame is refused, the option can lift it."""
    sim = simulate_frame(seed=3, snr=50.0, **SMALL)
    frame, cat = _write(tmp_path, "tiny-var", sim, var=sim.var / 1e4)
    with pytest.raises(CalibrationError, match="every used standard fits badly") as info:
        calibrate_frame(frame, photometry=cat, fwhm=2.0, vrange=VRANGE, backend="numpy", out=str(tmp_path / "o.fits"))
    assert LIKELY_CAUSES in str(info.value) and "--max-frame-chi2-dof" in str(info.value)
    assert not (tmp_path / "o.fits").exists()
    res = calibrate_frame(frame, photometry=cat, fwhm=2.0, vrange=VRANGE, backend="numpy", max_frame_chi2_dof=None)
    assert min(s["chi2_dof"] for s in res.summary["stars"] if s["used"]) > MAX_FRAME_CHI2_DOF


@pytest.mark.parametrize("snr", [50.0, 1000.0])
def test_clean_frames_calibrate_with_the_numbers_they_had(tmp_path, snr):
    sim = simulate_frame(seed=3, snr=snr, **SMALL)
    frame, cat = _write(tmp_path, f"clean-{snr:g}", sim)
    res = calibrate_frame(frame, photometry=cat, fwhm=2.0, vrange=VRANGE, backend="numpy")
    off = calibrate_frame(frame, photometry=cat, fwhm=2.0, vrange=VRANGE, backend="numpy", **OFF)
    np.testing.assert_array_equal(res.cal, off.cal)
    np.testing.assert_array_equal(res.flux, off.flux)
    assert res.summary["n_stars_used"] == 3


def test_the_demo_still_calibrates(tmp_path):
    """`gpucal demo` (default bounds) calibrates, and its recovery error is the one it had (0.2 %-level)."""
    rc, err = _cli(["demo", "--out", str(tmp_path / "demo"), "--no-plots", "--backend", "numpy"])
    assert rc == 0, err
    import json

    s = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert s["n_stars_used"] == 5 and s["rms_scatter"] < MAX_SCATTER / 5
    assert max(st["chi2_dof"] for st in s["stars"]) < 2.0
    assert s["demo_truth"]["throughput_rms_error_outside_telluric"] < 0.01


def test_frame_verdict_bounds():
    assert frame_verdict([1.2, 1.5], 0.02) is None
    assert "fits badly" in frame_verdict([2e3, 5e3], 0.02)
    assert frame_verdict([2e3, 0.9e3], 0.02) is None            # one star fits: not every star is absurd
    assert "disagree" in frame_verdict([1.2], 0.5)
    assert frame_verdict([1.2], None) is None and frame_verdict([1.2], float("nan")) is None  # one star
    assert frame_verdict([2e3], 0.5, max_frame_chi2_dof=None, max_scatter=None) is None
    assert frame_verdict([], None) is None


def test_cli_options_quote_the_defaults_and_accept_none():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command in ("calibrate", "demo"):
        helps = {a.dest: a.help for a in sub.choices[command]._actions}
        assert f"default {MAX_FRAME_CHI2_DOF:g};" in helps["max_frame_chi2_dof"]
        assert f"default {MAX_SCATTER:g} " in helps["max_scatter"]
    p = sub.choices["calibrate"]
    args = p.parse_args(["f.fits", "--photometry", "c.csv", "--fwhm", "2", "--max-frame-chi2-dof", "none",
                         "--max-scatter", "0.3"])
    assert args.max_frame_chi2_dof is None and args.max_scatter == 0.3
    assert not hasattr(p.parse_args(["f.fits", "--photometry", "c.csv", "--fwhm", "2"]), "max_scatter")
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            p.parse_args(["f.fits", "--photometry", "c.csv", "--fwhm", "2", "--max-scatter", "0"])


@pytest.mark.parametrize("bound", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bound_that_is_no_positive_number_is_refused_before_any_work(bound):
    for name in ("max_frame_chi2_dof", "max_scatter"):
        with pytest.raises(InputError, match=f"{name} must be a positive number or None"):
            calibrate_frame("no-such-frame.fits", **{name: bound})

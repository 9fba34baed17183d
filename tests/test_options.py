"""Every `gpucal calibrate` option changes the result, in the direction it promises.

test_cli.py shows that every option *arrives* at calibrate_frame; here each one is shown to
*matter*, with numbers against the simulation's truth: --metric huber on an artefact the continuum
normalisation keeps, --ebv on reddened standards, --no-teff-prior where the colour prior binds,
--fast (equal to the exhaustive scan), --smooth, --combine median (and its π/2 variance),
--max-chi2-dof, --min-stars, --vrange and --max-memory, through calibrate_frame and through the
CLI (one frame, and a serial batch of two frames for a few).

Small simulated frames (3 standards, 1500 pixels) and a 30-template cut of the demo grid, as in
test_cli.py: one calibration takes a second or two.
"""

import dataclasses
import math

import numpy as np
import pytest

from gpucal.cli import main
from gpucal.errors import CalibrationError, InputError
from gpucal.io.frames import read_calibrated_frame, write_frame
from gpucal.photometry import redden
from gpucal.pipeline import calibrate_frame
from gpucal.simulate import _ab_mags, simulate_frame, write_catalogue_csv
from gpucal.templates.cache import write_template_cache
from gpucal.templates.demo import demo_grid, demo_model, demo_wave
from gpucal.units import doppler_factor

SIM = dict(n_standards=3, n_program=1, n_sky=1, n_pix=1500, wave_range=(3800.0, 9200.0))
FWHM = 2.0
#: The Balmer lines the Huber test's artefact sits on (Å, rest, air).
BALMER = (6562.8, 4861.3, 4340.5, 4101.7)


@pytest.fixture(scope="module")
def grid():
    """30 F/G dwarf templates (Teff 5500-6500 K, logg >= 4, [M/H] -0.5..0) of the demo grid."""
    g = demo_grid()
    p = np.asarray(g.params)
    keep = (p[:, 0] >= 5500) & (p[:, 0] <= 6500) & (p[:, 1] >= 4.0) & (p[:, 2] >= -0.5) & (p[:, 2] <= 0.0)
    return dataclasses.replace(g, params=p[keep], flux=np.asarray(g.flux)[keep], meta={},
                               continuum=None if g.continuum is None else np.asarray(g.continuum)[keep])


@pytest.fixture(scope="module")
def files(tmp_path_factory, grid):
    """Two frames (seeds 0, 1) with catalogues on disk, the grid as a cache, and the simulations."""
    d = tmp_path_factory.mktemp("options")
    sims, frames = [], []
    for seed in (0, 1):
        sim = simulate_frame(seed=seed, **SIM)
        write_frame(d / f"frame{seed}.fits", sim.flux, sim.var, sim.wave, sim.fibres)
        write_catalogue_csv(sim.catalogue, d / f"frame{seed}_cat.csv")
        sims.append(sim)
        frames.append(str(d / f"frame{seed}.fits"))
    return d, write_template_cache(grid, d / "grid"), frames, sims


def _cat(frame):
    return frame[:-5] + "_cat.csv"


def _run(files, grid, i=0, *, frame=None, photometry=None, **kw):
    """calibrate_frame on frame ``i`` (or ``frame``) with the test grid, numpy backend, FWHM 2 Å."""
    _, _, frames, _ = files
    return calibrate_frame(frame if frame is not None else frames[i], templates=grid, fwhm=FWHM, backend="numpy",
                           photometry=photometry or _cat(frames[i]), **kw)


@pytest.fixture(scope="module")
def default(files, grid):
    """Frame 0 with every option at its default."""
    return _run(files, grid)


def _rows(per_star, sim):
    """Per-star table rows in the simulation's catalogue (truth) order."""
    names = list(per_star["NAME"])
    return np.array([names.index(str(n)) for n in sim.catalogue["name"]])


def _params(out, sim):
    t = out.per_star
    r = _rows(t, sim)
    return np.c_[t["TEFF"], t["LOGG"], t["MH"], t["RV"]][r]


def _cal_error(cal, measured, sim):
    """RMS of ln(Cal × true throughput) over the measured pixels: 0 for a perfect calibration."""
    x = np.log(np.asarray(cal, float) * sim.truth["throughput"])
    m = np.asarray(measured, bool) & np.isfinite(x)
    assert m.sum() > 0.8 * x.size
    return float(np.sqrt(np.mean(x[m] ** 2)))


def _roughness(cal, measured):
    """Pixel-to-pixel scatter of Cal relative to its median (std of first differences)."""
    c = np.asarray(cal, float)
    m = np.asarray(measured, bool)
    c = c / np.median(c[m])
    ok = m[1:] & m[:-1]
    return float(np.std(np.diff(c)[ok]))


def _write(d, name, sim, flux, var=None, catalogue=None):
    path = d / f"{name}.fits"
    write_frame(path, flux, sim.var if var is None else var, sim.wave, sim.fibres, overwrite=True)
    write_catalogue_csv(sim.catalogue if catalogue is None else catalogue, d / f"{name}_cat.csv")
    return str(path)


# --- --fast, --max-memory: the same answer ------------------------------------------------------

def test_fast_equals_the_exhaustive_scan(files, grid, default):
    fast = _run(files, grid, fast=True)
    _, _, _, sims = files
    np.testing.assert_array_equal(_params(fast, sims[0]), _params(default, sims[0]))
    np.testing.assert_array_equal(np.asarray(fast.per_star["RV_ERR"]), np.asarray(default.per_star["RV_ERR"]))
    np.testing.assert_allclose(fast.cal, default.cal, rtol=1e-12)
    # and the answer is right: every velocity within 4 km/s of the truth
    assert np.max(np.abs(_params(fast, sims[0])[:, 3] - sims[0].truth["rv"])) < 4.0


def test_tiny_max_memory_gives_the_default_result(files, grid, default, monkeypatch):
    """The smallest budget the scan accepts (one template per block) changes nothing but the blocking."""
    import gpucal.fitting.scan as scan

    real, blocks = scan._block_size, []

    def spy(*args, **kwargs):
        blocks.append((args, real(*args, **kwargs)))
        return blocks[-1][1]

    monkeypatch.setattr(scan, "_block_size", spy)
    again = _run(files, grid)
    args, n_default = blocks[-1]
    lo, hi = 1, int(args[-1])  # bisect for the smallest budget that does not raise
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            real(*args[:-1], float(mid))
            hi = mid
        except InputError:
            lo = mid
    tiny = _run(files, grid, max_memory=hi)
    assert n_default == grid.params.shape[0] and blocks[-1][1] == 1  # 30 templates in one block, then 30 blocks
    with pytest.raises(InputError, match="raise --max-memory"):
        _run(files, grid, max_memory=lo)
    _, _, _, sims = files
    for out in (again, tiny):
        np.testing.assert_allclose(_params(out, sims[0]), _params(default, sims[0]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.cal, default.cal, rtol=1e-6)
        assert out.summary["n_stars_used"] == 3


# --- --metric huber ------------------------------------------------------------------------------

def _balmer_artefact(sim, row_of_truth=0, depth=0.8, sigma_pix=0.5):
    """Standard ``row_of_truth``'s flux with narrow deep dips on its (shifted) Balmer lines.

    Dips pass the continuum normalisation (its outlier cut only removes high pixels), and on a
    line core they favour hotter templates (deeper Balmer lines) under χ², where every
    artefact pixel counts with its squared residual of ~20σ.
    """
    flux = sim.flux.copy()
    row = sim.truth["std_fibres"][row_of_truth]
    step = float(sim.wave[1] - sim.wave[0])
    dip = np.ones(sim.wave.size)
    for lam in BALMER:
        c = lam * doppler_factor(float(sim.truth["rv"][row_of_truth]))
        dip *= 1.0 - depth * np.exp(-0.5 * ((sim.wave - c) / (sigma_pix * step)) ** 2)
    flux[row] *= dip
    return flux


def test_huber_metric_resists_an_artefact_the_normalisation_keeps(files, grid):
    d, _, _, sims = files
    sim = sims[0]
    path = _write(d, "artefact", sim, _balmer_artefact(sim))
    # the scan's metric on its own: the continuous fit after it (issue 14) undoes the χ² pick (36 K off)
    chi = _params(_run(files, grid, frame=path, photometry=_cat(path), fit="nodes"), sim)
    hub = _params(_run(files, grid, frame=path, photometry=_cat(path), metric="huber", fit="nodes"), sim)
    truth = sim.truth["params"][0, 0]
    # χ² is pulled to the grid's hot edge; Huber's pick stays >= 150 K nearer the truth
    assert abs(chi[0, 0] - truth) >= 400.0
    assert abs(hub[0, 0] - truth) + 150.0 <= abs(chi[0, 0] - truth)
    # the other (clean) standards are not disturbed by the metric
    np.testing.assert_allclose(hub[1:, 0], chi[1:, 0], atol=60.0)


# --- --ebv ---------------------------------------------------------------------------------------

def _reddened(sim, ebv):
    """The frame's standards seen through E(B−V) = ``ebv`` (F99, R_V 3.1): flux, var and catalogue."""
    rows = np.asarray(sim.truth["std_fibres"])
    n = rows.size
    trans = np.asarray(redden(sim.wave, np.ones((1, sim.wave.size)), np.array([ebv])))[0]
    flux, var = sim.flux.copy(), sim.var.copy()
    flux[rows] *= trans
    var[rows] *= trans**2
    full = demo_wave()
    spec = np.stack([demo_model(sim.truth["params"][k:k + 1], full / doppler_factor(float(sim.truth["rv"][k])))[0][0]
                     for k in range(n)])
    t_full = np.asarray(redden(full, np.ones((1, full.size)), np.array([ebv])))[0]
    dm = _ab_mags(full, spec * t_full) - _ab_mags(full, spec)
    cat = sim.catalogue.copy()
    for j, band in enumerate("griz"):
        cat[band] = np.asarray(cat[band], float) + dm[:, j]
    assert np.all(dm[:, 0] > dm[:, 3] + 0.1)  # reddened: g fainter than z by more than 0.1 mag
    return flux, var, cat


EBV = 0.15


@pytest.fixture(scope="module")
def reddened(files):
    d, _, _, sims = files
    flux, var, cat = _reddened(sims[0], EBV)
    return _write(d, "reddened", sims[0], flux, var, cat)


def test_ebv_recovers_the_throughput_of_reddened_standards(files, grid, reddened, default):
    _, _, _, sims = files
    sim = sims[0]
    plain = _run(files, grid, frame=reddened, photometry=_cat(reddened))
    right = _run(files, grid, frame=reddened, photometry=_cat(reddened), ebv=EBV)
    e_plain, e_right = _cal_error(plain.cal, plain.measured, sim), _cal_error(right.cal, right.measured, sim)
    e_clean = _cal_error(default.cal, default.measured, sim)
    # the right E(B−V) calibrates the reddened frame as well as the clean one, and 0 does not
    assert e_right < 1.5 * e_clean + 0.005
    assert e_plain > 3.0 * e_right
    # the error without --ebv has the reddening's sign: Cal too high in the blue over the red
    x = np.log(plain.cal * sim.truth["throughput"]) - np.log(right.cal * sim.truth["throughput"])
    blue, red = sim.wave < 4500, sim.wave > 8000
    assert np.nanmedian(x[blue]) - np.nanmedian(x[red]) > 0.1


def test_cli_ebv_matches_the_api(files, reddened, tmp_path):
    _, cache, _, sims = files
    out = tmp_path / "ebv.fits"
    assert main(["calibrate", reddened, "--templates", cache, "--photometry", _cat(reddened), "--fwhm", str(FWHM),
                 "--backend", "numpy", "--ebv", str(EBV), "--out", str(out)]) == 0
    cal = read_calibrated_frame(out).cal
    e = _cal_error(cal["CAL"], cal["MEASURED"], sims[0])
    assert e < 0.03


# --- --no-teff-prior -----------------------------------------------------------------------------

PRIOR_STAR, PRIOR_TEFF = 1, 5500.0  # STD002 is a 6250 K star; its catalogue colours are those of 5500 K


@pytest.fixture(scope="module")
def wrong_colours(files):
    """Frame 0 with STD002's catalogue colours (same r) of a 5500 K star."""
    d, _, _, sims = files
    sim = sims[0]
    params = np.array(sim.truth["params"], float)
    params[PRIOR_STAR, 0] = PRIOR_TEFF
    other = simulate_frame(seed=0, params=params, **SIM).catalogue
    cat = sim.catalogue.copy()
    for band in "griz":
        cat[band][PRIOR_STAR] = other[band][PRIOR_STAR]
    assert abs(cat["r"][PRIOR_STAR] - sim.catalogue["r"][PRIOR_STAR]) < 1e-9
    assert cat["g"][PRIOR_STAR] - cat["z"][PRIOR_STAR] > sim.catalogue["g"][PRIOR_STAR] - sim.catalogue["z"][PRIOR_STAR] + 0.1
    return _write(d, "wrongcolour", sim, sim.flux, catalogue=cat)


def test_no_teff_prior_lets_the_spectrum_decide_where_the_prior_binds(files, grid, wrong_colours, default):
    """Colours of 5500 K on a 6250 K star: the prior's window (colour Teff ± 500 K) holds the star's
    node at <= 6000 K (refinement may then step one node further); without it the Teff is the
    spectrum's own, the one the clean catalogue gives."""
    _, _, _, sims = files
    sim = sims[0]
    # the prior bounds the scan's nodes; the continuous fit after it (issue 14) starts there and is
    # free to leave the window (6215 K with and without it), so the prior is shown on the node path
    with_prior = _run(files, grid, frame=wrong_colours, photometry=_cat(wrong_colours), fit="nodes")
    without = _run(files, grid, frame=wrong_colours, photometry=_cat(wrong_colours), teff_prior=False, fit="nodes")
    t_with, t_without = _params(with_prior, sim)[PRIOR_STAR, 0], _params(without, sim)[PRIOR_STAR, 0]
    t_clean = _params(_run(files, grid, fit="nodes"), sim)[PRIOR_STAR, 0]
    r = _rows(with_prior.per_star, sim)[PRIOR_STAR]
    teff_colour = float(with_prior.per_star["TEFF_COLOUR"][r])
    assert abs(teff_colour - PRIOR_TEFF) < 250.0  # the prior follows the colours
    assert t_without == pytest.approx(t_clean, abs=1e-6)  # the spectrum alone decides
    assert abs(t_without - sim.truth["params"][PRIOR_STAR, 0]) < 250.0
    assert t_with <= teff_colour + 500.0 + 250.0 and t_without - t_with >= 100.0  # the window held it down
    assert "TEFF_COLOUR" not in without.per_star.colnames
    # the other stars' colours agree with their spectra: the prior changes nothing for them
    others = [k for k in range(3) if k != PRIOR_STAR]
    np.testing.assert_allclose(_params(with_prior, sim)[others], _params(without, sim)[others], rtol=1e-9)


def test_cli_no_teff_prior(files, grid, wrong_colours, tmp_path, default):
    _, cache, _, sims = files
    teff = {}
    for flag in ([], ["--no-teff-prior"]):  # on the node path, as above
        out = tmp_path / f"prior{len(flag)}.fits"
        assert main(["calibrate", wrong_colours, "--templates", cache, "--photometry", _cat(wrong_colours),
                     "--fwhm", str(FWHM), "--backend", "numpy", "--out", str(out), "--fit", "nodes", *flag]) == 0
        ps = read_calibrated_frame(out).per_star
        teff[bool(flag)] = float(ps["TEFF"][_rows(ps, sims[0])[PRIOR_STAR]])
    assert teff[True] == pytest.approx(_params(_run(files, grid, fit="nodes"), sims[0])[PRIOR_STAR, 0], abs=0.01)
    assert teff[True] - teff[False] >= 100.0


# --- --smooth, --combine -------------------------------------------------------------------------

def test_smooth_gives_a_smoother_vector_as_close_to_the_truth(files, grid, default):
    _, _, _, sims = files
    smooth = _run(files, grid, smooth=51)
    r0, r1 = _roughness(default.cal, default.measured), _roughness(smooth.cal, smooth.measured)
    assert r1 < 0.5 * r0
    assert _cal_error(smooth.cal, smooth.measured, sims[0]) <= _cal_error(default.cal, default.measured, sims[0]) + 0.002


def test_median_combination_differs_and_both_are_within_tolerance(files, grid, default):
    _, _, _, sims = files
    med = _run(files, grid, combine="median")
    m = default.measured & med.measured
    assert np.mean(np.abs(med.cal[m] / default.cal[m] - 1.0) > 1e-6) > 0.5  # different on most pixels
    for out in (default, med):
        assert _cal_error(out.cal, out.measured, sims[0]) < 0.03
    # the median's variance is π/2 that of the plain weighted mean (same stars, same pixels); the default
    # floored_mean's carries the stars' model-error floors as well, so it is at least the plain mean's
    plain = _run(files, grid, combine="weighted_mean")
    m = m & plain.measured
    ratio = med.cal_var[m] / plain.cal_var[m]
    assert abs(np.median(ratio) / (math.pi / 2.0) - 1.0) < 0.02
    assert np.all(default.cal_var[m] >= plain.cal_var[m] * (1.0 - 1e-9))


def test_cli_combine_median_equals_the_api(files, grid, tmp_path):
    _, cache, frames, _ = files
    out = tmp_path / "median.fits"
    assert main(["calibrate", frames[0], "--templates", cache, "--photometry", _cat(frames[0]), "--fwhm", str(FWHM),
                 "--backend", "numpy", "--combine", "median", "--out", str(out)]) == 0
    api = _run(files, grid, combine="median")
    cal = read_calibrated_frame(out).cal
    np.testing.assert_allclose(np.asarray(cal["CAL"], float), api.cal, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(cal["CAL_VAR"], float), api.cal_var, rtol=1e-6)


# --- --max-chi2-dof, --min-stars, --vrange -------------------------------------------------------

def test_max_chi2_dof_excludes_the_worst_fitting_star(files, grid, default):
    chi2 = np.asarray(default.per_star["CHI2_DOF"], float)
    order = np.argsort(chi2)
    cut = 0.5 * (chi2[order[-1]] + chi2[order[-2]])
    out = _run(files, grid, max_chi2_dof=cut)
    used = np.asarray(out.per_star["USED"], bool)
    assert used.sum() == 2 and not used[order[-1]]
    assert "chi2/dof" in str(out.per_star["REASON"][order[-1]])
    assert out.summary["n_stars_used"] == 2
    assert not np.allclose(out.cal, default.cal, rtol=1e-6, atol=0.0)  # one star fewer in the combination
    loose = _run(files, grid, max_chi2_dof=1e6)
    assert loose.summary["n_stars_used"] == 3


def test_min_stars_above_the_usable_count_is_an_error(files, grid, tmp_path, capsys):
    _, cache, frames, _ = files
    with pytest.raises(CalibrationError, match="fewer than --min-stars 4"):
        _run(files, grid, min_stars=4)
    assert _run(files, grid, min_stars=3).summary["n_stars_used"] == 3
    out = tmp_path / "min.fits"
    rc = main(["calibrate", frames[0], "--templates", cache, "--photometry", _cat(frames[0]), "--fwhm", str(FWHM),
               "--backend", "numpy", "--min-stars", "4", "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "fewer than --min-stars 4" in capsys.readouterr().err


def test_narrow_vrange_excludes_the_star_at_its_edge(files, grid, default):
    _, _, _, sims = files
    sim = sims[0]
    fast_star = int(np.argmax(np.abs(sim.truth["rv"])))  # STD001 at -85 km/s
    assert abs(sim.truth["rv"][fast_star]) > 60.0
    out = _run(files, grid, vrange=(-50.0, 50.0, 5.0))
    r = _rows(out.per_star, sim)
    used = np.asarray(out.per_star["USED"], bool)[r]
    assert not used[fast_star] and used.sum() == 2
    assert "edge of the scan range" in str(out.per_star["REASON"][r[fast_star]])
    assert np.all(np.asarray(default.per_star["USED"], bool))
    # the others keep their velocities
    np.testing.assert_allclose(_params(out, sim)[used, 3], _params(default, sim)[used, 3], atol=1.0)


# --- a serial batch of two frames through the CLI ------------------------------------------------

def _batch(files, outdir, *opts):
    _, cache, frames, _ = files
    rc = main(["calibrate", *frames, "--templates", cache, "--photometry", "{dir}/{stem}_cat.csv",
               "--fwhm", str(FWHM), "--backend", "numpy", "--out", str(outdir), *opts])
    return rc, [read_calibrated_frame(outdir / f"frame{i}_fluxcal.fits") if rc == 0 else None for i in (0, 1)]


@pytest.fixture(scope="module")
def batch_default(files, tmp_path_factory):
    rc, outs = _batch(files, tmp_path_factory.mktemp("batch_default"))
    assert rc == 0
    return outs


def test_batch_vrange_excludes_the_edge_star_in_both_frames(files, tmp_path, batch_default):
    _, _, _, sims = files
    rc, outs = _batch(files, tmp_path / "vr", "--vrange", "-50:50:5")
    assert rc == 0
    for out, ref, sim in zip(outs, batch_default, sims):
        r = _rows(out.per_star, sim)
        used = np.asarray(out.per_star["USED"], bool)[r]
        assert used.tolist() == [False, True, True]  # STD001 (-85 km/s) at the edge
        assert np.all(np.asarray(ref.per_star["USED"], bool))
        assert int(out.header["FCALNSTD"]) == 2 and int(ref.header["FCALNSTD"]) == 3


def test_batch_smooth_and_median_change_each_frame(files, tmp_path, batch_default):
    _, _, _, sims = files
    rc, outs = _batch(files, tmp_path / "sm", "--smooth", "51", "--combine", "median")
    assert rc == 0
    for out, ref, sim in zip(outs, batch_default, sims):
        a, b = out.cal, ref.cal
        assert _roughness(a["CAL"], a["MEASURED"]) < 0.5 * _roughness(b["CAL"], b["MEASURED"])
        assert _cal_error(a["CAL"], a["MEASURED"], sim) < 0.03
        m = np.asarray(a["MEASURED"], bool) & np.asarray(b["MEASURED"], bool)
        assert np.median(np.asarray(a["CAL_VAR"])[m] / np.asarray(b["CAL_VAR"])[m]) > 1.0  # π/2 before smoothing


def test_batch_default_equals_the_api_run(files, grid, default, batch_default):
    cal = batch_default[0].cal
    np.testing.assert_allclose(np.asarray(cal["CAL"], float), default.cal, rtol=1e-6)

"""Issue 15 (part B): per-fibre wavelengths and per-fibre resolution end to end.

Kernels on the ``xp`` fixture against brute-force NumPy loops; the pipeline on
simulated frames whose fibres carry their own wavelength solutions and LSFs.
"""

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import interp_rows


def _rows_oracle(x, grid, fp, left=None, right=None):
    return np.stack([np.interp(x[i], grid[i], fp[i], left=left, right=right) for i in range(grid.shape[0])])


@pytest.mark.parametrize("edges", [(None, None), (np.nan, -1.0)])
def test_interp_rows_matches_a_loop_of_numpy_interp(backend, edges):
    rng = np.random.default_rng(5)
    n_row, n, m = 7, 50, 80
    grid = np.sort(rng.uniform(4000.0, 4100.0, (n_row, n)), axis=1) + rng.uniform(-3, 3, (n_row, 1))
    fp = rng.normal(size=(n_row, n))
    x = rng.uniform(3990.0, 4110.0, (n_row, m))
    x[:, 0] = grid[:, 0]  # on the first and last abscissae exactly
    x[:, 1] = grid[:, -1]
    got = interp_rows(backend.asarray(x), backend.asarray(grid), backend.asarray(fp), left=edges[0], right=edges[1])
    assert_close(got, _rows_oracle(x, grid, fp, *edges), rtol=1e-12, atol=1e-12, backend=backend)


def test_interp_rows_broadcasts_a_shared_query_and_keeps_float32(backend):
    rng = np.random.default_rng(6)
    grid = np.cumsum(rng.uniform(0.5, 1.5, (4, 30)), axis=1)
    fp = rng.normal(size=(4, 30)).astype(np.float32)
    x = np.linspace(0.0, 30.0, 45)
    got = interp_rows(backend.asarray(x[None, :]), backend.asarray(grid), backend.asarray(fp))
    assert str(got.dtype).endswith("float32") and tuple(got.shape) == (4, 45)
    want = _rows_oracle(np.broadcast_to(x, (4, 45)), grid, fp.astype(np.float64))
    assert_close(got, want, rtol=2e-6, atol=2e-6, backend=backend)


# --- kernels on per-star wavelengths -------------------------------------------------------------

import dataclasses  # noqa: E402
import math  # noqa: E402

from astropy.io import fits  # noqa: E402

from gpucal.backends import to_numpy  # noqa: E402
from gpucal.calibration import cal_at_fibres, common_grid, to_common_grid  # noqa: E402
from gpucal.containers import CalibrationVectors  # noqa: E402
from gpucal.errors import InputError  # noqa: E402
from gpucal.fitting import convolve_fwhm, fit_continuum, fwhm_on_grid, legendre_basis  # noqa: E402
from gpucal.fitting import representative_fwhm_poly  # noqa: E402


def _fibre_waves(n_row=4, n_pix=120, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(5000.0, 5600.0, n_pix)
    return (base[None, :] - 5300.0) * (1 + rng.uniform(-1e-4, 1e-4, (n_row, 1))) + 5300.0 \
        + rng.uniform(-0.3, 0.3, (n_row, 1)) * (base[1] - base[0])


def test_to_common_grid_matches_a_loop_with_variance_and_masks(backend):
    rng = np.random.default_rng(1)
    rows = _fibre_waves()
    cal = 1.0 + 0.1 * np.sin(rows / 50.0) + rng.normal(0, 1e-3, rows.shape)
    var = rng.uniform(1e-6, 2e-6, rows.shape)
    mask = rng.uniform(size=rows.shape) > 0.05
    wc = rows.mean(axis=0)
    vec = CalibrationVectors(wave=None, cal=backend.asarray(np.where(mask, cal, np.nan)), var=backend.asarray(var),
                             mask=backend.asarray(mask))
    got = to_common_grid(vec, backend.asarray(rows), backend.asarray(wc))
    for i in range(rows.shape[0]):  # the oracle: one star at a time, with its own searchsorted
        j = np.clip(np.searchsorted(rows[i], wc, side="right"), 1, rows.shape[1] - 1)
        t = (wc - rows[i, j - 1]) / (rows[i, j] - rows[i, j - 1])
        inside = (wc >= rows[i, 0]) & (wc <= rows[i, -1])
        good = inside & mask[i, j - 1] & mask[i, j]
        want_cal = (1 - t) * cal[i, j - 1] + t * cal[i, j]
        want_var = (1 - t) ** 2 * var[i, j - 1] + t ** 2 * var[i, j]
        m = to_numpy(got.mask)[i]
        np.testing.assert_array_equal(m, good)
        np.testing.assert_allclose(to_numpy(got.cal)[i][m], want_cal[m], rtol=1e-12)
        np.testing.assert_allclose(to_numpy(got.var)[i][m], want_var[m], rtol=1e-12)
    assert_close(common_grid(backend.asarray(rows)), wc, rtol=1e-14, backend=backend)


def test_cal_at_fibres_reads_the_combined_vector_at_each_fibres_wavelengths(backend):
    rows = _fibre_waves(seed=2)
    wc = rows.mean(axis=0)
    cal = 2.0 + np.cos(wc / 80.0)
    measured = np.ones(wc.shape, bool)
    measured[50:55] = False
    c, cv, m = cal_at_fibres(backend.asarray(rows), backend.asarray(wc), backend.asarray(cal),
                             backend.asarray(cal * 1e-4), backend.asarray(measured))
    want = np.stack([np.interp(r, wc, cal) for r in rows])
    assert_close(c, want, rtol=1e-12, backend=backend)
    assert_close(cv, want * 1e-4, rtol=1e-12, backend=backend)
    m = to_numpy(m)
    inside = (rows >= wc[0]) & (rows <= wc[-1])
    assert not m[~inside].any() and not m[:, 52].any() and m[:, 10:40].all()


def test_continuum_on_per_star_wavelengths_equals_one_star_at_a_time(backend):
    rows = _fibre_waves(n_row=3, n_pix=200, seed=3)
    flux = (rows / 5300.0) ** -2 * (1 - 0.3 * np.exp(-0.5 * ((rows - 5200.0) / 3.0) ** 2))
    w = np.ones_like(flux)
    got = fit_continuum(backend.asarray(rows), backend.asarray(flux), backend.asarray(w), degree=4)
    want = np.concatenate([to_numpy(fit_continuum(backend.asarray(rows[i]), backend.asarray(flux[i:i + 1]),
                                                  backend.asarray(w[i:i + 1]), degree=4)) for i in range(3)])
    assert_close(got, want, rtol=1e-9, backend=backend)
    assert tuple(legendre_basis(backend.asarray(rows), 4).shape) == (3, 200, 5)


def _gauss_oracle(lam_t, f, lam, sigma):
    """∫ f N(λ'; λ, σ) dλ' by the trapezoid rule on a fine linear grid (σ ≫ its step)."""
    x = np.linspace(lam - 10 * sigma, lam + 10 * sigma, 4001)
    g = np.exp(-0.5 * ((x - lam) / sigma) ** 2)
    return np.trapezoid(np.interp(x, lam_t, f) * g, x) / np.trapezoid(g, x)


def test_convolve_fwhm_gives_each_star_its_own_lsf(backend):
    lam = 5000.0 * np.exp(np.arange(6000) / 60000.0)  # log-uniform, 0.08-0.09 Å pixels
    f = 1 - 0.5 * np.exp(-0.5 * ((lam - 5250.0) / 0.4) ** 2) - 0.3 * np.exp(-0.5 * ((lam - 5400.0) / 0.8) ** 2)
    fw = np.stack([1.0 + 2e-4 * (lam - 5000.0), np.full_like(lam, 2.5), 3.0 - 3e-4 * (lam - 5000.0)])
    flux = np.broadcast_to(f, fw.shape)
    flux = backend.asarray(np.ascontiguousarray(flux))
    got = to_numpy(convolve_fwhm(backend.asarray(lam), flux, backend.asarray(fw)))
    sig_per_fwhm = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    for s in range(3):
        for i in (2000, 2700, 3200, 3900):
            want = _gauss_oracle(lam, f, lam[i], fw[s, i] * sig_per_fwhm)
            assert abs(got[s, i] - want) < 2e-5, (s, i)
    # the FWHM carried from a star's pixels onto the template grid, edge values beyond
    obs = _fibre_waves(n_row=3, n_pix=50)
    fo = 2.0 + obs / 1e4
    on = to_numpy(fwhm_on_grid(backend.asarray(lam), backend.asarray(obs), backend.asarray(fo)))
    np.testing.assert_allclose(on, np.stack([np.interp(lam, obs[i], fo[i]) for i in range(3)]), rtol=1e-12)


def test_lsf_ratio_is_each_stars_own_lsf_over_the_representative_one(backend):
    """R_i = (T_i ⊗ LSF_i) / (T_i ⊗ LSF_rep) at λ / D(v_i), against trapezoid integrals of the Gaussians
    at the template pixels around each shifted pixel (linearly interpolated, as the kernel samples)."""
    from gpucal.containers import SpectraBatch
    from gpucal.fitting import divide_ratio, lsf_ratio
    from gpucal.units import doppler_factor

    lam = 5000.0 * np.exp(np.arange(6000) / 60000.0)  # log-uniform, 0.08-0.09 Å pixels, to 5526 Å
    lines = [(5150.0, 0.5, 0.4), (5250.0, 0.4, 0.6), (5320.0, 0.3, 0.3)]
    f = np.stack([1 - sum(d * np.exp(-0.5 * ((lam - c - s) / w) ** 2) for c, d, w in lines) for s in (0.0, 2.0)])
    obs = _fibre_waves(n_row=2, n_pix=400, seed=7) * 0.5 + 2600.0  # 5100-5400 Å, each star its own
    fw = np.stack([np.full(400, 2.0), np.full(400, 3.8)])  # Å, per star: 35 % under, 25 % over the rep
    poly, rv = [1.0, 4e-4], np.array([-85.0, 40.0])  # rep FWHM 3.04-3.16 Å
    b = backend.asarray
    got = to_numpy(lsf_ratio(b(lam), b(f), b(obs), b(rv), b(fw), fwhm_poly=poly))
    sig = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    for s in range(2):
        at_lines = [int(np.searchsorted(obs[s], (c + 2.0 * s) * doppler_factor(float(rv[s])))) + o
                    for c, _, _ in lines for o in (-2, 0, 1)]
        for i in [30] + at_lines:  # the continuum and each line's core and wing
            x = obs[s, i] / doppler_factor(float(rv[s]))
            j = int(np.searchsorted(lam, x))
            t = (x - lam[j - 1]) / (lam[j] - lam[j - 1])

            def at(fwhm_of):
                ends = [_gauss_oracle(lam, f[s], lam[k], fwhm_of(lam[k]) * sig) for k in (j - 1, j)]
                return (1 - t) * ends[0] + t * ends[1]

            want = at(lambda _: fw[s, 0]) / at(lambda w: poly[0] + poly[1] * w)
            # 1e-4: the kernel stops at 4 σ (6e-5 of its weight beyond), the oracle at 10 σ
            assert abs(got[s, i] - want) < 1e-4, (s, i, got[s, i], want)
        assert np.ptp(got[s, at_lines]) > 0.02, got[s, at_lines]
    assert np.ptp(got) > 0.05  # the lines: a narrower LSF deepens them (R < 1), a broader one fills them
    # the same LSF for the star as the representative one: R = 1 (no bias where the LSFs agree)
    same = np.polyval(poly[::-1], obs)
    one = to_numpy(lsf_ratio(b(lam), b(f), b(obs), b(rv), b(same), fwhm_poly=poly))
    np.testing.assert_allclose(one, 1.0, atol=1e-12)
    spectra = SpectraBatch(wave=b(obs), flux=b(np.full(obs.shape, 3.0)), var=b(np.full(obs.shape, 4.0)),
                           mask=b(np.ones(obs.shape, bool)), fibre_ids=[1, 2], names=["a", "b"])
    out = divide_ratio(spectra, b(got))
    np.testing.assert_allclose(to_numpy(out.flux), 3.0 / got, rtol=1e-14)
    np.testing.assert_allclose(to_numpy(out.var), 4.0 / got**2, rtol=1e-14)


def test_representative_fwhm_poly_is_the_median_fibres_cubic():
    lam = np.linspace(4000.0, 9000.0, 300)
    fw = np.stack([1.0 + 3e-4 * lam + 1e-8 * lam**2 + d for d in (-0.4, 0.0, 0.1, 0.5, 0.9)])
    c = representative_fwhm_poly(np.broadcast_to(lam, fw.shape), fw)
    np.testing.assert_allclose(np.polynomial.polynomial.polyval(lam, c), fw[2], rtol=1e-9)


def test_scan_moves_each_star_into_the_rest_frame_on_its_own_wavelengths(backend):
    from gpucal.fitting.prepare import velocity_grid, working_grid
    from gpucal.fitting.scan import _phase_plan, _shifted_phases

    xp = backend.xp
    rng = np.random.default_rng(4)
    rows = _fibre_waves(n_row=3, n_pix=300, seed=5)
    dn = 1.0 - 0.4 * np.exp(-0.5 * ((rows - 5300.0) / 2.0) ** 2) + rng.normal(0, 1e-3, rows.shape)
    wn = rng.uniform(0.5, 1.0, rows.shape)
    good = rng.uniform(size=rows.shape) > 0.02
    b = backend.asarray
    wq = working_grid(b(rows), 5.0)
    vel = velocity_grid(-100.0, 100.0, 5.0, like=wq)
    plan = _phase_plan(wq, vel)
    assert plan is not None
    sh = _shifted_phases(wq, b(rows), b(dn), b(wn), b(good), vel, xp.float64, plan)
    for i in range(3):
        one = _shifted_phases(wq, b(rows[i]), b(dn[i:i + 1]), b(wn[i:i + 1]), b(good[i:i + 1]), vel, xp.float64, plan)
        np.testing.assert_allclose(to_numpy(sh.d)[i], to_numpy(one.d)[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(sh.w)[i], to_numpy(one.w)[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(to_numpy(sh.c)[:, i], to_numpy(one.c)[:, 0], rtol=1e-10)
    assert float(to_numpy(working_grid(b(rows)))[0]) == rows[:, 0].min()


# --- the pipeline on frames whose fibres have their own wavelengths and LSFs ---------------------

from gpucal.io import read_calibrated_frame, read_frame, write_frame  # noqa: E402
from gpucal.pipeline import calibrate_frame  # noqa: E402
from gpucal.simulate import simulate_frame, write_catalogue_csv  # noqa: E402
from gpucal.templates.demo import demo_grid  # noqa: E402

FWHM_POLY = [1.0, 4e-4]  # 3.0 Å at 5000 Å to 3.6 Å at 6500 Å, 4-5 pixels of 0.75 Å
SIM = dict(n_standards=3, n_program=2, n_sky=1, n_pix=2000, wave_range=(5000.0, 6500.0), noise=False,
           params=[(6000.0, 4.5, 0.0, 0.0), (6250.0, 4.0, -0.5, 0.0), (5750.0, 4.5, 0.0, 0.0)],
           rvs=[-85.0, 12.0, 40.0])
RUN = dict(vrange=(-200.0, 200.0, 5.0), backend="numpy")


@pytest.fixture(scope="module")
def grid():
    """The demo grid cut to the F/G nodes around the standards (45 templates): a calibration takes seconds."""
    g = demo_grid()
    p = np.asarray(g.params)
    keep = (p[:, 0] >= 5500) & (p[:, 0] <= 6500) & (p[:, 1] >= 4.0) & (p[:, 2] <= 0.0)
    return dataclasses.replace(g, params=p[keep], flux=np.asarray(g.flux)[keep], meta={},
                               continuum=None if g.continuum is None else np.asarray(g.continuum)[keep])


def _write(tmp, name, sim, lsf=None):
    path = tmp / f"{name}.fits"
    write_frame(path, sim.flux, sim.var, sim.wave, sim.fibres)
    if lsf is not None:
        with fits.open(path, mode="append") as h:
            h.append(fits.ImageHDU(lsf, name="LSF"))
    write_catalogue_csv(sim.catalogue, tmp / f"{name}.csv")
    return str(path), str(tmp / f"{name}.csv")


def test_per_fibre_wavelengths_calibrate_like_a_common_grid(tmp_path, grid):
    """Issue 15 acceptance: per-fibre WAVELA (±0.3 px, dispersion 1e-4), FWHM varying with λ, within 0.05 % RMS."""
    common = simulate_frame(seed=3, fwhm_poly=FWHM_POLY, **SIM)
    fibre = simulate_frame(seed=3, fwhm_poly=FWHM_POLY, wave_jitter=(0.3, 1e-4), **SIM)
    shift = fibre.wave - common.wave[None, :]
    assert fibre.wave.shape == (6, 2000) and 0.3 <= np.abs(shift).max() / 0.75 < 0.6  # offset + dispersion, in px
    out = {}
    for name, sim in (("common", common), ("fibre", fibre)):
        path, cat = _write(tmp_path, name, sim)
        out[name] = calibrate_frame(path, photometry=cat, templates=grid, fwhm_poly=FWHM_POLY,
                                    out=str(tmp_path / f"{name}_out.fits"), **RUN)
    rc, rf = out["common"], out["fibre"]
    assert rf.wave.shape == (2000,)
    np.testing.assert_allclose(rf.wave, fibre.wave.mean(axis=0), rtol=1e-14)
    cal_f = np.interp(rc.wave, rf.wave, rf.cal)
    both = rc.measured & (np.interp(rc.wave, rf.wave, rf.measured.astype(float)) > 0.999)
    assert both.sum() > 1600
    rms = np.sqrt(np.mean((cal_f[both] / rc.cal[both] - 1.0) ** 2))
    assert rms < 5e-4, rms  # measured: 1.3e-4 (2.4e-4 and 1.5e-4 with seeds 2 and 5)
    # the output keeps each fibre's wavelengths, and each fibre is calibrated at them
    written = read_calibrated_frame(tmp_path / "fibre_out.fits")
    np.testing.assert_array_equal(written.wave, fibre.wave)
    prog = fibre.truth["program_fibres"]
    errs = {}
    for name, sim, res in (("common", common, rc), ("fibre", fibre, rf)):
        got = res.flux[sim.truth["program_fibres"]] / sim.truth["program_true_flux"]
        errs[name] = np.sqrt(np.mean((got[:, 50:-50][:, res.measured[50:-50]] - 1.0) ** 2))
    assert errs["fibre"] < errs["common"] + 5e-4, errs
    np.testing.assert_allclose(written.flux[prog], rf.flux[prog], rtol=1e-12)


@pytest.fixture(scope="module")
def lsf_runs(tmp_path_factory, grid):
    """A frame with an LSF image per fibre and pixel (FWHM(λ) × 0.6-1.4 per fibre; seed 3: 3.48, 2.09 and
    3.17 Å at 5000 Å for the standards) calibrated three ways: ``exact`` the continuous fit and the vectors
    on each star's own LSF (the default), ``nodes`` the node refinement on each star's own LSF, ``single``
    one representative LSF (the standards' median, which the scan uses) for everything."""
    tmp = tmp_path_factory.mktemp("lsf")
    sim = simulate_frame(seed=3, fwhm_poly=FWHM_POLY, wave_jitter=(0.3, 1e-4), fwhm_scatter=0.4, **SIM)
    path, cat = _write(tmp, "lsf", sim, lsf=sim.truth["fwhm_fibre"])
    frame = read_frame(path)
    np.testing.assert_array_equal(frame.lsf_fwhm, sim.truth["fwhm_fibre"])
    single = representative_fwhm_poly(frame.wave[frame.standards], frame.lsf_fwhm[frame.standards])
    runs = {name: calibrate_frame(path, photometry=cat, templates=grid, out=str(tmp / f"{name}.fits"), **RUN, **opt)
            for name, opt in (("exact", {}), ("nodes", dict(fit="nodes")), ("single", dict(fwhm_poly=single)))}
    return sim, frame, runs, tmp


def _param_errors(sim, res):
    """(n_star, 3) fitted − true (Teff, logg, [M/H]) of each standard."""
    truth = sim.truth["params"][[int(str(n)[3:]) - 1 for n in res.per_star["NAME"]]]
    got = np.stack([np.asarray(res.per_star[k], float) for k in ("TEFF", "LOGG", "MH")], axis=1)
    return got - truth[:, :3]


def test_continuous_fit_on_each_stars_own_lsf_is_as_good_as_the_node_path(lsf_runs):
    """Issue 14/15: the continuous fit takes a per-fibre LSF (counts over R_i, fitting/lsfratio.py).

    Measured (shared 2-core VM, seed 3, fibre 2 at 2.09 Å against a median of 3.17 Å): |error| at most
    Teff 5 K, logg 0.003, [M/H] 0.001 (continuous, own LSF); node path on own LSF 24 K, 0.029, 0.001;
    the continuous fit on the representative LSF alone (R = 1) 158 K, 0.132, 0.035
    (bench/results/perfibre_lsf_fit_vm.json, seeds 2-4).
    """
    sim, _, runs, _ = lsf_runs
    cont, nodes = np.abs(_param_errors(sim, runs["exact"])), np.abs(_param_errors(sim, runs["nodes"]))
    assert np.all(cont.max(axis=0) <= nodes.max(axis=0) + [1.0, 0.002, 0.002]), (cont, nodes)
    assert np.all(cont.max(axis=0) < [12.0, 0.012, 0.01]), cont
    # it is the continuous fit that ran (its θ is not the node refinement's)
    assert np.abs(np.asarray(runs["exact"].per_star["TEFF"]) - np.asarray(runs["nodes"].per_star["TEFF"])).max() > 1.0


def test_exact_per_fibre_lsf_beats_a_single_lsf(lsf_runs):
    """Issue 15 acceptance: an LSF image per fibre and pixel, used exactly in the per-star vectors and the
    continuous fit, calibrates closer to the truth than one LSF for all fibres, and than the node path.

    Measured (shared 2-core VM; combined vector vs the true 1/throughput, RMS): exact (continuous fit)
    0.047 %, node path on each star's own LSF 0.18 %, one representative LSF 1.4 %; each star's vector
    shape 0.02-0.05 % exact, up to 1.9 % with one LSF (bench/perfibre_lsf.py).
    """
    sim, frame, runs, tmp = lsf_runs
    std = frame.standards
    thr, thr_f = sim.truth["throughput"], sim.truth["throughput_fibre"][std]
    err, star_err = {}, {}
    for name, res in runs.items():
        r = res.cal[res.measured] * thr[res.measured]
        err[name] = np.sqrt(np.mean((r - 1.0) ** 2))
        sc = res.star_cal * thr_f
        star_err[name] = np.mean([np.std(sc[i][res.star_mask[i]] / np.median(sc[i][res.star_mask[i]]))
                                  for i in range(std.size)])
    assert err["exact"] < 0.5 * err["single"], err
    assert star_err["exact"] < 0.5 * star_err["single"], star_err
    assert err["exact"] < err["nodes"] and err["exact"] < 1e-3, err
    out = fits.getdata(tmp / "exact.fits", "LSF")  # the LSF image travels with the calibrated frame
    np.testing.assert_array_equal(out, sim.truth["fwhm_fibre"])


def test_frame_lsf_needs_an_lsf_image_and_no_other_lsf_option(tmp_path, grid):
    sim = simulate_frame(seed=1, n_standards=2, n_program=0, n_sky=1, n_pix=300, wave_range=(5000.0, 5600.0),
                         wave_jitter=(0.3, 1e-4), fwhm=3.0)
    plain, cat = _write(tmp_path, "plain", sim)
    with pytest.raises(InputError, match=r"plain.fits: --frame-lsf: the frame has no LSF image \(nor a RESOLUTION"):
        calibrate_frame(plain, photometry=cat, templates=grid, frame_lsf=True, **RUN)
    with_lsf, _ = _write(tmp_path, "with", sim, lsf=np.full((3, 300), 3.0))
    with pytest.raises(InputError, match=r"with.fits: --frame-lsf: an LSF option is given too"):
        calibrate_frame(with_lsf, photometry=cat, templates=grid, frame_lsf=True, fwhm=3.0, **RUN)


def test_fwhm_from_a_desi_resolution_matrix(backend):
    from gpucal.fitting import fwhm_from_resolution

    wave = 5000.0 + 0.8 * np.arange(200) + 2e-4 * np.arange(200) ** 2
    sig = np.stack([np.linspace(0.9, 1.4, 200), np.linspace(1.3, 1.0, 200)])  # px, per fibre and pixel (DESI: ~1)
    k = 5 - np.arange(11)
    r = np.exp(-0.5 * (k[None, :, None] / sig[:, None, :]) ** 2)
    r = r / r.sum(axis=1, keepdims=True)
    r[:, 0, :] -= 1e-4  # a little negative ringing in the wings is clipped
    got = to_numpy(fwhm_from_resolution(backend.asarray(wave), backend.asarray(r)))
    want = 2.0 * math.sqrt(2.0 * math.log(2.0)) * sig * np.gradient(wave)[None, :]
    np.testing.assert_allclose(got, want, rtol=5e-3)  # sampled at whole pixels, cut at ±5: its moment is ~σ²


def test_the_pipeline_takes_each_standards_lsf_from_a_resolution_matrix(tmp_path):
    from gpucal.backends import get_backend
    from gpucal.pipeline import _standards_fwhm

    sim = simulate_frame(seed=1, n_standards=2, n_program=1, n_sky=1, n_pix=600, wave_range=(5000.0, 5600.0),
                         wave_jitter=(0.3, 1e-4), fwhm_poly=[1.0, 4e-4], fwhm_scatter=0.2)
    path, _ = _write(tmp_path, "res", sim)
    frame = read_frame(path)
    assert frame.lsf_fwhm is None and _standards_fwhm(frame, frame.standards, get_backend("numpy")) is None
    disp = np.gradient(frame.wave, axis=1)
    sig = sim.truth["fwhm_fibre"] / (2.0 * math.sqrt(2.0 * math.log(2.0))) / disp  # px, about 1.1-1.7
    k = 5 - np.arange(11)
    r = np.exp(-0.5 * (k[None, :, None] / sig[:, None, :]) ** 2)
    frame.resolution = r / r.sum(axis=1, keepdims=True)  # as the DESI reader hands it on (Frame.resolution)
    got = _standards_fwhm(frame, frame.standards, get_backend("numpy"))
    np.testing.assert_allclose(got, sim.truth["fwhm_fibre"][frame.standards], rtol=2e-2)


def test_per_fibre_wavelengths_and_lsf_read_flipped_and_written_back_as_they_came(tmp_path):
    from gpucal.io import write_calibrated_frame

    sim = simulate_frame(seed=4, n_standards=2, n_program=1, n_sky=1, n_pix=200, wave_range=(5000.0, 5400.0),
                         wave_jitter=(0.3, 1e-4), fwhm=3.0)
    wave_in, lsf_in = sim.wave[:, ::-1], np.linspace(2.0, 3.0, 4 * 200).reshape(4, 200)  # red to blue on disk
    path, _ = _write(tmp_path, "flip", dataclasses.replace(sim, flux=sim.flux[:, ::-1], var=sim.var[:, ::-1],
                                                           wave=wave_in), lsf=lsf_in)
    frame = read_frame(path)
    assert frame.flipped and frame.wave.shape == (4, 200)
    np.testing.assert_array_equal(frame.wave, sim.wave)
    np.testing.assert_array_equal(frame.lsf_fwhm, lsf_in[:, ::-1])
    np.testing.assert_array_equal(frame.flux, sim.flux)
    out = tmp_path / "flip_out.fits"
    n = frame.n_pix
    write_calibrated_frame(out, frame, frame.flux * 2.0, frame.var * 4.0, cal_wave=common_grid(frame.wave),
                           cal=np.full(n, 2.0), cal_var=np.zeros(n), cal_measured=np.ones(n, bool))
    with fits.open(out) as h:
        np.testing.assert_array_equal(h["WAVELA"].data, wave_in)
        np.testing.assert_array_equal(h["LSF"].data, lsf_in)
        np.testing.assert_array_equal(h[0].data, 2.0 * sim.flux[:, ::-1])

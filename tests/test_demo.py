"""The built-in demo grid and frame simulator (host NumPy edge module)."""

import math

import numpy as np
import pytest

from gpucal.containers import TemplateGrid
from gpucal.units import C_KMS
from gpucal.templates.demo import demo_grid, demo_template, demo_wave
from gpucal.simulate import DEFAULT_TELLURIC_BANDS, DemoFrame, simulate_frame, write_catalogue_csv


@pytest.fixture(scope="module")
def grid():
    return demo_grid()


@pytest.fixture(scope="module")
def frame():
    return simulate_frame()


@pytest.fixture(scope="module")
def clean():
    return simulate_frame(noise=False)


def _node(grid, teff, logg, mh, alpha=0.0):
    hit = np.flatnonzero(np.all(np.isclose(grid.params, [teff, logg, mh, alpha]), axis=1))
    assert hit.size == 1
    return int(hit[0])


def _smooth_log(grid, flux, r):
    """Convolve to resolving power r on the log grid."""
    from scipy.ndimage import gaussian_filter1d

    sig = 1.0 / r / (2.0 * math.sqrt(2.0 * math.log(2.0))) / grid.dlnlam
    return gaussian_filter1d(flux, sig, axis=-1)


# ------------------------------------------------------------------- grid


def test_grid_shape_and_coverage(grid):
    assert isinstance(grid, TemplateGrid)
    assert grid.params.shape == (15 * 4 * 4, 4)
    assert grid.flux.shape == grid.continuum.shape == (240, grid.wave.size)
    assert grid.flux.dtype == np.float64
    t, g, m, a = grid.params.T
    assert set(t) == set(np.arange(4500.0, 8001.0, 250.0))
    assert set(g) == {3.5, 4.0, 4.5, 5.0}
    assert set(m) == {-1.0, -0.5, 0.0, 0.5}
    assert set(a) == {0.0}
    assert len({tuple(p) for p in grid.params}) == 240
    assert grid.wave[0] == pytest.approx(3000.0) and 11000.0 <= grid.wave[-1] < 11001.0
    dl = np.diff(np.log(grid.wave))
    np.testing.assert_allclose(dl, 1.0 / 20000.0, rtol=1e-8)
    assert grid.dlnlam == pytest.approx(5e-5)
    assert grid.medium == "air" and grid.resolution_fwhm == 0.0
    assert grid.meta["source"] == "gpucal demo grid"


def test_grid_flux_physical(grid):
    assert np.all(np.isfinite(grid.flux)) and np.all(grid.flux > 0)
    assert np.all(grid.flux <= grid.continuum * (1 + 1e-12))
    # continuum ≈ π B_λ: Wien peak moves blueward with Teff, surface flux rises steeply
    cool, hot = _node(grid, 4500, 4.5, 0.0), _node(grid, 8000, 4.5, 0.0)
    assert grid.wave[np.argmax(grid.continuum[cool])] > grid.wave[np.argmax(grid.continuum[hot])]
    assert np.sum(grid.continuum[hot]) > 5 * np.sum(grid.continuum[cool])
    # order of magnitude of the solar surface flux at 5000 Å (≈ 6e7 for the real Sun)
    sun = demo_template(5750.0, 4.5, 0.0, wave=np.array([5000.0]), return_continuum=True)[1]
    assert 5e6 < sun[0] < 1e8


def test_grid_memoised_readonly_and_deterministic(grid):
    again = demo_grid()
    assert again.flux is grid.flux  # memoised
    assert not grid.flux.flags.writeable
    with pytest.raises(ValueError):
        grid.flux[0, 0] = 1.0
    # a different key recomputes the same physics
    small = demo_grid(teff=(6000.0,), logg=(4.5,), mh=(0.0,))
    np.testing.assert_array_equal(small.flux[0], grid.flux[_node(grid, 6000, 4.5, 0.0)])
    np.testing.assert_allclose(demo_template(6000.0, 4.5, 0.0), grid.flux[_node(grid, 6000, 4.5, 0.0)], rtol=1e-12)


def test_demo_template_off_node_and_any_wave(grid):
    i, j = _node(grid, 6000, 4.5, 0.0), _node(grid, 6250, 4.5, 0.0)
    mid = demo_template(6125.0, 4.5, 0.0)
    lo, hi = np.minimum(grid.flux[i], grid.flux[j]), np.maximum(grid.flux[i], grid.flux[j])
    inside = np.mean((mid >= lo * (1 - 1e-3)) & (mid <= hi * (1 + 1e-3)))
    assert inside > 0.99  # smooth, monotone-ish between nodes
    sel = np.arange(5000, 9000, 7)[::-1]  # any order, any subset: the same analytic model
    np.testing.assert_allclose(demo_template(6125.0, 4.5, 0.0, wave=grid.wave[sel]), mid[sel], rtol=1e-12)


def test_neighbouring_nodes_distinguishable(grid):
    """Δχ² between neighbours at R=3000, S/N 50, with a free multiplicative polynomial."""
    wl = np.linspace(3700.0, 9300.0, 3000)
    sm = _smooth_log(grid, grid.flux, 3000.0)
    f = np.stack([np.interp(wl, grid.wave, row) for row in sm])
    basis = np.polynomial.legendre.legvander((wl - 6500.0) / 2800.0, 8)
    steps = (250.0, 0.5, 0.5)
    key = {tuple(p): k for k, p in enumerate(grid.params)}
    worst = [np.inf, np.inf, np.inf]
    for k, p in enumerate(grid.params):
        for axis in range(3):
            q = p.copy()
            q[axis] += steps[axis]
            if tuple(q) not in key:
                continue
            a, b = f[k], f[key[tuple(q)]]
            s = a / 50.0
            design = b[:, None] * basis / s[:, None]
            coef, *_ = np.linalg.lstsq(design, a / s, rcond=None)
            worst[axis] = min(worst[axis], float(np.sum((a / s - design @ coef) ** 2)))
    assert min(worst) > 100.0, worst


def test_smooth_between_nodes(grid):
    """Normalised spectra change by small, similar amounts across consecutive Teff steps."""
    n = grid.flux / grid.continuum
    idx = [_node(grid, t, 4.5, 0.0) for t in np.arange(4500.0, 8001.0, 250.0)]
    d = np.array([np.sqrt(np.mean((n[b] - n[a]) ** 2)) for a, b in zip(idx[:-1], idx[1:])])
    assert np.all(d > 0) and d.max() / d.min() < 10.0
    assert d.max() < 0.05


def test_line_physics(grid):
    sm = _smooth_log(grid, grid.flux / grid.continuum, 4000.0)
    w = grid.wave

    def median_depth(k, centre, half):
        m = np.abs(w - centre) < half
        return 1.0 - np.median(sm[k, m])

    def min_flux(k, centre, half):
        m = np.abs(w - centre) < half
        return np.min(sm[k, m])

    cool, hot = _node(grid, 4500, 4.5, 0.0), _node(grid, 8000, 4.5, 0.0)
    for lam in (4861.33, 4340.47, 4101.74):  # Balmer wings: deeper when hot
        assert median_depth(hot, lam, 15.0) > median_depth(cool, lam, 15.0) + 0.05
    # Balmer wings grow with logg
    assert median_depth(_node(grid, 7500, 5.0, 0.0), 4101.74, 15.0) > median_depth(_node(grid, 7500, 3.5, 0.0), 4101.74, 15.0)
    # Ca II K: deeper / wider when cool; scales with [M/H]
    assert median_depth(cool, 3933.66, 10.0) > median_depth(hot, 3933.66, 10.0) + 0.1
    solar, poor = _node(grid, 6000, 4.5, 0.0), _node(grid, 6000, 4.5, -1.0)
    assert median_depth(solar, 3933.66, 10.0) > median_depth(poor, 3933.66, 10.0)
    for lam in (8542.09, 5183.60, 5889.95):  # Ca triplet, Mg b, Na D
        assert min_flux(cool, lam, 1.0) < min_flux(hot, lam, 1.0)
        assert min_flux(solar, lam, 1.0) < min_flux(poor, lam, 1.0)
    # the metal-line forest: total absorption grows with [M/H] and falls with Teff
    ew = 1.0 - grid.flux / grid.continuum
    band = (w > 5000) & (w < 6500)
    tot = lambda k: np.trapezoid(ew[k, band], w[band])  # noqa: E731
    assert tot(_node(grid, 6000, 4.5, 0.5)) > tot(solar) > tot(poor)
    assert tot(cool) > tot(_node(grid, 6000, 4.5, 0.0)) > tot(hot)


# ------------------------------------------------------------------- simulator


def test_frame_layout(frame):
    assert isinstance(frame, DemoFrame)
    n_fibre = 20
    assert frame.wave.shape == (4000,) and frame.flux.shape == frame.var.shape == (n_fibre, 4000)
    assert frame.wave[0] == 3700.0 and frame.wave[-1] == 9300.0
    np.testing.assert_allclose(np.diff(frame.wave), np.diff(frame.wave)[0])
    fib = frame.fibres
    assert list(fib.colnames) == ["FIBRE", "NAME", "TYPE", "RA", "DEC"]
    np.testing.assert_array_equal(fib["FIBRE"], np.arange(1, n_fibre + 1))
    types = np.array(fib["TYPE"])
    assert (types == "C").sum() == 5 and (types == "P").sum() == 10 and (types == "S").sum() == 5
    std_rows = frame.truth["std_fibres"]
    assert not np.array_equal(np.sort(std_rows), np.arange(5))  # shuffled: standards not all first
    assert np.all(types[std_rows] == "C")
    assert list(np.array(fib["NAME"])[std_rows]) == [f"STD{k:03d}" for k in range(1, 6)]
    cat = frame.catalogue
    assert list(cat.colnames) == ["name", "ra", "dec", "g", "dg", "r", "dr", "i", "di", "z", "dz"]
    np.testing.assert_array_equal(cat["ra"], fib["RA"][std_rows])
    assert np.all((cat["r"] > 13.9) & (cat["r"] < 16.1))
    for b in "griz":
        assert np.all((cat["d" + b] >= 0.01) & (cat["d" + b] <= 0.02))
    # separations > 10 arcsec, small field around (150, 2)
    ra, dec = np.array(fib["RA"]), np.array(fib["DEC"])
    assert np.all(np.abs(ra - 150) < 1) and np.all(np.abs(dec - 2) < 1)
    sep = np.hypot((ra[:, None] - ra[None]) * np.cos(np.radians(2.0)), dec[:, None] - dec[None]) * 3600
    assert np.min(sep[~np.eye(n_fibre, dtype=bool)]) > 10.0
    # standards on grid nodes, default velocities
    grid_nodes = {tuple(p) for p in demo_grid().params}
    assert all(tuple(p) in grid_nodes for p in frame.truth["params"])
    np.testing.assert_array_equal(frame.truth["rv"], [-85.0, -2.0, 0.7, 23.4, 140.0])


def test_frame_deterministic(frame):
    again = simulate_frame()
    np.testing.assert_array_equal(again.flux, frame.flux)
    np.testing.assert_array_equal(again.fibres["NAME"], frame.fibres["NAME"])
    other = simulate_frame(seed=1)
    assert not np.array_equal(other.flux, frame.flux)


def test_catalogue_magnitudes_independent(frame):
    """Trapezoid integral of the photon-weighted response on the shifted, diluted truth."""
    import speclite.filters

    t = frame.truth
    wave = demo_wave()
    filt = speclite.filters.load_filters("panstarrs-g", "panstarrs-r", "panstarrs-i", "panstarrs-z")
    c_aa = C_KMS * 1e13  # Å/s
    for k in range(5):
        f = demo_template(*t["params"][k], wave=wave / (1 + t["rv"][k] / C_KMS)) * t["dilution"][k]
        for b, resp in zip("griz", filt):
            fine = np.linspace(resp.wavelength[0], resp.wavelength[-1], 200001)
            r = np.interp(fine, resp.wavelength, resp.response)
            num = np.trapezoid(np.interp(fine, wave, f) * r * fine, fine)
            den = np.trapezoid(3631e-23 * c_aa / fine**2 * r * fine, fine)
            mag = -2.5 * np.log10(num / den)
            assert abs(mag - frame.catalogue[b][k]) < 1e-3, (k, b, mag, frame.catalogue[b][k])


def test_catalogue_noise_flag():
    noisy = simulate_frame(mag_noise=True, n_program=0, n_sky=1)
    exact = noisy.truth["mags"]
    d = np.column_stack([noisy.catalogue[b] for b in "griz"]) - exact
    assert 0 < np.max(np.abs(d)) < 0.1


def test_counts_throughput_telluric_consistent(clean):
    t = clean.truth
    assert np.array_equal(clean.flux, t["counts_true"])
    thr, tell = t["throughput"], t["telluric"]
    np.testing.assert_allclose(clean.flux[t["std_fibres"]], t["std_true_flux"] * thr * tell, rtol=1e-12)
    np.testing.assert_allclose(clean.flux[t["program_fibres"]], t["program_true_flux"] * thr * tell, rtol=1e-12)
    assert np.all(clean.flux[t["sky_fibres"]] == 0)
    np.testing.assert_allclose(clean.var, t["counts_true"] + 9.0)
    # throughput: smooth bell, peak near 6000 Å, ×3–5 lower at the ends
    w = clean.wave
    assert 5500 < w[np.argmax(thr)] < 6500
    assert 2.5 < thr.max() / thr[0] < 6 and 2.5 < thr.max() / thr[-1] < 6
    # telluric: 1 outside the default bands, dips inside, A and B bands deepest
    inside = np.zeros(w.size, bool)
    for lo, hi, _ in DEFAULT_TELLURIC_BANDS:
        inside |= (w > lo) & (w < hi)
    assert np.all(tell[~inside] == 1.0)
    assert 0.55 < tell.min() < 0.7
    assert tell[(w > 7590) & (w < 7700)].min() < tell[(w > 8100) & (w < 8360)].min()
    notell = simulate_frame(noise=False, telluric=False)
    assert np.all(notell.truth["telluric"] == 1.0)


def test_lsf_constant_fwhm_in_angstrom(clean):
    """Direct numerical convolution of the truth at a few pixels (constant FWHM in Å)."""
    t = clean.truth
    sigma = t["fwhm"] / (2 * math.sqrt(2 * math.log(2)))
    for k in (0, 4):
        for lam0 in (3933.66, 4861.33, 6562.8, 8542.09):
            p = int(np.argmin(np.abs(clean.wave - lam0 * (1 + t["rv"][k] / C_KMS))))
            x0 = clean.wave[p]
            x = np.linspace(x0 - 8 * sigma, x0 + 8 * sigma, 16001)
            f = demo_template(*t["params"][k], wave=x / (1 + t["rv"][k] / C_KMS)) * t["dilution"][k]
            kern = np.exp(-0.5 * ((x - x0) / sigma) ** 2)
            direct = np.trapezoid(f * kern, x) / np.trapezoid(kern, x)
            assert t["std_true_flux"][k, p] == pytest.approx(direct, rel=2e-3)


def test_median_snr(frame):
    t = frame.truth
    rows = t["std_fibres"]
    assert np.median(t["counts_true"][rows] / np.sqrt(frame.var[rows])) == pytest.approx(50.0, rel=1e-6)
    assert np.median(frame.flux[rows] / np.sqrt(frame.var[rows])) == pytest.approx(50.0, rel=0.2)
    z = (frame.flux - t["counts_true"]) / np.sqrt(frame.var)
    assert np.std(z) == pytest.approx(1.0, rel=0.05)
    sky = frame.flux[t["sky_fibres"]]
    assert np.std(sky) == pytest.approx(3.0, rel=0.1)
    low = simulate_frame(snr=10.0, n_program=0, n_sky=0)
    r = low.truth["std_fibres"]
    assert np.median(low.flux[r] / np.sqrt(low.var[r])) == pytest.approx(10.0, rel=0.2)


def test_rv_shift_sign(clean):
    rest = simulate_frame(noise=False, rvs=[0.0] * 5)
    w = clean.wave
    trial = np.arange(-300.0, 301.0, 2.0)
    for k, v_true in enumerate(clean.truth["rv"]):
        obs = clean.truth["std_true_flux"][k]
        ref = rest.truth["std_true_flux"][k]
        obs = obs / np.polyval(np.polyfit(w, obs, 5), w)
        ref = ref / np.polyval(np.polyfit(w, ref, 5), w)
        chi = [np.sum((obs - np.interp(w / (1 + v / C_KMS), w, ref)) ** 2) for v in trial]
        best = trial[int(np.argmin(chi))]
        assert abs(best - v_true) <= 6.0, (k, best, v_true)
    assert clean.truth["rv"][4] > 0  # the +140 km/s star was found at a positive lag above


def test_square_frame():
    fr = simulate_frame(n_standards=3, n_program=4, n_sky=3, n_pix=10, square=True)
    assert fr.flux.shape == (10, 10) and fr.n_fibre == fr.n_pix == 10
    with pytest.raises(ValueError):
        simulate_frame(n_standards=3, n_program=4, n_sky=3, n_pix=11, square=True)


def test_more_standards_and_params():
    fr = simulate_frame(n_standards=7, n_program=1, n_sky=1, n_pix=500, seed=3)
    rv = fr.truth["rv"]
    assert rv.shape == (7,) and np.all(np.abs(rv[5:]) <= 200) and tuple(rv[:5]) == (-85.0, -2.0, 0.7, 23.4, 140.0)
    np.testing.assert_array_equal(fr.truth["params"][5], fr.truth["params"][0])  # cycling
    off = simulate_frame(n_standards=1, n_program=0, n_sky=1, params=[(6100.0, 4.3, -0.2, 0.0)], rvs=[10.0], n_pix=300)
    np.testing.assert_array_equal(off.truth["params"], [[6100.0, 4.3, -0.2, 0.0]])
    with pytest.raises(ValueError):
        simulate_frame(n_standards=2, rvs=[1.0])


def test_write_catalogue_csv(frame, tmp_path):
    import csv

    path = write_catalogue_csv(frame.catalogue, tmp_path / "cat.csv")
    with open(path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["name", "ra", "dec", "g", "dg", "r", "dr", "i", "di", "z", "dz"]
    assert len(rows) == 6 and rows[1][0] == "STD001"
    assert float(rows[1][5]) == pytest.approx(frame.catalogue["r"][0], abs=1e-6)

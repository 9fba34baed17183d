"""The instrument LSF: exact variable-width Gaussian in Å on a log grid, template resolution in quadrature."""

import math

import numpy as np
import pytest
from scipy import integrate

from gpucal.backends import to_numpy
from gpucal.errors import InputError
from gpucal.fitting.lsf import (
    convolve_to_instrument,
    parse_resolution_spec,
    resolution_spec,
    template_fwhm_at,
)

from conftest import assert_close

D = 1.0 / 20000.0


def _sigma_per_fwhm():
    """σ of a Gaussian per unit FWHM, found from the profile's half maximum (not the package's constant)."""
    from scipy.optimize import brentq

    half_width = brentq(lambda x: math.exp(-0.5 * x * x) - 0.5, 0.1, 3.0, xtol=1e-15)
    return 1.0 / (2.0 * half_width)


#: The oracles' own FWHM -> σ factor, so a wrong constant in gpucal cannot cancel out of the tests.
SIGMA_PER_FWHM = _sigma_per_fwhm()


def oracle_fwhm(w, lsf):
    """FWHM (Å) at ``w`` written out from the option's definition, not through gpucal."""
    if "fwhm" in lsf:
        return np.full_like(w, lsf["fwhm"])
    if "resolution" in lsf:
        return w / lsf["resolution"]
    return sum(c * w**k for k, c in enumerate(lsf["fwhm_poly"]))


def log_grid(lo=3700.0, hi=9500.0, d=D):
    return lo * np.exp(d * np.arange(int(math.log(hi / lo) / d) + 1))


def smooth(x):
    """A smooth spectrum: power-law continuum, slow ripple, broad absorption."""
    return (x / 5000.0) ** -2 * (1 + 0.05 * np.sin(2 * np.pi * x / 900.0)) * (1 - 0.3 * np.exp(-0.5 * ((x - 6000.0) / 25.0) ** 2))


def brute_force(f, lam, sigma):
    """∫ f(λ') N(λ'; λ, σ) dλ' by adaptive quadrature (the full Gaussian, untruncated)."""
    g = lambda x: f(np.asarray(x)) * math.exp(-0.5 * ((x - lam) / sigma) ** 2)  # noqa: E731
    val, _ = integrate.quad(g, lam - 12 * sigma, lam + 12 * sigma, epsabs=0, epsrel=1e-13, limit=200)
    return val / (math.sqrt(2 * math.pi) * sigma)


@pytest.mark.parametrize("lsf", [dict(fwhm=2.0), dict(resolution=3000.0), dict(fwhm_poly=[0.8, 2.0e-4, 1.0e-8])])
def test_agrees_with_brute_force_integral(lsf):
    w = log_grid()
    out = convolve_to_instrument(w, smooth(w)[None, :], **lsf)[0]
    sig = oracle_fwhm(w, lsf) * SIGMA_PER_FWHM
    for i in np.linspace(400, w.size - 400, 23).astype(int):
        ref = brute_force(smooth, w[i], sig[i])
        assert abs(out[i] / ref - 1) < 1e-6, (lsf, w[i])


def test_agrees_with_analytic_convolution_everywhere():
    """f = 1 + a sin(kλ) convolves to 1 + a sin(kλ) exp(-k²σ(λ)²/2): every pixel, no steps."""
    w = log_grid()
    k, a = 2 * np.pi / 9.0, 0.3
    poly = [0.5, 1.5e-4, 1.0e-8]  # FWHM 1.2 .. 2.8 Å across the band
    out = convolve_to_instrument(w, 1 + a * np.sin(k * w), fwhm_poly=poly, truncate=6.0)
    sig = oracle_fwhm(w, dict(fwhm_poly=poly)) * SIGMA_PER_FWHM
    ref = 1 + a * np.sin(k * w) * np.exp(-0.5 * (k * sig) ** 2)
    h = int(math.ceil(6 * np.max(sig / w) / D))
    # exact at every pixel, so the kernel width follows σ(λ) with no chunk boundaries or steps
    assert np.max(np.abs(out / ref - 1)[h:-h]) < 1e-6


def _impulse_fwhm(w, out):
    """FWHM (Å) from the second moment of an impulse response (pixel widths ∝ λ)."""
    wt = out * w
    m = np.sum(wt * w) / np.sum(wt)
    return math.sqrt(np.sum(wt * (w - m) ** 2) / np.sum(wt)) / SIGMA_PER_FWHM


def test_constant_angstrom_fwhm_is_constant_in_angstrom():
    w = log_grid(3800.0, 9300.0)
    fluxes = np.zeros((2, w.size))
    i4, i9 = np.searchsorted(w, 4000.0), np.searchsorted(w, 9000.0)
    fluxes[0, i4] = fluxes[1, i9] = 1.0
    out = convolve_to_instrument(w, fluxes, fwhm=2.0, truncate=8.0)
    f4, f9 = _impulse_fwhm(w, out[0]), _impulse_fwhm(w, out[1])
    assert f4 == pytest.approx(2.0, rel=2e-3) and f9 == pytest.approx(2.0, rel=2e-3)
    assert f4 == pytest.approx(f9, rel=2e-3)
    # ... which is twice as many pixels at 4000 Å as at 9000 Å (the width in velocity is not constant)
    out_r = convolve_to_instrument(w, fluxes, resolution=2000.0, truncate=8.0)
    assert _impulse_fwhm(w, out_r[1]) / _impulse_fwhm(w, out_r[0]) == pytest.approx(w[i9] / w[i4], rel=3e-3)


def test_template_resolution_removed_in_quadrature():
    w = log_grid()
    f = 1 + 0.3 * np.sin(2 * np.pi * w / 5.0)
    r_inst, r_tmpl = 5000.0, 10000.0
    r_eff = 1.0 / math.sqrt(1 / r_inst**2 - 1 / r_tmpl**2)
    ref = convolve_to_instrument(w, f, resolution=r_eff)
    for spec in ("R:10000", f"R:{r_tmpl!r}", {"resolution": r_tmpl}, lambda x: x / r_tmpl):
        np.testing.assert_allclose(convolve_to_instrument(w, f, resolution=r_inst, template_fwhm=spec), ref, rtol=1e-12)
    # a constant-Å template FWHM: σ_eff² = σ_inst² − σ_tmpl²
    ref_a = convolve_to_instrument(w, f, fwhm=math.sqrt(2.0**2 - 0.6**2))
    np.testing.assert_allclose(convolve_to_instrument(w, f, fwhm=2.0, template_fwhm=0.6), ref_a, rtol=1e-12)
    np.testing.assert_allclose(convolve_to_instrument(w, f, fwhm=2.0, template_fwhm="0.6"), ref_a, rtol=1e-12)


@pytest.mark.parametrize("lsf", [dict(fwhm=2.0), dict(resolution=4000.0), dict(fwhm_poly=[0.5, 2e-4])])
def test_grid_already_at_instrument_resolution_is_left_alone(lsf):
    w = log_grid()
    f = np.stack([smooth(w), 1 + 0.5 * np.sin(w)])
    out = convolve_to_instrument(w, f, template_fwhm=resolution_spec(**lsf), **lsf)
    assert np.array_equal(out, f)


def test_zero_template_fwhm_float_still_works():
    w = log_grid()
    f = smooth(w)
    np.testing.assert_array_equal(convolve_to_instrument(w, f, fwhm=2.0, template_fwhm=0.0),
                                  convolve_to_instrument(w, f, fwhm=2.0))


def test_resolution_spec_round_trip():
    assert resolution_spec(fwhm=2.5) == 2.5
    assert resolution_spec(resolution=10000) == "R:10000.0"
    s = resolution_spec(fwhm_poly=[0.1, 1.0 / 3.0])
    assert parse_resolution_spec(s)["fwhm_poly"] == [0.1, 1.0 / 3.0]
    assert parse_resolution_spec(0.0)["fwhm"] == 0.0
    assert parse_resolution_spec(" r : 5000 ")["resolution"] == 5000.0
    w = np.array([4000.0, 8000.0])
    np.testing.assert_allclose(template_fwhm_at(w, "R:4000"), [1.0, 2.0])
    np.testing.assert_allclose(template_fwhm_at(w, "poly:1,1e-4"), [1.4, 1.8])
    for bad in (-1.0, "R:-3", "R:abc", "poly:", "fast", {"fwhm": 1, "resolution": 2}, True, None):
        with pytest.raises(InputError):
            parse_resolution_spec(bad)


def test_errors():
    w = log_grid()
    f = smooth(w)
    with pytest.raises(InputError, match="below the template grid's own resolution"):
        convolve_to_instrument(w, f, fwhm=0.5, template_fwhm="R:5000")
    with pytest.raises(InputError, match="log-uniform"):
        convolve_to_instrument(np.linspace(4000, 9000, 500), np.ones(500), fwhm=2.0)
    with pytest.raises(InputError, match="exactly one"):
        convolve_to_instrument(w, f, fwhm=2.0, resolution=3000.0)
    with pytest.raises(InputError, match="does not match"):
        convolve_to_instrument(w, f[:-1], fwhm=2.0)


def test_batched_equals_one_by_one():
    w = log_grid(4000.0, 5000.0)
    f = np.stack([smooth(w), 1 + 0.2 * np.cos(w / 3.0), np.ones_like(w)])
    out = convolve_to_instrument(w, f, fwhm_poly=[1.0, 1e-4], template_fwhm="R:20000")
    for k in range(3):
        np.testing.assert_allclose(out[k], convolve_to_instrument(w, f[k], fwhm_poly=[1.0, 1e-4],
                                                                  template_fwhm="R:20000"), rtol=1e-14)
    np.testing.assert_allclose(out[2], 1.0, rtol=1e-13)  # normalised everywhere, edges included


@pytest.mark.parametrize("dtype_name", ["float64", "float32"])
def test_backends_agree(backend, dtype_name):
    xp = backend.xp
    w = log_grid(4000.0, 4600.0)
    f = np.stack([smooth(w), 1 + 0.2 * np.sin(w / 2.0)])
    ref = convolve_to_instrument(w, f, fwhm_poly=[0.5, 2e-4], template_fwhm="R:40000")
    out = convolve_to_instrument(backend.asarray(w), backend.asarray(f, dtype=getattr(xp, dtype_name)),
                                 fwhm_poly=[0.5, 2e-4], template_fwhm="R:40000")
    assert out.dtype == getattr(xp, dtype_name)
    assert_close(out, ref, rtol=1e-12 if dtype_name == "float64" else 2e-6, backend=backend)
    assert to_numpy(out).shape == f.shape


def test_sigma_per_fwhm_oracle_and_the_package_constant():
    """The oracle's factor is the Gaussian's; gpucal's FWHM_TO_SIGMA equals it (a 5 % error fails here and above)."""
    from gpucal.units import FWHM_TO_SIGMA, fwhm_to_sigma

    assert math.exp(-0.5 * (0.5 / SIGMA_PER_FWHM) ** 2) == pytest.approx(0.5, abs=1e-14)
    assert FWHM_TO_SIGMA == pytest.approx(SIGMA_PER_FWHM, rel=1e-12)
    assert fwhm_to_sigma(2.0) == pytest.approx(2.0 * SIGMA_PER_FWHM, rel=1e-12)


def test_convolved_gaussian_line_has_the_quadrature_width():
    """A Gaussian absorption line of FWHM f0 convolved with an LSF of FWHM f1 is a Gaussian of FWHM √(f0²+f1²)."""
    w = log_grid(5000.0, 5400.0)
    f0, f1, lam0, depth = 1.2, 2.5, 5200.0, 0.4
    s0 = f0 * SIGMA_PER_FWHM
    line = 1.0 - depth * np.exp(-0.5 * ((w - lam0) / s0) ** 2)
    out = convolve_to_instrument(w, line[None, :], fwhm=f1, truncate=8.0)[0]
    s = math.hypot(f0, f1) * SIGMA_PER_FWHM
    ref = 1.0 - depth * (s0 / s) * np.exp(-0.5 * ((w - lam0) / s) ** 2)
    core = np.abs(w - lam0) < 15.0
    assert np.max(np.abs(out - ref)[core]) < 2e-4


def test_host_blocks_change_no_bit(backend, monkeypatch):
    """The convolution runs in cache-sized pixel blocks on the host (issue 17): each pixel sums
    the same terms in the same order as one pass over the whole row, so every bit agrees, for
    a shared and for a per-row LSF, in float64 and float32."""
    import gpucal.fitting.lsf as lsf_mod
    from gpucal.backends import cache_columns

    rng = np.random.default_rng(12)
    wave = 4000.0 * np.exp(2e-4 * np.arange(3001))
    flux = 1.0 + 0.1 * rng.normal(size=(64, 3001))
    fw = 2.0 + 0.5 * rng.random((64, 3001))
    xw, xf, xfw = (backend.asarray(a) for a in (wave, flux, fw))
    span = cache_columns(xf, 64)
    assert span is None or span < 3001  # the test exercises several blocks where there are blocks
    runs = {}
    for blocked in (True, False):
        if not blocked:
            monkeypatch.setattr(lsf_mod, "cache_columns", lambda x, rows: None)
        runs[blocked] = [to_numpy(a) for a in (
            lsf_mod.convolve_to_instrument(xw, xf, fwhm=2.5),
            lsf_mod.convolve_to_instrument(xw, backend.xp.astype(xf, backend.xp.float32), fwhm=2.5),
            lsf_mod.convolve_fwhm(xw, xf, xfw))]
    for a, b in zip(runs[True], runs[False]):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

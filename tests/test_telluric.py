"""Issue 16: telluric absorption corrected from the simultaneous standards.

Kernels (calibration/telluric.py, the ``keep_bands`` vectors, the batched
``fill_masked``) on every namespace against NumPy oracles; the pipeline on
simulated frames with resolved O2/H2O lines (gpucal.simulate_tellurics).
"""

import functools

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import to_numpy
from gpucal.calibration import calibration_vectors, combine_calibration_vectors, fill_masked
from gpucal.calibration.telluric import TELLURIC_MIN_STARS, TELLURIC_SATURATION
from gpucal.containers import CalibrationVectors
from gpucal.errors import InputError

N_STAR, N_PIX = 5, 400
BAND = slice(150, 250)
SATURATED = slice(200, 205)  # T = 0.03 there
UNCOVERED = slice(230, 240)  # only 2 stars measure these pixels


def _telluric_stack():
    """Noiseless vectors: throughput C, per-star levels a_i, a line-structured T in one band."""
    rng = np.random.default_rng(3)
    x = np.linspace(0.0, 1.0, N_PIX)
    c = 2.0 + np.sin(3.0 * x)  # the true Cal outside the band (erg/s/cm²/Å per count)
    a = rng.uniform(0.95, 1.05, N_STAR)[:, None]
    band = np.zeros(N_PIX, bool)
    band[BAND] = True
    t = np.ones(N_PIX)
    t[BAND] = 1.0 - 0.6 * rng.uniform(0, 1, 100) ** 3  # narrow, unresolved-looking lines
    t[SATURATED] = 0.03
    cal = np.where(band, np.nan, a * c)
    var = (0.01 * cal) ** 2
    mask = ~band[None, :] & np.ones((N_STAR, 1), bool)
    resp = np.where(band, t / (a * c), np.nan)
    resp[2:, UNCOVERED] = np.nan
    resp_var = (0.01 * resp) ** 2
    k = np.sum(a**-2.0) / np.sum(a**-1.0)  # the inverse-variance mean of a_i C is C / k
    return dict(c=c, a=a, t=t, band=band, cal=cal, var=var, mask=mask, resp=resp, resp_var=resp_var, k=k)


def _vectors(backend, s, keep=True):
    wave = backend.asarray(np.linspace(6000.0, 8000.0, N_PIX))
    vec = CalibrationVectors(wave=wave, cal=backend.asarray(s["cal"]), var=backend.asarray(s["var"]),
                             mask=backend.asarray(s["mask"]))
    if keep:
        vec.resp, vec.resp_var = backend.asarray(s["resp"]), backend.asarray(s["resp_var"])
        vec.band = backend.asarray(s["band"])
    return vec


def test_telluric_part_recovers_the_transmission_and_flags(backend):
    """Corrected pixels carry C/(k T) exactly; saturated and uncovered ones keep the masked mode's bridge."""
    s = _telluric_stack()
    masked = combine_calibration_vectors(_vectors(backend, s, keep=False))
    res = combine_calibration_vectors(_vectors(backend, s))
    summ = {k: to_numpy(v) for k, v in res.summary.items() if k.startswith("telluric_")}
    assert res.summary["telluric"] == "correct" and masked.summary["telluric"] == "mask"
    sat = np.zeros(N_PIX, bool)
    sat[SATURATED] = True
    unc = np.zeros(N_PIX, bool)
    unc[UNCOVERED] = True
    np.testing.assert_array_equal(summ["telluric_saturated"], sat)
    np.testing.assert_array_equal(summ["telluric_uncovered"], unc)
    corrected = s["band"] & ~sat & ~unc
    np.testing.assert_array_equal(summ["telluric_corrected"], corrected)
    np.testing.assert_array_equal(summ["telluric_n_stars"][unc], 2)
    np.testing.assert_array_equal(summ["telluric_n_stars"][corrected], N_STAR)
    cal, cal_m = to_numpy(res.cal), to_numpy(masked.cal)
    expect = s["c"] / (s["k"] * s["t"])
    assert_close(res.cal, np.where(corrected, expect, cal), rtol=1e-9, backend=backend)
    # flagged pixels are not amplified: the masked mode's bridged value, bit for bit; outside untouched
    np.testing.assert_array_equal(cal[~corrected], cal_m[~corrected])
    np.testing.assert_array_equal(to_numpy(res.var)[~corrected], to_numpy(masked.var)[~corrected])
    # T relative to the bridge, at full resolution (no smoothing across the lines)
    ratio = summ["telluric_transmission"][corrected] / (s["t"][corrected] * s["k"] * cal_m[corrected] / s["c"][corrected])
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-9)
    np.testing.assert_array_equal(to_numpy(res.measured), to_numpy(masked.measured))


def test_telluric_variance_is_propagated(backend):
    """σ²(Cal) = Cal² (σ²_S/S² + σ²_T/T²), σ²_T = 1/Σ 1/σ²_ti: against a per-pixel loop."""
    s = _telluric_stack()
    masked = combine_calibration_vectors(_vectors(backend, s, keep=False))
    res = combine_calibration_vectors(_vectors(backend, s))
    sm, sv = to_numpy(masked.cal), to_numpy(masked.var)
    corrected = to_numpy(res.summary["telluric_corrected"])
    level = s["a"][:, 0] * s["k"]  # each star's a_i C / S, constant: bridged exactly
    expect = np.full(N_PIX, np.nan)
    for p in np.flatnonzero(corrected):
        ok = np.isfinite(s["resp"][:, p])
        t_i = level[ok] * sm[p] * s["resp"][ok, p]
        tv_i = (level[ok] * sm[p]) ** 2 * s["resp_var"][ok, p]
        t_var = 1.0 / np.sum(1.0 / tv_i)
        t_mean = np.sum(t_i / tv_i) * t_var
        c = sm[p] / t_mean
        expect[p] = c * c * (sv[p] / sm[p] ** 2 + t_var / t_mean**2)
    var = to_numpy(res.var)
    assert_close(res.var, np.where(corrected, expect, var), rtol=1e-8, backend=backend)
    t = to_numpy(res.summary["telluric_transmission"])
    np.testing.assert_allclose(to_numpy(res.summary["telluric_transmission_var"])[corrected],
                               (0.01 * t[corrected]) ** 2 / N_STAR, rtol=1e-8)


def test_median_telluric_part_and_one_wild_star(backend):
    """A star with a 30 % line residual at 3 pixels: the median's T is untouched, the mean's is not."""
    s = _telluric_stack()
    s["resp"][0, 160:163] *= 1.3
    med = combine_calibration_vectors(_vectors(backend, s), method="median")
    masked = combine_calibration_vectors(_vectors(backend, s, keep=False), method="median")
    mean = combine_calibration_vectors(_vectors(backend, s))
    a_med = np.median(s["a"][:, 0])  # S = a_med C: the median star's level
    px = slice(160, 163)
    expect = s["t"][px] * to_numpy(masked.cal)[px] / (a_med * s["c"][px])
    np.testing.assert_allclose(to_numpy(med.summary["telluric_transmission"])[px], expect, rtol=1e-9)
    assert np.all(to_numpy(mean.cal)[px] * s["k"] * s["t"][px] / s["c"][px] < 0.97)


def test_too_few_stars_flag_every_band_pixel(backend):
    """Fewer usable stars than TELLURIC_MIN_STARS: the band is uncovered, the vector the masked mode's."""
    s = _telluric_stack()
    usable = backend.asarray(np.arange(N_STAR) < TELLURIC_MIN_STARS - 1)
    res = combine_calibration_vectors(_vectors(backend, s), usable=usable)
    masked = combine_calibration_vectors(_vectors(backend, s, keep=False), usable=usable)
    np.testing.assert_array_equal(to_numpy(res.summary["telluric_uncovered"]), s["band"])
    assert not to_numpy(res.summary["telluric_corrected"]).any()
    np.testing.assert_array_equal(to_numpy(res.cal), to_numpy(masked.cal))


def test_vectors_keep_the_bands(backend):
    """keep_bands: resp = observed / model inside the bands (also at counts ≤ 0), NaN outside; mask unchanged."""
    rng = np.random.default_rng(0)
    wave = np.linspace(7000.0, 8000.0, 300)
    wt = np.geomspace(6800.0, 8200.0, 900)
    tmpl = 1.0 + 0.1 * rng.uniform(size=(3, 900))
    flux = rng.uniform(50, 100, (3, 300))
    flux[1, 185] = -2.0  # a noisy pixel in a deep line
    var = flux.clip(1, None) + 9.0
    args = [backend.asarray(a) for a in (wave, flux, var, np.ones((3, 300), bool), wt, tmpl,
                                         np.array([-50.0, 0.0, 80.0]), np.array([2.0, 1.0, 0.5]),
                                         np.array([0.02, 0.01, 0.005]))]
    regions = ((7590.0, 7700.0),)
    kept = calibration_vectors(*args, fwhm=2.0, mask_regions=regions, keep_bands=True)
    plain = calibration_vectors(*args, fwhm=2.0, mask_regions=regions)
    every = calibration_vectors(*args, fwhm=2.0, mask_regions=())  # no band: Cal everywhere
    band = (wave >= 7590.0) & (wave <= 7700.0)
    np.testing.assert_array_equal(to_numpy(kept.mask), to_numpy(plain.mask))
    np.testing.assert_array_equal(to_numpy(kept.band), band)
    resp = to_numpy(kept.resp)
    assert np.all(np.isnan(resp[:, ~band]))
    inside = band[None, :] & (flux > 0)
    np.testing.assert_allclose(resp[inside], 1.0 / to_numpy(every.cal)[inside], rtol=1e-12)
    model = flux[1, 185] / resp[1, 185]
    assert resp[1, 185] < 0 and np.isfinite(model) and model > 0
    np.testing.assert_allclose(to_numpy(kept.resp_var)[inside],
                               (to_numpy(every.var) / to_numpy(every.cal) ** 4)[inside], rtol=1e-10)


def test_fill_masked_bridges_each_row_alike(backend):
    """(n_star, n_pix) rows bridged at once equal the 1-D bridge of each row."""
    rng = np.random.default_rng(4)
    y = 1.0 + 0.1 * rng.normal(size=(3, 120)).cumsum(axis=1) / 10
    good = rng.uniform(size=y.shape) > 0.1
    good[:, 40:70] = False
    good[2, :] = False  # a row with nothing good
    var = rng.uniform(0.1, 0.2, y.shape)
    f2, v2 = fill_masked(backend.asarray(y), backend.asarray(var), backend.asarray(good), window=21)
    for r in range(3):
        f1, v1 = fill_masked(backend.asarray(y[r]), backend.asarray(var[r]), backend.asarray(good[r]), window=21)
        np.testing.assert_allclose(to_numpy(f2)[r], to_numpy(f1), rtol=1e-12)
        np.testing.assert_allclose(to_numpy(v2)[r], to_numpy(v1), rtol=1e-12)


def test_saturation_threshold_constant():
    assert TELLURIC_SATURATION == 0.1 and TELLURIC_MIN_STARS == 3

"""The combination's per-star model-error floor (method="floored_mean", issue 14): a star with a tilted
vector and a tiny variance cannot drag the combined vector, and the floored weights match a brute-force
oracle (per-pixel loops, numpy.polyfit for the running linear fit)."""

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import to_numpy
from gpucal.calibration import combine_calibration_vectors
from gpucal.calibration.combine import model_floor
from gpucal.containers import CalibrationVectors
from gpucal.errors import InputError

N_PIX = 300


def _frame(seed=0, tilt=0.1, noise=0.005, tiny=1e-4):
    """Five stars measuring a smooth vector; the last is tilted by ± ``tilt`` with a variance ``tiny``² of it."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, N_PIX)
    truth = 1e-3 * (1.5 + 0.5 * np.sin(2.0 * x)) * np.exp(-x * x)
    cal = truth * (1.0 + noise * rng.standard_normal((5, N_PIX)))
    var = np.tile((noise * truth) ** 2, (5, 1))
    cal[4] = truth * (1.0 + tilt * x)
    var[4] = (tiny * truth) ** 2
    mask = np.ones(cal.shape, bool)
    mask[1, 100:120] = False  # a gap in one star
    return x, truth, cal, var, mask


def _vectors(backend, cal, var, mask):
    return CalibrationVectors(wave=backend.asarray(np.linspace(4000.0, 8000.0, cal.shape[1])),
                              cal=backend.asarray(cal), var=backend.asarray(var), mask=backend.asarray(mask))


def _slope(x, rel):
    return np.polyfit(x, rel, 1)[0]


def test_a_tilted_star_with_a_tiny_variance_cannot_drag_the_combination(backend):
    x, truth, cal, var, mask = _frame()
    vec = _vectors(backend, cal, var, mask)
    plain = combine_calibration_vectors(vec, method="weighted_mean")
    floored = combine_calibration_vectors(vec, method="floored_mean")
    rel_plain = to_numpy(plain.cal) / truth - 1.0
    rel = to_numpy(floored.cal) / truth - 1.0
    # without the floor the tilted star holds nearly all the weight and the vector follows its ±10 % tilt
    assert _slope(x, rel_plain) > 0.09 and to_numpy(plain.summary["weight_share"])[4] > 0.9
    # with it: the tilt left in the combination is below 0.3 % of the star's 10 %, its weight share < 2 %
    assert abs(_slope(x, rel)) < 3e-4
    assert np.sqrt(np.mean(rel**2)) < 0.004  # four stars' 0.5 % photon noise: 0.25 %
    share = to_numpy(floored.summary["weight_share"])
    assert share[4] < 0.02 and np.all(np.abs(share[:4] - 0.25) < 0.03)
    f = to_numpy(floored.summary["floor"])
    assert abs(f[4] - 0.1 / np.sqrt(3.0)) < 0.006 and np.all(f[:4] < 0.002)  # a tilt a: RMS a/√3
    assert np.all(to_numpy(floored.summary["floor"]) >= 0)


def _floor_oracle(cal, var, mask, ref, window):
    """f per star: the precision-weighted mean square of the running linear fit (numpy.polyfit) to
    cal / ref − 1 (scipy's savgol mode="interp" at the ends), less its photon part v / window."""
    h = window // 2
    out = np.zeros(cal.shape[0])
    for i in range(cal.shape[0]):
        r = cal[i] / ref - 1.0
        num = den = 0.0
        for p in range(cal.shape[1]):
            if not mask[i, p]:
                continue
            lo = min(max(p - h, 0), cal.shape[1] - window)  # the ends: the first/last full window, off centre
            j = np.arange(lo, lo + window)
            j = j[mask[i, j]]
            s = np.polyval(np.polyfit(j - p, r[j], 1), 0.0)
            v = var[i, p] / ref[p] ** 2
            num += (s * s - v / window) / v
            den += 1.0 / v
        out[i] = np.sqrt(max(num / den, 0.0))
    return out


def test_floored_weights_match_a_brute_force_oracle(backend):
    x, truth, cal, var, mask = _frame(seed=4, tilt=0.06, tiny=1e-3)
    window, n_iter = 31, 2
    res = combine_calibration_vectors(_vectors(backend, cal, var, mask), method="floored_mean", nsigma=1e6,
                                      floor_window=window, floor_iter=n_iter)
    ref = np.array([np.median(cal[mask[:, p], p]) for p in range(N_PIX)])  # the oracle, pixel by pixel
    for _ in range(n_iter):
        f = _floor_oracle(cal, var, mask, ref, window)
        fvar = var + (f[:, None] * ref[None, :]) ** 2
        w = np.where(mask, 1.0 / fvar, 0.0)
        ref = np.sum(w * cal, axis=0) / np.sum(w, axis=0)
    assert_close(res.summary["floor"], f, rtol=1e-6, backend=backend)
    assert_close(res.cal, ref, rtol=1e-9, backend=backend)
    assert_close(res.var, 1.0 / np.sum(w, axis=0), rtol=1e-9, backend=backend)
    share = np.median(w[4] / np.sum(w, axis=0))
    assert_close(res.summary["weight_share"][4:], [share], rtol=1e-9, backend=backend)


def test_model_floor_of_a_noiseless_star_equal_to_the_reference_is_zero(xp):
    x = np.linspace(-1.0, 1.0, 50)
    cal = np.tile(np.linspace(1.0, 2.0, 50), (2, 1))
    cal[1] *= 1.0 + 0.02 * x
    ivar = np.full(cal.shape, 1e12)  # no photon part left to subtract
    f = model_floor(xp.asarray(cal), xp.asarray(ivar), xp.asarray(np.ones(cal.shape, bool)), xp.asarray(cal[0]),
                    window=11)
    u = cal[0] ** 2
    expect = 0.02 * np.sqrt(np.sum(u * x**2) / np.sum(u))
    np.testing.assert_allclose(to_numpy(f), [0.0, expect], rtol=1e-6, atol=1e-6)


def test_unknown_method_is_refused(backend):
    x, truth, cal, var, mask = _frame()
    with pytest.raises(InputError, match="floored_mean"):
        combine_calibration_vectors(_vectors(backend, cal, var, mask), method="trimmed")

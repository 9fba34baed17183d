"""Single-pixel outliers and weight caps against a brute-force loop; what they do to matching and combining."""

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import get_backend, to_numpy
from gpucal.containers import CalibrationVectors
from gpucal.calibration import combine_calibration_vectors
from gpucal.errors import InputError
from gpucal.fitting.masks import cap_local_weights, local_outliers


def _neighbour_order_loop(x, mask):
    """Sorted four nearest neighbours (±1, ±2) of every pixel; a masked or missing one counts as the pixel."""
    out = np.empty(x.shape + (4,))
    n = x.shape[1]
    for s in range(x.shape[0]):
        for i in range(n):
            vals = [x[s, i + k] if 0 <= i + k < n and mask[s, i + k] else x[s, i] for k in (-2, -1, 1, 2)]
            out[s, i] = np.sort(vals)
    return out


@pytest.fixture
def noisy():
    rng = np.random.default_rng(7)
    n_spec, n_pix = 3, 200
    lines = 1 - 0.6 * np.exp(-0.5 * ((np.arange(n_pix) - 80) / 1.5) ** 2)  # a resolved line, 3 px sigma-wide
    ivar = np.full((n_spec, n_pix), 1e4) * rng.uniform(0.5, 2.0, (n_spec, n_pix))
    x = lines[None, :] + rng.standard_normal((n_spec, n_pix)) / np.sqrt(ivar)
    mask = rng.random((n_spec, n_pix)) > 0.05
    x[0, 40] = 3.0  # a hot pixel
    x[1, 120] = 0.2  # a dead pixel
    x[2, 60] = 3.0
    mask[2, 60] = False  # already masked: not flagged again
    ivar[1, 150] = 1e9  # a wrongly tiny variance
    return x, ivar, mask


@pytest.mark.parametrize("side", ["both", "high"])
def test_local_outliers_match_a_loop(backend, noisy, side):
    x, ivar, mask = noisy
    got = local_outliers(backend.asarray(x), backend.asarray(ivar), backend.asarray(mask), nsigma=8.0,
                         floor=0.1, side=side)
    srt = _neighbour_order_loop(x, mask)
    s2, s3 = srt[..., 1], srt[..., 2]
    sig = 1 / np.sqrt(ivar)
    want = (x - s3 > 8.0 * sig) & (x - s3 > 0.1 * np.abs(s3))
    if side == "both":
        want |= (s2 - x > 8.0 * sig) & (s2 - x > 0.1 * np.abs(s2))
    want &= mask
    np.testing.assert_array_equal(to_numpy(got), want)
    # As used: observed spectra side="high" with a 20 % floor; the line's core stays, the hot pixel goes.
    used = to_numpy(local_outliers(backend.asarray(x), backend.asarray(ivar), backend.asarray(mask), nsigma=8.0,
                                   floor=0.2, side=side))
    flagged = set(zip(*np.nonzero(used)))
    assert (0, 40) in flagged and (2, 60) not in flagged
    assert ((1, 120) in flagged) == (side == "both")
    assert side == "both" or not any(abs(i - 80) <= 3 for _, i in flagged)


def test_cap_local_weights_matches_a_loop(backend, noisy):
    x, ivar, mask = noisy
    got = cap_local_weights(backend.asarray(ivar), backend.asarray(mask), factor=10.0)
    ref = np.median(_neighbour_order_loop(ivar, mask), axis=-1)
    want = np.where(mask, np.where(ref > 0, np.minimum(ivar, 10 * ref), ivar), 0.0)
    assert_close(got, want, rtol=1e-12, backend=backend)
    assert to_numpy(got)[1, 150] < 1e6


def test_local_outliers_side_must_be_known():
    xp = get_backend("numpy").xp
    with pytest.raises(InputError, match="side"):
        local_outliers(xp.ones((1, 5)), xp.ones((1, 5)), xp.ones((1, 5), dtype=bool), side="low")


@pytest.mark.parametrize("what", ["spike", "tiny-variance"])
def test_one_bad_pixel_in_one_of_three_stars_does_not_move_the_combination(backend, what):
    """1-of-3 clipping across stars cannot reject it; the star's own mask and weight cap do."""
    rng = np.random.default_rng(3)
    n_star, n_pix = 3, 300
    wave = np.linspace(5000.0, 6000.0, n_pix)
    truth = 1e-17 * (1 + 0.3 * np.sin(wave / 300.0))
    var = (0.01 * truth) ** 2 * np.ones((n_star, 1))
    cal = truth[None, :] * (1 + 0.01 * rng.standard_normal((n_star, n_pix)))
    if what == "spike":
        cal[0, 150] = 0.01 * truth[150]
    else:
        var[0, 150] = 1e-8 * var[0, 150]
        cal[0, 150] = 1.02 * truth[150]  # a 2-sigma fluctuation that claims a 1e-4 % error
    mask = np.ones((n_star, n_pix), bool)
    vec = CalibrationVectors(wave=backend.asarray(wave), cal=backend.asarray(cal), var=backend.asarray(var),
                             mask=backend.asarray(mask))
    res = combine_calibration_vectors(vec)
    comb = to_numpy(res.cal)
    assert abs(comb[150] / truth[150] - 1) < 0.03
    # The combined variance does not inherit the one pixel's claimed precision (capped at 10x its neighbours').
    assert to_numpy(res.var)[150] > var[1, 150] / 20
    n_out = to_numpy(res.summary["n_outlier_pixels"])
    assert n_out[0] == (1 if what == "spike" else 0) and n_out[1:].sum() == 0


def test_matcher_drops_hot_pixels_but_not_windows_between_deep_lines():
    """Metal-rich cool stars at S/N 1000 (two-pixel windows between undersampled lines): nothing dropped."""
    from gpucal.fitting import normalise_observed
    from gpucal.fitting.masks import TELLURIC_DEFAULT, region_mask
    from gpucal.simulate import simulate_frame
    from gpucal.benchmark import standards

    sim = simulate_frame(n_standards=3, n_program=1, n_sky=1, snr=1000.0, seed=2,
                         params=[(5000.0, 3.5, 1.0, 0.0), (5000.0, 5.0, 0.5, 0.25), (5250.0, 4.0, 1.0, 0.0)])
    be = get_backend("numpy")
    spec = standards(sim, be)
    inside = to_numpy(spec.mask) & to_numpy(region_mask(spec.wave, TELLURIC_DEFAULT))[None, :]
    _, _, good = normalise_observed(spec)
    assert not np.any(inside & ~to_numpy(good))
    rows = np.asarray(sim.truth["std_fibres"])
    sim.flux[rows[1], [700, 1500]] *= 3.0  # a cosmic ray and a hot pixel
    _, _, good = normalise_observed(standards(sim, be))
    np.testing.assert_array_equal(np.argwhere(inside & ~to_numpy(good)), [[1, 700], [1, 1500]])


def test_telluric_bands_defined_once():
    """The mask's default regions are the edges of the one telluric table (gpucal.fitting.tellurics)."""
    from gpucal.fitting import masks, tellurics

    assert masks.TELLURIC_DEFAULT is tellurics.TELLURIC_DEFAULT
    assert tellurics.TELLURIC_DEFAULT == tuple((lo, hi) for lo, hi, _ in tellurics.TELLURIC_BANDS)
    assert all(lo < hi and 0 < depth < 1 for lo, hi, depth in tellurics.TELLURIC_BANDS)


def test_running_mean_against_a_loop(backend):
    """masks.running_mean: the mean of the good pixels within window // 2, by brute force; y where none;
    values spanning six decades keep their precision (no cumulative-sum differences)."""
    from gpucal.fitting.masks import running_mean

    rng = np.random.default_rng(5)
    y = rng.random((3, 60)) * 10.0 ** rng.uniform(-3, 3, (3, 60))
    good = rng.random((3, 60)) > 0.3
    good[1, 20:35] = False  # a gap wider than the window
    mean, cnt = running_mean(backend.asarray(y), backend.asarray(good), 7)
    want = np.array([[np.mean(y[s, max(0, i - 3):i + 4][good[s, max(0, i - 3):i + 4]])
                      if good[s, max(0, i - 3):i + 4].any() else y[s, i] for i in range(60)] for s in range(3)])
    np.testing.assert_allclose(to_numpy(mean), want, rtol=1e-13)
    np.testing.assert_array_equal(to_numpy(cnt), [[good[s, max(0, i - 3):i + 4].sum() for i in range(60)]
                                                 for s in range(3)])

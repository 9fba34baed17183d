"""The operations of gpucal.backends._ops on every namespace, against independent NumPy/SciPy oracles.

Inputs are made with NumPy and moved with ``backend.asarray``; every result
is compared with ``assert_close``, which also checks its namespace and device.
The oracles are deliberately naive (per-row / per-pixel Python loops) so they
share no code with the vectorised implementations.
"""

import numpy as np
import pytest
import scipy.signal

from conftest import assert_close
from gpucal.backends import (
    batched_lstsq,
    interp,
    masked_median,
    savgol_filter,
    sigma_clip,
    to_numpy,
)
from gpucal.errors import InputError


@pytest.fixture(params=["float64", "float32"])
def dtype(request):
    """Floating dtype name under test."""
    return request.param


def put(backend, arr, dtype=None):
    """Host array -> backend array (of ``dtype`` when given)."""
    arr = np.asarray(arr)
    if dtype is not None:
        arr = arr.astype(dtype)
    return backend.asarray(arr)


def dtype_of(actual):
    return to_numpy(actual).dtype


RTOL = {"float64": 1e-10, "float32": 1e-5}


# --------------------------------------------------------------------------- interp


def test_interp_1d_matches_numpy(backend, dtype):
    rng = np.random.default_rng(1)
    grid = np.sort(rng.uniform(0, 10, 40))
    fp = rng.normal(size=40).astype(dtype)
    x = rng.uniform(-2, 12, (3, 25)).astype(dtype)
    gridc = grid.astype(dtype)
    for left, right in ((None, None), (-7.0, 9.0)):
        out = interp(put(backend, x), put(backend, gridc), put(backend, fp), left=left, right=right)
        ref = np.interp(x.astype(float), gridc.astype(float), fp.astype(float), left=left, right=right)
        assert dtype_of(out) == np.dtype(dtype)
        assert_close(out, ref, rtol=RTOL[dtype], atol=10 * RTOL[dtype], backend=backend)


def test_interp_broadcasts_leading_axes(backend, dtype):
    rng = np.random.default_rng(2)
    V, S, m, n = 4, 3, 30, 20
    grid = np.linspace(1.0, 2.0, n).astype(dtype)
    fp = rng.normal(size=(1, S, n)).astype(dtype)
    x = rng.uniform(0.9, 2.1, (V, 1, m)).astype(dtype)
    out = interp(put(backend, x), put(backend, grid), put(backend, fp))
    ref = np.empty((V, S, m))
    for v in range(V):
        for s in range(S):
            ref[v, s] = np.interp(x[v, 0].astype(float), grid.astype(float), fp[0, s].astype(float))
    assert out.shape == (V, S, m)
    assert dtype_of(out) == np.dtype(dtype)
    assert_close(out, ref, rtol=RTOL[dtype], atol=10 * RTOL[dtype], backend=backend)


def test_interp_shared_x_per_row_fp_exact_nodes(backend):
    grid = np.arange(5.0)
    fp = np.arange(10.0).reshape(2, 5) ** 2
    out = interp(put(backend, grid), put(backend, grid), put(backend, fp), left=0.0, right=0.0)
    assert_close(out, fp, rtol=0, backend=backend)


def test_interp_rejects_bad_shapes(backend):
    with pytest.raises(InputError):
        interp(put(backend, np.zeros(3)), put(backend, np.zeros(4)), put(backend, np.zeros(5)))


# --------------------------------------------------------------------------- masked_median


def _median_oracle(x, mask, axis):
    x, mask = np.moveaxis(x, axis, -1), np.moveaxis(mask, axis, -1)
    out = np.full(x.shape[:-1], np.nan)
    for idx in np.ndindex(*x.shape[:-1]):
        vals = x[idx][mask[idx]]
        if vals.size:
            out[idx] = np.median(vals.astype(float))
    return out


@pytest.mark.parametrize("axis", [-1, 0])
def test_masked_median_large_stack(backend, dtype, axis):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4000)).astype(dtype)
    mask = rng.random((64, 4000)) > 0.4
    if axis == 0:
        mask[:, 17] = False  # an all-masked column
        mask[:, 18] = False
        mask[5, 18] = True  # a single good value
    else:
        mask[9] = False
    out = masked_median(put(backend, x), put(backend, mask), axis=axis)
    ref = _median_oracle(x, mask, axis)
    assert out.shape == ref.shape
    assert dtype_of(out) == np.dtype(dtype)
    assert np.isnan(ref).any()
    assert_close(out, ref, rtol=RTOL[dtype], backend=backend)


def test_masked_median_nan_is_masked_and_even_counts(backend):
    x = np.array([[1.0, np.nan, 3.0, 10.0], [4.0, 2.0, np.inf, -1.0]])
    mask = np.array([[True, True, True, True], [True, True, False, False]])
    out = masked_median(put(backend, x), put(backend, mask))
    assert_close(out, [3.0, 3.0], backend=backend)


# --------------------------------------------------------------------------- savgol_filter


def _savgol_oracle(y, mask, window, polyorder):
    """Per-pixel weighted polynomial fits over the same windows (first/last full window at the edges)."""
    h = window // 2
    n = y.shape[-1]
    out = np.array(y, dtype=float)
    ok = np.zeros(y.shape, bool)
    for r in np.ndindex(*y.shape[:-1]):
        for i in range(n):
            start = min(max(i - h, 0), n - window)
            j = np.arange(start, start + window)
            g = j[mask[r][j]]
            if not mask[r][i] or g.size < polyorder + 1:
                continue
            V = np.vander((g - i) / max(h, 1), polyorder + 1, increasing=True)
            coef = np.linalg.lstsq(V, y[r][g].astype(float), rcond=None)[0]
            out[r][i] = coef[0]
            ok[r][i] = True
    return out, ok


def test_savgol_all_good_matches_scipy(backend, dtype):
    rng = np.random.default_rng(6)
    y = (np.sin(np.linspace(0, 6, 300))[None] + 0.1 * rng.normal(size=(4, 300))).astype(dtype)
    for window, polyorder in ((11, 3), (21, 2), (5, 0)):
        out, mask_out = savgol_filter(put(backend, y), put(backend, np.ones(y.shape, bool)), window=window, polyorder=polyorder)
        ref = scipy.signal.savgol_filter(y.astype(float), window, polyorder, mode="interp")
        assert dtype_of(out) == np.dtype(dtype)
        assert to_numpy(mask_out).all()
        assert_close(out, ref, rtol=RTOL[dtype], atol=10 * RTOL[dtype], backend=backend)


@pytest.mark.parametrize("window, polyorder", [(9, 2), (9, 1), (51, 1), (7, 0)])
def test_savgol_masked_matches_bruteforce(backend, dtype, window, polyorder):
    """Degrees 0 and 1 are solved in closed form, 2 and up by a batched solve: all against the loop."""
    rng = np.random.default_rng(7)
    y = rng.normal(size=(3, 120)).astype(dtype)
    mask = rng.random((3, 120)) > 0.3
    mask[1, 40:60] = False  # a gap wider than the window
    mask[2, :4] = False
    y[~mask] = 1e3  # masked values must not leak into the fits
    y[0, 5] = np.nan
    mask[0, 5] = True  # non-finite counts as masked
    out, mask_out = savgol_filter(put(backend, y), put(backend, mask), window=window, polyorder=polyorder)
    good = mask & np.isfinite(y)
    ref, ref_ok = _savgol_oracle(np.where(good, y, 0), good, window, polyorder)
    ref = np.where(ref_ok, ref, y)
    mo = to_numpy(mask_out)
    np.testing.assert_array_equal(mo, ref_ok)
    assert not (mo & ~mask).any(), "a masked pixel came back good"
    assert not mo[1, 40:60].any()
    assert_close(out, ref, rtol=RTOL[dtype], atol=100 * RTOL[dtype], backend=backend)


def test_savgol_interpolating_window_is_the_data_where_the_window_is_good(backend, dtype):
    """polyorder = window - 1 (the telluric level's bridge, window 3): the fit passes through every
    point, so the output is the input and good exactly where the brute-force fit has every point."""
    rng = np.random.default_rng(9)
    y = rng.normal(size=(4, 80)).astype(dtype)
    mask = rng.random((4, 80)) > 0.25
    mask[3, :3] = False
    for window in (1, 3, 5):
        out, mask_out = savgol_filter(put(backend, y), put(backend, mask), window=window, polyorder=window - 1)
        ref, ref_ok = _savgol_oracle(np.where(mask, y, 0), mask, window, window - 1)
        np.testing.assert_array_equal(to_numpy(mask_out), ref_ok)
        assert dtype_of(out) == np.dtype(dtype)
        assert_close(out, np.where(ref_ok, ref, y), rtol=RTOL[dtype], atol=100 * RTOL[dtype], backend=backend)


def test_savgol_long_rows_keep_float64_precision(backend):
    """The moments are prefix sums restarted per block: no precision lost with the row length
    (n ~ 1e5, a far-from-zero level, polyorder 3, n not a multiple of the window)."""
    n = 100_003
    rng = np.random.default_rng(10)
    x = np.linspace(0.0, 1.0, n)
    y = 1e3 * (1 + 0.3 * x + np.sin(40 * x))[None] + rng.normal(size=(2, n))
    for window, polyorder in ((51, 3), (31, 1)):
        good = put(backend, np.ones(y.shape, bool))
        out, mask_out = savgol_filter(put(backend, y), good, window=window, polyorder=polyorder)
        ref = scipy.signal.savgol_filter(y, window, polyorder, mode="interp")
        assert to_numpy(mask_out).all()
        assert_close(out, ref, rtol=1e-12, atol=1e-9, backend=backend)


def test_savgol_axis0_and_errors(backend):
    rng = np.random.default_rng(8)
    y = rng.normal(size=(40, 3))
    mask = rng.random((40, 3)) > 0.2
    out, mask_out = savgol_filter(put(backend, y), put(backend, mask), window=7, polyorder=2, axis=0)
    ref, ref_ok = _savgol_oracle(np.where(mask, y, 0).T, mask.T, 7, 2)
    np.testing.assert_array_equal(to_numpy(mask_out), ref_ok.T)
    assert_close(out, np.where(ref_ok, ref, y.T).T, rtol=1e-9, atol=1e-12, backend=backend)
    for kw in ({"window": 6, "polyorder": 2}, {"window": 5, "polyorder": 5}, {"window": 41, "polyorder": 2}):
        with pytest.raises(InputError):
            savgol_filter(put(backend, y), put(backend, mask), axis=0, **kw)


# --------------------------------------------------------------------------- batched_lstsq


def _lstsq_oracle(A, b, w):
    rows = []
    for i in range(b.shape[0]):
        Ai = A if A.ndim == 2 else A[i]
        sw = np.sqrt(w[i])
        rows.append(np.linalg.lstsq(Ai * sw[:, None], b[i] * sw, rcond=None)[0])
    return np.array(rows)


def _legendre_basis(n, k):
    return np.polynomial.legendre.legvander(np.linspace(-1, 1, n), k - 1)


def test_lstsq_shared_design_per_row_weights(backend, dtype):
    rng = np.random.default_rng(11)
    n, k, batch = 400, 9, 300
    A = _legendre_basis(n, k) * np.array([1e3, 1, 1, 1e-2, 1, 1, 1, 1, 5])  # badly scaled columns
    x_true = rng.normal(size=(batch, k))
    b = x_true @ A.T + 0.01 * rng.normal(size=(batch, n))
    w = rng.uniform(0.5, 2.0, (batch, n)) * (rng.random((batch, n)) > 0.1)
    out = batched_lstsq(put(backend, A, dtype), put(backend, b, dtype), weights=put(backend, w, dtype))
    ref = _lstsq_oracle(A, b, w)
    assert out.shape == (batch, k)
    assert dtype_of(out) == np.dtype(dtype)
    if dtype == "float64":
        assert_close(out, ref, rtol=1e-8, atol=1e-10, backend=backend)
    # float32 data at 1e3 cannot pin the 1e-2 column's coefficient: compare the fitted models
    model = to_numpy(out).astype(float) @ A.T
    np.testing.assert_allclose(model, ref @ A.T, rtol=0, atol=RTOL[dtype] * 10 * np.abs(b).max())


def test_lstsq_batched_design_and_unweighted(backend, dtype):
    rng = np.random.default_rng(12)
    batch, n, k = 20, 50, 4
    A = rng.normal(size=(batch, n, k))
    b = rng.normal(size=(batch, n))
    w = rng.uniform(0.1, 1.0, (batch, n))
    rt = 1e-9 if dtype == "float64" else 1e-3
    out = batched_lstsq(put(backend, A, dtype), put(backend, b, dtype), weights=put(backend, w, dtype))
    assert_close(out, _lstsq_oracle(A, b, w), rtol=rt, atol=rt, backend=backend)
    out = batched_lstsq(put(backend, A, dtype), put(backend, b, dtype))
    assert_close(out, _lstsq_oracle(A, b, np.ones_like(b)), rtol=rt, atol=rt, backend=backend)
    A2 = A[0]
    out = batched_lstsq(put(backend, A2, dtype), put(backend, b, dtype))
    assert_close(out, _lstsq_oracle(A2, b, np.ones_like(b)), rtol=rt, atol=rt, backend=backend)


def test_lstsq_ridge(backend):
    rng = np.random.default_rng(13)
    n, k = 30, 3
    A = rng.normal(size=(n, k)) * np.array([10.0, 1.0, 0.1])
    b = rng.normal(size=(2, n))
    w = np.vstack([rng.uniform(size=n), np.zeros(n)])  # the second row has no data at all
    ridge = 0.5
    out = batched_lstsq(put(backend, A), put(backend, b), weights=put(backend, w), ridge=ridge)
    s = np.linalg.norm(A, axis=0)
    ref = [np.linalg.solve(A.T @ (w[i, :, None] * A) + ridge * np.diag(s**2), A.T @ (w[i] * b[i])) for i in range(2)]
    assert_close(out, ref, rtol=1e-10, atol=1e-14, backend=backend)


# --------------------------------------------------------------------------- sigma_clip


def _clip_oracle(x, w, mask, nsigma, maxiter, center):
    """Column by column, iterate until nothing changes (at most maxiter times)."""
    kept = mask & np.isfinite(x)
    for j in range(x.shape[1]):
        sel = kept[:, j].copy()
        for _ in range(maxiter):
            v, ww = x[sel, j].astype(float), w[sel, j].astype(float)
            if v.size == 0 or ww.sum() == 0:
                sel[:] = False
                break
            if center == "mean":
                c = np.sum(ww * v) / ww.sum()
                s = np.sqrt(np.sum(ww * (v - c) ** 2) / ww.sum())
            else:
                c = np.median(v)
                s = 1.4826 * np.median(np.abs(v - c))
            new = sel & (np.abs(x[:, j] - c) <= nsigma * s)
            if (new == sel).all():
                break
            sel = new
        kept[:, j] = sel
    return kept


@pytest.mark.parametrize("center", ["mean", "median"])
def test_sigma_clip_matches_bruteforce(backend, dtype, center):
    rng = np.random.default_rng(14)
    nstar, npix = 30, 200
    x = rng.normal(size=(nstar, npix))
    bad = rng.random((nstar, npix)) < 0.08
    x[bad] += rng.choice([-1, 1], bad.sum()) * rng.uniform(5, 30, bad.sum())
    x = x.astype(dtype)
    x[3, 7] = np.nan
    w = rng.uniform(0.5, 2.0, (nstar, npix)).astype(dtype)
    mask = rng.random((nstar, npix)) > 0.1
    mask[:, 11] = False  # nothing to keep in this pixel
    kept = sigma_clip(
        put(backend, x), weights=put(backend, w), mask=put(backend, mask), nsigma=2.5, maxiter=10, axis=0, center=center
    )
    ref = _clip_oracle(x, w if center == "mean" else np.ones_like(w), mask, 2.5, 10, center)
    k = to_numpy(kept)
    assert k.dtype == bool and k.shape == x.shape
    assert not (k & ~mask).any()
    assert not k[:, 11].any() and not k[3, 7]
    mismatch = (k != ref).sum()
    # float32 can flip an entry sitting exactly on the threshold; float64 must agree exactly
    assert mismatch <= (0 if dtype == "float64" else 2), mismatch


def test_sigma_clip_defaults_and_axis(backend):
    x = np.zeros((3, 12))
    x[:, 5] = 100.0
    kept = sigma_clip(put(backend, x), axis=1, nsigma=3.0)
    expected = np.ones((3, 12), bool)
    expected[:, 5] = False
    np.testing.assert_array_equal(to_numpy(kept), expected)
    with pytest.raises(InputError):
        sigma_clip(put(backend, x), center="mode")

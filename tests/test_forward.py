"""The continuous forward-model fit (issue 14): cells of a grid with a missing node, and the fit itself.

Oracles: brute-force loops over the corners and a multilinear function known at every node
(fitting/cells.py); for the fit, frames made by an independent forward model (NumPy, scipy's
cubic spline for the Doppler shift) at an off-node θ: the fit must return θ and v.
"""

import dataclasses
import itertools

import numpy as np
import pytest
from scipy.interpolate import CubicSpline

from gpucal.backends import to_numpy
from gpucal.containers import MatchResult, SpectraBatch
from gpucal.errors import InputError
from gpucal.fitting import (
    PhotometricTerm,
    cell_grid,
    fit_forward,
    fit_grid,
    fitted_templates,
    poly_on_pixels,
)
from gpucal.fitting.cells import corner_weights, locate
from gpucal.simulate import cell_corners
from gpucal.templates.demo import demo_grid
from gpucal.units import doppler_factor

AXES = ((5000.0, 5500.0, 6000.0), (4.0, 4.5), (-0.5, 0.0, 0.5), (0.0,))


def _params(missing=()):
    rows = [r for r in itertools.product(*AXES) if r not in missing]
    return np.asarray(rows, dtype=float)


def _linear(p):
    """A multilinear function of (Teff, logg, [M/H]): interpolation must reproduce it exactly."""
    t, g, m = p[..., 0] / 1000.0, p[..., 1], p[..., 2]
    return 1.0 + 0.3 * t + 0.7 * g - 0.2 * m + 0.05 * t * g + 0.4 * g * m - 0.1 * t * g * m


def test_corners_reproduce_a_multilinear_function(backend):
    xp = backend.xp
    p = _params()
    cg = cell_grid(backend.asarray(p))
    assert cg.active == (0, 1, 2) and cg.n_corners == 8 and cg.n_complete == 2 * 1 * 2
    rng = np.random.default_rng(1)
    theta = np.stack([rng.uniform(5000, 6000, 50), rng.uniform(4.0, 4.5, 50), rng.uniform(-0.5, 0.5, 50),
                      np.zeros(50)], axis=1)
    th, cell, moved = locate(cg, backend.asarray(theta))
    idx, w, dw = corner_weights(cg, th, cell)
    assert not bool(xp.any(moved))
    vals = backend.asarray(_linear(p))
    interp = to_numpy(xp.sum(w * xp.reshape(xp.take(vals, xp.reshape(idx, (-1,)), axis=0), idx.shape), axis=1))
    np.testing.assert_allclose(interp, _linear(theta), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(xp.sum(w, axis=1)), 1.0, rtol=1e-12)
    # the weight derivatives against central differences of the weights (inside each cell)
    for j, h in ((0, 1e-3), (1, 1e-6), (2, 1e-6)):
        d = np.zeros(4)
        d[j] = h
        _, wp, _ = corner_weights(cg, backend.asarray(theta + d), cell)
        _, wm, _ = corner_weights(cg, backend.asarray(theta - d), cell)
        np.testing.assert_allclose(to_numpy(dw)[:, :, j], (to_numpy(wp) - to_numpy(wm)) / (2 * h), atol=1e-6 / h)


def test_a_missing_node_is_never_interpolated_across(backend):
    """The Kurucz-like case: one node missing; its two cells are out of the hull, θ there moves to a complete cell."""
    xp = backend.xp
    gone = (6000.0, 4.5, 0.5, 0.0)
    p = _params(missing=(gone,))
    cg = cell_grid(backend.asarray(p))
    assert cg.n_complete == 3  # the cell (5500-6000, 4.0-4.5, 0.0-0.5) had the node as a corner
    theta = np.array([[5800.0, 4.3, 0.3, 0.0],   # in the incomplete cell
                      [5200.0, 4.2, 0.3, 0.0],   # in a complete one
                      [6500.0, 4.3, -0.2, 0.0]])  # beyond the Teff range
    th, cell, moved = locate(cg, backend.asarray(theta))
    idx, w, _ = corner_weights(cg, th, cell)
    th, idx, w = to_numpy(th), to_numpy(idx), to_numpy(w)
    assert np.all(idx >= 0), "a corner that is not a node"
    np.testing.assert_array_equal(to_numpy(moved), [True, False, True])
    # brute force: the nearest point of the complete cells' union, found by a grid search
    complete = []
    for k in itertools.product(range(2), range(1), range(2)):
        corners = [(AXES[0][k[0] + a], AXES[1][k[1] + b], AXES[2][k[2] + c], 0.0)
                   for a, b, c in itertools.product((0, 1), repeat=3)]
        if gone not in corners:
            complete.append(k)
    assert len(complete) == 3
    # θ 0 lies in cell (1, 0, 1); the nearest complete cells by index are (0,0,1) and (1,0,0): ties to the lower
    np.testing.assert_allclose(th[0], [5500.0, 4.3, 0.3, 0.0])
    np.testing.assert_allclose(th[1], theta[1])
    np.testing.assert_allclose(th[2], [6000.0, 4.3, -0.2, 0.0])
    np.testing.assert_allclose(w.sum(axis=1), 1.0)


def test_on_hull_face_against_a_brute_force_search(backend):
    """on_hull_face: θ on a face of its cell with no complete cell beyond (the grid's edge or the missing
    node's cells), by brute force: nudge θ outward along each axis and ask whether a complete cell holds it."""
    from gpucal.fitting.cells import on_hull_face

    gone = (6000.0, 4.5, 0.5, 0.0)
    p = _params(missing=(gone,))
    cg = cell_grid(backend.asarray(p))
    boxes = []  # the complete cells as (lo, hi) boxes
    for k in itertools.product(range(2), range(1), range(2)):
        corners = [(AXES[0][k[0] + a], AXES[1][k[1] + b], AXES[2][k[2] + c], 0.0)
                   for a, b, c in itertools.product((0, 1), repeat=3)]
        if gone not in corners:
            boxes.append(([AXES[0][k[0]], AXES[1][k[1]], AXES[2][k[2]]], [AXES[0][k[0] + 1], AXES[1][k[1] + 1], AXES[2][k[2] + 1]]))

    def inside(t):
        return any(all(lo[j] - 1e-9 <= t[j] <= hi[j] + 1e-9 for j in range(3)) for lo, hi in boxes)

    rng = np.random.default_rng(3)
    theta = np.stack([rng.choice([5000.0, 5200.0, 5500.0, 5800.0, 6000.0], 200), rng.choice([4.0, 4.2, 4.5], 200),
                      rng.choice([-0.5, -0.1, 0.0, 0.3, 0.5], 200), np.zeros(200)], axis=1)
    th, cell, _ = locate(cg, backend.asarray(theta))
    got = to_numpy(on_hull_face(cg, th, cell))
    th = to_numpy(th)
    steps = (10.0, 0.01, 0.01)
    want = [any(not inside(t[:3] + s * np.eye(3)[j] * steps[j]) for j in range(3) for s in (-1, 1)) for t in th]
    np.testing.assert_array_equal(got, want)
    assert 20 < got.sum() < 200


def test_cell_grid_without_a_complete_cell_is_an_error(backend):
    p = np.array([[5000.0, 4.0, 0.0, 0.0], [5500.0, 4.5, 0.0, 0.0]])
    with pytest.raises(InputError, match="no complete cell"):
        cell_grid(backend.asarray(p))


# --------------------------------------------------------------------------- the fit

FWHM = 2.0
TRUTH = np.array([[5330.0, 4.21, -0.18, 0.0], [5710.0, 4.37, 0.22, 0.0], [5560.0, 4.05, 0.41, 0.0]])
RV = np.array([-87.3, 12.4, 141.0])


@pytest.fixture(scope="module")
def small():
    """A 3 x 2 x 3 demo grid, 900 frame pixels over 5000-6200 Å, and three stars made off its nodes."""
    grid = demo_grid(teff=AXES[0], logg=AXES[1], mh=AXES[2], wave_range=(4800.0, 6400.0))
    wave = np.linspace(5000.0, 6200.0, 900)
    return grid, wave


def _frame(backend, grid, wave, *, per_fibre=False):
    """Counts = P_true · S(θ) shifted by v: S the multilinear interpolant of the fit's own grid rows
    (so the truth is representable), shifted by an independent cubic spline in NumPy."""
    from gpucal.backends import get_backend

    be = get_backend("numpy")
    fg = fit_grid(grid, be.asarray(wave), fwhm=FWHM)
    wq, rows = np.asarray(fg.wave), np.asarray(fg.norm_flux, dtype=float)
    params = np.asarray(grid.params)
    lookup = {tuple(r): i for i, r in enumerate(params.tolist())}
    out, ptrue, waves = [], [], []
    for s, (th, v) in enumerate(zip(TRUTH, RV)):
        spec = np.zeros(wq.size)
        for node, wgt in cell_corners(th, AXES[:3]):
            spec += wgt * rows[lookup[(*node, 0.0)]]
        w = wave + (0.3 * s if per_fibre else 0.0)
        x = np.log(w)
        ptrue.append(1e-3 * (1.0 + 0.3 * (x - x.mean()) / np.ptp(x) - 0.2 * ((x - x.mean()) / np.ptp(x)) ** 2))
        out.append(ptrue[-1] * CubicSpline(wq, spec)(w / doppler_factor(v)))
        waves.append(w)
    flux = np.array(out)
    var = np.full(flux.shape, (np.median(flux) / 400.0) ** 2)  # noise-free counts, S/N 400 weights
    wave_arr = np.array(waves) if per_fibre else wave
    return SpectraBatch(wave=backend.asarray(wave_arr), flux=backend.asarray(flux), var=backend.asarray(var),
                        mask=backend.asarray(np.ones(flux.shape, bool)), fibre_ids=np.arange(3) + 1,
                        names=("a", "b", "c")), np.array(ptrue)


def _start(backend, params):
    """A scan-like starting point: the node nearest each truth, the RV 3 km/s off."""
    xp = backend.xp
    near = np.array([np.argmin(np.sum(((params - t) / [500.0, 0.5, 0.5, 1.0]) ** 2, axis=1)) for t in TRUTH])
    p0 = params[near]
    z = backend.asarray(np.zeros(3))
    return MatchResult(index=backend.asarray(near.astype(np.int64)), params=backend.asarray(p0),
                       params_err=backend.asarray(np.full((3, 4), np.nan)), rv=backend.asarray(RV + 3.0),
                       rv_err=z, chi2=z, dof=backend.asarray(np.zeros(3, dtype=np.int64)),
                       meta={"rv_at_edge": backend.asarray(np.zeros(3, bool))}), xp


@pytest.mark.parametrize("per_fibre", [False, True], ids=["shared_wave", "per_fibre_wave"])
def test_fit_recovers_off_node_parameters_and_velocity(backend, small, per_fibre):
    grid, wave = small
    spec, ptrue = _frame(backend, grid, wave, per_fibre=per_fibre)
    fg = fit_grid(grid, backend.asarray(wave), fwhm=FWHM)
    start, xp = _start(backend, np.asarray(grid.params))
    res = fit_forward(spec, fg, start, degree=4, n_iter=12, good_regions=())
    p = to_numpy(res.params)
    assert np.all(to_numpy(res.meta["converged"])) and not np.any(to_numpy(res.meta["on_hull"]))
    print(p - TRUTH, to_numpy(res.rv) - RV)
    # noise-free: what is left is the linear interpolation of the 4x oversampled grid at the shifted
    # pixels against the oracle's cubic spline (a few K; 0.35 Å steps against a 0.85 Å σ LSF)
    np.testing.assert_allclose(p[:, 0], TRUTH[:, 0], atol=8.0)
    np.testing.assert_allclose(p[:, 1:3], TRUTH[:, 1:3], atol=0.015)
    np.testing.assert_allclose(to_numpy(res.rv), RV, atol=0.3)
    assert np.all(to_numpy(res.params_err)[:, :3] > 0) and np.all(np.isnan(to_numpy(res.params_err)[:, 3]))
    # P is what multiplies the template: the fitted polynomial is the true one
    np.testing.assert_allclose(to_numpy(poly_on_pixels(spec.wave, res)), ptrue, rtol=1e-2)


def test_fitted_templates_are_the_fit_interpolant_of_the_full_grid(backend, small):
    grid, wave = small
    spec, _ = _frame(backend, grid, wave)
    fg = fit_grid(grid, backend.asarray(wave), fwhm=FWHM)
    start, xp = _start(backend, np.asarray(grid.params))
    res = fit_forward(spec, fg, start, degree=4, good_regions=(), n_starts=1)
    full = to_numpy(fitted_templates(backend.asarray(np.asarray(grid.flux)), res))
    idx, w = to_numpy(res.meta["corner_index"]), to_numpy(res.meta["corner_weight"])
    oracle = np.einsum("sc,scw->sw", w, np.asarray(grid.flux)[idx])
    np.testing.assert_allclose(full, oracle, rtol=1e-10)


def test_photometric_term_is_reported_apart_and_pulls_toward_the_colours(backend, small):
    """With the spectra masked out only the catalogue colours constrain θ; χ²_phot is 0 at the colours' θ."""
    grid, wave = small
    spec, _ = _frame(backend, grid, wave)
    fg = fit_grid(grid, backend.asarray(wave), fwhm=FWHM)
    start, xp = _start(backend, np.asarray(grid.params))
    # node "magnitudes": a smooth colour in Teff and logg; the catalogue's: those of the truth's interpolant
    p = np.asarray(grid.params)
    node_mag = np.stack([-2.5 * np.log10(1.0 + 0.0 * p[:, 0]), 2.0 - p[:, 0] / 5000.0, 1.5 - p[:, 0] / 4000.0],
                        axis=1)
    res0 = fit_forward(spec, fg, start, degree=4, good_regions=(), n_starts=1)
    idx, w = to_numpy(res0.meta["corner_index"]), to_numpy(res0.meta["corner_weight"])
    cat = -2.5 * np.log10(np.einsum("sc,scb->sb", w, 10 ** (-0.4 * node_mag[idx]))) + 7.0
    term = PhotometricTerm(node_mag=backend.asarray(node_mag), mag=backend.asarray(cat),
                           err=backend.asarray(np.full(cat.shape, 0.01)), valid=backend.asarray(np.ones(cat.shape, bool)))
    res = fit_forward(spec, fg, start, degree=4, good_regions=(), n_starts=1, photometry=term)
    np.testing.assert_allclose(to_numpy(res.meta["chi2_phot"]), 0.0, atol=1e-3)
    np.testing.assert_allclose(to_numpy(res.params), to_numpy(res0.params), atol=1e-2)
    # the colours 0.05 mag redder: χ²_phot > 0 and Teff moves cooler than the spectra alone put it
    term.mag = backend.asarray(cat + np.array([0.0, 0.05, 0.1]))
    term.weight = 1e3
    res2 = fit_forward(spec, fg, start, degree=4, good_regions=(), n_starts=1, photometry=term)
    assert np.all(to_numpy(res2.meta["chi2_phot"]) > 0.1)
    assert np.all(to_numpy(res2.params)[:, 0] < to_numpy(res0.params)[:, 0] - 5.0)


def test_keeping_the_better_start_is_the_fit_from_that_start_alone(backend, small):
    """keep_best_at=0 with two starts, one far (every star at the grid's first node) and the scan's
    node: each star's lower-χ² start (the node) goes on alone, so the fit is, to rounding, the
    one-start fit from the node, photometric rows included; with both kept to the end it ends no
    worse."""
    grid, wave = small
    spec, _ = _frame(backend, grid, wave)
    fg = fit_grid(grid, backend.asarray(wave), fwhm=FWHM)
    params = np.asarray(grid.params)
    node, _ = _start(backend, params)
    far = dataclasses.replace(node, params=backend.asarray(np.repeat(params[:1], 3, axis=0)))
    node_mag = np.stack([2.0 - params[:, 0] / 5000.0, 1.5 - params[:, 0] / 4000.0], axis=1)
    term = PhotometricTerm(node_mag=backend.asarray(node_mag), mag=backend.asarray(np.zeros((3, 2))),
                           err=backend.asarray(np.full((3, 2), 0.05)), valid=backend.asarray(np.ones((3, 2), bool)),
                           weight=0.0)
    kw = dict(degree=4, good_regions=(), n_iter=6, photometry=term)
    alone = fit_forward(spec, fg, node, n_starts=1, **kw)
    kept = fit_forward(spec, fg, far, n_starts=2, keep_best_at=0, **kw)
    both = fit_forward(spec, fg, far, n_starts=2, keep_best_at=None, **kw)
    for a, b in ((kept.params, alone.params), (kept.rv, alone.rv), (kept.chi2, alone.chi2),
                 (kept.meta["chi2_phot"], alone.meta["chi2_phot"])):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-10, atol=1e-9)
    assert np.all(to_numpy(both.chi2) <= to_numpy(alone.chi2) * (1 + 1e-9))


def test_bad_options_are_input_errors(backend, small):
    grid, wave = small
    spec, _ = _frame(backend, grid, wave)
    fg = fit_grid(grid, backend.asarray(wave), fwhm=FWHM)
    start, _ = _start(backend, np.asarray(grid.params))
    with pytest.raises(InputError):
        fit_forward(spec, fg, start, n_starts=3)


def test_rv_at_edge_is_judged_on_the_fitted_velocity():
    """pipeline._rv_at_edge: a star the fit moved off the scan's edge is no longer flagged, one it moved onto
    the edge is, and a star that kept the scan's answer (fallback) keeps the scan's flag."""
    from gpucal.containers import MatchResult
    from gpucal.pipeline import _rv_at_edge

    scan = MatchResult(index=np.zeros(4, int), params=np.zeros((4, 4)), params_err=np.zeros((4, 4)),
                       rv=np.array([500.0, 0.0, 10.0, -500.0]), rv_err=np.ones(4), chi2=np.ones(4), dof=np.ones(4),
                       meta={"rv_at_edge": np.array([True, False, False, True]), "velocity_step": 5.0,
                             "vrange_min": -500.0, "vrange_max": 500.0})
    fit = dataclasses.replace(scan, rv=np.array([56.0, 497.0, 10.0, -120.0]),
                              meta={"fit_fallback": np.array([False, False, False, True])})
    np.testing.assert_array_equal(_rv_at_edge(fit, scan), [False, True, False, True])

"""The grid scan: χ² against a brute-force loop, fast path, Huber, refinement, bounded memory."""

import tracemalloc

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import get_backend, to_numpy
from gpucal.containers import PreparedGrid, SpectraBatch
from gpucal.errors import InputError
from gpucal.fitting import grid_neighbours, match_templates, normalise_observed, prepare_grid, velocity_grid
from gpucal.fitting.scan import _apply_prior, _phase_plan, _prior_columns, _scan_exhaustive, _scan_grid, _shifted_phases
from gpucal.simulate import simulate_frame
from gpucal.templates.demo import demo_grid

FWHM = 2.0


def _standards(sim, backend):
    rows = np.asarray(sim.truth["std_fibres"])
    flux, var = sim.flux[rows], sim.var[rows]
    return SpectraBatch(wave=backend.asarray(sim.wave), flux=backend.asarray(flux), var=backend.asarray(var),
                        mask=backend.asarray(np.isfinite(flux) & (var > 0)), fibre_ids=rows + 1,
                        names=tuple(f"s{i}" for i in range(len(rows))))


@pytest.fixture(scope="module")
def sim():
    return simulate_frame(seed=4, snr=50.0)


@pytest.fixture(scope="module")
def prepared_np(sim):
    be = get_backend("numpy")
    return prepare_grid(demo_grid(), be.asarray(sim.wave), fwhm=FWHM)


def test_grid_neighbours_brute_force():
    grid = demo_grid()
    be = get_backend("numpy")
    nb = to_numpy(grid_neighbours(be.asarray(grid.params)))
    p = np.asarray(grid.params)
    axes = [np.unique(p[:, j]) for j in range(4)]
    for t in range(0, len(p), 17):
        for j in range(4):
            k = np.searchsorted(axes[j], p[t, j])
            for side, dk in ((0, -1), (1, 1)):
                kk = k + dk
                want = -1
                if 0 <= kk < len(axes[j]):
                    q = p[t].copy()
                    q[j] = axes[j][kk]
                    hit = np.flatnonzero(np.all(p == q, axis=1))
                    want = int(hit[0]) if hit.size else -1
                assert nb[t, j, side] == want


@pytest.mark.parametrize("vrange", [(-20.0, 20.0, 10.0), (-60.0, 75.0, 5.0)], ids=["any-grid", "aligned"])
def test_scan_chi2_matches_a_loop(backend, sim, vrange):
    """χ² of every (template, star, velocity) from the GEMMs equals the explicit sums.

    A 10 km/s step on a grid prepared for 5 km/s interpolates every trial; the
    5 km/s grid is aligned (whole-pixel lags times sub-pixel phases).
    """
    grid = demo_grid()
    sub = type(grid)(params=grid.params[::40], wave=grid.wave, flux=grid.flux[::40], medium=grid.medium)
    wave = backend.asarray(sim.wave)
    prep = prepare_grid(sub, wave, fwhm=FWHM, dtype=backend.xp.float64)
    spec = _standards(sim, backend)
    dn, wn, good = normalise_observed(spec)
    vel = velocity_grid(*vrange, like=wave)
    plan = _phase_plan(prep.wave, vel)
    assert (plan is None) == (vrange[2] == 10.0)
    sh = _shifted_phases(prep.wave, wave, dn, wn, good, vel, backend.xp.float64, plan)
    n_t = prep.norm_flux.shape[0]
    n_star, n_vel = dn.shape[0], vel.shape[0]
    best, lag = _scan_exhaustive(lambda a, b: prep.norm_flux[a:b, :], n_t, sh, 2)
    # Oracle: shift the data with np.interp at every trial, then the χ² sums, in loops.
    m, wq, v = (to_numpy(a) for a in (prep.norm_flux, prep.wave, vel))
    dnh, wnh, gh = (to_numpy(a) for a in (dn, wn, good))
    expect = np.empty((n_t, n_star, n_vel))
    for s in range(n_star):
        for k in range(n_vel):
            beta = v[k] / 299792.458
            x = wq * np.sqrt((1 + beta) / (1 - beta))
            d = np.interp(x, sim.wave, dnh[s], left=0, right=0)
            g = np.interp(x, sim.wave, gh[s].astype(float), left=0, right=0)
            wt = np.where(g > 0.999, np.interp(x, sim.wave, wnh[s], left=0, right=0), 0.0)
            for t in range(n_t):
                a = np.sum(wt * d * m[t])
                b = np.sum(wt * m[t] ** 2)
                expect[t, s, k] = np.sum(wt * d * d) - a * a / b
    assert_close(best, expect.min(axis=2), rtol=1e-8, backend=backend)
    np.testing.assert_array_equal(to_numpy(lag), expect.argmin(axis=2))


def test_prior_scans_only_the_templates_some_star_may_take(backend, sim):
    """With a colour prior only the union of the stars' allowed nodes is scanned (issue 17); the χ²
    table after the prior, and every velocity index that can win, equal the whole grid's."""
    grid = demo_grid()
    sub = type(grid)(params=grid.params[::20], wave=grid.wave, flux=grid.flux[::20], medium=grid.medium)
    wave = backend.asarray(sim.wave)
    prep = prepare_grid(sub, wave, fwhm=FWHM, dtype=backend.xp.float64)
    spec = _standards(sim, backend)
    dn, wn, good = normalise_observed(spec)
    vel = velocity_grid(-60.0, 75.0, 5.0, like=wave)
    sh = _shifted_phases(prep.wave, wave, dn, wn, good, vel, backend.xp.float64, _phase_plan(prep.wave, vel))
    n_star, n_t = dn.shape[0], prep.norm_flux.shape[0]
    allowed = np.zeros((n_star, n_t), dtype=bool)
    for s in range(n_star):  # each star a window of 3 nodes, none of them allowing the last 2 nodes
        allowed[s, (2 * s) % (n_t - 4): (2 * s) % (n_t - 4) + 3] = True
    prior = backend.asarray(allowed)
    cols = _prior_columns(prior)
    np.testing.assert_array_equal(to_numpy(cols), np.flatnonzero(allowed.any(axis=0)))
    for fast in (False, True):
        full, full_v = _scan_grid(prep, backend, sh, 3, fast=fast, n_fiducial=4)
        part, part_v = _scan_grid(prep, backend, sh, 3, fast=fast, n_fiducial=4, cols=cols)
        want = np.where(allowed.T, to_numpy(full), np.inf)
        np.testing.assert_array_equal(to_numpy(_apply_prior(part, prior)), want)
        if not fast:
            np.testing.assert_array_equal(to_numpy(part_v)[allowed.T], to_numpy(full_v)[allowed.T])
    # a star that the prior allows nothing is scanned unrestricted, so every template is needed
    allowed[0] = False
    assert _prior_columns(backend.asarray(allowed)) is None
    assert _prior_columns(backend.asarray(np.ones((n_star, n_t), dtype=bool))) is None


def test_float32_ranks_like_float64(sim):
    be = get_backend("numpy")
    wave = be.asarray(sim.wave)
    spec = _standards(sim, be)
    r32 = match_templates(spec, prepare_grid(demo_grid(), wave, fwhm=FWHM, dtype=be.xp.float32), refine=False)
    r64 = match_templates(spec, prepare_grid(demo_grid(), wave, fwhm=FWHM, dtype=be.xp.float64), refine=False)
    np.testing.assert_array_equal(to_numpy(r32.index), to_numpy(r64.index))
    np.testing.assert_allclose(to_numpy(r32.rv), to_numpy(r64.rv), atol=0.05)


def test_fast_path_and_huber_agree_with_exhaustive(sim, prepared_np):
    be = get_backend("numpy")
    spec = _standards(sim, be)
    full = match_templates(spec, prepared_np)
    fast = match_templates(spec, prepared_np, fast=True)
    hub = match_templates(spec, prepared_np, metric="huber")
    for other in (fast, hub):
        np.testing.assert_array_equal(to_numpy(other.index), to_numpy(full.index))
        np.testing.assert_allclose(to_numpy(other.rv), to_numpy(full.rv), atol=1.0)
    np.testing.assert_allclose(to_numpy(full.rv), sim.truth["rv"], atol=3.0)
    assert np.all(np.isfinite(to_numpy(full.rv_err))) and np.all(to_numpy(full.rv_err) < 3.0)


def test_huber_resists_bad_pixels(sim, prepared_np):
    """Spikes the variance does not explain move the χ² pick less than the Huber pick."""
    be = get_backend("numpy")
    flux = sim.flux.copy()
    rows = np.asarray(sim.truth["std_fibres"])
    rng = np.random.default_rng(0)
    for r in rows:
        idx = rng.choice(sim.wave.size, 40, replace=False)
        flux[r, idx] *= 1.8
    bad = type(sim)(**{**sim.__dict__, "flux": flux})
    spec = _standards(bad, be)
    clean = match_templates(_standards(sim, be), prepared_np)
    hub = match_templates(spec, prepared_np, metric="huber", huber_delta=3.0)
    chi = match_templates(spec, prepared_np, metric="chi2")
    agree_hub = np.mean(to_numpy(hub.index) == to_numpy(clean.index))
    agree_chi = np.mean(to_numpy(chi.index) == to_numpy(clean.index))
    assert agree_hub >= 0.8 and agree_hub >= agree_chi


def test_refinement_moves_toward_off_node_truth():
    params = [(6100, 4.3, -0.2, 0), (6380, 4.1, -0.6, 0), (5620, 4.6, 0.3, 0), (6700, 3.8, -0.8, 0), (5400, 4.4, 0.2, 0)]
    sim = simulate_frame(seed=5, params=params)
    be = get_backend("numpy")
    prep = prepare_grid(demo_grid(), be.asarray(sim.wave), fwhm=FWHM)
    res = match_templates(_standards(sim, be), prep)
    truth = np.asarray(params, float)
    node = np.asarray(demo_grid().params)[to_numpy(res.index)]
    refined = to_numpy(res.params)
    err_node = np.abs(node[:, 0] - truth[:, 0])
    err_ref = np.abs(refined[:, 0] - truth[:, 0])
    assert err_ref.mean() < err_node.mean()
    assert np.all(np.isfinite(to_numpy(res.params_err)[:, :3]))


def test_memory_bounded_with_a_grid_ten_times_the_budget(sim, prepared_np, tmp_path):
    """A memory-mapped prepared grid 10x the budget is streamed; the peak stays under the budget."""
    be = get_backend("numpy")
    reps = 48
    base = to_numpy(prepared_np.norm_flux)
    n_t = base.shape[0] * reps
    path = tmp_path / "prepared.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_t, base.shape[1]))
    for k in range(reps):
        out[k * base.shape[0]:(k + 1) * base.shape[0]] = base
    out.flush()
    del out
    mm = np.load(path, mmap_mode="r")
    budget = mm.nbytes / 10
    params = np.vstack([to_numpy(prepared_np.params) + [0, 0, 0, 0.01 * k] for k in range(reps)])
    streamed = PreparedGrid(params=be.asarray(params), wave=prepared_np.wave, norm_flux=mm, lsf=prepared_np.lsf)
    rows = np.asarray(sim.truth["std_fibres"])[:2]
    sub = type(sim)(**{**sim.__dict__, "flux": sim.flux, "var": sim.var})
    sub.truth = {**sim.truth, "std_fibres": rows}
    spec = _standards(sub, be)
    tracemalloc.start()
    res = match_templates(spec, streamed, vrange=(-100.0, 160.0, 10.0), max_memory=budget, refine=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < budget, (peak, budget)
    assert res.meta["block_size"] < n_t / 5
    np.testing.assert_allclose(to_numpy(res.rv), np.asarray(sim.truth["rv"])[:2], atol=3.0)
    # Streaming changes nothing: same answer as the in-memory grid.
    mem = match_templates(spec, prepared_np, vrange=(-100.0, 160.0, 10.0), refine=False)
    np.testing.assert_array_equal(to_numpy(res.index) % base.shape[0], to_numpy(mem.index))
    np.testing.assert_allclose(to_numpy(res.rv), to_numpy(mem.rv), atol=1e-6)


def test_budget_too_small_is_an_error(sim, prepared_np):
    be = get_backend("numpy")
    with pytest.raises(InputError, match="max-memory"):
        match_templates(_standards(sim, be), prepared_np, max_memory=1e5)


def test_unknown_metric(sim, prepared_np):
    with pytest.raises(InputError, match="metric"):
        match_templates(_standards(sim, get_backend("numpy")), prepared_np, metric="l1")


def test_velocity_step_not_aligned_with_the_working_grid(sim, prepared_np):
    """A scan whose step is not the one the grid was prepared for interpolates every trial: same answer."""
    be = get_backend("numpy")
    spec = _standards(sim, be)
    aligned = match_templates(spec, prepared_np, vrange=(-300.0, 300.0, 5.0), refine=False)
    other = match_templates(spec, prepared_np, vrange=(-301.0, 301.0, 7.0), refine=False)
    np.testing.assert_array_equal(to_numpy(other.index), to_numpy(aligned.index))
    np.testing.assert_allclose(to_numpy(other.rv), to_numpy(aligned.rv), atol=1.0)


def test_velocity_grid_is_uniform_and_contains_zero():
    be = get_backend("numpy")
    v = to_numpy(velocity_grid(-500.0, 500.0, 5.0, like=be.asarray(np.zeros(1))))
    assert v.size == 201 and v[100] == 0.0
    np.testing.assert_allclose(np.diff(v), 5.0, rtol=1e-5)


def test_fitting_package_exports_the_room():
    """Every name of gpucal.fitting.__all__ imports, including those scan.py held before the split."""
    import gpucal.fitting as fitting

    for name in fitting.__all__:
        assert getattr(fitting, name) is not None, name
    before = {"prepare_grid", "working_grid", "normalise_observed", "velocity_grid", "match_templates",
              "grid_neighbours", "refined_templates", "memory_budget", "TELLURIC_DEFAULT"}
    assert before <= set(fitting.__all__)

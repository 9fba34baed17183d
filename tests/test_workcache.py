"""The working-grid cache (gpucal.workcache): right entry, never a stale one, a tampered one refused, reuse measured.

A 10-template cut of the demo grid on 1500 frame pixels: a preparation takes a fraction of a second.
Oracle: gpucal.fitting.prepare_grid and gpucal.photometry.fit_colour_relations called directly.
"""

import dataclasses
import logging
import os
import time

import numpy as np
import pytest

from gpucal import workcache
from gpucal.backends import to_numpy
from gpucal.errors import CorruptCacheError
from gpucal.fitting import TELLURIC_DEFAULT, prepare_grid
from gpucal.photometry import fit_colour_relations
from gpucal.templates import open_array_store
from gpucal.templates.demo import demo_grid

OPTS = dict(dtype="float32", good_regions=TELLURIC_DEFAULT, vstep=5.0)


@pytest.fixture(scope="module")
def grid():
    g = demo_grid()
    p = np.asarray(g.params)
    keep = (p[:, 0] >= 5500) & (p[:, 0] <= 6500) & (p[:, 1] >= 4.0) & (p[:, 1] <= 4.5) & (p[:, 2] == 0.0)
    return dataclasses.replace(g, params=p[keep], flux=np.asarray(g.flux)[keep], continuum=None, meta={})


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh working-grid cache directory, this process's memory of it emptied."""
    monkeypatch.setenv("GPUCAL_WORK_CACHE", str(tmp_path / "work"))
    monkeypatch.setattr(workcache, "_MEMORY", type(workcache._MEMORY)())
    monkeypatch.setattr(workcache, "_RELATIONS", {})
    workcache.STATS.clear()
    return tmp_path / "work"


def _wave(n=1000, lo=3800.0, hi=9200.0):
    return np.linspace(lo, hi, n)


def _entries(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("wg-"))


def test_cached_grid_equals_prepare_grid_on_every_backend(grid, cache, backend):
    wave = backend.asarray(_wave())
    want = prepare_grid(grid, wave, fwhm=2.0, dtype=getattr(backend.xp, "float32"), good_regions=TELLURIC_DEFAULT,
                        vstep=5.0)
    first = workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)           # prepared, stored
    workcache._MEMORY.clear()
    again = workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)           # from disk
    assert dict(workcache.STATS) == {"prepared": 1, "disk": 1}
    for got in (first, again):
        np.testing.assert_array_equal(to_numpy(got.norm_flux), to_numpy(want.norm_flux))
        np.testing.assert_array_equal(to_numpy(got.wave), to_numpy(want.wave))
        np.testing.assert_array_equal(to_numpy(got.params), to_numpy(want.params))
        np.testing.assert_array_equal(to_numpy(got.neighbours), to_numpy(want.neighbours))
        assert got.lsf == want.lsf
        assert type(to_numpy(got.norm_flux)[0, 0]) is np.float32
    assert workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS) is again    # from memory
    assert workcache.STATS["memory"] == 1


def test_a_changed_lsf_grid_or_wavelength_grid_is_a_new_entry(grid, cache):
    wave = _wave()
    other_grid = dataclasses.replace(grid, flux=np.asarray(grid.flux) * (1.0 + 1e-3 * np.arange(grid.flux.shape[1])))
    base = dict(grid=grid, wave=wave, fwhm=2.0)
    variants = [base, dict(base, fwhm=2.5), dict(base, fwhm=None, resolution=2500.0), dict(base, grid=other_grid),
                dict(base, wave=_wave(hi=9100.0)), dict(base, wave=_wave(lo=3810.0)),
                dict(base, dtype="float64"), dict(base, good_regions=())]
    for v in variants:
        workcache.prepared_grid(v["grid"], v["wave"], **{k: x for k, x in v.items() if k not in ("grid", "wave")},
                                **{k: x for k, x in OPTS.items() if k not in v})
    assert len(_entries(cache)) == len(variants)
    assert dict(workcache.STATS) == {"prepared": len(variants)}
    workcache._MEMORY.clear()
    for v in variants:  # each entry, opened from disk, is its own preparation's numbers
        opts = dict(OPTS, **{k: x for k, x in v.items() if k not in ("grid", "wave")})
        got = workcache.prepared_grid(v["grid"], v["wave"], **opts)
        want = prepare_grid(v["grid"], v["wave"], **dict(opts, dtype=getattr(np, opts["dtype"])))
        np.testing.assert_array_equal(to_numpy(got.norm_flux), to_numpy(want.norm_flux))
        np.testing.assert_array_equal(to_numpy(got.wave), to_numpy(want.wave))
    assert dict(workcache.STATS) == {"prepared": len(variants), "disk": len(variants)}


def test_a_tampered_entry_is_refused_and_prepared_again(grid, cache, caplog):
    wave = _wave()
    want = to_numpy(workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS).norm_flux).copy()
    (entry,) = _entries(cache)
    fname = cache / entry / "norm_flux.npy"
    arr = np.load(fname)
    arr[3, 100] += 0.5
    time.sleep(0.01)
    np.save(fname, arr)  # a valid .npy, same shape and dtype, one number changed
    with pytest.raises(CorruptCacheError, match="norm_flux"):
        open_array_store(cache / entry, {"norm_flux": "float32"}, fmt=workcache.FORMAT, sidecar=workcache.SIDECAR)
    workcache._MEMORY.clear()
    with caplog.at_level(logging.WARNING, logger="gpucal.workcache"):
        got = workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
    assert "refused" in caplog.text and entry in caplog.text
    assert workcache.STATS["prepared"] == 2 and workcache.STATS["disk"] == 0
    np.testing.assert_array_equal(to_numpy(got.norm_flux), want)
    workcache._MEMORY.clear()  # the entry was written again: the next open takes it from disk
    np.testing.assert_array_equal(to_numpy(workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS).norm_flux), want)
    assert workcache.STATS["disk"] == 1


def test_colour_relations_round_trip_through_the_cache(grid, cache):
    want = fit_colour_relations(grid)
    assert len(want) >= 2
    assert workcache.colour_relations(grid) == want
    workcache._RELATIONS.clear()
    assert workcache.colour_relations(grid) == want  # from disk, every float the same
    assert dict(workcache.STATS) == {"prepared": 1, "disk": 1}


def test_second_run_reuses_the_entry_and_is_faster(grid, cache):
    """Measured: a second process-like run (memory emptied) opens the entry instead of preparing it."""
    wave = _wave()
    t = time.perf_counter()
    workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
    workcache.colour_relations(grid)
    fresh = time.perf_counter() - t
    workcache._MEMORY.clear()
    workcache._RELATIONS.clear()
    t = time.perf_counter()
    workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
    workcache.colour_relations(grid)
    reused = time.perf_counter() - t
    assert dict(workcache.STATS) == {"prepared": 2, "disk": 2}
    assert reused < 0.5 * fresh, (fresh, reused)


def test_off_and_memory_modes_write_nothing(grid, cache, monkeypatch):
    wave = _wave()
    for mode in ("off", "memory"):
        monkeypatch.setenv("GPUCAL_WORK_CACHE", mode)
        a = workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
        b = workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
        assert (a is b) == (mode == "memory")
    assert not cache.exists()


def test_list_and_prune(grid, cache):
    wave = _wave()
    workcache.prepared_grid(grid, wave, fwhm=2.0, **OPTS)
    workcache.prepared_grid(grid, wave, fwhm=3.0, **OPTS)
    workcache.colour_relations(grid)
    entries = workcache.list_entries()
    assert sorted(e["kind"] for e in entries) == ["colour relations", "working grid", "working grid"]
    wg = [e for e in entries if e["kind"] == "working grid"]
    assert {e["lsf"]["fwhm"] for e in wg} == {2.0, 3.0} and all(e["n_templates"] == 10 for e in wg)
    assert all(e["bytes"] > 10 * e["n_q"] * 4 for e in wg)
    old = next(e for e in wg if e["lsf"]["fwhm"] == 3.0)
    os.utime(os.path.join(old["path"], workcache.SIDECAR), (time.time() - 10 * 86400,) * 2)
    assert [e["path"] for e in workcache.prune_entries(older_than_days=5, dry_run=True)] == [old["path"]]
    assert len(workcache.list_entries()) == 3
    assert [e["path"] for e in workcache.prune_entries(older_than_days=5)] == [old["path"]]
    assert len(workcache.list_entries()) == 2
    assert len(workcache.prune_entries()) == 2 and workcache.list_entries() == []

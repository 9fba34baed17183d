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


def test_band_matrices_from_the_cache_equal_band_matrix(grid, cache, monkeypatch):
    from gpucal.photometry import bands as bands_mod
    from gpucal.photometry import band_matrix

    want_W, want_cov = band_matrix(grid.wave, ("g", "r", "i", "z", "y"))
    want_W, want_cov = np.array(want_W), np.array(want_cov)
    workcache.band_matrices(grid, ("g", "r", "i", "z", "y"))
    assert dict(workcache.STATS) == {"prepared": 1}
    monkeypatch.setattr(bands_mod, "_GIVEN", {})
    bands_mod._band_matrix_cached.cache_clear()
    workcache.clear_memory()
    monkeypatch.setattr(bands_mod, "_load_filter", lambda name: pytest.fail(f"filter curve {name} loaded"))
    workcache.band_matrices(grid, ("g", "r", "i", "z", "y"))  # from disk: no filter curve is loaded
    W, cov = band_matrix(grid.wave, ("panstarrs-g", "r", "i", "z", "y"))
    assert dict(workcache.STATS) == {"prepared": 1, "disk": 1}
    np.testing.assert_array_equal(W, want_W)
    np.testing.assert_array_equal(cov, want_cov)
    assert list(cov) == [True, True, True, True, False]  # the cut grid stops short of Pan-STARRS y


def test_help_texts_quote_the_templates_defaults():
    from gpucal.cli import build_parser
    from gpucal.templates import DEFAULT_BANDS, DEFAULT_FRAME_RANGE, DEFAULT_VMAX

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["templates"]
    prep = next(a for a in sub._actions if a.dest == "templates_command").choices["prepare"]
    text = {a.dest: a.help for a in prep._actions}
    assert f"(default {DEFAULT_FRAME_RANGE[0]:g}:{DEFAULT_FRAME_RANGE[1]:g})" in text["wave"]
    assert f"(default {','.join(DEFAULT_BANDS)})" in text["bands"]
    assert f"(default {DEFAULT_VMAX:g})" in text["vmax"]


def test_a_fresh_process_reuses_the_disk_entries_and_imports_no_speclite(grid, tmp_path):
    """Two `gpucal calibrate` processes on one frame: the second opens the working grid, relations and band
    matrices from disk, imports neither speclite nor scipy, and its prepare stage is shorter (measured)."""
    import json
    import subprocess
    import sys

    from gpucal.io import write_frame
    from gpucal.simulate import simulate_frame, write_catalogue_csv
    from gpucal.templates import write_template_cache

    cache = write_template_cache(grid, tmp_path / "grid")
    sim = simulate_frame(seed=3, n_standards=3, n_program=1, n_sky=1, n_pix=1000, wave_range=(3800.0, 9200.0))
    write_frame(tmp_path / "f.fits", sim.flux, sim.var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, tmp_path / "f_cat.csv")
    script = ("import json, sys; from gpucal.cli import main; rc = main(sys.argv[1:]); "
              "print(json.dumps([rc, sorted({m.split('.')[0] for m in sys.modules} & {'speclite', 'scipy'})]))")
    env = dict(os.environ, GPUCAL_WORK_CACHE=str(tmp_path / "work"), GPUCAL_BACKEND="numpy",
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    runs = []
    for i in range(2):
        argv = ["calibrate", str(tmp_path / "f.fits"), "--templates", cache,
                "--photometry", str(tmp_path / "f_cat.csv"), "--fwhm", "2", "--out", str(tmp_path / f"out{i}.fits"), "--summary", str(tmp_path / f"s{i}.json")]
        proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        rc, imported = json.loads(proc.stdout.strip().splitlines()[-1])
        assert rc == 0, proc.stderr[-2000:]
        runs.append((imported, json.loads((tmp_path / f"s{i}.json").read_text())["timing_s"]))
    assert runs[0][0] == ["scipy", "speclite"] and runs[1][0] == []
    assert runs[1][1]["prepare"] < runs[0][1]["prepare"], runs
    assert sorted(p.name[:3] for p in (tmp_path / "work").iterdir()) == ["bm-", "fg-", "rel", "wg-"]
    kinds = [line for line in subprocess.run(
        [sys.executable, "-m", "gpucal.cli", "templates", "cache", "list", "--dir", str(tmp_path / "work")],
        env=env, capture_output=True, text=True, check=True).stdout.splitlines()]
    assert any("10 templates x" in k and "fwhm 2.0" in k for k in kinds) and kinds[-1].startswith("4 entries")


def test_a_grid_cut_from_a_prepared_cache_is_not_taken_for_the_cache(grid, tmp_path):
    """A grid that keeps a cache's meta but not its arrays (dataclasses.replace) has its own fingerprint."""
    from gpucal.templates import load_template_cache, write_template_cache

    cached = load_template_cache(write_template_cache(grid, tmp_path / "g"))
    fp = workcache.grid_fingerprint(cached)
    assert workcache.grid_fingerprint(load_template_cache(tmp_path / "g")) == fp  # same cache, same key
    flux = np.asarray(cached.flux)
    variants = [dataclasses.replace(cached, flux=np.array(flux[::-1])),
                dataclasses.replace(cached, flux=cached.flux[:5], params=cached.params[:5]),
                dataclasses.replace(cached, params=cached.params + [0.0, 0.0, 0.0, 0.1]),
                dataclasses.replace(cached, flux=np.array(flux))]  # same numbers, in memory: another key
    keys = {workcache.grid_fingerprint(v) for v in variants}
    assert fp not in keys and len(keys) == len(variants)
    writable = np.array(flux)
    g = dataclasses.replace(grid, flux=writable)
    before = workcache.grid_fingerprint(g)
    writable[0, 0] *= 1.5  # changed in place: a writable array is hashed again
    assert workcache.grid_fingerprint(g) != before


def test_cli_templates_cache_prune(grid, cache, capsys):
    from gpucal.cli import main

    workcache.prepared_grid(grid, _wave(), fwhm=2.0, **OPTS)
    workcache.colour_relations(grid)
    assert main(["templates", "cache", "prune"]) == 2  # nothing said: refused, nothing removed
    assert "--older-than DAYS, --keep SIZE or --all" in capsys.readouterr().err
    assert main(["templates", "cache", "prune", "--keep", "1x"]) == 2
    assert main(["templates", "cache", "prune", "--keep", "8K"]) == 0  # the relations entry (2 KB, newest) stays
    out = capsys.readouterr().out
    assert "1 entry removed" in out and len(workcache.list_entries()) == 1
    assert main(["templates", "cache", "prune", "--all", "--dry-run"]) == 0
    assert "1 entry would be removed" in capsys.readouterr().out and len(workcache.list_entries()) == 1
    assert main(["templates", "cache", "prune", "--all"]) == 0 and workcache.list_entries() == []


def test_fit_grid_cached_equals_fitting_fit_grid_and_keys_on_the_lsf(grid, cache, backend):
    """The forward fit's fine grid through the cache: equal to gpucal.fitting.fit_grid, from disk the
    second time, a new entry (not a stale hit) for another FWHM."""
    from gpucal.fitting import fit_grid

    wave = backend.asarray(_wave())
    want = fit_grid(grid, wave, fwhm=2.0)
    first = workcache.fit_grid(grid, wave, fwhm=2.0)
    workcache._MEMORY.clear()
    again = workcache.fit_grid(grid, wave, fwhm=2.0)
    assert dict(workcache.STATS) == {"prepared": 1, "disk": 1}
    for got in (first, again):
        np.testing.assert_array_equal(to_numpy(got.norm_flux), to_numpy(want.norm_flux))
        np.testing.assert_array_equal(to_numpy(got.wave), to_numpy(want.wave))
    other = workcache.fit_grid(grid, wave, fwhm=3.0)
    assert workcache.STATS["prepared"] == 2
    assert np.max(np.abs(to_numpy(other.norm_flux) - to_numpy(want.norm_flux))) > 1e-3 * np.max(to_numpy(want.norm_flux))
    assert len([p for p in cache.iterdir() if p.name.startswith("fg-")]) == 2
    assert {e["kind"] for e in workcache.list_entries(cache)} >= {"fit grid"}

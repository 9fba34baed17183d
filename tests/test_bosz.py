"""BOSZ 2024 reader, prepared grids and their cache, on generated fixtures in the release's layout and format."""

import gzip
import json
import logging
import math
import os
import re
import shutil

import numpy as np
import pytest

from gpucal.errors import CoverageError, InputError, StaleCacheError
from gpucal.templates import cache as tgrid
from gpucal.templates import prepare as tprep
from gpucal.templates.bosz import (
    FOUR_PI,
    bosz_file_name,
    bosz_subdir,
    bosz_wave_file_name,
    index_bosz,
    parse_bosz_name,
    read_bosz_spectrum,
    write_demo_bosz_tree,
)
from gpucal.templates.demo import demo_grid, demo_template
from gpucal.units import C_KMS, air_to_vacuum, convert_medium, vacuum_to_air
from gpucal.templates import (
    load_template_cache,
    prepare_bosz_grid,
    prepare_template_cache,
    resample_flux,
    write_template_cache,
)
from gpucal.fitting.lsf import convolve_to_instrument

R = 2000
DLN = 1.0 / 4000.0  # a few thousand pixels over 3000-11000 Å
NODES = dict(teff=(5750.0, 6000.0), logg=(4.0, 4.5), mh=(-0.5, 0.0))
BALMER_JUMP = 3647.0


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("bosz")
    write_demo_bosz_tree(root, resolution=R, dlnlam=DLN, **NODES)
    return root


@pytest.fixture(scope="module")
def prepared(tree):
    return prepare_bosz_grid(tree, workers=1, progress=False)


def _copy(tree, tmp_path):
    dst = tmp_path / "bosz"
    shutil.copytree(tree, dst)
    return dst


def _model_path(root, teff, logg, mh, res=R, **kw):
    return os.path.join(root, bosz_subdir(mh=mh, resolution=res),
                        bosz_file_name(teff=teff, logg=logg, mh=mh, resolution=res, **kw))


# ------------------------------------------------------------------ names


def test_parse_names():
    m = parse_bosz_name("bosz2024_mp_t5750_g+4.50_m-0.25_a+0.00_c+0.00_v1_r10000_resam.txt.gz")
    assert (m.atmos, m.teff, m.logg, m.mh, m.alpha, m.carbon, m.vturb, m.resolution) == \
        ("mp", 5750.0, 4.5, -0.25, 0.0, 0.0, 1.0, 10000)
    m = parse_bosz_name("/x/bosz2024_ap_t12000_g+3.5_m+0.50_a-0.25_c+0.25_v2_r500_resam.txt.gz")
    assert (m.atmos, m.logg, m.mh, m.alpha, m.carbon, m.vturb, m.resolution) == ("ap", 3.5, 0.5, -0.25, 0.25, 2.0, 500)
    assert m.params == (12000.0, 3.5, 0.5, -0.25) and m.name.startswith("bosz2024_ap")
    m = parse_bosz_name("bosz2024_ms_t3000_g+0.00_m-2.50_a+0.50_c-0.75_v4_rorig_noresam.txt.gz")
    assert m.resolution is None and m.atmos == "ms" and m.logg == 0.0
    for bad in ("bosz2024_mp_t5750_g+4.500_m-0.25_a+0.00_c+0.00_v1_r10000_resam.txt.gz",
                "bosz2024_mp_t5750_g+4.50_m0.25_a+0.00_c+0.00_v1_r10000_resam.txt.gz",
                "bosz_mp_t5750_g+4.50_m-0.25_a+0.00_c+0.00_v1_r10000_resam.txt.gz"):
        with pytest.raises(InputError, match=re.escape(bad[:20])):
            parse_bosz_name(bad)


def test_file_name_round_trip():
    name = bosz_file_name(teff=5750, logg=4.5, mh=-0.25, alpha=0.0, resolution=10000)
    assert name == "bosz2024_mp_t5750_g+4.50_m-0.25_a+0.00_c+0.00_v1_r10000_resam.txt.gz"
    assert parse_bosz_name(name).params == (5750.0, 4.5, -0.25, 0.0)
    assert bosz_subdir(mh=-0.25, resolution=10000) == os.path.join("r10000", "m-0.25")
    assert bosz_subdir(mh=0.5, resolution=None) == os.path.join("rorig", "m+0.50")
    assert bosz_wave_file_name(10000) == "bosz2024_wave_r10000.txt"


# ------------------------------------------------------------------ layout, reader


def test_fixture_is_in_the_release_layout_and_format(tree):
    wave_file = tree / bosz_wave_file_name(R)
    wave = np.loadtxt(wave_file)
    assert sorted(os.listdir(tree)) == [bosz_wave_file_name(R), f"r{R}"]
    assert sorted(os.listdir(tree / f"r{R}")) == ["m+0.00", "m-0.50"]
    path = _model_path(tree, 5750, 4.0, -0.5)
    with open(path, "rb") as fh:
        assert fh.read(2) == b"\x1f\x8b"
    rows = np.loadtxt(path)  # plain numpy reads the release format too
    assert rows.shape == (wave.size, 2)
    f, c = demo_grid(**NODES, dlnlam=DLN).continuum[0], rows[:, 1]
    np.testing.assert_allclose(c * FOUR_PI, f, rtol=1e-7)  # continuum H = F / 4π


def test_read_hand_written_file(tmp_path):
    wave = np.linspace(3000.0, 4000.0, 11)
    h = np.arange(11.0) + 1.0
    path = tmp_path / "bosz2024_mp_t5000_g+4.5_m+0.00_a+0.00_c+0.00_v1_r500_resam.txt.gz"
    path.write_bytes(gzip.compress("".join(f"{a:.6e} {2 * a:.6e}\n" for a in h).encode()))
    spec = read_bosz_spectrum(path, wave=wave)
    np.testing.assert_allclose(spec.flux, 4 * math.pi * h)
    np.testing.assert_allclose(spec.continuum, 8 * math.pi * h)
    part = read_bosz_spectrum(path, wave=wave, window=(3250.0, 3450.0))
    np.testing.assert_array_equal(part.wave, wave[2:6])  # brackets the window
    np.testing.assert_allclose(part.flux, 4 * math.pi * h[2:6])
    assert len(spec.sha256) == 64


def test_bad_files_are_errors_naming_the_file(tree, tmp_path):
    wave = np.loadtxt(tree / bosz_wave_file_name(R))
    good = _model_path(tree, 6000, 4.5, 0.0)
    raw = open(good, "rb").read()
    name = os.path.basename(good)

    def bad(content, match, **kw):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(InputError, match=match) as info:
            read_bosz_spectrum(p, wave=wave, **kw)
        assert name in str(info.value)

    bad(raw[: len(raw) // 2], "truncated or corrupt gzip")
    text = gzip.decompress(raw).decode().splitlines(keepends=True)
    bad(gzip.compress("".join(text[:-10]).encode()), f"{len(text) - 10} lines but")
    bad(gzip.compress("".join(t.split()[0] + "\n" for t in text).encode()), "expected 2 columns")
    bad(gzip.compress("".join(text[:100] + ["1.0 nan\n"] + text[101:]).encode()), "non-finite value on line 101")
    bad(gzip.compress("".join(text[:5] + ["1.0 x\n"] + text[6:]).encode()), "malformed line")
    bad(b"", "empty file")
    with pytest.raises(InputError, match="missing.gz"):
        read_bosz_spectrum(tmp_path / "missing.gz", wave=wave)


def test_a_bad_file_stops_preparation_with_its_name(tree, tmp_path):
    root = _copy(tree, tmp_path)
    path = _model_path(root, 6000, 4.0, -0.5)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:-200])
    with pytest.raises(InputError, match=re.escape(os.path.basename(path))):
        prepare_bosz_grid(root, workers=2, progress=False)  # raised in a worker process


def test_index_and_select(tree):
    idx = index_bosz(tree)
    assert idx.resolution == R and len(idx) == 8 and idx.template_fwhm == f"R:{float(R)!r}"
    assert os.path.basename(idx.wave_file) == bosz_wave_file_name(R)
    assert [m.params for m in idx.models] == sorted(m.params for m in idx.models)
    assert len(idx.select(teff=6000)) == 4
    assert len(idx.select(teff=(5000, 7000), logg=(3.9, 4.2), mh=(-1, -0.25))) == 2
    with pytest.raises(InputError, match="no BOSZ r2000 model matches teff 7000:8000.*available"):
        idx.select(teff=(7000, 8000))
    sub = index_bosz(tree / f"r{R}")  # one r<R> folder: its wavelength file is in the parent
    assert len(sub) == 8 and sub.wave_file == idx.wave_file


def test_duplicates_need_a_choice(tree, tmp_path):
    root = _copy(tree, tmp_path)
    src = _model_path(root, 6000, 4.5, 0.0)
    shutil.copy(src, _model_path(root, 6000, 4.5, 0.0, atmos="ap"))
    idx = index_bosz(root)
    with pytest.raises(InputError, match="share Teff=6000.*--atmos"):
        idx.select()
    assert len(idx.select(atmos=["mp", "ap"])) == 8
    chosen = idx.select(atmos=("ap", "mp"), teff=6000, logg=4.5, mh=0.0)
    assert [m.atmos for m in chosen.models] == ["ap"]


def test_resolutions_and_the_wavelength_file(tree, tmp_path):
    root = _copy(tree, tmp_path)
    write_demo_bosz_tree(root, resolution=None, dlnlam=DLN, teff=(6000.0,), logg=(4.5,), mh=(0.0,))
    with pytest.raises(InputError, match="several resolutions"):
        index_bosz(root)
    assert index_bosz(root, resolution="orig").resolution is None
    assert index_bosz(root, resolution=R).resolution == R
    os.remove(root / bosz_wave_file_name(R))
    with pytest.raises(InputError, match=f"{bosz_wave_file_name(R)} of the r{R} spectra is missing"):
        index_bosz(root, resolution=R)
    with pytest.raises(InputError, match="not found"):
        index_bosz(tmp_path / "nowhere")


# ------------------------------------------------------------------ media, resampling


def test_air_vacuum_iau():
    # Na I D2 and Ca II K (NIST): air / vacuum wavelengths in Å
    np.testing.assert_allclose(vacuum_to_air([5891.583, 3934.777]), [5889.950, 3933.663], atol=5e-3)
    np.testing.assert_allclose(air_to_vacuum([5889.950, 3933.663]), [5891.583, 3934.777], atol=5e-3)
    w = np.geomspace(2000.0, 30000.0, 1001)
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(w)), w, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(air_to_vacuum([1500.0, 1999.9]), [1500.0, 1999.9])  # vacuum below 2000 Å
    np.testing.assert_array_equal(convert_medium(w, "air", "air"), w)
    with pytest.raises(InputError):
        convert_medium(w, "air", "water")


def test_resample_flux_conserving():
    w = 4000.0 * np.exp(1e-4 * np.arange(2001))
    f = np.stack([1 + 0.5 * np.sin(w / 3.0), (w / 5000.0) ** -3])
    np.testing.assert_allclose(resample_flux(w, f, w[100:1900]), f[:, 100:1900], rtol=1e-11)  # aligned: a copy
    out_w = 4050.0 * np.exp(2.7e-4 * np.arange(600))
    out = resample_flux(w, f, out_w)
    edges_in, edges_out = tprep._bin_edges(w), tprep._bin_edges(out_w)
    cum = np.concatenate([[0.0], np.cumsum(f[0] * np.diff(edges_in))])
    expected = np.interp(edges_out[-1], edges_in, cum) - np.interp(edges_out[0], edges_in, cum)
    assert np.sum(out[0] * np.diff(edges_out)) == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(out[1], (out_w / 5000.0) ** -3, rtol=5e-5)  # bins cut input pixels
    with pytest.raises(CoverageError, match="needs"):
        resample_flux(w, f, np.linspace(3000.0, 5000.0, 10))


# ------------------------------------------------------------------ prepared grids


def test_prepared_grid_holds_the_models(tree, prepared):
    g = prepared
    assert g.flux.dtype == np.float32 and g.flux.shape == (8, g.wave.size)
    assert g.medium == "air" and g.resolution_fwhm == f"R:{float(R)!r}"
    np.testing.assert_array_equal(g.params, index_bosz(tree).params)
    assert g.dlnlam == pytest.approx(DLN, rel=1e-12)
    # the window: default frame 3500-10000 Å joined with g r i z, ±500 km/s, LSF margin
    dop = math.sqrt((1 + 500 / C_KMS) / (1 - 500 / C_KMS))
    assert g.wave[0] < 3500.0 / dop and g.wave[-1] > 10000.0 * dop
    # an aligned log-uniform library is copied exactly (F = 4πH, then float32)
    ref = demo_grid(**NODES, dlnlam=DLN)
    i0 = int(np.argmin(np.abs(ref.wave - g.wave[0])))
    np.testing.assert_allclose(g.wave, ref.wave[i0:i0 + g.wave.size], rtol=1e-12)
    np.testing.assert_allclose(g.continuum, ref.continuum[:, i0:i0 + g.wave.size], rtol=1e-6)
    spec = read_bosz_spectrum(_model_path(tree, 5750, 4.0, -0.5), wave=np.loadtxt(tree / bosz_wave_file_name(R)))
    np.testing.assert_allclose(g.flux[0], spec.flux[i0:i0 + g.wave.size], rtol=1e-6)
    assert g.meta["source"]["files"][0]["path"] == os.path.relpath(_model_path(tree, 5750, 4.0, -0.5), tree)


def test_parallel_workers_give_the_same_grid(tree, prepared):
    g2 = prepare_bosz_grid(tree, workers=2, progress=False)
    np.testing.assert_array_equal(g2.flux, prepared.flux)
    assert g2.meta["inputs_sha256"] == prepared.meta["inputs_sha256"]


def test_vacuum_frame_gets_a_vacuum_grid(tree):
    g = prepare_bosz_grid(tree, workers=1, medium="vacuum", teff=6000, logg=4.5, mh=0.0)
    assert g.medium == "vacuum"
    np.testing.assert_allclose(np.diff(np.log(g.wave)), DLN, rtol=1e-9)
    _, cont = demo_template(6000, 4.5, 0.0, 0.0, wave=vacuum_to_air(g.wave), return_continuum=True)
    away = np.abs(g.wave - BALMER_JUMP) > 5.0
    np.testing.assert_allclose(g.continuum[0][away], cont[away], rtol=1e-5)


def test_window_beyond_the_library_is_a_coverage_error(tree):
    with pytest.raises(CoverageError, match=r"missing .*-3000\.0 Å"):
        prepare_bosz_grid(tree, wave=(2500.0, 9000.0), workers=1)
    with pytest.raises(CoverageError, match=r"missing 1100\d\.\d-110\d\d\.\d Å"):
        prepare_bosz_grid(tree, wave=(4000.0, 11000.0), workers=1)


def test_rorig_files_with_their_own_wavelengths(tmp_path):
    root = tmp_path / "orig"
    write_demo_bosz_tree(root, resolution=None, dlnlam=DLN, teff=(5750.0, 6000.0), logg=(4.5,), mh=(0.0,))
    assert os.listdir(root) == ["rorig"]
    path = _model_path(root, 5750, 4.5, 0.0, res=None)
    assert np.loadtxt(path).shape[1] == 3
    g = prepare_bosz_grid(root, workers=1)
    assert g.resolution_fwhm == 0.0 and g.flux.shape[0] == 2
    np.testing.assert_allclose(np.diff(np.log(g.wave)), g.dlnlam, rtol=1e-9)
    _, cont = demo_template(5750, 4.5, 0.0, 0.0, wave=g.wave, return_continuum=True)
    away = np.abs(g.wave - BALMER_JUMP) > 5.0
    np.testing.assert_allclose(g.continuum[0][away], cont[away], rtol=1e-4)
    # flux conserving: ∫F dλ over the grid equals the file's over the same bins
    spec = read_bosz_spectrum(path)
    edges = tprep._bin_edges(g.wave)
    e_in = tprep._bin_edges(spec.wave)
    cum = np.concatenate([[0.0], np.cumsum(spec.flux * np.diff(e_in))])
    expected = np.interp(edges[-1], e_in, cum) - np.interp(edges[0], e_in, cum)
    assert np.sum(g.flux[0].astype(float) * np.diff(edges)) == pytest.approx(expected, rel=1e-6)


def test_preconvolved_grid_is_not_convolved_twice(tree, prepared):
    g = prepare_bosz_grid(tree, workers=1, resolution=1000.0)
    assert g.resolution_fwhm == "R:1000.0" and g.meta["lsf"]["convolved"]
    ref = convolve_to_instrument(prepared.wave, prepared.flux.astype(float), resolution=1000.0,
                                 template_fwhm=prepared.resolution_fwhm)
    # both grids are nodes of the library's grid; the unconvolved one has no
    # margin beyond its window, so compare away from its ends
    common, ig, ip = np.intersect1d(np.round(g.wave, 6), np.round(prepared.wave, 6), return_indices=True)
    assert common.size > 4000
    h = 30
    np.testing.assert_allclose(g.flux[:, ig[h:-h]], ref[:, ip[h:-h]], rtol=2e-6)
    # the pipeline convolving it again to the same instrument changes nothing
    again = convolve_to_instrument(g.wave, g.flux, resolution=1000.0, template_fwhm=g.resolution_fwhm)
    np.testing.assert_array_equal(again, g.flux)
    with pytest.raises(InputError, match="below the templates' own resolution"):
        prepare_bosz_grid(tree, workers=1, resolution=4000.0)


# ------------------------------------------------------------------ cache


def test_cache_round_trip(prepared, tmp_path):
    out = write_template_cache(prepared, tmp_path / "cache")
    assert sorted(os.listdir(out)) == ["continuum.npy", "flux.npy", "grid.json", "params.npy", "wave.npy"]
    flux = np.load(os.path.join(out, "flux.npy"), allow_pickle=False)
    assert flux.dtype == np.float32
    side = json.load(open(os.path.join(out, "grid.json")))
    assert side["format"] == "gpucal-template-cache" and len(side["inputs_sha256"]) == 64
    assert side["grid"]["medium"] == "air" and side["resolution_fwhm"] == prepared.resolution_fwhm
    assert all(len(f["sha256"]) == 64 for f in side["source"]["files"]) and side["source"]["wave_file"]
    g = load_template_cache(out, verify="full")
    assert isinstance(g.flux, np.memmap) and not g.flux.flags.writeable
    np.testing.assert_array_equal(g.flux, prepared.flux)
    np.testing.assert_array_equal(g.params, prepared.params)
    assert g.resolution_fwhm == prepared.resolution_fwhm and g.meta["cache_path"] == out
    with pytest.raises(InputError, match="already exists"):
        write_template_cache(prepared, out)
    write_template_cache(prepared, out, overwrite=True)
    (tmp_path / "other").mkdir()
    with pytest.raises(InputError, match="not a gpucal template cache"):
        write_template_cache(prepared, tmp_path / "other", overwrite=True)


def test_cache_of_a_grid_not_made_from_files_round_trips(tmp_path):
    """The demo grid's meta names its source as a string: caching it and loading it back works."""
    g = demo_grid(teff=(5500.0, 6000.0), logg=(4.5,), mh=(0.0,))
    assert isinstance(g.meta.get("source"), str)
    out = write_template_cache(g, tmp_path / "demo-cache")
    back = load_template_cache(out, verify="full")
    np.testing.assert_array_equal(back.flux, np.asarray(g.flux, dtype=np.float32))
    np.testing.assert_array_equal(back.params, g.params)


def test_cache_refuses_changed_inputs(tree, tmp_path, caplog):
    root = _copy(tree, tmp_path)
    out = tmp_path / "cache"
    prepare_template_cache(root, out, workers=1, teff=(5750, 6000), logg=4.5)
    path = _model_path(root, 6000, 4.5, -0.5)
    os.utime(path, ns=(0, 10**18))  # touched, same content: still valid
    load_template_cache(out)
    raw = gzip.decompress(open(path, "rb").read()).replace(b"e+0", b"e+1", 1)
    open(path, "wb").write(gzip.compress(raw))
    with pytest.raises(StaleCacheError, match=f"changed .*{re.escape(os.path.basename(path))}.*templates prepare"):
        load_template_cache(out)
    load_template_cache(out, verify="none")
    shutil.copy(_model_path(tree, 6000, 4.5, -0.5), path)
    load_template_cache(out)
    shutil.copy(path, _model_path(root, 5900, 4.5, -0.5))
    with pytest.raises(StaleCacheError, match="new .*t5900"):
        load_template_cache(out)
    os.remove(_model_path(root, 5900, 4.5, -0.5))
    os.remove(root / bosz_wave_file_name(R))
    with pytest.raises(StaleCacheError, match="missing bosz2024_wave_r2000.txt"):
        load_template_cache(out)
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING):
        load_template_cache(out)  # a cache moved away from its source still loads
    assert "not verified" in caplog.text


def test_damaged_cache_is_an_error(prepared, tmp_path):
    out = write_template_cache(prepared, tmp_path / "cache")
    np.save(os.path.join(out, "flux.npy"), np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InputError, match="flux.npy: shape"):
        load_template_cache(out, verify="none")
    side = os.path.join(out, "grid.json")
    meta = json.load(open(side))
    meta["version"] = 99
    json.dump(meta, open(side, "w"))
    with pytest.raises(InputError, match="version 99"):
        load_template_cache(out)
    with pytest.raises(InputError, match="not a gpucal template cache"):
        load_template_cache(tmp_path)


# ------------------------------------------------------------------ command line and pipeline


def test_cli_templates_prepare(tree, tmp_path, capsys):
    from gpucal.cli import main

    out = tmp_path / "cache"
    rc = main(["templates", "prepare", str(tree), "--out", str(out), "--teff", "5750:6000", "--logg", "4.5",
               "--mh=-0.5:0", "--fwhm", "6", "--wave", "3800:9200", "--workers", "1", "--no-progress"])
    assert rc == 0
    assert "4 templates" in capsys.readouterr().out
    g = load_template_cache(out)
    assert g.n_templates == 4 and g.resolution_fwhm == 6.0 and np.all(g.params[:, 1] == 4.5)
    assert main(["templates", "prepare", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c2")]) == 2
    assert "not found" in capsys.readouterr().err


def test_load_templates_prepares_once_and_caches(tree, tmp_path, monkeypatch):
    from gpucal.templates import load_templates

    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "cache"))
    g = load_templates(str(tree), workers=1)
    assert g.n_templates == 8 and isinstance(g.flux, np.memmap)
    cache = g.meta["cache_path"]
    assert os.path.dirname(cache) == str(tmp_path / "cache")

    def refuse(*a, **k):
        raise AssertionError("prepared again although cached")

    monkeypatch.setattr(tgrid, "prepare_bosz_grid", refuse)
    assert load_templates(tree).meta["cache_path"] == cache
    assert load_templates(cache).n_templates == 8
    with pytest.raises(InputError, match="not 'demo'"):
        load_templates(str(tmp_path / "nowhere"))


def test_calibrate_end_to_end_with_a_bosz_directory(tmp_path, monkeypatch):
    from astropy.io import fits

    from gpucal.cli import main
    from gpucal.io import write_frame
    from gpucal.fitting.masks import TELLURIC_DEFAULT
    from gpucal.simulate import simulate_frame, write_catalogue_csv

    root = tmp_path / "bosz"
    write_demo_bosz_tree(root, resolution=10000, dlnlam=1.0 / 20000.0, teff=np.arange(5500.0, 6501.0, 250.0),
                         logg=(4.0, 4.5), mh=(-1.0, -0.5, 0.0, 0.5))
    sim = simulate_frame(seed=1, n_program=2, n_sky=1)
    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, sim.fibres, overwrite=True)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "calibrated.fits"
    rc = main(["calibrate", str(tmp_path / "frame.fits"), "--templates", str(root), "--photometry",
               str(tmp_path / "cat.csv"), "--fwhm", str(sim.truth["fwhm"]), "--smooth", "51", "--out", str(out),
               "--summary", str(tmp_path / "summary.json")])
    assert rc == 0
    # one prepared grid, beside the working-grid cache of the instrument setting (issue 17)
    assert len([e for e in os.listdir(tmp_path / "cache") if e != "working"]) == 1
    assert len(os.listdir(tmp_path / "cache" / "working")) >= 1
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["n_stars_used"] == 5 and summary["n_templates"] == 40
    rv = {s["name"]: s["rv"] for s in summary["stars"]}
    np.testing.assert_allclose([rv[f"STD{k + 1:03d}"] for k in range(5)], sim.truth["rv"], atol=3.0)
    with fits.open(out) as hdul:
        cal = np.asarray(hdul["FLUXCAL"].data["CAL"])
        wave = np.asarray(hdul["FLUXCAL"].data["WAVE"])
    outside = np.ones(wave.size, bool)
    for lo, hi in TELLURIC_DEFAULT:
        outside &= ~((wave >= lo) & (wave <= hi))
    rel = cal / (1.0 / sim.truth["throughput"]) - 1.0
    assert np.sqrt(np.mean(rel[outside] ** 2)) < 0.01
    assert abs(np.median(rel[outside])) < 0.005


def test_stale_cache_error_is_an_input_error_everywhere_it_is_imported():
    import gpucal.templates as tpkg

    assert issubclass(StaleCacheError, InputError)
    assert tgrid.StaleCacheError is tpkg.StaleCacheError is StaleCacheError

"""FITS template grids (issue 15): the generic layout, SDSS's Kurucz file, grids that are not full cubes,
and the grid window that follows a broad LSF on a BOSZ directory."""

import itertools
import json
import os

import numpy as np
import pytest
from astropy.io import fits

from gpucal.backends import to_numpy
from gpucal.errors import InputError
from gpucal.fitting.prepare import grid_neighbours
from gpucal.templates import demo_grid, load_templates, read_fits_grid, write_demo_bosz_tree, write_fits_grid
from gpucal.units import vacuum_to_air

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
KURUCZ = os.path.join(DATA, "kurucz_stds_v5.fit")
needs_kurucz = pytest.mark.skipif(not os.path.isfile(KURUCZ), reason=f"{KURUCZ} not present (../shared/data)")


@needs_kurucz
def test_kurucz_file_is_read_with_its_layout():
    g = read_fits_grid(KURUCZ)
    assert g.layout == "sdss-kurucz" and g.medium == "vacuum" and g.resolution_fwhm == "R:1800.0"
    assert g.flux.shape[0] == 89 and g.params.shape == (89, 4) and np.all(g.params[:, 3] == 0.0)
    with fits.open(KURUCZ) as h:  # oracle: the header's log10 WCS and idlspec2d's Legendre correction
        raw = np.asarray(h[0].data, dtype=np.float64)
        w_all = 10.0 ** (h[0].header["CRVAL1"] + h[0].header["CD1_1"] * np.arange(raw.shape[1]))
        row = h[2].data[0]
        corr = np.polynomial.Legendre(row["COEFF"], domain=[row["XMIN"], row["XMAX"]])(w_all)
        teff, logg, feh = (np.asarray(h[1].data[c], dtype=np.float64) for c in ("TEFF", "G", "FEH"))
    keep = np.all(raw > 0, axis=0)  # the file's zero-flux end pixels are cut
    np.testing.assert_allclose(g.wave, w_all[keep], rtol=1e-12)
    np.testing.assert_allclose(g.flux, (raw / corr)[:, keep], rtol=1e-6)
    np.testing.assert_array_equal(g.params[:, :3], np.stack([teff, logg, feh], axis=1))
    cube = set(itertools.product(np.unique(teff), np.unique(logg), np.unique(feh)))
    have = {tuple(p) for p in g.params[:, :3].tolist()}
    assert cube - have == {(5000.0, 4.5, -0.5)}  # the node the file lacks


@needs_kurucz
def test_kurucz_grid_prepared_in_air_through_the_cache(tmp_path):
    grid = load_templates(KURUCZ, wave_range=(3600.0, 7400.0), medium="air", cache_dir=str(tmp_path))
    assert grid.n_templates == 89 and grid.medium == "air" and isinstance(grid.flux, np.memmap)
    assert os.path.basename(grid.meta["cache_path"]).startswith("fits-")
    assert grid.meta["source"]["layout"] == "sdss-kurucz"
    np.testing.assert_allclose(np.diff(np.log(grid.wave)), 1e-4 * np.log(10.0), rtol=1e-9)
    g = read_fits_grid(KURUCZ)  # the vacuum file moved to air: a flux feature stays at its air wavelength
    k = 40
    i_src = int(np.argmin(g.flux[k][(g.wave > 6555) & (g.wave < 6575)])) + int(np.argmax(g.wave > 6555))
    i_out = int(np.argmin(np.asarray(grid.flux[k])[(grid.wave > 6550) & (grid.wave < 6570)]))
    w_out = grid.wave[(grid.wave > 6550) & (grid.wave < 6570)][i_out]
    assert abs(w_out - vacuum_to_air(np.array([g.wave[i_src]]))[0]) < 1.5 * 6563 * 1e-4 * np.log(10)
    again = load_templates(KURUCZ, wave_range=(3600.0, 7400.0), medium="air", cache_dir=str(tmp_path))
    assert again.meta["cache_path"] == grid.meta["cache_path"]
    assert len(os.listdir(tmp_path)) == 1


def _small_grid():
    return demo_grid(teff=(5500.0, 5750.0, 6000.0, 6250.0, 6500.0), logg=(4.0, 4.5), mh=(-0.5, 0.0), alpha=(0.0,),
                     wave_range=(3000.0, 11000.0), dlnlam=1.0 / 8000.0)


@pytest.mark.parametrize("wcs", [None, "log10", "linear"])
def test_generic_grid_round_trip(tmp_path, wcs):
    g = _small_grid()
    wave = np.asarray(g.wave)
    if wcs == "linear":
        wave = np.linspace(wave[0], wave[-1], wave.size)
    path = write_fits_grid(tmp_path / "grid.fits", wave, np.asarray(g.flux), g.params, medium="air", wcs=wcs, fwhm=0.5)
    back = read_fits_grid(path)
    assert back.medium == "air" and back.layout == "generic" and back.resolution_fwhm == 0.5
    np.testing.assert_allclose(back.wave, wave, rtol=1e-9)
    np.testing.assert_allclose(back.flux, np.asarray(g.flux, dtype=np.float32), rtol=1e-6)
    np.testing.assert_array_equal(back.params, g.params)


def test_generic_grid_without_a_medium_is_refused(tmp_path):
    g = _small_grid()
    path = write_fits_grid(tmp_path / "grid.fits", g.wave, g.flux, g.params, medium="air")
    with fits.open(path, mode="update") as h:
        del h[0].header["AIRORVAC"]
    with pytest.raises(InputError, match="medium is not stated.*AIRORVAC"):
        read_fits_grid(path)


def test_grid_neighbours_never_point_at_a_missing_node(xp):
    params = np.array([p for p in itertools.product((5500.0, 5750.0, 6000.0), (4.0, 4.5), (-0.5, 0.0), (0.0,))
                       if p != (5750.0, 4.0, 0.0, 0.0)])
    assert params.shape == (11, 4)
    nb = to_numpy(grid_neighbours(xp.asarray(params)))
    rows = {tuple(r): i for i, r in enumerate(params.tolist())}
    axes = [np.unique(params[:, j]) for j in range(4)]
    for t, r in enumerate(params.tolist()):  # brute-force oracle: the adjacent axis value, if that node exists
        for j in range(4):
            k = int(np.searchsorted(axes[j], r[j]))
            for side, dk in enumerate((-1, 1)):
                want = -1
                if 0 <= k + dk < axes[j].size:
                    want = rows.get(tuple(r[:j] + [float(axes[j][k + dk])] + r[j + 1:]), -1)
                assert nb[t, j, side] == want
    assert nb[rows[(5750.0, 4.5, 0.0, 0.0)], 1, 0] == -1  # below it along logg is the missing node
    assert nb[rows[(5500.0, 4.0, 0.0, 0.0)], 0, 1] == -1  # above it along Teff likewise


def test_generic_grid_with_a_missing_node_calibrates(tmp_path, monkeypatch):
    from gpucal.io import write_frame
    from gpucal.pipeline import calibrate_frame
    from gpucal.simulate import simulate_frame, write_catalogue_csv

    g = _small_grid()
    missing = (6000.0, 4.0, 0.0, 0.0)  # the Teff/logg neighbour of two standards
    keep = ~np.all(g.params == np.array(missing), axis=1)
    path = write_fits_grid(tmp_path / "grid.fits", g.wave, np.asarray(g.flux)[keep], g.params[keep], medium="air")
    stars = [(6000.0, 4.5, 0.0, 0.0), (6250.0, 4.0, -0.5, 0.0), (5750.0, 4.0, 0.0, 0.0)]
    sim = simulate_frame(seed=3, n_standards=3, n_program=1, n_sky=1, params=stars, n_pix=2500)
    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "cache"))
    res = calibrate_frame(str(tmp_path / "frame.fits"), templates=str(path), photometry=str(tmp_path / "cat.csv"),
                          fwhm=sim.truth["fwhm"], smooth=51)
    assert res.summary["n_templates"] == int(keep.sum()) == 19
    assert res.summary["n_stars_used"] == 3
    rel = res.cal * sim.truth["throughput"] - 1.0
    assert np.sqrt(np.mean(rel[res.measured] ** 2)) < 0.01
    tab = res.per_star
    teff = {str(n): float(t) for n, t in zip(tab["NAME"], tab["TEFF"])}
    logg = {str(n): float(t) for n, t in zip(tab["NAME"], tab["LOGG"])}
    for k, p in enumerate(stars):  # no blend toward the node that is not there
        assert abs(teff[f"STD{k + 1:03d}"] - p[0]) < 100.0 and abs(logg[f"STD{k + 1:03d}"] - p[1]) < 0.2


def test_broad_lsf_on_a_bosz_directory(tmp_path, monkeypatch):
    """`--fwhm 15` with BOSZ spectra covering 3020-10980 Å: the on-the-fly window follows the LSF (issue 15)."""
    from gpucal.cli import main
    from gpucal.io import write_frame
    from gpucal.simulate import simulate_frame, write_catalogue_csv

    root = tmp_path / "bosz"
    write_demo_bosz_tree(root, resolution=2000, dlnlam=1.0 / 6000.0, teff=(5750.0, 6000.0, 6250.0), logg=(4.0, 4.5),
                         mh=(-0.5, 0.0), wave_range=(3020.0, 10980.0))
    stars = [(6000.0, 4.5, 0.0, 0.0), (6250.0, 4.0, -0.5, 0.0), (5750.0, 4.5, 0.0, 0.0)]
    sim = simulate_frame(seed=2, n_standards=3, n_program=1, n_sky=1, params=stars, fwhm=15.0,
                         wave_range=(3700.0, 9500.0), n_pix=1500)
    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUCAL_BACKEND", "numpy")
    rc = main(["calibrate", str(tmp_path / "frame.fits"), "--templates", str(root), "--photometry",
               str(tmp_path / "cat.csv"), "--fwhm", "15", "--smooth", "51", "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.load(open(tmp_path / "s.json"))
    assert summary["n_stars_used"] == 3
    grid = load_templates(str(root), wave_range=(float(sim.wave[0]), float(sim.wave[-1])),
                          lsf={"fwhm": 15.0, "fwhm_poly": None, "resolution": None})
    six_sigma = 6.0 * 15.0 / 2.3548200450309493
    assert grid.wave[0] <= sim.wave[0] / 1.0017 - six_sigma and grid.wave[-1] >= sim.wave[-1] * 1.0017 + six_sigma


MILES = os.path.join(DATA, "miles_fgk")
_MILES_STARS = ("0248", "0180", "0862", "0437")  # F/G dwarfs, Teff 5860-6400 K, inside the Kurucz grid


@needs_kurucz
@pytest.mark.skipif(not os.path.isdir(MILES), reason=f"{MILES} not present (../shared/data)")
def test_kurucz_grid_calibrates_miles_stars_through_a_throughput(tmp_path, monkeypatch):
    """`--templates kurucz_stds_v5.fit` on real MILES stars observed through a structured throughput."""
    import speclite.filters
    import astropy.units as u
    from astropy.table import Table
    from scipy.ndimage import gaussian_filter1d

    from gpucal.cli import main
    from gpucal.io import write_frame

    flux = []
    for sid in _MILES_STARS:
        with fits.open(os.path.join(MILES, f"MILES_res2.50_star_m{sid}V.fits")) as h:
            f = np.asarray(h[0].data, dtype=np.float64)
            wave = h[0].header["CRVAL1"] + h[0].header["CDELT1"] * np.arange(f.size)
        flux.append(gaussian_filter1d(f, np.sqrt(6.5**2 - 2.5**2) / 2.3548 / 0.9))  # 2.5 Å -> 6.5 Å FWHM
    sel = (wave > 3700) & (wave < 7300)
    wave, flux = wave[sel], np.array(flux)[:, sel]
    filt = speclite.filters.load_filters("panstarrs-g", "panstarrs-r")
    r = np.asarray(filt.get_ab_magnitudes(flux * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA)["panstarrs-r"])
    flux = flux * 10 ** (-0.4 * (15.0 - r))[:, None] / 1e-13  # r = 15, in units of 1e-13 erg/s/cm²/Å
    mags = filt.get_ab_magnitudes(flux * 1e-13 * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA)
    throughput = 3e4 * np.exp(-0.5 * (np.log(wave / 5600.0) / 0.25) ** 2) * (1 + 0.03 * np.sin(wave / 230.0))
    counts = flux * throughput  # counts per pixel; Cal = 1e-13 / throughput
    rng = np.random.default_rng(5)
    var = counts + 25.0
    counts = counts + rng.standard_normal(counts.shape) * np.sqrt(var)
    names = [f"M{sid}" for sid in _MILES_STARS]
    fibres = Table({"NAME": names, "TYPE": ["C"] * 4, "RA": 150.0 + 0.01 * np.arange(4), "DEC": np.full(4, 2.0)})
    write_frame(tmp_path / "miles.fits", counts, var, wave, fibres, medium="air")
    cat = Table({"name": names, "ra": fibres["RA"], "dec": fibres["DEC"], "g": mags["panstarrs-g"],
                 "dg": np.full(4, 0.01), "r": mags["panstarrs-r"], "dr": np.full(4, 0.01)})
    cat.write(tmp_path / "cat.csv", format="ascii.csv")
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("GPUCAL_BACKEND", "numpy")
    rc = main(["calibrate", str(tmp_path / "miles.fits"), "--templates", KURUCZ, "--photometry",
               str(tmp_path / "cat.csv"), "--fwhm", "6.5", "--smooth", "101", "--out", str(tmp_path / "cal.fits"),
               "--summary", str(tmp_path / "s.json")])
    assert rc == 0
    summary = json.load(open(tmp_path / "s.json"))
    assert summary["n_templates"] == 89 and summary["n_stars_used"] >= 3
    with fits.open(tmp_path / "cal.fits") as h:
        cal, measured = np.asarray(h["FLUXCAL"].data["CAL"]), np.asarray(h["FLUXCAL"].data["MEASURED"])
    rel = cal * throughput / 1e-13
    shape = rel[measured] / np.median(rel[measured])
    print("MILES through Kurucz: level", np.median(rel[measured]), "shape RMS", np.std(shape))
    assert abs(np.median(rel[measured]) - 1.0) < 0.03  # level through the stars' own g, r
    assert np.sqrt(np.mean((shape - 1.0) ** 2)) < 0.03  # shape: MILES' own relative calibration is a few %


def test_fits_grid_prepared_convolved_by_the_cli_and_stale_caches_prepared_again(tmp_path, capsys):
    from scipy.ndimage import gaussian_filter1d

    from gpucal.cli import main
    from gpucal.templates import load_template_cache

    g = _small_grid()
    path = write_fits_grid(tmp_path / "grid.fits", g.wave, g.flux, g.params, medium="air")
    rc = main(["templates", "prepare", str(path), "--out", str(tmp_path / "c"), "--fwhm", "6", "--wave", "4000:9000",
               "--teff", "5750:6250", "--logg", "4.5", "--no-progress", "--backend", "numpy"])
    assert rc == 0 and "6 templates" in capsys.readouterr().out
    c = load_template_cache(tmp_path / "c")
    assert c.resolution_fwhm == 6.0 and c.meta["lsf"]["convolved"] and np.all(c.params[:, 1] == 4.5)
    k = int(np.flatnonzero(np.all(g.params == c.params[0], axis=1))[0])  # oracle: scipy, σ constant in Å ≈ pixels
    sel = (c.wave > 6400) & (c.wave < 6700)
    sigma_pix = 6.0 / 2.3548200450309493 / (6550.0 / 8000.0)
    ref = gaussian_filter1d(np.interp(c.wave, g.wave, np.asarray(g.flux[k])), sigma_pix)
    np.testing.assert_allclose(np.asarray(c.flux[0])[sel], ref[sel], rtol=3e-3)
    assert main(["templates", "prepare", str(path), "--out", str(tmp_path / "d"), "--carbon", "0",
                 "--no-progress"]) == 2
    assert "carbon select BOSZ files; a FITS grid has no such parameter" in capsys.readouterr().err
    first = load_templates(str(path), cache_dir=str(tmp_path / "cache"))
    write_fits_grid(path, g.wave, 2.0 * np.asarray(g.flux), g.params, medium="air", overwrite=True)
    second = load_templates(str(path), cache_dir=str(tmp_path / "cache"))  # the file changed: prepared again
    assert second.meta["cache_path"] == first.meta["cache_path"]
    np.testing.assert_allclose(np.asarray(second.flux), 2.0 * np.asarray(first.flux), rtol=1e-6)

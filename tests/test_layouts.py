"""Frames and side inputs as other pipelines write them (issue 15): catalogue formats, fibre-table magnitudes,
spectral WCS variants, the wavelength medium, the DESI-style layout, the real BOSZ 2024 files."""

import logging
import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpucal.errors import InputError
from gpucal.io import read_frame, write_frame
from gpucal.photometry import match_photometry, read_catalogue
from gpucal.simulate import simulate_frame, write_catalogue_csv
from test_options import grid  # noqa: F401 -- the 30 demo F/G dwarf templates: a calibration takes about a second

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(scope="module")
def sim():
    return simulate_frame(seed=4, n_standards=3, n_program=2, n_sky=1, n_pix=1500, snr=80.0, fwhm=8.0,
                          params=[(6000.0, 4.5, 0.0, 0.0), (6250.0, 4.0, -0.5, 0.0), (5750.0, 4.5, 0.0, 0.0)])


def _std_coords(sim):
    rows = np.asarray(sim.truth["std_fibres"])
    f = sim.fibres[rows]
    return tuple(str(n) for n in f["NAME"]), np.asarray(f["RA"], float), np.asarray(f["DEC"], float)


@pytest.mark.parametrize("fmt, name", [("ascii.ecsv", "cat.ecsv"), ("fits", "cat.fits"), ("votable", "cat.vot"),
                                       ("ascii.ecsv", "cat.dat")])
def test_catalogue_formats_read_like_the_csv(sim, tmp_path, fmt, name):
    csv = write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    Table(sim.catalogue).write(tmp_path / name, format=fmt)
    names, ra, dec = _std_coords(sim)
    want, _ = match_photometry(read_catalogue(csv), names, ra, dec)
    got, info = match_photometry(read_catalogue(str(tmp_path / name)), names, ra, dec)
    np.testing.assert_allclose(got.mag, want.mag, rtol=0, atol=1e-6)  # the CSV holds 6 decimals
    np.testing.assert_allclose(got.err, want.err, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got.valid, want.valid)
    np.testing.assert_allclose(got.mag, np.asarray(sim.truth["mags"]), atol=1e-6)


def test_unreadable_catalogue_names_its_format(tmp_path):
    bad = tmp_path / "cat.fits"
    bad.write_text("name,ra,dec\n")
    with pytest.raises(InputError, match=r"cat.fits: cannot read as a FITS table"):
        read_catalogue(str(bad))


def test_fibre_table_magnitudes_stand_in_for_a_catalogue(sim, tmp_path, monkeypatch, grid):
    from gpucal.pipeline import calibrate_frame

    fibres = Table(sim.fibres, copy=True)
    rows = np.asarray(sim.truth["std_fibres"])
    for band in "griz":  # the catalogue's columns, in the standards' rows (its rows are in truth order)
        mag, err = np.full(len(fibres), 99.0), np.full(len(fibres), 9.99)  # Refcat2 sentinels elsewhere
        mag[rows], err[rows] = sim.catalogue[band], sim.catalogue[f"d{band}"]
        fibres[band], fibres[f"d{band}"] = mag, err
    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, fibres, medium="air")
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    with_cat = calibrate_frame(str(tmp_path / "frame.fits"), templates=grid, photometry=str(tmp_path / "cat.csv"),
                               fwhm=sim.truth["fwhm"], smooth=51)
    alone = calibrate_frame(str(tmp_path / "frame.fits"), templates=grid, fwhm=sim.truth["fwhm"], smooth=51)
    assert alone.summary["n_stars_used"] == 3
    assert set(np.asarray(alone.per_star["PHOT_MATCH"]).tolist()) == {"fibres"}
    np.testing.assert_allclose(alone.cal, with_cat.cal, rtol=2e-5)  # the same magnitudes, 6 decimals in the CSV
    rel = alone.cal * sim.truth["throughput"] - 1.0
    assert np.sqrt(np.mean(rel[alone.measured] ** 2)) < 0.01


def test_no_catalogue_and_no_fibre_magnitudes_says_what_to_give(sim, tmp_path, grid):
    from gpucal.errors import PhotometryError
    from gpucal.pipeline import calibrate_frame

    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, sim.fibres, medium="air")
    with pytest.raises(PhotometryError, match="--photometry CATALOGUE, or give magnitude columns"):
        calibrate_frame(str(tmp_path / "frame.fits"), templates=grid, fwhm=sim.truth["fwhm"])


def _log_frame(sim, tmp_path, name, cards, log10=True):
    """The simulated frame resampled onto a log-uniform grid, written with a log-linear WCS of ``cards``."""
    lw = np.linspace(np.log10(sim.wave[0]), np.log10(sim.wave[-1]), sim.wave.size)
    wave = 10.0 ** lw
    flux = np.array([np.interp(wave, sim.wave, f) for f in sim.flux])
    var = np.array([np.interp(wave, sim.wave, v) for v in sim.var])
    hdr = fits.Header()
    for k, v in cards(lw, wave).items():
        hdr[k] = v
    write_frame(tmp_path / name, flux, var, wave, sim.fibres, header=hdr)
    with fits.open(tmp_path / name, mode="update") as h:  # WCS only: no WAVELA
        del h["WAVELA"]
    return wave


@pytest.mark.parametrize("kind", ["iraf-dc-flag", "wave-log", "awav-log-nm", "sdss-coeff"])
def test_log_linear_wcs_frame(sim, tmp_path, kind):
    from astropy.wcs import WCS

    d = lambda lw: float(lw[1] - lw[0])  # noqa: E731
    cards = {
        "iraf-dc-flag": lambda lw, w: {"CRVAL1": float(lw[0]), "CD1_1": d(lw), "CRPIX1": 1, "CTYPE1": "LINEAR",
                                       "DC-FLAG": 1, "AIRORVAC": "air"},
        "sdss-coeff": lambda lw, w: {"COEFF0": float(lw[0]), "COEFF1": d(lw), "AIRORVAC": "vac"},
        # FITS paper III: λ = CRVAL e^{w/CRVAL}, w = CDELT (p − CRPIX); CDELT = CRVAL ln(10) Δlog10 λ
        "wave-log": lambda lw, w: {"CTYPE1": "WAVE-LOG", "CRVAL1": float(w[0]), "CRPIX1": 1.0,
                                   "CDELT1": float(w[0]) * np.log(10.0) * d(lw), "CUNIT1": "Angstrom"},
        "awav-log-nm": lambda lw, w: {"CTYPE1": "AWAV-LOG", "CRVAL1": float(w[0]) / 10, "CRPIX1": 1.0,
                                      "CDELT1": float(w[0]) / 10 * np.log(10.0) * d(lw), "CUNIT1": "nm"},
    }[kind]
    wave = _log_frame(sim, tmp_path, "log.fits", cards)
    frame = read_frame(tmp_path / "log.fits")
    assert frame.medium == {"iraf-dc-flag": "air", "sdss-coeff": "vacuum", "wave-log": "vacuum",
                            "awav-log-nm": "air"}[kind]
    assert frame.medium_stated and frame.wave_source == "wcs"
    np.testing.assert_allclose(frame.wave, wave, rtol=1e-10)
    if kind in ("wave-log", "awav-log-nm"):  # oracle: astropy.wcs on the header itself
        with fits.open(tmp_path / "log.fits") as h:
            w = WCS(h[0].header, naxis=[1]).spectral
            np.testing.assert_allclose(frame.wave, w.pixel_to_world(np.arange(wave.size)).to_value("Angstrom"),
                                       rtol=1e-10)


def test_log_linear_wcs_frame_calibrates(sim, tmp_path, monkeypatch, grid):
    from gpucal.pipeline import calibrate_frame

    cards = lambda lw, w: {"CRVAL1": float(lw[0]), "CD1_1": float(lw[1] - lw[0]), "CRPIX1": 1,  # noqa: E731
                           "DC-FLAG": 1, "AIRORVAC": "air"}
    wave = _log_frame(sim, tmp_path, "log.fits", cards)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    # The node path: this test is about the WCS. The continuous fit on this broad-LSF (8 Å) frame
    # is the strict xfail below (issue 14 is still open for it).
    res = calibrate_frame(str(tmp_path / "log.fits"), templates=grid, photometry=str(tmp_path / "cat.csv"),
                          fwhm=sim.truth["fwhm"], smooth=51, out=tmp_path / "out.fits", fit="nodes")
    rel = res.cal * np.interp(wave, sim.wave, sim.truth["throughput"]) - 1.0
    assert np.sqrt(np.mean(rel[res.measured] ** 2)) < 0.01  # 0.34 % measured
    with fits.open(tmp_path / "out.fits") as h:  # the log WCS kept: it still describes the output's pixels
        assert h[0].header["DC-FLAG"] == 1 and "WAVELA" not in h
        np.testing.assert_allclose(read_frame(tmp_path / "out.fits", require_standards=False).wave, wave, rtol=1e-12)


@pytest.mark.xfail(strict=True, reason="issue 14: on this 8 Å-FWHM frame RESAMPLED by linear interpolation onto a "
                   "log grid the continuous fit's vector is 1.0 % RMS off (the node path: 0.34 %); on the same "
                   "frame before resampling the fit gets 0.35 % and the node path 0.83 %: the interpolation "
                   "smooths the spectra by a pixel-dependent kernel the forward model does not know")
def test_continuous_fit_on_a_broad_lsf_frame(sim, tmp_path, grid):
    from gpucal.pipeline import calibrate_frame

    cards = lambda lw, w: {"CRVAL1": float(lw[0]), "CD1_1": float(lw[1] - lw[0]), "CRPIX1": 1,  # noqa: E731
                           "DC-FLAG": 1, "AIRORVAC": "air"}
    wave = _log_frame(sim, tmp_path, "log.fits", cards)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    res = calibrate_frame(str(tmp_path / "log.fits"), templates=grid, photometry=str(tmp_path / "cat.csv"),
                          fwhm=sim.truth["fwhm"], smooth=51, fit="continuous")
    rel = res.cal * np.interp(wave, sim.wave, sim.truth["throughput"]) - 1.0
    assert np.sqrt(np.mean(rel[res.measured] ** 2)) < 0.005


def test_unknown_medium_warns_and_medium_option_decides(sim, tmp_path, caplog, grid):
    from gpucal.cli import main
    from gpucal.pipeline import calibrate_frame

    write_frame(tmp_path / "f.fits", sim.flux, sim.var, sim.wave, sim.fibres)  # no WAVEMED, no CTYPE1
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    frame = read_frame(tmp_path / "f.fits")
    assert frame.medium == "air" and not frame.medium_stated
    kw = dict(photometry=str(tmp_path / "cat.csv"), fwhm=sim.truth["fwhm"], vrange=(-200.0, 200.0, 5.0))
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        air = calibrate_frame(str(tmp_path / "f.fits"), templates=grid, **kw)
    assert any("do not say whether the wavelengths are in air or vacuum" in r.getMessage() and "--medium" in
               r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        vac = calibrate_frame(str(tmp_path / "f.fits"), templates=grid, medium="vacuum", **kw)
        stated = calibrate_frame(str(tmp_path / "f.fits"), templates=grid, medium="air", **kw)
    assert not any("air or vacuum" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(stated.cal, air.cal)
    rv_air, rv_vac = np.asarray(air.per_star["RV"]), np.asarray(vac.per_star["RV"])
    # the frame taken as vacuum moves to air ~1.6 Å bluer at 6000 Å: every star ~ -82 km/s (n = 1.00028)
    assert np.all(np.abs(rv_vac - rv_air + 82.0) < 10.0)
    write_frame(tmp_path / "g.fits", sim.flux, sim.var, sim.wave, sim.fibres, medium="air")
    rc = main(["calibrate", str(tmp_path / "g.fits"), "--photometry", str(tmp_path / "cat.csv"), "--fwhm", "8",
               "--medium", "vacuum", "--backend", "numpy"])
    assert rc == 2 and not os.path.exists(tmp_path / "g_fluxcal.fits")


def _desi_fibermap(sim, objtype=True):
    f = sim.fibres
    typ = np.asarray(f["TYPE"]).astype(str)
    cols = {"TARGETID": 39627000000 + np.arange(len(f)), "TARGET_RA": np.asarray(f["RA"]),
            "TARGET_DEC": np.asarray(f["DEC"]), "NAME": np.asarray(f["NAME"]).astype(str)}
    if objtype:
        cols["OBJTYPE"] = np.array([{"C": "STD", "P": "TGT", "S": "SKY"}[t] for t in typ])
    else:
        cols["IS_STD"] = typ == "C"
    return Table(cols)


@pytest.mark.parametrize("objtype", [True, False])
def test_desi_frame_in_and_out(sim, tmp_path, objtype, grid):
    from gpucal.io import write_desi_frame
    from gpucal.pipeline import calibrate_frame

    n_fibre, n_pix = sim.flux.shape
    ivar = 1.0 / sim.var
    mask = np.zeros(sim.flux.shape, dtype=np.int32)
    mask[0, 100:110] = 4  # a masked stretch in one fibre
    resolution = np.tile(np.array([0.05, 0.25, 0.4, 0.25, 0.05])[None, :, None], (n_fibre, 1, n_pix))
    hdr = fits.Header()
    hdr["AIRORVAC"] = "air"
    write_desi_frame(tmp_path / "desi.fits", sim.flux, ivar, sim.wave, _desi_fibermap(sim, objtype), mask=mask,
                     resolution=resolution, header=hdr)
    frame = read_frame(tmp_path / "desi.fits")
    assert frame.layout == "desi" and frame.medium == "air" and frame.medium_stated
    np.testing.assert_array_equal(np.sort(frame.standards), np.sort(np.asarray(sim.truth["std_fibres"])))
    assert frame.resolution.shape == (n_fibre, 5, n_pix)
    assert np.all(np.isinf(frame.var[0, 100:110]))  # MASK != 0: a bad pixel
    np.testing.assert_allclose(frame.var[1], (1.0 / np.float32(ivar[1])).astype(float), rtol=1e-6)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    res = calibrate_frame(str(tmp_path / "desi.fits"), templates=grid, photometry=str(tmp_path / "cat.csv"),
                          fwhm=sim.truth["fwhm"], smooth=51, out=tmp_path / "out.fits")
    # the same frame in gpucal's own layout gives the same calibration
    write_frame(tmp_path / "plain.fits", sim.flux.astype(np.float32), (1.0 / ivar.astype(np.float32)), sim.wave,
                sim.fibres, medium="air")
    plain = calibrate_frame(str(tmp_path / "plain.fits"), templates=grid, photometry=str(tmp_path / "cat.csv"),
                            fwhm=sim.truth["fwhm"], smooth=51)
    np.testing.assert_allclose(res.cal, plain.cal, rtol=1e-4)
    with fits.open(tmp_path / "out.fits") as h:
        assert [x.name for x in h] == ["FLUX", "IVAR", "MASK", "WAVELENGTH", "RESOLUTION", "FIBERMAP", "FLUXCAL",
                                       "FLUXSTD", "FCALMASK", "PROVENANCE"]  # gpucal's bits beside DESI's MASK
        np.testing.assert_allclose(h["FLUX"].data, res.flux, rtol=1e-12, equal_nan=True)
        good = np.isfinite(res.var) & (res.var > 0)
        np.testing.assert_allclose(h["IVAR"].data[good], 1.0 / res.var[good], rtol=1e-12)
        assert np.all(h["IVAR"].data[~good] == 0)
        assert np.all(h["MASK"].data[0, 100:110] == 4) and np.all(h["MASK"].data[~good & (mask == 0)] == 1)
        np.testing.assert_array_equal(h["WAVELENGTH"].data, sim.wave)
        np.testing.assert_allclose(h["RESOLUTION"].data, resolution, rtol=1e-7)
        assert list(h["FIBERMAP"].columns.names) == list(_desi_fibermap(sim, objtype).colnames)
        assert "FLUXCAL" in h[0].header.get("HISTORY", "") or any(k.startswith("FLUXCAL") for k in h[0].header)
    from gpucal.io import read_calibrated_frame

    again = read_calibrated_frame(tmp_path / "out.fits")  # the output reads back as a DESI frame
    np.testing.assert_allclose(again.flux, res.flux, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(np.asarray(again.cal["CAL"]), res.cal, rtol=1e-12)


def test_desi_frame_without_standards_column_is_refused(sim, tmp_path):
    from gpucal.io import write_desi_frame

    fm = _desi_fibermap(sim).copy()
    fm.remove_column("OBJTYPE")
    write_desi_frame(tmp_path / "d.fits", sim.flux, 1.0 / sim.var, sim.wave, fm)
    with pytest.raises(InputError, match=r"d.fits \[FIBERMAP\]: no OBJTYPE column and no standards column"):
        read_frame(tmp_path / "d.fits")


BOSZ2024 = os.path.join(DATA, "bosz2024")


@pytest.mark.skipif(not os.path.isdir(BOSZ2024), reason=f"{BOSZ2024} not present (../shared/data)")
def test_real_bosz2024_files_are_read(tmp_path):
    """The real release files: one-decimal logg, ``v2`` in the names, the real shared wavelength files."""
    from gpucal.templates import index_bosz, load_templates, read_bosz_spectrum, read_wave_file

    ix = index_bosz(BOSZ2024)
    assert ix.resolution == 5000 and os.path.basename(ix.wave_file) == "bosz2024_wave_r5000.txt"
    assert [m.params for m in ix.models] == [(4750.0, 4.5, 0.0, 0.0), (6000.0, 4.0, 0.0, 0.0)]
    assert {m.vturb for m in ix.models} == {2.0}
    for r in (500, 2000, 5000):  # README: λ_i = exp(ln 500 + i ln 640 / (15 R)) to 5e-8
        w = read_wave_file(os.path.join(BOSZ2024, f"bosz2024_wave_r{r}.txt"))
        np.testing.assert_allclose(w, np.exp(np.log(500.0) + np.arange(w.size) * np.log(640.0) / (15 * r)), rtol=5e-8)
    wave = read_wave_file(ix.wave_file)
    for m in ix.models:
        s = read_bosz_spectrum(m.path, wave=wave, wave_file=ix.wave_file)
        assert abs(np.trapezoid(s.flux, s.wave) / (5.670374419e-5 * m.teff ** 4) - 1.0) < 0.01  # F = σT⁴
        sel = (s.wave > 6550) & (s.wave < 6575)
        assert abs(s.wave[sel][np.argmin(s.flux[sel] / s.continuum[sel])] - 6562.8) < 0.5  # Hα, air
    grid = load_templates(BOSZ2024, wave_range=(3700.0, 9500.0), cache_dir=str(tmp_path),
                          lsf={"fwhm": 15.0, "fwhm_poly": None, "resolution": None})
    assert grid.n_templates == 2 and grid.resolution_fwhm == "R:5000.0"
    assert grid.wave[0] < 3700.0 / 1.0017 - 38.2 and grid.wave[-1] > 9500.0 * 1.0017 + 38.2


def test_desi_fibermap_fluxes_stand_in_for_a_catalogue(sim, tmp_path, grid):
    """No --photometry: DESI FIBERMAP FLUX_G/R/Z (nanomaggies, PHOTSYS S = DECam) become the magnitudes."""
    import astropy.units as u
    import speclite.filters

    from gpucal.io import write_desi_frame
    from gpucal.pipeline import calibrate_frame
    from gpucal.templates import demo_template
    from gpucal.units import C_KMS

    filt = speclite.filters.load_filters("decam2014-g", "decam2014-r", "decam2014-z")
    w = np.linspace(3000.0, 11000.0, 40000)
    rows = np.asarray(sim.truth["std_fibres"])
    fm = _desi_fibermap(sim)
    flux = {b: np.zeros(len(fm)) for b in "GRZ"}
    for k, (p, v, dil) in enumerate(zip(sim.truth["params"], sim.truth["rv"], sim.truth["dilution"])):
        f = dil * demo_template(*p, wave=w / (1.0 + v / C_KMS))  # as simulate_frame: λ_obs = λ_rest (1 + v/c)
        m = filt.get_ab_magnitudes(f * u.erg / u.s / u.cm**2 / u.AA, w * u.AA)
        for b in "GRZ":
            flux[b][rows[k]] = 10 ** ((22.5 - float(m[f"decam2014-{b.lower()}"][0])) / 2.5)
    for b in "GRZ":
        fm[f"FLUX_{b}"] = flux[b]
        fm[f"FLUX_IVAR_{b}"] = np.where(flux[b] > 0, 1.0 / (0.01 * np.log(10) / 2.5 * flux[b] + 1e-30) ** 2, 0.0)
    fm["PHOTSYS"] = "S"
    hdr = fits.Header()
    hdr["AIRORVAC"] = "air"
    write_desi_frame(tmp_path / "desi.fits", sim.flux, 1.0 / sim.var, sim.wave, fm, header=hdr)
    res = calibrate_frame(str(tmp_path / "desi.fits"), templates=grid, fwhm=sim.truth["fwhm"], smooth=51)
    assert res.summary["n_stars_used"] == 3 and set(np.asarray(res.per_star["PHOT_MATCH"]).tolist()) == {"fibres"}
    rel = res.cal * sim.truth["throughput"] - 1.0
    assert np.sqrt(np.mean(rel[res.measured] ** 2)) < 0.01

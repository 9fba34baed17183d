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


def test_fibre_table_magnitudes_stand_in_for_a_catalogue(sim, tmp_path, monkeypatch):
    from gpucal.pipeline import calibrate_frame

    fibres = Table(sim.fibres, copy=True)
    rows = np.asarray(sim.truth["std_fibres"])
    for band in "griz":  # the catalogue's columns, in the standards' rows (its rows are in truth order)
        mag, err = np.full(len(fibres), 99.0), np.full(len(fibres), 9.99)  # Refcat2 sentinels elsewhere
        mag[rows], err[rows] = sim.catalogue[band], sim.catalogue[f"d{band}"]
        fibres[band], fibres[f"d{band}"] = mag, err
    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, fibres, medium="air")
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    with_cat = calibrate_frame(str(tmp_path / "frame.fits"), photometry=str(tmp_path / "cat.csv"),
                               fwhm=sim.truth["fwhm"], smooth=51)
    alone = calibrate_frame(str(tmp_path / "frame.fits"), fwhm=sim.truth["fwhm"], smooth=51)
    assert alone.summary["n_stars_used"] == 3
    assert set(np.asarray(alone.per_star["PHOT_MATCH"]).tolist()) == {"fibres"}
    np.testing.assert_allclose(alone.cal, with_cat.cal, rtol=2e-5)  # the same magnitudes, 6 decimals in the CSV
    rel = alone.cal * sim.truth["throughput"] - 1.0
    assert np.sqrt(np.mean(rel[alone.measured] ** 2)) < 0.01


def test_no_catalogue_and_no_fibre_magnitudes_says_what_to_give(sim, tmp_path):
    from gpucal.errors import PhotometryError
    from gpucal.pipeline import calibrate_frame

    write_frame(tmp_path / "frame.fits", sim.flux, sim.var, sim.wave, sim.fibres, medium="air")
    with pytest.raises(PhotometryError, match="--photometry CATALOGUE, or give magnitude columns"):
        calibrate_frame(str(tmp_path / "frame.fits"), fwhm=sim.truth["fwhm"])

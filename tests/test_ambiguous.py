"""Ambiguous side inputs (issue 19) are reported, never resolved silently.

* duplicate catalogue rows for one standard: differing rows are a
  PhotometryError naming the file, the star and the rows; identical rows are
  used once with a warning;
* duplicate fibre NAMEs: a warning (logger ``gpucal``) naming the fibres and
  the name; the frame is still read and calibrated;
* BOSZ text rows that are non-finite or non-numeric: an InputError naming the
  file and its line number (counted in the file);
* logarithmic wavelength units (``dex(Angstrom)``, ``log(Angstrom)``,
  ``dex``, astropy function units) in ``CUNIT1`` or the WAVELA ``BUNIT``:
  refused with the unit named.
"""

from __future__ import annotations

import gzip
import logging
import math
import re

import numpy as np
import pytest
from astropy.table import Table

from gpucal.errors import InputError, PhotometryError
from gpucal.io import read_frame, write_frame
from gpucal.photometry import match_ebv, match_photometry, read_catalogue
from gpucal.templates.bosz import read_bosz_spectrum, read_wave_file

ARCSEC = 1.0 / 3600.0
HEADER = "name,ra,dec,g,dg,r,dr,ebv\n"


def _csv(tmp_path, rows, name="dups.csv"):
    path = tmp_path / name
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- duplicate catalogue rows


def test_duplicate_name_rows_that_differ_are_an_error(tmp_path):
    # the bad row first: before, it won silently and the star was rejected later as "discrepant"
    path = _csv(tmp_path, ["s1,10.0,-30.0,16.10,0.02,15.70,0.02,0.03",
                           "s2,10.1,-30.1,15.50,0.02,15.10,0.02,0.03",
                           "s1,10.0,-30.0,15.10,0.02,14.70,0.02,0.03"])
    cat = read_catalogue(path, bands=("g", "r"))
    with pytest.raises(PhotometryError) as info:
        match_photometry(cat, ["s2", "s1"], [np.nan, np.nan], [np.nan, np.nan], bands=("g", "r"))
    msg = str(info.value)
    assert msg.startswith(f"photometry catalogue {path}: duplicate entries")
    assert "star 's1': rows 1, 3 (named 's1') differ" in msg
    assert "'s2'" not in msg
    with pytest.raises(PhotometryError, match=r"star 's1': rows 1, 3"):
        match_ebv(cat, ["s1"], [np.nan], [np.nan])


def test_two_rows_within_the_radius_of_one_standard_are_an_error(tmp_path):
    cosd = math.cos(math.radians(-30.0))
    path = _csv(tmp_path, ["a,10.0,-30.0,15.10,0.02,14.70,0.02,",
                           "far,11.0,-30.0,15.10,0.02,14.70,0.02,",
                           f"b,{10.0 + 0.6 * ARCSEC / cosd:.9f},-30.0,16.10,0.02,15.70,0.02,"])
    with pytest.raises(PhotometryError) as info:
        match_photometry(path, ["fibre 7"], [10.0 + 0.1 * ARCSEC / cosd], [-30.0], bands=("g", "r"))
    assert "star 'fibre 7': rows 1, 3 (within 1 arcsec of its position) differ" in str(info.value)
    assert str(path) in str(info.value)
    # a smaller radius holds only the nearer row: no ambiguity
    phot, info = match_photometry(path, ["fibre 7"], [10.0 + 0.1 * ARCSEC / cosd], [-30.0],
                                  bands=("g", "r"), radius_arcsec=0.4)
    assert info[0].startswith("coords 0.10") and phot.mag[0].tolist() == [15.1, 14.7]


def test_identical_duplicate_rows_are_used_once_and_reported(tmp_path, caplog):
    row = "s1,10.0,-30.0,15.10,0.02,14.70,0.02,0.03"
    path = _csv(tmp_path, [row, "s2,10.1,-30.1,15.50,0.02,15.10,0.02,0.03", row])
    cat = read_catalogue(path, bands=("g", "r"))
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        phot, info = match_photometry(cat, ["s1"], [np.nan], [np.nan], bands=("g", "r"))
        ebv = match_ebv(cat, ["s1"], [np.nan], [np.nan])
    assert info == ["name"] and phot.mag[0].tolist() == [15.1, 14.7] and ebv.tolist() == [0.03]
    warned = [r.getMessage() for r in caplog.records if "identical photometry" in r.getMessage()]
    assert warned == [f"photometry catalogue {path}: star 's1' matches rows 1, 3 (named 's1') "
                      "with identical photometry; used once"]  # once per catalogue, not per call


def test_duplicates_no_standard_matches_are_not_reported(tmp_path, caplog):
    path = _csv(tmp_path, ["s1,10.0,-30.0,15.10,0.02,14.70,0.02,", "x,20.0,0.0,15.0,0.02,14.0,0.02,",
                           "x,20.0,0.0,16.0,0.02,15.0,0.02,"])
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        phot, info = match_photometry(path, ["s1"], [10.0], [-30.0], bands=("g", "r"))
    assert info == ["name"] and phot.mag[0].tolist() == [15.1, 14.7]
    assert "rows" not in caplog.text


# --------------------------------------------------------------------------- duplicate fibre names


def _frame_file(tmp_path, names, types, name="frame.fits"):
    n, n_pix = len(names), 40
    wave = np.linspace(5000.0, 6000.0, n_pix)
    flux = np.arange(n * n_pix, dtype=float).reshape(n, n_pix) + 1.0
    fibres = Table({"NAME": names, "TYPE": types, "RA": np.linspace(10, 11, n), "DEC": np.linspace(-30, -29, n)})
    path = tmp_path / name
    write_frame(path, flux, np.ones_like(flux), wave, fibres)
    return path, flux


def test_duplicate_fibre_names_are_a_warning_naming_both_fibres(tmp_path, caplog):
    names = ["STD1", "SKY", "PRG1", "STD1", "SKY", "PRG2"]
    path, flux = _frame_file(tmp_path, names, ["C", "S", "P", "C", "S", "P"])
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        frame = read_frame(path)
    msgs = [r.getMessage() for r in caplog.records if r.name == "gpucal" and "share NAME" in r.getMessage()]
    assert len(msgs) == 1, msgs  # the sky fibres' placeholder name is not checked
    assert msgs[0].startswith(f"{path} [FIBRES]: fibres 1, 4 share NAME 'STD1'")
    np.testing.assert_array_equal(frame.flux, flux)  # the data are kept as they are
    assert frame.standards.tolist() == [0, 3]


def test_unique_fibre_names_give_no_warning(tmp_path, caplog):
    path, _ = _frame_file(tmp_path, ["A", "B", "C"], ["C", "P", "P"])
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        read_frame(path)
    assert "share NAME" not in caplog.text


def test_frame_with_duplicate_fibre_names_is_still_calibrated(tmp_path, caplog):
    from gpucal.pipeline import calibrate_frame
    from gpucal.simulate import simulate_frame, write_catalogue_csv

    sim = simulate_frame(seed=3, snr=50.0, n_pix=1000, wave_range=(5000.0, 6500.0), n_standards=3,
                         n_program=2, n_sky=2)
    fibres = sim.fibres.copy()
    prg = [k for k, t in enumerate(fibres["TYPE"]) if t.strip() == "P"]
    fibres["NAME"][prg[1]] = fibres["NAME"][prg[0]]
    write_frame(tmp_path / "f.fits", sim.flux, sim.var, sim.wave, fibres)
    write_catalogue_csv(sim.catalogue, tmp_path / "cat.csv")
    with caplog.at_level(logging.WARNING, logger="gpucal"):
        res = calibrate_frame(str(tmp_path / "f.fits"), photometry=str(tmp_path / "cat.csv"), fwhm=2.0,
                              vrange=(-200.0, 200.0, 5.0), backend="numpy")
    assert f"fibres {prg[0] + 1}, {prg[1] + 1} share NAME {str(fibres['NAME'][prg[0]])!r}" in caplog.text
    assert res.summary["n_stars_used"] == 3
    assert np.isfinite(np.asarray(res.flux)[prg]).all()


# --------------------------------------------------------------------------- template rows


def _bosz_file(tmp_path, lines, *, comment=True):
    path = tmp_path / "bosz2024_mp_t5000_g+4.5_m+0.00_a+0.00_c+0.00_v1_r500_resam.txt.gz"
    head = "# BOSZ test file\n# H  H_cont\n" if comment else ""
    path.write_bytes(gzip.compress((head + "".join(x + "\n" for x in lines)).encode()))
    return path


GOOD = [f"{1.0 + k:.6e} {2.0 + 2 * k:.6e}" for k in range(11)]
WAVE = np.linspace(3000.0, 4000.0, 11)


@pytest.mark.parametrize("row, what", [("nan nan", "non-finite value on line 6 ('nan nan')"),
                                       ("1.0 inf", "non-finite value on line 6 ('1.0 inf')"),
                                       ("-1e30 abc", "malformed line 6: non-numeric value 'abc' ('-1e30 abc')"),
                                       ("1.0", "malformed line 6: expected 2 columns, found 1")])
def test_bad_template_row_names_file_and_line(tmp_path, row, what):
    path = _bosz_file(tmp_path, GOOD[:3] + [row] + GOOD[4:])  # 2 comment lines: data row 4 is line 6
    with pytest.raises(InputError) as info:
        read_bosz_spectrum(path, wave=WAVE)
    assert str(info.value).startswith(f"{path}: {what}")


def test_bad_rorig_rows_name_the_line(tmp_path):
    rows = [f"{w:.3f} {1.0 + k:.6e} {2.0:.6e}" for k, w in enumerate(WAVE)]
    for k, bad, what in [(5, "nan 1.0 2.0", "non-finite value on line 8"),
                         (0, "abc 1.0 2.0", "malformed line 3: non-numeric value 'abc'"),
                         (7, "3700.0 -1e30 abc", "malformed line 10: non-numeric value 'abc'")]:
        path = _bosz_file(tmp_path, rows[:k] + [bad] + rows[k + 1:])
        with pytest.raises(InputError, match=re.escape(f"{path}: {what}")):
            read_bosz_spectrum(path, window=(3100.0, 3900.0))


def test_bad_wavelength_file_row_names_the_line(tmp_path):
    path = tmp_path / "bosz2024_wave_r500.txt"
    path.write_text("# wavelengths\n3000.0\n3100.0\nnan\n3300.0\n")
    with pytest.raises(InputError, match=re.escape(f"{path}: non-finite value on line 4 ('nan')")):
        read_wave_file(path)


# --------------------------------------------------------------------------- logarithmic wavelength units


@pytest.mark.parametrize("unit", ["dex(Angstrom)", "log(Angstrom)", "ln(nm)", "dex", "mag"])
def test_logarithmic_wavela_unit_is_refused(tmp_path, unit):
    from astropy.io import fits

    path, _ = _frame_file(tmp_path, ["A", "B"], ["C", "P"])
    with fits.open(path, mode="update") as h:
        h["WAVELA"].data = np.log10(h["WAVELA"].data)
        h["WAVELA"].header["BUNIT"] = unit
    with pytest.raises(InputError) as info:
        read_frame(path)
    assert str(info.value) == (f"{path} [WAVELA] BUNIT: wavelength unit {unit!r} is logarithmic; "
                               "give wavelengths as a length (Angstrom, nm, um, m)")


@pytest.mark.parametrize("unit", ["dex(Angstrom)", "log(Angstrom)", "dex"])
def test_logarithmic_cunit1_is_refused(tmp_path, unit):
    n_pix = 40
    flux = np.ones((2, n_pix))
    path = tmp_path / "wcs.fits"
    write_frame(path, flux, flux, np.linspace(3.6, 3.8, n_pix), Table({"TYPE": ["C", "P"]}), wave_hdu="wcs")
    from astropy.io import fits

    with fits.open(path, mode="update") as h:
        h[0].header["CUNIT1"] = unit
    with pytest.raises(InputError, match=re.escape(f"wavelength unit {unit!r} is logarithmic")) as info:
        read_frame(path)
    assert str(path) in str(info.value) and "CUNIT1" in str(info.value)


@pytest.mark.parametrize("unit, factor", [("nm", 10.0), ("Angstrom", 1.0), ("0.1 nm", 1.0), ("um", 1e4)])
def test_length_units_still_read(tmp_path, unit, factor):
    from astropy.io import fits

    path, _ = _frame_file(tmp_path, ["A", "B"], ["C", "P"])
    with fits.open(path) as h:
        wave = np.array(h["WAVELA"].data, dtype=float)
    with fits.open(path, mode="update") as h:
        h["WAVELA"].header["BUNIT"] = unit
    np.testing.assert_allclose(read_frame(path).wave, wave * factor, rtol=1e-12)

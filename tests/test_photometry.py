"""Synthetic photometry against speclite, and catalogue reading/matching."""

import logging
import warnings

import astropy.units as u
import numpy as np
import pytest
import speclite.filters

from conftest import assert_close
from gpucal.backends import to_numpy
from gpucal.containers import Photometry
from gpucal.errors import CoverageError, InputError
from gpucal.photometry import (
    BAND_ALIASES,
    band_matrix,
    band_system,
    load_filters,
    match_photometry,
    photometry_from_fibres,
    read_catalogue,
    resolve_band,
    synthetic_maggies,
    synthetic_mags,
)

# Bands whose full support lies inside WAVE (2900–11200 Å).
BANDS = (
    "g", "r", "i", "z", "y",
    "sdss2010-u", "sdss2010-g", "sdss2010-r", "sdss2010-i", "sdss2010-z",
    "decam2014-g", "decam2014-r", "decam2014-z",
    "bessell-U", "bessell-B", "bessell-V", "bessell-R", "bessell-I",
    "G", "BP", "RP", "gaiadr2-G",
)
DLNLAM = 1.0 / 20000
WAVE = np.exp(np.arange(np.log(2900.0), np.log(11200.0), DLNLAM))
N_SPEC = 100


def _smooth_spectra(n, seed=0):
    """Blackbodies (4000–10000 K) times positive random cubic polynomials, erg/s/cm²/Å."""
    rng = np.random.default_rng(seed)
    teff = rng.uniform(4000.0, 10000.0, (n, 1))
    planck = 1.0 / WAVE**5 / np.expm1(1.438777e8 / (WAVE * teff))
    x = (WAVE - 7000.0) / 4200.0
    coef = rng.uniform(-0.25, 0.25, (n, 3))
    poly = 1.0 + coef[:, :1] * x + coef[:, 1:2] * x**2 + coef[:, 2:] * x**3
    # Peak-normalise, then spread over observed (1e-16) to surface (1e8) flux scales.
    scale = 10.0 ** rng.uniform(-16.0, 8.0, (n, 1))
    return planck / planck.max(axis=1, keepdims=True) * poly * scale


@pytest.fixture(scope="module")
def spectra():
    return _smooth_spectra(N_SPEC)


@pytest.fixture(scope="module")
def speclite_mags(spectra):
    """speclite's own AB magnitudes of ``spectra`` (the oracle)."""
    return _speclite_mags(WAVE, spectra, BANDS)


def _speclite_mags(wave, flux, bands):
    names = [resolve_band(b) for b in bands]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = speclite.filters.load_filters(*names).get_ab_magnitudes(
            flux * u.erg / (u.s * u.cm**2 * u.AA), wave * u.AA
        )
    return np.stack([np.asarray(table[n]) for n in names], axis=1)


# ----------------------------------------------------------------- bands


def test_resolve_band_aliases_and_full_names():
    assert resolve_band("g") == "panstarrs-g"
    assert resolve_band("G") == "gaiadr3-G"
    assert resolve_band("BP") == "gaiadr3-BP"
    assert resolve_band("K") == "twomass-Ks" == resolve_band("Ks")
    assert resolve_band(" sdss2010-r ") == "sdss2010-r"
    assert resolve_band("GAIADR2-rp") == "gaiadr2-RP"
    assert resolve_band("decam2014-z") == "decam2014-z"
    assert all(resolve_band(a) == v for a, v in BAND_ALIASES.items())


@pytest.mark.parametrize("name", ["q", "panstarrs-q", "nosuch-g", ""])
def test_resolve_band_unknown_lists_choices(name):
    with pytest.raises(InputError) as info:
        resolve_band(name)
    if name:
        assert repr(name) in str(info.value)
        assert "panstarrs" in str(info.value) and "twomass" in str(info.value)


def test_band_systems():
    assert [band_system(b) for b in ("g", "sdss2010-r", "decam2014-z")] == ["AB"] * 3
    assert [band_system(b) for b in ("G", "BP", "RP", "J", "H", "Ks")] == ["Vega"] * 6


def test_load_filters_cached():
    a, b = load_filters(("g", "panstarrs-g"))
    assert a is b and a.name == "panstarrs-g"


# ------------------------------------------------------ synthetic photometry


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_synthetic_mags_match_speclite(backend, dtype, spectra, speclite_mags):
    xp = backend.xp
    flux = backend.asarray(spectra, dtype=getattr(xp, dtype))
    wave = backend.asarray(WAVE)
    mags = synthetic_mags(wave, flux, BANDS)
    assert mags.dtype == xp.float64
    assert tuple(mags.shape) == (N_SPEC, len(BANDS))
    # Spec: < 1 mmag. float64 reproduces speclite's quadrature to rounding;
    # float32 flux carries only its own 6e-8 rounding.
    assert_close(mags, speclite_mags, rtol=0.0, atol=1e-3, backend=backend)
    assert_close(mags, speclite_mags, rtol=0.0, atol=1e-9 if dtype == "float64" else 1e-6, backend=backend)


def test_synthetic_mags_host_wave_backend_flux(backend, spectra, speclite_mags):
    mags = synthetic_mags(WAVE, backend.asarray(spectra[:5]), ("g", "r"))
    assert_close(mags, speclite_mags[:5, :2], rtol=0.0, atol=1e-9, backend=backend)


def test_coarse_grid_still_matches_speclite():
    # Δlnλ = 1/50 undersamples the filter curves; speclite then adds
    # interpolated nodes, which band_matrix reproduces.
    wave = np.exp(np.arange(np.log(2900.0), np.log(11200.0), 1.0 / 50))
    flux = 1e-15 * (wave / 5000.0) ** -2 * (1.0 + 0.1 * np.sin(wave / 300.0))
    bands = ("g", "r", "i", "z", "bessell-V", "sdss2010-u")
    ours = synthetic_mags(wave, flux[None, :], bands)
    np.testing.assert_allclose(ours, _speclite_mags(wave, flux[None, :], bands), atol=1e-9, rtol=0)


def test_ab_reference_spectrum_is_zero_mag():
    c_aa = 2.99792458e18  # Å/s
    flux = 3631e-23 * c_aa / WAVE**2
    fine = ("g", "r", "i", "z", "y", "sdss2010-g", "sdss2010-r", "decam2014-r", "G", "BP", "RP")
    np.testing.assert_allclose(synthetic_mags(WAVE, flux[None, :], fine), 0.0, atol=1e-5)
    # Coarsely tabulated curves inherit speclite's zeropoint quadrature error
    # (bessell-R: 1.0 mmag), still at the 1-mmag level.
    coarse = ("sdss2010-u", "bessell-U", "bessell-B", "bessell-V", "bessell-R", "bessell-I")
    np.testing.assert_allclose(synthetic_mags(WAVE, flux[None, :], coarse), 0.0, atol=1.1e-3)


def test_uncovered_band_is_coverage_error_naming_band(backend, spectra):
    flux = backend.asarray(spectra[:3])
    with pytest.raises(CoverageError) as info:
        synthetic_mags(WAVE, flux, ("g", "J"))
    msg = str(info.value)
    assert "twomass-J" in msg and "panstarrs-g" not in msg
    assert "11200" in msg[msg.index("missing"):] and "14500.0" in msg


def test_maggies_report_coverage_with_nan_columns(backend, spectra):
    maggies, covered = synthetic_maggies(WAVE, backend.asarray(spectra[:4]), ("r", "J", "H"))
    assert covered.tolist() == [True, False, False]
    host = to_numpy(maggies)
    assert np.all(np.isfinite(host[:, 0])) and np.all(host[:, 0] > 0)
    assert np.all(np.isnan(host[:, 1:]))


def test_band_matrix_shapes_and_coverage():
    W, covered = band_matrix(WAVE, ("g", "sdss2010-z", "J"))
    assert W.shape == (WAVE.size, 3) and W.dtype == np.float64
    assert covered.tolist() == [True, True, False]
    assert np.all(W[:, :2] >= 0) and np.isnan(W[:, 2]).all()
    assert not W.flags.writeable
    W2, _ = band_matrix(WAVE, ("panstarrs-g", "sdss2010-z", "twomass-J"))
    assert W2 is W  # cached on the grid and resolved names


def test_bad_inputs():
    flux = _smooth_spectra(2)
    with pytest.raises(InputError, match="pixels"):
        synthetic_maggies(WAVE[:-1], flux, ("g",))
    with pytest.raises(InputError, match="2-D"):
        synthetic_maggies(WAVE, flux[0], ("g",))
    with pytest.raises(InputError, match="increasing"):
        band_matrix(WAVE[::-1], ("g",))
    with pytest.raises(NotImplementedError, match="Vega"):
        synthetic_mags(WAVE, flux, ("G",), system="Vega")
    with pytest.raises(InputError, match="system"):
        synthetic_mags(WAVE, flux, ("g",), system="ST")


# ------------------------------------------------------------------ catalogue


CSV = """\
Name,RA,Dec,g,dg,r,dr,i,di,BP,dBP
star1,10.000000,-30.000000,15.10,0.01,14.70,0.02,14.50,0.03,15.30,0.004
star2,10.100000,-30.100000,99.00,0.01,14.80,9.50,,,15.40,0.004
star3,10.200000,-30.200000,16.00,0.02,nan,0.01,15.20,0.02,99.99,99.99
  star4 ,10.300000,-30.300000,16.50,0.02,16.10,0.02,15.90,0.02,16.70,0.005
"""


@pytest.fixture
def catalogue_path(tmp_path):
    path = tmp_path / "refcat.csv"
    path.write_text(CSV)
    return path


def test_read_catalogue_sentinels(catalogue_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gpucal.photometry"):
        cat = read_catalogue(catalogue_path, bands=("g", "r", "i", "z", "BP"))
    assert list(cat["name"]) == ["star1", "star2", "star3", "star4"]
    valid = np.stack([cat[f"{b}_valid"] for b in ("panstarrs-g", "panstarrs-r", "panstarrs-i", "gaiadr3-BP")], 1)
    assert valid.tolist() == [
        [True, True, True, True],
        [False, False, False, True],  # g = 99, dr = 9.5, i blank
        [True, False, True, False],  # r = nan, BP = 99.99
        [True, True, True, True],
    ]
    assert np.isnan(cat["panstarrs-g"][1]) and np.isnan(cat["panstarrs-g_err"][1])
    assert cat["panstarrs-g"][0] == 15.10 and cat["panstarrs-r_err"][0] == 0.02
    assert not cat["panstarrs-z_valid"].any()  # no z column: all missing, warned
    assert "panstarrs-z" in caplog.text
    assert cat.meta["system"] == ("AB", "AB", "AB", "AB", "Vega")


def test_read_catalogue_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match="nope.csv"):
        read_catalogue(missing)

    no_dec = tmp_path / "nodec.csv"
    no_dec.write_text("name,ra,g,dg\ns,1.0,15,0.1\n")
    with pytest.raises(InputError, match=r"nodec\.csv.*'dec'"):
        read_catalogue(no_dec)

    no_id = tmp_path / "noid.csv"
    no_id.write_text("g,dg\n15,0.1\n")
    with pytest.raises(InputError, match=r"noid\.csv.*name"):
        read_catalogue(no_id)

    no_band = tmp_path / "noband.csv"
    no_band.write_text("name,ra,dec,J,dJ\ns,1.0,2.0,12,0.02\n")
    with pytest.raises(InputError, match=r"noband\.csv"):
        read_catalogue(no_band, bands=("g", "r"))

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("name,ra,dec,g,dg\ns,1.0,2.0,15,0.1,7,8,9\n")
    with pytest.raises(InputError, match=r"ragged\.csv"):
        read_catalogue(ragged)


def test_match_by_name_coords_and_unmatched(catalogue_path):
    cat = read_catalogue(catalogue_path, bands=("g", "r", "BP"))
    arcsec = 1.0 / 3600.0
    cosd = np.cos(np.deg2rad(-30.2))
    names = ["star4", "fibre 12", "fibre 13", "fibre 14", "star1"]
    ra = np.array([np.nan, 10.2 + 0.5 * arcsec / cosd, 10.0 + 2.0 * arcsec, np.nan, 50.0])
    dec = np.array([np.nan, -30.2, -30.0, np.nan, 50.0])
    phot, info = match_photometry(cat, names, ra, dec, bands=("g", "r", "BP"), radius_arcsec=1.0)
    assert isinstance(phot, Photometry)
    assert phot.bands == ("panstarrs-g", "panstarrs-r", "gaiadr3-BP")
    assert phot.system == ("AB", "AB", "Vega")
    assert phot.names == tuple(names)
    assert phot.mag.shape == phot.err.shape == phot.valid.shape == (5, 3)
    assert info[0] == "name" and info[4] == "name"  # name wins over far-off coordinates
    assert info[1].startswith("coords") and info[1].endswith("arcsec")
    assert abs(float(info[1].split()[1]) - 0.5) < 0.02
    assert info[2] == "unmatched" and info[3] == "unmatched"
    np.testing.assert_array_equal(phot.mag[0], [16.5, 16.1, 16.7])
    np.testing.assert_array_equal(phot.mag[4], [15.1, 14.7, 15.3])
    assert phot.valid[1].tolist() == [True, False, False]  # star3: r nan, BP 99.99
    assert not phot.valid[2:4].any() and np.isnan(phot.mag[2:4]).all() and np.isnan(phot.err[2:4]).all()


def test_match_accepts_a_path_and_backend_coordinates(catalogue_path, backend):
    phot, info = match_photometry(
        catalogue_path,
        ["x"],
        backend.asarray(np.array([10.1])),
        backend.asarray(np.array([-30.1])),
        bands=("r", "BP"),
    )
    assert info == ["coords 0.00 arcsec"]
    assert phot.valid.tolist() == [[False, True]]  # star2: dr = 9.5


def test_photometry_from_fibres():
    from astropy.table import Table

    fib = Table(
        {
            "NAME": ["a ", "b"],
            "G": [15.0, 99.0],
            "DG": [0.01, 0.01],
            "r": [14.0, 14.5],
        }
    )
    phot = photometry_from_fibres(fib, ("G", "r"))
    assert phot.names == ("a", "b") and phot.bands == ("gaiadr3-G", "panstarrs-r")
    assert phot.valid.tolist() == [[True, False], [False, False]]  # r has no error column
    phot = photometry_from_fibres(fib, ("G", "r"), default_err=0.05)
    assert phot.valid.tolist() == [[True, True], [False, True]]
    np.testing.assert_array_equal(phot.err[:, 1], [0.05, 0.05])

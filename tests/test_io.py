"""gpucal.io.frames: reading, validating and writing FITS frames."""

import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpucal.errors import InputError, NoStandardsError
from gpucal.io import (
    FLUX_BUNIT,
    VAR_BUNIT,
    Frame,
    file_sha256,
    read_calibrated_frame,
    read_frame,
    write_calibrated_frame,
    write_frame,
)

N_FIB, N_PIX = 6, 50


def _fibres(n=N_FIB, types=None):
    types = types or (["C", "P", "S", "C ", "p", "N"] * n)[:n]
    return Table(
        {
            "NAME": [f"star{i}" for i in range(n)],
            "TYPE": types,
            "RA": np.linspace(10, 11, n),
            "DEC": np.linspace(-30, -29, n),
            "MAG": np.linspace(14, 16, n).astype(np.float32),
        }
    )


def _arrays(n_fib=N_FIB, n_pix=N_PIX, seed=0):
    rng = np.random.default_rng(seed)
    flux = rng.normal(100, 5, (n_fib, n_pix)) + np.arange(n_fib)[:, None] * 1000.0
    var = rng.uniform(1, 2, (n_fib, n_pix))
    wave = 4000.0 + 2.0 * np.arange(n_pix)
    return flux, var, wave


def _hdul(flux, var, wave, fibres, wave_name="WAVELA"):
    hdus = [fits.PrimaryHDU(flux)]
    if var is not None:
        hdus.append(fits.ImageHDU(var, name="VARIANCE"))
    if wave is not None:
        hdus.append(fits.ImageHDU(wave, name=wave_name))
    if fibres is not None:
        t = fits.table_to_hdu(fibres)
        t.name = "FIBRES"
        hdus.append(t)
    return fits.HDUList(hdus)


@pytest.fixture
def good(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "frame.fits"
    write_frame(p, flux, var, wave, _fibres())
    return p, flux, var, wave


# --------------------------------------------------------------------------- round trips


def test_roundtrip_wavela_1d(good):
    p, flux, var, wave = good
    fr = read_frame(p)
    assert isinstance(fr, Frame)
    assert fr.path == str(p)
    np.testing.assert_array_equal(fr.flux, flux)
    np.testing.assert_array_equal(fr.var, var)
    np.testing.assert_array_equal(fr.wave, wave)
    for a in (fr.flux, fr.var, fr.wave):
        assert a.dtype == np.float64 and a.dtype.isnative
    assert fr.flipped is False and fr.medium == "air" and fr.wave_source == "WAVELA"
    np.testing.assert_array_equal(fr.standards, [0, 3])  # 'C' and 'C ' (stripped)
    assert fr.standards.dtype.kind == "i"
    assert fr.names[0] == "star0"
    assert set(fr.fibres.colnames) >= {"NAME", "TYPE", "RA", "DEC", "MAG"}
    assert fr.fibres["RA"].dtype.isnative
    assert isinstance(fr.header, fits.Header)


def test_roundtrip_wavela_2d_identical_rows(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "w2.fits"
    write_frame(p, flux, var, np.tile(wave, (N_FIB, 1)), _fibres())
    fr = read_frame(p)
    assert fr.wave.shape == (N_PIX,)
    np.testing.assert_array_equal(fr.wave, wave)
    assert fr.wave_ndim == 2


def test_wavela_2d_rows_differ(tmp_path):
    flux, var, wave = _arrays()
    w2 = np.tile(wave, (N_FIB, 1))
    w2[4] += 0.5
    p = tmp_path / "wdiff.fits"
    write_frame(p, flux, var, w2, _fibres())
    # issue 15: per-fibre solutions that differ are kept, each fibre on its own (was: refused)
    fr = read_frame(p)
    assert fr.wave.shape == (N_FIB, N_PIX) and fr.wave_ndim == 2
    np.testing.assert_array_equal(fr.wave, w2)


@pytest.mark.parametrize("cd", ["CDELT1", "CD1_1"])
@pytest.mark.parametrize("unit,factor", [(None, 1.0), ("Angstrom", 1.0), ("nm", 10.0)])
def test_linear_wcs(tmp_path, cd, unit, factor):
    flux, var, _ = _arrays()
    hdr = fits.Header()
    hdr["CRVAL1"] = 400.0
    hdr[cd] = 0.2
    hdr["CRPIX1"] = 3.0
    if unit:
        hdr["CUNIT1"] = unit
    hdul = _hdul(flux, var, None, _fibres())
    hdul[0].header.update(hdr)
    p = tmp_path / "wcs.fits"
    hdul.writeto(p)
    fr = read_frame(p)
    expect = (400.0 + 0.2 * (np.arange(1, N_PIX + 1) - 3.0)) * factor
    np.testing.assert_allclose(fr.wave, expect, rtol=1e-12)
    assert fr.wave_source == "wcs"


def test_write_frame_wcs_roundtrip_and_medium(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "wcs2.fits"
    write_frame(p, flux, var, wave, _fibres(), wave_hdu="wcs", medium="vacuum")
    with fits.open(p) as h:
        assert "WAVELA" not in h and h[0].header["CUNIT1"] == "Angstrom"
    fr = read_frame(p)
    np.testing.assert_allclose(fr.wave, wave, rtol=1e-12)
    assert fr.medium == "vacuum"
    with pytest.raises(InputError, match="linear"):
        write_frame(tmp_path / "nl.fits", flux, var, wave**1.01, _fibres(), wave_hdu="wcs")


def test_medium_keywords(tmp_path):
    flux, var, wave = _arrays()
    hdul = _hdul(flux, var, wave, _fibres())
    hdul[0].header["AIRORVAC"] = "vac"
    p = tmp_path / "m.fits"
    hdul.writeto(p)
    assert read_frame(p).medium == "vacuum"
    hdul[0].header["AIRORVAC"] = "maybe"
    p2 = tmp_path / "m2.fits"
    hdul.writeto(p2)
    with pytest.raises(InputError, match="m2.fits.*AIRORVAC"):
        read_frame(p2)


def test_big_endian_float32_converted(tmp_path):
    flux, var, wave = _arrays()
    hdul = _hdul(flux.astype(">f4"), var.astype(">f4"), wave.astype(">f8"), _fibres())
    p = tmp_path / "be.fits"
    hdul.writeto(p)
    fr = read_frame(p)
    assert fr.flux.dtype == np.float64 and fr.flux.dtype.isnative
    np.testing.assert_allclose(fr.flux, flux.astype(np.float32))


def test_square_frame_fibre_axis_is_axis0(tmp_path):
    n = 8
    flux = np.arange(n)[:, None] * 100.0 + np.arange(n)[None, :] * 1.0  # row i = 100 i + pixel
    var = np.ones((n, n))
    wave = 5000.0 + np.arange(n)
    p = tmp_path / "square.fits"
    write_frame(p, flux, var, wave, _fibres(n))
    fr = read_frame(p)
    assert fr.flux.shape == (n, n)
    np.testing.assert_array_equal(fr.flux[5], 500.0 + np.arange(n))
    np.testing.assert_array_equal(fr.flux[:, 2], np.arange(n) * 100.0 + 2.0)


def test_descending_wavelengths_flipped_and_flipped_back(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "desc.fits"
    write_frame(p, flux[:, ::-1], var[:, ::-1], wave[::-1], _fibres())
    fr = read_frame(p)
    assert fr.flipped is True
    np.testing.assert_array_equal(fr.wave, wave)
    np.testing.assert_array_equal(fr.flux, flux)
    np.testing.assert_array_equal(fr.var, var)
    out = tmp_path / "desc_cal.fits"
    _write_cal(out, fr)
    with fits.open(out) as h:
        np.testing.assert_array_equal(h["WAVELA"].data, wave[::-1])
        np.testing.assert_array_equal(h[0].data, 2.0 * flux[:, ::-1])
        np.testing.assert_array_equal(h["VARIANCE"].data, 4.0 * var[:, ::-1])
    back = read_calibrated_frame(out)
    assert back.flipped
    np.testing.assert_array_equal(back.flux, 2.0 * flux)


def test_descending_wcs_flipped(tmp_path):
    flux, var, wave = _arrays()
    hdul = _hdul(flux[:, ::-1], var[:, ::-1], None, _fibres())
    hdul[0].header.update({"CRVAL1": wave[-1], "CDELT1": -2.0, "CRPIX1": 1.0})
    p = tmp_path / "descwcs.fits"
    hdul.writeto(p)
    fr = read_frame(p)
    assert fr.flipped
    np.testing.assert_allclose(fr.wave, wave)
    np.testing.assert_array_equal(fr.flux, flux)
    out = tmp_path / "descwcs_cal.fits"
    _write_cal(out, fr)
    with fits.open(out) as h:
        assert "WAVELA" not in h and h[0].header["CDELT1"] == -2.0
        np.testing.assert_array_equal(h[0].data, 2.0 * flux[:, ::-1])


def test_nan_flux_and_bad_variance_accepted(tmp_path):
    flux, var, wave = _arrays()
    flux[1, 3] = np.nan
    var[2, 4] = np.nan
    var[2, 5] = 0.0
    var[2, 6] = np.inf
    p = tmp_path / "nan.fits"
    write_frame(p, flux, var, wave, _fibres())
    fr = read_frame(p)
    assert np.isnan(fr.flux[1, 3]) and np.isnan(fr.var[2, 4]) and fr.var[2, 5] == 0


# --------------------------------------------------------------------------- bad inputs


def _check(p, exc, *fragments):
    with pytest.raises(exc) as ei:
        read_frame(p)
    msg = str(ei.value)
    assert os.path.basename(str(p)) in msg, msg
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_file(tmp_path):
    _check(tmp_path / "nope.fits", InputError, "not found")


def test_text_file_not_fits(tmp_path):
    p = tmp_path / "notes.fits"
    p.write_text("this is not a FITS file\n" * 200)
    _check(p, InputError)


@pytest.mark.parametrize("frac", [0.02, 0.3, 0.55, 0.8, 0.99])
def test_truncated_fits(good, tmp_path, frac):
    src = good[0]
    data = src.read_bytes()
    p = tmp_path / f"trunc{int(frac * 100)}.fits"
    p.write_bytes(data[: int(len(data) * frac)])
    _check(p, InputError)


def test_no_primary_data(tmp_path):
    flux, var, wave = _arrays()
    hdul = _hdul(flux, var, wave, _fibres())
    hdul[0] = fits.PrimaryHDU()
    p = tmp_path / "noprim.fits"
    hdul.writeto(p)
    _check(p, InputError, "PRIMARY")


def test_3d_image(tmp_path):
    flux, var, wave = _arrays()
    hdul = _hdul(flux[None], var[None], wave, _fibres())
    p = tmp_path / "cube.fits"
    hdul.writeto(p)
    _check(p, InputError, "2-D")


def test_no_variance(tmp_path):
    flux, _, wave = _arrays()
    p = tmp_path / "novar.fits"
    _hdul(flux, None, wave, _fibres()).writeto(p)
    _check(p, InputError, "VARIANCE")


def test_variance_shape_mismatch(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "varshape.fits"
    _hdul(flux, var[:, :-1], wave, _fibres()).writeto(p)
    _check(p, InputError, "VARIANCE", "shape")


def test_wave_length_mismatch(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "wlen.fits"
    _hdul(flux, var, wave[:-1], _fibres()).writeto(p)
    _check(p, InputError, "WAVELA")


def test_no_wavelengths(tmp_path):
    flux, var, _ = _arrays()
    p = tmp_path / "nowave.fits"
    _hdul(flux, var, None, _fibres()).writeto(p)
    _check(p, InputError, "WAVELA", "WCS")


def test_nan_wavelength(tmp_path):
    flux, var, wave = _arrays()
    wave[7] = np.nan
    p = tmp_path / "nanwave.fits"
    _hdul(flux, var, wave, _fibres()).writeto(p)
    _check(p, InputError, "WAVELA", "NaN")


def test_non_monotonic_wavelengths(tmp_path):
    flux, var, wave = _arrays()
    wave[10], wave[11] = wave[11], wave[10]
    p = tmp_path / "nonmono.fits"
    _hdul(flux, var, wave, _fibres()).writeto(p)
    _check(p, InputError, "WAVELA", "monotonic")


def test_negative_variance_names_fibres(tmp_path):
    flux, var, wave = _arrays()
    var[2, 5] = -1.0
    var[4, 0] = -0.5
    p = tmp_path / "negvar.fits"
    _hdul(flux, var, wave, _fibres()).writeto(p)
    msg = _check(p, InputError, "VARIANCE", "negative", "3, 5")
    assert "fibre" in msg


def test_negative_variance_lists_at_most_five(tmp_path):
    flux, var, wave = _arrays(n_fib=9)
    var[:, 0] = -1.0
    p = tmp_path / "negvar9.fits"
    _hdul(flux, var, wave, _fibres(9)).writeto(p)
    _check(p, InputError, "1, 2, 3, 4, 5 and 4 more")


def test_no_fibres_table(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "nofib.fits"
    _hdul(flux, var, wave, None).writeto(p)
    _check(p, InputError, "FIBRES")


def test_no_type_column(tmp_path):
    flux, var, wave = _arrays()
    fib = _fibres()
    fib.remove_column("TYPE")
    p = tmp_path / "notype.fits"
    _hdul(flux, var, wave, fib).writeto(p)
    _check(p, InputError, "FIBRES", "TYPE")


def test_fibres_row_count(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "rows.fits"
    _hdul(flux, var, wave, _fibres(N_FIB - 1)).writeto(p)
    _check(p, InputError, "FIBRES", "rows")


def test_no_standards(tmp_path):
    flux, var, wave = _arrays()
    p = tmp_path / "nostd.fits"
    _hdul(flux, var, wave, _fibres(types=["P"] * N_FIB)).writeto(p)
    _check(p, NoStandardsError, "TYPE")
    assert read_frame(p, require_standards=False).standards.size == 0


def test_reading_does_not_modify_input(good):
    p = good[0]
    h0, m0 = file_sha256(p), os.stat(p).st_mtime_ns
    fr = read_frame(p)
    fr.flux[:] = 0  # arrays are copies, not views of a memmap
    assert file_sha256(p) == h0 and os.stat(p).st_mtime_ns == m0


# --------------------------------------------------------------------------- calibrated output

HISTORY = [
    "gpucal 0.1.0 flux calibration",
    "standard fibre 1 star0 Teff=6000 logg=4.5 [M/H]=-0.5 rv=12.3 km/s scale=1.0e-17",
    "standard fibre 4 star3 Teff=6250 logg=4.0 [M/H]=0.0 rv=-3.1 km/s scale=1.1e-17",
    "rejected fibre 7: residual rms 0.31 > 0.1",
    "templates: BOSZ 2024 r10000 cache 0123456789abcdef",
    "telluric mask: 6860-6960 7150-7340 7590-7700 8100-8360 8920-9200 Angstrom, interpolated "
    "across and flagged MEASURED=F in the FLUXCAL extension (this line is long on purpose)",
    "backend numpy; combination: weighted median; smoothing: savgol 51",
]


def _write_cal(out, fr, **kw):
    n = fr.n_pix
    per_star = Table(
        {
            "FIBRE": np.array([1, 4]),
            "NAME": ["star0", "star3"],
            "TEFF": [6000.0, 6250.0],
            "USED": [True, True],
        }
    )
    per_star["TEFF"].unit = "K"
    args = dict(
        cal_wave=fr.wave,
        cal=np.full(n, 2.0),
        cal_var=np.full(n, 0.01),
        cal_measured=np.arange(n) % 5 != 0,
        per_star=per_star,
        keywords={
            "FLUXCAL": (True, "flux calibrated by gpucal"),
            "FCALNSTD": (2, "standards used"),
            "FCALNREJ": (0, "standards rejected"),
            "FCALRMS": (0.012, "rms of per-star residuals"),
            "FCALVERS": ("0.1.0", "gpucal version"),
            "FCALBACK": ("numpy", "array backend"),
            "FCALMETH": ("median", "combination"),
        },
        history=HISTORY,
    )
    args.update(kw)
    write_calibrated_frame(out, fr, 2.0 * fr.flux, 4.0 * fr.var, **args)


def test_write_calibrated_frame(good, tmp_path):
    p, flux, var, wave = good
    h0 = file_sha256(p)
    fr = read_frame(p)
    out = tmp_path / "out" / "cal.fits"
    out.parent.mkdir()
    _write_cal(out, fr)
    assert file_sha256(p) == h0

    with fits.open(out) as h:
        names = [x.name for x in h]
        assert names == ["PRIMARY", "VARIANCE", "WAVELA", "FIBRES", "FLUXCAL", "FLUXSTD"]
        ph = h[0].header
        assert ph["BUNIT"] == FLUX_BUNIT == "erg/(s cm2 Angstrom)"
        assert h["VARIANCE"].header["BUNIT"] == VAR_BUNIT
        assert ph["FLUXCAL"] is True and ph["FCALNSTD"] == 2 and ph["FCALMETH"] == "median"
        assert ph.comments["FCALNSTD"] == "standards used"
        hist = [str(v) for v in ph["HISTORY"]]
        joined = "".join(hist)
        assert len(hist) >= len(HISTORY) == 7
        for s in HISTORY:
            if len(s) <= 72:
                assert s in hist
            assert s.replace(" ", "") in joined.replace(" ", "")
        cal = h["FLUXCAL"]
        assert cal.columns["WAVE"].unit == "Angstrom"
        assert cal.columns["CAL"].unit and cal.columns["CAL_VAR"].unit
        assert cal.columns["MEASURED"].format == "L"
        np.testing.assert_array_equal(cal.data["MEASURED"], np.arange(N_PIX) % 5 != 0)
        np.testing.assert_array_equal(cal.data["WAVE"], wave)
        std = h["FLUXSTD"]
        assert list(std.data["FIBRE"]) == [1, 4]
        assert std.columns["TEFF"].unit == "K"
        np.testing.assert_array_equal(h["FIBRES"].data["NAME"], [f"star{i}" for i in range(N_FIB)])

    back = read_calibrated_frame(out)
    np.testing.assert_array_equal(back.flux, 2.0 * flux)
    np.testing.assert_array_equal(back.var, 4.0 * var)
    np.testing.assert_array_equal(back.wave, wave)
    np.testing.assert_array_equal(back.cal["CAL"], 2.0)
    assert back.per_star is not None and len(back.per_star) == 2
    assert list(back.fibres["TYPE"]) == list(fr.fibres["TYPE"])
    # atomic write: nothing but the result in the directory
    assert sorted(os.listdir(out.parent)) == ["cal.fits"]


def test_write_calibrated_refuses_input_and_existing(good, tmp_path):
    p = good[0]
    h0 = file_sha256(p)
    fr = read_frame(p)
    for ow in (False, True):
        with pytest.raises(InputError, match="input frame"):
            _write_cal(p, fr, overwrite=ow)
    # a different spelling of the same path
    with pytest.raises(InputError, match="input frame"):
        _write_cal(str(p.parent / "." / p.name), fr, overwrite=True)
    assert file_sha256(p) == h0

    out = tmp_path / "exists.fits"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="overwrite"):
        _write_cal(out, fr)
    assert out.read_bytes() == b"keep me"
    _write_cal(out, fr, overwrite=True)
    assert read_calibrated_frame(out).header["FCALNSTD"] == 2
    assert sorted(os.listdir(tmp_path)) == ["exists.fits", "frame.fits"]


def test_write_calibrated_failure_leaves_no_temp(good, tmp_path):
    p = good[0]
    fr = read_frame(p)
    out = tmp_path / "fail.fits"
    with pytest.raises(InputError):
        _write_cal(out, fr, keywords={"TOOLONGKEY": (1, "")})
    with pytest.raises(InputError):
        _write_cal(out, fr, keywords={"FCALRMS": (float("nan"), "")})
    with pytest.raises(InputError):
        _write_cal(out, fr, per_star=Table({"OBJ": np.array([object(), None], dtype=object)}))
    assert sorted(os.listdir(tmp_path)) == ["frame.fits"]


def test_write_calibrated_shape_checked(good, tmp_path):
    fr = read_frame(good[0])
    with pytest.raises(InputError, match="shape"):
        write_calibrated_frame(
            tmp_path / "x.fits", fr, fr.flux[:, :-1], fr.var[:, :-1],
            cal_wave=fr.wave, cal=fr.wave, cal_var=fr.wave, cal_measured=fr.wave > 0,
        )


def test_write_frame_refuses_existing(good):
    p, flux, var, wave = good
    with pytest.raises(InputError, match="overwrite"):
        write_frame(p, flux, var, wave, _fibres())
    write_frame(p, flux, var, wave, _fibres(), overwrite=True)


def test_file_sha256(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_non_ascii_history_and_keywords_sanitised(good, tmp_path):
    fr = read_frame(good[0])
    out = tmp_path / "ascii.fits"
    _write_cal(
        out, fr,
        history=["Δ mask 6860–6960 Å", "χ² = 1.2 ± 0.1", ""],
        keywords={"FCALNOTE": ("λ in Å", "σ-clipped")},
    )
    h = read_calibrated_frame(out).header
    hist = [str(v) for v in h["HISTORY"]]
    assert "? mask 6860-6960 A" in hist and "chi2 = 1.2 +/- 0.1" in hist and len(hist) == 3
    assert h["FCALNOTE"] == "lambda in A" and h.comments["FCALNOTE"] == "sigma-clipped"


_LIGHT_IMPORT = (
    "import sys, importlib; pkg = importlib.import_module({name!r}); "
    "missing = [n for n in pkg.__all__ if not hasattr(pkg, n)]; assert not missing, missing; "
    "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'dask', 'distributed')); "
    "assert not heavy, heavy"
)


@pytest.mark.parametrize("name", ["gpucal.io", "gpucal.templates"])
def test_room_package_exports_its_names_and_imports_no_plotting_or_dask(name):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _LIGHT_IMPORT.format(name=name)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


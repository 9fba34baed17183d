"""DESI-style frames in and out (host NumPy + astropy.io.fits; an edge module, it computes nothing).

Step of the mission: the first and last of a frame's calibration when the
frame comes in the layout of DESI's ``frame-*.fits`` / ``cframe-*.fits``:

=================  ==========================================================
HDU                content
=================  ==========================================================
``FLUX``           image ``(n_fibre, n_pix)`` (the primary HDU, or an
                   extension of that name); fibre axis 0.
``IVAR``           image, same shape: inverse variance (0 = no information).
``MASK``           optional integer image, same shape: non-zero = bad pixel.
``WAVELENGTH``     image ``(n_pix,)``: Å (``BUNIT``, default Å); the medium
                   from ``AIRORVAC``/``WAVEMED`` in its or the flux header
                   (DESI writes vacuum wavelengths; a file that does not say
                   is taken as air with a warning, or as ``--medium``).
``RESOLUTION``     optional ``(n_fibre, n_diag, n_pix)``: DESI's banded
                   resolution matrix per fibre, handed on as
                   ``Frame.resolution`` (not yet used for the LSF).
``FIBERMAP``       binary table, one row per fibre: ``OBJTYPE`` (``'STD'``
                   standard, ``'TGT'`` target, ``'SKY'``; anything else
                   unused) or a logical standards column (``STD``,
                   ``IS_STD``, ``STANDARD``, ``STDSTAR``; true = standard,
                   it wins over ``OBJTYPE``); names from ``NAME``, else
                   ``TARGETID``; positions from ``TARGET_RA``/``TARGET_DEC``
                   (else ``RA``/``DEC``), degrees; magnitude columns as the
                   fibre-table convention of
                   :func:`gpucal.photometry.photometry_from_fibres` (``g``,
                   ``dg``, …, or a speclite name such as ``decam2014-g``),
                   and DESI's ``FLUX_G/R/Z`` + ``FLUX_IVAR_G/R/Z``
                   (nanomaggies, ``PHOTSYS`` S = DECam, N = BASS/MzLS),
                   turned into such magnitude columns.
=================  ==========================================================

The Frame: flux as read; var = 1/IVAR, infinite where IVAR ≤ 0 or MASK ≠ 0
(bad pixels, masked, counted and carried by the pipeline); ``fibres`` the
FIBERMAP with the gpucal columns ``TYPE`` (``C``/``P``/``S``/``U``), ``NAME``,
``RA``, ``DEC`` added (an existing column of that name is kept as it is);
``layout = "desi"``; ``layout_extras`` the FIBERMAP as read, the MASK and the
headers.

The calibrated frame (:func:`write_calibrated_desi`, chosen by
:func:`gpucal.io.write_calibrated_frame` from ``Frame.layout``): ``FLUX``
(calibrated, erg/s/cm²/Å, the input's header plus the FLUXCAL keywords and
HISTORY), ``IVAR`` (1/variance, 0 where it is not finite), ``MASK`` (the
input's; 1 added where the calibrated pixel is not finite and the input's
was 0), ``WAVELENGTH`` and ``RESOLUTION`` as read, ``FIBERMAP`` as read, and
gpucal's ``FLUXCAL`` and ``FLUXSTD`` tables. Pixel order is the input's.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.io import fits
from astropy.table import Table

from ..containers import Frame
from ..errors import InputError, NoStandardsError
from ..spectral_wcs import length_unit_to_angstrom, medium_from_headers
from .files import _atomic_write, _check_destination
from .frames import (
    FLUX_BUNIT,
    _cal_columns,
    _cal_unit,
    _clean_header,
    _fibre_list,
    _fluxcal_hdu,
    _has,
    _history_cards,
    _host,
    _image,
    _increasing,
    _keyword_items,
    _mask_hdu,
    _native_table,
    _table_hdu,
)

__all__ = ["is_desi_layout", "read_desi_frame", "write_desi_frame", "write_calibrated_desi", "DESI_HDUS"]

#: The HDUs that make a file a DESI-style frame (FLUX may be the primary HDU).
DESI_HDUS = ("IVAR", "WAVELENGTH", "FIBERMAP")
_STD_COLUMNS = ("STD", "IS_STD", "STANDARD", "STDSTAR")
_OBJTYPE_TO_TYPE = {"STD": "C", "TGT": "P", "SKY": "S"}
IVAR_BUNIT = "1/(erg2/(s2 cm4 Angstrom2))"


def is_desi_layout(hdul) -> bool:
    """True when the open file has the DESI HDUs (IVAR, WAVELENGTH, FIBERMAP) and no gpucal VARIANCE."""
    return all(_has(hdul, n) for n in DESI_HDUS) and not _has(hdul, "VARIANCE")


def _flux_hdu_name(hdul) -> str:
    return "FLUX" if _has(hdul, "FLUX") else "PRIMARY"


def _same_shape(hdul, name: str, fname: str, shape: tuple) -> np.ndarray:
    arr = _image(hdul, name, fname)
    if arr.shape != shape:
        raise InputError(f"{fname} [{name}]: shape {arr.shape} does not match the FLUX image {shape}")
    return arr


def _wavelength(hdul, fname: str, n_pix: int) -> np.ndarray:
    w = _image(hdul, "WAVELENGTH", fname)
    if w.ndim == 2 and w.shape[0] >= 1 and np.all(w == w[:1]):
        w = w[0]
    if w.ndim != 1:
        raise InputError(f"{fname} [WAVELENGTH]: shape {w.shape}; a DESI frame's wavelengths are one (n_pix,) "
                         "grid (per-fibre wavelengths: write the frame in the gpucal layout with a 2-D WAVELA)")
    if w.shape[0] != n_pix:
        raise InputError(f"{fname} [WAVELENGTH]: {w.shape[0]} wavelengths for {n_pix} pixels")
    if not np.all(np.isfinite(w)):
        raise InputError(f"{fname} [WAVELENGTH]: {int(np.sum(~np.isfinite(w)))} NaN/inf wavelength(s)")
    unit = hdul["WAVELENGTH"].header.get("BUNIT")
    return w * length_unit_to_angstrom(unit, f"{fname} [WAVELENGTH] BUNIT")


def _fibre_types(fm: Table, fname: str) -> np.ndarray:
    n = len(fm)
    upper = {c.upper(): c for c in fm.colnames}
    std_col = next((upper[c] for c in _STD_COLUMNS if c in upper), None)
    types = np.full(n, "U", dtype="U1")
    if "OBJTYPE" in upper:
        obj = np.char.upper(np.char.strip(np.asarray(fm[upper["OBJTYPE"]]).astype(str)))
        for k, t in _OBJTYPE_TO_TYPE.items():
            types[obj == k] = t
    elif std_col is None:
        raise InputError(f"{fname} [FIBERMAP]: no OBJTYPE column and no standards column "
                         f"({', '.join(_STD_COLUMNS)}); columns: {', '.join(fm.colnames)}")
    if std_col is not None:
        flag = np.asarray(fm[std_col])
        if flag.dtype.kind not in "biu":
            raise InputError(f"{fname} [FIBERMAP] {std_col}: a standards column must be logical or integer 0/1")
        types[flag.astype(bool)] = "C"
    return types


def _fibres(hdul, fname: str, n_fibre: int) -> tuple:
    """(gpucal fibres table, FIBERMAP as read)."""
    if hdul["FIBERMAP"].is_image:
        raise InputError(f"{fname} [FIBERMAP]: must be a binary table, not an image")
    fm = _native_table(Table.read(hdul["FIBERMAP"], character_as_bytes=False, mask_invalid=False))
    if len(fm) != n_fibre:
        raise InputError(f"{fname} [FIBERMAP]: {len(fm)} rows for {n_fibre} fibres")
    out = Table(fm, copy=True)
    upper = {c.upper(): c for c in fm.colnames}
    out["TYPE"] = _fibre_types(fm, fname)
    if "NAME" not in out.colnames:
        src = upper.get("TARGETID")
        out["NAME"] = (np.asarray(fm[src]).astype(str) if src else
                       np.array([f"fibre {i + 1}" for i in range(n_fibre)]))
    for gp, cands in (("RA", ("TARGET_RA", "RA")), ("DEC", ("TARGET_DEC", "DEC"))):
        src = next((upper[c] for c in cands if c in upper), None)
        if gp not in out.colnames and src is not None:
            out[gp] = np.asarray(fm[src], dtype=np.float64)
    _add_legacy_magnitudes(out, fm, upper)
    return out, fm


def _add_legacy_magnitudes(out: Table, fm: Table, upper: dict) -> None:
    """AB magnitudes from DESI's Legacy Surveys fluxes ``FLUX_G/R/Z`` (nanomaggies) and ``FLUX_IVAR_*``.

    A unit change only: m = 22.5 − 2.5 log10 f, σ = 2.5 / ln 10 / (f √ivar). ``PHOTSYS``
    'S' rows are DECam (``decam2014-g``, ``-r``, ``-z``), 'N' rows BASS g, r and MzLS z
    (``BASS-g``, ``BASS-r``, ``MzLS-z``); without PHOTSYS, DECam. Each band is a column
    named by its speclite filter with ``<band>_err``; a row of the other system, a flux
    ≤ 0 or an inverse variance ≤ 0 holds the sentinels 99 / 9.99 (missing).
    """
    n = len(fm)
    sys_col = upper.get("PHOTSYS")
    photsys = (np.char.upper(np.char.strip(np.asarray(fm[sys_col]).astype(str))) if sys_col
               else np.full(n, "S"))
    systems = {"S": ("decam2014-g", "decam2014-r", "decam2014-z"), "N": ("BASS-g", "BASS-r", "MzLS-z")}
    for k, band in enumerate("GRZ"):
        fcol, icol = upper.get(f"FLUX_{band}"), upper.get(f"FLUX_IVAR_{band}")
        if fcol is None or icol is None:
            continue
        f = np.asarray(fm[fcol], dtype=np.float64)
        iv = np.asarray(fm[icol], dtype=np.float64)
        for code, names in systems.items():
            ok = (photsys == code) & np.isfinite(f) & (f > 0) & np.isfinite(iv) & (iv > 0)
            if not ok.any() or names[k] in out.colnames:
                continue
            fs, ivs = np.where(ok, f, 1.0), np.where(ok, iv, 1.0)
            out[names[k]] = np.where(ok, 22.5 - 2.5 * np.log10(fs), 99.0)
            out[f"{names[k]}_err"] = np.where(ok, 2.5 / np.log(10.0) / (fs * np.sqrt(ivs)), 9.99)


def _resolution(hdul, fname: str, n_fibre: int, n_pix: int):
    if not _has(hdul, "RESOLUTION"):
        return None
    r = _image(hdul, "RESOLUTION", fname)
    if r.ndim != 3 or r.shape[0] != n_fibre or r.shape[2] != n_pix or r.shape[1] % 2 != 1:
        raise InputError(f"{fname} [RESOLUTION]: shape {r.shape} is not (n_fibre, n_diag odd, n_pix) = "
                         f"({n_fibre}, n_diag, {n_pix})")
    return r


def read_desi_frame(hdul, fname: str, require_standards: bool = True) -> Frame:
    """An open DESI-style file (see the module docstring) as a Frame with ``layout = "desi"``."""
    fhdu = _flux_hdu_name(hdul)
    flux = _image(hdul, fhdu, fname)
    if flux.ndim != 2 or flux.shape[0] < 1 or flux.shape[1] < 2:
        raise InputError(f"{fname} [{fhdu}]: FLUX must be a 2-D (n_fibre, n_pix) image, got shape {flux.shape}")
    shape = flux.shape
    ivar = _same_shape(hdul, "IVAR", fname, shape)
    if np.any(ivar < 0):
        rows = np.flatnonzero(np.any(ivar < 0, axis=1))
        raise InputError(f"{fname} [IVAR]: negative inverse variance in fibre(s) {_fibre_list(rows)}")
    mask = _same_shape(hdul, "MASK", fname, shape).astype(np.int64) if _has(hdul, "MASK") else None
    bad = ~np.isfinite(ivar) | (ivar <= 0) | (mask != 0 if mask is not None else False)
    var = np.where(bad, np.inf, 1.0 / np.where(bad, 1.0, ivar))
    wave = _wavelength(hdul, fname, shape[1])
    resolution = _resolution(hdul, fname, shape[0], shape[1])
    wave, flux, var, flipped = _increasing(wave, flux, var, f"{fname} [WAVELENGTH]")
    if flipped and resolution is not None:
        resolution = resolution[:, ::-1, ::-1].copy()  # the band matrix of the reversed pixel axis
    fhdr, whdr = hdul[fhdu].header, hdul["WAVELENGTH"].header
    medium = medium_from_headers([(whdr, "WAVELENGTH"), (fhdr, fhdu), (hdul[0].header, "PRIMARY")], fname)
    fibres, fibermap = _fibres(hdul, fname, shape[0])
    frame = Frame(path=fname, flux=flux, var=var, wave=np.ascontiguousarray(wave, dtype=np.float64), fibres=fibres,
                  header=fhdr.copy(), medium=medium or "air", flipped=flipped, wave_source="WAVELENGTH",
                  ext_headers={n: hdul[n].header.copy() for n in ("IVAR", "MASK", "WAVELENGTH", "RESOLUTION")
                               if _has(hdul, n)},
                  layout="desi", medium_stated=medium is not None, resolution=resolution,
                  layout_extras={"fibermap": fibermap, "mask": mask, "wave_file": np.array(hdul["WAVELENGTH"].data),
                                 "resolution_file": None if resolution is None else np.array(hdul["RESOLUTION"].data)})
    if require_standards and frame.standards.size == 0:
        raise NoStandardsError(f"{fname} [FIBERMAP]: no standard-star fibre (OBJTYPE 'STD' or a true "
                               f"{'/'.join(_STD_COLUMNS)} column)")
    return frame


def write_desi_frame(path, flux, ivar, wave, fibermap, *, mask=None, resolution=None, header=None,
                     overwrite: bool = False) -> None:
    """Write a DESI-style frame (tests, fixtures, and converting a frame to this layout)."""
    hdr = _clean_header(header)
    hdr["EXTNAME"] = "FLUX"
    hdus = [fits.PrimaryHDU(np.asarray(flux, dtype=np.float32), header=hdr),
            fits.ImageHDU(np.asarray(ivar, dtype=np.float32), name="IVAR")]
    if mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(mask, dtype=np.int32), name="MASK"))
    wh = fits.ImageHDU(np.asarray(wave, dtype=np.float64), name="WAVELENGTH")
    wh.header["BUNIT"] = "Angstrom"
    hdus.append(wh)
    if resolution is not None:
        hdus.append(fits.ImageHDU(np.asarray(resolution, dtype=np.float32), name="RESOLUTION"))
    hdus.append(_table_hdu(fibermap, "FIBERMAP", "write_desi_frame: fibermap"))
    _atomic_write(fits.HDUList(hdus), os.fspath(path), overwrite)


def _primary(frame: Frame, data: np.ndarray, keywords, history) -> fits.PrimaryHDU:
    phdr = _clean_header(frame.header)
    phdr["EXTNAME"] = "FLUX"
    phdr["BUNIT"] = (FLUX_BUNIT, "flux density unit")
    for k, value, comment in _keyword_items(keywords):
        phdr[k] = (value, comment)
    for line in [history] if isinstance(history, str) else history:
        for chunk in _history_cards(line):
            phdr.add_history(chunk)
    return fits.PrimaryHDU(np.ascontiguousarray(data), header=phdr)


def write_calibrated_desi(path, frame: Frame, flux, var, *, cal_wave, cal, cal_var, cal_measured, per_star=None,
                          keywords=None, history=(), overwrite: bool = False, mask=None, mask_bits=None,
                          provenance=None) -> None:
    """The calibrated frame in the DESI layout it came in (see the module docstring); as write_calibrated_frame.

    The layout's own ``MASK`` keeps its meaning (the input's bits; 1 where gpucal found a bad
    pixel); gpucal's bit flags go to ``FCALMASK`` (documented as in gpucal's layout), the
    provenance to ``PROVENANCE``; every HDU gets CHECKSUM and DATASUM.
    """
    path = os.fspath(path)
    _check_destination(path, overwrite, protect=frame.path or None)
    flux, var = _host(flux, "flux"), _host(var, "var")
    shape = (frame.n_fibre, frame.n_pix)
    if flux.shape != shape or var.shape != shape:
        raise InputError(f"write_calibrated_frame: flux {flux.shape} / var {var.shape} must have the frame's "
                         f"shape {shape}")
    cal_columns = _cal_columns(cal_wave, cal, cal_var, cal_measured)
    if frame.flipped:
        flux, var = flux[:, ::-1], var[:, ::-1]
    good = np.isfinite(var) & (var > 0) & np.isfinite(flux)
    ivar = np.where(good, 1.0 / np.where(good, var, 1.0), 0.0)
    extras = frame.layout_extras
    mask = extras.get("mask")
    mask = np.zeros(shape, dtype=np.int32) if mask is None else np.asarray(mask, dtype=np.int32).copy()
    mask[(mask == 0) & ~good] = 1
    hdus = [_primary(frame, flux, keywords, history)]
    ihdr = _clean_header(frame.ext_headers.get("IVAR"))
    ihdr["BUNIT"] = IVAR_BUNIT
    hdus.append(fits.ImageHDU(np.ascontiguousarray(ivar), header=ihdr, name="IVAR"))
    hdus.append(fits.ImageHDU(mask, header=_clean_header(frame.ext_headers.get("MASK")), name="MASK"))
    hdus.append(fits.ImageHDU(extras["wave_file"], header=_clean_header(frame.ext_headers.get("WAVELENGTH")),
                              name="WAVELENGTH"))
    if extras.get("resolution_file") is not None:
        hdus.append(fits.ImageHDU(extras["resolution_file"], name="RESOLUTION",
                                  header=_clean_header(frame.ext_headers.get("RESOLUTION"))))
    hdus.append(_table_hdu(extras["fibermap"], "FIBERMAP", "write_calibrated_frame: FIBERMAP"))
    hdus.append(_fluxcal_hdu(*cal_columns, _cal_unit(frame.header.get("BUNIT")), frame.medium))
    if per_star is not None:
        hdus.append(_table_hdu(per_star, "FLUXSTD", "write_calibrated_frame: per_star"))
    if mask is not None:
        hdus.append(_mask_hdu(mask, mask_bits, shape, frame.flipped))
        hdus[-1].name = "FCALMASK"
    if provenance is not None:
        hdus.append(_table_hdu(provenance, "PROVENANCE", "write_calibrated_frame: provenance"))
    _atomic_write(fits.HDUList(hdus), path, overwrite, protect=frame.path or None, checksum=True)

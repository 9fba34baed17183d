"""FITS frames in and out (host NumPy + astropy.io.fits; an edge module).

Step of the mission: the first and the last of a frame's calibration. In: a
reduced fibre frame on disk -> :class:`~gpucal.containers.Frame` (flux, var
(n_fibre, n_pix) float64, wave (n_pix,) Å increasing, or (n_fibre, n_pix) when
the fibres have their own solutions, the FIBRES table).
Out: calibrated flux and variance (n_fibre, n_pix) in erg/s/cm²/Å, the
calibration vector (n_cal,) and the per-star table -> a FITS file in the
input's layout. Computes nothing beyond unit factors and pixel order.

Input frame layout
------------------
=============  ==============================================================
HDU            content
=============  ==============================================================
primary        image ``(n_fibre, n_pix)``: ``NAXIS2`` = fibres (axis 0),
               ``NAXIS1`` = pixels (axis 1). The fibre axis is fixed by this
               convention and is never guessed from the shape, so a square
               frame is unambiguous.
``VARIANCE``   image, same shape as the primary, variance of each pixel.
``WAVELA``     optional image: wavelength of each pixel, ``(n_pix,)`` or
               ``(n_fibre, n_pix)``; unit from its ``BUNIT`` (default Å;
               a logarithmic unit such as ``dex(Angstrom)`` is refused).
               Per-fibre rows that agree to 1e-6 Å are collapsed to one grid
               (``Frame.wave`` (n_pix,)); rows that differ are kept as each
               fibre's own solution (``Frame.wave`` (n_fibre, n_pix)). Every
               row must be finite, positive and strictly monotonic, all in the
               same direction.
               Without ``WAVELA``, the spectral WCS on axis 1 of the primary
               header (:mod:`gpucal.spectral_wcs`): linear (``CRVAL1``,
               ``CDELT1`` or ``CD1_1``, ``CRPIX1``, FITS default 0 when absent,
               ``CUNIT1`` Å/nm/µm/m, default Å; logarithmic units refused),
               IRAF log-linear (``DC-FLAG = 1``: log10 λ), ``WAVE``/``AWAV``
               with any astropy.wcs algorithm (``WAVE-LOG``, …), SDSS
               ``COEFF0``/``COEFF1``; frequency and velocity axes refused.
``LSF``        optional image: the instrument's line-spread FWHM in Å at each
               pixel, ``(n_fibre, n_pix)`` (one LSF per fibre and wavelength)
               or ``(n_pix,)`` (one for all fibres); unit from ``BUNIT``
               (default Å). Finite and positive everywhere. Read into
               ``Frame.lsf_fwhm`` and written back out with the calibrated frame.
``FIBRES``     binary table, one row per fibre (row i = image row i = fibre
               number i + 1), with a ``TYPE`` column (``'C'`` marks a
               standard star) and optionally NAME, RA, DEC and magnitudes.
               A NAME shared by several fibres (sky and unused fibres
               aside) is logged as a warning naming them; they are kept.
=============  ==============================================================

The wavelength medium is read from ``WAVEMED`` or ``AIRORVAC`` (in the
``WAVELA`` header, else the primary header; ``AIR``/``VAC``/``VACUUM``), else
from ``CTYPE1`` when the WCS is used (``AWAV`` = air, ``WAVE`` = vacuum). When
none says, ``Frame.medium`` is air with ``Frame.medium_stated`` False: the
pipeline warns and takes ``--medium`` (``calibrate_frame(medium=...)``).

Other layouts: a DESI-style frame (``FLUX``, ``IVAR``, ``MASK``,
``WAVELENGTH``, ``FIBERMAP``) is read by :mod:`gpucal.io.desi` and written
back in its own layout (``Frame.layout``); docs/layouts.md lists every layout.

Wavelengths that decrease strictly along the pixel axis are accepted: the
pixel axis of flux, variance and wavelength is reversed together so that
``Frame.wave`` always increases, and ``Frame.flipped`` records it; the writer
reverses it back, so an output frame has the input's pixel order.

NaN flux and NaN / zero / infinite variance are bad pixels, not errors (the
pipeline masks them); a negative finite variance is an error.

Calibrated frame layout (:func:`write_calibrated_frame`)
--------------------------------------------------------
primary (calibrated flux, ``BUNIT = 'erg/(s cm2 Angstrom)'``, the input's
primary header plus the caller's FLUXCAL* keywords and one HISTORY card (or
more, when a long line wraps) per history string), ``VARIANCE``
(``BUNIT = 'erg2/(s2 cm4 Angstrom2)'``), ``WAVELA`` (Å, only when the input had
one, per fibre when the input's was; otherwise the input's WCS keywords are kept and still apply because the
pixel order is the input's), ``LSF`` (when the input had one), ``FIBRES`` (copied), and two calibration
extensions: ``FLUXCAL`` (columns ``WAVE`` [Angstrom], ``CAL``, ``CAL_VAR``,
``MEASURED`` [logical; False = interpolated across telluric or uncovered
pixels], in increasing wavelength) and ``FLUXSTD`` (the per-star table). The
design's single "FLUXCAL extension holding the vector, its variance and the
per-star table" is two HDUs because a FITS table has one row length: the
vector is per pixel, the per-star table per star. Then ``MASK`` (int32
``(n_fibre, n_pix)`` bit flags per fibre pixel, 0 = clean, the bits named in its
header as ``MASKB<k>``; see :mod:`gpucal.calibration.maskbits`), ``PROVENANCE``
(KEY, VALUE: input files and their SHA-256, template grid and hash, LSF, every
option, command line, versions, date; :mod:`gpucal.report.provenance`), and
every extension of the input gpucal does not know (not PRIMARY, VARIANCE,
WAVELA, FIBRES, nor one of the outputs), byte for byte in input order. Every
HDU carries CHECKSUM and DATASUM.

Every image is written as native float64, atomically and never onto the
input frame (:mod:`gpucal.io.files`).

Reading is defensive: header sizes are checked before astropy parses a file,
and any damage astropy meets becomes an InputError naming the file and HDU
(:mod:`gpucal.io.guard`).
"""

from __future__ import annotations

import logging
import os
import re
import textwrap
import warnings

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table

from ..containers import Frame, CalibratedFrame
from ..errors import InputError, NoStandardsError
from ..spectral_wcs import length_unit_to_angstrom, medium_from_headers, medium_word, wcs_wavelengths
from .files import _atomic_write, _check_destination
from .guard import _open

logger = logging.getLogger("gpucal")

__all__ = [
    "read_frame",
    "write_frame",
    "write_calibrated_frame",
    "read_calibrated_frame",
    "FLUX_BUNIT",
    "VAR_BUNIT",
    "WAVE_TOL",
]

#: BUNIT of a calibrated flux image.
FLUX_BUNIT = "erg/(s cm2 Angstrom)"
#: BUNIT of its variance.
VAR_BUNIT = "erg2/(s2 cm4 Angstrom2)"
#: Largest difference (Å) between per-fibre WAVELA rows that still counts as one grid.
WAVE_TOL = 1e-6
#: Relative tolerance for a wavelength grid to count as linear (write_frame, WCS).
_LINEAR_RTOL = 1e-6

_MEDIUM_CARD = {"air": "AIR", "vacuum": "VACUUM"}  # the WAVEMED value written for a medium
# Cards never copied from an input header into an output HDU (astropy writes
# the structural ones itself; scaling and checksums no longer apply).
_DROP_KEYS = {
    "SIMPLE", "XTENSION", "BITPIX", "EXTEND", "PCOUNT", "GCOUNT", "GROUPS",
    "BSCALE", "BZERO", "BLANK", "CHECKSUM", "DATASUM", "BUNIT", "EXTNAME",
    "EXTVER", "INHERIT",
}
_RESERVED_KEYS = _DROP_KEYS | {"END", "HISTORY", "COMMENT", "CONTINUE", ""}
_KEY_RE = re.compile(r"^[A-Z0-9_-]{1,8}$")
_ASCII_MAP = {
    "Å": "A", "å": "a", "σ": "sigma", "χ": "chi", "²": "2", "³": "3", "±": "+/-",
    "−": "-", "–": "-", "—": "-", "λ": "lambda", "µ": "u", "μ": "u", "×": "x",
    "≤": "<=", "≥": ">=", "°": "deg", "’": "'", "‘": "'", "“": '"', "”": '"',
}


# ---------------------------------------------------------------------------
# helpers


def _as_numpy(x) -> np.ndarray:
    """A NumPy view of a NumPy or backend array (a device array is copied to the host)."""
    try:
        return np.asarray(x)
    except TypeError:
        from ..backends import to_numpy

        return to_numpy(x)


def _host(x, name: str) -> np.ndarray:
    """A host float64 array from a NumPy or backend array."""
    arr = _as_numpy(x)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.float64, order="C", copy=True)


def _ascii(text: str) -> str:
    text = str(text)
    for k, v in _ASCII_MAP.items():
        text = text.replace(k, v)
    text = "".join(ch if 32 <= ord(ch) < 127 else ("?" if ord(ch) >= 127 else " ") for ch in text)
    return text


def _fibre_list(rows: np.ndarray, limit: int = 5) -> str:
    nums = [str(int(r) + 1) for r in rows[:limit]]
    more = f" and {len(rows) - limit} more" if len(rows) > limit else ""
    return ", ".join(nums) + more


def _native_table(t: Table) -> Table:
    """Numeric columns to native byte order (big-endian FITS data is not usable on GPUs)."""
    for name in t.colnames:
        col = t[name]
        dt = col.dtype
        if dt.kind in "biufc" and not dt.isnative:
            t[name] = col.astype(dt.newbyteorder("="))
    return t


#: A logarithmic unit spelled out: ``log(...)``, ``ln(...)``, ``dex(...)``, ``exp(...)`` or bare ``dex``.
_length_unit_to_angstrom = length_unit_to_angstrom
_medium_word = medium_word


def _medium_from_headers(headers, fname: str):
    """The medium keyword (WAVEMED, AIRORVAC) of the first header that has one, else None."""
    return medium_from_headers(headers, fname)


def _wcs_wave(hdr: fits.Header, n_pix: int, fname: str):
    """(wavelengths (n_pix,) Å, CTYPE1's medium or None) from the spectral WCS on axis 1, or (None, None).

    Any wavelength WCS :func:`gpucal.spectral_wcs.wcs_wavelengths` reads: linear,
    IRAF log-linear (``DC-FLAG = 1``), ``WAVE``/``AWAV`` with any astropy.wcs
    algorithm (``WAVE-LOG``, ...), ``CUNIT1``; SDSS ``COEFF0``/``COEFF1``.
    """
    return wcs_wavelengths(hdr, n_pix, f"{fname} [PRIMARY] WCS")


# ---------------------------------------------------------------------------
# reading


def _image(hdul, name: str, fname: str) -> np.ndarray:
    hdu = hdul[name]
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
        raise InputError(f"{fname} [{name}]: expected an image HDU, found {type(hdu).__name__}")
    if hdu.data is None:
        raise InputError(f"{fname} [{name}]: HDU has no data")
    data = np.asarray(hdu.data)
    if data.dtype.kind not in "biuf":
        raise InputError(f"{fname} [{name}]: image has non-numeric dtype {data.dtype}")
    return np.array(data, dtype=np.float64, order="C", copy=True)


def _has(hdul, name: str) -> bool:
    try:
        hdul.index_of(name)
    except KeyError:
        return False
    return True


def read_frame(path, *, require_standards: bool = True) -> Frame:
    """Read and validate a reduced fibre frame (see the module docstring for the layout).

    Raises :class:`~gpucal.errors.InputError` for anything malformed (the message
    names the file and the HDU or fibres) and
    :class:`~gpucal.errors.NoStandardsError` when no fibre has TYPE 'C' and
    ``require_standards`` is true. The file is opened read-only and never modified.
    """
    fname = os.fspath(path)
    hdul = _open(fname)
    try:
        from .desi import is_desi_layout, read_desi_frame  # the layout dispatch (docs/layouts.md)

        if is_desi_layout(hdul):
            return read_desi_frame(hdul, fname, require_standards)
        return _read_frame(hdul, fname, require_standards)
    finally:
        hdul.close()


def _read_frame(hdul, fname: str, require_standards: bool) -> Frame:
    """Validate an open frame's HDUs, in the order the checks are documented, into a Frame."""
    prim = hdul[0]
    flux = _read_primary(hdul, fname)
    n_fibre, n_pix = flux.shape
    var = _read_variance(hdul, fname, flux.shape)
    ext_headers = {"VARIANCE": hdul["VARIANCE"].header.copy()}
    wave, wave_source, wave_ndim, wave_hdr, wcs_medium = _read_wave(hdul, fname, flux.shape)
    if wave_hdr is not None:
        ext_headers["WAVELA"] = wave_hdr.copy()
    hname = "WAVELA" if wave_source == "WAVELA" else "PRIMARY"
    wave, flux, var, flipped = _increasing(wave, flux, var, f"{fname} [{hname}]")
    medium, medium_stated = _frame_medium(wave_hdr, prim.header, wcs_medium, fname)
    fibres = _read_fibres(hdul, fname, n_fibre)
    _check_variance_values(var, fname)
    lsf_fwhm, lsf_hdr = _read_lsf(hdul, fname, flux.shape, flipped)
    if lsf_hdr is not None:
        ext_headers["LSF"] = lsf_hdr
    extra_hdus = _unknown_hdus(hdul, fname)
    frame = Frame(
        path=fname,
        flux=flux,
        var=var,
        wave=np.ascontiguousarray(wave, dtype=np.float64),
        fibres=fibres,
        header=prim.header.copy(),
        medium=medium,
        flipped=flipped,
        wave_source=wave_source,
        wave_ndim=int(wave_ndim),
        ext_headers=ext_headers,
        medium_stated=medium_stated,
        lsf_fwhm=lsf_fwhm,
        extra_hdus=extra_hdus,
    )
    if require_standards and frame.standards.size == 0:
        types = sorted(set(frame.fibre_types.tolist()))
        raise NoStandardsError(
            f"{fname} [FIBRES]: no standard-star fibre (TYPE 'C'); TYPE values present: "
            f"{', '.join(repr(t) for t in types) or 'none'}"
        )
    return frame


#: Extensions gpucal reads from an input frame; every other one is carried through unchanged.
KNOWN_INPUT_HDUS = frozenset({"PRIMARY", "VARIANCE", "WAVELA", "LSF", "FIBRES"})
#: Extensions gpucal writes into a calibrated frame (replaced, not carried, when a frame is recalibrated).
OUTPUT_HDUS = frozenset({"FLUXCAL", "FLUXSTD", "MASK", "PROVENANCE"})


def _unknown_hdus(hdul, fname: str) -> tuple:
    """(EXTNAME, raw header + data bytes) of every extension gpucal neither reads nor writes, in file order.

    The bytes are the file's own, so the writer can carry the HDU byte for byte
    (only CHECKSUM/DATASUM are added to its header when it has none).
    """
    spans = []
    ours = hdul[0].header.get("FLUXCAL") is True  # a gpucal output, recalibrated: its outputs are replaced
    for hdu in hdul[1:]:
        name = str(hdu.name).strip().upper()
        if name in OUTPUT_HDUS and not ours:
            logger.warning("%s [%s]: the output's own %s extension replaces it (it is not carried)", fname, name, name)
        if name in KNOWN_INPUT_HDUS or name in OUTPUT_HDUS:
            continue
        info = hdu.fileinfo()
        if info is None:
            continue
        spans.append((name, info["hdrLoc"], info["datLoc"] + info["datSpan"]))
    if not spans:
        return ()
    out = []
    with open(fname, "rb") as fh:
        for name, start, stop in spans:
            fh.seek(start)
            out.append((name, fh.read(stop - start)))
    for name, _ in out:
        logger.info("%s [%s]: extension not used by gpucal, carried into the output unchanged", fname, name)
    return tuple(out)


def _read_primary(hdul, fname: str) -> np.ndarray:
    """The primary image, (n_fibre, n_pix) float64, with at least one fibre and two pixels."""
    if hdul[0].data is None:
        raise InputError(
            f"{fname} [PRIMARY]: no image data; the (n_fibre, n_pix) frame must be in the primary HDU"
        )
    flux = _image(hdul, "PRIMARY", fname)
    if flux.ndim != 2:
        raise InputError(
            f"{fname} [PRIMARY]: image must be 2-D (n_fibre, n_pix), got {flux.ndim}-D shape {flux.shape}"
        )
    n_fibre, n_pix = flux.shape
    if n_fibre < 1 or n_pix < 2:
        raise InputError(f"{fname} [PRIMARY]: image shape {flux.shape} is too small")
    return flux


def _read_variance(hdul, fname: str, shape: tuple) -> np.ndarray:
    """The VARIANCE image, float64 of the primary's ``shape`` (its values are checked later)."""
    if not _has(hdul, "VARIANCE"):
        raise InputError(f"{fname}: no VARIANCE extension")
    var = _image(hdul, "VARIANCE", fname)
    if var.shape != shape:
        raise InputError(
            f"{fname} [VARIANCE]: shape {var.shape} does not match the primary image {shape}"
        )
    return var


def _read_wave(hdul, fname: str, shape: tuple):
    """(wave (n_pix,) Å, source 'WAVELA' or 'wcs', WAVELA ndim, WAVELA header or None, WCS medium or None)."""
    n_pix = shape[1]
    if _has(hdul, "WAVELA"):
        w = _image(hdul, "WAVELA", fname)
        wave_hdr = hdul["WAVELA"].header
        wave_ndim = w.ndim
        w = _one_wave_grid(w, fname, shape)
        factor = _length_unit_to_angstrom(wave_hdr.get("BUNIT"), f"{fname} [WAVELA] BUNIT")
        return w * factor, "WAVELA", wave_ndim, wave_hdr, None
    wave, wcs_medium = _wcs_wave(hdul[0].header, n_pix, fname)
    if wave is None:
        raise InputError(
            f"{fname}: no wavelengths: neither a WAVELA extension nor a linear WCS "
            "(CRVAL1 and CDELT1 or CD1_1) in the primary header"
        )
    if not np.all(np.isfinite(wave)):
        raise InputError(f"{fname} [PRIMARY] WCS: NaN/inf wavelengths")
    return wave, "wcs", 1, None, wcs_medium


def _one_wave_grid(w: np.ndarray, fname: str, shape: tuple) -> np.ndarray:
    """The WAVELA image as one (n_pix,) grid: 1-D, or per-fibre rows that agree to WAVE_TOL."""
    n_fibre, n_pix = shape
    if w.ndim == 1:
        if w.shape[0] != n_pix:
            raise InputError(
                f"{fname} [WAVELA]: {w.shape[0]} wavelengths for {n_pix} pixels"
            )
    elif w.ndim == 2:
        if w.shape not in ((n_fibre, n_pix), (1, n_pix)):
            raise InputError(
                f"{fname} [WAVELA]: shape {w.shape} matches neither (n_pix,) = ({n_pix},) "
                f"nor (n_fibre, n_pix) = {shape}"
            )
    else:
        raise InputError(f"{fname} [WAVELA]: must be 1-D or 2-D, got shape {w.shape}")
    bad = ~np.isfinite(w)
    if bad.any():
        where = ""
        if w.ndim == 2:
            where = f" (fibre(s) {_fibre_list(np.flatnonzero(bad.any(axis=1)))})"
        raise InputError(f"{fname} [WAVELA]: {int(bad.sum())} NaN/inf wavelength(s){where}")
    if w.ndim == 1:
        return w
    dev = np.abs(w - w[0:1]).max(axis=1)
    if np.any(dev > WAVE_TOL):  # each fibre keeps its own solution
        return w.copy()
    return w[0].copy()


def _increasing(wave, flux, var, where: str):
    """(wave, flux, var, flipped) with wave increasing: a strictly decreasing grid reverses the pixel axis.

    ``wave`` (n_pix,) or per fibre (n_fibre, n_pix): every row monotonic, all in one direction.
    """
    if np.any(wave <= 0):
        raise InputError(f"{where}: wavelengths must be positive")
    d = np.diff(np.atleast_2d(wave), axis=1)
    up, down = np.all(d > 0, axis=1), np.all(d < 0, axis=1)
    if np.all(up):
        return wave, flux, var, False
    if np.all(down):
        return wave[..., ::-1].copy(), flux[:, ::-1].copy(), var[:, ::-1].copy(), True
    rows = np.flatnonzero(~(up | down))
    if rows.size:
        r = int(rows[0])
        dr = d[r]
        k = int(np.flatnonzero(dr <= 0)[0] if dr[0] > 0 else np.flatnonzero(dr >= 0)[0])
        fib = f"fibre {r + 1}: " if wave.ndim == 2 else ""
        raise InputError(
            f"{where}: wavelengths are not strictly monotonic "
            f"({fib}first break between pixels {k + 1} and {k + 2}, 1-based)"
        )
    raise InputError(
        f"{where}: per-fibre wavelengths run in different directions (fibre(s) "
        f"{_fibre_list(np.flatnonzero(down if up.sum() >= down.sum() else up))} against the others)"
    )


def _frame_medium(wave_hdr, prim_hdr, wcs_medium, fname: str):
    """(medium, stated): the medium keyword (WAVELA header, then primary), else CTYPE1's; a conflict is an error.

    Neither: ``("air", False)``; the pipeline warns and takes ``--medium`` (never a silent guess).
    """
    medium = _medium_from_headers([(wave_hdr, "WAVELA"), (prim_hdr, "PRIMARY")], fname)
    if medium is None:
        return (wcs_medium, True) if wcs_medium else ("air", False)
    if wcs_medium is not None and wcs_medium != medium:
        raise InputError(
            f"{fname} [PRIMARY]: CTYPE1 = {prim_hdr['CTYPE1']!r} says {wcs_medium} "
            f"but the medium keyword says {medium}"
        )
    return medium, True


def _read_fibres(hdul, fname: str, n_fibre: int) -> Table:
    """The FIBRES table (native byte order) with a ``TYPE`` column and one row per fibre."""
    if not _has(hdul, "FIBRES"):
        raise InputError(f"{fname}: no FIBRES binary table extension")
    fhdu = hdul["FIBRES"]
    if not isinstance(fhdu, fits.BinTableHDU):
        raise InputError(f"{fname} [FIBRES]: expected a binary table, found {type(fhdu).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fibres = Table.read(
                fhdu, character_as_bytes=False, mask_invalid=False, unit_parse_strict="silent"
            )
    except Exception as exc:  # malformed table formats
        raise InputError(f"{fname} [FIBRES]: cannot read table ({exc})") from None
    fibres = _native_table(fibres)
    upper = {c.upper(): c for c in fibres.colnames}
    if "TYPE" not in fibres.colnames:
        if "TYPE" in upper:
            fibres.rename_column(upper["TYPE"], "TYPE")
        else:
            raise InputError(f"{fname} [FIBRES]: no TYPE column (columns: {', '.join(fibres.colnames)})")
    if len(fibres) != n_fibre:
        raise InputError(
            f"{fname} [FIBRES]: {len(fibres)} rows but the image has {n_fibre} fibres (NAXIS2)"
        )
    _warn_duplicate_names(fibres, fname)
    return fibres


#: Fibre TYPEs whose NAME is a placeholder (sky, unused/unallocated), not checked for duplicates.
_PLACEHOLDER_TYPES = frozenset({"S", "N", "U"})


def _warn_duplicate_names(fibres: Table, fname: str) -> None:
    """Log a warning (logger ``gpucal``) per NAME shared by several fibres; the data are kept.

    Names identify standards in the catalogue and fibres in the outputs, so a
    shared name is ambiguous. Empty names and sky/unused fibres
    (:data:`_PLACEHOLDER_TYPES`) are not checked. Fibres are numbered from 1.
    """
    if "NAME" not in fibres.colnames:
        return
    names = [str(v).strip() for v in fibres["NAME"]]
    types = [str(v).strip().upper() for v in fibres["TYPE"]]
    where = {}
    for k, (name, kind) in enumerate(zip(names, types)):
        if name and kind not in _PLACEHOLDER_TYPES:
            where.setdefault(name, []).append(k)
    for name, rows in where.items():
        if len(rows) > 1:
            logger.warning(
                "%s [FIBRES]: fibres %s share NAME %r; each is calibrated, but the name no longer "
                "identifies one fibre (a catalogue match by name gives them the same photometry)",
                fname, _fibre_list(np.asarray(rows)), name,
            )


def _check_variance_values(var: np.ndarray, fname: str) -> None:
    """A negative finite variance is an error; NaN, inf and 0 are bad pixels the pipeline masks."""
    with np.errstate(invalid="ignore"):
        neg = np.isfinite(var) & (var < 0)
    if neg.any():
        rows = np.flatnonzero(neg.any(axis=1))
        raise InputError(
            f"{fname} [VARIANCE]: negative variance in fibre(s) {_fibre_list(rows)} "
            f"({int(neg.sum())} pixel(s))"
        )


# ---------------------------------------------------------------------------
# writing


def _table_hdu(table, name: str, what: str) -> fits.BinTableHDU:
    if not isinstance(table, Table):
        try:
            table = Table(table)
        except Exception as exc:
            raise InputError(f"{what} must be an astropy Table or convertible to one ({exc})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            hdu = fits.table_to_hdu(table)
    except Exception as exc:
        raise InputError(f"{what} cannot be written as a FITS table ({exc})") from None
    for i, col in enumerate(table.columns.values(), start=1):
        tunit = getattr(col, "meta", {}).get("tunit")  # a unit astropy cannot write in FITS (log(cm.s**-2), dex)
        if tunit and f"TUNIT{i}" not in hdu.header:
            hdu.header[f"TUNIT{i}"] = str(tunit)
    hdu.name = name
    return hdu


def _clean_header(hdr: fits.Header | None) -> fits.Header:
    out = fits.Header()
    if hdr is None:
        return out
    dropped = []
    for card in hdr.cards:
        key = card.keyword.upper()
        if key in _DROP_KEYS or key.startswith("NAXIS") or key == "END":
            continue
        try:
            # astropy reads some cards it refuses to write (an illegal keyword, an unparsable value)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                card.verify("exception")
                _ = card.value
        except Exception:  # noqa: BLE001 -- any card astropy cannot verify is left out
            dropped.append(key or "(blank)")
            continue
        out.append(card, end=True)
    if dropped:
        logger.warning("header card(s) %s cannot be written to FITS and are left out", ", ".join(dropped))
    return out


def _linear_wcs(wave: np.ndarray):
    d = np.diff(wave)
    cdelt = (wave[-1] - wave[0]) / (wave.size - 1)
    if not np.allclose(d, cdelt, rtol=_LINEAR_RTOL, atol=0.0):
        raise InputError(
            "write_frame: wave_hdu='wcs' needs a linear wavelength grid "
            f"(steps range {d.min():.6g}..{d.max():.6g} Å); use wave_hdu='WAVELA'"
        )
    return float(wave[0]), float(cdelt)


def write_frame(
    path,
    flux,
    var,
    wave,
    fibres,
    header: fits.Header | None = None,
    *,
    wave_hdu: str = "WAVELA",
    medium: str | None = None,
    overwrite: bool = False,
) -> None:
    """Write an input-style frame (primary image, VARIANCE, WAVELA or WCS, FIBRES).

    flux, var : (n_fibre, n_pix); wave : (n_pix,) Å, or (n_fibre, n_pix) with
    ``wave_hdu='WAVELA'``; fibres : astropy Table (or anything Table() accepts)
    with n_fibre rows. ``wave_hdu='wcs'`` writes CRVAL1/CDELT1/CRPIX1=1/CUNIT1
    into the primary header instead of a WAVELA extension (the grid must be
    linear). ``medium`` ('air'/'vacuum'), when given, is written as WAVEMED.
    """
    path = os.fspath(path)
    flux = _host(flux, "flux")
    var = _host(var, "var")
    wave = _host(wave, "wave")
    if flux.ndim != 2:
        raise InputError(f"write_frame: flux must be 2-D (n_fibre, n_pix), got shape {flux.shape}")
    if var.shape != flux.shape:
        raise InputError(f"write_frame: var shape {var.shape} != flux shape {flux.shape}")
    n_fibre, n_pix = flux.shape
    if wave.shape not in ((n_pix,), (n_fibre, n_pix)):
        raise InputError(
            f"write_frame: wave shape {wave.shape} is neither ({n_pix},) nor {flux.shape}"
        )
    fib_hdu = _table_hdu(fibres, "FIBRES", "write_frame: fibres")
    if fib_hdu.data is None or len(fib_hdu.data) != n_fibre:
        n = 0 if fib_hdu.data is None else len(fib_hdu.data)
        raise InputError(f"write_frame: fibres has {n} rows for {n_fibre} fibres")
    hdr = _clean_header(header)
    if medium is not None:
        hdr["WAVEMED"] = (_MEDIUM_CARD[_medium_word(medium, "write_frame medium")],
                          "wavelength medium")
    mode = str(wave_hdu)
    hdus = [fits.PrimaryHDU(flux, header=hdr), fits.ImageHDU(var, name="VARIANCE")]
    if mode.upper() == "WAVELA":
        wh = fits.ImageHDU(wave, name="WAVELA")
        wh.header["BUNIT"] = ("Angstrom", "wavelength unit")
        hdus.append(wh)
    elif mode.lower() == "wcs":
        if wave.ndim != 1:
            raise InputError("write_frame: wave_hdu='wcs' needs a 1-D wave")
        crval, cdelt = _linear_wcs(wave)
        ph = hdus[0].header
        ph["CRVAL1"] = (crval, "wavelength of reference pixel")
        ph["CDELT1"] = (cdelt, "wavelength step per pixel")
        ph["CRPIX1"] = (1.0, "reference pixel (1-based)")
        ph["CUNIT1"] = ("Angstrom", "wavelength unit")
        if "CTYPE1" not in ph:
            ph["CTYPE1"] = ("AWAV" if medium == "air" else "WAVE" if medium == "vacuum" else "LINEAR",
                            "wavelength axis")
    else:
        raise InputError(f"write_frame: wave_hdu must be 'WAVELA' or 'wcs', got {wave_hdu!r}")
    hdus.append(fib_hdu)
    _atomic_write(fits.HDUList(hdus), path, overwrite)


def _keyword_items(keywords):
    items = []
    for key, spec in (keywords or {}).items():
        k = str(key).strip().upper()
        if not _KEY_RE.match(k) or k in _RESERVED_KEYS or k.startswith("NAXIS"):
            raise InputError(
                f"write_calibrated_frame: invalid FITS keyword {key!r} "
                "(1-8 characters of A-Z 0-9 _ -, not a structural keyword)"
            )
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise InputError(f"write_calibrated_frame: keyword {k}: give (value, comment)")
            value, comment = spec
        else:
            value, comment = spec, ""
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str):
            value = _ascii(value)
        elif isinstance(value, bool):
            pass
        elif isinstance(value, (int, float)):
            if isinstance(value, float) and not np.isfinite(value):
                raise InputError(
                    f"write_calibrated_frame: keyword {k} = {value!r}: FITS headers cannot hold NaN/inf"
                )
        else:
            raise InputError(
                f"write_calibrated_frame: keyword {k}: value must be bool, int, float or str, "
                f"got {type(value).__name__}"
            )
        items.append((k, value, _ascii(comment or "")))
    return items


def _cal_unit(input_bunit) -> str:
    base = u.Unit(FLUX_BUNIT)
    if input_bunit:
        try:
            inu = u.Unit(str(input_bunit).strip(), format="fits", parse_strict="raise")
            return (base / inu).to_string("fits")
        except (ValueError, u.UnitsError):
            pass
    return (base / u.count).to_string("fits")


def write_calibrated_frame(
    path,
    frame: Frame,
    flux,
    var,
    *,
    cal_wave,
    cal,
    cal_var,
    cal_measured,
    per_star=None,
    keywords: dict | None = None,
    history=(),
    overwrite: bool = False,
    mask=None,
    mask_bits: dict | None = None,
    provenance=None,
) -> None:
    """Write the calibrated frame in the input's layout (see the module docstring).

    flux, var : (n_fibre, n_pix) calibrated flux and variance in ``frame``'s
        orientation (increasing wavelength); reversed back when ``frame.flipped``.
    cal_wave, cal, cal_var, cal_measured : (n_cal,) the combined calibration
        vector, written to the ``FLUXCAL`` table.
    per_star : astropy Table written as ``FLUXSTD`` (None: no FLUXSTD HDU).
    keywords : {KEY: (value, comment)} or {KEY: value}, written to the primary header.
    history : strings, each written with ``add_history`` (long ones wrap onto
        several cards; none is dropped).
    mask : (n_fibre, n_pix) integer bit flags in ``frame``'s orientation, written as
        the ``MASK`` image (int32); mask_bits : {NAME: (value, meaning)} documented in
        its header as ``MASKB<k>`` cards. provenance : astropy Table written as
        ``PROVENANCE``. The input's unknown extensions (``frame.extra_hdus``) follow,
        byte for byte; every HDU gets CHECKSUM and DATASUM.

    Refuses (InputError) to write onto ``frame.path`` whatever ``overwrite``
    says, and onto an existing file unless ``overwrite``.
    """
    if getattr(frame, "layout", "gpucal") == "desi":  # written back in the layout it came in (io/desi.py)
        from .desi import write_calibrated_desi

        return write_calibrated_desi(path, frame, flux, var, cal_wave=cal_wave, cal=cal, cal_var=cal_var,
                                     cal_measured=cal_measured, per_star=per_star, keywords=keywords,
                                     history=history, overwrite=overwrite, mask=mask, mask_bits=mask_bits,
                                     provenance=provenance)
    path = os.fspath(path)
    # destination checks first: cheap, and the most important refusal
    _check_destination(path, overwrite, protect=frame.path or None)
    flux = _host(flux, "flux")
    var = _host(var, "var")
    shape = (frame.n_fibre, frame.n_pix)
    if flux.shape != shape or var.shape != shape:
        raise InputError(
            f"write_calibrated_frame: flux {flux.shape} / var {var.shape} must have the frame's shape {shape}"
        )
    cal_columns = _cal_columns(cal_wave, cal, cal_var, cal_measured)
    items = _keyword_items(keywords)
    if isinstance(history, str):
        history = [history]

    hdus = _calibrated_hdus(frame, flux, var, items, history, cal_columns, per_star,
                            (mask, mask_bits, provenance))
    _atomic_write(fits.HDUList(hdus), path, overwrite, protect=frame.path or None, checksum=True,
                  tail=_carried_bytes(frame))


def _calibrated_hdus(frame: Frame, flux, var, items, history, cal_columns, per_star, extras) -> list:
    """The calibrated frame's HDUs in gpucal's layout, in the input's pixel order (see the module docstring)."""
    mask, mask_bits, provenance = extras
    shape = (frame.n_fibre, frame.n_pix)
    wave = frame.wave
    if frame.flipped:
        flux = flux[:, ::-1]
        var = var[:, ::-1]
        wave = wave[..., ::-1]
    hdus = [_primary_hdu(frame, flux, items, history)]
    vhdr = _clean_header(frame.ext_headers.get("VARIANCE"))
    vhdr["BUNIT"] = (VAR_BUNIT, "variance unit")
    hdus.append(fits.ImageHDU(np.ascontiguousarray(var), header=vhdr, name="VARIANCE"))
    if frame.wave_source == "WAVELA":
        hdus.append(_wavela_hdu(frame, wave))
    if getattr(frame, "lsf_fwhm", None) is not None:
        hdus.append(_lsf_hdu(frame))
    # else: the input's WCS keywords are in phdr and still describe the pixel order
    hdus.append(_table_hdu(frame.fibres, "FIBRES", "write_calibrated_frame: frame.fibres"))
    hdus.append(_fluxcal_hdu(*cal_columns, _cal_unit(frame.header.get("BUNIT")), frame.medium))
    if per_star is not None:
        hdus.append(_table_hdu(per_star, "FLUXSTD", "write_calibrated_frame: per_star"))
    if mask is not None:
        hdus.append(_mask_hdu(mask, mask_bits, shape, frame.flipped))
    if provenance is not None:
        hdus.append(_table_hdu(provenance, "PROVENANCE", "write_calibrated_frame: provenance"))
    return hdus


def _primary_hdu(frame: Frame, flux: np.ndarray, items, history) -> fits.PrimaryHDU:
    """The calibrated flux with the input's primary header, BUNIT, the keywords and the HISTORY cards."""
    phdr = _clean_header(frame.header)
    phdr["BUNIT"] = (FLUX_BUNIT, "flux density unit")
    for k, value, comment in items:
        phdr[k] = (value, comment)
    for line in history:
        for chunk in _history_cards(line):
            phdr.add_history(chunk)
    return fits.PrimaryHDU(np.ascontiguousarray(flux), header=phdr)


def _mask_hdu(mask, mask_bits, shape, flipped: bool) -> fits.ImageHDU:
    """The MASK image (int32, the input's pixel order) with its bits documented as MASKB<k> cards."""
    m = np.asarray(_as_numpy(mask))
    if m.shape != shape or m.dtype.kind not in "biu":
        raise InputError(f"write_calibrated_frame: mask must be integer of the frame's shape {shape}, "
                         f"got {m.dtype} {m.shape}")
    m = np.ascontiguousarray(m[:, ::-1] if flipped else m, dtype=np.int32)
    hdu = fits.ImageHDU(m, name="MASK")
    hdu.header["COMMENT"] = "bit flags per fibre pixel, 0 = clean; MASKB<k> names bit k (value 2**(k-1))"
    for name, (value, meaning) in (mask_bits or {}).items():
        k = int(value).bit_length()
        hdu.header[f"MASKB{k}"] = (_ascii(name), _ascii(meaning)[:46])
    return hdu


def _carried_bytes(frame: Frame) -> bytes:
    """The input's unknown extensions as the bytes that follow the output's own HDUs.

    An extension whose CHECKSUM and DATASUM verify is its input bytes, every one;
    any other gets the two cards added (its data and other cards unchanged).
    """
    from astropy.io.fits.hdu.base import _BaseHDU

    out = []
    for name, raw in frame.extra_hdus:
        try:
            # unscaled, as stored: astropy would otherwise rewrite BSCALE/BZERO (and unsigned data)
            hdu = _BaseHDU.fromstring(raw, do_not_scale_image_data=True, uint=False)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if "CHECKSUM" in hdu.header and hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1:
                    out.append(raw)
                    continue
            out.append(_with_checksum(hdu))
        except Exception as exc:  # noqa: BLE001 -- astropy raises many types for damaged bytes
            raise InputError(f"{frame.path} [{name}]: extension cannot be carried into the output ({exc})") from None
    return b"".join(out)


def _with_checksum(hdu) -> bytes:
    """One extension HDU's bytes with CHECKSUM and DATASUM (written after an empty primary, which is cut off)."""
    import io

    buf = io.BytesIO()
    primary = fits.PrimaryHDU()
    fits.HDUList([primary, hdu]).writeto(buf, checksum=True, output_verify="exception")
    return buf.getvalue()[len(primary.header.tostring()):]


def _cal_columns(cal_wave, cal, cal_var, cal_measured):
    """(wave, cal, cal_var) float64 and measured bool host arrays, 1-D of one length."""
    cw = _host(cal_wave, "cal_wave")
    cv = _host(cal, "cal")
    cvv = _host(cal_var, "cal_var")
    cm = np.array(_as_numpy(cal_measured), dtype=bool)
    if cw.ndim != 1 or cv.shape != cw.shape or cvv.shape != cw.shape or cm.shape != cw.shape:
        raise InputError(
            "write_calibrated_frame: cal_wave, cal, cal_var, cal_measured must be 1-D of one length, got "
            f"{cw.shape}, {cv.shape}, {cvv.shape}, {cm.shape}"
        )
    return cw, cv, cvv, cm


def _history_cards(line) -> list:
    """One history string as HISTORY card texts: each line wrapped at spaces where possible
    (72 characters per card), never truncated or merged."""
    cards = []
    for part in str(line).splitlines() or [""]:
        cards += textwrap.wrap(_ascii(part), width=72, break_long_words=True, break_on_hyphens=False) or [""]
    return cards


def _wavela_hdu(frame: Frame, wave: np.ndarray) -> fits.ImageHDU:
    """The output WAVELA (Å, the input's pixel order), per fibre again when the input's was."""
    whdr = _clean_header(frame.ext_headers.get("WAVELA"))
    whdr["BUNIT"] = ("Angstrom", "wavelength unit")
    wdata = np.ascontiguousarray(wave)  # (n_fibre, n_pix) stays each fibre's own solution
    if frame.wave_ndim == 2:
        wdata = np.ascontiguousarray(np.broadcast_to(wdata, (frame.n_fibre, frame.n_pix)))
    return fits.ImageHDU(wdata, header=whdr, name="WAVELA")


def _lsf_hdu(frame: Frame) -> fits.ImageHDU:
    """The output LSF image (FWHM in Å, the input's pixel order and shape)."""
    hdr = _clean_header(frame.ext_headers.get("LSF"))
    hdr["BUNIT"] = ("Angstrom", "line-spread FWHM")
    data = np.asarray(frame.lsf_fwhm, dtype=np.float64)
    if frame.flipped:
        data = data[..., ::-1]
    return fits.ImageHDU(np.ascontiguousarray(data), header=hdr, name="LSF")


def _read_lsf(hdul, fname: str, shape: tuple, flipped: bool):
    """The optional LSF image: FWHM in Å, (n_fibre, n_pix) or (n_pix,), in increasing wavelength; None without one."""
    if not _has(hdul, "LSF"):
        return None, None
    where = f"{fname} [LSF]"
    lsf = _image(hdul, "LSF", fname)
    if lsf.shape not in (shape, shape[1:], (1, shape[1])):
        raise InputError(f"{where}: shape {lsf.shape} matches neither (n_pix,) = ({shape[1]},) "
                         f"nor (n_fibre, n_pix) = {shape}")
    hdr = hdul["LSF"].header
    lsf = lsf.reshape(-1, shape[1])[0] if lsf.shape == (1, shape[1]) else lsf
    lsf = lsf * _length_unit_to_angstrom(hdr.get("BUNIT"), f"{where} BUNIT")
    bad = ~(np.isfinite(lsf) & (lsf > 0))
    if bad.any():
        rows = f" (fibre(s) {_fibre_list(np.flatnonzero(bad.any(axis=1)))})" if lsf.ndim == 2 else ""
        raise InputError(f"{where}: {int(bad.sum())} FWHM value(s) not finite and positive{rows}")
    lsf = lsf[..., ::-1] if flipped else lsf
    return np.ascontiguousarray(lsf, dtype=np.float64), hdr.copy()


def _fluxcal_hdu(cw, cv, cvv, cm, cal_unit: str, medium: str) -> fits.BinTableHDU:
    """The FLUXCAL table: WAVE [Angstrom], CAL, CAL_VAR, MEASURED, in increasing wavelength."""
    cal_var_unit = (u.Unit(cal_unit, format="fits") ** 2).to_string("fits")
    calhdu = fits.BinTableHDU.from_columns(
        [
            fits.Column(name="WAVE", format="D", unit="Angstrom", array=cw),
            fits.Column(name="CAL", format="D", unit=cal_unit, array=cv),
            fits.Column(name="CAL_VAR", format="D", unit=cal_var_unit, array=cvv),
            fits.Column(name="MEASURED", format="L", array=cm),
        ],
        name="FLUXCAL",
    )
    calhdu.header["WAVEMED"] = (_MEDIUM_CARD.get(medium, "AIR"), "wavelength medium of WAVE")
    calhdu.header["COMMENT"] = "CAL: calibrated flux = CAL * input flux; CAL_VAR its variance"
    calhdu.header["COMMENT"] = "MEASURED F: interpolated across telluric or uncovered pixels"
    return calhdu


def read_calibrated_frame(path) -> CalibratedFrame:
    """Read a file written by :func:`write_calibrated_frame` (for tests and QC)."""
    fname = os.fspath(path)
    hdul = _open(fname)
    try:
        from .desi import is_desi_layout, read_desi_frame

        frame = (read_desi_frame if is_desi_layout(hdul) else _read_frame)(hdul, fname, False)
        if not _has(hdul, "FLUXCAL"):
            raise InputError(f"{fname}: no FLUXCAL extension (not a calibrated frame?)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)
            cal = _native_table(Table.read(hdul["FLUXCAL"], character_as_bytes=False, mask_invalid=False))
            per_star = None
            if _has(hdul, "FLUXSTD"):
                per_star = _native_table(
                    Table.read(hdul["FLUXSTD"], character_as_bytes=False, mask_invalid=False)
                )
    finally:
        hdul.close()
    return CalibratedFrame(
        path=fname,
        flux=frame.flux,
        var=frame.var,
        wave=frame.wave,
        fibres=frame.fibres,
        header=frame.header,
        cal=cal,
        per_star=per_star,
        medium=frame.medium,
        flipped=frame.flipped,
    )

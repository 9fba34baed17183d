"""The spectral axis of a FITS header: pixel -> wavelength (Å) and the medium (host astropy; io/ and templates/).

Step of the mission: the wavelengths of a frame (:mod:`gpucal.io.frames`) or of
a FITS template grid (:mod:`gpucal.templates.fitsgrid`) when they come as a
WCS rather than as an array. It computes no physics: it evaluates the header.

What is read (axis ``k``, 1 unless told)
    * IRAF / SDSS style, ``CTYPEk`` empty, ``LINEAR``, ``LAMBDA``, ``WAVELENGTH``
      or ``WAV``: λ = CRVALk + CDELTk (or CDk_k) · (p − CRPIXk), p = 1…n (FITS
      pixel numbers, CRPIXk 0 when absent) in ``CUNITk`` (default Å);
      ``DC-FLAG = 1`` makes it log-linear: log10 λ[Å] = CRVALk + CDELTk · (p − CRPIXk).
      The medium is not known from such a header (None).
    * any spectral WCS astropy.wcs understands with a wavelength type,
      ``WAVE`` (vacuum) or ``AWAV`` (air), with or without an algorithm code
      (``WAVE-LOG``, ``AWAV-LOG``, ``WAVE-F2W``, …), ``CUNITk`` any length;
      frequency, energy, velocity and redshift axes are refused.
    * SDSS ``COEFF0`` / ``COEFF1`` without ``CRVALk``: log10 λ = COEFF0 + COEFF1 · i, i = 0…n−1.

In: a header, the number of pixels, a place for messages. Out: float64 (n,)
Å and ``"air"``, ``"vacuum"`` or None. Every failure is an InputError naming
``where`` and the keyword.
"""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
from astropy import units as u

from .errors import InputError

__all__ = ["wcs_wavelengths", "medium_from_headers", "medium_word", "length_unit_to_angstrom", "MEDIUM_KEYS"]

#: Header keywords that state the wavelength medium, in the order they are read.
MEDIUM_KEYS = ("WAVEMED", "AIRORVAC")
_AIR_WORDS = {"AIR", "A"}
_VAC_WORDS = {"VAC", "VACUUM", "V"}
_IRAF_CTYPES = {"", "LINEAR", "LAMBDA", "WAVELENGTH", "WAV"}
_ANGSTROM_WORDS = {"A", "AA", "ANGSTROM", "ANGSTROMS", "ANGSTROEM", "ÅNGSTRÖM", "Å"}
_LOG_UNIT = re.compile(r"^\s*(?:(?:log|log10|ln|dex|exp)\s*\(|dex\s*$)", re.IGNORECASE)


def _refuse_log_unit(s: str, unit, where: str) -> None:
    """InputError when ``s`` (parsed as ``unit``, or None) is a logarithmic or other function unit.

    astropy reads ``dex(Angstrom)`` as a length (10 Å per unit), which would
    turn log10 λ into a wrong linear λ without a word; it is refused instead.
    """
    parts = () if unit is None else (unit, *getattr(unit, "bases", ()))
    if _LOG_UNIT.match(s) or any(
        isinstance(p, u.FunctionUnitBase) or type(p).__module__.startswith("astropy.units.function") for p in parts
    ):
        raise InputError(
            f"{where}: wavelength unit {s!r} is logarithmic; give wavelengths as a length (Angstrom, nm, um, m)"
        )


def length_unit_to_angstrom(unit_str, where: str) -> float:
    """Factor that converts a length unit (header string) to Å; logarithmic units are refused."""
    if unit_str is None:
        return 1.0
    s = str(unit_str).strip()
    if s == "" or s.upper() in _ANGSTROM_WORDS:
        return 1.0
    _refuse_log_unit(s, None, where)
    try:
        unit = u.Unit(s, format="fits", parse_strict="raise")
    except (ValueError, TypeError, u.UnitsError):
        try:
            unit = u.Unit(s, parse_strict="raise")
        except (ValueError, TypeError, u.UnitsError):
            raise InputError(f"{where}: unrecognised wavelength unit {s!r}") from None
    _refuse_log_unit(s, unit, where)
    try:
        factor = float(unit.to(u.AA))
    except (u.UnitsError, ValueError, TypeError):  # not a length, or a structured unit such as "(m, s)"
        raise InputError(f"{where}: wavelength unit {s!r} is not a length") from None
    if not (math.isfinite(factor) and factor > 0):
        raise InputError(f"{where}: wavelength unit {s!r} is not a positive length")
    return factor


def medium_word(value, where: str) -> str:
    """``"air"`` or ``"vacuum"`` from a header value (AIR/A, VAC/VACUUM/V); anything else an InputError."""
    if isinstance(value, (bool, np.bool_)):
        raise InputError(f"{where}: wavelength medium must be 'AIR' or 'VACUUM', got {value!r}")
    word = str(value).strip().upper()
    if word in _AIR_WORDS:
        return "air"
    if word in _VAC_WORDS:
        return "vacuum"
    raise InputError(f"{where}: wavelength medium must be 'AIR' or 'VACUUM', got {value!r}")


def medium_from_headers(headers, fname: str):
    """The first medium keyword (:data:`MEDIUM_KEYS`) in ``headers`` [(header or None, HDU name)], else None."""
    for hdr, hname in headers:
        if hdr is None:
            continue
        for key in MEDIUM_KEYS:
            if key in hdr:
                return medium_word(hdr[key], f"{fname} [{hname}] {key}")
    return None


def _number(hdr, key: str, where: str, default=None) -> float:
    if key not in hdr:
        if default is None:
            raise InputError(f"{where}: {key} missing")
        return default
    v = hdr[key]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}: {key} = {v!r} must be a number")
    v = float(v)
    if not math.isfinite(v):
        raise InputError(f"{where}: {key} = {v!r} must be finite")
    return v


def _dc_flag(hdr, where: str) -> int:
    dc = hdr.get("DC-FLAG", 0)
    if isinstance(dc, (str, bool, np.bool_)) or dc not in (0, 1):
        raise InputError(f"{where}: DC-FLAG = {dc!r} must be 0 (linear) or 1 (log-linear)")
    return int(dc)


def _step(hdr, k: str, where: str) -> float:
    key = f"CDELT{k}" if f"CDELT{k}" in hdr else f"CD{k}_{k}"
    return _number(hdr, key, where)  # a zero step gives equal wavelengths, which the reader refuses as not monotonic


def _iraf_wave(hdr, k: str, n_pix: int, where: str) -> np.ndarray:
    crval, cdelt = _number(hdr, f"CRVAL{k}", where), _step(hdr, k, where)
    crpix = _number(hdr, f"CRPIX{k}", where, default=0.0)
    x = crval + cdelt * (np.arange(1, n_pix + 1, dtype=np.float64) - crpix)
    if _dc_flag(hdr, where) == 1:
        if crval > 6.0:
            raise InputError(f"{where}: DC-FLAG = 1 (log10 λ) but CRVAL{k} = {crval:g} is not a log10 wavelength")
        return 10.0 ** x
    return x * length_unit_to_angstrom(hdr.get(f"CUNIT{k}"), f"{where} CUNIT{k}")


def _astropy_wave(hdr, k: str, ctype: str, n_pix: int, where: str) -> np.ndarray:
    """Wavelengths of a standard spectral axis by astropy.wcs (wcslib): any algorithm it knows."""
    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    if _dc_flag(hdr, where) == 1:
        raise InputError(f"{where}: CTYPE{k} = {ctype!r} and DC-FLAG = 1 contradict each other; keep one")
    one = fits.Header()
    one["NAXIS"], one["NAXIS1"] = 1, n_pix
    for src, dst in ((f"CTYPE{k}", "CTYPE1"), (f"CRVAL{k}", "CRVAL1"), (f"CRPIX{k}", "CRPIX1"),
                     (f"CUNIT{k}", "CUNIT1"), (f"CDELT{k}", "CDELT1"), (f"CD{k}_{k}", "CD1_1")):
        if src in hdr:
            one[dst] = hdr[src]
    for key in hdr:
        if re.fullmatch(rf"P[VS]{k}_\d+", str(key)):
            one["P" + str(key)[1] + "1_" + str(key).split("_")[1]] = hdr[key]
    for key in ("CRVAL1", "CRPIX1"):
        _number(one, key, where, default=0.0 if key == "CRPIX1" else None)
    _step(one, "1", where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            w = WCS(one)
            w.wcs.set()
            world = w.wcs_pix2world(np.arange(n_pix, dtype=np.float64), 0)[0]
        factor = float(u.Unit(w.wcs.cunit[0]).to(u.AA))
    except Exception as exc:  # noqa: BLE001 -- wcslib raises many types; all mean an unusable WCS
        raise InputError(f"{where}: CTYPE{k} = {ctype!r}: astropy.wcs cannot evaluate it ({type(exc).__name__}: "
                         f"{exc})") from None
    return np.asarray(world, dtype=np.float64) * factor


def wcs_wavelengths(hdr, n_pix: int, where: str, *, axis: int = 1):
    """(wave (n_pix,) Å float64, medium or None) from the spectral WCS of ``hdr``, or (None, None) when it has none.

    See the module docstring for what is read. InputError (naming ``where``)
    for a non-wavelength spectral axis, a malformed keyword, or wavelengths
    that are not finite and positive.
    """
    k = str(int(axis))
    if f"CRVAL{k}" not in hdr:
        if "COEFF0" in hdr and "COEFF1" in hdr:
            c0, c1 = _number(hdr, "COEFF0", where), _number(hdr, "COEFF1", where)
            return _checked(10.0 ** (c0 + c1 * np.arange(n_pix, dtype=np.float64)), where), None
        return None, None
    if f"CDELT{k}" not in hdr and f"CD{k}_{k}" not in hdr:
        return None, None
    ctype = str(hdr.get(f"CTYPE{k}", "")).strip().upper()
    if ctype in _IRAF_CTYPES:
        return _checked(_iraf_wave(hdr, k, n_pix, where), where), None
    head = ctype[:4]
    if head not in ("WAVE", "AWAV") or (len(ctype) > 4 and ctype[4] != "-"):
        raise InputError(f"{where}: CTYPE{k} = {ctype!r} is not a wavelength axis (WAVE, AWAV, optionally with an "
                         "algorithm such as WAVE-LOG); give the wavelength of each pixel in a WAVELA extension")
    if ctype.endswith("-TAB"):
        raise InputError(f"{where}: CTYPE{k} = {ctype!r} (a lookup table) is not read; give a WAVELA extension")
    wave = _astropy_wave(hdr, k, ctype, n_pix, where)
    return _checked(wave, where), ("air" if head == "AWAV" else "vacuum")


def _checked(wave: np.ndarray, where: str) -> np.ndarray:
    if not np.all(np.isfinite(wave)):
        raise InputError(f"{where}: NaN/inf wavelengths")
    if np.any(wave <= 0):
        raise InputError(f"{where}: wavelengths must be positive")
    return wave

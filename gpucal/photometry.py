"""Broadband photometry: filter curves, batched synthetic magnitudes, catalogues.

Step of the mission: put observed standards and model spectra on the same
photometric scale.

* Synthetic photometry. Spectra ``flux (n_spec, n_w)`` in erg/s/cm²/Å on a
  wavelength grid ``wave (n_w,)`` in Å become AB maggies ``(n_spec, n_band)``
  through ONE matrix product ``flux @ W`` with the host-built weight matrix
  ``W (n_w, n_band)`` (:func:`band_matrix`): the photon-weighted filter
  responses of speclite resampled onto ``wave``. The product runs on the
  namespace and device of ``flux``; ``W`` crosses to the device once per call.
* Catalogue photometry. Refcat2-style CSV rows (``name, ra, dec, g, dg, ...``)
  are read at the edge (:func:`read_catalogue`) and matched to the standards
  by name or sky position (:func:`match_photometry`) into a
  :class:`~gpucal.containers.Photometry` of host NumPy arrays.

Filter curves and catalogues are edge data: NumPy, speclite and astropy are
used on the host only; the numerical path (:func:`synthetic_maggies`) takes
its namespace from its inputs.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os

import astropy.constants
import astropy.units as u
import numpy as np
import speclite.filters

from .backends import array_namespace, backend_of, to_backend, to_numpy
from .containers import Photometry
from .errors import CoverageError, InputError

__all__ = [
    "BAND_ALIASES",
    "resolve_band",
    "band_system",
    "load_filters",
    "band_matrix",
    "synthetic_maggies",
    "synthetic_mags",
    "read_catalogue",
    "match_photometry",
    "photometry_from_fibres",
]

logger = logging.getLogger("gpucal.photometry")

#: Short band names (as catalogue columns spell them) -> speclite filter names.
#: Case matters: ``g`` is Pan-STARRS g, ``G`` is Gaia G.
BAND_ALIASES = {
    "g": "panstarrs-g",
    "r": "panstarrs-r",
    "i": "panstarrs-i",
    "z": "panstarrs-z",
    "y": "panstarrs-y",
    "G": "gaiadr3-G",
    "Gaia": "gaiadr3-G",
    "BP": "gaiadr3-BP",
    "RP": "gaiadr3-RP",
    "J": "twomass-J",
    "H": "twomass-H",
    "K": "twomass-Ks",
    "Ks": "twomass-Ks",
    "u_sdss": "sdss2010-u",
    "g_sdss": "sdss2010-g",
    "r_sdss": "sdss2010-r",
    "i_sdss": "sdss2010-i",
    "z_sdss": "sdss2010-z",
}

# Filter groups whose catalogue magnitudes are on the Vega system (NOTES.md:
# Gaia and 2MASS are Vega; Bessell UBVRI are conventionally Vega too).
_VEGA_GROUPS = ("gaiadr2", "gaiadr3", "twomass", "bessell")

# h*c in erg*Å, computed exactly as speclite does, so that our photon weights
# and speclite's AB zeropoints (which include 1/hc) cancel to the last bit.
_HC_ERG_AA = (astropy.constants.h * astropy.constants.c).to(u.erg * u.AA).value

# Catalogue sentinels (Refcat2): these mean "no measurement".
_MAG_SENTINEL = 99.0
_ERR_SENTINEL = 9.0

_RA_NAMES = ("ra", "raj2000", "ra_deg", "ra_icrs")
_DEC_NAMES = ("dec", "dej2000", "decj2000", "dec_deg", "de_icrs", "dec_icrs")
_NAME_NAMES = ("name", "objname", "object", "id")


# --------------------------------------------------------------------- filters


def _speclite_names():
    data = os.path.join(os.path.dirname(speclite.filters.__file__), "data", "filters")
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(data, "*.ecsv")))


@functools.lru_cache(maxsize=None)
def _resolve(name: str) -> str:
    if name in BAND_ALIASES:
        return BAND_ALIASES[name]
    if name.endswith(".ecsv") and os.path.isfile(name):
        return name
    known = _speclite_names()
    if name in known:
        return name
    folded = [k for k in known if k.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    aliases = ", ".join(f"{k}->{v}" for k, v in BAND_ALIASES.items())
    groups = ", ".join(speclite.filters.filter_group_names)
    raise InputError(
        f"unknown photometric band {name!r}: use an alias ({aliases}) or a speclite "
        f"filter name '<group>-<band>' with group one of {groups} "
        f"(e.g. panstarrs-g, sdss2010-r, gaiadr3-BP, twomass-Ks, decam2014-z, bessell-V), "
        f"or the path of a speclite .ecsv filter file"
    )


def resolve_band(name: str) -> str:
    """The speclite filter name of a band alias or full name.

    Parameters
    ----------
    name : str
        An alias from :data:`BAND_ALIASES` (``"g"``, ``"BP"``, ``"Ks"``, ...),
        a speclite name ``"<group>-<band>"`` (``"sdss2010-r"``; the case of
        a full name is forgiven when unambiguous) or the path of a speclite
        ``.ecsv`` filter file.

    Raises
    ------
    InputError
        The name is unknown; the message lists the aliases and filter groups.
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"a photometric band name must be a non-empty string, got {name!r}")
    return _resolve(name.strip())


def band_system(name: str) -> str:
    """``"AB"`` or ``"Vega"``: the system catalogues quote this band's magnitudes in."""
    group = resolve_band(name).split("-", 1)[0]
    return "Vega" if group in _VEGA_GROUPS else "AB"


@functools.lru_cache(maxsize=None)
def _load_filter(resolved: str):
    try:
        return speclite.filters.load_filter(resolved)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"cannot load filter curve {resolved!r}: {exc}") from None


def load_filters(names) -> tuple:
    """speclite ``FilterResponse`` objects for band names or aliases (cached)."""
    if isinstance(names, str):
        names = (names,)
    return tuple(_load_filter(resolve_band(n)) for n in names)


# ------------------------------------------------------- synthetic photometry


def _validate_wave(wave) -> np.ndarray:
    w = np.asarray(wave if isinstance(wave, (list, tuple)) else to_numpy(wave), dtype=np.float64)
    if w.ndim != 1 or w.shape[0] < 2:
        raise InputError(f"wavelength grid must be 1-D with at least 2 points, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or not np.all(np.diff(w) > 0):
        raise InputError("wavelength grid must be finite and strictly increasing (Å)")
    return w


def _band_column(w: np.ndarray, fw: np.ndarray, fr: np.ndarray, zeropoint: float) -> np.ndarray:
    """Weights c (n_w,) with c @ F = speclite's AB maggies of F sampled on ``w``.

    This reproduces speclite's ``FilterConvolution`` (interpolate=True,
    photon-weighted, trapezoid) as a linear functional of F:

    * the grid is trimmed to the smallest slice bracketing the filter;
    * the response is linearly interpolated onto the grid points;
    * where two filter nodes fall in one grid interval (the grid undersamples
      the response), speclite adds the first of them as an extra quadrature
      node whose F is linearly interpolated between the bracketing pixels;
    * the outermost quadrature nodes are moved onto the filter's end points;
    * trapezoid weights times the photon weight λ/hc, divided by the filter's
      AB zeropoint (speclite's own, integrated on the filter's tabulation).
    """
    n = w.shape[0]
    start, stop = 0, n
    if w[0] < fw[0]:
        start = int(np.nonzero(w <= fw[0])[0][-1])
    if w[-1] > fw[-1]:
        stop = 1 + int(np.nonzero(w >= fw[-1])[0][0])
    ws = w[start:stop]
    m = ws.shape[0]

    # Extra nodes: filter nodes fw[k] sharing a grid interval with fw[k+1].
    insert = np.searchsorted(ws, fw[1:])
    extra = 1 + np.nonzero(np.diff(insert) == 0)[0]
    xe = fw[extra]
    nodes = np.concatenate([ws, xe])
    order = np.argsort(nodes, kind="stable")
    q = nodes[order]
    q[0] = max(q[0], fw[0])
    q[-1] = min(q[-1], fw[-1])
    dq = np.diff(q)
    trap = np.zeros_like(q)
    trap[:-1] += 0.5 * dq
    trap[1:] += 0.5 * dq
    weight = np.empty_like(q)
    weight[order] = trap * q / _HC_ERG_AA

    col = np.zeros(n)
    col[start:stop] = weight[:m] * np.interp(ws, fw, fr, left=0.0, right=0.0)
    if xe.size:
        # F at an extra node is interpolated linearly between its pixels j, j+1.
        j = np.clip(np.searchsorted(ws, xe) - 1, 0, m - 2)
        t = (xe - ws[j]) / (ws[j + 1] - ws[j])
        we = weight[m:] * fr[extra]
        np.add.at(col, start + j, we * (1.0 - t))
        np.add.at(col, start + j + 1, we * t)
    return col / zeropoint


@functools.lru_cache(maxsize=32)
def _band_matrix_cached(wave_bytes: bytes, bands: tuple):
    w = np.frombuffer(wave_bytes, dtype=np.float64)
    filters = load_filters(bands)
    W = np.full((w.shape[0], len(bands)), np.nan)
    covered = np.zeros(len(bands), dtype=bool)
    for b, f in enumerate(filters):
        fw = np.asarray(f.wavelength, dtype=np.float64)
        fr = np.asarray(f.response, dtype=np.float64)
        if w[0] <= fw[0] and w[-1] >= fw[-1]:
            covered[b] = True
            W[:, b] = _band_column(w, fw, fr, float(f.ab_zeropoint.value))
    W.flags.writeable = False
    covered.flags.writeable = False
    return W, covered


def band_matrix(wave, bands):
    """Photon-weighted AB weight matrix of ``bands`` on the grid ``wave``.

    Parameters
    ----------
    wave : (n_w,) array, Å
        Any strictly increasing grid (e.g. log-uniform); host or backend
        array (it is read on the host).
    bands : sequence of str
        Band aliases or speclite names (:func:`resolve_band`).

    Returns
    -------
    W : (n_w, n_band) float64 NumPy array, read-only
        ``F @ W`` are the AB maggies of spectra ``F (n_spec, n_w)`` in
        erg/s/cm²/Å: ∫F R λ dλ / ∫f_AB R λ dλ with f_AB = 3631 Jy. The
        numerator is the linear functional speclite's
        ``get_ab_maggies(..., wavelength)`` applies (trapezoid on the grid,
        response linearly interpolated, extra nodes where the grid
        undersamples the response); the denominator is speclite's
        ``ab_zeropoint`` of the filter. So ``F @ W`` equals speclite's result
        to rounding on any grid that covers the filter. Columns of bands the
        grid does not cover are NaN, so that a product with them can never
        pass for a real flux.

        Because the AB zeropoint is speclite's, filters tabulated coarsely
        inherit speclite's zeropoint quadrature error: an exact AB spectrum
        comes out at 1.0 mmag in bessell-R and 0.5 mmag in sdss2010-u, and
        below 0.1 mmag in the other Bessell bands and < 1e-5 mag in the
        Pan-STARRS, SDSS griz, DECam and Gaia bands.
    covered : (n_band,) bool NumPy array, read-only
        True where the filter's full support lies within [wave[0], wave[-1]].
    """
    w = _validate_wave(wave)
    if isinstance(bands, str):
        bands = (bands,)
    return _band_matrix_cached(w.tobytes(), tuple(resolve_band(b) for b in bands))


def synthetic_maggies(wave, flux, bands):
    """AB maggies of a batch of spectra through a batch of filters.

    Parameters
    ----------
    wave : (n_w,) array, Å, strictly increasing (host or backend).
    flux : (n_spec, n_w) backend array, erg/s/cm²/Å, finite everywhere
        (a NaN anywhere poisons every band, since 0 × NaN = NaN).
    bands : sequence of str (aliases or speclite names).

    Returns
    -------
    maggies : (n_spec, n_band) float64 array on ``flux``'s namespace and device.
        Columns of uncovered bands are NaN.
    covered : (n_band,) bool NumPy array (a fresh, writable copy).

    Notes
    -----
    ``flux`` is cast to float64 before the product even when it is float32
    (templates are stored so). Each maggie sums thousands of terms; float32
    accumulation costs ~1e-5 relative and a TF32 GEMM (a GPU default in some
    libraries) ~1e-3, i.e. ~1 mmag, the whole error budget against speclite.
    With n_band columns the float64 product is cheap (memory-bound on the
    flux read either way).
    """
    xp = array_namespace(flux)
    if flux.ndim != 2:
        raise InputError(f"flux must be 2-D (n_spec, n_w), got shape {tuple(flux.shape)}")
    W, covered = band_matrix(wave, bands)
    if int(flux.shape[1]) != W.shape[0]:
        raise InputError(
            f"flux has {int(flux.shape[1])} wavelength pixels but the wavelength grid has {W.shape[0]}"
        )
    # A writable copy: the cached W is read-only, and torch warns on (and
    # may write through) tensors that share read-only NumPy memory.
    Wd = to_backend(np.array(W), backend_of(flux))
    return xp.matmul(xp.astype(flux, xp.float64), Wd), covered.copy()


def _uncovered_message(wave: np.ndarray, bands) -> str:
    parts = []
    for name, f in zip(bands, load_filters(bands)):
        lo, hi = float(f.wavelength[0]), float(f.wavelength[-1])
        missing = []
        if wave[0] > lo:
            missing.append(f"{lo:.1f}–{min(hi, float(wave[0])):.1f} Å")
        if wave[-1] < hi:
            missing.append(f"{max(lo, float(wave[-1])):.1f}–{hi:.1f} Å")
        parts.append(f"{resolve_band(name)} ({lo:.1f}–{hi:.1f} Å; missing {' and '.join(missing)})")
    return (
        f"the wavelength grid {float(wave[0]):.1f}–{float(wave[-1]):.1f} Å does not cover "
        f"band(s): {'; '.join(parts)}"
    )


def synthetic_mags(wave, flux, bands, *, system="AB"):
    """Synthetic magnitudes −2.5 log10(maggies) of a batch of spectra.

    Parameters
    ----------
    wave : (n_w,) array, Å.
    flux : (n_spec, n_w) backend array, erg/s/cm²/Å.
    bands : sequence of str.
    system : ``"AB"``; ``"Vega"`` is not available yet.

    Returns
    -------
    (n_spec, n_band) float64 array on ``flux``'s namespace and device.
    A spectrum with non-positive maggies in a band gets NaN there.

    Raises
    ------
    CoverageError
        Some band is not fully covered by ``wave``; names the band(s) and the
        wavelengths missing. Never a silent NaN.
    NotImplementedError
        ``system="Vega"``: no Vega spectrum ships with the installed packages,
        and Vega→AB offsets must come from one (never hard-coded).
    """
    if system not in ("AB", "Vega"):
        raise InputError(f"photometric system must be 'AB' or 'Vega', got {system!r}")
    if system == "Vega":
        raise NotImplementedError(
            "synthetic Vega magnitudes need a Vega spectrum, which is not available yet; "
            "use system='AB' (Vega->AB offsets will be derived from the filter curve and "
            "a Vega spectrum, never hard-coded)"
        )
    if isinstance(bands, str):
        bands = (bands,)
    _, covered = band_matrix(wave, bands)
    if not covered.all():
        missing = [b for b, c in zip(bands, covered) if not c]
        raise CoverageError(_uncovered_message(_validate_wave(wave), missing))
    maggies, _ = synthetic_maggies(wave, flux, bands)
    return -2.5 * array_namespace(maggies).log10(maggies)


# ------------------------------------------------------------------ catalogue


def _find_column(table, candidates):
    """Name of the first column matching a candidate, exact case first."""
    cols = list(table.colnames)
    for c in candidates:
        if c in cols:
            return c
    lower = {}
    for c in cols:
        lower.setdefault(c.lower(), []).append(c)
    for c in candidates:
        hits = lower.get(c.lower(), [])
        if len(hits) == 1:
            return hits[0]
    return None


def _band_candidates(band: str):
    """Column names that may hold magnitudes of ``band`` (as requested)."""
    resolved = resolve_band(band)
    names = [band.strip(), resolved]
    names += [a for a, r in BAND_ALIASES.items() if r == resolved and a not in names]
    if not resolved.endswith(".ecsv"):
        names.append(resolved.split("-", 1)[1])
    return list(dict.fromkeys(names))


def _float_column(table, name) -> np.ndarray:
    col = table[name]
    try:
        data = np.ma.asarray(col).astype(np.float64)
    except (TypeError, ValueError):
        # Non-numeric text in a numeric column: entries that parse are kept.
        out = np.full(len(col), np.nan)
        for k, v in enumerate(col):
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                pass
        return out
    return np.ma.filled(data, np.nan)


def _clean(mag: np.ndarray, err: np.ndarray):
    """Apply the sentinel rules: (mag, err, valid) with NaN where missing."""
    valid = (
        np.isfinite(mag) & np.isfinite(err) & (mag < _MAG_SENTINEL) & (err < _ERR_SENTINEL) & (err >= 0)
    )
    return np.where(valid, mag, np.nan), np.where(valid, err, np.nan), valid


def _band_arrays(table, band, *, source, default_err=None):
    """(mag, err, valid, mag_column) of ``band`` from ``table``; None column if absent."""
    n = len(table)
    mag_col = _find_column(table, _band_candidates(band))
    if mag_col is None:
        return np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool), None
    err_col = _find_column(
        table, [f"d{mag_col}", f"e_{mag_col}", f"{mag_col}_err", f"{mag_col}err", f"err_{mag_col}"]
    )
    mag = _float_column(table, mag_col)
    if err_col is None:
        if default_err is None:
            logger.warning(
                "%s: column %r has no error column (d%s); band %s treated as missing",
                source, mag_col, mag_col, resolve_band(band),
            )
            return np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool), None
        err = np.full(n, float(default_err))
    else:
        err = _float_column(table, err_col)
    m, e, v = _clean(mag, err)
    return m, e, v, mag_col


def read_catalogue(path, *, bands=("g", "r", "i", "z")):
    """Read a Refcat2-style CSV of standard-star photometry.

    Parameters
    ----------
    path : str or os.PathLike
        CSV with a header row. Columns (names case-insensitive): ``name``
        and/or ``ra``, ``dec`` (degrees), and per band a magnitude column
        named as the band (``g``, ``BP``, ``J``, or the speclite name) with
        its error ``d<band>`` (``dg``, ``dBP``, ...).
    bands : sequence of str
        Bands to read (aliases or speclite names).

    Returns
    -------
    astropy.table.Table
        Columns ``name`` (str, stripped), ``ra``, ``dec`` (float64 degrees,
        NaN if absent), and per band, named by its speclite name ``<b>``:
        ``<b>`` magnitude, ``<b>_err`` and ``<b>_valid``. Missing values
        (blank, non-finite, magnitude ≥ 99 or error ≥ 9, negative error) are
        NaN with ``valid`` False. ``meta`` holds ``path``, ``bands``,
        ``system`` and ``has_name`` / ``has_coords``.

    Raises
    ------
    InputError
        The file is missing or unreadable, has neither a name column nor
        ra/dec, has only one of ra/dec, or holds none of the requested band
        columns; the message names the file (and the column). Bands whose
        columns are absent are all-missing and logged as a warning.
    """
    from astropy.table import Table

    path = os.fspath(path)
    if isinstance(bands, str):
        bands = (bands,)
    resolved = tuple(resolve_band(b) for b in bands)
    if not os.path.isfile(path):
        raise InputError(f"photometry catalogue {path}: no such file")
    try:
        table = Table.read(path, format="ascii.csv")
    except Exception as exc:  # astropy raises many types for malformed text
        raise InputError(f"photometry catalogue {path}: cannot read as CSV ({type(exc).__name__}: {exc})") from None

    name_col = _find_column(table, _NAME_NAMES)
    ra_col = _find_column(table, _RA_NAMES)
    dec_col = _find_column(table, _DEC_NAMES)
    if (ra_col is None) != (dec_col is None):
        present, absent = ("ra", "dec") if dec_col is None else ("dec", "ra")
        raise InputError(f"photometry catalogue {path}: has a {present!r} column but no {absent!r} column")
    if name_col is None and ra_col is None:
        raise InputError(
            f"photometry catalogue {path}: no 'name' column and no 'ra'/'dec' columns, "
            f"so no star can be matched (columns: {', '.join(table.colnames)})"
        )

    n = len(table)
    out = Table()
    if name_col is not None:
        names = np.ma.filled(np.ma.asarray(table[name_col]).astype(str), "")
        out["name"] = np.array([s.strip() for s in names], dtype=str) if n else np.zeros(0, dtype=str)
    else:
        out["name"] = np.full(n, "", dtype=str)
    out["ra"] = _float_column(table, ra_col) if ra_col is not None else np.full(n, np.nan)
    out["dec"] = _float_column(table, dec_col) if dec_col is not None else np.full(n, np.nan)

    found, absent = [], []
    for band, rb in zip(bands, resolved):
        mag, err, valid, col = _band_arrays(table, band, source=f"photometry catalogue {path}")
        (found if col is not None else absent).append(rb)
        out[rb] = mag
        out[f"{rb}_err"] = err
        out[f"{rb}_valid"] = valid
    if not found:
        raise InputError(
            f"photometry catalogue {path}: none of the requested band columns "
            f"{', '.join(str(b) for b in bands)} (with errors d<band>) is present "
            f"(columns: {', '.join(table.colnames)})"
        )
    if absent:
        logger.warning("photometry catalogue %s: no column for band(s) %s; treated as missing", path, ", ".join(absent))
    out.meta.update(
        path=path,
        bands=resolved,
        system=tuple(band_system(b) for b in resolved),
        has_name=name_col is not None,
        has_coords=ra_col is not None,
    )
    return out


def _catalogue_band(catalogue, rb):
    n = len(catalogue)
    if rb not in catalogue.colnames:
        return np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, bool)
    return (
        np.asarray(catalogue[rb], dtype=np.float64),
        np.asarray(catalogue[f"{rb}_err"], dtype=np.float64),
        np.asarray(catalogue[f"{rb}_valid"], dtype=bool),
    )


def match_photometry(catalogue, names, ra, dec, *, bands=("g", "r", "i", "z"), radius_arcsec=1.0):
    """Catalogue photometry of the standards, matched by name, else by position.

    Parameters
    ----------
    catalogue : astropy.table.Table from :func:`read_catalogue`, or a path
        (read with ``bands``).
    names : sequence of str, one per standard (stripped; exact, case-sensitive
        match against the catalogue's ``name``).
    ra, dec : (n_star,) degrees (host or backend arrays); NaN = unknown, such a
        star can only match by name.
    bands : sequence of str (aliases or speclite names), the output columns.
    radius_arcsec : float, coordinate match radius.

    Returns
    -------
    photometry : :class:`~gpucal.containers.Photometry`
        ``mag``, ``err`` (n_star, n_band) float64 NumPy with NaN where
        missing, ``valid`` bool, ``bands`` the speclite names, ``system`` per
        band ("AB" or "Vega"). Unmatched stars are all invalid.
    match_info : list of str, per star: ``"name"``, ``"coords 0.31 arcsec"``
        or ``"unmatched"``.
    """
    from astropy.coordinates import SkyCoord

    if isinstance(bands, str):
        bands = (bands,)
    if not hasattr(catalogue, "colnames"):
        catalogue = read_catalogue(catalogue, bands=bands)
    try:
        radius_arcsec = float(radius_arcsec)
    except (TypeError, ValueError):
        radius_arcsec = math.nan
    if not (math.isfinite(radius_arcsec) and radius_arcsec >= 0):
        raise InputError(f"radius_arcsec must be a finite number >= 0, got {radius_arcsec!r}")
    source = catalogue.meta.get("path", "catalogue")
    resolved = tuple(resolve_band(b) for b in bands)
    names = tuple("" if s is None else str(s).strip() for s in names)
    n_star = len(names)
    ra = np.asarray(to_numpy(ra), dtype=np.float64).reshape(-1)
    dec = np.asarray(to_numpy(dec), dtype=np.float64).reshape(-1)
    if ra.shape[0] != n_star or dec.shape[0] != n_star:
        raise InputError(f"names, ra and dec must have one entry per star: got {n_star}, {ra.shape[0]}, {dec.shape[0]}")
    absent = [rb for rb in resolved if rb not in catalogue.colnames]
    if absent:
        logger.warning("%s holds no photometry for band(s) %s; treated as missing", source, ", ".join(absent))

    cat_names = [str(s).strip() for s in catalogue["name"]] if "name" in catalogue.colnames else []
    first = {}
    for k, s in enumerate(cat_names):
        if s:
            first.setdefault(s, k)
    row = np.full(n_star, -1)
    info = ["unmatched"] * n_star
    for k, s in enumerate(names):
        if s and s in first:
            row[k] = first[s]
            info[k] = "name"

    cat_ra = np.asarray(catalogue["ra"], dtype=np.float64) if "ra" in catalogue.colnames else np.zeros(0)
    cat_dec = np.asarray(catalogue["dec"], dtype=np.float64) if "dec" in catalogue.colnames else np.zeros(0)
    usable = np.nonzero(np.isfinite(cat_ra) & np.isfinite(cat_dec))[0]
    todo = np.nonzero((row < 0) & np.isfinite(ra) & np.isfinite(dec))[0]
    if usable.size and todo.size:
        stars = SkyCoord(ra[todo] * u.deg, dec[todo] * u.deg)
        cat = SkyCoord(cat_ra[usable] * u.deg, cat_dec[usable] * u.deg)
        idx, sep, _ = stars.match_to_catalog_sky(cat)
        sep = sep.to_value(u.arcsec)
        for k, j, s in zip(todo, np.atleast_1d(idx), np.atleast_1d(sep)):
            if s <= radius_arcsec:
                row[k] = usable[j]
                info[k] = f"coords {s:.2f} arcsec"
            else:
                logger.info(
                    "%s: star %r unmatched (nearest entry %.2f arcsec > %.2f)", source, names[k], s, radius_arcsec
                )

    n_band = len(resolved)
    mag = np.full((n_star, n_band), np.nan)
    err = np.full((n_star, n_band), np.nan)
    valid = np.zeros((n_star, n_band), dtype=bool)
    hit = row >= 0
    for b, rb in enumerate(resolved):
        m, e, v = _catalogue_band(catalogue, rb)
        mag[hit, b] = m[row[hit]]
        err[hit, b] = e[row[hit]]
        valid[hit, b] = v[row[hit]]
    phot = Photometry(
        names=names,
        bands=resolved,
        mag=mag,
        err=err,
        valid=valid,
        system=tuple(band_system(b) for b in resolved),
    )
    return phot, info


def photometry_from_fibres(fibres, bands=("g", "r", "i", "z"), *, default_err=None):
    """Photometry from magnitude columns of a frame's FIBRES table, if present.

    Parameters
    ----------
    fibres : astropy Table (or FITS record array) with one row per star, in
        the order wanted (pass the standards' rows). Magnitude columns are
        named as the band (``g``, ``BP``, ``panstarrs-g``, case-insensitive)
        with errors ``d<band>`` / ``<band>_err`` / ``e_<band>``.
    bands : sequence of str.
    default_err : float, optional
        Error (mag) to use where a band has a magnitude column but no error
        column; without it such a band is missing.

    Returns
    -------
    :class:`~gpucal.containers.Photometry` (``names`` from a NAME column, else
    empty strings); same sentinel rules as :func:`read_catalogue`. Bands with
    no column are all invalid (logged).
    """
    from astropy.table import Table

    table = fibres if hasattr(fibres, "colnames") else Table(fibres)
    if isinstance(bands, str):
        bands = (bands,)
    resolved = tuple(resolve_band(b) for b in bands)
    n = len(table)
    name_col = _find_column(table, _NAME_NAMES)
    if name_col is not None:
        names = tuple(s.strip() for s in np.ma.filled(np.ma.asarray(table[name_col]).astype(str), ""))
    else:
        names = ("",) * n
    mag = np.full((n, len(bands)), np.nan)
    err = np.full((n, len(bands)), np.nan)
    valid = np.zeros((n, len(bands)), dtype=bool)
    absent = []
    for b, band in enumerate(bands):
        m, e, v, col = _band_arrays(table, band, source="FIBRES table", default_err=default_err)
        mag[:, b], err[:, b], valid[:, b] = m, e, v
        if col is None:
            absent.append(resolved[b])
    if absent:
        logger.warning("FIBRES table: no magnitudes for band(s) %s", ", ".join(absent))
    return Photometry(
        names=names,
        bands=resolved,
        mag=mag,
        err=err,
        valid=valid,
        system=tuple(band_system(b) for b in resolved),
    )

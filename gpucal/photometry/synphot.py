"""Broadband photometry: filter curves, batched synthetic magnitudes, catalogues, colour priors.

Step of the mission: put observed standards and model spectra on the same
photometric scale, in each band's own system (AB or Vega).

* Synthetic photometry. Spectra ``flux (n_spec, n_w)`` in erg/s/cm²/Å on a
  wavelength grid ``wave (n_w,)`` in Å become AB maggies ``(n_spec, n_band)``
  through ONE matrix product ``flux @ W`` with the host-built weight matrix
  ``W (n_w, n_band)`` (:func:`band_matrix`): the photon-weighted filter
  responses of speclite resampled onto ``wave``. The product runs on the
  namespace and device of ``flux``; ``W`` crosses to the device once per call.
* Vega magnitudes. ``m_Vega = m_AB + (m_Vega − m_AB)`` with the per-band
  offset derived from a CALSPEC spectrum of Vega shipped in ``gpucal/data``
  and the filter curve (:func:`vega_offsets`), each survey's Vega system
  defined as that survey defines it (:func:`vega_reference`). No offset is
  typed in.
* Catalogue photometry. Refcat2-style CSV rows (``name, ra, dec, g, dg, ...,
  BP, dBP, ..., J, dJ, ...``) and magnitude columns of a frame's FIBRES table
  are read at the edge (:func:`read_catalogue`, :func:`photometry_from_fibres`)
  and matched to the standards by name or sky position
  (:func:`match_photometry`) into a :class:`~gpucal.containers.Photometry` of
  host NumPy arrays; E(B−V) per star from an ``ebv`` column
  (:func:`match_ebv`, :func:`fibres_ebv`).
* Colour priors. Teff from a colour (:func:`teff_from_colour`) through a
  relation fitted to the synthetic colours of a template grid
  (:func:`fit_colour_teff`); a (n_star, n_t) mask of the grid nodes within
  n σ of it (:func:`teff_prior_mask`) and a check of the fitted Teff against
  it (:func:`teff_disagreement`).
* Consistency. Stars whose magnitudes disagree between bands after the
  photometric scale is fitted are flagged with a reason
  (:func:`photometric_consistency`).

Filter curves, Vega spectra and catalogues are edge data: NumPy, speclite and
astropy are used on the host only; the numerical paths
(:func:`synthetic_maggies`, :func:`synthetic_mags`, :func:`teff_prior_mask`,
:func:`photometric_consistency`) take their namespace from their inputs.
"""

from __future__ import annotations

import functools
import logging
import math
import os

import astropy.units as u
import numpy as np

from ..backends import array_namespace, backend_of, to_backend, to_numpy
from ..containers import ColourTeffRelation, Photometry
from ..errors import CoverageError, InputError
from .bands import (
    BAND_ALIASES,
    REFCAT2_BANDS,
    as_bands,
    band_matrix,
    band_system,
    band_systems,
    host_wave,
    resolve_band,
    uncovered_message,
)
from .vega import system_offsets

__all__ = [
    "coverage_message",
    "synthetic_maggies",
    "synthetic_mags",
    "read_catalogue",
    "match_photometry",
    "match_ebv",
    "photometry_from_fibres",
    "fibres_ebv",
    "fit_colour_teff",
    "PRIOR_COLOURS",
    "default_colour_relations",
    "teff_from_colour",
    "teff_prior_mask",
    "teff_disagreement",
    "photometric_consistency",
]

logger = logging.getLogger("gpucal.photometry")


# Catalogue sentinels (Refcat2): these mean "no measurement".
_MAG_SENTINEL = 99.0
_ERR_SENTINEL = 9.0

_RA_NAMES = ("ra", "raj2000", "ra_deg", "ra_icrs")
_DEC_NAMES = ("dec", "dej2000", "decj2000", "dec_deg", "de_icrs", "dec_icrs")
_NAME_NAMES = ("name", "objname", "object", "id")
_EBV_NAMES = ("ebv", "e_bv", "e(b-v)", "ebmv", "e_b-v", "ebv_sfd")


# ------------------------------------------------------- synthetic photometry


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


def coverage_message(wave, bands) -> str:
    """``""`` when ``wave`` covers every band, else one line naming the bands not covered.

    For the per-star table and QC: a band the template grid does not cover
    is excluded from the photometric scale and reported with this text
    (which names the band, its extent and the wavelengths missing).
    """
    bands = as_bands(bands)
    _, covered = band_matrix(wave, bands)
    if covered.all():
        return ""
    return uncovered_message(host_wave(wave), [b for b, c in zip(bands, covered) if not c])


def _host_float(x) -> np.ndarray:
    """Host float64 copy of a sequence, scalar, NumPy or backend array."""
    if isinstance(x, (list, tuple, float, int, np.ndarray)) or np.isscalar(x):
        return np.array(x, dtype=np.float64)
    return np.array(to_numpy(x), dtype=np.float64)


def synthetic_mags(wave, flux, bands, *, system="AB"):
    """Synthetic magnitudes of a batch of spectra, AB or Vega per band.

    Parameters
    ----------
    wave : (n_w,) array, Å.
    flux : (n_spec, n_w) backend array, erg/s/cm²/Å.
    bands : sequence of str.
    system : ``"AB"``, ``"Vega"``, or one of them per band (e.g. a
        :class:`~gpucal.containers.Photometry`'s ``system``); ``None`` means
        each band's catalogue system (:func:`band_system`).

    Returns
    -------
    (n_spec, n_band) float64 array on ``flux``'s namespace and device:
    −2.5 log10(AB maggies), plus :func:`vega_offsets` in the Vega bands.
    A spectrum with non-positive maggies in a band gets NaN there.

    Raises
    ------
    CoverageError
        Some band is not fully covered by ``wave``; names the band(s) and the
        wavelengths missing. Never a silent NaN.
    InputError
        Unknown system name, or a per-band list of the wrong length.
    """
    bands = as_bands(bands)
    systems = band_systems(bands, system)
    _, covered = band_matrix(wave, bands)
    if not covered.all():
        missing = [b for b, c in zip(bands, covered) if not c]
        raise CoverageError(uncovered_message(host_wave(wave), missing))
    maggies, _ = synthetic_maggies(wave, flux, bands)
    xp = array_namespace(maggies)
    mags = -2.5 * xp.log10(maggies)
    offsets = system_offsets(bands, systems)
    if np.any(offsets != 0.0):
        mags = mags + to_backend(offsets, backend_of(mags), dtype=xp.float64)[None, :]
    return mags


# ------------------------------------------------------------------ catalogue


def _find_column(table, candidates, *, refuse=()):
    """Name of the first column matching a candidate, exact case first.

    A case-insensitive hit whose exact name is in ``refuse`` is not taken
    (``g`` must not stand in for Gaia ``G``).
    """
    cols = list(table.colnames)
    for c in candidates:
        if c in cols:
            return c
    lower = {}
    for c in cols:
        lower.setdefault(c.lower(), []).append(c)
    for c in candidates:
        hits = [h for h in lower.get(c.lower(), []) if h not in refuse]
        if len(hits) == 1:
            return hits[0]
    return None


def _other_band_aliases(resolved: str) -> frozenset:
    """Aliases naming a band other than ``resolved`` (refused as case-folded matches)."""
    return frozenset(a for a, r in BAND_ALIASES.items() if r != resolved)


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
    """Apply the sentinel rules: (mag, err, valid) with NaN where missing.

    A zero (or negative) error is missing too: it would give the band
    infinite weight in the scale fit.
    """
    valid = (
        np.isfinite(mag) & np.isfinite(err) & (mag < _MAG_SENTINEL) & (err < _ERR_SENTINEL) & (err > 0)
    )
    return np.where(valid, mag, np.nan), np.where(valid, err, np.nan), valid


def _band_arrays(table, band, *, source, default_err=None):
    """(mag, err, valid, mag_column) of ``band`` from ``table``; None column if absent."""
    n = len(table)
    mag_col = _find_column(table, _band_candidates(band), refuse=_other_band_aliases(resolve_band(band)))
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


def _present_bands(table, bands) -> tuple:
    """Those of ``bands`` with a magnitude column in ``table`` (one per filter)."""
    out, seen = [], set()
    for b in bands:
        rb = resolve_band(b)
        if rb not in seen and _find_column(table, _band_candidates(b), refuse=_other_band_aliases(rb)) is not None:
            out.append(b)
            seen.add(rb)
    return tuple(out)


def read_catalogue(path, *, bands=("g", "r", "i", "z")):
    """Read a Refcat2-style CSV of standard-star photometry.

    Parameters
    ----------
    path : str or os.PathLike
        CSV with a header row. Columns (names case-insensitive): ``name``
        and/or ``ra``, ``dec`` (degrees), and per band a magnitude column
        named as the band (``g``, ``BP``, ``J``, or the speclite name) with
        its error ``d<band>`` (``dg``, ``dBP``, ...); optionally ``ebv``
        (E(B−V), mag; also ``e_bv``, ``E(B-V)``, ``ebmv``).
    bands : sequence of str, or None
        Bands to read (aliases or speclite names). ``None``: every band of
        :data:`REFCAT2_BANDS` (g r i z AB; Gaia G BP RP, 2MASS J H K Vega)
        whose column is present.

    Returns
    -------
    astropy.table.Table
        Columns ``name`` (str, stripped), ``ra``, ``dec`` (float64 degrees,
        NaN if absent), and per band, named by its speclite name ``<b>``:
        ``<b>`` magnitude, ``<b>_err`` and ``<b>_valid``. Missing values
        (blank, non-finite, magnitude ≥ 99 or error ≥ 9, error ≤ 0) are
        NaN with ``valid`` False. ``ebv`` (float64, NaN where blank) when
        the file has such a column. ``meta`` holds ``path``, ``bands``,
        ``system`` (per band) and ``has_name`` / ``has_coords`` / ``has_ebv``.

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
    if not os.path.isfile(path):
        raise InputError(f"photometry catalogue {path}: no such file")
    try:
        table = Table.read(path, format="ascii.csv")
    except Exception as exc:  # astropy raises many types for malformed text
        raise InputError(f"photometry catalogue {path}: cannot read as CSV ({type(exc).__name__}: {exc})") from None
    if bands is None:
        bands = _present_bands(table, REFCAT2_BANDS)
        if not bands:
            raise InputError(
                f"photometry catalogue {path}: none of the Refcat2 band columns "
                f"{', '.join(REFCAT2_BANDS)} is present (columns: {', '.join(table.colnames)})"
            )
    bands = as_bands(bands)
    resolved = tuple(resolve_band(b) for b in bands)

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
    ebv_col = _find_column(table, _EBV_NAMES)
    if ebv_col is not None:
        out["ebv"] = _float_column(table, ebv_col)

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
        has_ebv=ebv_col is not None,
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


def _radius(radius_arcsec) -> float:
    try:
        radius_arcsec = float(radius_arcsec)
    except (TypeError, ValueError):
        radius_arcsec = math.nan
    if not (math.isfinite(radius_arcsec) and radius_arcsec >= 0):
        raise InputError(f"radius_arcsec must be a finite number >= 0, got {radius_arcsec!r}")
    return radius_arcsec


def _match_rows(catalogue, names, ra, dec, radius_arcsec):
    """Catalogue row per star (-1 = unmatched) and how it matched: name first, then position."""
    from astropy.coordinates import SkyCoord

    radius_arcsec = _radius(radius_arcsec)
    source = catalogue.meta.get("path", "catalogue")
    names = tuple("" if s is None else str(s).strip() for s in names)
    n_star = len(names)
    ra = _host_float(ra).reshape(-1)
    dec = _host_float(dec).reshape(-1)
    if ra.shape[0] != n_star or dec.shape[0] != n_star:
        raise InputError(f"names, ra and dec must have one entry per star: got {n_star}, {ra.shape[0]}, {dec.shape[0]}")

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
                info[k] = f"unmatched: nearest entry {s:.2f} arcsec > radius {radius_arcsec:.2f}"
                logger.info(
                    "%s: star %r unmatched (nearest entry %.2f arcsec > %.2f)", source, names[k], s, radius_arcsec
                )
    return names, row, info


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
    bands : sequence of str (aliases or speclite names), the output columns;
        ``None``: the catalogue's bands (for a path, every Refcat2 band in it).
    radius_arcsec : float, coordinate match radius.

    Returns
    -------
    photometry : :class:`~gpucal.containers.Photometry`
        ``mag``, ``err`` (n_star, n_band) float64 NumPy with NaN where
        missing, ``valid`` bool, ``bands`` the speclite names, ``system`` per
        band ("AB" or "Vega"). Unmatched stars are all invalid.
    match_info : list of str, per star: ``"name"``, ``"coords 0.31 arcsec"``,
        ``"unmatched: nearest entry 2.00 arcsec > radius 1.00"`` or
        ``"unmatched"`` (no name match and no usable coordinates).
    """
    if not hasattr(catalogue, "colnames"):
        catalogue = read_catalogue(catalogue, bands=bands)
    if bands is None:
        bands = tuple(catalogue.meta.get("bands", ()))
    bands = as_bands(bands)
    source = catalogue.meta.get("path", "catalogue")
    resolved = tuple(resolve_band(b) for b in bands)
    names, row, info = _match_rows(catalogue, names, ra, dec, radius_arcsec)
    absent = [rb for rb in resolved if rb not in catalogue.colnames]
    if absent:
        logger.warning("%s holds no photometry for band(s) %s; treated as missing", source, ", ".join(absent))

    n_star, n_band = len(names), len(resolved)
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


def _ebv_values(values, default, source) -> np.ndarray:
    ebv = np.asarray(values, dtype=np.float64)
    if default is not None:
        default = float(default)
        if not math.isfinite(default):
            raise InputError(f"default E(B-V) must be finite, got {default!r}")
        ebv = np.where(np.isfinite(ebv), ebv, default)
    bad = np.nonzero(np.isfinite(ebv) & ((ebv < 0) | (ebv > 10)))[0]
    if bad.size:
        raise InputError(f"{source}: E(B-V) out of range [0, 10] mag for row(s) {', '.join(map(str, bad[:10]))}")
    return ebv


def match_ebv(catalogue, names, ra, dec, *, radius_arcsec=1.0, default=None):
    """Per-star E(B−V) (mag) from the catalogue's ``ebv`` column, matched as :func:`match_photometry`.

    Returns a (n_star,) float64 NumPy array: NaN where the star is unmatched,
    the catalogue has no ``ebv`` column or the entry is blank, unless
    ``default`` (e.g. a command-line value) is given, which fills those.
    Values outside [0, 10] mag are an :class:`InputError` naming the file.
    """
    if not hasattr(catalogue, "colnames"):
        catalogue = read_catalogue(catalogue, bands=None)
    source = catalogue.meta.get("path", "catalogue")
    names, row, _ = _match_rows(catalogue, names, ra, dec, radius_arcsec)
    ebv = np.full(len(names), np.nan)
    if "ebv" in catalogue.colnames:
        col = np.asarray(catalogue["ebv"], dtype=np.float64)
        hit = row >= 0
        ebv[hit] = col[row[hit]]
    elif default is None:
        logger.info("%s has no E(B-V) column; no extinction applied", source)
    return _ebv_values(ebv, default, f"photometry catalogue {source}")


def fibres_ebv(fibres, *, default=None):
    """Per-row E(B−V) (mag) from an ``EBV`` column of a FIBRES table; NaN (or ``default``) where absent."""
    from astropy.table import Table

    table = fibres if hasattr(fibres, "colnames") else Table(fibres)
    col = _find_column(table, _EBV_NAMES)
    values = _float_column(table, col) if col is not None else np.full(len(table), np.nan)
    return _ebv_values(values, default, "FIBRES table")


def photometry_from_fibres(fibres, bands=("g", "r", "i", "z"), *, default_err=None):
    """Photometry from magnitude columns of a frame's FIBRES table, if present.

    Parameters
    ----------
    fibres : astropy Table (or FITS record array) with one row per star, in
        the order wanted (pass the standards' rows). Magnitude columns are
        named as the band (``g``, ``BP``, ``panstarrs-g``, case-insensitive)
        with errors ``d<band>`` / ``<band>_err`` / ``e_<band>``.
    bands : sequence of str, or None: every band of :data:`REFCAT2_BANDS`
        whose column is present (none present: a Photometry with no band,
        logged).
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
    if default_err is not None:
        default_err = float(default_err)
        if not (math.isfinite(default_err) and default_err > 0):
            raise InputError(f"default_err must be a positive number of mag, got {default_err!r}")
    if bands is None:
        bands = _present_bands(table, REFCAT2_BANDS)
        if not bands:
            logger.warning("FIBRES table: no magnitude column of any band %s", ", ".join(REFCAT2_BANDS))
    bands = as_bands(bands)
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


# ------------------------------------------------------------- colour priors


def fit_colour_teff(grid, colour=("BP", "RP"), *, systems=None, deg=3, source=None) -> ColourTeffRelation:
    """Derive Teff(colour) from the synthetic colours of a template grid.

    Parameters
    ----------
    grid : :class:`~gpucal.containers.TemplateGrid` (``params`` (n_t, 4)
        host or backend with Teff in column 0; ``flux`` (n_t, n_w) in
        erg/s/cm²/Å on ``wave``, covering both bands).
    colour : (blue, red) band names.
    systems : the colour's systems, one name or one per band (default: each
        band's catalogue system) — those of the photometry it will be used on.
    deg : degree of the polynomial θ(colour), θ = 5040/Teff (the usual
        infrared-flux-method form; smooth and monotonic over F/G/K colours).

    Returns
    -------
    :class:`ColourTeffRelation`. Raises :class:`CoverageError` if the grid
    does not cover a band, :class:`InputError` if the colour does not vary
    with Teff across the grid.
    """
    from .extinction import redden

    bands = tuple(resolve_band(b) for b in as_bands(colour))
    if len(bands) != 2 or bands[0] == bands[1]:
        raise InputError(f"a colour needs two different bands, got {colour!r}")
    systems = band_systems(bands, systems)
    teff = np.asarray(to_numpy(grid.params), dtype=np.float64)[:, 0]
    mags = to_numpy(synthetic_mags(grid.wave, grid.flux, bands, system=systems))
    c = mags[:, 0] - mags[:, 1]
    ok = np.isfinite(c) & np.isfinite(teff) & (teff > 0)
    if ok.sum() <= deg + 1 or np.ptp(teff[ok]) == 0 or np.ptp(c[ok]) < 1e-3:
        raise InputError(
            f"cannot fit Teff({bands[0]} - {bands[1]}): the grid has {int(ok.sum())} usable nodes "
            f"spanning {np.ptp(teff[ok]) if ok.any() else 0:.0f} K and {np.ptp(c[ok]) if ok.any() else 0:.3f} mag"
        )
    poly = np.polynomial.Polynomial.fit(c[ok], 5040.0 / teff[ok], deg).convert()
    fitted = 5040.0 / poly(c[ok])
    scatter = float(np.sqrt(np.mean(((fitted - teff[ok]) / teff[ok]) ** 2)))
    # Colour excess per unit E(B-V): the grid reddened by a small E(B-V) (linear regime).
    ebv = 0.05
    red = redden(grid.wave, grid.flux, np.full(int(grid.flux.shape[0]), ebv))
    mags_red = to_numpy(synthetic_mags(grid.wave, red, bands, system=systems))
    excess = float(np.mean((mags_red[ok, 0] - mags_red[ok, 1]) - c[ok]) / ebv)
    if source is None:
        source = f"synthetic colours of {getattr(grid, 'meta', {}).get('source', 'a template grid')} ({int(ok.sum())} nodes)"
    return ColourTeffRelation(
        bands=bands,
        systems=systems,
        coeffs=tuple(float(v) for v in poly.coef),
        colour_range=(float(c[ok].min()), float(c[ok].max())),
        teff_range=(float(teff[ok].min()), float(teff[ok].max())),
        scatter=scatter,
        excess_per_ebv=excess,
        source=source,
    )


#: Colours tried for the Teff prior, in order of preference.
PRIOR_COLOURS = (("BP", "RP"), ("g", "i"), ("g", "r"))


@functools.lru_cache(maxsize=16)
def _demo_relation(colour: tuple, systems: tuple) -> ColourTeffRelation:
    from ..templates.demo import demo_grid

    return fit_colour_teff(demo_grid(), colour, systems=systems, source="synthetic colours of the built-in demo grid")


def default_colour_relations(photometry=None) -> tuple:
    """Teff(colour) relations fitted to the built-in demo grid (cached), for :data:`PRIOR_COLOURS`.

    With ``photometry``, only the colours whose two bands it has, in its
    systems. The demo grid is analytic (blackbody-like continua): for real
    data fit the relation to the template grid in use with
    :func:`fit_colour_teff` and pass it to :func:`teff_from_colour`.
    """
    out = []
    for colour in PRIOR_COLOURS:
        bands = tuple(resolve_band(b) for b in colour)
        if photometry is None:
            systems = tuple(band_system(b) for b in bands)
        else:
            have = dict(zip(photometry.bands, photometry.system or tuple(band_system(b) for b in photometry.bands)))
            if not all(b in have for b in bands):
                continue
            systems = tuple(have[b] for b in bands)
        out.append(_demo_relation(bands, band_systems(bands, systems)))
    return tuple(out)


def teff_from_colour(photometry, *, relations=None, ebv=None):
    """A Teff prior per star from its colour.

    Parameters
    ----------
    photometry : :class:`~gpucal.containers.Photometry` (n_star stars).
    relations : sequence of :class:`ColourTeffRelation`, tried in order;
        each star uses the first whose two bands it has valid. Default:
        :func:`default_colour_relations` (BP−RP, then g−i, then g−r).
    ebv : (n_star,) E(B−V) (mag), optional: colours are dereddened by
        ``ebv · relation.excess_per_ebv`` (NaN = no correction).

    Returns
    -------
    teff, teff_err : (n_star,) float64 NumPy arrays (K); NaN for stars with
    no usable colour. ``teff_err`` adds in quadrature the relation's scatter,
    the colour's photometric error through dTeff/dcolour, and, for a colour
    outside the fitted range (where Teff is held at the range's end), the
    distance to where the end slope would put it.
    """
    bands = tuple(photometry.bands)
    systems = band_systems(bands, photometry.system or None)
    if relations is None:
        relations = default_colour_relations(photometry)
    mag = np.asarray(photometry.mag, dtype=np.float64)
    err = np.asarray(photometry.err, dtype=np.float64)
    valid = np.asarray(photometry.valid, dtype=bool) & np.isfinite(mag) & np.isfinite(err)
    n_star = mag.shape[0]
    shift = np.zeros(n_star) if ebv is None else np.nan_to_num(_host_float(ebv), nan=0.0)
    if shift.shape != (n_star,):
        raise InputError(f"ebv must have one value per star ({n_star}), got shape {shift.shape}")
    teff = np.full(n_star, np.nan)
    teff_err = np.full(n_star, np.nan)
    for rel in relations:
        if not all(b in bands for b in rel.bands):
            continue
        i, j = bands.index(rel.bands[0]), bands.index(rel.bands[1])
        if (systems[i], systems[j]) != tuple(rel.systems):
            raise InputError(
                f"relation {rel.name} was fitted in {rel.systems} but the photometry is in "
                f"({systems[i]}, {systems[j]}); fit it in the photometry's systems"
            )
        use = valid[:, i] & valid[:, j] & np.isnan(teff)
        colour = mag[:, i] - mag[:, j] - shift * rel.excess_per_ebv
        t, slope = rel(colour)
        beyond = colour - np.clip(colour, *rel.colour_range)
        sigma = np.sqrt((rel.scatter * t) ** 2 + (slope * np.hypot(err[:, i], err[:, j])) ** 2 + (slope * beyond) ** 2)
        teff = np.where(use, t, teff)
        teff_err = np.where(use, sigma, teff_err)
    return teff, teff_err


def teff_prior_mask(grid_params, teff, teff_err, nsigma=3.0, *, min_halfwidth=0.0):
    """Grid nodes allowed by each star's colour Teff: (n_star, n_t) bool on ``grid_params``' backend.

    Parameters
    ----------
    grid_params : (n_t, ≥1) backend array, Teff (K) in column 0.
    teff, teff_err : (n_star,) K, host or backend (from :func:`teff_from_colour`).
    nsigma : half-width of the window in units of ``teff_err``.
    min_halfwidth : K, a floor on the half-width (e.g. one grid step, to keep
        neighbours for refinement around the best node).

    Returns
    -------
    mask : True where |Teff_node − teff| ≤ max(nsigma · teff_err, min_halfwidth),
        and always at the Teff nearest to ``teff`` (so no star loses the
        whole grid); all True for a star without a prior (NaN teff or error).
        One broadcast comparison, no loop.
    """
    xp = array_namespace(grid_params)
    if grid_params.ndim != 2 or int(grid_params.shape[1]) < 1:
        raise InputError(f"grid_params must be (n_t, n_param) with Teff in column 0, got shape {tuple(grid_params.shape)}")
    nsigma, min_halfwidth = float(nsigma), float(min_halfwidth)
    if not (math.isfinite(nsigma) and nsigma > 0) or not (math.isfinite(min_halfwidth) and min_halfwidth >= 0):
        raise InputError(f"nsigma must be > 0 and min_halfwidth >= 0, got {nsigma!r}, {min_halfwidth!r}")
    be = backend_of(grid_params)
    t = to_backend(teff, be, dtype=xp.float64)
    s = to_backend(teff_err, be, dtype=xp.float64)
    if t.ndim != 1 or tuple(s.shape) != tuple(t.shape):
        raise InputError(f"teff and teff_err must be (n_star,) alike, got {tuple(t.shape)} and {tuple(s.shape)}")
    node = xp.astype(grid_params[:, 0], xp.float64)
    has = xp.isfinite(t) & xp.isfinite(s) & (s >= 0)
    half = xp.maximum(nsigma * xp.where(has, s, 0.0), min_halfwidth)
    d = xp.abs(node[None, :] - xp.where(has, t, 0.0)[:, None])
    nearest = d <= xp.min(d, axis=1, keepdims=True)
    return (d <= half[:, None]) | nearest | ~has[:, None]


def teff_disagreement(best_teff, teff, teff_err, *, best_err=None, nsigma=3.0, names=None):
    """Flag stars whose fitted Teff disagrees with their colour Teff.

    Parameters
    ----------
    best_teff : (n_star,) Teff of the best-fitting template (host or backend).
    teff, teff_err : (n_star,) the colour prior (:func:`teff_from_colour`).
    best_err : (n_star,) optional error of ``best_teff``, added in quadrature.
    nsigma : threshold on |best − colour| / σ.
    names : optional star names for the messages.

    Returns
    -------
    flag : (n_star,) host bool, True where |Δ| > nsigma σ (never for stars
        without a prior).
    messages : list of str, a warning per flagged star ("" otherwise), e.g.
        ``"Teff 7500 K from the spectrum vs 5200 ± 150 K from the colour (15.3 σ)"``.
    """
    best = _host_float(best_teff).reshape(-1)
    t = _host_float(teff).reshape(-1)
    s = _host_float(teff_err).reshape(-1)
    if not (best.shape == t.shape == s.shape):
        raise InputError(f"best_teff, teff and teff_err must be (n_star,) alike, got {best.shape}, {t.shape}, {s.shape}")
    if best_err is not None:
        s = np.hypot(s, np.nan_to_num(_host_float(best_err).reshape(-1), nan=0.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.abs(best - t) / s
    flag = np.isfinite(best) & np.isfinite(t) & np.isfinite(s) & (z > nsigma)
    messages = []
    for k in range(best.shape[0]):
        if not flag[k]:
            messages.append("")
            continue
        who = f"{names[k]}: " if names is not None and names[k] else ""
        zk = f"{z[k]:.1f} σ" if np.isfinite(z[k]) else "σ = 0"
        messages.append(
            f"{who}Teff {best[k]:.0f} K from the spectrum vs {t[k]:.0f} ± {s[k]:.0f} K from the colour ({zk})"
        )
    return flag, messages


# --------------------------------------------------------------- consistency


def photometric_consistency(residual, valid, max_dev=0.3, *, bands=None):
    """Stars to exclude for their photometry after the scale fit, with the reason.

    Parameters
    ----------
    residual : (n_star, n_band) synthetic − observed magnitude after scaling
        (``scale_template_to_photometry(...)["residual"]``), backend array.
    valid : (n_star, n_band) bool, the bands used in the fit (host or backend).
    max_dev : mag; a star whose residuals span more than this between bands
        (max − min over its valid bands) is inconsistent.
    bands : optional band names for the messages.

    Returns
    -------
    bad : (n_star,) bool on ``residual``'s backend: no usable band, or
        residuals spanning > ``max_dev``.
    reasons : list of str per star, "" for good stars, e.g.
        ``"no usable photometric band"`` or ``"photometry inconsistent between
        bands: residuals span 0.45 mag > 0.30 (panstarrs-g +0.21, twomass-J
        -0.24)"``.
    """
    xp = array_namespace(residual)
    if residual.ndim != 2:
        raise InputError(f"residual must be (n_star, n_band), got shape {tuple(residual.shape)}")
    max_dev = float(max_dev)
    if not (math.isfinite(max_dev) and max_dev > 0):
        raise InputError(f"max_dev must be a positive number of mag, got {max_dev!r}")
    r = xp.astype(residual, xp.float64)
    use = to_backend(valid, backend_of(residual)) & xp.isfinite(r)
    n_used = xp.sum(xp.astype(use, xp.int64), axis=1)
    hi = xp.where(use, r, -xp.inf)
    lo = xp.where(use, r, xp.inf)
    spread = xp.where(n_used >= 2, xp.max(hi, axis=1) - xp.min(lo, axis=1), 0.0)
    none = n_used == 0
    bad = none | (spread > max_dev)
    h_bad, h_none, h_spread, h_hi, h_lo, h_ihi, h_ilo = (
        to_numpy(v) for v in (bad, none, spread, xp.max(hi, axis=1), xp.min(lo, axis=1),
                              xp.argmax(hi, axis=1), xp.argmin(lo, axis=1))
    )
    n_band = int(residual.shape[1])
    names = list(bands) if bands is not None else [f"band {b}" for b in range(n_band)]
    reasons = []
    for k in range(h_bad.shape[0]):
        if not h_bad[k]:
            reasons.append("")
        elif h_none[k]:
            reasons.append("no usable photometric band")
        else:
            reasons.append(
                f"photometry inconsistent between bands: residuals span {h_spread[k]:.2f} mag > {max_dev:.2f} "
                f"({names[int(h_ihi[k])]} {h_hi[k]:+.2f}, {names[int(h_ilo[k])]} {h_lo[k]:+.2f})"
            )
    return bad, reasons

"""Catalogue photometry: read standard-star magnitudes and match them to the frame's standards.

Step of the mission: the edge of the photometry room, where catalogue text
becomes arrays. Refcat2-style rows (CSV, ECSV, FITS or VOTable tables) (``name, ra, dec, g, dg, ..., BP, dBP,
..., J, dJ, ...``; degrees and magnitudes) and magnitude columns of a frame's
FIBRES table are read (:func:`read_catalogue`, :func:`photometry_from_fibres`)
and matched to the ``n_star`` standards by name or sky position
(:func:`match_photometry`) into a :class:`~gpucal.containers.Photometry` of
host NumPy arrays ``mag, err, valid (n_star, n_band)`` (mag; NaN and
``valid`` False where missing); E(B−V) per star (mag, ``(n_star,)``) from an
``ebv`` column (:func:`match_ebv`, :func:`fibres_ebv`).

Host-side edge module: NumPy and astropy (tables, sky matching) only.
Sentinels (Refcat2): a magnitude ≥ 99 or an error ≥ 9 (or ≤ 0) is missing.

Duplicates are never resolved silently: a standard matched by more than one
row (rows of its name, or rows within the match radius of its position) is a
:class:`~gpucal.errors.PhotometryError` naming the file, the star and the
rows, unless the rows hold identical photometry (then one is used and a
warning names them). See docs/bad_inputs.md, "Ambiguous side inputs".
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from ..containers import Photometry
from ..errors import InputError, PhotometryError
from ._host import host_float
from .bands import BAND_ALIASES, REFCAT2_BANDS, as_bands, band_system, resolve_band

__all__ = ["read_catalogue", "match_photometry", "match_ebv", "photometry_from_fibres", "fibres_ebv", "fibre_bands",
           "CATALOGUE_FORMATS"]

logger = logging.getLogger("gpucal.photometry")

# Catalogue sentinels (Refcat2): these mean "no measurement".
_MAG_SENTINEL = 99.0
_ERR_SENTINEL = 9.0

_RA_NAMES = ("ra", "raj2000", "ra_deg", "ra_icrs")
_DEC_NAMES = ("dec", "dej2000", "decj2000", "dec_deg", "de_icrs", "dec_icrs")
_NAME_NAMES = ("name", "objname", "object", "id")
_EBV_NAMES = ("ebv", "e_bv", "e(b-v)", "ebmv", "e_b-v", "ebv_sfd")


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
    """Read a Refcat2-style table of standard-star photometry.

    Parameters
    ----------
    path : str or os.PathLike
        Any table astropy reads, chosen by the name's ending
        (:data:`CATALOGUE_FORMATS`: ``.csv``, ``.ecsv``, ``.fits``/``.fit``
        (the first table HDU), ``.vot``/``.xml``; other names: astropy's own
        guess, then its text-table guesses). Columns (names case-insensitive): ``name``
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
    path = os.fspath(path)
    table = _read_csv(path)
    if bands is None:
        bands = _present_bands(table, REFCAT2_BANDS)
        if not bands:
            raise InputError(
                f"photometry catalogue {path}: none of the Refcat2 band columns "
                f"{', '.join(REFCAT2_BANDS)} is present (columns: {', '.join(table.colnames)})"
            )
    bands = as_bands(bands)
    resolved = tuple(resolve_band(b) for b in bands)
    out, has = _identity_columns(table, path)
    _add_band_columns(out, table, bands, path)
    out.meta.update(path=path, bands=resolved, system=tuple(band_system(b) for b in resolved), **has)
    return out


#: Catalogue formats by file name ending (anything else: astropy's own format guess, then its text-table guesses).
CATALOGUE_FORMATS = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".fits": "fits", ".fit": "fits", ".fits.gz": "fits",
                     ".fit.gz": "fits", ".vot": "votable", ".votable": "votable", ".xml": "votable"}
_FORMAT_WORDS = {"ascii": "a text table", "ascii.csv": "CSV", "ascii.ecsv": "ECSV", "fits": "a FITS table", "votable": "a VOTable"}


def _catalogue_format(path: str):
    low = path.lower()
    return next((f for end, f in sorted(CATALOGUE_FORMATS.items(), key=lambda kv: -len(kv[0])) if low.endswith(end)),
                None)


def _read_csv(path: str):
    """The table at ``path`` (CSV, ECSV, FITS, VOTable by its name, else astropy's guess) as an astropy Table;
    InputError naming the file and the format tried otherwise."""
    import warnings

    from astropy.table import Table

    if not os.path.isfile(path):
        raise InputError(f"photometry catalogue {path}: no such file")
    fmt = _catalogue_format(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy's "hdu= was not specified" and unit-parsing chatter
            if fmt is not None:
                return Table.read(path, format=fmt)
            try:
                return Table.read(path)  # FITS and VOTable are recognised by their content
            except Exception:  # noqa: BLE001 -- no format recognised: astropy's text guesses (ECSV, CSV, ...)
                fmt = "ascii"
                return Table.read(path, format=fmt, guess=True)
    except Exception as exc:  # astropy raises many types for malformed text
        raise InputError(f"photometry catalogue {path}: cannot read as {_FORMAT_WORDS[fmt]} "
                         f"({type(exc).__name__}: {exc})") from None


def _name_strings(table, col) -> list:
    """The stripped text of column ``col`` (masked entries: empty strings)."""
    return [s.strip() for s in np.ma.filled(np.ma.asarray(table[col]).astype(str), "")]


def _identity_columns(table, path):
    """A new Table with ``name``, ``ra``, ``dec`` (and ``ebv``) of ``table``, and which it had.

    Raises InputError when only one of ra/dec is present, or when neither a
    name nor coordinates are (no star could be matched).
    """
    from astropy.table import Table

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
        out["name"] = np.array(_name_strings(table, name_col), dtype=str) if n else np.zeros(0, dtype=str)
    else:
        out["name"] = np.full(n, "", dtype=str)
    out["ra"] = _float_column(table, ra_col) if ra_col is not None else np.full(n, np.nan)
    out["dec"] = _float_column(table, dec_col) if dec_col is not None else np.full(n, np.nan)
    ebv_col = _find_column(table, _EBV_NAMES)
    if ebv_col is not None:
        out["ebv"] = _float_column(table, ebv_col)
    return out, dict(has_name=name_col is not None, has_coords=ra_col is not None, has_ebv=ebv_col is not None)


def _add_band_columns(out, table, bands, path) -> None:
    """Add ``<b>``, ``<b>_err``, ``<b>_valid`` to ``out`` per band (speclite name ``<b>``).

    Raises InputError when no requested band has a column; absent ones are
    all-missing and logged.
    """
    found, absent = [], []
    for band in bands:
        rb = resolve_band(band)
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
    """Catalogue row per star (-1 = unmatched) and how it matched: name first, then position.

    A star that more than one row matches (rows of its name, or rows within
    ``radius_arcsec`` of its position) goes through :func:`_check_duplicates`:
    rows with identical photometry are used once (a warning names them),
    rows that differ are a :class:`PhotometryError`.
    """
    import astropy.units as u

    radius_arcsec = _radius(radius_arcsec)
    source = catalogue.meta.get("path", "catalogue")
    names = tuple("" if s is None else str(s).strip() for s in names)
    n_star = len(names)
    ra = host_float(ra).reshape(-1)
    dec = host_float(dec).reshape(-1)
    if ra.shape[0] != n_star or dec.shape[0] != n_star:
        raise InputError(f"names, ra and dec must have one entry per star: got {n_star}, {ra.shape[0]}, {dec.shape[0]}")

    cat_names = [str(s).strip() for s in catalogue["name"]] if "name" in catalogue.colnames else []
    rows_of = {}
    for k, s in enumerate(cat_names):
        if s:
            rows_of.setdefault(s, []).append(k)
    row = np.full(n_star, -1)
    info = ["unmatched"] * n_star
    candidates = {}
    for k, s in enumerate(names):
        if s and s in rows_of:
            row[k] = rows_of[s][0]
            info[k] = "name"
            candidates[k] = (rows_of[s], f"named {s!r}")

    cat_ra = np.asarray(catalogue["ra"], dtype=np.float64) if "ra" in catalogue.colnames else np.zeros(0)
    cat_dec = np.asarray(catalogue["dec"], dtype=np.float64) if "dec" in catalogue.colnames else np.zeros(0)
    usable = np.nonzero(np.isfinite(cat_ra) & np.isfinite(cat_dec))[0]
    todo = np.nonzero((row < 0) & np.isfinite(ra) & np.isfinite(dec))[0]
    if usable.size and todo.size:
        from astropy.coordinates import SkyCoord  # only where a star is matched by position (slow to import)

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
        hit = np.nonzero(np.atleast_1d(sep) <= radius_arcsec)[0]
        candidates.update(_rows_within(cat, stars, hit, todo, usable, radius_arcsec))
    _check_duplicates(catalogue, names, candidates, source)
    return names, row, info


def _rows_within(cat, stars, hit, todo, usable, radius_arcsec) -> dict:
    """{star: (catalogue rows within the radius of it, how)} for the position-matched ``stars[hit]``."""
    import astropy.units as u

    if hit.size == 0:
        return {}
    # the KD-tree match_to_catalog_sky built on ``cat`` is reused; a zero radius still finds coincident rows
    i_star, i_cat, sep, _ = cat.search_around_sky(stars[hit], max(radius_arcsec, 1e-6) * u.arcsec)
    keep = sep.to_value(u.arcsec) <= radius_arcsec
    out = {}
    how = f"within {radius_arcsec:g} arcsec of its position"
    for t in range(hit.size):
        rows = usable[i_cat[keep & (i_star == t)]]
        out[int(todo[hit[t]])] = (sorted(int(r) for r in rows), how)
    return out


def _rows_agree(catalogue, rows) -> bool:
    """Whether catalogue ``rows`` hold the same value in every photometry (and E(B−V)) column."""
    for col in catalogue.colnames:
        if col in ("name", "ra", "dec"):
            continue
        values = np.asarray(catalogue[col])[rows]
        if values.dtype.kind == "f":
            if not np.array_equal(values, np.full_like(values, values[0]), equal_nan=True):
                return False
        elif not np.all(values == values[0]):
            return False
    return True


def _row_list(rows) -> str:
    """1-based catalogue data rows, at most ten."""
    nums = [str(int(r) + 1) for r in rows[:10]]
    return ", ".join(nums) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")


def _check_duplicates(catalogue, names, candidates, source) -> None:
    """Report stars that several catalogue rows match; never pick one of differing rows silently.

    ``candidates`` maps a star index to (its rows, how they match). Rows that
    agree in every photometry column are one measurement listed twice (e.g.
    overlapping catalogue queries): the first is used and a warning names the
    rows, once per catalogue. Rows that differ are a PhotometryError naming the
    file, the star(s) and the rows (data rows counted from 1 after the header).
    """
    conflicts = []
    reported = catalogue.meta.setdefault("reported_duplicates", [])  # a list: Table meta must stay serialisable
    for k, (rows, how) in candidates.items():
        if len(rows) < 2:
            continue
        star = names[k] or f"star {k + 1}"
        if not _rows_agree(catalogue, rows):
            conflicts.append(f"star {star!r}: rows {_row_list(rows)} ({how}) differ")
        elif [star, list(rows)] not in reported:
            reported.append([star, list(rows)])
            logger.warning(
                "photometry catalogue %s: star %r matches rows %s (%s) with identical photometry; used once",
                source, star, _row_list(rows), how,
            )
    if conflicts:
        raise PhotometryError(
            f"photometry catalogue {source}: duplicate entries for a standard, which one is right is ambiguous: "
            f"{'; '.join(conflicts[:5])}{f'; and {len(conflicts) - 5} more' if len(conflicts) > 5 else ''} "
            "(data rows counted from 1 after the header; remove the wrong rows)"
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

    Raises
    ------
    PhotometryError
        A standard matches several rows that differ (same name, or within
        ``radius_arcsec`` of its position); the message names the file, the
        star and the rows (1 = first data row). Identical rows are used once,
        with a warning.
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

    phot = _missing_photometry(names, resolved)
    hit = row >= 0
    for b, rb in enumerate(resolved):
        m, e, v = _catalogue_band(catalogue, rb)
        phot.mag[hit, b] = m[row[hit]]
        phot.err[hit, b] = e[row[hit]]
        phot.valid[hit, b] = v[row[hit]]
    return phot, info


def _missing_photometry(names: tuple, resolved: tuple) -> Photometry:
    """Photometry of ``names`` in the bands ``resolved`` with every value missing, to be filled in.

    ``mag``, ``err`` (n_star, n_band) NaN, ``valid`` False; ``system`` each band's catalogue system.
    """
    shape = (len(names), len(resolved))
    return Photometry(
        names=names,
        bands=resolved,
        mag=np.full(shape, np.nan),
        err=np.full(shape, np.nan),
        valid=np.zeros(shape, dtype=bool),
        system=tuple(band_system(b) for b in resolved),
    )


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


def fibre_bands(fibres) -> tuple:
    """The bands with a magnitude and an error column in a fibre table: every :data:`REFCAT2_BANDS` band
    present, then columns named by a speclite filter (``decam2014-g``, ``sdss2010-r``, ...), in column order."""
    from astropy.table import Table

    from .bands import resolve_band as _resolve

    table = fibres if hasattr(fibres, "colnames") else Table(fibres)
    out = list(_present_bands(table, REFCAT2_BANDS))
    seen = {resolve_band(b) for b in out}
    for col in table.colnames:
        if "-" not in col or col in seen:
            continue
        try:
            rb = _resolve(col)
        except (InputError, ValueError):
            continue
        if rb not in seen and _band_arrays(table, col, source="fibre table")[2].any():
            out.append(col)
            seen.add(rb)
    return tuple(out)


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
        names = tuple(_name_strings(table, name_col))
    else:
        names = ("",) * n
    phot = _missing_photometry(names, resolved)
    absent = []
    for b, band in enumerate(bands):
        m, e, v, col = _band_arrays(table, band, source="FIBRES table", default_err=default_err)
        phot.mag[:, b], phot.err[:, b], phot.valid[:, b] = m, e, v
        if col is None:
            absent.append(resolved[b])
    if absent:
        logger.warning("FIBRES table: no magnitudes for band(s) %s", ", ".join(absent))
    return phot

"""Photometric bands: names, systems, filter curves and their weights on a wavelength grid.

Step of the mission: the first of the photometry room — say which filter a
catalogue column means and what a spectrum's flux through it is.

* Names. Short aliases as catalogue columns spell them (``g``, ``BP``, ``Ks``;
  :data:`BAND_ALIASES`), speclite names ``<group>-<band>`` or a speclite
  ``.ecsv`` file resolve to one speclite filter name (:func:`resolve_band`);
  each band's catalogue system is AB or Vega (:func:`band_system`).
* Filter curves. speclite ``FilterResponse`` objects, loaded once
  (:func:`load_filters`); wavelengths in Å.
* Band matrix. The photon-weighted responses resampled onto a spectrum grid
  ``wave (n_w,)`` Å as a weight matrix ``W (n_w, n_band)`` such that
  ``flux (n_spec, n_w) @ W`` are AB maggies (:func:`band_matrix`), built on
  the host with NumPy and cached per (grid, bands); the product itself runs in
  the spectra's namespace (:mod:`gpucal.photometry.synphot`).

Host-side edge code: NumPy, speclite and astropy only. ``as_bands``,
``band_systems``, ``host_wave`` and ``uncovered_message`` are helpers shared by
the room's modules (not re-exported by the package).
"""

from __future__ import annotations

import functools
import glob
import os

import numpy as np

from ..backends import to_numpy
from ..errors import InputError

__all__ = [
    "BAND_ALIASES",
    "REFCAT2_BANDS",
    "resolve_band",
    "band_system",
    "load_filters",
    "band_matrix",
    "seed_band_matrix",
]

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

#: The bands of an ATLAS Refcat2-style catalogue, as its columns name them
#: (NOTES.md): Pan-STARRS g r i z (AB), Gaia G ("Gaia"), BP, RP and 2MASS
#: J H K (Vega), each with an error column ``d<band>``.
REFCAT2_BANDS = ("g", "r", "i", "z", "Gaia", "BP", "RP", "J", "H", "K")

# Filter groups whose catalogue magnitudes are on the Vega system (NOTES.md:
# Gaia and 2MASS are Vega; Bessell UBVRI are conventionally Vega too).
_VEGA_GROUPS = ("gaiadr2", "gaiadr3", "twomass", "bessell")

_SYSTEMS = {"ab": "AB", "vega": "Vega"}



# ------------------------------------------------------------ names, systems


def _speclite_names():
    # Found without importing speclite.filters (which imports scipy.interpolate and astropy.units):
    # the curves themselves load on first use, and a process that is handed its band matrices
    # (gpucal.workcache) never loads them.
    import importlib.util

    spec = importlib.util.find_spec("speclite")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("speclite is not installed: it provides the filter curves (pip install speclite)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data", "filters")
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
    import speclite.filters

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


def as_bands(bands) -> tuple:
    """One band name or a sequence of them -> a tuple of names."""
    return (bands,) if isinstance(bands, str) else tuple(bands)


def band_systems(bands: tuple, system) -> tuple:
    """Per-band systems ("AB"/"Vega") from one name or a sequence (case forgiven)."""
    if system is None:
        return tuple(band_system(b) for b in bands)
    if isinstance(system, str):
        system = (system,) * len(bands)
    system = tuple(system)
    if len(system) != len(bands):
        raise InputError(f"got {len(system)} photometric systems for {len(bands)} bands ({', '.join(bands)})")
    out = []
    for b, sy in zip(bands, system):
        key = sy.strip().lower() if isinstance(sy, str) else None
        if key not in _SYSTEMS:
            raise InputError(f"photometric system of band {b!r} must be 'AB' or 'Vega', got {sy!r}")
        out.append(_SYSTEMS[key])
    return tuple(out)


# ------------------------------------------------------------- filter curves


@functools.lru_cache(maxsize=None)
def _load_filter(resolved: str):
    import speclite.filters

    try:
        return speclite.filters.load_filter(resolved)
    except (ValueError, RuntimeError, OSError) as exc:
        raise InputError(f"cannot load filter curve {resolved!r}: {exc}") from None


def load_filters(names) -> tuple:
    """speclite ``FilterResponse`` objects for band names or aliases (cached)."""
    if isinstance(names, str):
        names = (names,)
    return tuple(_load_filter(resolve_band(n)) for n in names)


# -------------------------------------------------------------- band matrix


def host_wave(wave) -> np.ndarray:
    """A wavelength grid (Å; list, NumPy or backend array) as a checked host float64 array."""
    w = np.asarray(wave if isinstance(wave, (list, tuple)) else to_numpy(wave), dtype=np.float64)
    if w.ndim != 1 or w.shape[0] < 2:
        raise InputError(f"wavelength grid must be 1-D with at least 2 points, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or not np.all(np.diff(w) > 0):
        raise InputError("wavelength grid must be finite and strictly increasing (Å)")
    return w


@functools.lru_cache(maxsize=None)
def _hc_erg_aa() -> float:
    """h*c in erg*Å, computed exactly as speclite does, so that our photon weights
    and speclite's AB zeropoints (which include 1/hc) cancel to the last bit."""
    import astropy.constants
    import astropy.units as u

    return (astropy.constants.h * astropy.constants.c).to(u.erg * u.AA).value


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
    weight[order] = trap * q / _hc_erg_aa()

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
    w = host_wave(wave)
    if isinstance(bands, str):
        bands = (bands,)
    key = (w.tobytes(), tuple(resolve_band(b) for b in bands))
    return _GIVEN[key] if key in _GIVEN else _band_matrix_cached(*key)


#: Band matrices handed over by the flow (the working-grid cache keeps them on disk), so that a
#: new process need not load the filter curves: {(wave bytes, speclite names): (W, covered)}.
_GIVEN: dict = {}


def seed_band_matrix(wave, bands, W, covered) -> None:
    """Make :func:`band_matrix` ``(wave, bands)`` return ``(W, covered)`` (host arrays, kept read-only):
    a band matrix computed by :func:`band_matrix` earlier (the last 32 given are kept)."""
    w = host_wave(wave)
    W = np.array(W, dtype=np.float64)
    covered = np.array(covered, dtype=bool)
    bands = (bands,) if isinstance(bands, str) else tuple(bands)
    if W.shape != (w.shape[0], len(bands)) or covered.shape != (len(bands),):
        raise InputError(f"band matrix of shape {W.shape} / {covered.shape} for {w.shape[0]} pixels and "
                         f"{len(bands)} bands")
    W.flags.writeable = False
    covered.flags.writeable = False
    while len(_GIVEN) >= 32:
        _GIVEN.pop(next(iter(_GIVEN)))
    _GIVEN[w.tobytes(), tuple(resolve_band(b) for b in bands)] = (W, covered)


def uncovered_message(wave: np.ndarray, bands) -> str:
    """One line naming ``bands`` (not covered by the host grid ``wave``), their extent and what is missing."""
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

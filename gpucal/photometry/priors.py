"""Colour priors: Teff from a star's colour, through relations fitted to a template grid.

Step of the mission: narrow the grid scan to the templates a star's colour
allows, and check the fitted Teff against it afterwards.

* Relations. θ = 5040 K / Teff as a polynomial in one colour (mag), fitted
  to the synthetic colours of a template grid (``params (n_t, 4)`` with Teff
  in K in column 0, ``flux (n_t, n_w)`` erg/s/cm²/Å on ``wave (n_w,)`` Å):
  :func:`fit_colour_teff` for one colour, :func:`fit_colour_relations` for
  every colour of :data:`PRIOR_COLOURS` the grid supports (once per grid),
  :func:`default_colour_relations` for those a photometry has, in its systems.
* Prior. Teff and its error per star, ``(n_star,)`` K, from the first
  relation whose two bands the star has (:func:`teff_from_colour`); the
  ``(n_star, n_t)`` mask of the grid nodes within n σ of it
  (:func:`teff_prior_mask`, on the grid's namespace and device).
* Check. Stars whose fitted Teff is more than n σ from the colour's
  (:func:`teff_disagreement`).

Written against the array API (no NumPy import): catalogue photometry and the
relations' polynomials are host data (``Photometry`` holds host arrays,
:class:`~gpucal.containers.ColourTeffRelation` evaluates on the host), so
those steps run in the host arrays' namespace; the one NumPy-specific step,
the least-squares polynomial, is :func:`gpucal.photometry._host.fit_polynomial`.
Photometry imports nothing from ``gpucal.templates``: the grid is passed in.
"""

from __future__ import annotations

import math
import weakref

from ..backends import array_namespace, backend_of, to_backend, to_numpy
from ..containers import ColourTeffRelation
from ..errors import GpucalError, InputError
from ._host import fit_polynomial, host_float
from .bands import as_bands, band_system, band_systems, resolve_band
from .extinction import redden
from .synphot import synthetic_mags

__all__ = [
    "PRIOR_COLOURS",
    "fit_colour_teff",
    "fit_colour_relations",
    "default_colour_relations",
    "teff_from_colour",
    "teff_prior_mask",
    "teff_disagreement",
]

#: Colours tried for the Teff prior, in order of preference.
PRIOR_COLOURS = (("BP", "RP"), ("g", "i"), ("g", "r"))

# E(B-V) (mag) by which the grid is reddened to measure a colour's excess
# per unit E(B-V) (small: the linear regime).
_EXCESS_EBV = 0.05


# ---------------------------------------------------------------- relations


def _grid_colour(wave, flux, bands, systems):
    """Host (n_t,) colour m_blue − m_red of spectra ``flux (n_t, n_w)`` in ``systems``."""
    mags = to_numpy(synthetic_mags(wave, flux, bands, system=systems))
    return mags[:, 0] - mags[:, 1]


def _span(xp, x) -> float:
    """max − min of a 1-D array (0 when empty)."""
    return float(xp.max(x) - xp.min(x)) if int(x.shape[0]) else 0.0


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
    bands = tuple(resolve_band(b) for b in as_bands(colour))
    if len(bands) != 2 or bands[0] == bands[1]:
        raise InputError(f"a colour needs two different bands, got {colour!r}")
    systems = band_systems(bands, systems)
    teff = host_float(grid.params)[:, 0]
    xp = array_namespace(teff)
    c = _grid_colour(grid.wave, grid.flux, bands, systems)
    ok = xp.isfinite(c) & xp.isfinite(teff) & (teff > 0)
    c_ok, t_ok = c[ok], teff[ok]
    n_ok = int(xp.sum(xp.astype(ok, xp.int64)))
    if n_ok <= deg + 1 or _span(xp, t_ok) == 0 or _span(xp, c_ok) < 1e-3:
        raise InputError(
            f"cannot fit Teff({bands[0]} - {bands[1]}): the grid has {n_ok} usable nodes "
            f"spanning {_span(xp, t_ok):.0f} K and {_span(xp, c_ok):.3f} mag"
        )
    coeffs, theta = fit_polynomial(c_ok, 5040.0 / t_ok, deg)
    scatter = float(xp.sqrt(xp.mean(((5040.0 / theta - t_ok) / t_ok) ** 2)))
    n_t = int(grid.flux.shape[0])
    red = redden(grid.wave, grid.flux, xp.full(n_t, _EXCESS_EBV, dtype=xp.float64))
    excess = float(xp.mean(_grid_colour(grid.wave, red, bands, systems)[ok] - c_ok) / _EXCESS_EBV)
    if source is None:
        source = f"synthetic colours of {getattr(grid, 'meta', {}).get('source', 'a template grid')} ({n_ok} nodes)"
    return ColourTeffRelation(
        bands=bands,
        systems=systems,
        coeffs=coeffs,
        colour_range=(float(xp.min(c_ok)), float(xp.max(c_ok))),
        teff_range=(float(xp.min(t_ok)), float(xp.max(t_ok))),
        scatter=scatter,
        excess_per_ebv=excess,
        source=source,
    )


def fit_colour_relations(grid) -> tuple[ColourTeffRelation, ...]:
    """Teff(colour) relations of ``grid`` for every colour of :data:`PRIOR_COLOURS` it supports.

    In :data:`PRIOR_COLOURS` order, each colour in its bands' catalogue
    systems (:func:`fit_colour_teff` with its defaults). A colour is skipped
    when the grid cannot support it: a band outside the grid's wavelengths,
    or no Teff signal across its nodes. An empty tuple means no prior.

    Pure (the grid in, the relations out): fit once per grid and reuse the
    result for every frame calibrated with it.
    """
    relations = []
    for colour in PRIOR_COLOURS:
        try:
            relations.append(fit_colour_teff(grid, colour))
        except GpucalError:
            continue  # the grid does not cover that colour's bands, or it carries no Teff signal
    return tuple(relations)


# Relations fitted by default_colour_relations, per live grid object:
# id(grid) -> (weak reference to it, {(bands, systems): relation}).
_FITTED: dict = {}


def _fitted_relation(grid, bands: tuple, systems: tuple) -> ColourTeffRelation:
    """:func:`fit_colour_teff` of ``grid``, remembered while the grid object lives."""
    key = id(grid)
    entry = _FITTED.get(key)
    if entry is None or entry[0]() is not grid:
        try:
            ref = weakref.ref(grid, lambda _ref, key=key: _FITTED.pop(key, None))
        except TypeError:  # not weakly referenceable: nothing to remember it by
            return fit_colour_teff(grid, bands, systems=systems)
        entry = _FITTED[key] = (ref, {})
    memo = entry[1]
    if (bands, systems) not in memo:
        memo[bands, systems] = fit_colour_teff(grid, bands, systems=systems)
    return memo[bands, systems]


def default_colour_relations(photometry=None, *, grid=None) -> tuple[ColourTeffRelation, ...]:
    """Teff(colour) relations of :data:`PRIOR_COLOURS` fitted to ``grid``.

    Parameters
    ----------
    photometry : :class:`~gpucal.containers.Photometry`, optional
        Only the colours whose two bands it has, in its systems; without it
        every colour, in each band's catalogue system.
    grid : :class:`~gpucal.containers.TemplateGrid`
        The grid to fit them to (required; e.g. the grid in use, or
        ``gpucal.templates.demo.demo_grid()`` for the analytic demo grid).
        Relations are remembered per grid object while it lives, so repeated
        calls with one (unmodified) grid fit once.

    Raises
    ------
    InputError
        No grid given; :class:`CoverageError` or :class:`InputError` from
        :func:`fit_colour_teff` when the grid cannot support a colour
        (:func:`fit_colour_relations` skips those instead).
    """
    if grid is None:
        raise InputError(
            "default_colour_relations needs the template grid to fit Teff(colour) to: pass grid= "
            "(the grid in use, or gpucal.templates.demo.demo_grid())"
        )
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
        out.append(_fitted_relation(grid, bands, band_systems(bands, systems)))
    return tuple(out)


# -------------------------------------------------------------------- prior


def _nan_to_zero(xp, x):
    """NaN -> 0 and ±inf -> ±the largest float (as ``numpy.nan_to_num(x, nan=0.0)``)."""
    big = xp.finfo(x.dtype).max
    return xp.where(xp.isnan(x), 0.0, xp.clip(x, -big, big))


def teff_from_colour(photometry, *, relations=None, ebv=None, grid=None):
    """A Teff prior per star from its colour.

    Parameters
    ----------
    photometry : :class:`~gpucal.containers.Photometry` (n_star stars).
    relations : sequence of :class:`ColourTeffRelation`, tried in order;
        each star uses the first whose two bands it has valid. Default:
        :func:`default_colour_relations` of ``photometry`` fitted to ``grid``
        (BP−RP, then g−i, then g−r).
    ebv : (n_star,) E(B−V) (mag), optional: colours are dereddened by
        ``ebv · relation.excess_per_ebv`` (NaN = no correction).
    grid : :class:`~gpucal.containers.TemplateGrid`, the grid to fit the
        default relations to; needed only when ``relations`` is None.

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
        relations = default_colour_relations(photometry, grid=grid)
    mag = host_float(photometry.mag)
    err = host_float(photometry.err)
    xp = array_namespace(mag)
    valid = xp.asarray(photometry.valid, dtype=xp.bool) & xp.isfinite(mag) & xp.isfinite(err)
    n_star = int(mag.shape[0])
    shift = xp.zeros(n_star, dtype=xp.float64) if ebv is None else _nan_to_zero(xp, host_float(ebv))
    if tuple(shift.shape) != (n_star,):
        raise InputError(f"ebv must have one value per star ({n_star}), got shape {tuple(shift.shape)}")
    teff = xp.full(n_star, math.nan, dtype=xp.float64)
    teff_err = xp.full(n_star, math.nan, dtype=xp.float64)
    for rel in relations:
        if not all(b in bands for b in rel.bands):
            continue
        i, j = bands.index(rel.bands[0]), bands.index(rel.bands[1])
        if (systems[i], systems[j]) != tuple(rel.systems):
            raise InputError(
                f"relation {rel.name} was fitted in {rel.systems} but the photometry is in "
                f"({systems[i]}, {systems[j]}); fit it in the photometry's systems"
            )
        use = valid[:, i] & valid[:, j] & xp.isnan(teff)
        colour = mag[:, i] - mag[:, j] - shift * rel.excess_per_ebv
        t, slope = rel(colour)
        beyond = colour - xp.clip(colour, *rel.colour_range)
        sigma = xp.sqrt((rel.scatter * t) ** 2 + (slope * xp.hypot(err[:, i], err[:, j])) ** 2 + (slope * beyond) ** 2)
        teff = xp.where(use, t, teff)
        teff_err = xp.where(use, sigma, teff_err)
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


# -------------------------------------------------------------------- check


def _z_score(xp, diff, s):
    """|Δ| / σ without dividing by zero: ±inf for Δ > 0 at σ = ±0, NaN for 0/0 (IEEE values)."""
    zero = s == 0
    at_zero = xp.where(diff > 0, xp.copysign(xp.full(s.shape, math.inf), s), math.nan)
    return xp.where(zero, at_zero, diff / xp.where(zero, 1.0, s))


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
    best = host_float(best_teff)
    xp = array_namespace(best)
    best = xp.reshape(best, (-1,))
    t = xp.reshape(host_float(teff), (-1,))
    s = xp.reshape(host_float(teff_err), (-1,))
    if not (best.shape == t.shape == s.shape):
        raise InputError(f"best_teff, teff and teff_err must be (n_star,) alike, got {best.shape}, {t.shape}, {s.shape}")
    if best_err is not None:
        s = xp.hypot(s, _nan_to_zero(xp, xp.reshape(host_float(best_err), (-1,))))
    z = _z_score(xp, xp.abs(best - t), s)
    flag = xp.isfinite(best) & xp.isfinite(t) & xp.isfinite(s) & (z > nsigma)
    messages = []
    for k in range(int(best.shape[0])):
        if not flag[k]:
            messages.append("")
            continue
        who = f"{names[k]}: " if names is not None and names[k] else ""
        zk = f"{z[k]:.1f} σ" if math.isfinite(float(z[k])) else "σ = 0"
        messages.append(
            f"{who}Teff {best[k]:.0f} K from the spectrum vs {t[k]:.0f} ± {s[k]:.0f} K from the colour ({zk})"
        )
    return flag, messages

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

import numpy as np

from ..backends import array_namespace, backend_of, to_backend, to_numpy
from ..containers import ColourTeffRelation
from ..errors import CoverageError, InputError
from .bands import (
    as_bands,
    band_matrix,
    band_system,
    band_systems,
    host_wave,
    resolve_band,
    uncovered_message,
)
from ._host import host_float
from .vega import system_offsets

__all__ = [
    "coverage_message",
    "synthetic_maggies",
    "synthetic_mags",
    "fit_colour_teff",
    "PRIOR_COLOURS",
    "default_colour_relations",
    "teff_from_colour",
    "teff_prior_mask",
    "teff_disagreement",
]

logger = logging.getLogger("gpucal.photometry")


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
    shift = np.zeros(n_star) if ebv is None else np.nan_to_num(host_float(ebv), nan=0.0)
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
    best = host_float(best_teff).reshape(-1)
    t = host_float(teff).reshape(-1)
    s = host_float(teff_err).reshape(-1)
    if not (best.shape == t.shape == s.shape):
        raise InputError(f"best_teff, teff and teff_err must be (n_star,) alike, got {best.shape}, {t.shape}, {s.shape}")
    if best_err is not None:
        s = np.hypot(s, np.nan_to_num(host_float(best_err).reshape(-1), nan=0.0))
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

"""calibrate_frame(): the mission as a short story of calls.

load -> batch -> prepare -> match -> scale -> vectors -> verdicts -> combine
-> apply -> host -> report -> write. Host data (FITS frame, catalogue,
template grid) is read at the edges and moved to the backend once; the
per-star, per-template and per-pixel work runs batched on the backend in the
step rooms (fitting/, calibration/, photometry/); results come back to the
host once for the output file, the per-star table and the summary (report/).
This module orchestrates and computes nothing itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
import weakref

import astropy
import numpy as np
from astropy import units as u
from astropy.io import fits
from array_api_compat import device as _device

from . import __version__
from .backends import array_namespace, get_backend, to_backend, to_numpy
from .calibration import (
    apply_flux_calibration,
    cal_at_fibres,
    calibration_vectors,
    common_grid,
    combine_calibration_vectors,
    scale_template_to_photometry,
    shift_to_observed,
    to_common_grid,
)
from .calibration.telluric import TELLURIC_MIN_STARS
from .calibration import MASK_BITS, binned_residuals, mask_bits, mask_counts, zeropoint_ab
from .calibration.verdicts import (
    LIKELY_CAUSES,
    MAX_FRAME_CHI2_DOF,
    MAX_SCATTER,
    MIN_GOOD_FRACTION,
    duplicate_of,
    frame_verdict,
    star_verdicts,
    verdict_reasons,
)
from .containers import CalibrationOutput, Frame, MatchResult, Photometry, SpectraBatch, TemplateGrid
from .errors import AlreadyCalibratedError, CalibrationError, CoverageError, InputError, PhotometryError
from .fitting import (
    TELLURIC_DEFAULT,
    PhotometricTerm,
    cell_grid,
    common_shape,
    divide_shape,
    fit_forward,
    fitted_templates,
    on_own_lsf,
    with_node_fallback,
    fwhm_from_resolution,
    gather_templates,
    match_templates,
    refine_on_own_lsf,
    region_mask,
    representative_fwhm_poly,
)
from .io import file_sha256, read_frame, write_calibrated_frame
from .photometry import (
    fibre_bands,
    fibres_ebv,
    match_ebv,
    match_photometry,
    photometry_from_fibres,
    photometric_consistency,
    read_catalogue,
    redden,
    synthetic_mags,
    teff_disagreement,
    teff_from_colour,
    teff_prior_mask,
)
from .report.provenance import provenance_keywords, provenance_record, provenance_table
from .report.stars import per_star_table
from .report.summary import fits_keywords, frame_summary, history_lines
from .templates import load_templates
from .units import convert_medium
from .workcache import band_matrices, colour_relations, prepared_grid
from .workcache import fit_grid as cached_fit_grid

__all__ = ["calibrate_frame"]

logger = logging.getLogger("gpucal")

#: The colour Teff prior never narrows a star's scan below ±this (K).
PRIOR_FLOOR_K = 500.0


def _photometry(frame: Frame, photometry, names, bands, radius_arcsec, ebv):
    """Photometry of the standards, how each was matched, and E(B−V) per star (host)."""
    n = len(names)
    default_ebv = 0.0 if ebv is None else float(ebv)
    if isinstance(photometry, Photometry):
        return photometry, ["given"] * n, np.full(n, default_ebv)
    if photometry is None:
        return _fibre_photometry(frame, names, bands, default_ebv)
    cat = read_catalogue(photometry, bands=bands)
    fib = frame.fibres
    idx = frame.standards
    ra = np.asarray(fib["RA"], dtype=float)[idx] if "RA" in fib.colnames else np.full(len(idx), np.nan)
    dec = np.asarray(fib["DEC"], dtype=float)[idx] if "DEC" in fib.colnames else np.full(len(idx), np.nan)
    unit = str(getattr(fib["RA"], "unit", "") or "") if "RA" in fib.colnames else ""
    if unit.startswith("rad"):  # 2dF-style FIBRES tables give radians
        ra, dec = np.degrees(ra), np.degrees(dec)
    phot, info = match_photometry(cat, names, ra, dec, bands=bands, radius_arcsec=radius_arcsec)
    ebvs = match_ebv(cat, names, ra, dec, radius_arcsec=radius_arcsec, default=default_ebv)
    return phot, info, np.asarray(ebvs, dtype=float)


def _with_medium(frame: Frame, medium) -> Frame:
    """The frame in the medium its headers state, else ``medium`` (``--medium``), else air with a warning."""
    if medium is not None and medium not in ("air", "vacuum"):
        raise InputError(f"--medium must be 'air' or 'vacuum', got {medium!r}")
    if frame.medium_stated:
        if medium is not None and medium != frame.medium:
            raise InputError(f"{frame.path}: --medium {medium} contradicts the frame's headers, which say "
                             f"{frame.medium}")
        return frame
    if medium is None:
        logger.warning("%s: the headers do not say whether the wavelengths are in air or vacuum (no WAVEMED or "
                       "AIRORVAC, CTYPE1 neither AWAV nor WAVE); taking air; pass --medium air|vacuum", frame.path)
        return frame
    return dataclasses.replace(frame, medium=medium, medium_stated=True)


def _fibre_photometry(frame: Frame, names, bands, default_ebv):
    """No catalogue: the standards' magnitudes from the frame's fibre table (issue 15; columns as in
    :func:`gpucal.photometry.photometry_from_fibres`), or a PhotometryError saying what to give."""
    rows = frame.fibres[frame.standards]
    use = fibre_bands(rows) if bands is None else bands
    if not use:
        raise PhotometryError(f"{frame.path}: no photometry given for the standards (use --photometry CATALOGUE, or "
                              "give magnitude columns such as g, dg, r, dr in the fibre table)")
    phot = photometry_from_fibres(rows, use)
    phot.names = tuple(names)
    return phot, ["fibres"] * len(names), np.asarray(fibres_ebv(rows, default=default_ebv), dtype=float)


_NO_PRIOR = (None, None, None)


def _colour_relations(grid: TemplateGrid) -> tuple:
    """The grid's colour-Teff relations, fitted once per grid and kept by the working-grid cache."""
    return colour_relations(grid)


def _colour_prior(grid: TemplateGrid, phot: Photometry, ebv, bparams, nsigma=3.0):
    """Teff from the stars' colours (relations fitted on this grid), and the grid mask it allows."""
    relations = _colour_relations(grid)
    if not relations:
        return _NO_PRIOR
    teff, teff_err = teff_from_colour(phot, relations=relations, ebv=ebv)
    steps = np.diff(np.unique(np.asarray(grid.params)[:, 0]))
    step = float(steps.max()) if steps.size else 0.0
    # Never narrower than ±PRIOR_FLOOR_K: one bad band must not force the wrong
    # template (the disagreement is reported instead), and refinement keeps its neighbours.
    mask = teff_prior_mask(bparams, teff, teff_err, nsigma=nsigma, min_halfwidth=max(2 * step, PRIOR_FLOOR_K))
    return teff, teff_err, mask


def _check_options(vrange, min_stars, bounds):
    vmin, vmax, vstep = (float(v) for v in vrange)
    if not (np.isfinite([vmin, vmax, vstep]).all() and vmin < vmax and vstep > 0):
        raise InputError(f"--vrange needs finite vmin < vmax and step > 0 km/s, got {vmin}:{vmax}:{vstep}")
    if int(min_stars) < 1:
        raise InputError(f"--min-stars must be >= 1, got {min_stars}")
    for name, bound in bounds.items():  # checked before the work, not after it
        if bound is not None and not (np.isfinite(float(bound)) and float(bound) > 0):
            raise InputError(f"{name} must be a positive number or None (no bound), got {bound}")


def _standard_ids(frame: Frame):
    """Row indices, names and 1-based fibre numbers of the frame's standards (host)."""
    std = np.asarray(frame.standards, dtype=int)
    fib = frame.fibres
    names = [str(n).strip() for n in (np.asarray(fib["NAME"])[std] if "NAME" in fib.colnames
                                      else [f"fibre{i + 1}" for i in std])]
    fibres = np.asarray(fib["FIBRE"], dtype=int)[std] if "FIBRE" in fib.colnames else std + 1
    return std, tuple(names), fibres


def _standards_batch(frame: Frame, std, names, fibres, medium, be) -> SpectraBatch:
    """The standards on the backend, once, on wavelengths in the grid's ``medium``.

    The frame's wavelengths are relabelled, not the grid's: a converted grid is no
    longer uniform in ln λ, which the LSF convolution and the velocity scan need.
    """
    xp = be.xp
    own = frame.wave[std] if frame.wave.ndim == 2 else frame.wave  # per-fibre wavelengths: each its own row
    wave = to_backend(convert_medium(own, frame.medium, medium), be, dtype=xp.float64)
    flux = to_backend(frame.flux[std], be, dtype=xp.float64)
    var = to_backend(frame.var[std], be, dtype=xp.float64)
    mask = xp.isfinite(flux) & xp.isfinite(var) & (var > 0)
    return SpectraBatch(wave=wave, flux=flux, var=var, mask=mask, fibre_ids=fibres, names=names, medium=medium)


def _prepare(grid, spectra, frame, dtype, mask_regions, vrange, lsf, bands):
    # The grid stays where it is (host, possibly memory-mapped); prepare_grid streams it in blocks,
    # once per grid and instrument setting: the working-grid cache (gpucal.workcache) keeps it,
    # and the grid's band matrices for the photometric scale.
    band_matrices(grid, bands)
    try:
        return prepared_grid(grid, spectra.wave, dtype=dtype, good_regions=mask_regions,
                             vstep=float(vrange[2]), **lsf)
    except CoverageError as exc:
        raise CoverageError(f"{frame.path}: {exc}") from None


def _models(grid, match, ebv_star, be):
    """Each star's refined rest-frame template, reddened by its E(B−V): (grid wave, (n_star, n_w))."""
    gwave = to_backend(grid.wave, be, dtype=be.xp.float64)
    model = fitted_templates(grid.flux, match)
    if np.any(ebv_star != 0):
        model = redden(gwave, model, ebv_star)
    return gwave, model


#: Synthetic magnitudes of every grid node, per grid and (bands, systems): the fit's photometric term.
_NODE_MAGS = weakref.WeakKeyDictionary()
FITS = ("continuous", "nodes")


def _node_mags(grid, phot, be):
    key = (tuple(phot.bands), tuple(phot.system))
    cache = _NODE_MAGS.setdefault(grid, {})
    if key not in cache:
        flux = to_backend(grid.flux, be, dtype=be.xp.float64)
        cache[key] = to_numpy(synthetic_mags(grid.wave, flux, phot.bands, system=phot.system or None))
    return to_backend(cache[key], be, dtype=be.xp.float64)


def _photometric_term(grid, phot, ebv_star, match, be, weight):
    """The catalogue's magnitudes as a term of the fit; reddening from each star's scan node (first order)."""
    xp = be.xp
    offset = None
    if np.any(ebv_star != 0):
        gwave = to_backend(grid.wave, be, dtype=xp.float64)
        node = xp.astype(gather_templates(grid.flux, be, match.index), xp.float64)
        system = phot.system or None
        offset = (synthetic_mags(gwave, redden(gwave, node, ebv_star), phot.bands, system=system)
                  - synthetic_mags(gwave, node, phot.bands, system=system))
    mag = to_backend(phot.mag, be, dtype=xp.float64)
    err = to_backend(phot.err, be, dtype=xp.float64)
    return PhotometricTerm(node_mag=_node_mags(grid, phot, be), mag=mag, err=err,
                           valid=to_backend(phot.valid, be), offset=offset, weight=weight)


def _own_lsf(grid, prepared, spectra, match, fwhm_star, mask_regions):
    """Per-fibre LSF: the scan ran on one; the refinement redone on each star's own (else ``match``)."""
    if fwhm_star is None:
        return match
    return refine_on_own_lsf(grid, prepared, spectra, match, fwhm_star, good_regions=mask_regions)


def _write(out, frame, output, history, overwrite):
    """The calibrated frame, its MASK and PROVENANCE, written atomically to ``out``."""
    write_calibrated_frame(out, frame, output.flux, output.var, cal_wave=output.wave, cal=output.cal,
                           cal_var=output.cal_var, cal_measured=output.measured, per_star=output.per_star,
                           keywords={**fits_keywords(output.summary), **_qa_keywords(output)},
                           history=history, overwrite=overwrite, mask=output.extra["mask"], mask_bits=MASK_BITS,
                           provenance=provenance_table(output.summary["provenance"]))
    output.out_path = str(out)


def _own_lsf_counts(spectra, grid, at, fwhm_star, lsf):
    """Per-fibre LSF: the counts over each star's template on its own LSF / on ``lsf``, at ``at``'s (θ, v).

    Measured (bench/perfibre_lsf.py, fibre LSFs ±40 %): the continuous fit on the one LSF alone
    misses logg by up to 0.13 dex and Teff by 160 K on the fibre farthest from the median; with
    these counts it is within 0.01 dex and 5 K, as the node refinement on each star's own LSF is.
    Without a per-fibre LSF (``fwhm_star`` None): ``spectra``.
    """
    return spectra if fwhm_star is None else on_own_lsf(spectra, grid, at, fwhm_star, **lsf)


#: Passes of the common throughput shape after the first continuous fit (at most), and LM iterations in
#: each. The shape (:func:`~gpucal.fitting.forward.common_shape`) is estimated from the previous pass's
#: models, so it also holds part of their common error, and the bias shrinks by ~2x a pass
#: (structured throughput, 20 off-node standards, bench/forward_accuracy.py: mean ΔTeff +103 K after the
#: first fit, +37 K after one shape pass, +18 K after two, +11 K after three, +8 K after four). The
#: passes stop once one moves the stars' Teff by less than :data:`SHAPE_TOL_TEFF` on average (one host
#: check a pass): where the throughput is smooth, further passes only fit the shape's noise (the demo's
#: 5 on-node standards: 0.255 % after one pass, 0.268 % after two, 0.271 % after four).
SHAPE_PASSES = 6
#: Iterations of the first fit (from the scan's two starts, before any common shape is divided out).
#: 7 gave the same parameters and vectors as 10 on bench/forward_accuracy.py's 16 frames (one
#: 6-standard frame 0.758 -> 0.683 %) and saved ~35 ms a frame, but let one standard of the
#: transposed frame of tests/test_sanity.py end with χ²/dof 382 and pass every per-star check, so
#: that the frame calibrated on it instead of being refused: 10 keeps that frame refused.
FIRST_ITER = 10
SHAPE_ITER = 4
SHAPE_TOL_TEFF = 5.0  # K
#: A first fit above this χ²/dof (or not converged) has the scan repeated on the shape-divided counts (:func:`_fit`).
RESCAN_CHI2_DOF = 3.0


def _fit(fit, grid, spectra, match, phot, ebv_star, mask_regions, lsf, be, phot_weight=1.0, fwhm_star=None,
         rescan=None):
    """The continuous forward-model fit from the scan's answer (``fit="continuous"``), else the scan's.

    ``fwhm_star`` (n_star, n_pix) Å, a per-fibre LSF: the fit's grid has the one LSF ``lsf``; each
    pass fits the counts divided by the ratio of the star's template on its own LSF to that on
    ``lsf`` (:mod:`gpucal.fitting.lsfratio`), at the node refinement's answer, then at the first pass's.

    ``rescan(spectra)``: the scan again with the same settings. Where a star's first fit fits badly
    (:func:`_needs_rescan`: χ²/dof above :data:`RESCAN_CHI2_DOF`), the scan is repeated once on the
    counts with the common shape divided out, the fit restarted from its answer, and each star keeps
    the better of the two fits on the same counts. A bright weak-lined star can be held by a
    throughput edge the scan's continuum cannot follow: in bench/forward_accuracy.py's structured
    frame (seed 1) a 7460 K star's scan answer is +500 km/s for +56 (χ² 3.2e6 on 3200 pixels), the
    rescan's +100, from which the fit reaches +56.
    """
    if fit == "nodes":
        return match
    xp = be.xp
    fine = cached_fit_grid(grid, spectra.wave, **lsf)  # once per grid and instrument setting
    term = _photometric_term(grid, phot, ebv_star, match, be, phot_weight)
    cells = cell_grid(fine.params)  # the grid's complete cells, built once for every pass
    seen = match.meta.get("observed_good") if spectra.wave.ndim == 1 else None  # the scan's outlier pixels
    cur = fit_forward(_own_lsf_counts(spectra, grid, match, fwhm_star, lsf), fine, match, photometry=term,
                      good_regions=mask_regions, cells=cells, pixels=seen, n_iter=FIRST_ITER)
    rescan_now = rescan is not None and bool(xp.any(_needs_rescan(cur)))  # one host check per frame
    # the throughput's structure that P cannot follow, common to every fibre, out of the counts; then again
    distinct = duplicate_of(spectra.flux, spectra.var) < 0  # a copied fibre must not count twice
    own = _own_lsf_counts(spectra, grid, cur, fwhm_star, lsf)
    for k in range(SHAPE_PASSES):
        flat = divide_shape(own, common_shape(own, cur, stars=distinct))
        cur = fit_forward(flat, fine, cur, photometry=term, good_regions=mask_regions, n_starts=1,
                          n_iter=SHAPE_ITER, cells=cells, pixels=cur.meta["obs_pixels"])
        if k == 0 and rescan_now:
            redo = fit_forward(flat, fine, rescan(flat), photometry=term, good_regions=mask_regions, cells=cells)
            cur = _better_fit(cur, redo, 0.0 if term is None else term.weight)
        elif float(xp.mean(xp.abs(cur.params[:, 0] - cur.meta["start_params"][:, 0]))) < SHAPE_TOL_TEFF:
            break  # one host check a pass: this pass moved Teff by little, the shape has converged
    out = with_node_fallback(cur, match, _node_answer_kept(cur, match, flat, fine, term, mask_regions, cells))
    return dataclasses.replace(out, meta=dict(out.meta, rv_at_edge=_rv_at_edge(out, match)))


def _needs_rescan(first):
    """(n_star,) bool: the stars to scan again, those whose first fit (``first``) fits badly (χ²/dof
    above :data:`RESCAN_CHI2_DOF`): a scan answer far off, e.g. hundreds of km/s.

    A star that merely did not converge is not rescanned: typically it oscillates across a node
    (the interpolant's kink), which a new start does not change, and :func:`_node_answer_kept`
    judges it at the end. Measured (2-core VM): rescanning those too changed none of
    bench/forward_accuracy.py's 16 frames, and cost a scan and a two-start fit of every star in 2 to
    3 of every 5 of bench frames' frames (0.6 s each).
    """
    xp = array_namespace(first.rv)
    return first.chi2 > RESCAN_CHI2_DOF * xp.astype(xp.maximum(first.dof, 1), xp.float64)


def _node_answer_kept(fit, match, flat, fine, term, mask_regions, cells):
    """(n_star,) bool: the stars whose fit did not converge and that keep the scan's refined answer.

    On the hull (held at a face beyond which no complete cell lies, e.g. beside a missing node)
    the scan's answer is kept; inside it, whichever of the two fits the same counts better (the
    forward model's χ² at the scan's answer, no iteration): a fit that oscillates across a node
    (a star at or near a node) is as good as converged — a 7710 K star of bench/forward_accuracy.py's
    structured frame of model spectra: the fit +36 K, the scan's node +287 K. Neither is excluded
    for it; both are reported, and the χ²/dof and photometric verdicts still apply.
    """
    xp = array_namespace(fit.rv)
    lost = ~fit.meta["converged"]
    if not bool(xp.any(lost & ~fit.meta["on_hull"])):  # one host check per frame
        return lost
    at_scan = fit_forward(flat, fine, match, photometry=term, good_regions=mask_regions, n_starts=1, n_iter=0,
                          cells=cells, pixels=fit.meta["obs_pixels"])
    wt = 0.0 if term is None else term.weight
    scan_better = at_scan.chi2 + wt * at_scan.meta["chi2_phot"] < fit.chi2 + wt * fit.meta["chi2_phot"]
    return lost & (fit.meta["on_hull"] | scan_better)


def _better_fit(a, b, phot_weight):
    """Per star, the fit (``a`` or ``b``, two fit_forward results on the same counts) of lower total χ²."""
    xp = array_namespace(a.rv)
    take_b = (b.chi2 + phot_weight * b.meta["chi2_phot"]) < (a.chi2 + phot_weight * a.meta["chi2_phot"])
    n = take_b.shape[0]

    def pick(x, y):
        if not (hasattr(x, "shape") and hasattr(y, "shape") and x.ndim >= 1 and x.shape[0] == n and x.shape == y.shape):
            return x
        return xp.where(xp.reshape(take_b, (n,) + (1,) * (x.ndim - 1)), y, x)

    fields = {f: pick(getattr(a, f), getattr(b, f)) for f in ("index", "params", "params_err", "rv", "rv_err", "chi2", "dof")}
    return MatchResult(**fields, meta={key: pick(val, b.meta.get(key)) for key, val in a.meta.items()})


def _rv_at_edge(fit, scan):
    """(n_star,) bool: the final velocity within one scan step of the scan range's ends (the scan's own
    flag for a star that kept the scan's answer): the fit may move a star off the edge, or onto it."""
    xp = array_namespace(fit.rv)
    lo = scan.meta.get("vrange_min")
    if lo is None:
        return scan.meta["rv_at_edge"]
    step, hi = scan.meta["velocity_step"], scan.meta["vrange_max"]
    edge = (fit.rv <= lo + step) | (fit.rv >= hi - step)
    back = fit.meta.get("fit_fallback")
    return edge if back is None else xp.where(back, scan.meta["rv_at_edge"], edge)


def _fallback(match):
    """(n_star,) bool: the stars whose continuous fit fell back on the node path's answer."""
    back = match.meta.get("fit_fallback")
    return back if back is not None else _not_converged(match) & False


def _fit_kept(match):
    """(n_star,) bool: the stars whose continuous fit did not converge and kept its own end (reported)."""
    xp = array_namespace(match.rv)
    conv, back = match.meta.get("converged"), match.meta.get("fit_fallback")
    if conv is None or back is None:
        return xp.zeros(match.rv.shape, dtype=xp.bool, device=_device(match.rv))
    return ~conv & ~back


def _not_converged(match):
    """Stars whose continuous fit did not converge and that kept no answer (none: :func:`_node_answer_kept`
    gives every such star the better of its fit and the scan's answer; a fit without that choice, e.g.
    a caller's own, is judged here)."""
    xp = array_namespace(match.rv)
    conv, back = match.meta.get("converged"), match.meta.get("fit_fallback")
    if conv is None or back is not None:
        return xp.zeros(match.rv.shape, dtype=xp.bool, device=_device(match.rv))
    return ~conv


def _verdicts(spectra, vec, match, sc, phot, max_phot_dev, max_chi2_dof):
    """Every check before the combination, in one place; the photometric reasons (host)."""
    xp = array_namespace(vec.cal)
    n_pix = spectra.flux.shape[1]
    floor = MIN_GOOD_FRACTION * n_pix
    n_in = xp.sum(xp.astype(spectra.mask, xp.int64), axis=1)
    n_good = xp.sum(xp.astype(vec.mask, xp.int64), axis=1)
    phot_bad, phot_reasons = photometric_consistency(sc.residual, xp.isfinite(sc.residual),
                                                     max_dev=max_phot_dev, bands=phot.bands)
    dup_of = duplicate_of(spectra.flux, spectra.var)
    checks = {"few_input_pixels": xp.astype(n_in, xp.float64) < floor, "duplicate": dup_of >= 0,
              "no_photometry": ~sc.ok, "photometry_inconsistent": phot_bad,
              "rv_at_edge": match.meta["rv_at_edge"], "fit_not_converged": _not_converged(match),
              "few_vector_pixels": xp.astype(n_good, xp.float64) < floor}
    if max_chi2_dof is not None:
        checks["chi2_dof"] = ~(_reduced_chi2(match) <= max_chi2_dof)
    return star_verdicts(checks), dup_of, phot_reasons


def _reduced_chi2(match):
    xp = array_namespace(match.chi2)
    return match.chi2 / xp.astype(xp.maximum(match.dof, 1), xp.float64)


def _apply(frame, res, be):
    """Every fibre calibrated (at its own wavelengths when it has them), and each fibre's count of bad input pixels."""
    xp = be.xp
    flux = to_backend(frame.flux, be, dtype=xp.float64)
    var = to_backend(frame.var, be, dtype=xp.float64)
    bad = xp.sum(xp.astype(~(xp.isfinite(flux) & xp.isfinite(var) & (var > 0)), xp.int64), axis=1)
    cal, cal_var = res.cal, res.var
    if frame.wave.ndim == 2:
        cal, cal_var, _ = cal_at_fibres(to_backend(frame.wave, be, dtype=xp.float64), res.wave, cal, cal_var,
                                        res.measured)
    return (*apply_flux_calibration(flux, var, cal, cal_var, fibre_axis=0), bad)


def _frame_lsf(frame, std, spectra, lsf, frame_lsf, be):
    """The frame's LSF (FWHM per fibre and pixel), used when asked or when no LSF option is given: (lsf, fwhm_star).

    The scan runs on one representative LSF (a cubic in λ through the standards'
    median FWHM); the per-star vectors use each star's own (n_star, n_pix).
    Without ``frame_lsf`` an LSF option given explicitly wins over the image.
    """
    given = any(v is not None for v in lsf.values())
    fw = _standards_fwhm(frame, std, be)
    if frame_lsf and (fw is None or given):
        why = "the frame has no LSF image (nor a RESOLUTION matrix)" if fw is None else "an LSF option is given too"
        raise InputError(f"{frame.path}: --frame-lsf: {why}")
    if fw is None:
        return lsf, None
    if given:
        logger.info("%s: the LSF option given replaces the frame's LSF image", frame.path)
        return lsf, None
    return dict(fwhm=None, fwhm_poly=representative_fwhm_poly(spectra.wave, fw), resolution=None), fw


def _window_lsf(frame, lsf):
    """The LSF the template window must allow for: the option given, else the widest FWHM of the frame's LSF image."""
    if any(v is not None for v in lsf.values()) or frame.lsf_fwhm is None:
        return lsf
    return dict(fwhm=float(np.max(frame.lsf_fwhm)), fwhm_poly=None, resolution=None)


def _standards_fwhm(frame, std, be):
    """The standards' LSF FWHM (n_star, n_pix) Å: the frame's LSF image, else from its RESOLUTION matrix, else None."""
    xp = be.xp
    if frame.lsf_fwhm is not None:
        return to_backend(np.ascontiguousarray(np.broadcast_to(frame.lsf_fwhm, frame.flux.shape)[std]), be,
                          dtype=xp.float64)
    rdata = getattr(frame, "resolution", None)  # DESI's (n_fibre, n_diag, n_pix), when the reader hands it on
    if rdata is None:
        return None
    wave = frame.wave[std] if frame.wave.ndim == 2 else frame.wave
    return fwhm_from_resolution(to_backend(wave, be, dtype=xp.float64),
                                to_backend(np.ascontiguousarray(np.asarray(rdata)[std]), be, dtype=xp.float64))


def _on_common_grid(frame, std, vec, be, mask_regions):
    """Per-fibre wavelengths: the per-star vectors on the frame's common grid (one grid: unchanged)."""
    if frame.wave.ndim == 1:
        return vec
    rows = to_backend(frame.wave[std], be, dtype=be.xp.float64)
    wave_c = common_grid(to_backend(frame.wave, be, dtype=be.xp.float64))
    return to_common_grid(vec, rows, wave_c, band=~region_mask(wave_c, mask_regions))


def _to_host(spectra, match, sc, vec, res, verdicts, dup_of, cal_flux, cal_var, bad):
    """Every result the outputs need, back on the host in one go."""
    xp = array_namespace(vec.cal)
    return {k: to_numpy(v) for k, v in dict(
        params=match.params, params_err=match.params_err, rv=match.rv, rv_err=match.rv_err,
        chi2=_reduced_chi2(match), dof=match.dof, scale=sc.scale, scale_err=sc.scale_err,
        n_bands=sc.n_bands, residual=sc.residual, code=verdicts.code, used=verdicts.usable, dup_of=dup_of,
        n_in=xp.sum(xp.astype(spectra.mask, xp.int64), axis=1),
        n_good=xp.sum(xp.astype(vec.mask, xp.int64), axis=1), level=res.summary["level"],
        n_outlier=res.summary["n_outlier_pixels"], rms=res.summary["rms_scatter"], cal=res.cal,
        cal_var=res.var, measured=res.measured, flux=cal_flux, var=cal_var, star_cal=vec.cal,
        star_mask=vec.mask, bad=bad, fit_fallback=_fallback(match), fit_kept=_fit_kept(match),
        **_telluric_arrays(res),
    ).items()}


def _check_telluric(telluric):
    if telluric not in ("correct", "mask"):
        raise InputError(f"--telluric must be 'correct' or 'mask', got {telluric!r}")


def _telluric_arrays(res) -> dict:
    """The telluric part's per-pixel results of the combination (none in the masked mode)."""
    return {k: v for k, v in res.summary.items() if k.startswith("telluric_")}


def _reasons(h, fibres, n_pix, match_info, phot_reasons, vrange, max_chi2_dof) -> list:
    """Each star's reason text from its verdict ("" for a used star)."""
    return verdict_reasons(h["code"], dict(
        n_pix=n_pix, n_in=h["n_in"], n_good=h["n_good"], chi2=h["chi2"],
        dup_fibre=np.where(h["dup_of"] >= 0, fibres[np.maximum(h["dup_of"], 0)], -1),
        match_info=match_info, phot_reasons=phot_reasons, vrange=vrange, max_chi2_dof=max_chi2_dof,
        level=h["level"]))


def _warn(names, fibres, reasons, prior, h):
    """Colour-Teff disagreements and excluded standards: logged, and returned for the summary."""
    warnings = []
    if prior[0] is not None:
        _, msgs = teff_disagreement(h["params"][:, 0], prior[0], prior[1], best_err=h["params_err"][:, 0],
                                    names=list(names))
        warnings += [m for m in msgs if m]
    warnings += [f"standard {names[i]} (fibre {fibres[i]}): the continuous fit did not converge; "
                 "the scan's refined node is used" for i in np.flatnonzero(h["fit_fallback"])]
    if h.get("fit_kept") is not None:
        warnings += [f"standard {names[i]} (fibre {fibres[i]}): the continuous fit did not converge; its end "
                     "fits the counts better than the scan's answer and is used" for i in np.flatnonzero(h["fit_kept"])]
    for m in warnings:
        logger.warning("%s", m)
    for i, r in enumerate(reasons):
        if r:
            logger.warning("standard %s (fibre %d) excluded: %s", names[i], fibres[i], r)
    return warnings


def _require_stars(frame, names, output, min_stars):
    n_used = output.summary["n_stars_used"]
    if n_used < min_stars:
        # every standard of a frame rejected at once says more about the frame than about its stars
        cause = f"; no standard is usable: {LIKELY_CAUSES}" if n_used == 0 and len(names) >= min_stars else ""
        raise CalibrationError(
            f"{frame.path}: {n_used} usable standard(s), fewer than --min-stars {min_stars}{cause}; "
            + "; ".join(f"{names[i]}: {s['reason']}" for i, s in enumerate(output.summary["stars"]) if s["reason"])
        )


def _require_sane(frame, output, max_frame_chi2_dof, max_scatter):
    """A CalibrationError when the frame as a whole fits absurdly (see :func:`frame_verdict`)."""
    s = output.summary
    why = frame_verdict([st["chi2_dof"] for st in s["stars"] if st["used"]], s["rms_scatter"],
                        max_frame_chi2_dof, max_scatter)
    if why:
        raise CalibrationError(f"{frame.path}: not calibrated: {why}")


class _Clock:
    """Wall time per stage of one frame (``gpucal bench frames`` tables them)."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self.t
        self.t = now


def calibrate_frame(frame, *, templates="demo", photometry=None, fwhm=None, fwhm_poly=None,
                    resolution=None, out=None, overwrite=False, backend=None,
                    combine="floored_mean", smooth=0, metric="chi2", vrange=(-500.0, 500.0, 5.0),
                    mask_regions=TELLURIC_DEFAULT, bands=None, match_radius=1.0, min_stars=1,
                    max_chi2_dof=None, max_memory=None, dtype="float32", ebv=None, teff_prior=True,
                    max_phot_dev=0.3, fast=False, max_frame_chi2_dof=MAX_FRAME_CHI2_DOF,
                    max_scatter=MAX_SCATTER, medium=None, frame_lsf=None, telluric="correct", recalibrate=False,
                    command_line=None, fit="continuous") -> CalibrationOutput:
    """Flux-calibrate one reduced frame; returns a CalibrationOutput (host arrays), written to ``out`` if given.

    frame : a FITS path or a :class:`~gpucal.containers.Frame`; templates : ``"demo"``, a
    TemplateGrid, a prepared cache or a BOSZ directory; photometry : a catalogue path or a
    Photometry aligned with the standards; fwhm / fwhm_poly / resolution : the instrument
    resolution (exactly one; none: the frame's LSF image or RESOLUTION, which ``frame_lsf=True``
    requires); out, overwrite : the output FITS; backend : name or Backend (default
    ``GPUCAL_BACKEND`` / auto).

    combine : ``"floored_mean"`` (default: the inverse-variance mean, each star's variance with its
    model-error floor, :mod:`gpucal.calibration.combine`), ``"weighted_mean"`` or ``"median"``; smooth : Savitzky–Golay window (px, 0 = none);
    metric : ``"chi2"`` or ``"huber"``; vrange : (vmin, vmax, step) km/s; mask_regions : (lo, hi) Å
    bands left out of the fit and the vectors; bands : catalogue bands to use (default every
    Refcat2 band present; one the grid does not cover is reported and left out); match_radius :
    arcsec; max_memory : the scan's working-set budget (bytes or "512M"); dtype : precision of
    the scan's large products; fast : the fast-path scan; ebv : E(B−V) on every template (F99,
    R_V = 3.1) unless the catalogue has an ``ebv`` column; teff_prior : scan only nodes within
    3σ of each star's colour Teff (relations fitted once per grid).

    Verdicts: min_stars — fewer usable standards is a CalibrationError and no output;
    max_chi2_dof — a star above it is excluded; max_phot_dev — a star whose band residuals
    span more (mag) is excluded as photometrically inconsistent; max_frame_chi2_dof (default
    1000) and max_scatter (RMS between the standards' vectors, default 0.2) — a frame beyond
    either is a CalibrationError naming the likely cause (transposed frame, wrong LSF, wrong
    medium); None = no bound. medium : ``"air"``/``"vacuum"`` for a frame whose headers do not
    say (without it such a frame is taken as air, with a warning); one that contradicts the
    headers is an InputError.

    telluric : ``"correct"`` (default: the absorption the standards measure inside ``mask_regions``,
    see :mod:`gpucal.calibration.telluric`) or ``"mask"`` (the bands bridged by the throughput).

    Outputs: recalibrate — accept an input already flux-calibrated (refused otherwise,
    AlreadyCalibratedError); command_line — the command that ran, for the PROVENANCE table
    (default: ``GPUCAL_COMMAND_LINE``, which ``gpucal`` sets).

    fit : ``"continuous"`` (default) — after the scan, every standard's (Teff, logg, [M/H],
    [α/M], v) fitted continuously in the grid by a forward model of its counts
    (:mod:`gpucal.fitting.forward`), a star that does not converge excluded; ``"nodes"`` —
    the scan's best node and one refinement step, as before.
    """
    options = dict(locals())  # every option as called, for the provenance
    clock = _Clock()
    if fit not in FITS:
        raise InputError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    _check_options(vrange, min_stars, dict(max_frame_chi2_dof=max_frame_chi2_dof, max_scatter=max_scatter))
    _check_telluric(telluric)
    be = get_backend(backend)
    frame = frame if isinstance(frame, Frame) else read_frame(frame)
    frame = _with_medium(_refuse_calibrated(frame, recalibrate), medium)
    std, names, fibres = _standard_ids(frame)
    lsf = dict(fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    grid = load_templates(templates, wave_range=(float(frame.wave.min()), float(frame.wave.max())),
                          medium=frame.medium, lsf=_window_lsf(frame, lsf),
                          vmax=max(abs(float(vrange[0])), abs(float(vrange[1]))))
    phot, match_info, ebv_star = _photometry(frame, photometry, names, bands, match_radius, ebv)
    spectra = _standards_batch(frame, std, names, fibres, grid.medium, be)
    lsf, fwhm_star = _frame_lsf(frame, std, spectra, lsf, frame_lsf, be)
    clock.lap("read")
    prepared = _prepare(grid, spectra, frame, dtype, mask_regions, vrange, lsf, phot.bands)
    prior = _colour_prior(grid, phot, ebv_star, prepared.params) if teff_prior else _NO_PRIOR
    clock.lap("prepare")
    match = match_templates(spectra, prepared, vrange=vrange, good_regions=mask_regions, max_memory=max_memory,
                            prior=prior[2], fast=fast, metric=metric)
    match = _own_lsf(grid, prepared, spectra, match, fwhm_star, mask_regions)
    clock.lap("scan")
    match = _fit(fit, grid, spectra, match, phot, ebv_star, mask_regions, lsf, be, fwhm_star=fwhm_star,
                 rescan=lambda s: match_templates(s, prepared, vrange=vrange, good_regions=mask_regions,
                                                  max_memory=max_memory, prior=prior[2], fast=fast, metric=metric))
    clock.lap("fit")
    gwave, model = _models(grid, match, ebv_star, be)
    sc = scale_template_to_photometry(gwave, shift_to_observed(gwave, model, match.rv), phot)
    vec = calibration_vectors(spectra.wave, spectra.flux, spectra.var, spectra.mask, gwave, model, match.rv,
                              sc.scale, sc.scale_err, template_fwhm=grid.resolution_fwhm,
                              mask_regions=mask_regions, fwhm_star=fwhm_star, keep_bands=telluric == "correct", **lsf)
    verdicts, dup_of, phot_reasons = _verdicts(spectra, vec, match, sc, phot, max_phot_dev, max_chi2_dof)
    clock.lap("vectors")
    res = combine_calibration_vectors(_on_common_grid(frame, std, vec, be, mask_regions), usable=verdicts.usable,
                                      method=combine, smooth=smooth)
    verdicts = verdicts.then("discrepant", res.summary["discrepant"]).then("not_combined", ~res.used)
    clock.lap("combine")
    cal_flux, cal_var, bad = _apply(frame, res, be)
    clock.lap("apply")
    h = _to_host(spectra, match, sc, vec, res, verdicts, dup_of, cal_flux, cal_var, bad)
    settings = dict(combine=combine, smooth=smooth, metric=metric, vrange=vrange, lsf=lsf, max_chi2_dof=max_chi2_dof,
                    telluric=telluric, telluric_min_stars=TELLURIC_MIN_STARS)
    output = _report(frame, be, (names, fibres), h, phot.bands, match_info, phot_reasons, prior,
                     prepared.n_templates, clock.laps, settings)
    _require_stars(frame, names, output, min_stars)
    _require_sane(frame, output, max_frame_chi2_dof, max_scatter)
    _outputs_qa(output, frame, std, spectra, vec, res, be, (grid, photometry, lsf, options))
    clock.lap("report")
    if out is not None:
        _write(out, frame, output, history_lines(names, fibres, h), overwrite)
        clock.lap("write")
    output.summary["timing_s"] = dict(clock.laps)  # stages: read prepare scan vectors combine apply report write
    return output


def _report(frame, be, ids, h, bands, match_info, phot_reasons, prior, n_templates, timing, settings):
    """Reasons, per-star table and summary of the host results, as a CalibrationOutput."""
    names, fibres = ids
    reasons = _reasons(h, fibres, frame.n_pix, match_info, phot_reasons, settings["vrange"],
                       settings["max_chi2_dof"])
    per_star = per_star_table(names, fibres, h, bands, match_info, reasons,
                              teff_colour=None if prior[0] is None else prior[:2])
    summary = frame_summary(
        frame_path=frame.path, backend=be, names=names, fibres=fibres, h=h, reasons=reasons, options=settings,
        n_templates=n_templates, bad_per_fibre=dict(zip(_all_fibre_numbers(frame), h["bad"].tolist())),
        timing=timing, warnings=_warn(names, fibres, reasons, prior, h))
    return CalibrationOutput(flux=h["flux"], var=h["var"], wave=common_grid(np.asarray(frame.wave)), cal=h["cal"],
                             cal_var=h["cal_var"], measured=h["measured"].astype(bool), per_star=per_star,
                             summary=summary, star_cal=h["star_cal"], star_mask=h["star_mask"],
                             extra={k: v for k, v in h.items() if k.startswith("telluric_")})


def _all_fibre_numbers(frame: Frame) -> list:
    fib = frame.fibres
    return (np.asarray(fib["FIBRE"]) if "FIBRE" in fib.colnames else np.arange(1, frame.n_fibre + 1)).tolist()


# --------------------------------------------------------------------------- outputs and QA (issue 18)


def _refuse_calibrated(frame: Frame, recalibrate: bool) -> Frame:
    """``frame``, unless it is already flux-calibrated (FLUXCAL = T or BUNIT a flux density) and not
    ``recalibrate``; recalibrated, its earlier gpucal HISTORY is dropped (not doubled)."""
    hdr = frame.header
    bunit = str(hdr.get("BUNIT", "") or "").strip()
    why = "FLUXCAL = T" if hdr.get("FLUXCAL") is True else ""
    if not why and bunit:
        try:
            unit = u.Unit(bunit, format="fits", parse_strict="silent")
            if any(unit.is_equivalent(f, equivalencies=u.spectral_density(5000 * u.AA)) for f in _FLUX_UNITS):
                why = f"BUNIT = {bunit!r} is a flux density"
        except (ValueError, TypeError, u.UnitsError):
            pass
    if not why:
        return frame
    if not recalibrate:
        raise AlreadyCalibratedError(f"{frame.path}: already flux-calibrated ({why}); "
                                     "use --recalibrate (recalibrate=True) to calibrate it again")
    logger.warning("%s: already flux-calibrated (%s); calibrating it again (--recalibrate)", frame.path, why)
    header = hdr.copy()
    keep = [c for c in header.cards if not (c.keyword == "HISTORY" and str(c.value).startswith("gpucal "))]
    header = fits.Header(keep)
    header.add_history(f"gpucal: recalibrated an already calibrated frame ({why})")
    return dataclasses.replace(frame, header=header)


_GRID_IDS = weakref.WeakKeyDictionary()


def _grid_identity(grid: TemplateGrid) -> tuple:
    """(id, SHA-256) of a template grid, once per grid: a prepared cache's sidecar hash; the built-in
    demo grid's generator parameters (its meta) with the gpucal version (the grid is rebuilt per
    call, hashing its 50 MB would cost more than the frame's I/O); else the hash of its arrays."""
    if grid not in _GRID_IDS:
        meta = grid.meta
        gid = str(meta.get("cache_path") or meta.get("source") or "in-memory grid")
        digest = meta.get("sidecar_sha256")
        if digest is None and meta.get("source") == "gpucal demo grid":
            text = json.dumps(dict(meta, gpucal_version=__version__), sort_keys=True, default=str)
            digest = hashlib.sha256(text.encode()).hexdigest()
        if digest is None:
            h = hashlib.sha256()
            for a in (grid.params, grid.wave, grid.flux):
                arr = np.ascontiguousarray(np.asarray(a))
                h.update(str(arr.dtype).encode() + arr.data)
            digest = h.hexdigest()
        _GRID_IDS[grid] = (gid, str(digest))
    return _GRID_IDS[grid]


def _provenance(frame, grid, photometry, lsf, options) -> dict:
    """The provenance record of this calibration (hashes of the files read, the grid's identity)."""
    phot_path = photometry if isinstance(photometry, (str, os.PathLike)) else ""
    gid, ghash = _grid_identity(grid)
    opts = {k: v for k, v in options.items() if k not in ("command_line",)}
    return provenance_record(
        frame_path=frame.path, frame_sha256=file_sha256(frame.path) if frame.path else None,
        photometry_path=os.fspath(phot_path) if phot_path else "",
        photometry_sha256=file_sha256(phot_path) if phot_path else None, grid_id=gid, grid_hash=ghash,
        lsf=lsf, options=opts, command_line=options.get("command_line") or os.environ.get("GPUCAL_COMMAND_LINE"),
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        versions={"numpy": np.__version__, "astropy": astropy.__version__})


def _outputs_qa(output, frame, std, spectra, vec, res, be, inputs):
    """The MASK, the QA arrays (zeropoints, binned residuals, the standards' models) and the
    provenance, into ``output.extra`` / ``output.summary`` (host)."""
    grid, photometry, lsf, options = inputs
    xp = be.xp
    s = res.summary
    corrected = s.get("telluric") == "correct"  # then only band pixels left uncorrected are flagged
    mask = mask_bits(to_backend(frame.flux, be, dtype=xp.float64), to_backend(frame.var, be, dtype=xp.float64),
                     res.wave, res.measured, to_backend(np.asarray(std), be, dtype=xp.int64),
                     s["outlier_mask"], spectra.mask, res.used, telluric_corrected=corrected,
                     telluric_saturated=(s["telluric_band"] & ~s["telluric_corrected"]) if corrected else None)
    bin_wave, bin_resid = binned_residuals(res.wave, res.residuals)
    model = xp.where(vec.mask, vec.cal * spectra.flux, xp.nan)  # each standard's scaled model (erg/s/cm²/Å)
    observed = res.cal[None, :] * spectra.flux  # the standard calibrated with the combined vector
    safe = xp.where(vec.mask, model, 1.0)
    output.extra.update({k: to_numpy(v) for k, v in dict(
        mask=mask, mask_counts=mask_counts(mask), zeropoint=zeropoint_ab(res.wave, res.cal),
        star_zeropoint=zeropoint_ab(spectra.wave, vec.cal), bin_wave=bin_wave, bin_residual=bin_resid,
        model=model, observed=observed, fit_residual=xp.where(vec.mask, observed / safe - 1.0, xp.nan)).items()})
    output.extra["std_rows"] = np.asarray(std)
    output.extra["mask_bits"] = MASK_BITS
    output.summary["mask_pixels"] = dict(zip(MASK_BITS, output.extra["mask_counts"].tolist()))
    output.summary["provenance"] = _provenance(frame, grid, photometry, lsf, options)


def _qa_keywords(output) -> dict:
    """The provenance and per-cent scatter keywords of the primary header."""
    kw = provenance_keywords(output.summary["provenance"])
    rms = output.summary["rms_scatter"]
    kw["FCALRMSP"] = (round(100.0 * rms, 3) if rms is not None else -1.0, "RMS between standards' vectors (%)")
    return kw


#: Units a calibrated frame's BUNIT would be (f_lambda, f_nu), whatever their prefixes.
_FLUX_UNITS = (u.erg / u.s / u.cm**2 / u.AA,)

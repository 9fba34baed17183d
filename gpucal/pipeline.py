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

import logging
import time
import weakref

import numpy as np
from array_api_compat import device as _device

from .backends import array_namespace, get_backend, to_backend, to_numpy
from .calibration import (
    apply_flux_calibration,
    calibration_vectors,
    combine_calibration_vectors,
    scale_template_to_photometry,
    shift_to_observed,
)
from .calibration.verdicts import (
    MAX_FRAME_CHI2_DOF,
    MAX_SCATTER,
    MIN_GOOD_FRACTION,
    duplicate_of,
    frame_verdict,
    star_verdicts,
    verdict_reasons,
)
from .containers import CalibrationOutput, Frame, Photometry, SpectraBatch, TemplateGrid
from .errors import CalibrationError, CoverageError, InputError, PhotometryError
from .fitting import (
    TELLURIC_DEFAULT,
    PhotometricTerm,
    common_shape,
    divide_shape,
    fit_forward,
    fit_grid,
    fitted_templates,
    gather_templates,
    match_templates,
    prepare_grid,
)
from .io import read_frame, write_calibrated_frame
from .photometry import (
    fit_colour_relations,
    match_ebv,
    match_photometry,
    photometric_consistency,
    read_catalogue,
    redden,
    synthetic_mags,
    teff_disagreement,
    teff_from_colour,
    teff_prior_mask,
)
from .report.stars import per_star_table
from .report.summary import fits_keywords, frame_summary, history_lines
from .templates import load_templates
from .units import convert_medium

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
        raise PhotometryError(f"{frame.path}: no photometry given for the standards (use --photometry CSV)")
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


_NO_PRIOR = (None, None, None)
#: Colour-Teff relations fitted per template grid, reused by every frame of a batch.
_RELATIONS = weakref.WeakKeyDictionary()


def _colour_relations(grid: TemplateGrid) -> tuple:
    """The grid's colour-Teff relations, fitted once per grid (the colours it supports)."""
    if grid not in _RELATIONS:
        _RELATIONS[grid] = fit_colour_relations(grid)
    return _RELATIONS[grid]


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
    wave = to_backend(convert_medium(frame.wave, frame.medium, medium), be, dtype=xp.float64)
    flux = to_backend(frame.flux[std], be, dtype=xp.float64)
    var = to_backend(frame.var[std], be, dtype=xp.float64)
    mask = xp.isfinite(flux) & xp.isfinite(var) & (var > 0)
    return SpectraBatch(wave=wave, flux=flux, var=var, mask=mask, fibre_ids=fibres, names=names, medium=medium)


def _prepare(grid, spectra, frame, dtype, mask_regions, vrange, lsf):
    # The grid stays where it is (host, possibly memory-mapped); prepare_grid streams it in blocks.
    xp = array_namespace(spectra.wave)
    try:
        return prepare_grid(grid, spectra.wave, dtype=getattr(xp, dtype), good_regions=mask_regions,
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


def _fit(fit, grid, spectra, match, phot, ebv_star, mask_regions, lsf, be, phot_weight=1.0):
    """The continuous forward-model fit from the scan's answer (``fit="continuous"``), else the scan's."""
    if fit == "nodes":
        return match
    fine = fit_grid(grid, spectra.wave, **lsf)
    term = _photometric_term(grid, phot, ebv_star, match, be, phot_weight)
    first = fit_forward(spectra, fine, match, photometry=term, good_regions=mask_regions)
    # the throughput's structure that P cannot follow, common to every fibre, out of the counts; then again
    distinct = duplicate_of(spectra.flux, spectra.var) < 0  # a copied fibre must not count twice
    flat = divide_shape(spectra, common_shape(spectra, first, stars=distinct))
    return fit_forward(flat, fine, first, photometry=term, good_regions=mask_regions, n_starts=1)


def _not_converged(match):
    xp = array_namespace(match.rv)
    conv = match.meta.get("converged")
    return xp.zeros(match.rv.shape, dtype=xp.bool, device=_device(match.rv)) if conv is None else ~conv


def _verdicts(spectra, vec, match, sc, phot, max_phot_dev, max_chi2_dof):
    """Every check before the combination, in one place; the photometric reasons (host)."""
    xp = array_namespace(vec.cal)
    n_pix = spectra.wave.shape[0]
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
    """Every fibre calibrated, and each fibre's count of bad input pixels."""
    xp = be.xp
    flux = to_backend(frame.flux, be, dtype=xp.float64)
    var = to_backend(frame.var, be, dtype=xp.float64)
    bad = xp.sum(xp.astype(~(xp.isfinite(flux) & xp.isfinite(var) & (var > 0)), xp.int64), axis=1)
    return (*apply_flux_calibration(flux, var, res.cal, res.var, fibre_axis=0), bad)


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
        star_mask=vec.mask, bad=bad,
    ).items()}


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
    for m in warnings:
        logger.warning("%s", m)
    for i, r in enumerate(reasons):
        if r:
            logger.warning("standard %s (fibre %d) excluded: %s", names[i], fibres[i], r)
    return warnings


def _require_stars(frame, names, output, min_stars):
    n_used = output.summary["n_stars_used"]
    if n_used < min_stars:
        raise CalibrationError(
            f"{frame.path}: {n_used} usable standard(s), fewer than --min-stars {min_stars}; "
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
    """Wall time per stage of one frame."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = now - self.t
        self.t = now


def calibrate_frame(frame, *, templates="demo", photometry=None, fwhm=None, fwhm_poly=None,
                    resolution=None, out=None, overwrite=False, backend=None,
                    combine="weighted_mean", smooth=0, metric="chi2", vrange=(-500.0, 500.0, 5.0),
                    mask_regions=TELLURIC_DEFAULT, bands=None, match_radius=1.0, min_stars=1,
                    max_chi2_dof=None, max_memory=None, dtype="float32", ebv=None, teff_prior=True,
                    max_phot_dev=0.3, fast=False, max_frame_chi2_dof=MAX_FRAME_CHI2_DOF,
                    max_scatter=MAX_SCATTER, fit="continuous") -> CalibrationOutput:
    """Flux-calibrate one reduced frame; returns a CalibrationOutput (host arrays), written to ``out`` if given.

    frame : a FITS path or a :class:`~gpucal.containers.Frame`; templates : ``"demo"``, a
    TemplateGrid, a prepared cache or a BOSZ directory; photometry : a catalogue path or a
    Photometry aligned with the standards; fwhm / fwhm_poly / resolution : the instrument
    resolution (exactly one); out, overwrite : the output FITS; backend : name or Backend
    (default ``GPUCAL_BACKEND`` / auto).

    combine : ``"weighted_mean"`` or ``"median"``; smooth : Savitzky–Golay window (px, 0 = none);
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
    medium); None = no bound.

    fit : ``"continuous"`` (default) — after the scan, every standard's (Teff, logg, [M/H],
    [α/M], v) fitted continuously in the grid by a forward model of its counts
    (:mod:`gpucal.fitting.forward`), a star that does not converge excluded; ``"nodes"`` —
    the scan's best node and one refinement step, as before.
    """
    clock = _Clock()
    if fit not in FITS:
        raise InputError(f"--fit must be one of {', '.join(FITS)}, got {fit!r}")
    _check_options(vrange, min_stars, dict(max_frame_chi2_dof=max_frame_chi2_dof, max_scatter=max_scatter))
    be = get_backend(backend)
    frame = frame if isinstance(frame, Frame) else read_frame(frame)
    std, names, fibres = _standard_ids(frame)
    grid = load_templates(templates, wave_range=(float(frame.wave.min()), float(frame.wave.max())),
                          medium=frame.medium)
    phot, match_info, ebv_star = _photometry(frame, photometry, names, bands, match_radius, ebv)
    spectra = _standards_batch(frame, std, names, fibres, grid.medium, be)
    lsf = dict(fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    clock.lap("load")
    prepared = _prepare(grid, spectra, frame, dtype, mask_regions, vrange, lsf)
    prior = _colour_prior(grid, phot, ebv_star, prepared.params) if teff_prior else _NO_PRIOR
    clock.lap("prepare_grid")
    match = match_templates(spectra, prepared, vrange=vrange, good_regions=mask_regions, max_memory=max_memory,
                            prior=prior[2], fast=fast, metric=metric)
    clock.lap("match")
    match = _fit(fit, grid, spectra, match, phot, ebv_star, mask_regions, lsf, be)
    clock.lap("fit")
    gwave, model = _models(grid, match, ebv_star, be)
    sc = scale_template_to_photometry(gwave, shift_to_observed(gwave, model, match.rv), phot)
    vec = calibration_vectors(spectra.wave, spectra.flux, spectra.var, spectra.mask, gwave, model, match.rv,
                              sc.scale, sc.scale_err, template_fwhm=grid.resolution_fwhm,
                              mask_regions=mask_regions, **lsf)
    verdicts, dup_of, phot_reasons = _verdicts(spectra, vec, match, sc, phot, max_phot_dev, max_chi2_dof)
    res = combine_calibration_vectors(vec, usable=verdicts.usable, method=combine, smooth=smooth)
    verdicts = verdicts.then("discrepant", res.summary["discrepant"]).then("not_combined", ~res.used)
    cal_flux, cal_var, bad = _apply(frame, res, be)
    clock.lap("calibrate")
    h = _to_host(spectra, match, sc, vec, res, verdicts, dup_of, cal_flux, cal_var, bad)
    settings = dict(combine=combine, smooth=smooth, metric=metric, vrange=vrange, lsf=lsf, max_chi2_dof=max_chi2_dof)
    output = _report(frame, be, (names, fibres), h, phot.bands, match_info, phot_reasons, prior,
                     prepared.n_templates, clock.laps, settings)
    _require_stars(frame, names, output, min_stars)
    _require_sane(frame, output, max_frame_chi2_dof, max_scatter)
    if out is not None:
        write_calibrated_frame(out, frame, output.flux, output.var, cal_wave=output.wave, cal=output.cal,
                               cal_var=output.cal_var, cal_measured=output.measured, per_star=output.per_star,
                               keywords=fits_keywords(output.summary), history=history_lines(names, fibres, h),
                               overwrite=overwrite)
        output.out_path = str(out)
    return output


def _report(frame, be, ids, h, bands, match_info, phot_reasons, prior, n_templates, timing, settings):
    """Reasons, per-star table and summary of the host results, as a CalibrationOutput."""
    names, fibres = ids
    reasons = _reasons(h, fibres, frame.wave.size, match_info, phot_reasons, settings["vrange"],
                       settings["max_chi2_dof"])
    per_star = per_star_table(names, fibres, h, bands, match_info, reasons,
                              teff_colour=None if prior[0] is None else prior[:2])
    summary = frame_summary(
        frame_path=frame.path, backend=be, names=names, fibres=fibres, h=h, reasons=reasons, options=settings,
        n_templates=n_templates, bad_per_fibre=dict(zip(_all_fibre_numbers(frame), h["bad"].tolist())),
        timing=timing, warnings=_warn(names, fibres, reasons, prior, h))
    return CalibrationOutput(flux=h["flux"], var=h["var"], wave=np.asarray(frame.wave), cal=h["cal"],
                             cal_var=h["cal_var"], measured=h["measured"].astype(bool), per_star=per_star,
                             summary=summary, star_cal=h["star_cal"], star_mask=h["star_mask"])


def _all_fibre_numbers(frame: Frame) -> list:
    fib = frame.fibres
    return (np.asarray(fib["FIBRE"]) if "FIBRE" in fib.colnames else np.arange(1, frame.n_fibre + 1)).tolist()

"""calibrate_frame(): load -> match -> scale -> vectors -> combine -> apply -> write.

Host data (FITS frame, catalogue, template grid) is read at the edges and
moved to the backend once; the per-star, per-template and per-pixel work runs
batched on the backend; results come back to the host once for the output
file, the per-star table and the QC summary.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from astropy.table import Table

from . import __version__
from .backends import get_backend, to_backend, to_numpy
from .calibration import (
    apply_flux_calibration,
    calibration_vectors,
    combine_calibration_vectors,
    scale_template_to_photometry,
    shift_to_observed,
)
from .containers import CalibrationOutput, PARAM_NAMES, Photometry, SpectraBatch, TemplateGrid
from .units import convert_medium
from .errors import CalibrationError, CoverageError, GpucalError, InputError, PhotometryError
from .photometry.extinction import redden
from .io.frames import Frame, read_frame, write_calibrated_frame
from .fitting.masks import TELLURIC_DEFAULT
from .fitting.scan import match_templates, prepare_grid, refined_templates
from .photometry.synphot import (
    PRIOR_COLOURS,
    fit_colour_teff,
    match_ebv,
    match_photometry,
    photometric_consistency,
    read_catalogue,
    teff_disagreement,
    teff_from_colour,
    teff_prior_mask,
)

__all__ = ["calibrate_frame", "load_templates"]

logger = logging.getLogger("gpucal")

#: A standard needs at least this fraction of its pixels good to be used.
MIN_GOOD_FRACTION = 0.5
#: The colour Teff prior never narrows a star's scan below ±this (K).
PRIOR_FLOOR_K = 500.0


def load_templates(spec, *, wave_range=None, medium="air", cache_dir=None, workers=None) -> TemplateGrid:
    """A TemplateGrid from ``"demo"``, a TemplateGrid, a prepared cache or a BOSZ 2024 directory.

    A cache (``gpucal templates prepare``) is memory-mapped and checked against
    its inputs. A BOSZ directory is prepared on the fly (unconvolved, covering
    ``wave_range`` Å — default 3500-10000 — plus the g r i z bands and ±500 km/s,
    in ``medium``) and cached in ``cache_dir`` (default ``$GPUCAL_CACHE_DIR`` or
    ``~/.cache/gpucal/templates``); see :mod:`gpucal.templates.cache`.
    """
    import os

    if isinstance(spec, TemplateGrid):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "demo":
        from .templates.demo import demo_grid

        return demo_grid()
    if isinstance(spec, (str, os.PathLike)):
        from .templates.cache import open_templates

        return open_templates(spec, wave_range=wave_range, medium=medium, cache_dir=cache_dir, workers=workers)
    raise InputError(f"--templates {spec!r}: expected 'demo', a prepared template cache or a BOSZ 2024 directory")


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


def _colour_prior(grid: TemplateGrid, phot: Photometry, ebv, bparams, nsigma=3.0):
    """Teff from the stars' colours (relation fitted on this grid), and the grid mask it allows."""
    relations = []
    for colour in PRIOR_COLOURS:
        try:
            relations.append(fit_colour_teff(grid, colour))
        except GpucalError:
            continue  # the grid does not cover that colour's bands, or it carries no Teff signal
    if not relations:
        return None, None, None
    teff, teff_err = teff_from_colour(phot, relations=tuple(relations), ebv=ebv)
    steps = np.diff(np.unique(np.asarray(grid.params)[:, 0]))
    step = float(steps.max()) if steps.size else 0.0
    # Never narrower than ±PRIOR_FLOOR_K: one bad band must not force the wrong
    # template (the disagreement is reported instead), and refinement keeps its neighbours.
    mask = teff_prior_mask(bparams, teff, teff_err, nsigma=nsigma, min_halfwidth=max(2 * step, PRIOR_FLOOR_K))
    return teff, teff_err, mask


def calibrate_frame(frame, *, templates="demo", photometry=None, fwhm=None, fwhm_poly=None,
                    resolution=None, out=None, overwrite=False, backend=None,
                    combine="weighted_mean", smooth=0, metric="chi2", vrange=(-500.0, 500.0, 5.0),
                    mask_regions=TELLURIC_DEFAULT, bands=None, match_radius=1.0, min_stars=1,
                    max_chi2_dof=None, max_memory=None, dtype="float32", ebv=None, teff_prior=True,
                    max_phot_dev=0.3, fast=False) -> CalibrationOutput:
    """Flux-calibrate one reduced frame.

    Parameters
    ----------
    frame : path to a FITS frame, or a :class:`gpucal.io.Frame`.
    templates : ``"demo"`` or a TemplateGrid.
    photometry : catalogue CSV path (Refcat2-style columns) or a Photometry
        aligned with the frame's standards.
    fwhm / fwhm_poly / resolution : instrument resolution (exactly one).
    out : output FITS path (None = do not write).
    backend : backend name or Backend (default: ``GPUCAL_BACKEND`` / auto).
    combine : ``"weighted_mean"`` or ``"median"``; smooth : Savitzky–Golay
        window (pixels, 0 = none).
    vrange : (vmin, vmax, step) km/s of the velocity scan.
    bands : catalogue bands to use (default: every Refcat2 band present; a
        band the template grid does not cover is reported and left out).
    min_stars : fewer usable standards is a CalibrationError and no output.
    max_chi2_dof : stars whose best χ²/dof exceeds this are excluded.
    ebv : E(B−V) applied to every template (F99, R_V = 3.1) unless the
        catalogue has an ``ebv`` column; None = 0.
    teff_prior : restrict each star's scan to nodes within 3σ of its colour
        Teff (relation fitted on the grid's own synthetic colours).
    max_phot_dev : a star whose post-fit band residuals span more than this
        (mag) is excluded as photometrically inconsistent.
    fast : the fast-path scan (velocity from fiducial templates first).

    Returns
    -------
    CalibrationOutput (host arrays), also written to ``out`` when given.
    """
    t0 = time.perf_counter()
    vmin, vmax, vstep = (float(v) for v in vrange)
    if not (np.isfinite([vmin, vmax, vstep]).all() and vmin < vmax and vstep > 0):
        raise InputError(f"--vrange needs finite vmin < vmax and step > 0 km/s, got {vmin}:{vmax}:{vstep}")
    if int(min_stars) < 1:
        raise InputError(f"--min-stars must be >= 1, got {min_stars}")
    be = get_backend(backend)
    xp = be.xp
    if not isinstance(frame, Frame):
        frame = read_frame(frame)
    std = np.asarray(frame.standards, dtype=int)
    fib = frame.fibres
    names = [str(n).strip() for n in (np.asarray(fib["NAME"])[std] if "NAME" in fib.colnames
                                      else [f"fibre{i + 1}" for i in std])]
    fibre_numbers = (np.asarray(fib["FIBRE"], dtype=int)[std] if "FIBRE" in fib.colnames else std + 1)
    grid = load_templates(templates, wave_range=(float(frame.wave.min()), float(frame.wave.max())),
                          medium=frame.medium)
    # Templates and frame must share air or vacuum wavelengths (IAU conversion). The frame's
    # wavelengths are relabelled, not the grid's: a converted grid is no longer uniform in ln λ,
    # which the LSF convolution and the velocity scan need.
    work_wave = frame.wave
    if grid.medium != frame.medium:
        work_wave = convert_medium(frame.wave, frame.medium, grid.medium)
    phot, match_info, ebv_star = _photometry(frame, photometry, names, bands, match_radius, ebv)

    # ---- to the backend, once
    wave = to_backend(work_wave, be, dtype=xp.float64)
    s_flux = to_backend(frame.flux[std], be, dtype=xp.float64)
    s_var = to_backend(frame.var[std], be, dtype=xp.float64)
    s_mask = xp.isfinite(s_flux) & xp.isfinite(s_var) & (s_var > 0)
    spectra = SpectraBatch(wave=wave, flux=s_flux, var=s_var, mask=s_mask,
                           fibre_ids=fibre_numbers, names=tuple(names), medium=grid.medium)
    lsf = dict(fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    t1 = time.perf_counter()
    # The grid stays where it is (host, possibly memory-mapped); prepare_grid streams it in blocks.
    try:
        prepared = prepare_grid(grid, wave, dtype=getattr(xp, dtype), good_regions=mask_regions,
                                vstep=float(vrange[2]), **lsf)
    except CoverageError as exc:
        raise CoverageError(f"{frame.path}: {exc}") from None
    teff_c = teff_c_err = prior = None
    if teff_prior:
        teff_c, teff_c_err, prior = _colour_prior(grid, phot, ebv_star, prepared.params)
    t2 = time.perf_counter()
    match = match_templates(spectra, prepared, vrange=vrange, good_regions=mask_regions, max_memory=max_memory,
                            prior=prior, fast=fast, metric=metric)
    t3 = time.perf_counter()

    # ---- scale, vectors, combination
    gwave = to_backend(grid.wave, be, dtype=xp.float64)
    tmpl = refined_templates(grid.flux, match)
    if np.any(ebv_star != 0):
        tmpl = redden(gwave, tmpl, ebv_star)
    observed_frame_tmpl = shift_to_observed(gwave, tmpl, match.rv)
    sc = scale_template_to_photometry(gwave, observed_frame_tmpl, phot)
    vec = calibration_vectors(wave, s_flux, s_var, s_mask, gwave, tmpl, match.rv, sc.scale,
                              sc.scale_err, template_fwhm=grid.resolution_fwhm,
                              mask_regions=mask_regions, **lsf)
    n_good = xp.sum(xp.astype(vec.mask, xp.int64), axis=1)
    red_chi2 = match.chi2 / xp.astype(xp.maximum(match.dof, 1), xp.float64)
    at_edge = match.meta["rv_at_edge"]
    phot_bad, phot_reasons = photometric_consistency(to_numpy(sc.residual), np.isfinite(to_numpy(sc.residual)),
                                                     max_dev=max_phot_dev, bands=phot.bands)
    usable = (sc.ok & ~to_backend(np.asarray(phot_bad, dtype=bool), be) & ~at_edge
              & (xp.astype(n_good, xp.float64) >= MIN_GOOD_FRACTION * wave.shape[0]))
    if max_chi2_dof is not None:
        usable = usable & (red_chi2 <= max_chi2_dof)
    n_in = np.count_nonzero(np.isfinite(frame.flux[std]) & np.isfinite(frame.var[std]) & (frame.var[std] > 0),
                            axis=1)
    # A fibre bit-identical to an earlier standard is the same data twice, not a second star.
    first = {}
    dup_of = np.array([first.setdefault(frame.flux[r].tobytes() + frame.var[r].tobytes(), i) for i, r in
                       enumerate(std)])
    dup_of = np.where(dup_of == np.arange(len(std)), -1, dup_of)
    usable = usable & to_backend(dup_of < 0, be)
    res = combine_calibration_vectors(vec, usable=usable, method=combine, smooth=smooth)
    all_flux = to_backend(frame.flux, be, dtype=xp.float64)
    all_var = to_backend(frame.var, be, dtype=xp.float64)
    cal_flux, cal_var = apply_flux_calibration(all_flux, all_var, res.cal, res.var, fibre_axis=0)
    t4 = time.perf_counter()

    # ---- back to the host, once
    h = {k: to_numpy(v) for k, v in dict(
        params=match.params, rv=match.rv, rv_err=match.rv_err, chi2=red_chi2, scale=sc.scale,
        scale_err=sc.scale_err, n_bands=sc.n_bands, residual=sc.residual, ok=sc.ok,
        at_edge=at_edge, n_good=n_good, used=res.used, level=res.summary["level"],
        discrepant=res.summary["discrepant"], cal=res.cal, cal_var=res.var, measured=res.measured,
        flux=cal_flux, var=cal_var, rms=res.summary["rms_scatter"], star_cal=vec.cal, star_mask=vec.mask,
        dof=match.dof, n_outlier=res.summary["n_outlier_pixels"],
    ).items()}
    reasons = []
    for i in range(len(std)):
        r = ""
        if n_in[i] < MIN_GOOD_FRACTION * frame.wave.size:  # the cause, not its consequences below
            r = f"too few good pixels ({int(n_in[i])} of {frame.wave.size})"
        elif dup_of[i] >= 0:
            r = f"duplicate of fibre {int(fibre_numbers[dup_of[i]])} (identical flux and variance)"
        elif not h["ok"][i]:
            r = f"no usable photometry ({match_info[i]})"
        elif phot_bad[i]:
            r = phot_reasons[i]
        elif h["at_edge"][i]:
            r = f"velocity at the edge of the scan range {vrange[0]}..{vrange[1]} km/s"
        elif h["n_good"][i] < MIN_GOOD_FRACTION * frame.wave.size:
            r = f"too few good pixels ({int(h['n_good'][i])} of {frame.wave.size})"
        elif max_chi2_dof is not None and not h["chi2"][i] <= max_chi2_dof:
            r = f"chi2/dof {h['chi2'][i]:.2f} above {max_chi2_dof}"
        elif h["discrepant"][i]:
            r = f"discrepant: level {100 * (np.exp(h['level'][i]) - 1):+.1f}% from the other standards"
        reasons.append(r)
    n_used = int(h["used"].sum())
    n_rej = len(std) - n_used
    per_star = Table()
    per_star["NAME"] = names
    per_star["FIBRE"] = fibre_numbers
    for j, p in enumerate(PARAM_NAMES):
        per_star[p.upper()] = h["params"][:, j]
    per_star["RV"] = h["rv"]
    per_star["RV"].unit = "km/s"
    per_star["RV_ERR"] = h["rv_err"]
    per_star["RV_ERR"].unit = "km/s"
    per_star["SCALE"] = h["scale"]
    per_star["SCALE_ERR"] = h["scale_err"]
    per_star["CHI2_DOF"] = h["chi2"]
    per_star["N_BANDS"] = h["n_bands"]
    for j, b in enumerate(phot.bands):
        per_star[f"DMAG_{b.split('-')[-1].upper()}"] = h["residual"][:, j]
    per_star["N_GOOD"] = h["n_good"]
    per_star["N_OUTLIER"] = h["n_outlier"]  # the star's own outlier pixels left out of the combination
    per_star["PHOT_MATCH"] = list(match_info)
    per_star["USED"] = h["used"].astype(bool)
    per_star["REASON"] = [r or "-" for r in reasons]
    n_bad = np.count_nonzero(~(np.isfinite(frame.flux) & np.isfinite(frame.var) & (frame.var > 0)), axis=1)
    summary = {
        "frame": str(frame.path), "gpucal_version": __version__, "backend": be.name,
        "device": str(be.device), "n_standards": len(std), "n_stars_used": n_used,
        "n_stars_rejected": n_rej, "rms_scatter": float(h["rms"]) if np.isfinite(h["rms"]) else None,
        "method": combine, "smooth": smooth, "metric": metric, "vrange_kms": list(vrange),
        "lsf": {k: v for k, v in lsf.items() if v is not None},
        "n_templates": int(prepared.n_templates), "fraction_interpolated": float(1 - h["measured"].mean()),
        "bad_pixels_per_fibre": dict(zip((np.asarray(fib["FIBRE"]) if "FIBRE" in fib.colnames
                                           else np.arange(1, len(n_bad) + 1)).tolist(), n_bad.tolist())),
        "stars": [dict(name=names[i], fibre=int(fibre_numbers[i]), used=bool(h["used"][i]), reason=reasons[i],
                       teff=float(h["params"][i, 0]), logg=float(h["params"][i, 1]),
                       mh=float(h["params"][i, 2]), alpha=float(h["params"][i, 3]),
                       rv=float(h["rv"][i]), rv_err=float(h["rv_err"][i]), scale=float(h["scale"][i]),
                       chi2_dof=float(h["chi2"][i])) for i in range(len(std))],
        "timing_s": {"load": t1 - t0, "prepare_grid": t2 - t1, "match": t3 - t2, "calibrate": t4 - t3},
    }
    warnings = []
    if teff_c is not None:
        per_star["TEFF_COLOUR"] = np.asarray(teff_c, dtype=float)
        per_star["TEFF_COLOUR_ERR"] = np.asarray(teff_c_err, dtype=float)
        _, msgs = teff_disagreement(h["params"][:, 0], teff_c, teff_c_err, best_err=to_numpy(match.params_err)[:, 0],
                                    names=names)
        warnings += [m for m in msgs if m]
    summary["warnings"] = warnings
    for m in warnings:
        logger.warning("%s", m)
    for i, r in enumerate(reasons):
        if r:
            logger.warning("standard %s (fibre %d) excluded: %s", names[i], fibre_numbers[i], r)
    if n_used < min_stars:
        raise CalibrationError(
            f"{frame.path}: {n_used} usable standard(s), fewer than --min-stars {min_stars}; "
            + "; ".join(f"{names[i]}: {r}" for i, r in enumerate(reasons) if r)
        )
    output = CalibrationOutput(flux=h["flux"], var=h["var"], wave=np.asarray(frame.wave), cal=h["cal"],
                               cal_var=h["cal_var"], measured=h["measured"].astype(bool), per_star=per_star,
                               summary=summary, star_cal=h["star_cal"], star_mask=h["star_mask"])
    if out is not None:
        keywords = {
            "FLUXCAL": (True, "flux calibration applied by gpucal"),
            "FCALVERS": (__version__, "gpucal version"),
            "FCALBACK": (be.name, "array backend"),
            "FCALMETH": (combine, "combination of per-star vectors"),
            "FCALNSTD": (n_used, "standard stars used"),
            "FCALNREJ": (n_rej, "standard stars rejected or excluded"),
            "FCALRMS": (summary["rms_scatter"] if summary["rms_scatter"] is not None else -1.0,
                        "median fractional RMS between standards"),
            "FCALSMOO": (int(smooth), "Savitzky-Golay window (pixels, 0 = none)"),
            "FCALINTP": (summary["fraction_interpolated"], "fraction of pixels interpolated"),
        }
        history = [
            f"gpucal {__version__}: star {names[i]} fibre {fibre_numbers[i]} Teff={h['params'][i, 0]:.0f} "
            f"logg={h['params'][i, 1]:.2f} [M/H]={h['params'][i, 2]:+.2f} [a/M]={h['params'][i, 3]:+.2f} "
            f"RV={h['rv'][i]:.1f}km/s scale={h['scale'][i]:.4e}"
            for i in range(len(std)) if h["used"][i]
        ]
        write_calibrated_frame(out, frame, output.flux, output.var, cal_wave=output.wave, cal=output.cal,
                               cal_var=output.cal_var, cal_measured=output.measured, per_star=per_star,
                               keywords=keywords, history=history, overwrite=overwrite)
        output.out_path = str(out)
    return output

"""Template matching: every (star, template, velocity) scored at once.

Step 1 of the mission. The observed standards and the LSF-convolved template
grid are continuum-normalised the same way (:mod:`gpucal.continuum`), then for
every star s, template t and trial velocity v the χ² of the template with a
free amplitude is

    χ²(s,t,v) = Σ_q W D² − (Σ_q W D m_t)² / Σ_q W m_t²,

where m_t is the normalised template on a log-uniform working grid λ_q and
D, W are the star's normalised flux and inverse variance evaluated at
λ_q (1+z_v), i.e. the data shifted into the template's rest frame. Stacking
the (star, velocity) pairs as columns turns the two sums into two matrix
products, (n_t, n_q) @ (n_q, n_star·n_vel): the whole scan is a few GEMMs,
streamed over blocks of templates so memory stays bounded, with a running
minimum kept on the device. The products run in the templates' dtype
(float32 by default); Σ W D² and the χ² combination are float64 because the
difference cancels.

The best velocity is refined by a parabola through the three χ² values
around the best lag, which works at every lag (negative and near-zero
velocities too); its 1-σ error comes from the curvature (Δχ² = 1, inflated by
χ²/dof when that exceeds 1). The best node's χ² is then recomputed on the
frame's own pixels, so χ²/dof is an honest goodness of fit.

Shapes: wave_obs (n_pix,) Å; standards (n_star, n_pix); templates (n_t, n_w).
Velocities in km/s (relativistic Doppler), positive = receding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from array_api_compat import device as _device

from .backends import array_namespace, interp
from .containers import MatchResult, SpectraBatch, TemplateGrid
from .continuum import fit_continuum
from .errors import CoverageError, InputError
from .masks import TELLURIC_DEFAULT, region_mask
from .templates.lsf import FWHM_TO_SIGMA, convolve_to_instrument, instrument_fwhm

__all__ = [
    "C_KMS",
    "PreparedGrid",
    "prepare_grid",
    "normalise_observed",
    "velocity_grid",
    "match_templates",
    "doppler_factor",
]

C_KMS = 299792.458


def doppler_factor(v_kms):
    """1 + z for a radial velocity in km/s (relativistic, positive = receding)."""
    xp = array_namespace(v_kms)
    beta = v_kms / C_KMS
    return xp.sqrt((1.0 + beta) / (1.0 - beta))


def velocity_grid(vmin: float, vmax: float, step: float, *, like):
    """Uniform trial velocities vmin..vmax (inclusive) in km/s, on ``like``'s device."""
    if not (step > 0 and vmax > vmin):
        raise InputError(f"velocity range needs vmin < vmax and step > 0, got {vmin}:{vmax}:{step}")
    if max(abs(vmin), abs(vmax)) >= 0.1 * C_KMS:
        raise InputError(f"velocity range {vmin}:{vmax} km/s is beyond what a stellar RV scan supports")
    xp = array_namespace(like)
    n = int(round((vmax - vmin) / step)) + 1
    return vmin + step * xp.arange(n, dtype=xp.float64, device=_device(like))


@dataclass
class PreparedGrid:
    """A template grid convolved, resampled and normalised for one frame setting.

    params : (n_t, 4) backend array; wave : (n_q,) log-uniform working grid (Å);
    norm_flux : (n_t, n_q) continuum-normalised, LSF-convolved templates;
    lsf : the instrument resolution used (dict of fwhm / fwhm_poly / resolution).
    """

    params: Any
    wave: Any
    norm_flux: Any
    lsf: dict = field(default_factory=dict)

    @property
    def n_templates(self) -> int:
        return int(self.norm_flux.shape[0])


def working_grid(wave_obs):
    """Log-uniform grid over the frame's range, sampled like the frame's median pixel."""
    xp = array_namespace(wave_obs)
    n = wave_obs.shape[0]
    lo, hi = float(wave_obs[0]), float(wave_obs[n - 1])
    # Median of Δλ/λ: the working grid keeps about the frame's number of pixels.
    rel = (wave_obs[1:] - wave_obs[:-1]) / wave_obs[:-1]
    dln = float(xp.sort(rel)[(n - 1) // 2])
    nq = int(math.floor(math.log(hi / lo) / dln)) + 1
    return lo * xp.exp(dln * xp.arange(nq, dtype=xp.float64, device=_device(wave_obs)))


def prepare_grid(grid: TemplateGrid, wave_obs, *, fwhm=None, fwhm_poly=None, resolution=None,
                 dtype=None, continuum_degree: int = 7, good_regions=TELLURIC_DEFAULT) -> PreparedGrid:
    """Convolve the grid to the instrument LSF, resample onto the working grid, normalise.

    ``grid`` arrays must live on the same backend as ``wave_obs``. The grid
    must cover the frame's wavelength range plus four LSF σ on each side;
    otherwise CoverageError says which range is missing.
    """
    xp = array_namespace(wave_obs, grid.flux)
    dtype = xp.float32 if dtype is None else dtype
    wq = working_grid(wave_obs)
    nq = wq.shape[0]
    lo, hi = float(wq[0]), float(wq[nq - 1])
    fw_edge = instrument_fwhm(xp.asarray([lo, hi], dtype=xp.float64, device=_device(wq)),
                              fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    pad = 6.0 * FWHM_TO_SIGMA * float(xp.max(fw_edge))
    gw = grid.wave
    nw = gw.shape[0]
    glo, ghi = float(gw[0]), float(gw[nw - 1])
    if glo > lo - pad or ghi < hi + pad:
        missing = []
        if glo > lo - pad:
            missing.append(f"{lo - pad:.1f}-{glo:.1f} Å")
        if ghi < hi + pad:
            missing.append(f"{ghi:.1f}-{hi + pad:.1f} Å")
        raise CoverageError(
            f"template grid ({glo:.1f}-{ghi:.1f} Å) does not cover the frame "
            f"({lo:.1f}-{hi:.1f} Å plus {pad:.1f} Å for the LSF); missing {', '.join(missing)}"
        )
    inside = (gw >= lo - pad) & (gw <= hi + pad)
    i0 = int(xp.argmax(xp.astype(inside, xp.int32)))
    i1 = i0 + int(xp.sum(xp.astype(inside, xp.int32)))
    cw = gw[i0:i1]
    conv = convolve_to_instrument(cw, grid.flux[:, i0:i1], fwhm=fwhm, fwhm_poly=fwhm_poly,
                                  resolution=resolution, template_fwhm=grid.resolution_fwhm)
    tq = interp(wq, cw, conv)
    weights = xp.astype(region_mask(wq, good_regions), xp.float64)
    weights = xp.broadcast_to(weights[None, :], tq.shape)
    cont = fit_continuum(wq, tq, weights, degree=continuum_degree)
    norm = xp.astype(tq / cont, dtype)
    lsf = {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else list(fwhm_poly), "resolution": resolution}
    return PreparedGrid(params=grid.params, wave=wq, norm_flux=norm, lsf=lsf)


def normalise_observed(spectra: SpectraBatch, *, good_regions=TELLURIC_DEFAULT, continuum_degree: int = 7):
    """Continuum-normalised flux and its inverse variance, (n_star, n_pix) each.

    Bad pixels (mask False, NaN flux, non-positive or non-finite variance) and
    the ``good_regions``-excluded bands get zero weight and zero flux.
    """
    xp = array_namespace(spectra.flux)
    f, v = spectra.flux, spectra.var
    good = spectra.mask & xp.isfinite(f) & xp.isfinite(v) & (v > 0)
    good = good & region_mask(spectra.wave, good_regions)[None, :]
    w = xp.where(good, 1.0 / xp.where(good, v, 1.0), 0.0)
    ff = xp.where(good, f, 1.0)
    cont = fit_continuum(spectra.wave, ff, w, degree=continuum_degree)
    dn = xp.where(good, ff / cont, 0.0)
    wn = w * cont * cont
    return dn, wn, good


def _shifted_columns(wq, wave_obs, dn, wn, good, opz):
    """D, W of every (star, velocity) on the working grid: (n_star, n_vel, n_q) each."""
    xp = array_namespace(dn)
    xq = (opz[:, None] * wq[None, :])[None, :, :]
    d = interp(xq, wave_obs, dn[:, None, :], left=0.0, right=0.0)
    w = interp(xq, wave_obs, wn[:, None, :], left=0.0, right=0.0)
    g = interp(xq, wave_obs, xp.astype(good, dn.dtype)[:, None, :], left=0.0, right=0.0)
    # A working pixel next to a bad pixel borrows from it: drop it instead.
    w = xp.where(g > 0.999, w, 0.0)
    return d, w


def _chi2_block(m, wd, w, c):
    """χ² of templates ``m`` (n_b, n_q) against columns: (n_b, n_col) float64."""
    xp = array_namespace(m)
    a = xp.astype(m @ wd, xp.float64)
    b = xp.astype((m * m) @ w, xp.float64)
    safe_b = xp.where(b > 0, b, 1.0)
    return xp.where(b > 0, c[None, :] - a * a / safe_b, xp.inf)


def match_templates(spectra: SpectraBatch, prepared: PreparedGrid, *, velocities=None,
                    vrange=(-500.0, 500.0, 5.0), good_regions=TELLURIC_DEFAULT,
                    continuum_degree: int = 7, block_size: int | None = None,
                    max_memory: float | None = None) -> MatchResult:
    """Best template and radial velocity for every standard, all scanned at once.

    Parameters
    ----------
    spectra : standards on the frame's grid (backend arrays).
    prepared : :func:`prepare_grid` output on the same backend.
    velocities : (n_vel,) uniform km/s grid, or None for ``vrange`` = (vmin, vmax, step).
    block_size : templates per GEMM block; default from ``max_memory`` (bytes,
        default 1 GiB) so the scan's working set stays within it.

    Returns
    -------
    MatchResult with the best node, refined velocity and its error, χ² and
    degrees of freedom on the frame's pixels.
    """
    xp = array_namespace(spectra.flux, prepared.norm_flux)
    dev = _device(spectra.flux)
    if velocities is None:
        velocities = velocity_grid(*vrange, like=spectra.wave)
    n_vel = velocities.shape[0]
    dv = float(velocities[1] - velocities[0]) if n_vel > 1 else 0.0
    dtype = prepared.norm_flux.dtype
    dn, wn, good = normalise_observed(spectra, good_regions=good_regions, continuum_degree=continuum_degree)
    opz = doppler_factor(velocities)
    d, w = _shifted_columns(prepared.wave, spectra.wave, dn, wn, good, opz)
    n_star, nq = d.shape[0], d.shape[2]
    ncol = n_star * n_vel
    c = xp.reshape(xp.sum(w * d * d, axis=2), (ncol,))
    wd_cols = xp.permute_dims(xp.astype(xp.reshape(w * d, (ncol, nq)), dtype), (1, 0))
    w_cols = xp.permute_dims(xp.astype(xp.reshape(w, (ncol, nq)), dtype), (1, 0))
    del d, w
    n_t = prepared.n_templates
    if block_size is None:
        budget = 2**30 if max_memory is None else float(max_memory)
        itemsize = 4 if dtype == xp.float32 else 8
        per_template = nq * itemsize + 4 * ncol * 8  # m*m copy + four float64 (n_col,) rows
        block_size = max(1, min(n_t, int(budget // per_template)))
    best_chi2, best_v, lo_chi2, hi_chi2 = [], [], [], []
    for b0 in range(0, n_t, block_size):
        m = prepared.norm_flux[b0:b0 + block_size, :]
        chi2 = xp.reshape(_chi2_block(m, wd_cols, w_cols, c), (m.shape[0], n_star, n_vel))
        k = xp.argmin(chi2, axis=2)
        kk = k[:, :, None]
        best_chi2.append(xp.take_along_axis(chi2, kk, axis=2)[:, :, 0])
        lo_chi2.append(xp.take_along_axis(chi2, xp.clip(kk - 1, 0, n_vel - 1), axis=2)[:, :, 0])
        hi_chi2.append(xp.take_along_axis(chi2, xp.clip(kk + 1, 0, n_vel - 1), axis=2)[:, :, 0])
        best_v.append(k)
    chi2_t = xp.concat(best_chi2, axis=0)  # (n_t, n_star)
    vidx_t = xp.concat(best_v, axis=0)
    lo_t, hi_t = xp.concat(lo_chi2, axis=0), xp.concat(hi_chi2, axis=0)
    tbest = xp.argmin(chi2_t, axis=0)  # (n_star,)
    sel = tbest[None, :]
    kbest = xp.take_along_axis(vidx_t, sel, axis=0)[0, :]
    cb = xp.take_along_axis(chi2_t, sel, axis=0)[0, :]
    ca = xp.take_along_axis(lo_t, sel, axis=0)[0, :]
    cc = xp.take_along_axis(hi_t, sel, axis=0)[0, :]
    interior = (kbest > 0) & (kbest < n_vel - 1)
    curv = ca - 2.0 * cb + cc
    ok = interior & (curv > 0)
    safe_curv = xp.where(ok, curv, 1.0)
    offset = xp.where(ok, 0.5 * (ca - cc) / safe_curv, 0.0)
    v0 = xp.take(velocities, kbest, axis=0)
    rv = v0 + offset * dv
    # χ² ≈ cb + (curv / 2)(v − v_best)² / dv², so Δχ² = 1 at dv·sqrt(2 / curv).
    rv_err = xp.where(ok, dv * xp.sqrt(2.0 / safe_curv), xp.inf)

    chi2_pix, dof = _chi2_on_pixels(spectra.wave, dn, wn, good, prepared, tbest, rv)
    red = chi2_pix / xp.astype(xp.maximum(dof, 1), xp.float64)
    rv_err = rv_err * xp.sqrt(xp.maximum(red, 1.0))
    params = xp.take(prepared.params, tbest, axis=0)
    nan4 = xp.full(params.shape, xp.nan, dtype=xp.float64, device=dev)
    return MatchResult(
        index=tbest, params=params, params_err=nan4, rv=rv, rv_err=rv_err,
        chi2=chi2_pix, dof=dof,
        meta={"rv_at_edge": ~interior, "n_velocities": n_vel, "velocity_step": dv,
              "n_templates": n_t, "block_size": block_size, "scan_chi2": cb},
    )


def _chi2_on_pixels(wave_obs, dn, wn, good, prepared, tbest, rv):
    """χ² (free amplitude) of each star's best template, shifted by its rv, on the frame pixels."""
    xp = array_namespace(dn)
    m = xp.astype(xp.take(prepared.norm_flux, tbest, axis=0), xp.float64)
    x = wave_obs[None, :] / doppler_factor(rv)[:, None]
    model = interp(x, prepared.wave, m, left=xp.nan, right=xp.nan)
    use = good & xp.isfinite(model)
    w = xp.where(use, wn, 0.0)
    model = xp.where(use, model, 0.0)
    a = xp.sum(w * dn * model, axis=1) / xp.sum(w * model * model, axis=1)
    r = dn - a[:, None] * model
    chi2 = xp.sum(w * r * r, axis=1)
    dof = xp.sum(xp.astype(use, xp.int64), axis=1) - 2  # amplitude and velocity
    return chi2, dof

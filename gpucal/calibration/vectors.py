"""Photometric scaling, per-star calibration vectors, their combination, application.

Steps 2–5 of the mission, each batched over stars (axis 0) and pixels:

* :func:`scale_template_to_photometry` — one scale per star from the star's
  broadband magnitudes and the synthetic magnitudes of its matched template
  (the FULL template, shifted by the star's velocity: a band reaching past
  the observed range is integrated over its whole response);
* :func:`calibration_vectors` — Cal(λ) = scaled, LSF-convolved, shifted
  template / observed counts, with variance and masks;
* :func:`combine_calibration_vectors` — discrepant stars rejected by a robust
  test on their overall level, then an inverse-variance weighted mean with
  iterative per-pixel clipping (or a masked median), optional Savitzky–Golay
  smoothing that never un-masks, and pixels no star measured (telluric bands,
  gaps) filled from the throughput on either side and flagged;
* :func:`apply_flux_calibration` — every fibre times Cal(λ), variance
  σ²_cal = σ²_obs Cal² + C_obs² σ²_Cal; the fibre axis is given, not guessed.

Units: observed counts; templates and calibrated flux in erg/s/cm²/Å; Cal in
erg/s/cm²/Å per count.
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from ..backends import array_namespace, interp, masked_median, savgol_filter, sigma_clip, to_backend, backend_of
from ..containers import CalibrationVectors, FluxCalibrationResult, Photometry, PhotometricScale
from ..errors import InputError
from ..fitting.masks import TELLURIC_DEFAULT, cap_local_weights, local_outliers, region_mask
from ..units import doppler_factor
from ..photometry.synphot import synthetic_maggies, system_offsets
from ..fitting.lsf import convolve_to_instrument

__all__ = [
    "shift_to_observed",
    "scale_template_to_photometry",
    "calibration_vectors",
    "star_outliers",
    "combine_calibration_vectors",
    "apply_flux_calibration",
    "fill_masked",
]

LN10_04 = 0.4 * math.log(10.0)


def shift_to_observed(wave, flux, rv, *, wave_out=None):
    """Rest-frame spectra (n, n_w) on ``wave`` -> observed frame at ``wave_out`` (default ``wave``).

    F_obs(λ) = F_rest(λ / (1+z)); outside the rest grid the result is NaN.
    """
    xp = array_namespace(wave, flux, rv)
    wave_out = wave if wave_out is None else wave_out
    x = wave_out[None, :] / doppler_factor(rv)[:, None]
    return interp(x, wave, flux, left=xp.nan, right=xp.nan)


def scale_template_to_photometry(wave, template_flux, photometry: Photometry) -> PhotometricScale:
    """Scale of each star's template that matches its magnitudes, with its error.

    Parameters
    ----------
    wave : (n_w,) Å, the template grid (full range, not cut to the frame).
    template_flux : (n_star, n_w) erg/s/cm²/Å in the observed frame (already
        shifted by the star's velocity); NaN where the shift left the grid.
    photometry : magnitudes of the same stars in the same order.

    Returns
    -------
    :class:`~gpucal.containers.PhotometricScale` — ``ok`` False means no usable
    band (the star must be excluded; its scale is NaN, never 1).
    """
    xp = array_namespace(template_flux)
    flux = xp.where(xp.isnan(template_flux), 0.0, template_flux)
    maggies, covered = synthetic_maggies(wave, flux, photometry.bands)
    like = backend_of(template_flux)
    mag = to_backend(photometry.mag, like, dtype=xp.float64)
    err = to_backend(photometry.err, like, dtype=xp.float64)
    valid = to_backend(photometry.valid, like) & to_backend(covered, like)[None, :]
    valid = valid & (maggies > 0) & xp.isfinite(mag) & (err > 0)
    synth = -2.5 * xp.log10(xp.where(maggies > 0, maggies, 1.0))
    # Magnitudes in each band's own system (Vega bands: m_Vega = m_AB + offset).
    offsets = system_offsets(photometry.bands, photometry.system or None)
    synth = synth + to_backend(offsets, like, dtype=xp.float64)[None, :]
    w = xp.where(valid, 1.0 / xp.where(valid, err * err, 1.0), 0.0)
    wsum = xp.sum(w, axis=1)
    ok = wsum > 0
    safe = xp.where(ok, wsum, 1.0)
    dm = xp.where(valid, mag - synth, 0.0)
    dm_mean = xp.sum(w * dm, axis=1) / safe
    scale = xp.where(ok, 10.0 ** (-0.4 * dm_mean), xp.nan)
    scale_err = xp.where(ok, scale * LN10_04 / xp.sqrt(safe), xp.nan)
    residual = xp.where(valid, synth - 2.5 * xp.log10(xp.where(ok, scale, 1.0))[:, None] - mag, xp.nan)
    n_bands = xp.sum(xp.astype(valid, xp.int64), axis=1)
    return PhotometricScale(scale=scale, scale_err=scale_err, n_bands=n_bands, residual=residual,
                            synthetic=synth, covered=covered, ok=ok)


def calibration_vectors(wave_obs, flux, var, mask, wave_t, template_flux, rv, scale, scale_err, *,
                        fwhm=None, fwhm_poly=None, resolution=None, template_fwhm=0.0,
                        mask_regions=TELLURIC_DEFAULT) -> CalibrationVectors:
    """Cal(λ) = scale · (template ⊗ LSF)(λ / (1+z)) / observed, per star.

    flux, var, mask : (n_star, n_pix) observed standards (counts); NaN flux
    is a bad pixel. template_flux : (n_star, n_w) rest-frame templates on
    ``wave_t``. Pixels are good where the observed pixel is good and
    positive, the model is finite and positive, and outside ``mask_regions``.
    σ²(Cal) = Cal² (σ²_obs / C_obs² + (σ_s / s)²).
    """
    xp = array_namespace(flux, template_flux)
    conv = convolve_to_instrument(wave_t, template_flux, fwhm=fwhm, fwhm_poly=fwhm_poly,
                                  resolution=resolution, template_fwhm=template_fwhm)
    model = shift_to_observed(wave_t, conv, rv, wave_out=wave_obs) * scale[:, None]
    good = (mask & xp.isfinite(flux) & (flux > 0) & xp.isfinite(var) & (var > 0)
            & xp.isfinite(model) & (model > 0))
    good = good & region_mask(wave_obs, mask_regions)[None, :]
    safe_flux = xp.where(good, flux, 1.0)
    cal = xp.where(good, model / safe_flux, xp.nan)
    frac = xp.where(good, var / (safe_flux * safe_flux), xp.nan) + ((scale_err / scale) ** 2)[:, None]
    return CalibrationVectors(wave=wave_obs, cal=cal, var=cal * cal * frac, mask=good)


def _weighted_mean(cal, ivar, keep):
    xp = array_namespace(cal)
    w = xp.where(keep, ivar, 0.0)
    wsum = xp.sum(w, axis=0)
    safe = xp.where(wsum > 0, wsum, 1.0)
    mean = xp.sum(w * xp.where(keep, cal, 0.0), axis=0) / safe
    return xp.where(wsum > 0, mean, xp.nan), xp.where(wsum > 0, 1.0 / safe, xp.nan), wsum > 0


def star_outliers(cal, ivar, mask, *, nsigma: float = 8.0, floor: float = 0.2, weight_cap: float = 10.0):
    """Each star's own outlier pixels, and its inverse variances capped, before stars are combined.

    A calibration vector is smooth on the scale of a few pixels, so a pixel
    far from its neighbours is an outlier of that star (a hot pixel, a cosmic
    ray the reduction missed): more than ``nsigma`` σ and ``floor`` (20 %)
    away from its neighbours, both ways, since the stars' lines divide out of
    the vector. Per-pixel clipping across stars cannot find it when few
    stars measure the pixel. An inverse variance far above its
    neighbours' is capped, so one pixel with a wrongly tiny variance cannot
    outweigh every other star. See :func:`gpucal.masks.local_outliers` and
    :func:`gpucal.masks.cap_local_weights`.

    cal, ivar, mask : (n_star, n_pix). Returns (outlier mask, capped ivar).
    """
    outlier = local_outliers(cal, ivar, mask, nsigma=nsigma, floor=floor)
    return outlier, cap_local_weights(ivar, mask & ~outlier, factor=weight_cap)


def combine_calibration_vectors(vectors: CalibrationVectors, *, usable=None, method: str = "weighted_mean",
                                nsigma: float = 3.0, maxiter: int = 5, reject_nsigma: float = 5.0,
                                reject_floor: float = 0.05, smooth: int = 0, polyorder: int = 3,
                                fill_window: int = 51, outlier_nsigma: float = 8.0) -> FluxCalibrationResult:
    """Combine per-star vectors into one calibration, rejecting discrepant stars.

    Parameters
    ----------
    vectors : per-star vectors (n_star, n_pix).
    usable : (n_star,) bool, stars allowed into the combination (others,
        e.g. without photometry, are carried as excluded). Default: all.
    method : ``"weighted_mean"`` (inverse variance, per-pixel iterative
        ``nsigma`` clipping) or ``"median"`` (masked median; variance
        (π/2) / Σ ivar, the median's efficiency for Gaussian noise).
    reject_nsigma, reject_floor : a star whose median log ratio to the
        median of all stars departs from the stars' median by more than
        max(reject_nsigma · 1.4826 MAD, reject_floor) is rejected. The MAD
        is over the usable stars, so one wild star cannot hide itself.
    smooth : Savitzky–Golay window in pixels (0 = none); masked pixels stay masked.
    fill_window : smoothing window used to bridge pixels no star measured.
    outlier_nsigma : each star's own outlier pixels are masked, and its
        inverse variances capped, first (:func:`star_outliers`).

    Returns
    -------
    FluxCalibrationResult; per-star exclusion reasons are filled by the caller
    for stars it marked unusable, and here with "discrepant" for rejected ones.
    """
    if method not in ("weighted_mean", "median"):
        raise InputError(f"unknown combination method {method!r}; use weighted_mean or median")
    xp = array_namespace(vectors.cal)
    dev = _device(vectors.cal)
    n_star = vectors.cal.shape[0]
    if usable is None:
        usable = xp.ones((n_star,), dtype=xp.bool, device=dev)
    mask = vectors.mask & usable[:, None]
    cal = xp.where(mask, vectors.cal, 0.0)
    ivar = xp.where(mask, 1.0 / xp.where(mask, vectors.var, 1.0), 0.0)
    outlier, ivar = star_outliers(cal, ivar, mask, nsigma=outlier_nsigma)
    mask = mask & ~outlier

    # Star-level rejection: each star's median ratio to the pixel-wise median.
    ref = masked_median(cal, mask, axis=0)
    ref_ok = xp.isfinite(ref) & (ref > 0)
    ratio_mask = mask & ref_ok[None, :]
    lr = xp.log(xp.where(ratio_mask, cal, 1.0) / xp.where(ref_ok, ref, 1.0)[None, :])
    level = masked_median(lr, ratio_mask, axis=1)  # (n_star,)
    has_level = xp.isfinite(level) & usable
    centre = masked_median(level[None, :], has_level[None, :], axis=1)[0]
    mad = masked_median(xp.abs(level - centre)[None, :], has_level[None, :], axis=1)[0]
    thresh = xp.maximum(reject_nsigma * 1.4826 * xp.where(xp.isfinite(mad), mad, 0.0), reject_floor)
    discrepant = has_level & (xp.abs(level - centre) > thresh)
    used = usable & has_level & ~discrepant
    mask = mask & used[:, None]

    if method == "weighted_mean":
        keep = sigma_clip(cal, weights=ivar, mask=mask, nsigma=nsigma, maxiter=maxiter, axis=0)
        comb, comb_var, measured = _weighted_mean(cal, ivar, keep)
    else:
        keep = mask
        comb = masked_median(cal, mask, axis=0)
        _, wvar, measured = _weighted_mean(cal, ivar, mask)
        comb_var = (math.pi / 2.0) * wvar
    if smooth:
        comb, measured = _smooth(comb, measured, smooth, polyorder)
        comb_var = xp.where(measured, comb_var, xp.nan)
    filled, filled_var = fill_masked(comb, comb_var, measured, window=fill_window)

    safe = xp.where(measured, comb, 1.0)
    resid = xp.where(vectors.mask & measured[None, :], (vectors.cal - comb[None, :]) / safe[None, :], xp.nan)
    meas_used = mask & measured[None, :]
    sq = xp.where(meas_used, resid * resid, 0.0)
    cnt = xp.sum(xp.astype(meas_used, xp.float64), axis=0)
    rms_pix = xp.sqrt(xp.sum(sq, axis=0) / xp.where(cnt > 0, cnt, 1.0))
    rms = masked_median(rms_pix[None, :], (cnt > 1)[None, :], axis=1)[0]
    return FluxCalibrationResult(
        wave=vectors.wave, cal=filled, var=filled_var, measured=measured, used=used,
        reasons=[], residuals=resid,
        summary={"method": method, "level": level, "discrepant": discrepant, "rms_scatter": rms,
                 "n_outlier_pixels": xp.sum(xp.astype(outlier, xp.int64), axis=1),
                 "n_contributing": xp.sum(xp.astype(keep, xp.int64), axis=0), "smooth": smooth},
    )


def _smooth(y, good, window, polyorder):
    xp = array_namespace(y)
    window = int(window) | 1  # odd
    y0 = xp.where(good, y, 0.0)
    out, good_out = savgol_filter(y0, good, window=window, polyorder=polyorder)
    return xp.where(good_out, out, xp.nan), good_out


def fill_masked(y, var, good, *, window: int = 51):
    """Bridge pixels where ``good`` is False by linear interpolation of a smoothed ``y``.

    Each gap is filled on the straight line between the smoothed values at
    the nearest good pixels on either side (constant beyond the ends), so a
    telluric band is bridged by the throughput around it, not by one noisy
    edge pixel. Good pixels are returned unchanged. No host round trip.
    """
    xp = array_namespace(y)
    dev = _device(y)
    n = y.shape[0]
    window = min(int(window) | 1, (n // 2) * 2 - 1)
    base = xp.where(good, y, 0.0)
    sm, sm_good = savgol_filter(base, good, window=window, polyorder=2)
    sm = xp.where(sm_good, sm, base)
    idx = xp.arange(n, device=dev)
    gi = xp.astype(good, xp.int64)
    n_good = xp.sum(gi)
    # Positions of the good pixels in order: a stable sort on "not good".
    order = xp.argsort(xp.astype(~good, xp.int8), stable=True)
    k = xp.cumulative_sum(gi) - 1  # index among good pixels of the last good pixel <= p
    last = xp.maximum(n_good - 1, 0)
    k_left = xp.clip(k, 0, None)
    k_left = xp.minimum(k_left, last)
    k_right = xp.minimum(xp.where(good, k, k + 1), last)
    k_right = xp.maximum(k_right, 0)
    p_left = xp.take(order, k_left)
    p_right = xp.take(order, k_right)
    y_left, y_right = xp.take(sm, p_left), xp.take(sm, p_right)
    v_left, v_right = xp.take(var, p_left), xp.take(var, p_right)
    span = xp.astype(p_right - p_left, y.dtype)
    frac = xp.where(span > 0, xp.astype(idx - p_left, y.dtype) / xp.where(span > 0, span, 1.0), 0.0)
    frac = xp.clip(frac, 0.0, 1.0)
    fy = y_left + frac * (y_right - y_left)
    fv = (1.0 - frac) * v_left + frac * v_right
    return xp.where(good, y, fy), xp.where(good, var, fv)


def apply_flux_calibration(flux, var, cal, cal_var, *, fibre_axis: int = 0):
    """Calibrate every fibre: F = C · Cal, σ²_F = σ²_C Cal² + C² σ²_Cal.

    flux, var : 2-D frames with the fibre axis ``fibre_axis`` (0 or 1) given
    by the caller — never inferred from the shape, so square frames are safe.
    cal, cal_var : (n_pix,). NaN (bad) pixels stay NaN.
    """
    xp = array_namespace(flux, cal)
    if flux.ndim != 2 or var.shape != flux.shape:
        raise InputError(f"flux and variance must be 2-D and alike, got {flux.shape} and {var.shape}")
    if fibre_axis not in (0, 1):
        raise InputError(f"fibre_axis must be 0 or 1, got {fibre_axis}")
    pix_axis = 1 - fibre_axis
    if flux.shape[pix_axis] != cal.shape[0]:
        raise InputError(
            f"calibration has {cal.shape[0]} pixels but the frame's pixel axis ({pix_axis}) has {flux.shape[pix_axis]}"
        )
    c = cal[None, :] if fibre_axis == 0 else cal[:, None]
    cv = cal_var[None, :] if fibre_axis == 0 else cal_var[:, None]
    # a pixel the input marks bad (zero or NaN variance) stays marked in the output
    xp = array_namespace(flux, var, cal)
    return flux * c, xp.where(var > 0, var * c * c + flux * flux * cv, var)

"""Step 4: the per-star vectors combined robustly into one calibration.

:func:`combine_calibration_vectors` masks each star's own outlier pixels and
caps its weights (:func:`star_outliers`), rejects stars whose overall level
departs from the others (a robust test on the median log ratio), then forms an
inverse-variance weighted mean with iterative per-pixel clipping (or a masked
median, variance (π/2)/Σ ivar), optional Savitzky–Golay smoothing that never
un-masks, and bridges pixels no star measured (telluric bands, gaps) from the
throughput on either side (:func:`fill_masked`), flagged as not measured.

Model-error floor (``method="floored_mean"``, :func:`model_floor`): photon noise
is not a star's only error; a template mismatch tilts or bends its whole vector
by a smooth fraction its variance does not know, so a bright star with a wrong
template would hold most of the inverse-variance weight and drag the mean. Each
star's variance gets + (f_i · c)², c the combined vector, f_i the star's model
error: the RMS over its pixels of its fractional residual about c, cal_i / c − 1,
smoothed over ``floor_window`` pixels (a running linear fit, which averages the
photon noise down to σ/√window and keeps the smooth part a template error
makes), each pixel weighted by its precision and that photon part subtracted
(so a star's noisy blue end does not set its floor). c starts as the per-pixel median of the stars (one wild star cannot set
it) and is then the floored weighted mean itself, ``floor_iter`` times. A star
that agrees with the others keeps a floor at the photon level of its smoothed
residual; a star tilted by a fraction a gets f ≈ a/√3 and its weight at most
~1/(f c)², whatever its photon variance. The combined variance is then
1/Σ of the floored inverse variances: it carries the model errors too. ``summary["floor"]`` holds f
(n_star,), ``summary["weight_share"]`` each star's median share of the per-pixel
weight (NaN for the median, which has no weights).

Shapes: vectors (n_star, n_pix) -> combined (n_pix,). Units of Cal
(erg/s/cm²/Å per count).
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from ..backends import array_namespace, masked_median, savgol_filter, sigma_clip
from ..containers import CalibrationVectors, FluxCalibrationResult
from ..errors import InputError
from ..fitting import cap_local_weights, local_outliers

__all__ = ["METHODS", "star_outliers", "model_floor", "combine_calibration_vectors", "fill_masked"]

#: The combination methods (module docstring).
METHODS = ("weighted_mean", "floored_mean", "median")


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
                                fill_window: int = 51, outlier_nsigma: float = 8.0,
                                telluric: dict | None = None, floor_window: int = 51,
                                floor_iter: int = 2) -> FluxCalibrationResult:
    """Combine per-star vectors into one calibration, rejecting discrepant stars.

    Parameters
    ----------
    vectors : per-star vectors (n_star, n_pix).
    usable : (n_star,) bool, stars allowed into the combination (others,
        e.g. without photometry, are carried as excluded). Default: all.
    method : ``"weighted_mean"`` (inverse variance, per-pixel iterative
        ``nsigma`` clipping), ``"floored_mean"`` (the same, each star's
        variance with its model-error floor, :func:`model_floor`) or
        ``"median"`` (masked median; variance (π/2) / Σ ivar, the median's
        efficiency for Gaussian noise).
    floor_window, floor_iter : the floor's smoothing window (pixels) and its
        number of passes (``floored_mean`` only).
    reject_nsigma, reject_floor : a star whose median log ratio to the
        median of all stars departs from the stars' median by more than
        max(reject_nsigma · 1.4826 MAD, reject_floor) is rejected. The MAD
        is over the usable stars, so one wild star cannot hide itself.
    smooth : Savitzky–Golay window in pixels (0 = none); masked pixels stay masked.
    fill_window : smoothing window used to bridge pixels no star measured.
    outlier_nsigma : each star's own outlier pixels are masked, and its
        inverse variances capped, first (:func:`star_outliers`).
    telluric : options of :func:`~gpucal.calibration.telluric.telluric_part` (min_stars,
        saturation, outlier_nsigma, level_window). When the vectors kept the bands (``vectors.resp``), the
        combined vector is the smooth part bridged as here times the telluric part measured
        by the stars at full resolution, never smoothed; its flags go into the summary.

    Returns
    -------
    FluxCalibrationResult; per-star exclusion reasons are filled by the caller
    for stars it marked unusable, and here with "discrepant" for rejected ones.
    """
    if method not in METHODS:
        raise InputError(f"unknown combination method {method!r}; use one of {', '.join(METHODS)}")
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

    level, discrepant, used = _reject_discrepant(cal, mask, usable, reject_nsigma, reject_floor)
    mask = mask & used[:, None]
    floor = xp.zeros((n_star,), dtype=cal.dtype, device=dev)
    if method == "floored_mean":
        ivar, floor = _floored_ivar(cal, ivar, mask, nsigma, maxiter, floor_window, floor_iter)
    comb, comb_var, measured, keep = _combine_pixels(cal, ivar, mask, method, nsigma, maxiter)
    if smooth:
        comb, measured = _smooth(comb, measured, smooth, polyorder)
        comb_var = xp.where(measured, comb_var, xp.nan)
    filled, filled_var = fill_masked(comb, comb_var, measured, window=fill_window)
    from .telluric import telluric_part, telluric_summary  # it bridges with fill_masked: imported here

    tell = None
    if vectors.resp is not None:  # the telluric part, measured by the stars
        tell = telluric_part(vectors, mask, filled, filled_var, method="median" if method == "median" else
                             "weighted_mean", **(telluric or {}))
        filled, filled_var = tell.cal, tell.var
    resid, rms = _scatter(vectors, comb, measured, mask)
    return FluxCalibrationResult(
        wave=vectors.wave, cal=filled, var=filled_var, measured=measured, used=used,
        reasons=[], residuals=resid,
        summary={"method": method, "level": level, "discrepant": discrepant, "rms_scatter": rms,
                 "n_outlier_pixels": xp.sum(xp.astype(outlier, xp.int64), axis=1),
                 "n_contributing": xp.sum(xp.astype(keep, xp.int64), axis=0), "smooth": smooth,
                 "floor": floor, "weight_share": _weight_share(ivar, keep, method),
                 **telluric_summary(tell),
                 # each star's pixels left out as its own outliers or clipped across stars (the MASK's OUTLIER)
                 "outlier_mask": outlier | (mask & ~keep)},
    )


def _reject_discrepant(cal, mask, usable, reject_nsigma, reject_floor):
    """Star-level rejection on each star's median log ratio to the pixel-wise median.

    Returns (level (n_star,), discrepant (n_star,) bool, used (n_star,) bool).
    """
    xp = array_namespace(cal)
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
    return level, discrepant, usable & has_level & ~discrepant


def model_floor(cal, ivar, mask, ref, *, window: int = 51):
    """Each star's model-error floor f (n_star,): the RMS of its smoothed fractional residual about ``ref``.

    cal, ivar, mask : (n_star, n_pix); ref : (n_pix,) the combined vector (NaN or <= 0 where unknown).
    The residual r = cal / ref − 1 over the star's good pixels is smoothed by a running linear fit
    over ``window`` pixels (s; masked pixels have no weight). Its mean square is weighted by the
    pixels' precision, u = 1 / v with v = 1 / (ivar ref²) the relative variance, so the pixels
    the star measures well set f and its noisy ends (a blue cut-off) do not, and the photon
    noise left in s (≈ v / window) is subtracted:
    f² = max(Σ u (s² − v / window) / Σ u, 0). 0 for a star with no pixel. A vector shorter than
    ``window`` is smoothed over its whole length (0 below 3 pixels).
    """
    xp = array_namespace(cal)
    n_pix = cal.shape[-1]
    window = min(int(window) | 1, n_pix if n_pix % 2 else n_pix - 1)  # a short vector: its whole length
    if window < 3:
        return xp.zeros(cal.shape[:1], dtype=cal.dtype, device=_device(cal))
    ok = xp.isfinite(ref) & (ref > 0)
    good = mask & ok[None, :] & (ivar > 0)
    refs = xp.where(ok, ref, 1.0)[None, :]
    r = xp.where(good, cal / refs - 1.0, 0.0)
    sm, sm_good = savgol_filter(r, good, window=window, polyorder=1)
    sm_good = sm_good & good
    u = xp.where(sm_good, ivar * refs * refs, 0.0)  # 1 / v
    n = xp.sum(xp.astype(sm_good, cal.dtype), axis=1)
    usum = xp.sum(u, axis=1)
    ms = xp.sum(xp.where(sm_good, u * sm * sm, 0.0), axis=1) - n / float(window)
    return xp.sqrt(xp.maximum(ms / xp.where(usum > 0, usum, 1.0), 0.0))


def _floored_ivar(cal, ivar, mask, nsigma, maxiter, window, n_iter):
    """The inverse variances with each star's model-error floor, 1 / (1/ivar + (f c)²), and f (n_star,)."""
    xp = array_namespace(cal)
    ref = masked_median(cal, mask, axis=0)
    floored, f = ivar, xp.zeros(cal.shape[:1], dtype=cal.dtype, device=_device(cal))
    for _ in range(max(int(n_iter), 1)):  # a fixed count of passes: no host round trip
        f = model_floor(cal, ivar, mask, ref, window=window)
        ok = xp.isfinite(ref) & (ref > 0)
        extra = (f[:, None] * xp.where(ok, ref, 0.0)[None, :]) ** 2
        pos = mask & (ivar > 0)
        floored = xp.where(pos, 1.0 / (1.0 / xp.where(pos, ivar, 1.0) + extra), 0.0)
        keep = sigma_clip(cal, weights=floored, mask=mask, nsigma=nsigma, maxiter=maxiter, axis=0)
        ref, _, _ = _weighted_mean(cal, floored, keep)
    return floored, f


def _weight_share(ivar, keep, method):
    """Each star's median (over the pixels it contributes to) share of the per-pixel weight; NaN for the median."""
    xp = array_namespace(ivar)
    w = xp.where(keep, ivar, 0.0)
    wsum = xp.sum(w, axis=0)
    share = w / xp.where(wsum > 0, wsum, 1.0)[None, :]
    med = masked_median(share, keep & (wsum > 0)[None, :], axis=1)
    return xp.full_like(med, xp.nan) if method == "median" else med


def _combine_pixels(cal, ivar, mask, method, nsigma, maxiter):
    """Per-pixel combination of the used stars: (value, variance, measured, pixels kept)."""
    if method in ("weighted_mean", "floored_mean"):
        keep = sigma_clip(cal, weights=ivar, mask=mask, nsigma=nsigma, maxiter=maxiter, axis=0)
        comb, comb_var, measured = _weighted_mean(cal, ivar, keep)
        return comb, comb_var, measured, keep
    comb = masked_median(cal, mask, axis=0)
    _, wvar, measured = _weighted_mean(cal, ivar, mask)
    return comb, (math.pi / 2.0) * wvar, measured, mask


def _scatter(vectors, comb, measured, mask):
    """Each star's fractional residual from the combination, and the median per-pixel RMS between stars."""
    xp = array_namespace(comb)
    safe = xp.where(measured, comb, 1.0)
    resid = xp.where(vectors.mask & measured[None, :], (vectors.cal - comb[None, :]) / safe[None, :], xp.nan)
    meas_used = mask & measured[None, :]
    sq = xp.where(meas_used, resid * resid, 0.0)
    cnt = xp.sum(xp.astype(meas_used, xp.float64), axis=0)
    rms_pix = xp.sqrt(xp.sum(sq, axis=0) / xp.where(cnt > 0, cnt, 1.0))
    return resid, masked_median(rms_pix[None, :], (cnt > 1)[None, :], axis=1)[0]


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
    edge pixel. Good pixels are returned unchanged. y, var, good : (..., n_pix),
    each row bridged on its own (the per-star levels of the telluric part). No
    host round trip.
    """
    xp = array_namespace(y)
    dev = _device(y)
    shape = y.shape
    n = shape[-1]
    window = min(int(window) | 1, (n // 2) * 2 - 1)
    base = xp.where(good, y, 0.0)
    sm, sm_good = savgol_filter(base, good, window=window, polyorder=2)
    sm = xp.where(sm_good, sm, base)
    rows = math.prod(shape[:-1])
    y2, var2, good2, sm2 = (xp.reshape(a, (rows, n)) for a in (y, xp.broadcast_to(var, shape), good, sm))
    idx = xp.arange(n, device=dev)[None, :]
    gi = xp.astype(good2, xp.int64)
    last = xp.maximum(xp.sum(gi, axis=1, keepdims=True) - 1, 0)
    # Positions of the good pixels in order: a stable sort on "not good".
    order = xp.argsort(xp.astype(~good2, xp.int8), axis=1, stable=True)
    k = xp.cumulative_sum(gi, axis=1) - 1  # index among good pixels of the last good pixel <= p
    k_left = xp.minimum(xp.clip(k, 0, None), last)
    k_right = xp.maximum(xp.minimum(xp.where(good2, k, k + 1), last), 0)
    offset = xp.arange(rows, device=dev)[:, None] * n

    def take(a, pos):  # a[row, pos[row, j]] through the flat array: one gather for every row
        return xp.reshape(xp.take(xp.reshape(a, (-1,)), xp.reshape(pos + offset, (-1,))), (rows, n))

    p_left, p_right = take(order, k_left), take(order, k_right)
    y_left, y_right = take(sm2, p_left), take(sm2, p_right)
    v_left, v_right = take(var2, p_left), take(var2, p_right)
    span = xp.astype(p_right - p_left, y.dtype)
    frac = xp.where(span > 0, xp.astype(idx - p_left, y.dtype) / xp.where(span > 0, span, 1.0), 0.0)
    frac = xp.clip(frac, 0.0, 1.0)
    fy = y_left + frac * (y_right - y_left)
    fv = (1.0 - frac) * v_left + frac * v_right
    return (xp.reshape(xp.where(good2, y2, fy), shape), xp.reshape(xp.where(good2, var2, fv), shape))

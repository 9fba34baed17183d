"""Step 4b: the telluric part of the combined vector, measured by the simultaneous standards.

The standards observed in the same exposure as the targets carry the same
atmospheric absorption. The combined vector is split in two parts:

* the slowly varying part S(λ) — the combination of the per-star vectors
  outside the telluric bands, smoothed (optionally) and bridged across them
  exactly as in the masked mode (:func:`~gpucal.calibration.combine.fill_masked`);
* the telluric part T(λ) inside the bands, at full resolution and never
  smoothed: each star's transmission estimate t_i = ℓ_i · S · resp_i, where
  resp_i = observed / scaled model (``CalibrationVectors.resp``) and ℓ_i the
  star's own level relative to S around the band (its vector / S outside the
  bands, averaged over ``level_window`` pixels: a star's photometric
  scale or a slow template error cancels), combined over the stars at each
  pixel by an inverse-variance weighted mean (or a masked median) of the
  estimates within ``outlier_nsigma`` of their own noise from the stars'
  median. A star's line residuals move with its RV, the telluric lines stay
  at rest in the observatory frame, so the residuals average out across
  stars, and the median rejection removes the large ones (and cosmic rays).

Inside the bands Cal = S / T, σ²(Cal) = Cal² (σ²_S/S² + σ²_T/T²). Where fewer
than ``min_stars`` standards measure a pixel (``uncovered``) or T is below
``saturation`` (``saturated``: the absorption is nearly total and 1/T would
amplify noise), the pixel is flagged and keeps the masked mode's bridged S.

Shapes: per-star arrays (n_star, n_pix), S and the outputs (n_pix,);
T dimensionless, Cal in erg/s/cm²/Å per count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device as _device

from ..backends import array_namespace, masked_median
from .combine import fill_masked

__all__ = ["TELLURIC_MIN_STARS", "TELLURIC_SATURATION", "TelluricPart", "telluric_part", "telluric_summary"]

#: Fewest standards that may set the telluric part of a pixel. One star imprints its own line
#: residuals and noise unchecked; two cannot tell which of them is wrong; three are the fewest a
#: per-pixel clip (or median) can outvote one bad star with, and bring the noise of T to 1/√3
#: of one star's.
TELLURIC_MIN_STARS = 3

#: Transmission below which a pixel is called saturated: more than 90 % absorbed, 1/T would
#: multiply a program fibre's noise (and T's own error) by more than ten.
TELLURIC_SATURATION = 0.1


@dataclass
class TelluricPart:
    """The telluric part of a combined vector (all (n_pix,), on the vectors' namespace).

    transmission, transmission_var : T and σ²_T (NaN where no star measured it);
    n_stars : standards kept at each pixel; band : pixels inside the bands;
    corrected, saturated, uncovered : bool flags (disjoint, inside the bands);
    cal, var : the combined vector S/T (or S where not corrected) and its variance.
    """

    transmission: Any
    transmission_var: Any
    n_stars: Any
    band: Any
    corrected: Any
    saturated: Any
    uncovered: Any
    cal: Any
    var: Any


def _running_mean(y, good, window):
    """Mean of the good pixels of ``y`` (..., n_pix) within ±window//2, by cumulative sums
    (a few operations whatever the window), and where it has any."""
    xp = array_namespace(y)
    dev = _device(y)
    n = y.shape[-1]
    w = xp.astype(good, xp.float64)
    zero = xp.zeros(y.shape[:-1] + (1,), dtype=xp.float64, device=dev)
    cw = xp.concat([zero, xp.cumulative_sum(w, axis=-1)], axis=-1)
    cy = xp.concat([zero, xp.cumulative_sum(xp.where(good, y, 0.0), axis=-1)], axis=-1)
    idx = xp.arange(n, device=dev)
    lo, hi = xp.clip(idx - window // 2, 0, n), xp.clip(idx + window // 2 + 1, 0, n)
    sw = xp.take(cw, hi, axis=-1) - xp.take(cw, lo, axis=-1)
    sy = xp.take(cy, hi, axis=-1) - xp.take(cy, lo, axis=-1)
    return xp.where(sw > 0, sy / xp.where(sw > 0, sw, 1.0), 0.0), good & (sw > 0)


def _star_transmission(vectors, mask, smooth, level_window):
    """Each star's transmission estimate t_i = ℓ_i S resp_i and its variance, (n_star, n_pix)."""
    xp = array_namespace(vectors.cal)
    s_ok = xp.isfinite(smooth) & (smooth > 0)
    safe_s = xp.where(s_ok, smooth, 1.0)
    ok = mask & s_ok[None, :]
    ratio, ok = _running_mean(xp.where(ok, vectors.cal / safe_s[None, :], 0.0), ok, level_window)
    level, _ = fill_masked(ratio, xp.zeros_like(ratio), ok, window=3)  # bridged from the nearest means
    has_level = xp.any(ok, axis=1, keepdims=True) & xp.isfinite(level) & (level > 0)
    factor = xp.where(has_level, level, 0.0) * smooth[None, :]
    t = factor * vectors.resp
    t_var = factor * factor * vectors.resp_var
    good = has_level & xp.isfinite(t) & xp.isfinite(t_var) & (t_var > 0) & vectors.band[None, :]
    return xp.where(good, t, 0.0), xp.where(good, t_var, 1.0), good


def _combine_transmission(t, t_var, good, method, outlier_nsigma):
    """Per-pixel combination of the stars' estimates: (T, σ²_T, stars kept).

    A star's estimate further than ``outlier_nsigma`` of its own noise from the
    stars' median is left out first (a cosmic ray, a bad pixel, a large line
    residual of its own): a clip on the scatter of a handful of values cannot
    reject one of them, the median of three or more can.
    """
    xp = array_namespace(t)
    centre = masked_median(t, good, axis=0)
    keep = good & (xp.abs(t - centre[None, :]) <= outlier_nsigma * xp.sqrt(t_var))
    w = xp.where(keep, 1.0 / t_var, 0.0)
    wsum = xp.sum(w, axis=0)
    has = wsum > 0
    safe = xp.where(has, wsum, 1.0)
    if method == "weighted_mean":
        value, var = xp.sum(w * t, axis=0) / safe, 1.0 / safe
    else:
        value, var = masked_median(t, keep, axis=0), (math.pi / 2.0) / safe
    n = xp.sum(xp.astype(keep, xp.int64), axis=0)
    return xp.where(has, value, xp.nan), xp.where(has, var, xp.nan), n


def telluric_part(vectors, mask, smooth, smooth_var, *, method="weighted_mean", outlier_nsigma=5.0,
                  min_stars=TELLURIC_MIN_STARS, saturation=TELLURIC_SATURATION,
                  level_window=201) -> TelluricPart:
    """The telluric part of the combined vector and the vector corrected by it.

    vectors : CalibrationVectors with ``resp``, ``resp_var`` and ``band`` (see
    :func:`~gpucal.calibration.vectors.calibration_vectors`, ``keep_bands``).
    mask : (n_star, n_pix) the pixels of the used stars that entered the
    combination outside the bands (own outliers removed); a star with none is
    left out here too. smooth, smooth_var : (n_pix,) the masked mode's combined
    vector (bridged across the bands) and its variance. method : as the
    combination. outlier_nsigma : a star's estimate this many of its own σ from
    the stars' median is left out at that pixel. min_stars, saturation : the
    flags (module docstring). level_window : pixels over which each star's
    level relative to S is smoothed before it is bridged across a band.
    """
    xp = array_namespace(vectors.cal)
    t, t_var, good = _star_transmission(vectors, mask, smooth, level_window)
    trans, trans_var, n = _combine_transmission(t, t_var, good, method, outlier_nsigma)
    band = vectors.band
    uncovered = band & (n < min_stars)
    saturated = band & ~uncovered & ~(trans >= saturation)
    corrected = band & ~uncovered & ~saturated
    safe_t = xp.where(corrected, trans, 1.0)
    cal = xp.where(corrected, smooth / safe_t, smooth)
    s2 = smooth * smooth
    rel = smooth_var / xp.where(s2 > 0, s2, 1.0) + xp.where(corrected, trans_var, 0.0) / (safe_t * safe_t)
    var = xp.where(corrected, cal * cal * rel, smooth_var)
    return TelluricPart(transmission=trans, transmission_var=trans_var, n_stars=n, band=band,
                        corrected=corrected, saturated=saturated, uncovered=uncovered, cal=cal, var=var)


def telluric_summary(part) -> dict:
    """The per-pixel results the outputs use (None: the bands were masked), as summary entries."""
    if part is None:
        return {"telluric": "mask"}
    return {"telluric": "correct", "telluric_transmission": part.transmission,
            "telluric_transmission_var": part.transmission_var, "telluric_n_stars": part.n_stars,
            "telluric_band": part.band, "telluric_corrected": part.corrected,
            "telluric_saturated": part.saturated, "telluric_uncovered": part.uncovered}

"""Pixels excluded from matching and calibration: telluric bands and single-pixel outliers.

Regions: a wavelength array (n_pix,) in Å in, a boolean array of the same
namespace and device out, True where the pixel is usable. Outliers: batched
(n_spec, n_pix) arrays in, a boolean mask out, True where the pixel is an
outlier of its own spectrum. The default regions are the telluric bands
(:data:`gpucal.fitting.tellurics.TELLURIC_DEFAULT`, re-exported here).
"""

from __future__ import annotations

from array_api_compat import device as _device

from ..backends import array_namespace
from ..errors import InputError
from .tellurics import TELLURIC_DEFAULT

__all__ = ["TELLURIC_DEFAULT", "parse_regions", "region_mask", "local_outliers", "cap_local_weights",
           "running_mean"]


def parse_regions(text: str):
    """Parse ``"lo-hi,lo-hi"`` (Å) or ``"none"`` into a tuple of (lo, hi) pairs."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    if text.lower() in ("telluric", "default"):
        return TELLURIC_DEFAULT
    out = []
    for part in text.split(","):
        try:
            lo, hi = (float(v) for v in part.split("-"))
        except ValueError:
            raise InputError(f"mask region {part!r} is not of the form LO-HI in Å") from None
        if not lo < hi:
            raise InputError(f"mask region {part!r}: LO must be below HI")
        out.append((lo, hi))
    return tuple(out)


def region_mask(wave, regions=TELLURIC_DEFAULT):
    """True where ``wave`` lies outside every (lo, hi) region (inclusive bounds)."""
    xp = array_namespace(wave)
    good = xp.ones(wave.shape, dtype=xp.bool, device=_device(wave))
    for lo, hi in regions:
        good = good & ~((wave >= lo) & (wave <= hi))
    return good


def _neighbour_middle(x, mask):
    """Second smallest and second largest of each pixel's four nearest neighbours (±1, ±2 pixels).

    A neighbour that is masked or off the end counts as the pixel itself,
    which only moves the pair toward the pixel (fewer flags, never more).
    Elementwise min/max of four shifted copies: no sort, no host round trip.
    Returns (s2, s3), each (n_spec, n_pix); their mean is the median.
    """
    xp = array_namespace(x)
    n = x.shape[1]
    dev = _device(x)
    pos = xp.arange(n, device=dev)
    shifted = []
    for k in (-2, -1, 1, 2):
        idx = xp.clip(pos + k, 0, n - 1)
        inside = ((pos + k) >= 0) & ((pos + k) <= n - 1)
        shifted.append(xp.where(inside[None, :] & xp.take(mask, idx, axis=1), xp.take(x, idx, axis=1), x))
    a, b, c, d = shifted
    # The middle two of four are the larger of the pairs' minima and the smaller of their maxima.
    u = xp.maximum(xp.minimum(a, b), xp.minimum(c, d))
    v = xp.minimum(xp.maximum(a, b), xp.maximum(c, d))
    return xp.minimum(u, v), xp.maximum(u, v)


def local_outliers(x, ivar, mask, *, nsigma: float = 8.0, floor: float = 0.0, side: str = "both"):
    """Single pixels that stand out from their neighbours, per spectrum: (n_spec, n_pix) bool.

    A pixel is an outlier when it lies above all but one of its four nearest
    neighbours (±1, ±2 pixels) by more than ``nsigma`` σ (σ = 1/sqrt(ivar))
    and by more than ``floor`` times that neighbour's value, or (``side="both"``)
    below all but one of them by as much. Allowing one neighbour to share the
    excursion catches a two-pixel cosmic ray; a feature wider than the
    neighbourhood moves the neighbours too and stays. In an undersampled
    absorption spectrum a line core stands below its neighbours and a one-
    or two-pixel window between deep lines stands above them, so on observed
    spectra use ``side="high"`` together with a cut on the normalised flux
    (as :func:`gpucal.fitting.prepare.normalise_observed` does); on calibration
    vectors, where the lines divide out, use ``"both"``. Only pixels in
    ``mask`` are flagged or used as neighbours.
    """
    if side not in ("both", "high"):
        raise InputError(f"side must be 'both' or 'high', got {side!r}")
    xp = array_namespace(x)
    s2, s3 = _neighbour_middle(x, mask)
    sigma = xp.sqrt(1.0 / xp.where(mask & (ivar > 0), ivar, xp.inf))
    up = x - s3
    out = (up > nsigma * sigma) & (up > floor * xp.abs(s3))
    if side == "both":
        down = s2 - x
        out = out | ((down > nsigma * sigma) & (down > floor * xp.abs(s2)))
    return mask & out


def cap_local_weights(ivar, mask, *, factor: float = 10.0):
    """``ivar`` capped at ``factor`` times the median of its four nearest neighbours' (where that is > 0); 0 outside ``mask``."""
    xp = array_namespace(ivar)
    s2, s3 = _neighbour_middle(ivar, mask)
    ref = 0.5 * (s2 + s3)
    capped = xp.where(ref > 0, xp.minimum(ivar, factor * ref), ivar)
    return xp.where(mask, capped, 0.0)


def running_mean(y, good, window: int):
    """Mean of ``y`` (n_spec, n_pix) over the ``good`` pixels within ``window`` // 2 of each pixel, and
    how many there were: (mean, count), mean = ``y`` where the window holds none.

    A sum of the window's shifted slices (a Python loop over the window's offsets, not the pixels),
    not a difference of cumulative sums: a calibration vector spans decades along a spectrum, and a
    running sum's differences would lose its faint end.
    """
    xp = array_namespace(y)
    hw = max(int(window) // 2, 0)
    n_spec, n = y.shape
    v = xp.where(good, y, 0.0)
    g = xp.astype(good, y.dtype)
    tot, cnt = xp.zeros_like(v), xp.zeros_like(v)
    for d in range(-hw, hw + 1):
        lo, hi = max(0, d), min(n, n + d)
        before = xp.zeros((n_spec, max(0, -d)), dtype=y.dtype, device=_device(y))
        after = xp.zeros((n_spec, max(0, d)), dtype=y.dtype, device=_device(y))
        tot = tot + xp.concat([before, v[:, lo:hi], after], axis=1)
        cnt = cnt + xp.concat([before, g[:, lo:hi], after], axis=1)
    return xp.where(cnt > 0, tot / xp.where(cnt > 0, cnt, 1.0), y), cnt

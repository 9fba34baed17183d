"""The output frame's MASK: documented bit flags per fibre pixel, and the AB zeropoints of the QA.

Step of the mission: after the combination and the application (step 9),
what the calibrated frame must say about each of its pixels, and the
zeropoint curves the QA shows. Shapes: frame (n_fibre, n_pix), standards
(n_star, n_pix), the combined vector (n_pix,); the mask is int32
(n_fibre, n_pix), 0 = a clean pixel. Zeropoints in AB mag, wavelengths in Å.

Bits (:data:`MASK_BITS`, written to the MASK extension's header as
``MASKB<k>`` cards, documented in README and docs/report_schema.md):

====  ================  =====================================================
bit   name              set where
====  ================  =====================================================
1     ``BADPIX``        the input pixel is bad: NaN/inf flux or variance, or
                        variance <= 0 (its calibrated value is NaN)
2     ``OUTLIER``       (standard fibres) the pixel was left out of the
                        combination as the star's own outlier or clipped
3     ``INTERP``        the calibration vector there was interpolated from
                        the throughput on either side, not measured
4     ``TELLURIC``      a telluric band not corrected (today: every pixel
                        in :data:`~gpucal.fitting.tellurics.TELLURIC_BANDS`),
                        or one the telluric correction flags as saturated or
                        with too few standards
5     ``NOCOVER``       no standard used in the calibration has a good
                        input pixel there
====  ================  =====================================================

Bit k has the value 2**(k-1) (BADPIX = 1, OUTLIER = 2, INTERP = 4,
TELLURIC = 8, NOCOVER = 16).
"""

from __future__ import annotations

from ..backends import array_namespace
from ..fitting import TELLURIC_DEFAULT, region_mask
from ..units import C_KMS

__all__ = ["MASK_BITS", "BADPIX", "OUTLIER", "INTERP", "TELLURIC", "NOCOVER", "mask_bits", "mask_counts",
           "zeropoint_ab", "binned_residuals"]

BADPIX, OUTLIER, INTERP, TELLURIC, NOCOVER = 1, 2, 4, 8, 16
#: name -> (value, meaning), in bit order.
MASK_BITS = {
    "BADPIX": (BADPIX, "input pixel bad (NaN/inf flux or variance, variance <= 0)"),
    "OUTLIER": (OUTLIER, "standard's pixel left out of the combination (own outlier or clipped)"),
    "INTERP": (INTERP, "calibration vector interpolated here, not measured"),
    "TELLURIC": (TELLURIC, "telluric band uncorrected, or correction saturated / too few standards"),
    "NOCOVER": (NOCOVER, "no used standard has a good input pixel here"),
}


def _flag(cond, value, xp):
    """``value`` (int32) where ``cond``, else 0."""
    dev = _dev(cond)
    return xp.where(cond, xp.asarray(value, dtype=xp.int32, device=dev), xp.asarray(0, dtype=xp.int32, device=dev))


def mask_bits(flux, var, wave, measured, star_rows, star_outlier, star_good, used, *,
              telluric_bands=TELLURIC_DEFAULT, telluric_corrected=False, telluric_saturated=None,
              telluric_few_standards=None):
    """The (n_fibre, n_pix) int32 MASK of a calibrated frame (bits in :data:`MASK_BITS`).

    flux, var : (n_fibre, n_pix) the input frame (counts); wave : (n_pix,) Å;
    measured : (n_pix,) bool, the combined vector was measured (else interpolated);
    star_rows : (n_star,) int, the standards' frame rows; star_outlier : (n_star, n_pix)
    bool, their pixels left out of the combination; star_good : (n_star, n_pix) bool,
    their good input pixels; used : (n_star,) bool, the stars combined.
    telluric_bands : (lo, hi) Å bands flagged TELLURIC unless ``telluric_corrected``;
    telluric_saturated, telluric_few_standards : optional (n_pix,) or (n_fibre, n_pix)
    bool flags of a telluric correction, flagged TELLURIC where True.
    """
    xp = array_namespace(flux, var)
    n_fibre = flux.shape[0]
    bad = ~(xp.isfinite(flux) & xp.isfinite(var) & (var > 0))
    m = _flag(bad, BADPIX, xp)
    # scatter the standards' outlier pixels onto their rows: a one-hot product, no loop over stars
    onehot = xp.astype(star_rows[:, None] == xp.arange(n_fibre, device=_dev(flux))[None, :], xp.int32)
    out_rows = xp.matmul(xp.permute_dims(onehot, (1, 0)), xp.astype(star_outlier, xp.int32)) > 0
    m = m | _flag(out_rows, OUTLIER, xp)
    m = m | _flag(~measured, INTERP, xp)[None, :]
    tell = xp.zeros(wave.shape, dtype=xp.bool, device=_dev(flux))
    if not telluric_corrected:
        tell = ~region_mask(wave, telluric_bands)
    tell = tell[None, :]
    for extra in (telluric_saturated, telluric_few_standards):
        if extra is not None:
            tell = tell | (extra if extra.ndim == 2 else extra[None, :])
    m = m | _flag(tell, TELLURIC, xp)
    covered = xp.any(star_good & used[:, None], axis=0)
    return m | _flag(~covered, NOCOVER, xp)[None, :]


def mask_counts(mask):
    """(n_bits,) int64: how many pixels of ``mask`` have each bit of :data:`MASK_BITS` set, in its order."""
    xp = array_namespace(mask)
    bits = xp.asarray([v for v, _ in MASK_BITS.values()], dtype=mask.dtype, device=_dev(mask))
    flagged = (mask[..., None] & bits) != 0
    return xp.sum(xp.astype(flagged, xp.int64), axis=tuple(range(mask.ndim)))


def _dev(x):
    from array_api_compat import device

    return device(x)


def zeropoint_ab(wave, cal):
    """AB magnitude of a source giving one count per pixel: −2.5 log10(Cal λ² / c) − 48.60.

    wave : (n_pix,) Å; cal : (..., n_pix) erg/s/cm²/Å per count. NaN where Cal <= 0 or NaN.
    A larger zeropoint is a more sensitive system (more counts per unit flux).
    """
    xp = array_namespace(wave, cal)
    c_aa = C_KMS * 1e13  # Å/s
    fnu = cal * (wave * wave) / c_aa
    ok = xp.isfinite(fnu) & (fnu > 0)
    return xp.where(ok, -2.5 * xp.log10(xp.where(ok, fnu, 1.0)) - 48.60, xp.nan)


def binned_residuals(wave, residual, n_bins: int = 40):
    """Per-star residuals (n_star, n_pix, NaN = not measured) averaged in ``n_bins`` equal λ bins.

    Returns (bin centres (n_bins,) Å, mean residual (n_star, n_bins), NaN in an empty bin).
    """
    xp = array_namespace(wave, residual)
    lo, hi = wave[0], wave[-1]
    edges = lo + (hi - lo) * xp.arange(n_bins + 1, dtype=wave.dtype, device=_dev(wave)) / n_bins
    idx = xp.clip(xp.astype(xp.floor((wave - lo) / (hi - lo) * n_bins), xp.int64), 0, n_bins - 1)
    onehot = xp.astype(idx[:, None] == xp.arange(n_bins, device=_dev(wave))[None, :], wave.dtype)
    ok = xp.isfinite(residual)
    s = xp.matmul(xp.where(ok, residual, 0.0), onehot)
    n = xp.matmul(xp.astype(ok, wave.dtype), onehot)
    centres = 0.5 * (edges[:-1] + edges[1:])
    return centres, xp.where(n > 0, s / xp.where(n > 0, n, 1.0), xp.nan)

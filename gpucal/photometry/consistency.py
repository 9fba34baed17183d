"""Photometric consistency: stars whose bands disagree after the scale fit.

Step of the mission: after each template is scaled to its star's
photometry, a star whose synthetic − observed residuals ``(n_star, n_band)``
(mag) span more than a tolerance between its bands is excluded, with the
reason (:func:`photometric_consistency`). Array API: runs on the namespace and
device of the residuals; only the per-star reasons are formed on the host.
"""

from __future__ import annotations

import math

from ..backends import array_namespace, backend_of, to_backend, to_numpy
from ..errors import InputError

__all__ = ["photometric_consistency"]


def photometric_consistency(residual, valid, max_dev=0.3, *, bands=None):
    """Stars to exclude for their photometry after the scale fit, with the reason.

    Parameters
    ----------
    residual : (n_star, n_band) synthetic − observed magnitude after scaling
        (``scale_template_to_photometry(...)["residual"]``), backend array.
    valid : (n_star, n_band) bool, the bands used in the fit (host or backend).
    max_dev : mag; a star whose residuals span more than this between bands
        (max − min over its valid bands) is inconsistent.
    bands : optional band names for the messages.

    Returns
    -------
    bad : (n_star,) bool on ``residual``'s backend: no usable band, or
        residuals spanning > ``max_dev``.
    reasons : list of str per star, "" for good stars, e.g.
        ``"no usable photometric band"`` or ``"photometry inconsistent between
        bands: residuals span 0.45 mag > 0.30 (panstarrs-g +0.21, twomass-J
        -0.24)"``.
    """
    xp = array_namespace(residual)
    if residual.ndim != 2:
        raise InputError(f"residual must be (n_star, n_band), got shape {tuple(residual.shape)}")
    max_dev = float(max_dev)
    if not (math.isfinite(max_dev) and max_dev > 0):
        raise InputError(f"max_dev must be a positive number of mag, got {max_dev!r}")
    r = xp.astype(residual, xp.float64)
    use = to_backend(valid, backend_of(residual)) & xp.isfinite(r)
    n_used = xp.sum(xp.astype(use, xp.int64), axis=1)
    hi = xp.where(use, r, -xp.inf)
    lo = xp.where(use, r, xp.inf)
    spread = xp.where(n_used >= 2, xp.max(hi, axis=1) - xp.min(lo, axis=1), 0.0)
    none = n_used == 0
    bad = none | (spread > max_dev)
    h_bad, h_none, h_spread, h_hi, h_lo, h_ihi, h_ilo = (
        to_numpy(v) for v in (bad, none, spread, xp.max(hi, axis=1), xp.min(lo, axis=1),
                              xp.argmax(hi, axis=1), xp.argmin(lo, axis=1))
    )
    n_band = int(residual.shape[1])
    names = list(bands) if bands is not None else [f"band {b}" for b in range(n_band)]
    reasons = []
    for k in range(h_bad.shape[0]):
        if not h_bad[k]:
            reasons.append("")
        elif h_none[k]:
            reasons.append("no usable photometric band")
        else:
            reasons.append(
                f"photometry inconsistent between bands: residuals span {h_spread[k]:.2f} mag > {max_dev:.2f} "
                f"({names[int(h_ihi[k])]} {h_hi[k]:+.2f}, {names[int(h_ilo[k])]} {h_lo[k]:+.2f})"
            )
    return bad, reasons

"""Batched continuum normalisation.

Step 1 of matching: the observed standards and the templates are divided by
their continua, found the same way for both, so that the smooth instrument
throughput and the template's spectral energy distribution drop out of the
line-by-line comparison.

Method: an iterative, asymmetrically clipped Legendre-polynomial fit to
ln(flux) against ln(λ). Absorption lines pull pixels below the continuum, so
pixels more than ``clip_low`` σ below the fit are dropped (and more than
``clip_high`` σ above, for cosmic rays); a fixed number of iterations keeps the
whole batch in lock-step with no host synchronisation. Fitting ln(flux) makes
the fit relative, so a spectrum whose flux spans a factor 10 is normalised as
well at its faint end as at its bright end.

Shapes: wave (n_pix,) Å; flux, weights (n_spec, n_pix); output (n_spec, n_pix).
"""

from __future__ import annotations

import math
import sys

from array_api_compat import device as _device

from ..backends import array_namespace, batched_lstsq, masked_median

__all__ = ["legendre_basis", "fit_continuum"]

#: ln of the largest float64: exp(x) is finite for x <= _LN_MAX and overflows above it.
_LN_MAX = math.log(sys.float_info.max)


def legendre_basis(wave, degree: int):
    """Legendre polynomials P_0..P_degree of ln λ mapped to [-1, 1]: (..., n_pix, degree+1).

    ``wave`` (n_pix,), or (n_spec, n_pix) with each row on its own wavelengths
    (each row mapped over its own range).
    """
    xp = array_namespace(wave)
    lnw = xp.log(wave)
    n = wave.shape[-1]
    x = 2.0 * (lnw - lnw[..., :1]) / (lnw[..., n - 1:] - lnw[..., :1]) - 1.0
    cols = [xp.ones_like(x), x]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * x * cols[k] - k * cols[k - 1]) / (k + 1))
    return xp.stack(cols[: degree + 1], axis=-1)


def _evaluate(coef, basis):
    """Σ_k coef[..., k] basis[..., n, k]: (n_spec, n_pix), for a shared (n, k) or per-row (n_spec, n, k) basis."""
    xp = array_namespace(coef, basis)
    if basis.ndim == 2:
        return coef @ xp.permute_dims(basis, (1, 0))
    return (basis @ coef[..., None])[..., 0]


def fit_continuum(wave, flux, weights, *, degree: int = 7, niter: int = 6,
                  clip_low: float = 1.5, clip_high: float = 3.0):
    """Continuum of each spectrum (same units as ``flux``).

    Parameters
    ----------
    wave : (n_pix,) Å, or (n_spec, n_pix): each spectrum on its own wavelengths.
    flux : (n_spec, n_pix); pixels with zero weight may hold any value (NaN too).
    weights : (n_spec, n_pix) inverse variance of ``flux`` (0 = bad pixel);
        pass ones for noise-free templates.
    degree : polynomial degree in ln λ.
    niter : clipping iterations (fixed, so the batch never waits on the host).
    clip_low, clip_high : rejection thresholds below / above the fit, in units
        of the weighted RMS ln-flux residual of the pixels kept so far.

    Returns
    -------
    continuum : (n_spec, n_pix), positive everywhere.
    """
    xp = array_namespace(wave, flux, weights)
    dtype = xp.float64
    f = xp.astype(flux, dtype)
    w = xp.astype(weights, dtype)
    positive = (w > 0) & (f > 0)
    safe_f = xp.where(positive, f, xp.ones_like(f))
    lnf = xp.log(safe_f)
    # Var(ln f) = var / f^2, so the inverse-variance weight of ln f is w f^2;
    # normalise per row so rows of very different brightness condition alike.
    wl = xp.where(positive, w * safe_f * safe_f, xp.zeros_like(f))
    # No pixel may carry the fit: one hot pixel or one tiny variance would take all the
    # weight, the clipping would keep only it, and the normal matrix would be singular.
    med = masked_median(wl, positive, axis=1)
    wl = xp.minimum(wl, xp.where(xp.isfinite(med) & (med > 0), 10.0 * med, 0.0)[:, None])
    wl = wl / xp.maximum(xp.max(wl, axis=1, keepdims=True), xp.asarray(1e-300, dtype=dtype, device=_device(f)))
    basis = legendre_basis(xp.astype(wave, dtype), degree)
    keep = positive
    for _ in range(niter):
        wk = xp.where(keep, wl, xp.zeros_like(wl))
        coef = batched_lstsq(basis, lnf, weights=wk, ridge=1e-12)
        model = _evaluate(coef, basis)
        resid = lnf - model
        norm = xp.sum(wk, axis=1, keepdims=True)
        sigma = xp.sqrt(xp.sum(wk * resid * resid, axis=1, keepdims=True) / xp.where(norm > 0, norm, 1.0))
        keep = positive & (resid > -clip_low * sigma) & (resid < clip_high * sigma)
    wk = xp.where(keep, wl, xp.zeros_like(wl))
    coef = batched_lstsq(basis, lnf, weights=wk, ridge=1e-12)
    return _exp_or_inf(_evaluate(coef, basis))


def _exp_or_inf(x):
    """exp(x) in float64, +inf where it overflows (a fit run wild over masked pixels), without the overflow."""
    xp = array_namespace(x)
    return xp.where(x > _LN_MAX, xp.inf, xp.exp(xp.minimum(x, _LN_MAX)))

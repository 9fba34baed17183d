"""Step 2: each star's template scaled to its broadband photometry.

:func:`scale_template_to_photometry` gives one scale per star from the star's
magnitudes and the synthetic magnitudes of its matched template — the FULL
template, shifted by the star's velocity, so a band reaching past the
observed range is integrated over its whole response. Bands in the Vega
system are compared through their AB offsets.

Shapes: template_flux (n_star, n_w) on the template grid ``wave`` (n_w,) Å,
erg/s/cm²/Å; photometry (n_star, n_band) magnitudes. Returns a
:class:`~gpucal.containers.PhotometricScale` of backend arrays.
"""

from __future__ import annotations

import math

from ..backends import array_namespace, backend_of, to_backend
from ..containers import Photometry, PhotometricScale
from ..photometry import synthetic_maggies, system_offsets

__all__ = ["scale_template_to_photometry", "LN10_04"]

#: d(flux)/flux per magnitude: 0.4 ln 10.
LN10_04 = 0.4 * math.log(10.0)


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

"""Instrument line-spread function: convolve templates to the frame's resolution.

The instrument FWHM is given in Å, either constant (``fwhm``), a polynomial in
wavelength with ascending coefficients (``fwhm_poly``: FWHM(λ) = c0 + c1 λ +
c2 λ² + …, λ in Å), or from a constant resolving power (``resolution``:
FWHM = λ / R). The template grid's own resolution is removed in quadrature.
On a log-uniform grid a constant FWHM in Å is a kernel whose width in pixels
shrinks towards the red; the kernel width is evaluated per pixel, so it varies
smoothly across the band with no chunks or steps.

Shapes: wave (n_w,) Å, log-uniform; flux (n_t, n_w); output (n_t, n_w).
"""

from __future__ import annotations

import math

from ..backends import array_namespace, gaussian_filter_variable
from ..errors import InputError

__all__ = ["instrument_fwhm", "convolve_to_instrument", "FWHM_TO_SIGMA"]

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def _check_lsf_args(fwhm, fwhm_poly, resolution):
    given = [a is not None for a in (fwhm, fwhm_poly, resolution)]
    if sum(given) != 1:
        raise InputError("give exactly one of --fwhm, --fwhm-poly or --resolution")
    if fwhm is not None and not (fwhm > 0 and math.isfinite(fwhm)):
        raise InputError(f"--fwhm must be a positive number of Å, got {fwhm!r}")
    if resolution is not None and not (resolution > 0 and math.isfinite(resolution)):
        raise InputError(f"--resolution must be a positive λ/Δλ, got {resolution!r}")
    if fwhm_poly is not None and (len(fwhm_poly) == 0 or not all(math.isfinite(c) for c in fwhm_poly)):
        raise InputError(f"--fwhm-poly needs finite coefficients, got {fwhm_poly!r}")


def instrument_fwhm(wave, *, fwhm=None, fwhm_poly=None, resolution=None):
    """FWHM in Å at each wavelength (same namespace as ``wave``)."""
    _check_lsf_args(fwhm, fwhm_poly, resolution)
    xp = array_namespace(wave)
    if fwhm is not None:
        return xp.full_like(wave, float(fwhm))
    if resolution is not None:
        return wave / float(resolution)
    out = xp.zeros_like(wave)
    for c in reversed(list(fwhm_poly)):  # Horner, ascending coefficients
        out = out * wave + float(c)
    return out


def convolve_to_instrument(wave, flux, *, fwhm=None, fwhm_poly=None, resolution=None,
                           template_fwhm: float = 0.0, truncate: float = 4.0):
    """Convolve spectra on a log-uniform grid with the instrument's Gaussian LSF.

    Raises InputError where the instrument FWHM is finer than the template's
    own resolution anywhere in ``wave`` (a deconvolution is never faked).
    """
    xp = array_namespace(wave, flux)
    n = wave.shape[0]
    dlnlam = (math.log(float(wave[n - 1])) - math.log(float(wave[0]))) / (n - 1)
    fw = instrument_fwhm(wave, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    eff2 = fw * fw - float(template_fwhm) ** 2
    # One host check at set-up time (not in a scan): refuse an LSF that is
    # negative or narrower than the template's own resolution.
    if not bool(xp.all(eff2 >= 0.0)):
        raise InputError(
            f"the instrument FWHM is below the template grid's own resolution ({template_fwhm} Å) "
            f"somewhere in {float(wave[0]):.1f}-{float(wave[n - 1]):.1f} Å"
        )
    sigma_pix = xp.sqrt(eff2) * FWHM_TO_SIGMA / (wave * dlnlam)
    half = int(math.ceil(truncate * float(xp.max(sigma_pix)))) if n else 0
    return gaussian_filter_variable(flux, sigma_pix, truncate=truncate, half_width=half)

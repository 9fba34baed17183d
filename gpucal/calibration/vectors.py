"""Step 3: per-star calibration vectors Cal(λ) = scaled model / observed counts.

* :func:`shift_to_observed` — rest-frame spectra to the observed frame of each
  star's radial velocity (relativistic Doppler factor);
* :func:`calibration_vectors` — Cal(λ) = scale · (template ⊗ LSF)(λ/(1+z)) /
  counts, with its variance σ²(Cal) = C̄al² (σ²_obs / C̄² + (σ_s/s)²) from the
  expected counts C̄ = model / C̄al (C̄al: Cal's running mean) and the mask of
  pixels where it is measured.

Shapes: observed (n_star, n_pix) counts on ``wave_obs`` (n_pix,) Å or each on
its own wavelengths (n_star, n_pix) Å; templates
(n_star, n_w) erg/s/cm²/Å on ``wave_t`` (n_w,) Å. Cal in erg/s/cm²/Å per count.
"""

from __future__ import annotations

from ..backends import array_namespace, interp
from ..containers import CalibrationVectors
from ..fitting import TELLURIC_DEFAULT, convolve_fwhm, convolve_to_instrument, fwhm_on_grid, region_mask
from ..fitting.masks import running_mean
from ..units import doppler_factor

__all__ = ["shift_to_observed", "calibration_vectors"]


def shift_to_observed(wave, flux, rv, *, wave_out=None):
    """Rest-frame spectra (n, n_w) on ``wave`` -> observed frame at ``wave_out`` (default ``wave``).

    F_obs(λ) = F_rest(λ / (1+z)); outside the rest grid the result is NaN.
    """
    xp = array_namespace(wave, flux, rv)
    wave_out = wave if wave_out is None else wave_out
    # wave_out (n_pix,) shared, or (n, n_pix): each star at its own wavelengths
    x = (wave_out if wave_out.ndim == 2 else wave_out[None, :]) / doppler_factor(rv)[:, None]
    return interp(x, wave, flux, left=xp.nan, right=xp.nan)


#: Pixels of the running mean of Cal whose expected counts give each pixel's variance.
VAR_WINDOW = 31


def calibration_vectors(wave_obs, flux, var, mask, wave_t, template_flux, rv, scale, scale_err, *,
                        fwhm=None, fwhm_poly=None, resolution=None, template_fwhm=0.0,
                        mask_regions=TELLURIC_DEFAULT, fwhm_star=None, keep_bands=False) -> CalibrationVectors:
    """Cal(λ) = scale · (template ⊗ LSF)(λ / (1+z)) / observed, per star.

    flux, var, mask : (n_star, n_pix) observed standards (counts); NaN flux
    is a bad pixel. template_flux : (n_star, n_w) rest-frame templates on
    ``wave_t``. Pixels are good where the observed pixel is good and
    positive, the model is finite and positive, and outside ``mask_regions``.
    σ²(Cal) = C̄al² (σ²_obs / C̄² + (σ_s / s)²), C̄al the 31-pixel running mean of Cal and
    C̄ = model / C̄al the expected counts (not the noisy ones, whose Cal² σ²/C² would weigh a
    pixel that fluctuated high as C⁴ in any weighted combination). ``wave_obs`` may be per star
    (n_star, n_pix); ``fwhm_star`` (n_star, n_pix), each star's LSF FWHM (Å) at
    its pixels, replaces fwhm / fwhm_poly / resolution (each template convolved
    with its own star's LSF, :func:`~gpucal.fitting.lsf.fwhm_on_grid`).

    keep_bands : the star is fitted outside ``mask_regions`` as always, and inside them
    the vectors keep the absorption for the telluric correction
    (:mod:`gpucal.calibration.telluric`): ``resp`` = observed / model (1/Cal, also where
    the counts are ≤ 0), σ²(resp) = σ²_obs / model² + resp² (σ_s / s)², and ``band``.
    """
    xp = array_namespace(flux, template_flux)
    if fwhm_star is not None:
        conv = convolve_fwhm(wave_t, template_flux, fwhm_on_grid(wave_t, wave_obs, fwhm_star),
                             template_fwhm=template_fwhm)
    else:
        conv = convolve_to_instrument(wave_t, template_flux, fwhm=fwhm, fwhm_poly=fwhm_poly,
                                      resolution=resolution, template_fwhm=template_fwhm)
    model = shift_to_observed(wave_t, conv, rv, wave_out=wave_obs) * scale[:, None]
    valid = mask & xp.isfinite(flux) & xp.isfinite(var) & (var > 0) & xp.isfinite(model) & (model > 0)
    outside = region_mask(wave_obs, mask_regions)  # (n_pix,) or per star (n_star, n_pix)
    good = valid & (flux > 0) & outside
    safe_flux = xp.where(good, flux, 1.0)
    cal = xp.where(good, model / safe_flux, xp.nan)
    frac_s = ((scale_err / scale) ** 2)[:, None]
    # σ² from the expected counts model / Cal_smooth, not the noisy ones: Cal² σ²/C² of the counts
    # themselves grows as C⁻⁴, so a pixel that fluctuates high would weigh more and pull a weighted
    # combination low (−0.1 % at S/N 50, bench/forward_accuracy.py)
    cal_s = xp.where(good, running_mean(cal, good, VAR_WINDOW)[0], cal)
    expected = xp.where(good, model / cal_s, 1.0)
    frac = xp.where(good, var / (expected * expected), xp.nan) + frac_s
    vec = CalibrationVectors(wave=wave_obs, cal=cal, var=cal_s * cal_s * frac, mask=good)
    if keep_bands:
        inside = valid & ~outside
        safe_model = xp.where(inside, model, 1.0)
        resp = xp.where(inside, flux / safe_model, xp.nan)
        vec.resp, vec.band = resp, ~outside
        vec.resp_var = xp.where(inside, var / (safe_model * safe_model), xp.nan) + resp * resp * frac_s
    return vec

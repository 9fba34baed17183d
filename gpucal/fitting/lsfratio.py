"""Each star's own LSF in the continuous fit: its template on its own LSF over the same on the representative one.

Step between the passes of the forward-model fit (:mod:`gpucal.fitting.forward`)
when the frame gives an LSF per fibre and pixel. The fit's working grid is
convolved once, with one representative LSF (the standards' median), so the
fit models every star as P·S_rep(θ). After a pass at (θ_i, v_i) each star's

    R_i(λ) = [T(θ_i) ⊗ LSF_i](λ / D(v_i)) / [T(θ_i) ⊗ LSF_rep](λ / D(v_i))

on its own pixels (T(θ_i) the fitted rest-frame template on the full-range
grid, :func:`~gpucal.fitting.forward.fitted_templates`; D the Doppler factor)
divides that star's counts and variance (:func:`divide_ratio`, as
:func:`~gpucal.fitting.forward.divide_shape` does for the common shape). The
next pass then fits P·S_rep(θ)·R_i ≈ P·S_i(θ), exact at θ_i and to first
order in θ − θ_i: the line depths the star's own LSF gives no longer trade
against gravity and metallicity. Two template rows are convolved per star
(its own LSF and the representative one), never the grid.

Where R is taken (the pipeline, ``_fit``): at the node refinement's answer
(already on each star's own LSF) before the first pass, and again at the first
pass's before the second. Measured on the ±40 % frame of
tests/test_perfibre.py (seed 3, the fibre 34 % under the median): R only after
a first pass on the representative LSF leaves logg 0.039 dex and Teff 36 K
off (a third pass: 0.008, 13 K); R first at the node
refinement, with no extra pass: 0.003, 5 K (bench/perfibre_lsf.py --fit).

Shapes: template_flux (n_star, n_w) on wave_t (n_w,) Å, log-uniform;
wave_obs (n_pix,) or (n_star, n_pix) Å; rv (n_star,) km/s; fwhm_star
(n_star, n_pix) Å at each star's pixels; ratio (n_star, n_pix), 1 where it is
undefined (beyond the template grid, a non-positive model).
"""

from __future__ import annotations

import dataclasses

from ..backends import array_namespace, backend_of, interp
from ..containers import MatchResult, SpectraBatch, TemplateGrid
from ..units import doppler_factor
from .forward import fitted_templates
from .lsf import convolve_fwhm, convolve_to_instrument, fwhm_on_grid, instrument_fwhm
from .prepare import _grid_window

__all__ = ["lsf_ratio", "divide_ratio", "on_own_lsf"]


def on_own_lsf(spectra: SpectraBatch, grid: TemplateGrid, fit: MatchResult, fwhm_star, *, fwhm=None,
               fwhm_poly=None, resolution=None) -> SpectraBatch:
    """The standards divided by R_i at ``fit``'s (θ, v) (module docstring), for the fit's next pass.

    ``grid`` the full-range rest-frame grid (host, possibly memory-mapped: only each star's
    corner rows are read, and only the window its pixels need is convolved); ``fwhm`` /
    ``fwhm_poly`` / ``resolution`` the fit's one LSF.
    """
    be = backend_of(spectra.flux)
    xp = be.xp
    # the rest-frame range the stars' pixels see, six σ of the broadest LSF beyond (the grid's window)
    d = doppler_factor(fit.rv)
    span = xp.stack([xp.min(spectra.wave) / xp.max(d), xp.max(spectra.wave) / xp.min(d)])
    rep = instrument_fwhm(span, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    widest = float(xp.maximum(xp.max(fwhm_star), xp.max(rep)))
    wave_t, i0, i1 = _grid_window(grid, span, be, fwhm=widest, fwhm_poly=None, resolution=None)
    ratio = lsf_ratio(wave_t, fitted_templates(grid.flux, fit)[:, i0:i1], spectra.wave, fit.rv, fwhm_star,
                      fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution, template_fwhm=grid.resolution_fwhm)
    return divide_ratio(spectra, ratio)


def lsf_ratio(wave_t, template_flux, wave_obs, rv, fwhm_star, *, fwhm=None, fwhm_poly=None, resolution=None,
              template_fwhm=0.0):
    """R_i on each star's pixels (module docstring): (n_star, n_pix).

    ``fwhm`` / ``fwhm_poly`` / ``resolution``: the representative LSF the fit's grid
    was convolved with (exactly one); ``template_fwhm``: the grid's own resolution.
    """
    xp = array_namespace(template_flux, fwhm_star)
    flux = xp.astype(template_flux, xp.float64)
    own = convolve_fwhm(wave_t, flux, fwhm_on_grid(wave_t, wave_obs, fwhm_star), template_fwhm=template_fwhm)
    rep = convolve_to_instrument(wave_t, flux, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution,
                                 template_fwhm=template_fwhm)
    x = (wave_obs if wave_obs.ndim == 2 else wave_obs[None, :]) / doppler_factor(rv)[:, None]
    num = interp(x, wave_t, own, left=xp.nan, right=xp.nan)
    den = interp(x, wave_t, rep, left=xp.nan, right=xp.nan)
    ok = xp.isfinite(num) & xp.isfinite(den) & (num > 0) & (den > 0)
    return xp.where(ok, num / xp.where(ok, den, 1.0), 1.0)


def divide_ratio(spectra: SpectraBatch, ratio) -> SpectraBatch:
    """The standards with each star's ``ratio`` (n_star, n_pix) divided out of its counts and variance."""
    return dataclasses.replace(spectra, flux=spectra.flux / ratio, var=spectra.var / (ratio * ratio))

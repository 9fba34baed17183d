"""The refinement on each star's own LSF, after a scan on one representative LSF.

Step of the mission between the grid scan (:mod:`.scan`, one LSF for every
star: the prepared grid) and the vectors, used when the frame gives an LSF per
fibre and pixel. The scan's best node and velocity stand; the Gauss–Newton
step in (Teff, logg, [M/H], [α/M]) (:func:`.refine.refine_parameters`) is
redone with each star's node and grid neighbours convolved with that star's
own FWHM(λ) (:func:`.lsf.convolve_fwhm`), resampled to the working grid and
continuum-normalised as :func:`.prepare.prepare_grid` does. A star whose LSF
is far from the representative one otherwise trades line depth for
metallicity and gravity (measured: [M/H] −0.17 instead of 0 for a fibre 50 %
broader than the median, and a vector 1 % off at the lines).

Shapes: standards (n_star, n_pix) on (n_pix,) or (n_star, n_pix) Å;
fwhm_star (n_star, n_pix) Å; the grid (n_t, n_w) on the host; the working
grid (n_q,). Only 1 + 2·4 template rows per star are convolved.
"""

from __future__ import annotations

import dataclasses

from ..backends import backend_of, interp, to_backend, to_numpy
from ..containers import MatchResult, PreparedGrid, TemplateGrid
from .continuum import fit_continuum
from .lsf import convolve_fwhm, fwhm_on_grid
from .masks import TELLURIC_DEFAULT, region_mask
from .prepare import _grid_window, grid_neighbours, normalise_observed
from .refine import refine_parameters

__all__ = ["refine_on_own_lsf"]


def refine_on_own_lsf(grid: TemplateGrid, prepared: PreparedGrid, spectra, match: MatchResult, fwhm_star, *,
                      good_regions=TELLURIC_DEFAULT, continuum_degree: int = 7) -> MatchResult:
    """``match`` with its parameters, errors and blend refined on each star's own LSF ``fwhm_star`` (n_star, n_pix)."""
    be = backend_of(spectra.flux)
    xp = be.xp
    if int(prepared.norm_flux.shape[0]) < 2:
        return match
    wq = prepared.wave
    cw, i0, i1 = _grid_window(grid, wq, be, fwhm=float(xp.max(fwhm_star)), fwhm_poly=None, resolution=None)
    fw_grid = fwhm_on_grid(cw, spectra.wave, fwhm_star)  # (n_star, n_cw)
    weights = xp.astype(region_mask(wq, good_regions), xp.float64)[None, :]
    n_star, n_cw = fw_grid.shape

    def own_rows(idx):
        """Template rows ``idx`` (n_star·k,), star-major, each convolved with its star's LSF: (n_star·k, n_q)."""
        k = idx.shape[0] // n_star
        flux = to_backend(grid.flux[to_numpy(idx), i0:i1], be, dtype=xp.float64)  # host grid: only these rows
        fw = xp.reshape(xp.broadcast_to(fw_grid[:, None, :], (n_star, k, n_cw)), (n_star * k, n_cw))
        tq = interp(wq, cw, convolve_fwhm(cw, flux, fw, template_fwhm=grid.resolution_fwhm))
        return tq / fit_continuum(wq, tq, xp.broadcast_to(weights, tq.shape), degree=continuum_degree)

    dn, wn, good = normalise_observed(spectra, good_regions=good_regions, continuum_degree=continuum_degree)
    params = to_backend(prepared.params, be, dtype=xp.float64)
    neighbours = prepared.neighbours if prepared.neighbours is not None else grid_neighbours(params)
    red = match.chi2 / xp.astype(xp.maximum(match.dof, 1), xp.float64)
    p, err, toward, frac = refine_parameters(spectra.wave, dn, wn, good, wq, own_rows, match.index, match.rv,
                                             neighbours, params, red)
    meta = {**match.meta, "blend_index": toward, "blend_frac": frac, "refined_on": "own LSF"}
    return dataclasses.replace(match, params=p, params_err=err, meta=meta)

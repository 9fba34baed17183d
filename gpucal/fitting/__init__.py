"""The fitting room: templates matched to the observed standards.

Modules (the order data flows through them):

* :mod:`~gpucal.fitting.lsf` — instrument and template resolution; the
  templates convolved to the instrument's line-spread function;
* :mod:`~gpucal.fitting.continuum` — batched continuum normalisation
  (clipped Legendre fit to ln flux);
* :mod:`~gpucal.fitting.tellurics` — the telluric bands (and, later, their
  correction);
* :mod:`~gpucal.fitting.masks` — pixels left out: wavelength regions,
  single-pixel outliers, capped weights;
* :mod:`~gpucal.fitting.prepare` — the working grid, the prepared
  (convolved, resampled, normalised) template grid, the normalised
  standards, the trial velocities;
* :mod:`~gpucal.fitting.scan` — the grid scan: every (star, template,
  velocity) scored by χ², candidates re-scored by Huber, the best node and
  velocity;
* :mod:`~gpucal.fitting.refine` — around the best node: χ² on the frame's
  pixels, one Gauss–Newton step in the grid parameters, the blended template;
* :mod:`~gpucal.fitting.cells` / :mod:`~gpucal.fitting.forward` — the continuous
  forward-model fit after the scan: counts = P(λ)·S(θ, v), θ interpolated in the
  grid's complete cells, P a Legendre series solved inside, photometry in χ²;
* :mod:`~gpucal.fitting.lsfratio` — a per-fibre LSF in that fit: each star's
  counts over its template on its own LSF / on the fit's one, between passes.

Other rooms import from here (``from ..fitting import match_templates``),
not from the modules, so the modules may be cut differently later.
"""

from .continuum import fit_continuum, legendre_basis
from .perstar import refine_on_own_lsf
from .lsf import (
    convolve_fwhm,
    convolve_to_instrument,
    fwhm_from_resolution,
    fwhm_on_grid,
    instrument_fwhm,
    representative_fwhm_poly,
    parse_resolution_spec,
    resolution_spec,
    template_fwhm_at,
)
from .masks import cap_local_weights, local_outliers, parse_regions, region_mask
from .prepare import (
    gather_templates,
    grid_neighbours,
    normalise_observed,
    prepare_grid,
    velocity_grid,
    working_grid,
)
from .refine import refined_templates
from .scan import match_templates, memory_budget
from .cells import CellGrid, cell_grid
from .forward import (
    FIT_DEGREE,
    FIT_OVERSAMPLE,
    PhotometricTerm,
    common_shape,
    divide_shape,
    fit_forward,
    fit_grid,
    fit_wave,
    fitted_templates,
    with_node_fallback,
    poly_on_pixels,
)
from .lsfratio import divide_ratio, lsf_ratio, on_own_lsf
from .tellurics import TELLURIC_BANDS, TELLURIC_DEFAULT

__all__ = [
    # lsf
    "convolve_to_instrument",
    "convolve_fwhm",
    "representative_fwhm_poly",
    "fwhm_on_grid",
    "fwhm_from_resolution",
    "refine_on_own_lsf",
    "instrument_fwhm",
    "resolution_spec",
    "parse_resolution_spec",
    "template_fwhm_at",
    # continuum
    "fit_continuum",
    "legendre_basis",
    # tellurics and masks
    "TELLURIC_BANDS",
    "TELLURIC_DEFAULT",
    "parse_regions",
    "region_mask",
    "local_outliers",
    "cap_local_weights",
    # prepare
    "working_grid",
    "velocity_grid",
    "prepare_grid",
    "grid_neighbours",
    "normalise_observed",
    "gather_templates",
    # scan
    "match_templates",
    "memory_budget",
    # refine
    "refined_templates",
    # the continuous fit
    "CellGrid",
    "cell_grid",
    "FIT_DEGREE",
    "FIT_OVERSAMPLE",
    "PhotometricTerm",
    "fit_wave",
    "fit_grid",
    "fit_forward",
    "common_shape",
    "divide_shape",
    "fitted_templates",
    "with_node_fallback",
    "poly_on_pixels",
    "lsf_ratio",
    "divide_ratio",
    "on_own_lsf",
]

"""The calibration room: steps 2–5 of the mission, batched over stars and pixels.

* :mod:`.scale` — each star's template scaled to its photometry;
* :mod:`.vectors` — per-star vectors Cal(λ) = scaled model / observed counts;
* :mod:`.verdicts` — each star used, or why not, decided once;
* :mod:`.combine` — the robust combination of the per-star vectors;
* :mod:`.resample` — per-fibre wavelengths: per-star vectors onto one grid, the
  combined vector back to every fibre's own wavelengths;
* :mod:`.telluric` — the telluric part of the combined vector, measured by the standards;
* :mod:`.apply` — the combined vector applied to every fibre.
* :mod:`.apply` — the combined vector applied to every fibre;
* :mod:`.maskbits` — the output frame's MASK bits, and the QA's AB zeropoints and binned residuals.
"""

from .apply import apply_flux_calibration
from .combine import combine_calibration_vectors, fill_masked, star_outliers
from .resample import cal_at_fibres, common_grid, to_common_grid
from .maskbits import MASK_BITS, binned_residuals, mask_bits, mask_counts, zeropoint_ab
from .scale import scale_template_to_photometry
from .vectors import calibration_vectors, shift_to_observed

__all__ = [
    "scale_template_to_photometry",
    "shift_to_observed",
    "calibration_vectors",
    "star_outliers",
    "combine_calibration_vectors",
    "fill_masked",
    "apply_flux_calibration",
    "common_grid",
    "to_common_grid",
    "cal_at_fibres",
    "MASK_BITS",
    "mask_bits",
    "mask_counts",
    "zeropoint_ab",
    "binned_residuals",
]

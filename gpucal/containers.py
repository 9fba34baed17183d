"""Batch-first containers passed between gpucal's steps.

Arrays keep whatever namespace and device they were created on; shapes are
explicit (the fibre/star axis is always axis 0 and is never guessed).
Units: wavelengths in Å, flux densities in erg/s/cm²/Å (templates,
calibrated spectra) or detector counts (observed spectra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SpectraBatch",
    "TemplateGrid",
    "Photometry",
    "MatchResult",
    "CalibrationVectors",
    "FluxCalibrationResult",
    "PARAM_NAMES",
]

PARAM_NAMES = ("teff", "logg", "mh", "alpha")


@dataclass
class SpectraBatch:
    """Observed spectra of several fibres on one wavelength grid.

    wave : (n_pix,) Å, strictly increasing.
    flux, var : (n_spec, n_pix) counts and counts²; NaN flux marks a bad pixel.
    mask : (n_spec, n_pix) bool, True = good pixel.
    fibre_ids : (n_spec,) int host array, 1-based fibre numbers in the frame.
    names : tuple of str, one per spectrum.
    medium : "air" or "vacuum" (of ``wave``).
    """

    wave: Any
    flux: Any
    var: Any
    mask: Any
    fibre_ids: Any
    names: tuple
    medium: str = "air"

    @property
    def n_spec(self) -> int:
        return int(self.flux.shape[0])

    @property
    def n_pix(self) -> int:
        return int(self.flux.shape[1])


@dataclass
class TemplateGrid:
    """A stellar template grid on one log-uniform wavelength grid.

    params : (n_t, 4) host float array [Teff K, logg, [M/H], [α/M]].
    wave : (n_w,) Å, constant Δlnλ.
    flux : (n_t, n_w) surface flux density, erg/s/cm²/Å (unconvolved, full range:
        synthetic photometry is done on this).
    continuum : (n_t, n_w) the model's line-free continuum, or None.
    medium : "air" or "vacuum" (of ``wave``).
    resolution_fwhm : FWHM in Å of the grid's own line spread (0 = infinitely sharp),
        used in quadrature when convolving to the instrument.
    meta : free-form provenance (source, hash, ...).
    """

    params: Any
    wave: Any
    flux: Any
    continuum: Any = None
    medium: str = "air"
    resolution_fwhm: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def n_templates(self) -> int:
        return int(self.flux.shape[0])

    @property
    def dlnlam(self) -> float:
        import math

        n = int(self.wave.shape[0])
        return math.log(float(self.wave[n - 1]) / float(self.wave[0])) / (n - 1)


@dataclass
class Photometry:
    """Broadband magnitudes of a batch of stars (host NumPy arrays).

    names : tuple of str, one per star (aligned with the standards' order).
    bands : tuple of str, speclite filter names (e.g. "sdss2010-r" style names
        are resolved by :mod:`gpucal.photometry`).
    mag, err : (n_star, n_band) float; NaN where missing.
    valid : (n_star, n_band) bool.
    system : tuple of "AB" or "Vega", one per band.
    """

    names: tuple
    bands: tuple
    mag: Any
    err: Any
    valid: Any
    system: tuple = ()


@dataclass
class MatchResult:
    """Best template and velocity for each star (arrays on the backend).

    index : (n_star,) int, index of the best grid node.
    params : (n_star, 4) refined [Teff, logg, [M/H], [α/M]].
    params_err : (n_star, 4) 1-σ errors from the χ² curvature.
    rv, rv_err : (n_star,) km/s.
    chi2 : (n_star,) best χ²; dof : (n_star,) degrees of freedom.
    template_flux : (n_star, n_w) the template used downstream (refined,
        unconvolved, on the grid's wavelengths, rest frame).
    """

    index: Any
    params: Any
    params_err: Any
    rv: Any
    rv_err: Any
    chi2: Any
    dof: Any
    template_flux: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class CalibrationVectors:
    """Per-star calibration vectors Cal(λ) = scaled template / observed.

    wave : (n_pix,) Å; cal, var : (n_star, n_pix) (erg/s/cm²/Å per count);
    mask : (n_star, n_pix) bool True = good.
    """

    wave: Any
    cal: Any
    var: Any
    mask: Any


@dataclass
class FluxCalibrationResult:
    """The combined calibration and what went into it.

    cal, var : (n_pix,) combined vector and its variance.
    measured : (n_pix,) bool, True where standards measured the vector;
        False where it was interpolated from the smooth throughput on either
        side (telluric bands, pixels no standard covers) and flagged.
    used : (n_star,) bool, stars that entered the combination.
    reasons : list of str, why each star was excluded ("" if used).
    residuals : (n_star, n_pix) (Cal_star − Cal) / Cal where both are good, else NaN.
    summary : dict of host scalars for reports.
    """

    wave: Any
    cal: Any
    var: Any
    measured: Any
    used: Any
    reasons: list
    residuals: Any
    summary: dict = field(default_factory=dict)

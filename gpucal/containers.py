"""Batch-first containers passed between gpucal's steps.

Arrays keep whatever namespace and device they were created on; shapes are
explicit (the fibre/star axis is always axis 0 and is never guessed).
Units: wavelengths in Å, flux densities in erg/s/cm²/Å (templates,
calibrated spectra) or detector counts (observed spectra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # annotations only: importing astropy here would slow every command's start
    from astropy.io import fits
    from astropy.table import Table

__all__ = [
    "SpectraBatch",
    "TemplateGrid",
    "Photometry",
    "MatchResult",
    "CalibrationVectors",
    "FluxCalibrationResult",
    "PARAM_NAMES",
    "Frame",
    "CalibratedFrame",
    "PreparedGrid",
    "ColourTeffRelation",
    "CalibrationOutput",
    "DemoFrame",
    "FrameRecord",
    "BatchResult",
    "PhotometricScale",
]

PARAM_NAMES = ("teff", "logg", "mh", "alpha")


class _FibreAxes:
    """``n_fibre`` and ``n_pix`` of a frame whose ``flux`` is (n_fibre, n_pix)."""

    @property
    def n_fibre(self) -> int:
        return int(self.flux.shape[0])

    @property
    def n_pix(self) -> int:
        return int(self.flux.shape[1])


@dataclass
class SpectraBatch(_FibreAxes):
    """Observed spectra of several fibres, on one wavelength grid or each on its own.

    wave : (n_pix,) Å, strictly increasing; or (n_spec, n_pix), each spectrum on
        its own wavelengths (per-fibre solutions), every row strictly increasing.
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
        return self.n_fibre


@dataclass(eq=False)  # compared and hashed by identity: per-grid products are cached by grid
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
    resp, resp_var, band : kept for the telluric correction (None when the bands are
        masked): resp = observed / scaled model (counts per erg/s/cm²/Å, 1/Cal) at each
        star's good pixels inside the telluric bands (NaN elsewhere, flux ≤ 0 kept), its
        variance, and band (n_pix,) bool, the pixels inside the bands.
    """

    wave: Any
    cal: Any
    var: Any
    mask: Any
    resp: Any = None
    resp_var: Any = None
    band: Any = None


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


def _fibre_types(fibres) -> np.ndarray:
    """TYPE column of a fibre table, decoded, stripped and upper-cased (str array)."""
    vals = [v.decode("ascii", "replace") if isinstance(v, bytes) else str(v) for v in np.asarray(fibres["TYPE"])]
    return np.array([v.strip().upper() for v in vals], dtype=str)


@dataclass
class Frame(_FibreAxes):
    """A reduced fibre frame on the host.

    path : the file it was read from ("" for one built in memory).
    flux, var : (n_fibre, n_pix) native float64; fibre axis 0 (image NAXIS2).
    wave : (n_pix,) float64 Å, strictly increasing, shared by every fibre; or
        (n_fibre, n_pix) when the fibres carry their own wavelength solutions
        (each row strictly increasing; rows that agree to 1e-6 Å are read as one grid).
    fibres : astropy Table, one row per fibre (row i = fibre number i + 1).
    header : copy of the primary header as read.
    medium : "air" or "vacuum" (of ``wave``).
    flipped : True when the file's wavelengths decrease along the pixel axis
        and the pixel axis was reversed on reading.
    wave_source : "WAVELA" or "wcs", where the wavelengths came from.
    wave_ndim : 1 or 2, the dimensionality of the input WAVELA (1 for wcs).
    ext_headers : copies of the VARIANCE (and WAVELA, LSF) extension headers,
        reused by the writer for their non-structural cards.
    layout : ``"gpucal"`` or ``"desi"``, the layout it was read in (the writer
        writes the calibrated frame back in it; docs/layouts.md).
    medium_stated : False when no header said air or vacuum (``medium`` is then
        air until ``calibrate_frame(medium=...)`` says otherwise, with a warning).
    resolution : DESI's RESOLUTION (n_fibre, n_diag, n_pix) as read, or None.
    layout_extras : what a layout's writer needs back (its HDUs, headers, tables).
    lsf_fwhm : the instrument's line-spread FWHM in Å, (n_fibre, n_pix) per fibre
        and pixel or (n_pix,) for all fibres, on ``wave``; None when the frame has none.
    extra_hdus : the input's extensions gpucal does not know, as (EXTNAME, raw
        bytes of header and data) in file order, carried unchanged into the output.
    """

    path: str
    flux: np.ndarray
    var: np.ndarray
    wave: np.ndarray
    fibres: Table
    header: fits.Header
    medium: str = "air"
    flipped: bool = False
    wave_source: str = "WAVELA"
    wave_ndim: int = 1
    ext_headers: dict = field(default_factory=dict)
    # issue 15 (layouts): the layout it came in, whether the medium was stated, DESI's RESOLUTION
    layout: str = "gpucal"
    medium_stated: bool = True
    resolution: Any = None
    layout_extras: dict = field(default_factory=dict)
    lsf_fwhm: Any = None
    extra_hdus: tuple = ()

    @property
    def fibre_types(self) -> np.ndarray:
        """TYPE of every fibre, stripped and upper-cased (str array)."""
        return _fibre_types(self.fibres)

    @property
    def standards(self) -> np.ndarray:
        """Row indices (0-based, int) of the standard-star fibres (TYPE 'C')."""
        return np.flatnonzero(self.fibre_types == "C").astype(np.intp)

    @property
    def fibre_numbers(self) -> np.ndarray:
        """1-based fibre numbers of all rows (row index + 1)."""
        return np.arange(1, self.n_fibre + 1, dtype=np.int64)

    @property
    def names(self) -> tuple:
        """NAME of every fibre (stripped), or 'fibre N' where there is no NAME column."""
        if "NAME" in self.fibres.colnames:
            return tuple(str(v).strip() for v in self.fibres["NAME"])
        return tuple(f"fibre {i}" for i in self.fibre_numbers)


@dataclass
class CalibratedFrame:
    """What :func:`read_calibrated_frame` returns.

    flux, var, wave, fibres, header, flipped : as in :class:`Frame`.
    cal : the ``FLUXCAL`` table (WAVE, CAL, CAL_VAR, MEASURED).
    per_star : the ``FLUXSTD`` table, or None when the file has none.
    """

    path: str
    flux: np.ndarray
    var: np.ndarray
    wave: np.ndarray
    fibres: Table
    header: fits.Header
    cal: Table
    per_star: Table | None
    medium: str = "air"
    flipped: bool = False


@dataclass
class PreparedGrid:
    """A template grid convolved, resampled and normalised for one frame setting.

    params : (n_t, 4) backend array; wave : (n_q,) log-uniform working grid (Å);
    norm_flux : (n_t, n_q) continuum-normalised, LSF-convolved templates, on
        the backend or a host (memory-mapped) array streamed block by block;
    lsf : the instrument resolution used (dict of fwhm / fwhm_poly / resolution);
    neighbours : (n_t, 4, 2) grid topology from :func:`grid_neighbours`, or None.
    """

    params: Any
    wave: Any
    norm_flux: Any
    lsf: dict = field(default_factory=dict)
    neighbours: Any = None

    @property
    def n_templates(self) -> int:
        return int(self.norm_flux.shape[0])


@dataclass(frozen=True)
class ColourTeffRelation:
    """Teff as a function of one colour, fitted to a template grid's synthetic colours.

    bands : (blue, red) speclite names; the colour is ``m_blue − m_red``.
    systems : their systems ("AB"/"Vega"), as the photometry it applies to.
    coeffs : ascending polynomial coefficients of θ = 5040 K / Teff in the colour.
    colour_range, teff_range : the span of the fitted grid nodes.
    scatter : fractional rms of Teff about the fit over the grid (gravity and
        metallicity spread at fixed colour), the relation's own error.
    excess_per_ebv : E(colour)/E(B−V) of the grid's spectra under the default
        extinction law (F99, R_V = 3.1), for dereddening.
    source : what the relation was fitted to.
    """

    bands: tuple
    systems: tuple
    coeffs: tuple
    colour_range: tuple
    teff_range: tuple
    scatter: float
    excess_per_ebv: float
    source: str

    @property
    def name(self) -> str:
        return f"{self.bands[0]} - {self.bands[1]}"

    def __call__(self, colour):
        """(teff, dteff/dcolour) at ``colour`` (host arrays); colours outside the fitted range are clipped."""
        poly = np.polynomial.Polynomial(self.coeffs)
        c = np.clip(np.asarray(colour, dtype=np.float64), *self.colour_range)
        theta = poly(c)
        return 5040.0 / theta, -5040.0 * poly.deriv()(c) / theta**2


@dataclass
class CalibrationOutput:
    """What calibrate_frame returns (host NumPy arrays)."""

    flux: np.ndarray
    var: np.ndarray
    wave: np.ndarray
    cal: np.ndarray
    cal_var: np.ndarray
    measured: np.ndarray
    per_star: Table
    summary: dict
    star_cal: np.ndarray = None  # (n_star, n_pix) per-star vectors, for QC
    star_mask: np.ndarray = None
    out_path: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class DemoFrame(_FibreAxes):
    """A simulated reduced fibre frame and its truth (host NumPy / astropy).

    wave : (n_pix,) Å, air, linear in λ.
    flux, var : (n_fibre, n_pix) detector counts and their true variance
        (``counts_true + read_noise²``; ``flux`` = counts_true + Gaussian noise).
    fibres : astropy Table FIBRE (1-based), NAME, TYPE ('C' standard, 'P' program,
        'S' sky), RA, DEC (deg), in frame row order.
    catalogue : astropy Table name, ra, dec, g, dg, r, dr, i, di, z, dz (Pan-STARRS AB)
        for the standards, in standard order (STD001, STD002, ...).
    truth : dict (see :func:`simulate_frame`).
    """

    wave: np.ndarray
    flux: np.ndarray
    var: np.ndarray
    fibres: Any
    catalogue: Any
    truth: dict = field(default_factory=dict)
    medium: str = "air"


@dataclass
class FrameRecord:
    """The outcome of one frame (host data only).

    ``wave``, ``cal``, ``cal_var`` (n_pix,) float64 and ``measured`` (n_pix,)
    bool are the frame's combined vector (Å; erg/s/cm²/Å per count), None when
    the frame failed. ``elapsed_s`` and ``cpu_s`` are the task's wall and
    process CPU time (CPU well below wall on a worker means it was starved).
    ``error``/``error_type`` are ``str(exc)`` and the
    exception's class name; ``traceback`` is kept for exceptions that are not
    GpucalError (a bug rather than bad input). ``worker`` names the process
    that ran it (host, pid, and how many template grids it has loaded).
    ``finished_unix`` is when the task ended (``time.time()`` on its worker; 0 when not run): a
    batch's steady rate after each worker's first frame is timed from these.
    """

    path: str
    ok: bool
    out_path: str | None = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    summary: dict | None = None
    wave: np.ndarray | None = None
    cal: np.ndarray | None = None
    cal_var: np.ndarray | None = None
    measured: np.ndarray | None = None
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    worker: dict = field(default_factory=dict)
    finished_unix: float = 0.0


@dataclass
class BatchResult:
    """What calibrate_frames returns: one record per input path, in input order,
    and the aggregate summary (the dict written as the batch JSON)."""

    records: list
    summary: dict
    summary_path: str | None = None
    panel_path: str | None = None

    @property
    def ok(self) -> list:
        return [r for r in self.records if r.ok]

    @property
    def failed(self) -> list:
        return [r for r in self.records if not r.ok]

    @property
    def n_ok(self) -> int:
        return len(self.ok)

    @property
    def n_failed(self) -> int:
        return len(self.failed)


@dataclass
class PhotometricScale:
    """Each star's template scaled to its photometry (backend arrays, star order).

    scale, scale_err : (n_star,) factor on the template flux and its 1-σ error;
        NaN where ``ok`` is False (never 1).
    n_bands : (n_star,) int, bands used.
    residual : (n_star, n_band) synthetic − observed magnitude after scaling
        (NaN for unused bands).
    synthetic : (n_star, n_band) unscaled synthetic magnitudes, each band in its
        own system (AB or Vega).
    covered : (n_band,) host bool, bands the template grid covers.
    ok : (n_star,) bool, False when the star has no usable band.
    """

    scale: Any
    scale_err: Any
    n_bands: Any
    residual: Any
    synthetic: Any
    covered: Any
    ok: Any

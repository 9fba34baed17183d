"""Operations the array API standard lacks (public, delegating module).

Each function infers the namespace from its inputs, routes to a native
implementation where one exists and agrees with the portable fallback
(scipy on NumPy, cupyx.scipy on CuPy), and otherwise runs the fallback in
``_agnostic`` written only in the standard. Contracts (shapes, units) are in
each docstring; they are the same on every backend.
"""

__all__ = [
    "interp",
    "masked_median",
    "gaussian_filter_variable",
    "savgol_filter",
    "fft_correlate",
    "batched_lstsq",
    "sigma_clip",
]


def interp(x, xp_grid, fp, *, left=None, right=None):
    """Piecewise-linear interpolation, batched over leading axes.

    x : (..., m) query points; xp_grid : (n,) strictly increasing;
    fp : (..., n) values. Leading axes of ``x`` and ``fp`` broadcast.
    left/right : None -> edge values of fp (numpy.interp semantics), or a float fill.
    Returns (broadcast(leading), m) in the floating dtype of fp.
    """
    raise NotImplementedError


def masked_median(x, mask, *, axis=-1):
    """Median of ``x`` over entries where ``mask`` is True along ``axis``; NaN where none."""
    raise NotImplementedError


def gaussian_filter_variable(flux, sigma_pix, *, truncate=4.0):
    """Gaussian smoothing whose σ (pixels) varies per output pixel.

    flux : (..., n); sigma_pix : (n,) σ of the kernel centred on each output
    pixel (0 -> identity). out[..., i] = Σ_j K_ij f[..., j] / Σ_j K_ij with
    K_ij = exp(-(j-i)² / 2σ_i²) for |j-i| <= ceil(truncate * max σ), j in range.
    """
    raise NotImplementedError


def savgol_filter(y, mask, *, window, polyorder, axis=-1):
    """Savitzky–Golay smoothing that ignores masked pixels and never un-masks them.

    Returns (smoothed, mask_out); mask_out = mask & enough good neighbours;
    where mask_out is False the output equals the input.
    """
    raise NotImplementedError


def fft_correlate(a, b, *, axis=-1):
    """scipy.signal.correlate(a, b, mode="full") along the last axis, batched, via FFT."""
    raise NotImplementedError


def batched_lstsq(A, b, *, weights=None, ridge=0.0):
    """Weighted least squares via normal equations and xp.linalg.solve.

    A : (n, k) shared or (..., n, k); b : (..., n); weights : (..., n) or None.
    Returns x : (..., k) minimising Σ w (A x - b)².
    """
    raise NotImplementedError


def sigma_clip(x, *, weights=None, mask=None, nsigma=3.0, maxiter=5, axis=0, center="mean"):
    """Iterative sigma clipping along ``axis``; returns the kept mask (same shape as x)."""
    raise NotImplementedError

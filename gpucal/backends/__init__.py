"""The array-namespace layer.

gpucal's numerical code is written once against the Python array API and
runs on whatever namespace its inputs live in. This package is the only
numerical code that names numpy, cupy, scipy or cupyx:

* backend selection and host/device transfers (``_select``);
* operations the array API standard lacks (``_ops``), each delegated to
  scipy (NumPy) or cupyx.scipy (CuPy) where they exist and agree, with a
  portable fallback written in the standard (``_agnostic``).

It lives at ``gpucal.backends`` rather than a top-level ``backends`` package,
which would collide with an unrelated PyPI distribution.
"""

from ._select import (
    BACKEND_NAMES,
    Backend,
    array_namespace,
    backend_of,
    get_backend,
    to_backend,
    to_numpy,
)
from ._ops import (
    batched_lstsq,
    fft_correlate,
    gaussian_filter_variable,
    interp,
    masked_median,
    savgol_filter,
    sigma_clip,
)

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "array_namespace",
    "backend_of",
    "get_backend",
    "to_backend",
    "to_numpy",
    "interp",
    "masked_median",
    "gaussian_filter_variable",
    "savgol_filter",
    "fft_correlate",
    "batched_lstsq",
    "sigma_clip",
]

"""gpucal: spectrophotometric flux calibration for fibre spectrographs.

Written once against the Python array API; runs on CuPy (GPU) or NumPy (CPU).
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    BackendError,
    CalibrationError,
    CoverageError,
    GpucalError,
    InputError,
    NoStandardsError,
    PhotometryError,
)

__all__ = [
    "__version__",
    "GpucalError",
    "BackendError",
    "InputError",
    "CoverageError",
    "NoStandardsError",
    "PhotometryError",
    "CalibrationError",
]

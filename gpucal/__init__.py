"""gpucal: spectrophotometric flux calibration for fibre spectrographs.

Written once against the Python array API; runs on CuPy (GPU) or NumPy (CPU).

The public API is re-exported here and imported on first use (PEP 562), so
``import gpucal`` and ``gpucal --help`` stay fast::

    from gpucal import calibrate_frame, get_backend
    res = calibrate_frame("frame.fits", photometry="stars.csv", fwhm=2.5)

Rooms (see docs/architecture.md): templates/ (grids), photometry/ (bands,
synthetic magnitudes, priors, catalogues), fitting/ (LSF, continuum, masks,
the grid scan), calibration/ (scale, vectors, verdicts, combination,
application), io/ (FITS in and out), report/ (tables, summaries, QC);
pipeline.py and distributed.py tell the story on one frame and on many.
"""

__version__ = "0.1.0"

import importlib

from .errors import (  # noqa: E402
    BackendError,
    CalibrationError,
    CorruptCacheError,
    CoverageError,
    GpucalError,
    InputError,
    NoStandardsError,
    PhotometryError,
    StaleCacheError,
)

#: Public name -> the module that defines it (imported lazily on first access).
_API = {
    "calibrate_frame": "gpucal.pipeline",
    "calibrate_frames": "gpucal.distributed",
    "load_templates": "gpucal.templates",
    "prepare_grid": "gpucal.fitting",
    "match_templates": "gpucal.fitting",
    "scale_template_to_photometry": "gpucal.calibration",
    "calibration_vectors": "gpucal.calibration",
    "combine_calibration_vectors": "gpucal.calibration",
    "apply_flux_calibration": "gpucal.calibration",
    "synthetic_mags": "gpucal.photometry",
    "get_backend": "gpucal.backends",
}

__all__ = [
    "__version__",
    *_API,
    "GpucalError",
    "BackendError",
    "InputError",
    "CoverageError",
    "NoStandardsError",
    "PhotometryError",
    "CalibrationError",
    "StaleCacheError",
    "CorruptCacheError",
]


def __getattr__(name):
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gpucal' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))

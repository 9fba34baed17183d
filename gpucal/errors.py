"""Errors raised by gpucal.

Every failure caused by the user's input or environment is a GpucalError
subclass whose message names what is wrong and where (file, HDU, fibre, star),
so the command line can print it as one line.
"""

__all__ = [
    "GpucalError",
    "BackendError",
    "InputError",
    "CoverageError",
    "NoStandardsError",
    "PhotometryError",
    "CalibrationError",
    "StaleCacheError",
    "CorruptCacheError",
    "AlreadyCalibratedError",
]


class GpucalError(Exception):
    """Base class of every error gpucal raises on purpose."""


class BackendError(GpucalError):
    """The requested array backend is not installed or has no usable device."""


class InputError(GpucalError, ValueError):
    """Input data (a file, an array, an argument) is malformed or inconsistent."""


class CoverageError(InputError):
    """A template grid or filter curve does not cover the wavelengths needed."""


class NoStandardsError(InputError):
    """A frame has no standard-star fibres, or none of them can be calibrated."""


class StaleCacheError(InputError):
    """A prepared template cache whose inputs changed after it was written."""


class CorruptCacheError(InputError):
    """A prepared template cache that itself changed after it was written.

    An array or the sidecar no longer matches its recorded SHA-256, the
    sidecar disagrees with the arrays, or a file of the cache is a symbolic
    link or lies outside it. Unlike :class:`StaleCacheError` (the inputs moved
    on; preparing again is routine) this is damage or tampering: the message
    names the cache and the file.
    """


class PhotometryError(InputError):
    """Photometry is missing or unusable (no band, no catalogue match)."""


class CalibrationError(GpucalError):
    """Too few standards survived to build a calibration."""


class AlreadyCalibratedError(InputError):
    """An input frame that is already flux-calibrated (FLUXCAL = T, or BUNIT a flux density);
    calibrating it again needs ``--recalibrate`` (``recalibrate=True``)."""

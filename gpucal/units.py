"""Physical constants and unit conversions used by every step.

* ``C_KMS`` — the speed of light in km/s;
* FWHM ↔ σ of a Gaussian (``FWHM_PER_SIGMA`` = 2√(2 ln 2));
* the relativistic Doppler factor 1 + z of a radial velocity (km/s, positive
  = receding), for Python floats and arrays of any array-API namespace;
* air ↔ vacuum wavelengths (Å), IAU standard (Morton 2000), λ < 2000 Å
  unchanged. These act on host wavelength axes (NumPy, float64): they run
  once per frame or grid, never inside a scan.

Nothing here reads files or knows about frames, grids or backends.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

__all__ = [
    "C_KMS",
    "FWHM_PER_SIGMA",
    "FWHM_TO_SIGMA",
    "fwhm_to_sigma",
    "doppler_factor",
    "AIR_LIMIT",
    "MEDIA",
    "vacuum_to_air",
    "air_to_vacuum",
    "convert_medium",
]

#: Speed of light (km/s).
C_KMS = 299792.458

#: FWHM of a Gaussian in units of its σ: 2√(2 ln 2) ≈ 2.3548.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: σ of a Gaussian per unit FWHM (1 / FWHM_PER_SIGMA).
FWHM_TO_SIGMA = 1.0 / FWHM_PER_SIGMA

#: Below this wavelength (Å) air and vacuum wavelengths are the same by convention.
AIR_LIMIT = 2000.0
#: The two wavelength media gpucal knows.
MEDIA = ("air", "vacuum")


def fwhm_to_sigma(fwhm):
    """σ of a Gaussian of full width at half maximum ``fwhm`` (same unit; scalar or array)."""
    return fwhm / FWHM_PER_SIGMA


def doppler_factor(v_kms):
    """1 + z of a radial velocity in km/s (relativistic, positive = receding).

    ``v_kms`` is a Python number (returns a float) or an array of any array-API
    namespace (returns an array of that namespace).
    """
    beta = v_kms / C_KMS
    if isinstance(v_kms, (int, float)):
        return math.sqrt((1.0 + beta) / (1.0 - beta))
    from .backends import array_namespace

    xp = array_namespace(v_kms)
    return xp.sqrt((1.0 + beta) / (1.0 - beta))


def _refractive_index_iau(wave_vac: np.ndarray) -> np.ndarray:
    """Refractive index of standard air at vacuum wavelength (Å), IAU standard (Morton 2000)."""
    s2 = (1.0e4 / wave_vac) ** 2
    return 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)


def vacuum_to_air(wave) -> np.ndarray:
    """Air wavelengths (Å) of vacuum wavelengths, IAU standard; λ < 2000 Å unchanged."""
    w = np.asarray(wave, dtype=np.float64)
    above = w >= AIR_LIMIT
    out = w.copy()
    out[above] = w[above] / _refractive_index_iau(w[above])
    return out


def air_to_vacuum(wave) -> np.ndarray:
    """Vacuum wavelengths (Å) of air wavelengths: exact inverse of :func:`vacuum_to_air`."""
    a = np.asarray(wave, dtype=np.float64)
    above = a >= AIR_LIMIT
    out = a.copy()
    wa = a[above]
    v = wa * _refractive_index_iau(wa)
    # λ n(λ) is contracting to 1e-4 per step here (dn/dλ·λ ~ 1e-4), so a few
    # iterations reach machine precision.
    for _ in range(4):
        v = wa * _refractive_index_iau(v)
    out[above] = v
    return out


def convert_medium(wave, source: str, target: str) -> np.ndarray:
    """Wavelengths (Å) moved from ``source`` to ``target`` medium ("air" or "vacuum")."""
    for m in (source, target):
        if m not in MEDIA:
            raise InputError(f"wavelength medium must be 'air' or 'vacuum', got {m!r}")
    w = np.asarray(wave, dtype=np.float64)
    if source == target:
        return w
    return air_to_vacuum(w) if source == "air" else vacuum_to_air(w)

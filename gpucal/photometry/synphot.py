"""Synthetic photometry: AB maggies and AB/Vega magnitudes of a batch of spectra.

Step of the mission: model spectra (and the scaled templates) measured
through the catalogue's bands, so that they can be put on the catalogue's
photometric scale.

Spectra ``flux (n_spec, n_w)`` in erg/s/cm²/Å on a wavelength grid
``wave (n_w,)`` in Å become AB maggies ``(n_spec, n_band)`` through ONE matrix
product ``flux @ W`` with the host-built, cached weight matrix
``W (n_w, n_band)`` of :func:`gpucal.photometry.bands.band_matrix` (the
photon-weighted speclite responses resampled onto ``wave``), and magnitudes
``−2.5 log10(maggies)`` plus each band's m_system − m_AB
(:func:`gpucal.photometry.vega.system_offsets`). Written against the array
API: the product runs on the namespace and device of ``flux``, and ``W``
crosses to the device once per call; no NumPy import here.
"""

from __future__ import annotations

import math

from ..backends import array_namespace, backend_of, to_backend
from ..errors import CoverageError, InputError
from .bands import as_bands, band_matrix, band_systems, host_wave, uncovered_message
from .vega import system_offsets

__all__ = ["synthetic_maggies", "synthetic_mags", "coverage_message"]


def synthetic_maggies(wave, flux, bands):
    """AB maggies of a batch of spectra through a batch of filters.

    Parameters
    ----------
    wave : (n_w,) array, Å, strictly increasing (host or backend).
    flux : (n_spec, n_w) backend array, erg/s/cm²/Å, finite everywhere
        (a NaN anywhere poisons every band, since 0 × NaN = NaN).
    bands : sequence of str (aliases or speclite names).

    Returns
    -------
    maggies : (n_spec, n_band) float64 array on ``flux``'s namespace and device.
        Columns of uncovered bands are NaN.
    covered : (n_band,) bool NumPy array (a fresh, writable copy).

    Notes
    -----
    ``flux`` is cast to float64 before the product even when it is float32
    (templates are stored so). Each maggie sums thousands of terms; float32
    accumulation costs ~1e-5 relative and a TF32 GEMM (a GPU default in some
    libraries) ~1e-3, i.e. ~1 mmag, the whole error budget against speclite.
    With n_band columns the float64 product is cheap (memory-bound on the
    flux read either way).
    """
    xp = array_namespace(flux)
    if flux.ndim != 2:
        raise InputError(f"flux must be 2-D (n_spec, n_w), got shape {tuple(flux.shape)}")
    W, covered = band_matrix(wave, bands)
    if int(flux.shape[1]) != W.shape[0]:
        raise InputError(
            f"flux has {int(flux.shape[1])} wavelength pixels but the wavelength grid has {W.shape[0]}"
        )
    # The cached W is read-only: to_backend copies it for torch (which
    # refuses to share read-only memory) and transfers it for CuPy.
    Wd = to_backend(W, backend_of(flux))
    return xp.matmul(xp.astype(flux, xp.float64), Wd), covered.copy()


def coverage_message(wave, bands) -> str:
    """``""`` when ``wave`` covers every band, else one line naming the bands not covered.

    For the per-star table and QC: a band the template grid does not cover
    is excluded from the photometric scale and reported with this text
    (which names the band, its extent and the wavelengths missing).
    """
    bands = as_bands(bands)
    _, covered = band_matrix(wave, bands)
    if covered.all():
        return ""
    return uncovered_message(host_wave(wave), [b for b, c in zip(bands, covered) if not c])


def synthetic_mags(wave, flux, bands, *, system="AB"):
    """Synthetic magnitudes of a batch of spectra, AB or Vega per band.

    Parameters
    ----------
    wave : (n_w,) array, Å.
    flux : (n_spec, n_w) backend array, erg/s/cm²/Å.
    bands : sequence of str.
    system : ``"AB"``, ``"Vega"``, or one of them per band (e.g. a
        :class:`~gpucal.containers.Photometry`'s ``system``); ``None`` means
        each band's catalogue system (:func:`band_system`).

    Returns
    -------
    (n_spec, n_band) float64 array on ``flux``'s namespace and device:
    −2.5 log10(AB maggies), plus :func:`vega_offsets` in the Vega bands.
    A spectrum with negative (or NaN) maggies in a band gets NaN there, with
    zero maggies +inf, without a floating-point warning.

    Raises
    ------
    CoverageError
        Some band is not fully covered by ``wave``; names the band(s) and the
        wavelengths missing. Never a silent NaN.
    InputError
        Unknown system name, or a per-band list of the wrong length.
    """
    bands = as_bands(bands)
    systems = band_systems(bands, system)
    _, covered = band_matrix(wave, bands)
    if not covered.all():
        missing = [b for b, c in zip(bands, covered) if not c]
        raise CoverageError(uncovered_message(host_wave(wave), missing))
    maggies, _ = synthetic_maggies(wave, flux, bands)
    mags = _ab_mags(maggies)
    offsets = system_offsets(bands, systems)
    if (offsets != 0.0).any():
        xp = array_namespace(mags)
        mags = mags + to_backend(offsets, backend_of(mags), dtype=xp.float64)[None, :]
    return mags


def _ab_mags(maggies):
    """−2.5 log10(maggies), +inf at 0 and NaN below (or at NaN), never taking the log of a non-positive."""
    xp = array_namespace(maggies)
    pos = maggies > 0
    mags = -2.5 * xp.log10(xp.where(pos, maggies, 1.0))
    return xp.where(pos, mags, xp.where(maggies == 0, math.inf, xp.full_like(maggies, math.nan)))

"""Vega magnitudes: the CALSPEC spectra of Vega and each band's m_Vega − m_AB.

Step of the mission: put synthetic magnitudes on the system a catalogue
quotes (Gaia and 2MASS are Vega, Pan-STARRS and SDSS are AB).

``m_Vega = m_AB + (m_Vega − m_AB)`` with the per-band offset derived from a
CALSPEC spectrum of Vega shipped in ``gpucal/data`` (:func:`vega_spectrum`:
``wave, flux (n,)`` in vacuum Å and erg/s/cm²/Å) through the band's filter
curve (:func:`vega_offsets`, host float64 ``(n_band,)`` mag), each survey's
Vega system defined as that survey defines it (:func:`vega_reference`). No
offset is typed in. :func:`system_offsets` gives ``m_system − m_AB`` per band
for a mix of AB and Vega bands.

Host-side: NumPy and astropy (FITS) only; offsets are computed once per band.
"""

from __future__ import annotations

import functools
import math
from importlib import resources

import numpy as np

from ..errors import CoverageError, InputError
from .bands import as_bands, band_matrix, band_systems, resolve_band

__all__ = ["vega_spectrum", "vega_reference", "vega_offsets", "system_offsets"]

# How each survey defines its Vega system: the CALSPEC Vega spectrum its zero
# points were set with, and the magnitude Vega has in every band of it. These
# are definitions of the systems, not offsets: m_Vega − m_AB is derived from
# the spectrum and the filter curve (vega_offsets).
# Gaia's definition reproduces the EDR3/DR3 AB and VEGAMAG zero points of
# Riello et al. (2021, Sect. 7, Table 3) to < 1 mmag with speclite's gaiadr3
# curves (tests); DR2 is assumed to be defined the same way (not verified).
_GAIA_VEGA = (
    "alpha_lyr_mod_002",
    0.023,
    "Gaia VEGAMAG: CALSPEC alpha_lyr_mod_002 with Vega at 0.023 mag in G, BP and RP "
    "(reproduces the zero points of Riello et al. 2021, A&A 649, A3, Table 3)",
)
_VEGA_DEFINITIONS = {
    "gaiadr3": _GAIA_VEGA,
    "gaiadr2": _GAIA_VEGA,
    "twomass": (
        "alpha_lyr_stis_011",
        0.0,
        "2MASS: Vega = 0 mag in J, H, Ks (Cohen, Wheaton & Megeath 2003, AJ 126, 1090), "
        "CALSPEC alpha_lyr_stis_011 (Bohlin et al. 2020)",
    ),
    "bessell": (
        "alpha_lyr_stis_011",
        0.03,
        "Johnson-Cousins convention: Vega at V = 0.03 mag with zero colours, i.e. 0.03 in every "
        "band (not checked against a published offset), CALSPEC alpha_lyr_stis_011 (Bohlin et al. 2020)",
    ),
}
_DEFAULT_VEGA = (
    "alpha_lyr_stis_011",
    0.0,
    "Vega = 0 mag in every band, CALSPEC alpha_lyr_stis_011 (Bohlin et al. 2020)",
)
_VEGA_SPECTRA = ("alpha_lyr_stis_011", "alpha_lyr_mod_002")


@functools.lru_cache(maxsize=None)
def vega_spectrum(name: str = "alpha_lyr_stis_011"):
    """A CALSPEC spectrum of Vega shipped with gpucal (``gpucal/data``; see its README).

    Parameters
    ----------
    name : ``"alpha_lyr_stis_011"`` (STIS + model, flux scale of Bohlin et
        al. 2020, AJ 160, 21; the default) or ``"alpha_lyr_mod_002"`` (the
        Kurucz model of Bohlin 2014, AJ 147, 127, that defines Gaia's
        VEGAMAG zero points).

    Returns
    -------
    wave, flux : (n,) read-only float64 NumPy arrays, vacuum Å and
        erg/s/cm²/Å, 900 Å to 300 µm.
    """
    if name not in _VEGA_SPECTRA:
        raise InputError(f"unknown Vega spectrum {name!r}; choose one of {', '.join(_VEGA_SPECTRA)}")
    from astropy.io import fits

    ref = resources.files("gpucal").joinpath("data", f"{name}.fits")
    try:
        with resources.as_file(ref) as path, fits.open(path, memmap=False) as hdul:
            table = hdul[1].data
            wave = np.array(table["WAVELENGTH"], dtype=np.float64)
            flux = np.array(table["FLUX"], dtype=np.float64)
    except (OSError, KeyError, IndexError) as exc:
        raise InputError(
            f"Vega spectrum gpucal/data/{name}.fits is missing or unreadable ({exc}); "
            f"reinstall gpucal (the file is package data)"
        ) from None
    wave.flags.writeable = False
    flux.flags.writeable = False
    return wave, flux


def vega_reference(band: str):
    """How the Vega system of ``band`` is defined: ``(spectrum, vega_mag, source)``.

    ``spectrum`` names the :func:`vega_spectrum` the survey set its zero
    points with, ``vega_mag`` the magnitude Vega has in that system, and
    ``source`` is a citation. Gaia (DR2, DR3): alpha_lyr_mod_002 at 0.023 mag;
    2MASS: alpha_lyr_stis_011 at 0 mag; Bessell UBVRI: alpha_lyr_stis_011 at
    0.03 mag; every other band: alpha_lyr_stis_011 at 0 mag.
    """
    group = resolve_band(band).split("-", 1)[0]
    return _VEGA_DEFINITIONS.get(group, _DEFAULT_VEGA)


@functools.lru_cache(maxsize=None)
def _vega_offset(resolved: str) -> float:
    spectrum, vega_mag, _ = vega_reference(resolved)
    wave, flux = vega_spectrum(spectrum)
    W, covered = band_matrix(wave, (resolved,))
    if not covered[0]:
        raise CoverageError(f"the Vega spectrum {spectrum} does not cover band {resolved}")
    ab = -2.5 * math.log10(float(flux @ W[:, 0]))
    return vega_mag - ab


def vega_offsets(bands) -> np.ndarray:
    """m_Vega − m_AB per band (host float64, mag), derived, never typed in.

    For each band, Vega's AB magnitude is synthesised from the spectrum that
    defines the band's Vega system (:func:`vega_reference`) through the
    speclite curve (:func:`band_matrix` on the spectrum's own grid), and
    ``offset = vega_mag − m_AB(Vega)``, so that ``m_Vega = m_AB + offset``
    for any spectrum. Defined for every band, AB-system ones included.
    """
    bands = as_bands(bands)
    return np.array([_vega_offset(resolve_band(b)) for b in bands], dtype=np.float64)


def system_offsets(bands, systems=None) -> np.ndarray:
    """m_system − m_AB per band (host float64): 0 for AB bands, :func:`vega_offsets` for Vega ones.

    ``systems`` is one name or one per band (default: :func:`band_system`).
    Adding it to synthetic AB magnitudes puts them on the catalogue's system.
    """
    bands = as_bands(bands)
    systems = band_systems(bands, systems)
    vega = [b for b, sy in zip(bands, systems) if sy == "Vega"]
    out = np.zeros(len(bands), dtype=np.float64)
    if vega:
        out[[k for k, sy in enumerate(systems) if sy == "Vega"]] = vega_offsets(vega)
    return out

"""Telluric transmission with resolved line structure, for simulated frames.

The smooth sin² dips of :func:`gpucal.simulate.telluric_transmission` have no
lines; real absorption is a forest of narrow O2 and H2O lines that the
instrument LSF blends. :func:`line_transmission` builds one at high
resolution (air wavelengths, Å):

* the O2 B (1,0) and A (0,0) bands from their rotational structure — P and R
  branches of odd N'' only (¹⁶O2), each line a spin doublet, Hönl–London ×
  Boltzmann (250 K) strengths, so the R branch piles into a band head at
  6868 / 7594 Å and the P branch runs red;
* the H2O bands of :data:`gpucal.fitting.tellurics.TELLURIC_BANDS` as a
  seeded random forest (uniform positions, log-uniform strengths);
* Lorentzian profiles (HWHM ``gamma`` Å), optical depths of each band scaled
  so the transmission convolved to ``ref_fwhm`` Å reaches the band's
  ``depth`` at its deepest point (``saturate`` multiplies chosen bands' optical
  depths: a core that reaches ~0 at the instrument's resolution).

The absorption is exactly zero outside the bands of the table (lines lie at
least ``edge`` Å inside each band, profiles cut at the band edges), so pixels
outside the bands are unabsorbed. Pass it as ``simulate_frame(telluric=...)``,
which multiplies it into the spectra before the LSF.

Host NumPy edge module (simulation only).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .fitting.tellurics import TELLURIC_BANDS, TELLURIC_KIND
from .units import FWHM_PER_SIGMA, vacuum_to_air

__all__ = ["REALISTIC_BANDS", "line_transmission", "o2_band_lines", "water_lines", "telluric_lines"]

_HC_OVER_K = 1.4388  # cm K
_O2_B_GROUND = 1.43768  # cm⁻¹, X³Σg⁻ v=0
#: O2 bands: (band origin cm⁻¹, upper-state B' cm⁻¹): B band b¹Σg⁺(v=1)←X(v=0), A band (0,0).
_O2_BANDS = {"O2_B": (14525.66, 1.3715), "O2_A": (13122.01, 1.3913)}


def o2_band_lines(kind: str, *, temperature: float = 250.0, n_max: int = 29):
    """(air λ Å, relative strength) of the O2 A or B band lines: odd N'', P and R branches, spin doublets."""
    nu0, b_up = _O2_BANDS[kind]
    n = np.arange(1, n_max + 1, 2, dtype=np.float64)
    e_low = _O2_B_GROUND * n * (n + 1)
    boltz = np.exp(-e_low * _HC_OVER_K / temperature)
    nu_r = nu0 + b_up * (n + 1) * (n + 2) - e_low
    nu_p = nu0 + b_up * (n - 1) * n - e_low
    nu = np.concatenate([nu_r, nu_p])
    s = np.concatenate([(n + 1) * boltz, n * boltz])
    nu = np.concatenate([nu - 0.95, nu + 0.95])  # the spin doublet (ΔJ components)
    s = np.concatenate([s, s]) / s.max()
    return vacuum_to_air(1e8 / nu), s


def water_lines(lo: float, hi: float, *, n: int = 160, seed: int = 0):
    """(air λ Å, relative strength) of a seeded H2O forest in [lo, hi]: log-uniform over 3 decades."""
    rng = np.random.default_rng([int(seed), int(lo)])
    lam = rng.uniform(lo, hi, n)
    return lam, 10.0 ** rng.uniform(-3.0, 0.0, n)


@functools.lru_cache(maxsize=8)
def _band_depth_scale(lo, hi, kind, depth, gamma, ref_fwhm, edge, seed):
    """Optical-depth scale of one band so that its transmission at ``ref_fwhm`` dips to 1 − depth."""
    from scipy.ndimage import gaussian_filter1d

    lam, s = telluric_lines(lo, hi, kind, edge=edge, seed=seed)
    step = min(0.02, gamma / 2.0)
    grid = np.arange(lo - 10.0, hi + 10.0, step)
    shape = _tau(grid, lam, s, gamma, lo, hi)
    lo_s, hi_s = 1e-4, 1e4  # bisection on a log scale, to 1e-6 relative
    for _ in range(45):
        mid = math.sqrt(lo_s * hi_s)
        t = gaussian_filter1d(np.exp(-mid * shape), ref_fwhm / FWHM_PER_SIGMA / step, mode="nearest")
        if 1.0 - t.min() < depth:
            lo_s = mid
        else:
            hi_s = mid
    return math.sqrt(lo_s * hi_s)


def telluric_lines(lo, hi, kind, *, edge: float = 4.0, seed: int = 0):
    """Line positions (air Å) and relative strengths of one band of the table, inside [lo+edge, hi−edge]."""
    lam, s = o2_band_lines(kind) if kind.startswith("O2") else water_lines(lo, hi, seed=seed)
    keep = (lam > lo + edge) & (lam < hi - edge)
    return lam[keep], s[keep]


def _tau(wave, lam, s, gamma, lo, hi):
    """Σ s_k L(λ − λ_k) with unit-peak Lorentzians of HWHM ``gamma``, zero outside [lo, hi]."""
    out = np.zeros(wave.shape)
    inside = (wave > lo) & (wave < hi)
    w = wave[inside]
    for start in range(0, lam.size, 64):  # blocks of lines: bounded memory
        d = w[:, None] - lam[None, start:start + 64]
        out[inside] += (s[None, start:start + 64] / (1.0 + (d / gamma) ** 2)).sum(axis=1)
    return out


def line_transmission(wave, *, bands=TELLURIC_BANDS, gamma: float = 0.04, ref_fwhm: float = 2.0,
                      saturate=(), saturate_factor: float = 30.0, edge: float = 4.0, seed: int = 0,
                      airmass: float = 1.0) -> np.ndarray:
    """High-resolution telluric transmission at ``wave`` (air Å): exp(−airmass · Σ τ_band).

    bands : (lo, hi, depth) rows; each band's lines are scaled so that its
    transmission, convolved with a Gaussian of FWHM ``ref_fwhm`` Å, dips to
    1 − depth. saturate : indices of bands whose optical depth is multiplied by
    ``saturate_factor`` (a saturated core at the instrument resolution).
    A ``wave`` coarser than ``gamma`` / 2 (the simulator's 0.1 Å grid) gets each sample's
    transmission averaged over its interval, so every line's equivalent width is kept.
    """
    wave = np.asarray(wave, dtype=np.float64)
    step = float(np.median(np.abs(np.diff(wave)))) if wave.size > 1 else 0.0
    n_sub = int(math.ceil(step / (gamma / 2.0) - 1e-6))
    if n_sub > 1:  # average over each sample's interval
        offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5
        sub = (wave[:, None] + step * offsets[None, :]).ravel()
        kw = dict(bands=bands, gamma=gamma, ref_fwhm=ref_fwhm, saturate=saturate,
                  saturate_factor=saturate_factor, edge=edge, seed=seed, airmass=airmass)
        return line_transmission(sub, **kw).reshape(wave.size, n_sub).mean(axis=1)
    tau = np.zeros(wave.shape)
    for i, (lo, hi, depth) in enumerate(bands):
        kind = TELLURIC_KIND.get((lo, hi), "H2O")
        lam, s = telluric_lines(lo, hi, kind, edge=edge, seed=seed)
        scale = _band_depth_scale(lo, hi, kind, depth, gamma, ref_fwhm, edge, seed)
        tau += scale * (saturate_factor if i in tuple(saturate) else 1.0) * _tau(wave, lam, s, gamma, lo, hi)
    return np.exp(-airmass * tau)


#: The bands of the table with depths typical at R ≈ 4000 (2 Å FWHM at 7600 Å), airmass ≈ 1.2:
#: O2 B 45 %, H2O 30 %, O2 A 65 %, H2O 25 %, H2O 55 %.
REALISTIC_BANDS = tuple((lo, hi, d) for (lo, hi, _), d in zip(TELLURIC_BANDS, (0.45, 0.30, 0.65, 0.25, 0.55)))

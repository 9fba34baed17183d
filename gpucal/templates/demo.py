"""Built-in demo template grid and a frame simulator (host NumPy edge module).

The demo grid is an *analytic* stand-in for BOSZ-like surface-flux models, so
that gpucal can be demonstrated and tested without downloading a template
library.  It is physically motivated, not a stellar atmosphere:

* continuum: surface flux ``F = π B_λ(Teff)`` (erg/s/cm²/Å) with a Balmer
  jump below 3647 Å that grows with Teff and shrinks with logg;
* Balmer series Hα … H16: Gaussian Doppler cores plus Holtsmark-like
  ``(1 + (Δλ/γ)²)^-1.25`` pressure wings; strength follows the n=2 population
  (rising with Teff across 4500–8000 K, peaking near 9500 K), wing amplitude
  and width grow with logg;
* strong metal lines (Ca II H&K, Ca II triplet, Mg b, Na D): saturated
  Lorentzian ``D²/(Δλ² + γ²)`` profiles, stronger when cool and metal rich,
  with gravity sensitivity of the usual sign (CaT stronger in giants, Mg b /
  Na D / Ca HK wings stronger in dwarfs);
* flux = continuum · (0.01 + 0.99 exp(-τ)) (1 % residual in saturated cores);
* a fixed forest of 600 weaker lines (seeded positions, excitation, ionisation
  stage, strengths) whose optical depths follow simple Boltzmann/Saha and H⁻
  continuous-opacity scalings: ∝10^[M/H], neutral lines much stronger at low
  Teff, ionised lines stronger at low logg.  A quarter of them are "α-element"
  lines scaling with 10^[α/M] as well.

All lines have intrinsic widths (30–50 km/s FWHM, 0.3–1.5 Å), so the default
grid (Δlnλ = 1/20000, 15 km/s per pixel) samples them well and
``resolution_fwhm = 0``.  Every ingredient is a smooth function of
(Teff, logg, [M/H], [α/M]), so interpolation between nodes makes sense, and
:func:`demo_template` evaluates the same model at any parameters and any
wavelengths (0 < flux ≤ continuum everywhere).

Frames observed through this model (with throughput, tellurics, LSF, noise)
are made by :mod:`gpucal.simulate`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..containers import TemplateGrid
from ..units import C_KMS, FWHM_PER_SIGMA

__all__ = [
    "DEMO_TEFF",
    "DEMO_LOGG",
    "DEMO_MH",
    "DEMO_ALPHA",
    "demo_grid",
    "demo_template",
    "demo_wave",
    "demo_model",
]

_HC_OVER_K_CM = 1.438776877  # hc/k in cm K
_TWO_HC2 = 1.1910429723971884e-5  # 2hc² in erg cm² / s

DEMO_TEFF = tuple(float(t) for t in np.arange(4500.0, 8000.0 + 1.0, 250.0))
DEMO_LOGG = (3.5, 4.0, 4.5, 5.0)
DEMO_MH = (-1.0, -0.5, 0.0, 0.5)
DEMO_ALPHA = (0.0,)

_T_SUN, _G_SUN = 5772.0, 4.44
_FOREST_SEED = 20240607
_CORE_RESIDUAL = 0.01
_N_FOREST = 600

# Balmer series: air λ (Å), absorption oscillator strength f(2→n),
# wing amplitude A (peak optical depth scale) and wing width γ (Å) at logg 4.
_BALMER = np.array(
    [
        (6562.80, 0.6407, 1.60, 2.5),
        (4861.33, 0.1193, 1.30, 3.5),
        (4340.47, 0.04467, 1.10, 4.0),
        (4101.74, 0.02209, 1.00, 4.5),
        (3970.07, 0.01270, 0.90, 4.5),
        (3889.05, 0.008036, 0.80, 4.0),
        (3835.38, 0.005429, 0.70, 3.5),
        (3797.90, 0.003851, 0.60, 3.0),
        (3770.63, 0.002835, 0.50, 2.5),
        (3750.15, 0.002151, 0.45, 2.2),
        (3734.37, 0.001672, 0.40, 2.0),
        (3721.94, 0.001326, 0.35, 1.8),
        (3711.97, 0.001070, 0.30, 1.6),
        (3703.86, 0.000877, 0.25, 1.4),
    ]
)
_BALMER_CORE_TAU = 20.0  # peak core τ of Hα at the population maximum
_BALMER_CORE_FWHM_KMS = 50.0
_BALMER_WINDOW = 300.0  # Å either side

# Strong metal lines: (air λ Å, D0 Å at the Sun, group).  τ = D²/(Δλ² + γ²),
# equivalent width of the saturated profile ≈ 3.5 D.
_STRONG = (
    (3933.66, 6.0, "cahk"),
    (3968.47, 4.3, "cahk"),
    (8498.02, 0.45, "cat"),
    (8542.09, 1.10, "cat"),
    (8662.14, 0.85, "cat"),
    (5167.32, 0.35, "mgb"),
    (5172.68, 0.50, "mgb"),
    (5183.60, 0.60, "mgb"),
    (5889.95, 0.40, "nad"),
    (5895.92, 0.32, "nad"),
)
# group: (T scale K of exp(-(T-Tsun)/T_s), logg coefficient, uses alpha, half-window Å, core γ Å)
_STRONG_GROUPS = {
    "cahk": (1200.0, 0.2, True, 300.0, 0.3),
    "cat": (2500.0, -0.3, True, 80.0, 0.3),
    "mgb": (900.0, 0.4, True, 60.0, 0.3),
    "nad": (700.0, 0.4, False, 60.0, 0.3),
}


# --------------------------------------------------------------------------- model


def _as_params(teff, logg, mh, alpha) -> np.ndarray:
    t, g, m, a = np.broadcast_arrays(*(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (teff, logg, mh, alpha)))
    p = np.stack([t.ravel(), g.ravel(), m.ravel(), a.ravel()], axis=1)
    if not np.all(np.isfinite(p)) or np.any(p[:, 0] <= 0):
        raise ValueError("demo template parameters must be finite with Teff > 0")
    return p


@functools.lru_cache(maxsize=1)
def _forest_lines() -> dict:
    """The fixed metal-line forest (same every call)."""
    rng = np.random.default_rng(_FOREST_SEED)
    n = _N_FOREST
    u = rng.uniform(size=n)
    # density ∝ λ⁻² between 3000 and 11000 Å (more lines in the blue)
    lam = 1.0 / (1.0 / 3000.0 - u * (1.0 / 3000.0 - 1.0 / 11000.0))
    out = {
        "wave": lam,
        "chi_exc": rng.uniform(0.0, 5.0, n),  # eV
        "ion": rng.uniform(size=n) < 0.25,  # singly ionised species
        "chi_ion": rng.uniform(6.0, 8.0, n),  # eV, ionisation potential of the neutral
        "alpha": rng.uniform(size=n) < 0.25,  # α-element line
        "logtau_sun": rng.uniform(-2.5, 0.5, n),  # log10 peak τ in the Sun (ions 0.3 dex less)
        "fwhm_kms": rng.uniform(30.0, 45.0, n),
    }
    out["logtau_sun"] = out["logtau_sun"] - 0.3 * out["ion"]
    order = np.argsort(out["wave"])
    for k in out:
        out[k] = out[k][order]
        out[k].setflags(write=False)
    return out


def _log_line_ratio(p: np.ndarray, lines: dict) -> np.ndarray:
    """log10 of (absorber number / continuous opacity), up to a per-line constant. (n, N)"""
    t, g, m, a = (p[:, i : i + 1] for i in range(4))
    theta = 5040.0 / t
    theta_sun = 5040.0 / _T_SUN
    log_pe = 1.3 + 0.5 * (g - _G_SUN) + 0.3 * m + 5.0 * (theta_sun - theta)
    log_s = 0.12 + 2.5 * np.log10(t) - theta * lines["chi_ion"][None, :] - log_pe  # Saha N_II/N_I
    log_f_neutral = -np.logaddexp(0.0, log_s * math.log(10.0)) / math.log(10.0)
    log_f_ion = log_s + log_f_neutral
    log_f = np.where(lines["ion"][None, :], log_f_ion, log_f_neutral)
    log_kappa = log_pe + 2.5 * np.log10(theta) + 0.754 * theta  # H⁻ continuous opacity
    abundance = m + a * lines["alpha"][None, :]
    return log_f - theta * lines["chi_exc"][None, :] - log_kappa + abundance


def _forest_tau0(p: np.ndarray) -> np.ndarray:
    lines = _forest_lines()
    sun = np.array([[_T_SUN, _G_SUN, 0.0, 0.0]])
    log_tau = lines["logtau_sun"][None, :] + _log_line_ratio(p, lines) - _log_line_ratio(sun, lines)
    return 10.0 ** np.minimum(log_tau, 4.0)


def _forest_matrix(wave: np.ndarray):
    """Sparse (n_pix, N) matrix of unit-peak Gaussian profiles of the forest lines."""
    from scipy import sparse

    lines = _forest_lines()
    lnw = np.log(wave)
    sig = lines["fwhm_kms"] / FWHM_PER_SIGMA / C_KMS  # in ln λ
    lnc = np.log(lines["wave"])
    lo = np.searchsorted(lnw, lnc - 6.0 * sig, side="left")
    hi = np.searchsorted(lnw, lnc + 6.0 * sig, side="right")
    counts = hi - lo
    total = int(counts.sum())
    col = np.repeat(np.arange(lnc.size), counts)
    start = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    row = start + np.arange(total)
    x = (lnw[row] - lnc[col]) / sig[col]
    data = np.exp(-0.5 * x * x)
    return sparse.csr_matrix((data, (row, col)), shape=(wave.size, lnc.size))


def _population(t: np.ndarray) -> np.ndarray:
    """Relative n=2 hydrogen population × ionisation: peaks near 9500 K."""
    return np.exp(-(((t - 9500.0) / 3500.0) ** 2))


def _continuum(p: np.ndarray, wave: np.ndarray) -> np.ndarray:
    t, g = p[:, 0:1], p[:, 1:2]
    lam_cm = wave[None, :] * 1e-8
    x = _HC_OVER_K_CM / (lam_cm * t)
    b_lam = _TWO_HC2 / lam_cm**5 / np.expm1(x)  # erg/s/cm²/cm/sr
    f = math.pi * b_lam * 1e-8  # surface flux, erg/s/cm²/Å
    jump = 0.45 * _population(t) * 10.0 ** (-0.15 * (g - 4.0))
    step = 0.5 * (1.0 - np.tanh((wave[None, :] - 3647.0) / 24.0))  # 1 blueward of the limit
    return f * (1.0 - jump * step)


def _add_windowed(tau, wave, centre, half, fn):
    lo = int(np.searchsorted(wave, centre - half, side="left"))
    hi = int(np.searchsorted(wave, centre + half, side="right"))
    if hi > lo:
        tau[:, lo:hi] += fn(wave[lo:hi] - centre)


def _tau(p: np.ndarray, wave: np.ndarray) -> np.ndarray:
    t, g, m, a = (p[:, i : i + 1] for i in range(4))
    tau = np.ascontiguousarray((_forest_matrix(wave) @ _forest_tau0(p).T).T)

    # Balmer series
    pop = _population(t)
    press = 10.0 ** (0.15 * (g - 4.0))
    lam_a, f_a = _BALMER[0, 0], _BALMER[0, 1]
    for lam0, fosc, amp, gam in _BALMER:
        core_tau = _BALMER_CORE_TAU * (fosc * lam0) / (f_a * lam_a) * pop
        core_sig = lam0 * _BALMER_CORE_FWHM_KMS / C_KMS / FWHM_PER_SIGMA
        wing_amp = amp * pop * press
        wing_gam = gam * press * np.sqrt(t / 8000.0)
        edge = (1.0 + (_BALMER_WINDOW / wing_gam) ** 2) ** -1.25

        def prof(d, core_tau=core_tau, core_sig=core_sig, wing_amp=wing_amp, wing_gam=wing_gam, edge=edge):
            d = d[None, :]
            wing = np.maximum((1.0 + (d / wing_gam) ** 2) ** -1.25 - edge, 0.0)
            return core_tau * np.exp(-0.5 * (d / core_sig) ** 2) + wing_amp * wing

        _add_windowed(tau, wave, lam0, _BALMER_WINDOW, prof)

    # strong metal lines
    for lam0, d0, group in _STRONG:
        t_s, g_coef, uses_alpha, half, gam = _STRONG_GROUPS[group]
        abund = m + (a if uses_alpha else 0.0)
        d2 = d0**2 * 10.0**abund * np.exp(-(t - _T_SUN) / t_s) * 10.0 ** (g_coef * (g - _G_SUN))
        edge = 1.0 / (half**2 + gam**2)

        def prof(d, d2=d2, gam=gam, edge=edge):
            d = d[None, :]
            return d2 * np.maximum(1.0 / (d * d + gam * gam) - edge, 0.0)

        _add_windowed(tau, wave, lam0, half, prof)
    return tau


def demo_model(p: np.ndarray, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flux, continuum), each (n, n_w) erg/s/cm²/Å, of the demo model at parameters ``p`` (n, 4) on ``wave`` (Å)."""
    wave = np.asarray(wave, dtype=np.float64)
    if wave.ndim != 1 or wave.size == 0 or not np.all(np.isfinite(wave)) or np.any(wave <= 0):
        raise ValueError("wave must be a non-empty 1-D array of positive wavelengths (Å)")
    order = None
    if wave.size > 1 and np.any(np.diff(wave) < 0):
        order = np.argsort(wave, kind="stable")
        wave = wave[order]
    cont = _continuum(p, wave)
    # a 1 % residual intensity in saturated cores (source function ≠ 0) keeps flux > 0
    flux = cont * (_CORE_RESIDUAL + (1.0 - _CORE_RESIDUAL) * np.exp(-_tau(p, wave)))
    if order is not None:
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        flux, cont = flux[:, inv], cont[:, inv]
    return flux, cont


def demo_wave(wave_range=(3000.0, 11000.0), dlnlam=1.0 / 20000.0) -> np.ndarray:
    """Log-uniform wavelength grid (Å) starting at ``wave_range[0]`` and reaching ``wave_range[1]``."""
    w0, w1 = float(wave_range[0]), float(wave_range[1])
    if not (0 < w0 < w1) or not dlnlam > 0:
        raise ValueError("need 0 < wave_range[0] < wave_range[1] and dlnlam > 0")
    n = int(math.ceil(math.log(w1 / w0) / dlnlam - 1e-9)) + 1
    return w0 * np.exp(dlnlam * np.arange(n))


def demo_template(teff, logg, mh, alpha=0.0, wave=None, *, return_continuum=False):
    """One demo spectrum at arbitrary (off-grid) parameters, same physics as :func:`demo_grid`.

    Returns the surface flux (erg/s/cm²/Å) on ``wave`` (Å, any 1-D array; default
    the default demo grid's wavelengths), or ``(flux, continuum)`` when
    ``return_continuum`` is true.  To get a spectrum Doppler-shifted by ``v`` km/s,
    evaluate it at ``wave / (1 + v/c)``.
    """
    p = _as_params(teff, logg, mh, alpha)
    if p.shape[0] != 1:
        raise ValueError("demo_template takes scalar parameters")
    if wave is None:
        wave = demo_wave()
    flux, cont = demo_model(p, wave)
    return (flux[0], cont[0]) if return_continuum else flux[0]


def _axis(values) -> tuple:
    v = tuple(float(x) for x in np.atleast_1d(np.asarray(values, dtype=np.float64)))
    if not v:
        raise ValueError("empty parameter axis")
    return v


@functools.lru_cache(maxsize=4)
def _demo_grid_arrays(teff, logg, mh, alpha, wave_range, dlnlam):
    wave = demo_wave(wave_range, dlnlam)
    mesh = np.meshgrid(np.array(teff), np.array(logg), np.array(mh), np.array(alpha), indexing="ij")
    params = np.stack([x.ravel() for x in mesh], axis=1)
    flux = np.empty((params.shape[0], wave.size))
    cont = np.empty_like(flux)
    step = 64  # bound the temporaries
    for i in range(0, params.shape[0], step):
        flux[i : i + step], cont[i : i + step] = demo_model(params[i : i + step], wave)
    for arr in (params, wave, flux, cont):
        arr.setflags(write=False)
    return params, wave, flux, cont


def demo_grid(
    *,
    teff=DEMO_TEFF,
    logg=DEMO_LOGG,
    mh=DEMO_MH,
    alpha=DEMO_ALPHA,
    wave_range=(3000.0, 11000.0),
    dlnlam=1.0 / 20000.0,
) -> TemplateGrid:
    """The built-in analytic demo grid (host float64, read-only arrays, memoised).

    Nodes are the Cartesian product teff × logg × mh × alpha (Teff slowest);
    ``params`` is (n_t, 4) [Teff, logg, [M/H], [α/M]]; ``wave`` log-uniform
    with constant Δlnλ = ``dlnlam`` from ``wave_range[0]`` to ≥ ``wave_range[1]``
    (air); ``flux``/``continuum`` surface flux in erg/s/cm²/Å, lines intrinsically
    resolved (``resolution_fwhm = 0``).
    """
    key = (_axis(teff), _axis(logg), _axis(mh), _axis(alpha), (float(wave_range[0]), float(wave_range[1])), float(dlnlam))
    params, wave, flux, cont = _demo_grid_arrays(*key)
    return TemplateGrid(
        params=params,
        wave=wave,
        flux=flux,
        continuum=cont,
        medium="air",
        resolution_fwhm=0.0,
        meta={
            "source": "gpucal demo grid",
            "model": "pi*B_lambda(Teff) continuum with Balmer jump; Balmer, Ca II, Mg b, Na D and a seeded metal-line forest",
            "flux_unit": "erg/(s cm2 Angstrom)",
            "flux_kind": "surface flux",
            "axes": {"teff": key[0], "logg": key[1], "mh": key[2], "alpha": key[3]},
            "dlnlam": key[5],
            "wave_range": key[4],
            "forest_seed": _FOREST_SEED,
            "n_forest_lines": _N_FOREST,
        },
    )


# --------------------------------------------------------------------------- frame simulator

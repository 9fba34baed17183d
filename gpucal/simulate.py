"""Simulated frames with known truth: the demo, the tests and the benchmarks.

:func:`simulate_frame` observes demo-grid stars (:mod:`gpucal.templates.demo`)
the way a fibre spectrograph would: standards (TYPE 'C'), program stars
('P') and sky fibres ('S'), each shifted by its radial velocity, convolved
with the instrument LSF, multiplied by a structured throughput and telluric
absorption (:func:`telluric_transmission`), with photon and read noise. A
:class:`~gpucal.containers.DemoFrame` carries the frame and its truth;
:func:`write_catalogue_csv` writes the standards' photometry.

Host NumPy edge module: wavelengths Å (air), flux in detector counts, truth
throughput in counts per erg/s/cm²/Å.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .containers import DemoFrame
from .fitting.tellurics import TELLURIC_BANDS
from .templates.demo import demo_model, demo_wave
from .units import FWHM_PER_SIGMA, doppler_factor

__all__ = ["DEFAULT_TELLURIC_BANDS", "simulate_frame", "write_catalogue_csv", "telluric_transmission",
           "offnode_grid", "structured_throughput", "cell_corners", "grid_interpolated_model",
           "simulate_offnode_frame"]

#: Telluric band edges (Å) and peak depths the simulator absorbs: the one table in fitting/tellurics.py.
DEFAULT_TELLURIC_BANDS = TELLURIC_BANDS


def telluric_transmission(wave, bands=DEFAULT_TELLURIC_BANDS) -> np.ndarray:
    """Smooth telluric transmission (1 outside ``bands``), each band a sin²-shaped dip with a blue head."""
    wave = np.asarray(wave, dtype=np.float64)
    trans = np.ones_like(wave)
    for lo, hi, depth in bands:
        x = (wave - lo) / (hi - lo)
        inside = (x > 0) & (x < 1)
        xi = x[inside]
        # sharp-ish rise at the blue head, slower decline to the red; peak 1 near x = 0.25
        shape = np.sin(np.pi * xi) ** 2 * np.exp(-1.5 * xi)
        shape /= np.max(np.sin(np.pi * np.linspace(0, 1, 2001)) ** 2 * np.exp(-1.5 * np.linspace(0, 1, 2001)))
        trans[inside] *= 1.0 - depth * shape
    return trans


def _throughput_shape(wave: np.ndarray) -> np.ndarray:
    """Bell-shaped relative throughput, peak ~6000 Å, 1 % ripple; max ≈ 1."""
    x = np.log(wave / 6000.0) / 0.3
    return np.exp(-0.5 * x * x) * (1.0 + 0.01 * np.sin(2.0 * np.pi * wave / 700.0 + 0.3))


@functools.lru_cache(maxsize=1)
def _ps1_filters():
    import speclite.filters

    return speclite.filters.load_filters("panstarrs-g", "panstarrs-r", "panstarrs-i", "panstarrs-z")


def _ab_mags(wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """(n, 4) Pan-STARRS g r i z AB magnitudes of flux (n, n_pix) erg/s/cm²/Å on wave (Å)."""
    import astropy.units as u

    filt = _ps1_filters()
    tab = filt.get_ab_magnitudes(np.atleast_2d(flux) * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA)
    return np.stack([np.asarray(tab[name], dtype=np.float64) for name in filt.names], axis=1)


_DEFAULT_STD_PARAMS = (
    (6000.0, 4.5, 0.0, 0.0),
    (6250.0, 4.0, -0.5, 0.0),
    (5750.0, 4.5, 0.0, 0.0),
    (6500.0, 4.0, -1.0, 0.0),
    (5500.0, 4.5, 0.5, 0.0),
)
_DEFAULT_STD_RV = (-85.0, -2.0, 0.7, 23.4, 140.0)


def _positions(rng, n, ra0=150.0, dec0=2.0, radius=0.5, min_sep_arcsec=10.0):
    ra, dec = [], []
    cosd = math.cos(math.radians(dec0))
    while len(ra) < n:
        r = radius * math.sqrt(rng.uniform())
        phi = rng.uniform(0, 2 * math.pi)
        d = dec0 + r * math.sin(phi)
        a = ra0 + r * math.cos(phi) / cosd
        if ra:
            sep = np.hypot((np.array(ra) - a) * cosd, np.array(dec) - d) * 3600.0
            if np.min(sep) <= min_sep_arcsec:
                continue
        ra.append(a)
        dec.append(d)
    return np.array(ra), np.array(dec)


def _convolved_on_frame(params, rv, wave_frame, fwhm, fine_step, margin, transmission=None, model=None):
    """Rest-frame spectra (demo, or ``model``) shifted by rv, LSF-convolved (constant FWHM in Å), sampled at wave_frame.

    ``transmission`` (callable, fine λ -> T): the spectra are absorbed before the LSF, and the
    convolved transmission itself is appended as the last row.
    """
    model = demo_model if model is None else model
    from scipy.ndimage import gaussian_filter1d

    lo, hi = wave_frame[0] - margin, wave_frame[-1] + margin
    n_fine = int(math.ceil((hi - lo) / fine_step)) + 1
    fine = lo + fine_step * np.arange(n_fine)
    out = np.empty((params.shape[0], fine.size))
    for k in range(params.shape[0]):
        out[k] = model(params[k : k + 1], fine / doppler_factor(rv[k]))[0][0]
    if transmission is not None:
        t_fine = np.asarray(transmission(fine), dtype=np.float64)
        out = np.vstack([out * t_fine[None, :], t_fine[None, :]])
    if fwhm > 0:
        sigma_pix = fwhm / FWHM_PER_SIGMA / fine_step
        out = gaussian_filter1d(out, sigma_pix, axis=1, mode="nearest", truncate=8.0)
    return np.stack([np.interp(wave_frame, fine, row) for row in out])


# --- per-fibre wavelengths and LSF (issue 15) -------------------------------------------------


def _fibre_waves(wave, n_src, wave_jitter, seed):
    """Each source's own wavelengths (n_src, n_pix) and its (offset px, dispersion) draw.

    ``wave_jitter`` = (max offset in pixels, max relative dispersion change):
    λ_k(p) = λ_c + (λ(p) − λ_c)(1 + ε_k) + δ_k Δλ, δ_k and ε_k spread evenly over ±offset and
    ±dispersion and shuffled (seeded), λ_c the grid's centre. None: every source on ``wave``.
    """
    if wave_jitter is None:
        return np.broadcast_to(wave, (n_src, wave.size)), np.zeros(n_src), np.zeros(n_src)
    max_off, max_disp = (float(v) for v in wave_jitter)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 15]))
    # evenly spread over the range and shuffled, so the extremes are always there
    off = rng.permutation(np.linspace(-max_off, max_off, n_src))
    disp = rng.permutation(np.linspace(-max_disp, max_disp, n_src))
    centre, step = 0.5 * (wave[0] + wave[-1]), (wave[-1] - wave[0]) / (wave.size - 1)
    return centre + (wave[None, :] - centre) * (1.0 + disp[:, None]) + off[:, None] * step, off, disp


def _fibre_fwhm(waves, fwhm, fwhm_poly, fwhm_scatter, seed):
    """FWHM (Å) of each source at its own pixels (n_src, n_pix): FWHM(λ) × (1 + s_k), s_k ~ U(±fwhm_scatter)."""
    base = np.full(waves.shape, float(fwhm)) if fwhm_poly is None else np.polynomial.polynomial.polyval(
        waves, np.asarray(fwhm_poly, dtype=np.float64))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 151]))
    s = rng.uniform(-fwhm_scatter, fwhm_scatter, waves.shape[0]) if fwhm_scatter else np.zeros(waves.shape[0])
    out = base * (1.0 + s[:, None])
    if not np.all(np.isfinite(out) & (out > 0)):
        raise ValueError("fwhm_poly / fwhm_scatter give a non-positive FWHM in the wavelength range")
    return out


def _convolved_varying(params, rv, waves, fw, fine_step, margin):
    """Like :func:`_convolved_on_frame`, each source at its own wavelengths with its own FWHM(λ).

    Brute force on a fine linear grid: out(λ_i) = Σ_j f_j G(λ_j − λ_i; σ(λ_i)) / Σ_j G,
    a Gaussian in Å whose width is that of the output pixel (the convention of
    :mod:`gpucal.fitting.lsf`), summed to ±8 σ. A loop over sources (host simulation).
    """
    lo, hi = waves.min() - margin, waves.max() + margin
    fine = lo + fine_step * np.arange(int(math.ceil((hi - lo) / fine_step)) + 1)
    half = int(math.ceil(8.0 * fw.max() / FWHM_PER_SIGMA / fine_step))
    offs = np.arange(-half, half + 1)
    out = np.empty(waves.shape)
    for k in range(params.shape[0]):
        f = demo_model(params[k : k + 1], fine / doppler_factor(rv[k]))[0][0]
        j0 = np.rint((waves[k] - lo) / fine_step).astype(np.int64)
        idx = np.clip(j0[:, None] + offs[None, :], 0, fine.size - 1)
        sig = fw[k] / FWHM_PER_SIGMA
        g = np.exp(-0.5 * ((fine[idx] - waves[k][:, None]) / sig[:, None]) ** 2)
        out[k] = np.sum(g * f[idx], axis=1) / np.sum(g, axis=1)
    return out


# --- simulate_frame's steps, in the order it takes them ----------------------------------------


def _checked_grid(n_standards, n_program, n_sky, n_pix, square, snr, wave_range, fwhm):
    """Validate :func:`simulate_frame`'s sizes and scalars; return n_fibre, the nominal grid (n_pix,) Å and fwhm."""
    if n_standards < 0 or n_program < 0 or n_sky < 0 or n_standards + n_program + n_sky == 0:
        raise ValueError("need a non-negative number of each fibre type and at least one fibre")
    n_fibre = n_standards + n_program + n_sky
    if square and n_pix != n_fibre:
        raise ValueError(f"square=True needs n_pix == n_fibre ({n_pix} != {n_fibre})")
    if n_pix < 2:
        raise ValueError("n_pix must be at least 2")
    if not (np.isfinite(snr) and snr > 0):
        raise ValueError("snr must be finite and positive (use noise=False for a noiseless frame)")
    w0, w1 = float(wave_range[0]), float(wave_range[1])
    if not (3000.0 <= w0 < w1 <= 11000.0):
        raise ValueError("wave_range must lie within the demo model's 3000-11000 Å")
    fwhm = float(fwhm)
    if fwhm < 0:
        raise ValueError("fwhm must be >= 0")
    return n_fibre, np.linspace(w0, w1, n_pix), fwhm


def _draw_standards(rng, n_standards, params, rvs):
    """The standards' parameters (n_std, 4), RVs (km/s), r magnitudes and catalogue errors (n_std, 4).

    Defaults as :func:`simulate_frame` says. ``rng`` draws, in this order, the RVs beyond the
    five defaults (even when ``rvs`` is given), r in [14, 16] and the g r i z errors in [0.01, 0.02].
    """
    if params is None:
        std_params = np.array([_DEFAULT_STD_PARAMS[k % len(_DEFAULT_STD_PARAMS)] for k in range(n_standards)], dtype=np.float64)
    else:
        std_params = np.asarray(params, dtype=np.float64).reshape(-1, 4)
        if std_params.shape[0] != n_standards:
            raise ValueError("params must have one row [Teff, logg, [M/H], [α/M]] per standard")
    std_params = std_params.reshape(n_standards, 4)
    extra_rv = rng.uniform(-200.0, 200.0, max(n_standards - len(_DEFAULT_STD_RV), 0))
    if rvs is None:
        std_rv = np.concatenate([np.array(_DEFAULT_STD_RV[:n_standards]), extra_rv])
    else:
        std_rv = np.asarray(rvs, dtype=np.float64).ravel()
        if std_rv.size != n_standards:
            raise ValueError("rvs must have one velocity (km/s) per standard")
    std_rmag = rng.uniform(14.0, 16.0, n_standards)
    mag_err = rng.uniform(0.01, 0.02, (n_standards, 4))
    return std_params, std_rv, std_rmag, mag_err


def _draw_program(rng, n_program):
    """Program stars' parameters (n_prog, 4), RVs (km/s) and r magnitudes, uniform draws from ``rng`` in this order.

    Teff 4500-8000 K, logg 3.5-5.0, [M/H] -1.0..+0.5 ([α/M] 0), RV ±200 km/s, r 16-18.5.
    """
    prog_params = np.stack(
        [
            rng.uniform(4500.0, 8000.0, n_program),
            rng.uniform(3.5, 5.0, n_program),
            rng.uniform(-1.0, 0.5, n_program),
            np.zeros(n_program),
        ],
        axis=1,
    )
    prog_rv = rng.uniform(-200.0, 200.0, n_program)
    prog_rmag = rng.uniform(16.0, 18.5, n_program)
    return prog_params, prog_rv, prog_rmag


def _dilutions_and_mags(model, params, rv, rmag, n_standards):
    """Each star's dilution to its r magnitude (n_star,) and the first n_standards' exact g r i z (n_std, 4).

    From the full-range (3000-11000 Å) shifted, unconvolved ``model`` spectrum of each star.
    """
    full_wave = demo_wave()
    n_star = params.shape[0]
    dilution = np.empty(n_star)
    std_full = np.empty((n_standards, full_wave.size))
    for k in range(n_star):
        f = model(params[k : k + 1], full_wave / doppler_factor(rv[k]))[0][0]
        r0 = _ab_mags(full_wave, f)[0, 1]
        dilution[k] = 10.0 ** (-0.4 * (rmag[k] - r0))
        if k < n_standards:
            std_full[k] = f * dilution[k]
    std_mags = _ab_mags(full_wave, std_full) if n_standards else np.empty((0, 4))
    return dilution, std_mags


def _star_spectra(params, rv, dilution, wave, src_wave, src_fwhm, fwhm, model, varying):
    """The stars' diluted, shifted, LSF-convolved flux at their pixels (n_star, n_pix), and the fine (step, margin) Å.

    ``varying``: each star at its own wavelengths ``src_wave`` with its own FWHM ``src_fwhm``
    (:func:`_convolved_varying`); otherwise on ``wave`` at the constant ``fwhm``. ``model``
    None is the demo model (the only one ``varying`` supports).
    """
    n_star = params.shape[0]
    fine_step = min(0.1, fwhm / 10.0) if fwhm > 0 else 0.1
    margin = 10.0 * fwhm + 5.0
    if model is not None and varying:
        raise ValueError("a model other than the demo's is simulated on a common wavelength grid only")
    if varying and n_star:
        fine_step = min(0.1, float(src_fwhm.min()) / 10.0)
        margin = 10.0 * float(src_fwhm.max()) + 5.0
        conv = _convolved_varying(params, rv, src_wave[:n_star], src_fwhm[:n_star], fine_step, margin)
        conv = conv * dilution[:, None]
    elif n_star:
        conv = _convolved_on_frame(params, rv, wave, fwhm, fine_step, margin, model=model) * dilution[:, None]
    else:
        conv = np.empty((0, wave.size))
    return conv, fine_step, margin


def _absorbed(conv, telluric, at, varying, params, rv, dilution, wave, fwhm, fine_step, margin, model):
    """The stars' spectra after telluric absorption: (absorbed, telluric truth, factor applied after the LSF).

    ``telluric`` true: the smooth bands (:func:`telluric_transmission`) at ``at``, multiplied
    after the LSF; a callable (fine λ -> T): resolved lines absorbed before the LSF, the spectra
    convolved again with them, and the truth the convolved transmission; false: none.
    """
    tell = telluric_transmission(at) if telluric and not callable(telluric) else np.ones(at.shape)
    absorbed, after_lsf = conv, tell
    if callable(telluric):
        if varying:
            raise ValueError("resolved telluric lines are simulated on a common wavelength grid only")
        rows = _convolved_on_frame(params, rv, wave, fwhm, fine_step, margin, telluric, model=model)
        absorbed, tell, after_lsf = rows[:-1] * dilution[:, None], rows[-1], np.ones(wave.size)
    return absorbed, tell, after_lsf


def _frame_throughput(throughput, conv, n_standards, at, tell, varying, snr, read_noise, n_pix):
    """The throughput (counts per erg/s/cm²/Å, (n_pix,) or per source) and the scale of its shape (None if given).

    None: :func:`_throughput_shape` at ``at`` scaled so that the median S/N of the standards'
    pixels (the program stars' without standards) is ``snr``; otherwise ``throughput`` checked.
    """
    if throughput is None:
        shape = _throughput_shape(at)
        n_star = conv.shape[0]
        ref = conv[:n_standards] if n_standards else conv[n_standards:]
        if ref.size:
            sel = slice(0, n_standards) if n_standards else slice(n_standards, n_star)
            m = float(np.median(ref * (shape[sel] if varying else shape) * (tell[sel] if varying else tell)))
        else:  # only sky fibres: any positive scale will do
            m = float(np.median(shape)) * 1e-15
        c = 0.5 * (snr**2 + math.sqrt(snr**4 + 4.0 * snr**2 * read_noise**2))  # counts with c/√(c+rn²) = snr
        return shape * (c / m), c / m
    if varying:
        raise ValueError("a given throughput cannot be combined with per-fibre wavelengths or LSF")
    thr = np.asarray(throughput, dtype=np.float64).ravel()
    if thr.shape != (n_pix,) or not np.all(np.isfinite(thr)) or np.any(thr <= 0):
        raise ValueError("throughput must be (n_pix,) finite and positive")
    return thr, None


def _source_names(n_standards, n_program, n_sky):
    """Names STD001…, PRG001…, SKY001… and TYPE 'C', 'P', 'S' of the sources in (std, program, sky) order."""
    types = np.array(["C"] * n_standards + ["P"] * n_program + ["S"] * n_sky)
    names = [f"STD{k + 1:03d}" for k in range(n_standards)]
    names += [f"PRG{k + 1:03d}" for k in range(n_program)]
    names += [f"SKY{k + 1:03d}" for k in range(n_sky)]
    return names, types


def _fibre_order(rng, n_standards, n_fibre):
    """The seeded fibre shuffle: perm[row] = index into the (std, program, sky) ordering.

    Redrawn (up to 100 times) while the standards would all come first.
    """
    perm = rng.permutation(n_fibre)
    if 0 < n_standards < n_fibre:
        for _ in range(100):
            if not np.all(np.sort(np.argsort(perm)[:n_standards]) == np.arange(n_standards)):
                break
            perm = rng.permutation(n_fibre)
    return perm


def _observed(absorbed, n_sky, thr, after_lsf, perm, read_noise, noise, rng):
    """Counts in frame row order: (counts_true, var = counts_true + read_noise², flux).

    flux = counts_true + N(0, √var) from ``rng`` if ``noise``, else counts_true exactly.
    Sky fibres carry no signal (sky-subtracted).
    """
    n_pix = absorbed.shape[1]
    counts_src = np.concatenate([absorbed, np.zeros((n_sky, n_pix))]) * thr * after_lsf  # (n_pix,) or per source
    counts_true = counts_src[perm]
    var = counts_true + read_noise**2
    if noise:
        flux = counts_true + rng.standard_normal(counts_true.shape) * np.sqrt(var)
    else:
        flux = counts_true.copy()
    return counts_true, var, flux


def _fibre_table(names, types, perm, ra, dec):
    """The frame's fibre table FIBRE (1-based), NAME, TYPE, RA, DEC in frame row order."""
    from astropy.table import Table

    return Table(
        {
            "FIBRE": np.arange(1, perm.size + 1, dtype=np.int32),
            "NAME": np.array(names)[perm] if perm.size else np.array([], dtype="U6"),
            "TYPE": types[perm],
            "RA": ra[perm],
            "DEC": dec[perm],
        }
    )


def _catalogue(names, ra, dec, std_mags, mag_err, mag_noise, rng):
    """The standards' catalogue name, ra, dec, g, dg, … z, dz.

    Magnitudes exact unless ``mag_noise``: then each gets N(0, its error) from ``rng``.
    """
    from astropy.table import Table

    cat_mags = std_mags.copy()
    if mag_noise:
        cat_mags = cat_mags + rng.standard_normal(cat_mags.shape) * mag_err
    return Table(
        {
            "name": np.array(names, dtype="U16"),
            "ra": ra,
            "dec": dec,
            "g": cat_mags[:, 0],
            "dg": mag_err[:, 0],
            "r": cat_mags[:, 1],
            "dr": mag_err[:, 1],
            "i": cat_mags[:, 2],
            "di": mag_err[:, 2],
            "z": cat_mags[:, 3],
            "dz": mag_err[:, 3],
        }
    )


def _truth(n_standards, n_program, std, prog, perm, conv, dilution, std_mags, counts_true, thr, tell,
           fwhm, snr, read_noise):
    """:func:`simulate_frame`'s truth dict (keys as its docstring); ``std``, ``prog`` = (params, rv)."""
    row_of = np.argsort(perm)  # frame row of each source
    return {
        "throughput": thr,
        "telluric": tell,
        "params": std[0],
        "rv": std[1],
        "std_fibres": row_of[:n_standards],
        "program_fibres": row_of[n_standards : n_standards + n_program],
        "sky_fibres": row_of[n_standards + n_program :],
        "std_true_flux": conv[:n_standards],
        "program_true_flux": conv[n_standards:],
        "program_params": prog[0],
        "program_rv": prog[1],
        "dilution": dilution[:n_standards],
        "program_dilution": dilution[n_standards:],
        "mags": std_mags,
        "mag_bands": ("panstarrs-g", "panstarrs-r", "panstarrs-i", "panstarrs-z"),
        "counts_true": counts_true,
        "fwhm": fwhm,
        "snr": float(snr),
        "read_noise": float(read_noise),
    }


def _add_per_fibre_truth(truth, perm, src_wave, src_fwhm, wave, scale, telluric):
    """Per-fibre truth (wave_fibre, throughput_fibre, fwhm_fibre in frame row order) added to ``truth``.

    'throughput' and 'telluric' become the nominal grid's, so that 'throughput' stays the true 1/Cal(λ).
    """
    truth.update(wave_fibre=src_wave[perm], throughput_fibre=truth["throughput"][perm], fwhm_fibre=src_fwhm[perm],
                 throughput=_throughput_shape(wave) * scale,
                 telluric=telluric_transmission(wave) if telluric else np.ones(wave.size))
    return truth


def simulate_frame(
    *,
    n_standards=5,
    n_program=10,
    n_sky=5,
    rvs=None,
    snr=50.0,
    fwhm=2.0,
    wave_range=(3700.0, 9300.0),
    n_pix=4000,
    seed=0,
    params=None,
    throughput=None,
    telluric=True,
    square=False,
    noise=True,
    read_noise=3.0,
    mag_noise=False,
    wave_jitter=None,
    fwhm_poly=None,
    fwhm_scatter=0.0,
    model=None,
) -> DemoFrame:
    """Simulate a reduced fibre frame from demo templates with known calibration.

    Standards (TYPE 'C') default to on-grid F/G parameters cycling through
    (6000,4.5,0,0), (6250,4.0,-0.5,0), (5750,4.5,0,0), (6500,4.0,-1,0),
    (5500,4.5,0.5,0) and velocities (-85, -2, 0.7, 23.4, 140) km/s (further
    stars: seeded uniform in [-200, 200]).  Each star's flux at the telescope is
    its demo surface flux × a dilution giving Pan-STARRS r in [14, 16] (program
    stars [16, 18.5]), shifted by λ_obs = λ_rest(1 + v/c), convolved with a
    Gaussian of constant FWHM ``fwhm`` Å (evaluated on a fine linear grid) and
    sampled at the pixel centres.  Then

        counts_true = F_conv × throughput × telluric,
        var = counts_true + read_noise²,  flux = counts_true + N(0, √var)

    (``noise=False``: flux = counts_true exactly).  ``throughput`` (n_pix,) in
    counts per erg/s/cm²/Å may be given; by default a smooth bell (peak ≈ 6000 Å,
    ×3–4 lower at 3700/9300 Å, 1 % ripple) is scaled so that the median S/N
    over all standard pixels, counts_true/√var, equals ``snr`` exactly.  Sky
    fibres carry zero signal (sky-subtracted) plus read noise.  Fibre order is a
    seeded shuffle.  ``square=True`` requires ``n_pix == n_fibre``.

    Catalogue magnitudes are speclite Pan-STARRS AB magnitudes of each
    standard's full diluted, shifted, unconvolved spectrum over 3000–11000 Å;
    ``dg`` … ``dz`` are 0.01–0.02 mag; noise of that size is added to the
    magnitudes only when ``mag_noise`` is true (default: exact).

    ``truth`` keys: 'throughput' (n_pix,) counts per erg/s/cm²/Å (true Cal =
    1/throughput); 'telluric' (n_pix,) transmission (``telluric`` may be a callable, fine λ Å ->
    transmission, e.g. :func:`gpucal.simulate_tellurics.line_transmission`: then the spectra are
    absorbed before the LSF and 'telluric' is the transmission convolved); 'params' (n_std, 4);
    'rv' (n_std,) km/s; 'std_fibres' (n_std,) 0-based frame rows of the
    standards in catalogue order; 'program_fibres', 'sky_fibres' likewise;
    'std_true_flux', 'program_true_flux' (n, n_pix) flux density at the
    telescope after the LSF, *without* telluric absorption — a perfect
    calibration (counts/throughput) returns ``true_flux × telluric``, i.e.
    ``true_flux`` itself outside the telluric bands; 'program_params',
    'program_rv'; 'dilution', 'program_dilution'; 'mags' (n_std, 4) exact
    g r i z; 'counts_true' (n_fibre, n_pix); 'fwhm', 'snr', 'read_noise'.

    Per-fibre wavelengths and LSF (issue 15): ``wave_jitter`` = (max offset px,
    max relative dispersion change), e.g. (0.3, 1e-4), gives every fibre its own
    solution about the nominal grid (seeded; :func:`_fibre_waves`), and then
    ``DemoFrame.wave`` is (n_fibre, n_pix); ``fwhm_poly`` (ascending
    coefficients, Å) makes the FWHM vary with λ and ``fwhm_scatter`` (s) scales
    each fibre's by a seeded factor in [1 − s, 1 + s]. With any of the three the
    spectra are convolved by brute force at each fibre's own pixels
    (:func:`_convolved_varying`), the throughput and telluric are evaluated at
    each fibre's wavelengths, and truth gains 'wave_fibre', 'throughput_fibre',
    'fwhm_fibre' (n_fibre, n_pix, frame row order); 'std_true_flux' and
    'program_true_flux' are then at each star's own wavelengths. The noise draw
    is that of the same frame without these options.

    ``model(params (1, 4), wave) -> (flux (1, n), ...)`` replaces :func:`demo_model` as
    the stars' surface flux (e.g. :func:`grid_interpolated_model`).
    """
    n_standards, n_program, n_sky, n_pix = int(n_standards), int(n_program), int(n_sky), int(n_pix)
    n_fibre, wave, fwhm = _checked_grid(n_standards, n_program, n_sky, n_pix, square, snr, wave_range, fwhm)
    ss = np.random.SeedSequence(int(seed))
    rng_order, rng_std, rng_prog, rng_noise, rng_pos, rng_cat = (np.random.default_rng(s) for s in ss.spawn(6))

    # the stars, in source order (standards, then program stars), and their brightness
    std_params, std_rv, std_rmag, mag_err = _draw_standards(rng_std, n_standards, params, rvs)
    prog_params, prog_rv, prog_rmag = _draw_program(rng_prog, n_program)
    all_params, all_rv = np.concatenate([std_params, prog_params]), np.concatenate([std_rv, prog_rv])
    dilution, std_mags = _dilutions_and_mags(demo_model if model is None else model, all_params, all_rv,
                                             np.concatenate([std_rmag, prog_rmag]), n_standards)

    # each source's wavelengths and LSF (std, program, sky), the stars' spectra there, then the atmosphere
    varying = wave_jitter is not None or fwhm_poly is not None or bool(fwhm_scatter)
    src_wave, _, _ = _fibre_waves(wave, n_fibre, wave_jitter, seed)
    src_fwhm = _fibre_fwhm(src_wave, fwhm, fwhm_poly, fwhm_scatter, seed) if varying else None
    conv, fine_step, margin = _star_spectra(all_params, all_rv, dilution, wave, src_wave, src_fwhm, fwhm, model,
                                            varying)
    at = src_wave if varying else wave  # where throughput and telluric are evaluated, per source
    absorbed, tell, after_lsf = _absorbed(conv, telluric, at, varying, all_params, all_rv, dilution, wave, fwhm,
                                          fine_step, margin, model)
    thr, scale = _frame_throughput(throughput, conv, n_standards, at, tell, varying, snr, read_noise, n_pix)

    # the fibres: shuffled, observed, tabulated
    names, types = _source_names(n_standards, n_program, n_sky)
    perm = _fibre_order(rng_order, n_standards, n_fibre)
    counts_true, var, flux = _observed(absorbed, n_sky, thr, after_lsf, perm, read_noise, noise, rng_noise)
    ra, dec = _positions(rng_pos, n_fibre)
    fibres = _fibre_table(names, types, perm, ra, dec)
    catalogue = _catalogue(names[:n_standards], ra[:n_standards], dec[:n_standards], std_mags, mag_err, mag_noise,
                           rng_cat)
    truth = _truth(n_standards, n_program, (std_params, std_rv), (prog_params, prog_rv), perm, conv, dilution,
                   std_mags, counts_true, thr, tell, fwhm, snr, read_noise)
    if varying:
        truth = _add_per_fibre_truth(truth, perm, src_wave, src_fwhm, wave, scale, telluric)
        wave = truth["wave_fibre"] if wave_jitter is not None else wave
    return DemoFrame(wave=wave, flux=flux, var=var, fibres=fibres, catalogue=catalogue, truth=truth)


def write_catalogue_csv(catalogue, path) -> str:
    """Write a demo catalogue as CSV with header ``name,ra,dec,g,dg,r,dr,i,di,z,dz``."""
    cols = ("name", "ra", "dec", "g", "dg", "r", "dr", "i", "di", "z", "dz")
    path = str(path)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(",".join(cols) + "\n")
        for row in catalogue:
            vals = [str(row["name"]), f"{float(row['ra']):.8f}", f"{float(row['dec']):.8f}"]
            vals += [f"{float(row[c]):.6f}" for c in cols[3:]]
            fh.write(",".join(vals) + "\n")
    return path


# --------------------------------------------------------------------------- issue 14: off-node frames
#: Parameter box of the off-node standards: inside the demo 240-model grid of issue 14
#: (Teff 4500-8000 K, logg 3.5-5.0, [M/H] -1.0..+0.5), clear of its faces.
OFFNODE_BOX = ((4600.0, 7900.0), (3.6, 4.9), (-0.9, 0.4))


def offnode_grid():
    """The issue's ~240-model grid: Teff 4500-8000 K step 250, logg 3.5-5.0 step 0.5, [M/H] -1.0..+0.5 step 0.5."""
    from .templates.demo import demo_grid

    return demo_grid()  # the demo grid is that grid (DEMO_TEFF, DEMO_LOGG, DEMO_MH)


def structured_throughput(wave, *, seed=0, kind="structured") -> np.ndarray:
    """Relative throughput with structure (max ≈ 1): a steep blue cut-off, a 10-20 % dip 60-150 Å wide, ripple.

    ``kind="smooth"``: the demo's bell alone. Otherwise the bell times a logistic
    cut-off (half power at 3850-3950 Å, 40 Å scale), a Gaussian dip (depth 10-20 %,
    FWHM 60-150 Å, centred 4800-8200 Å) and a 2-4 % sinusoidal ripple (period
    250-600 Å), each drawn from ``seed``.
    """
    wave = np.asarray(wave, dtype=np.float64)
    shape = _throughput_shape(wave)
    if kind == "smooth":
        return shape / shape.max()
    if kind != "structured":
        raise ValueError(f"throughput kind must be 'structured' or 'smooth', got {kind!r}")
    rng = np.random.default_rng(seed)
    cut = 1.0 / (1.0 + np.exp(-(wave - rng.uniform(3850.0, 3950.0)) / 40.0))
    depth, fwhm, centre = rng.uniform(0.10, 0.20), rng.uniform(60.0, 150.0), rng.uniform(4800.0, 8200.0)
    dip = 1.0 - depth * np.exp(-0.5 * ((wave - centre) / (fwhm / FWHM_PER_SIGMA)) ** 2)
    ripple = 1.0 + rng.uniform(0.02, 0.04) * np.sin(2.0 * np.pi * wave / rng.uniform(250.0, 600.0) + rng.uniform(0, 6))
    out = shape * cut * dip * ripple
    return out / out.max()


def cell_corners(theta, axes):
    """The corners (node values) of θ's cell on ``axes`` and their multilinear weights: a host loop, for truths."""
    lo = [int(np.clip(np.searchsorted(a, theta[j], side="right") - 1, 0, len(a) - 2)) for j, a in enumerate(axes)]
    out = []
    for c in itertools.product((0, 1), repeat=len(axes)):
        node, w = [], 1.0
        for d, a in enumerate(axes):
            f = (theta[d] - a[lo[d]]) / (a[lo[d] + 1] - a[lo[d]])
            node.append(a[lo[d] + 1] if c[d] else a[lo[d]])
            w *= f if c[d] else 1.0 - f
        out.append((tuple(node), w))
    return out


def grid_interpolated_model(params, wave):
    """The demo model's fluxes at the corners of θ's cell in the demo grid, blended multilinearly: (flux (1, n), None).

    A star "flux-interpolated between nodes": what a grid can represent exactly off its nodes.
    """
    from .templates.demo import DEMO_LOGG, DEMO_MH, DEMO_TEFF

    th = np.asarray(params, dtype=np.float64).reshape(-1)
    out = 0.0
    for node, w in cell_corners(th, (DEMO_TEFF, DEMO_LOGG, DEMO_MH)):
        out = out + w * demo_model(np.array([[*node, th[3]]]), wave)[0][0]
    return np.asarray(out)[None, :], None


def simulate_offnode_frame(*, n_std=20, n_prog=10, n_sky=2, snr=50.0, seed=0, throughput="structured",
                           fwhm=2.0, n_pix=4000, wave_range=(3700.0, 9300.0), telluric=True,
                           box=OFFNODE_BOX, rv_max=150.0, read_noise=3.0, spectra="model") -> DemoFrame:
    """A frame whose standards are NOT grid nodes: random (Teff, logg, [M/H]) in ``box``, RVs within ±``rv_max``.

    ``spectra="model"``: the stars' spectra are the demo model evaluated at their own
    parameters (:func:`gpucal.templates.demo.demo_model`), so no grid contains them
    (the grid's own interpolation error is in the answer); ``"interpolated"``: flux-
    interpolated between the demo grid's nodes (:func:`grid_interpolated_model`). The throughput is :func:`structured_throughput` of ``kind``
    ``throughput`` (seeded), scaled so that the median S/N of the standards' pixels
    is ``snr``; telluric bands as :func:`simulate_frame`. Program fibres (random
    parameters, r 16-18.5) carry their truth ('program_true_flux'). Catalogue
    magnitudes exact (their errors 0.01-0.02 mag). ``truth`` as
    :func:`simulate_frame`'s, plus 'throughput_kind'.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 14]))
    params = np.stack([rng.uniform(*box[0], n_std), rng.uniform(*box[1], n_std), rng.uniform(*box[2], n_std),
                       np.zeros(n_std)], axis=1)
    rvs = rng.uniform(-rv_max, rv_max, n_std)
    wave = np.linspace(float(wave_range[0]), float(wave_range[1]), int(n_pix))
    shape = structured_throughput(wave, seed=int(seed), kind=throughput)
    sim = simulate_frame(n_standards=n_std, n_program=n_prog, n_sky=n_sky, rvs=rvs, params=params, snr=snr,
                         fwhm=fwhm, wave_range=wave_range, n_pix=n_pix, seed=seed, throughput=shape,
                         telluric=telluric, noise=False, read_noise=read_noise,
                         model={"model": None, "interpolated": grid_interpolated_model}[spectra])
    t = sim.truth
    m = float(np.median(t["std_true_flux"] * shape * t["telluric"]))
    c = 0.5 * (snr**2 + math.sqrt(snr**4 + 4.0 * snr**2 * read_noise**2))
    k = c / m
    counts = t["counts_true"] * k
    var = counts + read_noise**2
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 14, 1]))
    flux = counts + noise_rng.standard_normal(counts.shape) * np.sqrt(var)
    truth = dict(t, throughput=shape * k, counts_true=counts, throughput_kind=throughput, snr=float(snr),
                 spectra=spectra)
    return DemoFrame(wave=sim.wave, flux=flux, var=var, fibres=sim.fibres, catalogue=sim.catalogue, truth=truth)

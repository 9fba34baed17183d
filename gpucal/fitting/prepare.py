"""Grid preparation: the template grid and the observed standards made comparable.

Step of the mission before the scan (:mod:`gpucal.fitting.scan`). Once per
grid and instrument setting, :func:`prepare_grid` convolves the templates to
the instrument LSF (:mod:`gpucal.fitting.lsf`), resamples them onto a
log-uniform working grid (:func:`working_grid`) and divides them by their
continua (:mod:`gpucal.fitting.continuum`); it also tabulates each node's
grid neighbours (:func:`grid_neighbours`) for the refinement. Per frame,
:func:`normalise_observed` continuum-normalises the standards the same way
and gives bad, telluric and outlying pixels zero weight. The trial
velocities (:func:`velocity_grid`) are whole sub-pixel steps of the same
working grid. :func:`gather_templates` and :func:`template_blocks` read a
prepared grid that may live on the host (memory-mapped) onto the backend.

Shapes: wave_obs (n_pix,) Å, or (n_star, n_pix) per-fibre wavelengths; grid flux (n_t, n_w) on its own wavelengths;
working grid (n_q,) Å, log-uniform; prepared norm_flux (n_t, n_q), float32
by default; standards (n_star, n_pix). Velocities in km/s, positive = receding.
"""

from __future__ import annotations

import math

from array_api_compat import device as _device

from ..backends import array_namespace, backend_of, interp, to_backend, to_numpy
from ..containers import PreparedGrid, SpectraBatch, TemplateGrid
from ..errors import CoverageError, InputError
from ..units import C_KMS, FWHM_TO_SIGMA
from .continuum import fit_continuum
from .lsf import convolve_to_instrument, instrument_fwhm
from .masks import TELLURIC_DEFAULT, cap_local_weights, local_outliers, region_mask

__all__ = [
    "velocity_grid",
    "working_grid",
    "prepare_grid",
    "grid_neighbours",
    "normalise_observed",
    "gather_templates",
    "template_blocks",
]


def velocity_grid(vmin: float, vmax: float, step: float, *, like):
    """Trial velocities from vmin to vmax (km/s, inclusive) in steps of ``step``, on ``like``'s device.

    The steps are uniform in rapidity, v_k = c·tanh(k·Δ) with Δ = atanh(step / c),
    so the Doppler factor is exactly 1 + z_k = exp(k·Δ): every trial shift is
    a whole number of the same sub-pixel step on the log-λ working grid (see
    :func:`working_grid`). Below 1000 km/s the grid is uniform in velocity to
    a few parts in 10⁶ of the step. Zero is on the grid when vmin ≤ 0 ≤ vmax.
    """
    if not (step > 0 and vmax > vmin):
        raise InputError(f"velocity range needs vmin < vmax and step > 0, got {vmin}:{vmax}:{step}")
    if max(abs(vmin), abs(vmax)) >= 0.1 * C_KMS:
        raise InputError(f"velocity range {vmin}:{vmax} km/s is beyond what a stellar RV scan supports")
    xp = array_namespace(like)
    delta = math.atanh(step / C_KMS)
    k0 = math.ceil(math.atanh(vmin / C_KMS) / delta - 1e-6)
    k1 = math.floor(math.atanh(vmax / C_KMS) / delta + 1e-6)
    k = xp.arange(k0, k1 + 1, dtype=xp.float64, device=_device(like))
    return C_KMS * xp.tanh(k * delta)


def working_grid(wave_obs, vstep: float | None = None):
    """Log-uniform grid over the frame's range, sampled like the frame's median pixel.

    With ``vstep`` (km/s) the step is rounded to a whole number P of velocity
    steps, Δlnλ = P·atanh(vstep / c), so that a velocity trial of
    :func:`velocity_grid` is a whole-pixel lag plus one of P sub-pixel
    phases: the scan then interpolates the data at P phases instead of at
    every trial velocity.
    """
    xp = array_namespace(wave_obs)
    # Per-fibre wavelengths (n_spec, n_pix): one grid over every fibre's range.
    n = wave_obs.shape[-1]
    lo, hi = float(xp.min(wave_obs[..., 0])), float(xp.max(wave_obs[..., n - 1]))
    # Median of Δλ/λ: the working grid keeps about the frame's number of pixels.
    rel = xp.reshape(xp.log(wave_obs[..., 1:] / wave_obs[..., :-1]), (-1,))
    dln = float(xp.sort(rel)[(rel.shape[0] - 1) // 2])
    if vstep is not None:
        delta = math.atanh(vstep / C_KMS)
        dln = max(1, round(dln / delta)) * delta
    nq = int(math.floor(math.log(hi / lo) / dln)) + 1
    return lo * xp.exp(dln * xp.arange(nq, dtype=xp.float64, device=_device(wave_obs)))


def prepare_grid(grid: TemplateGrid, wave_obs, *, fwhm=None, fwhm_poly=None, resolution=None,
                 dtype=None, continuum_degree: int = 7, good_regions=TELLURIC_DEFAULT,
                 block_size: int = 2048, out=None, neighbours: bool = True,
                 vstep: float | None = 5.0) -> PreparedGrid:
    """Convolve the grid to the instrument LSF, resample onto the working grid, normalise.

    The grid may live on the host (even memory-mapped): it is processed in
    blocks of ``block_size`` templates on ``wave_obs``'s backend. With ``out``
    (a writable host array of shape (n_t, n_q), e.g. a memory-mapped .npy
    file sized with :func:`working_grid`) each block is written there and the
    result is streamed back by the scan; otherwise it stays on the backend.
    ``vstep`` (km/s) aligns the working grid with the velocity scan's step
    (:func:`working_grid`); scans with another step still work, by
    interpolating the data at every trial velocity. The grid must cover the
    frame's wavelength range plus six LSF σ on each side; otherwise
    CoverageError says which range is missing.
    """
    be = backend_of(wave_obs)
    xp = be.xp
    dtype = xp.float32 if dtype is None else dtype
    wq = working_grid(wave_obs, vstep)
    cw, i0, i1 = _grid_window(grid, wq, be, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    weights = xp.astype(region_mask(wq, good_regions), xp.float64)[None, :]
    n_t = int(grid.flux.shape[0])
    blocks = []
    for b0 in range(0, n_t, block_size):
        b1 = min(n_t, b0 + block_size)  # strict array API: no out-of-range slice stops
        flux = to_backend(grid.flux[b0:b1, i0:i1], be, dtype=xp.float64)
        conv = convolve_to_instrument(cw, flux, fwhm=fwhm, fwhm_poly=fwhm_poly,
                                      resolution=resolution, template_fwhm=grid.resolution_fwhm)
        tq = interp(wq, cw, conv)
        cont = fit_continuum(wq, tq, xp.broadcast_to(weights, tq.shape), degree=continuum_degree)
        norm = xp.astype(tq / cont, dtype)
        if out is not None:
            out[b0:b1, :] = to_numpy(norm)
        else:
            blocks.append(norm)
    norm_flux = out if out is not None else xp.concat(blocks, axis=0)
    lsf = {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else list(fwhm_poly), "resolution": resolution}
    params = to_backend(grid.params, be, dtype=xp.float64)
    nb = grid_neighbours(params) if neighbours and n_t > 1 else None
    return PreparedGrid(params=params, wave=wq, norm_flux=norm_flux, lsf=lsf, neighbours=nb)


def _grid_window(grid: TemplateGrid, wq, be, *, fwhm, fwhm_poly, resolution):
    """The grid's wavelengths the working grid ``wq`` needs, six LSF σ beyond each end, and their index range [i0, i1).

    CoverageError, naming the missing ranges, where the grid stops short.
    """
    xp = be.xp
    nq = wq.shape[0]
    lo, hi = float(wq[0]), float(wq[nq - 1])
    fw_edge = instrument_fwhm(xp.asarray([lo, hi], dtype=xp.float64, device=_device(wq)),
                              fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    pad = 6.0 * FWHM_TO_SIGMA * float(xp.max(fw_edge))
    gw = to_backend(grid.wave, be, dtype=xp.float64)
    nw = gw.shape[0]
    glo, ghi = float(gw[0]), float(gw[nw - 1])
    if glo > lo - pad or ghi < hi + pad:
        missing = []
        if glo > lo - pad:
            missing.append(f"{lo - pad:.1f}-{glo:.1f} Å")
        if ghi < hi + pad:
            missing.append(f"{ghi:.1f}-{hi + pad:.1f} Å")
        raise CoverageError(
            f"template grid ({glo:.1f}-{ghi:.1f} Å) does not cover the frame "
            f"({lo:.1f}-{hi:.1f} Å plus {pad:.1f} Å for the LSF); missing {', '.join(missing)}"
        )
    inside = (gw >= lo - pad) & (gw <= hi + pad)
    i0 = int(xp.argmax(xp.astype(inside, xp.int32)))
    i1 = i0 + int(xp.sum(xp.astype(inside, xp.int32)))
    return gw[i0:i1], i0, i1


def grid_neighbours(params):
    """Neighbour of every node along each parameter axis: (n_t, 4, 2) int, -1 where none.

    [t, j, 0] is the node one step below t along parameter j (all other
    parameters equal), [t, j, 1] one step above. Computed once per grid from
    its (small) parameter table, on the host, and returned on ``params``'s device.
    """
    xp = array_namespace(params)
    rows = [tuple(r) for r in to_numpy(params).tolist()]
    index = {r: i for i, r in enumerate(rows)}
    n_par = len(rows[0]) if rows else 0
    axes = [sorted({r[j] for r in rows}) for j in range(n_par)]
    pos = [{v: k for k, v in enumerate(a)} for a in axes]
    out = []
    for r in rows:
        entry = []
        for j in range(n_par):
            k = pos[j][r[j]]
            pair = []
            for dk in (-1, 1):
                kk = k + dk
                if 0 <= kk < len(axes[j]):
                    pair.append(index.get(r[:j] + (axes[j][kk],) + r[j + 1:], -1))
                else:
                    pair.append(-1)
            entry.append(pair)
        out.append(entry)
    return xp.asarray(out, dtype=xp.int64, device=_device(params))


def normalise_observed(spectra: SpectraBatch, *, good_regions=TELLURIC_DEFAULT, continuum_degree: int = 7):
    """Continuum-normalised flux and its inverse variance, (n_star, n_pix) each.

    Bad pixels (mask False, NaN flux, non-positive or non-finite variance),
    the ``good_regions``-excluded bands and single pixels far above their
    neighbours (hot pixels, cosmic rays: :func:`gpucal.fitting.masks.local_outliers`)
    get zero weight and zero flux; an inverse variance far above its
    neighbours' is capped (:func:`gpucal.fitting.masks.cap_local_weights`).
    """
    xp = array_namespace(spectra.flux)
    f, v = spectra.flux, spectra.var
    good = spectra.mask & xp.isfinite(f) & xp.isfinite(v) & (v > 0)
    good = good & region_mask(spectra.wave, good_regions)  # (n_pix,) or per fibre (n_star, n_pix)
    w = xp.where(good, 1.0 / xp.where(good, v, 1.0), 0.0)
    ff = xp.where(good, f, 1.0)
    cont = fit_continuum(spectra.wave, ff, w, degree=continuum_degree)
    # Over bad pixels a fit run wild (0 or inf after exp) must not divide or multiply: 1 and 0 there.
    dn = xp.where(good, ff / xp.where(good, cont, 1.0), 0.0)
    cont_w = xp.where(w > 0, cont, 0.0)
    wn = w * cont_w * cont_w
    # A hot pixel or cosmic ray would pull every template's χ² by itself, and so would a pixel
    # with a wrongly tiny variance. In a normalised absorption spectrum no real pixel stands far
    # above both its neighbours and 1.5 x the continuum (two-pixel windows between deep lines can
    # stand well above their neighbours, but not above the continuum).
    good = good & ~(local_outliers(dn, wn, good, nsigma=8.0, side="high") & (dn > 1.5))
    wn = cap_local_weights(wn, good)
    return xp.where(good, dn, 0.0), wn, good


def gather_templates(norm_flux, be, idx):
    """Rows ``idx`` of a (possibly host, memory-mapped) template array, on the backend."""
    xp = be.xp
    try:
        same = array_namespace(norm_flux) is xp
    except TypeError:
        same = False
    if same:
        return xp.take(norm_flux, idx, axis=0)
    rows = to_numpy(idx)
    return to_backend(norm_flux[rows, ...], be)


def template_blocks(norm_flux, be):
    """Slice -> backend array; a host (memory-mapped) grid is streamed block by block."""
    def get(b0, b1):
        return to_backend(norm_flux[b0:b1, :], be)
    return get

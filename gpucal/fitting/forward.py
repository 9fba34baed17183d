"""The continuous forward-model fit after the grid scan: (Teff, logg, [M/H], [α/M], v) at the noise floor.

Step of the mission after :func:`gpucal.fitting.scan.match_templates` (which
finds each star's neighbourhood) and before the photometric scale. Every
standard's counts are modelled as

    C(λ) = P(λ) · S(θ)(λ / D(v)),     P(λ) = Σ_k c_k L_k(x(ln λ)),

S(θ) the grid's fluxes convolved to the instrument LSF on a log-uniform
working grid ``FIT_OVERSAMPLE`` times finer than the frame's pixels
(:func:`fit_grid`; interpolating pre-convolved templates is exact for a
linear LSF, and the fine sampling keeps the linear interpolation at the
shifted pixels from biasing θ) interpolated multilinearly in θ over
the corners of its cell (:mod:`gpucal.fitting.cells`: free to cross cells,
confined to the complete cells, never interpolated across a missing node),
D(v) the relativistic Doppler factor, and P a Legendre series of degree
``degree`` in ln λ over each star's own pixel range. P absorbs the
throughput (and the star's distance and the fibre's light loss), so nothing
divides the data: a throughput with structure cannot tilt θ the way a
continuum-normalised comparison does (what P cannot follow, e.g. a narrow
dip, stays in the residuals, where it is common to all stars).

Optimiser: Levenberg–Marquardt on p = (θ, v) with the c_k solved linearly at
each evaluation (variable projection; the Jacobian is the derivative of
P·S(θ, v) projected off the span of the L_k·S columns, Kaufman's form). All
stars and all starting points run batched; a fixed number of iterations with
per-row accept/reject by ``xp.where`` — no host synchronisation inside the
loop. Rows start from the scan's refined parameters and its best node; from
iteration ``KEEP_BEST_AT`` only the better of the two (lower χ²) goes on, chosen on
the device (a ``take``, no host check). Pixel outliers: the scan's per-star logic
(:func:`~gpucal.fitting.prepare.normalise_observed`: hot pixels, capped
weights) on a common wavelength grid, and pixels beyond ``clip_nsigma`` σ of
the current model cut during the iterations (:data:`CLIP_AT`).

Photometry: the catalogue magnitudes as a term of χ², the synthetic
magnitudes of S(θ) being Σ_c w_c 10^(−0.4 m_c) of the nodes' (exact for the
multilinear flux interpolant), against the catalogue with a free common
offset (so only colours constrain θ), weights 1/(σ_b² + floor²), times
``weight``. χ²_spec and χ²_phot are reported apart.

Covariance: the inverse of the (undamped) curvature at the end, inflated by
χ²/dof where that exceeds 1. Flags: ``on_hull`` (θ on the edge of the
complete cells), ``converged`` (the undamped step would gain less than
``tol`` in χ², or the star is held on the hull).

P and the calibration vector: the vector is Cal = s · S_full(θ, v) ⊗ LSF / C
(:mod:`gpucal.calibration.vectors`, s from photometry, S_full the same
interpolant of the full-range grid, :func:`fitted_templates`), and the model
gives C ≈ P · S, so Cal ≈ s / P: P is the smooth part of s / Cal, a check on
both (:func:`poly_on_pixels` gives P on the pixels; tests/test_forward.py).

Shapes: wave (n_pix,) or (n_star, n_pix) Å; flux, var (n_star, n_pix) counts;
working grid (n_q,); θ (n_star, 4); v (n_star,) km/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from array_api_compat import device as _device

from ..backends import array_namespace, backend_of, interp, masked_median, to_backend
from ..containers import MatchResult, PreparedGrid, SpectraBatch, TemplateGrid
from ..errors import InputError
from ..units import C_KMS, doppler_factor
from .cells import cell_grid, corner_weights, locate, on_hull_face
from .masks import TELLURIC_DEFAULT, cap_local_weights, region_mask, running_mean
from .lsf import convolve_to_instrument
from .prepare import _grid_window, gather_templates, normalise_observed
from .refine import refined_templates

__all__ = ["CLIP_AT", "FIT_DEGREE", "FIT_OVERSAMPLE", "KEEP_BEST_AT", "PhotometricTerm", "fit_wave", "fit_grid", "fit_forward",
           "common_shape", "divide_shape", "fitted_templates", "with_node_fallback",
           "poly_on_pixels"]

#: Default Legendre degree of P(λ), established on off-node frames (bench/forward_accuracy.py, 240-node
#: grid, S/N 50, seed 0 unless said, four common-shape passes; combined-vector RMS outside the telluric
#: bands, mean ΔTeff):
#:
#:   degree                      10              15              20              25              30
#:   structured, 20 std     0.163 % +8 K    0.161 % +4 K    0.177 % +8 K    0.177 % +8 K    0.178 % +8 K
#:   smooth, 20 std         0.165 % +1 K    0.163 % +1 K    0.167 % +0 K    0.166 % -0 K    0.168 % -0 K
#:   structured, 20, seed 1                 0.173 % +2 K    0.180 % +2 K
#:   structured, 6 std                      0.242 % +7 K    0.273 % +12 K
#:
#: flat between 10 and 30 once the common shape takes the structure P cannot follow; 15 is the best
#: of these and the cheaper (the normal matrices grow as the degree squared).
FIT_DEGREE = 15
#: The fit's working grid samples the frame this many times finer than its median pixel: linear
#: interpolation of the grid at the shifted pixels is then accurate to ~1/16 of its error at one
#: sample per pixel (which biased logg and [M/H] by 0.02 dex at S/N 50, tests/test_forward.py).
FIT_OVERSAMPLE = 4
#: With two starts per star, only the better one (lower χ²) is iterated from this iteration on
#: (None: both to the end). Measured on bench/forward_accuracy.py's 16 frames (2-core VM): 5 gives
#: the same or better vectors and parameters on every frame than None (the bad 6-standard frame
#: 0.759 -> 0.695 %); with the outlier cut at iterations 1 and 3, 3 moved one frame's RV RMS
#: 0.95 -> 1.05 km/s. With one cut (at 1, :data:`CLIP_AT`) 3 and 4 gave the same 16 frames; against
#: 5 with two cuts, vector RMS: the bad frame 0.695 -> 0.442 %, three others better by 0.010-0.025 %,
#: one worse by 0.005 % (0.193 -> 0.198), eleven within 0.004 %; RV RMS at most 0.88 km/s, median
#: |ΔTeff| at most 29 K. The first fit's evaluations of 40 rows (20 stars) drop from 8 to 5.
KEEP_BEST_AT = 3
#: The iterations at which the pixels beyond ``clip_nsigma`` of the current model are cut (the
#: scan's per-star outlier logic runs before; each shape pass cuts again at its iteration 1).
CLIP_AT = (1,)
KEEP_BEST_AT = 3
_LN10_25 = 2.5 / math.log(10.0)


def fit_wave(wave, oversample: int = FIT_OVERSAMPLE):
    """A log-uniform grid over ``wave``'s range ((n_pix,) or (n_star, n_pix)), ``oversample`` × its median pixel.

    Pass it to :func:`~gpucal.fitting.prepare.prepare_grid` (``vstep=None``) to get the
    fit's working grid.
    """
    xp = array_namespace(wave)
    flat = xp.reshape(wave, (-1,)) if wave.ndim == 1 else wave[0, :]
    lo, hi = float(xp.min(wave)), float(xp.max(wave))
    n = flat.shape[0]
    dln = float(xp.sort(xp.log(flat[1:] / flat[:-1]))[(n - 1) // 2]) / oversample
    nq = int(math.floor(math.log(hi / lo) / dln)) + 1
    return lo * xp.exp(dln * xp.arange(nq, dtype=xp.float64, device=_device(wave)))


def fit_grid(grid: TemplateGrid, wave, *, fwhm=None, fwhm_poly=None, resolution=None,
             oversample: int = FIT_OVERSAMPLE, dtype=None, block_size: int = 512) -> PreparedGrid:
    """The grid convolved to the instrument LSF on the fit's fine working grid (:func:`fit_wave`).

    Like :func:`~gpucal.fitting.prepare.prepare_grid` but neither normalised nor
    aligned with the velocity scan: ``norm_flux`` holds the convolved fluxes
    themselves (``dtype``, default float32: they enter χ² only through the
    float64 model, and their rounding is 1e-7 of the signal), so that the
    fit's interpolant is that of the fluxes, the same one
    :func:`fitted_templates` applies to the full grid. The grid may live on the
    host (memory-mapped): it is convolved in blocks of ``block_size`` templates.
    """
    be = backend_of(wave)
    xp = be.xp
    dtype = xp.float32 if dtype is None else dtype
    wq = fit_wave(wave, oversample)
    cw, i0, i1 = _grid_window(grid, wq, be, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    n_t = int(grid.flux.shape[0])
    blocks = []
    for b0 in range(0, n_t, block_size):
        flux = to_backend(grid.flux[b0:min(n_t, b0 + block_size), i0:i1], be, dtype=xp.float64)
        conv = convolve_to_instrument(cw, flux, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution,
                                      template_fwhm=grid.resolution_fwhm)
        blocks.append(xp.astype(interp(wq, cw, conv), dtype))
    lsf = {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else list(fwhm_poly), "resolution": resolution}
    return PreparedGrid(params=to_backend(grid.params, be, dtype=xp.float64), wave=wq,
                        norm_flux=xp.concat(blocks, axis=0), lsf=lsf)


@dataclass
class PhotometricTerm:
    """The catalogue's constraint on θ, as backend arrays.

    node_mag : (n_t, n_band) synthetic magnitudes of every grid node on the
        catalogue's system; offset : (n_star, n_band) added to them (e.g. the
        reddening by the star's E(B−V)) or None; mag, err : (n_star, n_band);
        valid : (n_star, n_band) bool; floor : per-band systematic floor (mag);
        weight : the term's weight in χ² (0 = report only).
    """

    node_mag: Any
    mag: Any
    err: Any
    valid: Any
    offset: Any = None
    floor: float = 0.02
    weight: float = 1.0


@dataclass
class _Problem:
    """Everything an evaluation needs, one row per (star, start)."""

    wave: Any      # (n, n_pix)
    basis: Any     # (K, n_pix), shared by every row
    pairs: Any     # (K(K+1)/2, n_pix): basis_j · basis_k for j <= k, the normal matrices in one product
    pair_of: Any   # (K·K,) int: the row of ``pairs`` holding (j, k) (the matrices are symmetric)
    y: Any         # (n, n_pix)
    w: Any         # (n, n_pix)
    lnq0: float    # ln of the working grid's first wavelength
    dln: float
    nq: int
    flat_flux: Any  # (n_t · n_q,) the working grid's fluxes, flattened for one gather per evaluation
    be: Any
    cg: Any
    phot: Any      # dict of row-repeated arrays or None
    free: Any      # (5,) bool


def _legendre(lnw, degree):
    """Legendre polynomials of ``lnw`` (n_pix,) (ln λ) mapped to [−1, 1] over its range: (degree + 1, n_pix)."""
    xp = array_namespace(lnw)
    lo, hi = xp.min(lnw), xp.max(lnw)
    x = 2.0 * (lnw - lo) / (hi - lo) - 1.0
    cols = [xp.ones_like(x), x]
    for k in range(1, degree):
        cols.append(((2 * k + 1) * x * cols[k] - k * cols[k - 1]) / (k + 1))
    return xp.stack(cols[: degree + 1], axis=0)


def _basis_pairs(basis):
    """The products of the basis' rows (K, n_pix) two by two, j <= k: (K(K+1)/2, n_pix), and (K·K,) the row of each (j, k)."""
    xp = array_namespace(basis)
    k = basis.shape[0]
    jj = [j for j in range(k) for i in range(j, k)]
    kk = [i for j in range(k) for i in range(j, k)]
    row = {(j, i): r for r, (j, i) in enumerate(zip(jj, kk))}
    dev = _device(basis)
    pairs = xp.take(basis, xp.asarray(jj, dtype=xp.int64, device=dev), axis=0) * xp.take(basis, xp.asarray(kk, dtype=xp.int64, device=dev), axis=0)
    of = [row[(min(j, i), max(j, i))] for j in range(k) for i in range(k)]
    return pairs, xp.asarray(of, dtype=xp.int64, device=dev)


def _mean_lnw(wave):
    """ln λ of each pixel, (n_pix,): the frame's (n_pix,) wavelengths, or the stars' mean at each pixel.

    P(λ) is one Legendre series in this for every star: with per-fibre wavelengths (offsets of a
    fraction of a pixel) a smooth function of the mean solution is as smooth in each fibre's own λ.
    """
    xp = array_namespace(wave)
    lnw = xp.log(wave)
    return lnw if wave.ndim == 1 else xp.mean(lnw, axis=0)


def _rows(a, k):
    """Each leading row of ``a`` repeated ``k`` times in place (star-major rows)."""
    xp = array_namespace(a)
    return xp.reshape(xp.broadcast_to(a[:, None, ...], (a.shape[0], k) + tuple(a.shape[1:])),
                      (a.shape[0] * k,) + tuple(a.shape[1:]))


def _observed(spectra: SpectraBatch, good_regions, pixels=None):
    """Wavelengths (n_star, n_pix), counts, capped inverse variance and usable pixels.

    ``pixels`` (n_star, n_pix) bool: the usable pixels an earlier pass found (the scan's outlier
    logic is not run again); None: found here.
    """
    xp = array_namespace(spectra.flux)
    wave = spectra.wave
    wave2 = xp.broadcast_to(wave[None, :], spectra.flux.shape) if wave.ndim == 1 else wave
    f, v = spectra.flux, spectra.var
    good = spectra.mask & xp.isfinite(f) & xp.isfinite(v) & (v > 0) & region_mask(wave2, good_regions)
    if pixels is not None:
        good = good & pixels
    elif wave.ndim == 1:  # the scan's per-star outlier logic (hot pixels, cosmic rays)
        good = good & normalise_observed(spectra, good_regions=good_regions)[2]
    w = xp.where(good, 1.0 / xp.where(good, v, 1.0), 0.0)
    return wave2, xp.where(good, f, 0.0), cap_local_weights(w, good), good


def _mt(a):
    xp = array_namespace(a)
    return xp.permute_dims(a, (0, 2, 1))


def _model_rows(pb: _Problem, theta, v, good):
    """S, ∂S/∂p on the frame's pixels for each row: (M (n, n_pix), dM (n, 5, n_pix), usable (n, n_pix), corners).

    The shifted pixels' positions on the log-uniform working grid are computed, not searched
    for; each corner template is gathered at the two samples around every pixel and the corners
    blended there: with T_c(x) = a_c + f·b_c (a the sample below, b the step to the next),
    S = Σ_c w_c a_c + f Σ_c w_c b_c, ∂S/∂θ the same with ∂w_c/∂θ, and ∂S/∂ln x = Σ_c w_c b_c / Δln q,
    the linear interpolant's exact slope: the blend is a product per star, and only its 5 rows
    meet the pixels' f. In float64: ∂S/∂θ is a difference of neighbouring nodes' fluxes, and
    blended in the grid's float32 the fit's end moved by 1e-5 (relative, in the vectors) with the
    last bit of the grid's copy (in memory or from the template cache: tests/test_options.py).
    Values outside ``usable`` are finite and carry no weight (the caller zeroes the weights there).
    """
    xp = pb.be.xp
    th, cell, moved = locate(pb.cg, theta)
    idx, wc, dwc = corner_weights(pb.cg, th, cell)
    u = (xp.log(pb.wave) - xp.log(doppler_factor(v))[:, None] - pb.lnq0) / pb.dln  # (n, n_pix)
    inside = (u >= 0.0) & (u <= pb.nq - 1)
    i0 = xp.astype(xp.clip(xp.floor(u), 0.0, pb.nq - 2.0), xp.int64)
    frac = xp.clip(u - xp.astype(i0, xp.float64), 0.0, 1.0)[:, None, :]
    at = xp.reshape(idx[:, :, None] * pb.nq + i0[:, None, :], (-1,))  # (n · nc · n_pix,)
    shape = idx.shape + (i0.shape[1],)
    a = xp.reshape(xp.astype(xp.take(pb.flat_flux, at), xp.float64), shape)
    b = xp.reshape(xp.astype(xp.take(pb.flat_flux[1:], at), xp.float64), shape) - a  # the next samples
    wts = xp.concat([wc[:, None, :], _mt(dwc)], axis=1)  # (n, 5, nc): S, ∂S/∂θ
    slope = wts @ b
    rows = wts @ a + frac * slope
    beta = v / C_KMS
    dlnx_dv = -1.0 / (C_KMS * (1.0 - beta * beta)) / pb.dln  # -(d ln D / dv) / Δln q
    dv = slope[:, :1, :] * dlnx_dv[:, None, None]
    return rows[:, 0, :], xp.concat([rows[:, 1:5, :], dv], axis=1), good & inside, (idx, wc, dwc, moved)


def _evaluate(pb: _Problem, theta, v, good):
    """χ², gradient and curvature of every row at (θ, v), P solved inside (variable projection).

    The P columns are A_k = L_k·S with one basis L (K, n_pix) for every row, so the normal
    matrices N = AᵀWA of all rows are one product of the weights S²W with the basis' pairwise
    products, and AᵀWy, P and JᵀWA (J = P·∂S/∂p) products with L; c = N⁻¹AᵀWy, and the
    curvature of the projected problem is JᵀWJ − JᵀWA N⁻¹ AᵀWJ.
    """
    xp = pb.be.xp
    m, dm, use, (idx, wc, dwc, moved) = _model_rows(pb, theta, v, good)
    w = xp.where(use, pb.w, 0.0)
    n, k = m.shape[0], pb.basis.shape[0]
    mw = m * w
    normal = xp.reshape(xp.take((mw * m) @ pb.pairs.T, pb.pair_of, axis=1), (n, k, k))
    eye = xp.eye(k, dtype=xp.float64, device=_device(m))
    ridge = xp.sum(xp.linalg.diagonal(normal), axis=1) / k
    normal = normal + xp.where(ridge > 0, 1e-12 * ridge, 1.0)[:, None, None] * eye[None, :, :]
    coef = xp.linalg.solve(normal, ((mw * pb.y) @ pb.basis.T)[:, :, None])[:, :, 0]  # (n, K)
    p = coef @ pb.basis
    r = xp.where(use, pb.y - p * m, 0.0)
    pw = p * w  # J = P·∂S/∂p, so JᵀW· = ∂Sᵀ (P·W·): one weighted copy of ∂S per product
    jwa = xp.reshape(xp.reshape(dm * (pw * m)[:, None, :], (n * 5, -1)) @ pb.basis.T, (n, 5, k))
    curv = (dm * (pw * p)[:, None, :]) @ _mt(dm) - jwa @ xp.linalg.solve(normal, _mt(jwa))
    grad = (dm @ (pw * r)[:, :, None])[:, :, 0]
    chi2s = xp.sum(w * r * r, axis=1)
    chi2p = xp.zeros_like(chi2s)
    wt = 0.0 if pb.phot is None else pb.phot["weight"]
    if pb.phot is not None:
        chi2p, cp, gp = _photometric(pb.phot, idx, wc, dwc)
        grad = grad + wt * xp.concat([gp, xp.zeros((n, 1), dtype=xp.float64, device=_device(r))], axis=1)
        pad = xp.zeros((n, 5, 5), dtype=xp.float64, device=_device(r))
        curv = curv + wt * xp.concat([xp.concat([cp, pad[:, :4, :1]], axis=2), pad[:, :1, :]], axis=1)
    return dict(chi2s=chi2s, chi2p=chi2p, total=chi2s + wt * chi2p, grad=grad, curv=curv, r=r, w=w,
                coef=coef, use=use, idx=idx, wc=wc, moved=moved, model=xp.where(use, p * m, 0.0))


def _photometric(ph, idx, wc, dwc):
    """χ²_phot with a free offset, its curvature (n, 4, 4) and gradient (n, 4) in θ."""
    xp = array_namespace(wc)
    n, nc = idx.shape
    g = xp.reshape(xp.take(ph["node_flux"], xp.reshape(idx, (-1,)), axis=0), (n, nc, -1))
    f = xp.sum(wc[:, :, None] * g, axis=1)
    ok = ph["valid"] & (f > 0)
    f_safe = xp.where(ok, f, 1.0)
    mag = -_LN10_25 * xp.log(f_safe) + ph["offset"]
    dmag = -_LN10_25 * (_mt(dwc) @ g) / f_safe[:, None, :]  # (n, 4, n_band)
    wb = xp.where(ok, ph["wb"], 0.0)
    wsum = xp.sum(wb, axis=1)
    safe = xp.where(wsum > 0, wsum, 1.0)
    resid = xp.where(ok, ph["mag"] - mag, 0.0)
    rho = xp.where(ok, resid - (xp.sum(wb * resid, axis=1) / safe)[:, None], 0.0)
    dmc = xp.where(ok[:, None, :], dmag - (xp.sum(wb[:, None, :] * dmag, axis=2) / safe[:, None])[:, :, None], 0.0)
    return xp.sum(wb * rho * rho, axis=1), (dmc * wb[:, None, :]) @ _mt(dmc), xp.sum(dmc * (wb * rho)[:, None, :], axis=2)


def _step(st, lam, free):
    """The damped Gauss–Newton step (n, 5): (H + λ diag H) δ = g, parameters not ``free`` ((5,) or (n, 5)) held."""
    xp = array_namespace(st["curv"])
    h = st["curv"]
    k = h.shape[1]
    eye = xp.eye(k, dtype=xp.float64, device=_device(h))
    keep = xp.astype(xp.broadcast_to(free, st["grad"].shape), xp.float64)
    diag = xp.linalg.diagonal(h)
    safe = xp.where(diag > 0, diag, 1.0)
    h = h * keep[:, :, None] * keep[:, None, :] + eye[None, :, :] * (1.0 - keep)[:, None, :]
    h = h + (lam[:, None] * safe * keep)[:, :, None] * eye[None, :, :]
    # a relative ridge keeps the solve defined for a star with no usable pixel (zero curvature: a zero
    # step, the star judged later by its verdicts)
    scale = xp.sum(xp.linalg.diagonal(h), axis=1) / k
    h = h + xp.where(scale > 0, 1e-12 * scale, 1.0)[:, None, None] * eye[None, :, :]
    return xp.linalg.solve(h, (st["grad"] * keep)[:, :, None])[:, :, 0], h


def _active_set_step(pb, st, lam, theta):
    """The step with the parameters that sit on a bound of the grid and would leave it held there."""
    xp = pb.be.xp
    dp, h = _step(st, lam, pb.free)
    free = xp.broadcast_to(pb.free, dp.shape)
    blocked = []
    for j in range(4):
        a = pb.cg.axes[j]
        blocked.append(((theta[:, j] <= a[0]) & (dp[:, j] < 0)) | ((theta[:, j] >= a[-1]) & (dp[:, j] > 0)))
    blocked.append(xp.zeros(dp.shape[:1], dtype=xp.bool, device=_device(dp)))
    free = free & ~xp.stack(blocked, axis=1)
    dp2, h2 = _step(st, lam, free)
    return dp2, h2, free


def _merge(accept, new, old):
    xp = array_namespace(accept)
    out = {}
    for key, a in old.items():
        b = new[key]
        mask = xp.reshape(accept, accept.shape + (1,) * (a.ndim - 1))
        out[key] = xp.where(mask, b, a)
    return out


def _take_rows(pb: _Problem, pick) -> _Problem:
    """The problem restricted to the rows ``pick`` (int (m,))."""
    import dataclasses

    xp = pb.be.xp
    phot = None if pb.phot is None else {
        key: (xp.take(val, pick, axis=0) if key in ("mag", "wb", "valid", "offset") else val)
        for key, val in pb.phot.items()}
    return dataclasses.replace(pb, wave=xp.take(pb.wave, pick, axis=0), y=xp.take(pb.y, pick, axis=0),
                               w=xp.take(pb.w, pick, axis=0), phot=phot)


def _iterate(pb, theta, v, vlim, good, *, n_iter, clip_at, clip_nsigma, starts=1, keep_best_at=None):
    """Levenberg–Marquardt over every row at once, a fixed number of iterations (no host check).

    Rows are star-major, ``starts`` per star; at iteration ``keep_best_at`` only each star's row of
    lowest χ² goes on (the others would cost every later evaluation; the returned rows are then one
    per star). Returns θ, v, the evaluation, the last step's acceptance, the usable pixels and the
    rows per star left.
    """
    xp = pb.be.xp
    theta, _, _ = locate(pb.cg, theta)
    st = _evaluate(pb, theta, v, good)
    lam = xp.full(v.shape, 1e-2, dtype=xp.float64, device=_device(v))
    accepted = xp.ones(v.shape, dtype=xp.bool, device=_device(v))
    earlier, th_e, v_e = st["total"], theta, v
    for it in range(n_iter):
        if it == keep_best_at and starts > 1:
            n_star = v.shape[0] // starts
            best = xp.argmin(xp.reshape(st["total"], (n_star, starts)), axis=1)
            pick = xp.arange(n_star, dtype=xp.int64, device=_device(v)) * starts + best
            pb = _take_rows(pb, pick)
            theta, v, lam, accepted, good, earlier, th_e, v_e = (
                xp.take(a, pick, axis=0) for a in (theta, v, lam, accepted, good, earlier, th_e, v_e))
            vlim = tuple(xp.take(a, pick, axis=0) for a in vlim)
            st = {key: xp.take(a, pick, axis=0) for key, a in st.items()}
            starts = 1
        # no cut in the last iterations: what they gain (``recent_gain``, the convergence test at a
        # cell face) must be the fit's, not pixels leaving χ²
        if it in clip_at and it <= n_iter - 3:  # pixels far off the current model are outliers of that star
            z = xp.abs(st["r"]) * xp.sqrt(st["w"])
            # in units of the star's own residual scale when that exceeds 1 (a variance that is too
            # small must keep its honest χ², not lose every pixel it fits badly)
            scale = 1.4826 * masked_median(z, st["use"], axis=1)
            scale = xp.where(xp.isfinite(scale) & (scale > 1.0), scale, 1.0)
            good = good & ~(z > clip_nsigma * scale[:, None])
            st = _evaluate(pb, theta, v, good)
        if it == n_iter - 3:
            earlier, th_e, v_e = st["total"], theta, v
        dp, _, _ = _active_set_step(pb, st, lam, theta)
        th_c, _, _ = locate(pb.cg, theta + dp[:, :4])
        v_c = xp.clip(v + dp[:, 4], vlim[0], vlim[1])
        cand = _evaluate(pb, th_c, v_c, good)
        accepted = cand["total"] < st["total"]
        st = _merge(accepted, cand, st)
        theta = xp.where(accepted[:, None], th_c, theta)
        v = xp.where(accepted, v_c, v)
        lam = xp.clip(xp.where(accepted, lam * 0.3, lam * 10.0), 1e-7, 1e7)
    st["recent_gain"] = earlier - st["total"]  # what the last three iterations still gained
    st["recent_step"] = xp.concat([theta - th_e, (v - v_e)[:, None]], axis=1)  # and how far they moved
    return theta, v, st, accepted, good, starts


def fit_forward(spectra: SpectraBatch, prepared: PreparedGrid, match: MatchResult, *, degree: int = FIT_DEGREE,
                n_iter: int = 10, n_starts: int = 2, photometry: PhotometricTerm | None = None,
                good_regions=TELLURIC_DEFAULT, clip_nsigma: float = 5.0, vmargin: float = 400.0,
                tol: float = 0.1, cells=None, pixels=None, keep_best_at: int | None = KEEP_BEST_AT,
                clip_at=CLIP_AT) -> MatchResult:
    """Continuous fit of every standard's (θ, v) from the scan's answer ``match`` (module docstring).

    spectra : the standards (counts, variance; wave (n_pix,) or (n_star, n_pix));
    prepared : the scan's prepared grid; match : :func:`match_templates`'s result;
    degree : Legendre degree of P(λ); n_iter : LM iterations; n_starts : 1 (from the
    scan's refined parameters) or 2 (and from its best node); photometry : the
    catalogue term (None = spectra only); clip_nsigma : pixel outlier cut;
    vmargin : v stays within the start's ± this (km/s): wide, because a throughput dip or ripple
    the scan's continuum cannot follow can put a weak-lined star's scan velocity hundreds of km/s
    off (two hot stars of 20 at +474 and +500 km/s for +26 and +56 in bench/forward_accuracy.py's
    structured frame, seed 1) and the fit of the counts walks back from there; tol : χ² gain below which a
    star counts as converged; cells : :func:`~gpucal.fitting.cells.cell_grid` of the
    grid (built from ``prepared.params`` when None); pixels : (n_star, n_pix) bool, the usable
    pixels of an earlier pass (``meta['obs_pixels']``) instead of finding the outliers again;
    keep_best_at : the iteration from which only each star's better start goes on
    (:data:`KEEP_BEST_AT`; None: both starts to the end).
    clip_at : the iterations at which pixels beyond ``clip_nsigma`` of the current model are cut
    (none in the last three).

    Returns a MatchResult: ``index`` the scan's node; ``params``, ``rv`` the fit's, with
    errors from the curvature; ``chi2`` χ²_spec, ``dof``; ``meta`` the scan's (blend keys
    dropped) plus ``fit`` "continuous", ``chi2_phot``, ``corner_index`` / ``corner_weight``
    (n_star, n_c) for :func:`fitted_templates`, ``poly_coef`` (n_star, degree + 1),
    ``on_hull``, ``converged``, ``covariance`` (n_star, 5, 5), ``start_params``, ``start_rv`` (where
    this fit started: the scan's answer, or an earlier pass's).
    """
    if degree < 0 or n_iter < 0 or n_starts not in (1, 2):
        raise InputError(f"forward fit needs degree >= 0, n_iter >= 1 and n_starts 1 or 2, "
                         f"got {degree}, {n_iter}, {n_starts}")  # n_iter 0: χ² and curvature at the start
    be = backend_of(spectra.flux)
    xp = be.xp
    cg = cells if cells is not None else cell_grid(prepared.params)
    wave2, y, w, good = _observed(spectra, good_regions, pixels)
    params = xp.astype(prepared.params, xp.float64)
    starts = [match.params, xp.take(params, match.index, axis=0)][:n_starts]
    k = len(starts)
    n_star = y.shape[0]
    theta0 = xp.reshape(xp.stack(starts, axis=1), (n_star * k, 4))
    v0 = _rows(match.rv, k)
    vlim = (v0 - vmargin, v0 + vmargin)
    wq = prepared.wave
    nq = wq.shape[0]
    lo, hi = wq[0], wq[nq - 1]
    wave_r = _rows(wave2, k)
    inside = (wave_r / doppler_factor(vlim[0])[:, None] <= hi) & (wave_r / doppler_factor(vlim[1])[:, None] >= lo)
    free = xp.asarray([j in cg.active for j in range(4)] + [True], dtype=xp.bool, device=_device(y))
    basis = _legendre(_mean_lnw(spectra.wave), degree)
    pairs, pair_of = _basis_pairs(basis)
    pb = _Problem(wave=wave_r, basis=basis, pairs=pairs, pair_of=pair_of,
                  y=_rows(y, k), w=_rows(w, k), lnq0=math.log(float(wq[0])),
                  dln=math.log(float(wq[nq - 1]) / float(wq[0])) / (nq - 1), nq=nq,
                  flat_flux=xp.reshape(prepared.norm_flux, (-1,)), be=be, cg=cg,
                  phot=_phot_rows(photometry, k, be), free=free)
    theta, v, st, accepted, good_r, k = _iterate(pb, theta0, v0, vlim, _rows(good, k) & inside, n_iter=n_iter,
                                                 clip_at=clip_at, clip_nsigma=clip_nsigma, starts=k,
                                                 keep_best_at=keep_best_at)
    best = xp.argmin(xp.reshape(st["total"], (n_star, k)), axis=1)
    pick = xp.arange(n_star, dtype=xp.int64, device=_device(y)) * k + best
    st = {key: xp.take(a, pick, axis=0) for key, a in st.items()}
    out = _result(pb, match, xp.take(theta, pick, axis=0), xp.take(v, pick, axis=0), st,
                  xp.take(accepted, pick, axis=0), degree, tol)
    out.meta["obs_pixels"] = xp.take(good_r, pick, axis=0)  # with the pixels cut as outliers
    return out


def _phot_rows(ph: PhotometricTerm | None, k, be):
    """The photometric term's arrays on the backend, one row per (star, start)."""
    if ph is None:
        return None
    xp = be.xp
    mag = xp.astype(ph.mag, xp.float64)
    err = xp.astype(ph.err, xp.float64)
    valid = ph.valid & xp.isfinite(mag) & xp.isfinite(err) & (err > 0)
    wb = xp.where(valid, 1.0 / (xp.where(valid, err * err, 1.0) + ph.floor**2), 0.0)
    off = xp.zeros_like(mag) if ph.offset is None else xp.astype(ph.offset, xp.float64)
    node = xp.astype(ph.node_mag, xp.float64)
    node_ok = xp.isfinite(node)
    node_flux = xp.where(node_ok, 10.0 ** (-0.4 * xp.where(node_ok, node, 0.0)), 0.0)
    return dict(node_flux=node_flux, mag=_rows(xp.where(valid, mag, 0.0), k), wb=_rows(wb, k),
                valid=_rows(valid, k), offset=_rows(off, k), weight=float(ph.weight))


def _result(pb, match, theta, v, st, accepted, degree, tol):
    """The fit's MatchResult: errors from the undamped curvature, hull and convergence flags."""
    xp = array_namespace(theta)
    n = theta.shape[0]
    free, cg = pb.free, pb.cg
    zero = xp.zeros((n,), dtype=xp.float64, device=_device(theta))
    cov = xp.linalg.inv(_step(st, zero, free)[1])
    dp, _, held = _active_set_step(pb, st, zero, theta)
    dof = xp.sum(xp.astype(st["use"], xp.int64), axis=1) - (degree + 1) - xp.sum(xp.astype(free, xp.int64))
    red = st["chi2s"] / xp.astype(xp.maximum(dof, 1), xp.float64)
    cov = cov * xp.maximum(red, 1.0)[:, None, None]
    err = xp.sqrt(xp.maximum(xp.linalg.diagonal(cov), 0.0))
    gain = xp.sum(dp * st["grad"] * xp.astype(held, xp.float64), axis=1)
    on_hull = st["moved"] | on_hull_face(cg, *locate(cg, theta)[:2])  # the grid's edge or a missing node's
    # converged: the undamped step would gain little, or (at a cell face, where the interpolant's
    # kink keeps the quadratic model from predicting it) the last iterations gained little or moved
    # every parameter by less than a tenth of its error (an oscillation across a node)
    small = tol * xp.maximum(red, 1.0)
    still = xp.all((xp.abs(st["recent_step"]) <= 0.1 * err) | ~free[None, :], axis=1)
    converged = (gain < small) | (st["recent_gain"] < small) | (st["moved"] & ~accepted) | still
    err4 = xp.where(free[None, :4], err[:, :4], xp.nan)
    meta = {key: val for key, val in match.meta.items() if key not in ("blend_index", "blend_frac")}
    meta.update(fit="continuous", chi2_phot=st["chi2p"], fit_mask=st["use"], model_counts=st["model"], corner_index=st["idx"], corner_weight=st["wc"],
                poly_coef=st["coef"], poly_degree=degree, on_hull=on_hull, converged=converged, covariance=cov,
                start_params=match.params, start_rv=match.rv)
    return MatchResult(index=match.index, params=theta, params_err=err4, rv=v, rv_err=err[:, 4],
                       chi2=st["chi2s"], dof=dof, meta=meta)


def fitted_templates(flux, match: MatchResult):
    """Each star's template at its fitted parameters, (n_star, n_w), on ``match``'s backend.

    After :func:`fit_forward`: Σ_c w_c T_c over the corners of the star's cell
    (the same interpolant the fit used, applied to ``flux``, e.g. the full-range
    rest-frame grid); otherwise the node refinement's blend
    (:func:`~gpucal.fitting.refine.refined_templates`). ``flux`` (n_t, n_w) may
    be a host (memory-mapped) grid: only the corner rows are read.
    """
    idx = match.meta.get("corner_index")
    if idx is None:
        return refined_templates(flux, match)
    be = backend_of(match.index)
    xp = be.xp
    n, nc = idx.shape
    t = xp.astype(gather_templates(flux, be, xp.reshape(idx, (-1,))), xp.float64)
    t = xp.reshape(t, (n, nc, -1))
    # one product per star (n_c weights against its corners' rows), not a weighted (n, n_c, n_w) copy
    # summed over corners: 17 -> 4 ms for 20 stars of a 23 151-pixel grid (numpy)
    out = (xp.astype(match.meta["corner_weight"], xp.float64)[:, None, :] @ t)[:, 0, :]
    fallback = match.meta.get("fit_fallback")
    if fallback is None:
        return out
    return xp.where(fallback[:, None], refined_templates(flux, match.meta["node_match"]), out)


def with_node_fallback(fit: MatchResult, node: MatchResult, back=None) -> MatchResult:
    """The fit's answer, but the scan's refined node (``node``) for the stars ``back`` (n_star,) bool
    (default: those whose fit did not converge).

    Such a star keeps the node path's parameters, velocity and template instead of being lost:
    typically a star beside a missing node, where no complete cell holds its parameters (the fit
    never interpolates across a missing node). ``meta['fit_fallback']`` (n_star,) bool says which;
    :func:`fitted_templates` then blends those stars' templates as the node path does. The
    pipeline passes the stars that did not converge ON the hull (held at a face beyond which no
    complete cell lies); one that did not converge inside it keeps the fit and its flag (and is
    excluded): its node answer is the scan's, which the fit moved away from (a 7710 K star of
    bench/forward_accuracy.py's structured frame of model spectra: the fit +36 K, the node +287 K).
    """
    xp = array_namespace(fit.params)
    back = ~fit.meta["converged"] if back is None else back

    def pick(a, b):
        return xp.where(back[:, None] if a.ndim == 2 else back, b, a)

    return MatchResult(index=fit.index, params=pick(fit.params, node.params),
                       params_err=pick(fit.params_err, node.params_err), rv=pick(fit.rv, node.rv),
                       rv_err=pick(fit.rv_err, node.rv_err), chi2=pick(fit.chi2, node.chi2),
                       dof=pick(fit.dof, xp.astype(node.dof, fit.dof.dtype)),
                       meta=dict(fit.meta, fit_fallback=back, node_match=node))


def poly_on_pixels(wave, match: MatchResult):
    """The fitted P(λ) of every star on its pixels (``wave`` (n_pix,) or (n_star, n_pix), as fitted): (n_star, n_pix)."""
    return match.meta["poly_coef"] @ _legendre(_mean_lnw(wave), int(match.meta["poly_degree"]))


def common_shape(spectra: SpectraBatch, fit: MatchResult, *, window: int = 15, stars=None):
    """The throughput structure P(λ) cannot follow, common to the frame: (n_pix,), median 1.

    Per pixel, the median over the stars of counts / fitted model (the pixels each
    star's fit used), averaged over ``window`` pixels; 1 where no star measured the
    pixel. A dip tens of Å wide or a ripple of a few hundred Å, which a Legendre
    series of degree ~20 cannot follow, is the same in every fibre; divided out of
    the counts (:func:`divide_shape`) it no longer tilts each star's θ. ``stars``
    (n_star,) bool: the stars that count (e.g. not duplicates of another); default all.
    """
    xp = array_namespace(spectra.flux)
    use = fit.meta["fit_mask"] if stars is None else fit.meta["fit_mask"] & stars[:, None]
    model = fit.meta["model_counts"]
    ok = use & (model > 0)
    ratio = xp.where(ok, spectra.flux / xp.where(ok, model, 1.0), 1.0)
    med = masked_median(ratio, ok, axis=0)
    has = xp.any(ok, axis=0) & xp.isfinite(med)
    med = xp.where(has, med, 1.0)
    mean, cnt = running_mean(med[None, :], has[None, :], window)
    shape = xp.where(has & (cnt[0, :] > 0), mean[0, :], 1.0)
    centre = masked_median(shape[None, :], has[None, :], axis=1)[0]
    return shape / xp.where(xp.isfinite(centre) & (centre > 0), centre, 1.0)


def divide_shape(spectra: SpectraBatch, shape) -> SpectraBatch:
    """The standards with a common multiplicative ``shape`` (n_pix,) divided out of counts and variance."""
    import dataclasses

    return dataclasses.replace(spectra, flux=spectra.flux / shape[None, :],
                               var=spectra.var / (shape * shape)[None, :])

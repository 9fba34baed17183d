"""The grid scan: every (star, template, velocity) scored at once.

Step of the mission after preparation (:mod:`gpucal.fitting.prepare`: the
standards and the LSF-convolved template grid continuum-normalised the same
way) and before refinement (:mod:`gpucal.fitting.refine`). For every star
s, template t and trial velocity v the χ² of the template with a free
amplitude is

    χ²(s,t,v) = Σ_q W D² − (Σ_q W D m_t)² / Σ_q W m_t²,

where m_t is the normalised template on a log-uniform working grid λ_q and
D, W are the star's normalised flux and inverse variance evaluated at
λ_q (1+z_v), i.e. the data shifted into the template's rest frame. The
working grid's pixel is a whole number P of velocity steps, so trial v is a
whole-pixel lag r plus one of P sub-pixel phases: the data are interpolated
once per phase (:func:`_phase_plan`, :class:`_Shifted`), and the trials at
lag r are a strided window of those rows. The two sums are then matrix
products, (n_star·P, n_q) @ (n_q, n_templates) per lag, for the lags the
velocity range spans (about 16 working pixels for ±500 km/s) and per block
of templates: the whole scan is a few GEMMs, streamed over blocks of
templates so memory stays within :func:`memory_budget`, with a running
minimum kept on the device. The products and the χ² combination run in the
templates' dtype (float32 by default); Σ W D² is summed in float64.

The fast path finds each star's velocity from a few fiducial templates and
scans the grid there; with it, or with the Huber metric, each star's top-k
χ² candidates are scanned over every velocity again (and re-scored by a
Huber loss on the frame's pixels). The best velocity is refined by a
parabola through the three float64 χ² values around the best lag, which
works at every lag (negative and near-zero velocities too); its 1-σ error
comes from the curvature (Δχ² = 1, inflated by χ²/dof when that exceeds 1).
:func:`match_templates` then hands the best node to the refinement, which
recomputes its χ² on the frame's own pixels (an honest χ²/dof) and steps
in the grid parameters.

Shapes: wave_obs (n_pix,) Å, or (n_star, n_pix) when each standard has its own
wavelengths (the data are then moved into the rest frame row by row, in one
batched interpolation); standards (n_star, n_pix); prepared templates
(n_t, n_q); χ² tables (n_t, n_star). Velocities in km/s (relativistic
Doppler), positive = receding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from array_api_compat import device as _device

from ..backends import array_namespace, backend_of, interp, interp_rows, to_numpy
from ..containers import MatchResult, PreparedGrid, SpectraBatch
from ..errors import InputError
from ..units import C_KMS, doppler_factor
from .masks import TELLURIC_DEFAULT
from .prepare import gather_templates, normalise_observed, template_blocks, velocity_grid
from .refine import chi2_on_pixels, node_parameters, shifted_model

__all__ = ["match_templates", "memory_budget"]


def memory_budget(max_memory=None) -> float:
    """Bytes the scan may use: ``max_memory``, else ``$GPUCAL_MAX_MEMORY``, else 1 GiB.

    Accepts numbers of bytes or strings with a K/M/G suffix ("512M", "2G").
    """
    value = max_memory if max_memory is not None else os.environ.get("GPUCAL_MAX_MEMORY")
    if value is None or value == "":
        return float(2**30)
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        text = str(value).strip().upper().rstrip("B")
        mult = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1:], 1)
        try:
            out = float(text[:-1] if mult != 1 else text) * mult
        except ValueError:
            raise InputError(f"memory budget {value!r} is not a number of bytes (e.g. 512M, 2G)") from None
    if not out > 0:
        raise InputError(f"memory budget must be positive, got {value!r}")
    return out


def _phase_plan(wq, velocities):
    """Whole-pixel lags and sub-pixel phases of every trial velocity, or None.

    Trial k shifts the data by u_k = ln(1+z_k) / Δlnλ working pixels. When
    every u_k is a multiple of 1/P for a small integer P, u_k = a_k + b_k / P,
    and the shifted data are slices of P phase-shifted copies. Host-side
    planning on the (small) velocity grid, once per scan.
    """
    n = wq.shape[0]
    dln = math.log(float(wq[n - 1]) / float(wq[0])) / (n - 1)
    v = to_numpy(velocities).tolist()
    u = [math.atanh(x / C_KMS) / dln for x in v]
    if len(u) < 2:
        return None
    period = 1.0 / abs(u[1] - u[0]) if u[1] != u[0] else 0.0
    phases = round(period)
    if phases < 1 or phases > 64 or abs(period - phases) > 1e-6 * max(phases, 1):
        return None
    ku = [round(x * phases) for x in u]
    if max(abs(x * phases - k) for x, k in zip(u, ku)) > 1e-4:
        return None
    return phases, [k // phases for k in ku], [k % phases for k in ku]


@dataclass
class _Shifted:
    """The standards moved into the templates' rest frame at every trial velocity, stored by (phase, lag).

    Trial k reads the window [r_k, r_k + n_q) of phase row p_k: the data at
    λ_q (1+z_k), q = 0..n_q−1, are ``d[s, p_k, r_k + q]``. With an aligned
    velocity grid (:func:`_phase_plan`) there are P phases and R+1 lags, and a
    phase row is only R longer than the working grid; otherwise every trial
    is its own phase (P = n_vel, R = 0).

    d, w : (n_star, P, L) normalised flux and weight in the scan dtype
        (zero where a working pixel borrows from a bad pixel); wd, ww :
        (n_star·P, L) W·D and W, the GEMM operands; c : (R+1, n_star, P)
        Σ W D² over each window (summed in float64); vidx : (R+1, P) velocity index of each
        (lag, phase), −1 where none; start : (n_vel,) offset p_k·L + r_k of each
        trial in a star's flattened (P·L) row.
    """

    d: Any
    w: Any
    wd: Any
    ww: Any
    c: Any
    vidx: Any
    start: Any
    nq: int

    @property
    def n_lags(self) -> int:
        return int(self.vidx.shape[0])


def _shifted_phases(wq, wave_obs, dn, wn, good, velocities, dtype, plan) -> _Shifted:
    """Interpolate the standards once per phase (see :class:`_Shifted`); positions shared by all stars.

    ``plan`` is :func:`_phase_plan`'s answer for ``wq`` and ``velocities``.
    """
    xp = array_namespace(dn)
    dev = _device(dn)
    n_star, n_vel, nq = dn.shape[0], velocities.shape[0], wq.shape[0]
    if plan is None:
        n_ph, n_lag, length = n_vel, 1, nq
        xq = xp.reshape(doppler_factor(velocities)[:, None] * wq[None, :], (-1,))
        vidx = xp.reshape(xp.arange(n_vel, dtype=xp.int64, device=dev), (1, n_vel))
        start = xp.arange(n_vel, dtype=xp.int64, device=dev) * nq
    else:
        n_ph, lag, phase = plan
        a0 = min(lag)
        n_lag = max(lag) - a0 + 1
        length = nq + n_lag - 1
        dln = math.log(float(wq[nq - 1]) / float(wq[0])) / (nq - 1)
        j = xp.arange(length, dtype=xp.float64, device=dev)
        b = xp.arange(n_ph, dtype=xp.float64, device=dev)
        xq = xp.reshape(float(wq[0]) * xp.exp(((j[None, :] + a0) + b[:, None] / n_ph) * dln), (-1,))
        table = [[-1] * n_ph for _ in range(n_lag)]
        for k, (a, p) in enumerate(zip(lag, phase)):
            table[a - a0][p] = k
        vidx = xp.asarray(table, dtype=xp.int64, device=dev)
        start = xp.asarray([p * length + (a - a0) for a, p in zip(lag, phase)], dtype=xp.int64, device=dev)
    shape = (n_star, n_ph, length)

    rows = [xp.astype(a, dtype) for a in (dn, good, wn)]
    if wave_obs.ndim == 1:  # one interpolation of the three stacked: the positions are found once
        d, g, w = (xp.reshape(a, shape) for a in xp.unstack(_to_rest(xq, wave_obs, xp.stack(rows)), axis=0))
    else:
        d, g, w = (xp.reshape(_to_rest(xq, wave_obs, a), shape) for a in rows)
    # A working pixel next to a bad pixel borrows from it: drop it instead.
    w = xp.where(g > 0.999, w, 0.0)
    wd = w * d
    # Σ W D² over every window [r, r + n_q): the row's sum less what lies before
    # and after it, both running sums over the R pixels at the ends (float64).
    x = wd * d
    head = xp.cumulative_sum(xp.astype(x[:, :, :n_lag - 1], xp.float64), axis=2, include_initial=True)
    tail = xp.astype(x[:, :, nq:], xp.float64)
    after = xp.sum(tail, axis=2)[:, :, None] - xp.cumulative_sum(tail, axis=2, include_initial=True)
    c = xp.sum(x, axis=2, dtype=xp.float64)[:, :, None] - head - after
    c = xp.permute_dims(c, (2, 0, 1))
    flat = (n_star * n_ph, length)
    return _Shifted(d=d, w=w, wd=xp.reshape(wd, flat), ww=xp.reshape(w, flat), c=c, vidx=vidx, start=start, nq=nq)


def _to_rest(xq, wave_obs, a):
    """The standards ``a`` (n_star, n_pix) read at the rest-frame positions ``xq`` (n,), 0 outside.

    On one wavelength grid (n_pix,) a shared interpolation; with per-fibre
    wavelengths (n_star, n_pix) one batched interpolation on each star's own
    row (:func:`gpucal.backends.interp_rows`).
    """
    if wave_obs.ndim == 1:
        return interp(xq, wave_obs, a, left=0.0, right=0.0)
    return interp_rows(xq[None, :], wave_obs, a, left=0.0, right=0.0)


def _trial_rows(sh: _Shifted, k):
    """D and W of each star at its own trials ``k`` (n_star, n) velocity indices: (n_star, n, n_q) each."""
    xp = array_namespace(sh.d)
    n_star, n = k.shape
    idx = xp.reshape(xp.take(sh.start, xp.reshape(k, (-1,)), axis=0), (n_star, n, 1))
    idx = xp.reshape(idx + xp.arange(sh.nq, dtype=xp.int64, device=_device(k))[None, None, :], (n_star, -1))

    def rows(a):
        return xp.reshape(xp.take_along_axis(xp.reshape(a, (n_star, -1)), idx, axis=1), (n_star, n, sh.nq))

    return rows(sh.d), rows(sh.w)


def _at_velocity(sh: _Shifted, k) -> _Shifted:
    """One trial per star (``k``: (n_star,) velocity indices) as a single-phase, single-lag :class:`_Shifted`."""
    xp = array_namespace(sh.d)
    d, w = _trial_rows(sh, k[:, None])
    d, w = d[:, 0, :], w[:, 0, :]
    wd = w * d
    c = xp.sum(xp.astype(wd * d, xp.float64), axis=1)
    return _Shifted(d=d[:, None, :], w=w[:, None, :], wd=wd, ww=w, c=c[None, :, None],
                    vidx=xp.zeros((1, 1), dtype=xp.int64, device=_device(k)),
                    start=xp.zeros((1,), dtype=xp.int64, device=_device(k)), nq=sh.nq)


def _chi2_from_sums(a, b, c):
    """χ² = c − a²/b in the dtype of ``a`` and ``b``; +inf where b = 0 (no usable pixel).

    The difference cancels: with float32 products the rounding of Σ W D m
    (about 1e-6 of Σ W D² for a few thousand pixels) already exceeds that of
    this combination, so it stays in float32 (the parabola in velocity
    recomputes its χ² in float64, :func:`_chi2_at_lags`).
    """
    xp = array_namespace(a)
    q = a * a
    q /= xp.where(b > 0, b, xp.nan)
    chi2 = xp.astype(c, q.dtype) - q
    return xp.where(xp.isnan(chi2), xp.inf, chi2)


def _min_over_lags(products, sh: _Shifted):
    """Minimum χ² over every trial velocity, and its velocity index.

    ``products(r)`` gives Σ W D m and Σ W m² at lag r, shaped (n_star, P, n)
    for n templates. The loop runs over the R+1 whole-pixel lags (the
    velocity range in working pixels), each a batch of matrix
    products; the minimum is kept on the device. Ties go to the lower velocity
    index, as a plain argmin over velocities would. Returns (n_star, n) each.
    """
    xp = array_namespace(sh.c)
    best, where_v = None, None
    for r in range(sh.n_lags):
        a, b = products(r)
        chi2 = _chi2_from_sums(a, b, sh.c[r, :, :, None])
        chi2 = xp.where(sh.vidx[r, :][None, :, None] >= 0, chi2, xp.inf)
        k = xp.argmin(chi2, axis=1)
        val = xp.take_along_axis(chi2, k[:, None, :], axis=1)[:, 0, :]
        v = xp.reshape(xp.take(sh.vidx[r, :], xp.reshape(k, (-1,)), axis=0), k.shape)
        if best is None:
            best, where_v = val, v
        else:
            better = val < best
            best = xp.where(better, val, best)
            where_v = xp.where(better, v, where_v)
    return best, where_v


def _scan_exhaustive(get_block, n_t, sh: _Shifted, block_size):
    """χ² minimum over velocity for every (template, star), and the velocity index where it falls: (n_t, n_star) each.

    ``get_block(b0, b1)`` gives templates b0..b1 on the backend; one block is
    held at a time (:func:`_block_minimum`).
    """
    xp = array_namespace(sh.wd)
    best, lag = [], []
    for b0 in range(0, n_t, block_size):
        val, v = _block_minimum(get_block(b0, min(n_t, b0 + block_size)), sh)
        best.append(val)
        lag.append(v)
    return xp.permute_dims(xp.concat(best, axis=1), (1, 0)), xp.permute_dims(xp.concat(lag, axis=1), (1, 0))


def _block_minimum(m, sh: _Shifted):
    """χ² minimum over velocity of a block of templates ``m`` (n_b, n_q) for every star, and where: (n_star, n_b) each.

    Per lag two GEMMs, (n_star·P, n_q) @ (n_q, n_b), the data's lag window a
    strided view (no copy). The block and its transposes are freed on return.
    """
    xp = array_namespace(sh.wd)
    nq = sh.nq
    mt = xp.permute_dims(m, (1, 0))
    m2t = xp.permute_dims(m * m, (1, 0))
    shape = (sh.d.shape[0], sh.d.shape[1], m.shape[0])

    def products(r):
        return (xp.reshape(sh.wd[:, r:r + nq] @ mt, shape), xp.reshape(sh.ww[:, r:r + nq] @ m2t, shape))

    return _min_over_lags(products, sh)


def _candidates_best(cand_m, sh: _Shifted):
    """Best χ² over all velocities of each star's own candidates, and its velocity index: (n_star, k) each.

    cand_m : (n_star, k, n_q). Per lag, a batch of n_star products (P, n_q) @ (n_q, k).
    """
    xp = array_namespace(cand_m)
    nq = sh.nq
    ct = xp.permute_dims(cand_m, (0, 2, 1))
    c2t = ct * ct
    wd, ww = xp.reshape(sh.wd, sh.d.shape), xp.reshape(sh.ww, sh.d.shape)
    return _min_over_lags(lambda r: (wd[:, :, r:r + nq] @ ct, ww[:, :, r:r + nq] @ c2t), sh)


def _chi2_at_lags(sh: _Shifted, m, k):
    """float64 χ² of templates ``m`` (n_star, n_q) at per-star velocity indices ``k`` (n_star, n): (n_star, n).

    The scan's float32 products rank templates reliably, but the parabola in
    velocity reads differences of χ² that float32 sums blur; the lags around
    each star's best are recomputed here in float64 from the shifted data.
    """
    xp = array_namespace(sh.d)
    d, w = (xp.astype(a, xp.float64) for a in _trial_rows(sh, k))
    m = xp.astype(m, xp.float64)[:, None, :]
    a = xp.sum(w * d * m, axis=2)
    b = xp.sum(w * m * m, axis=2)
    return _chi2_from_sums(a, b, xp.sum(w * d * d, axis=2))


def _parabola(ca, cb, cc, k, n_vel, velocities, dv):
    """Vertex and 1-σ (Δχ² = 1) of the parabola through χ² at lags k-1, k, k+1."""
    xp = array_namespace(cb)
    interior = (k > 0) & (k < n_vel - 1)
    # χ² is +inf for a star with no usable pixel: keep inf − inf (and its warning) out of the arithmetic.
    finite = xp.isfinite(ca) & xp.isfinite(cb) & xp.isfinite(cc)
    ca, cb, cc = (xp.where(finite, c, 0.0) for c in (ca, cb, cc))
    curv = ca - 2.0 * cb + cc
    ok = interior & finite & (curv > 0) & xp.isfinite(curv)
    safe = xp.where(ok, curv, 1.0)
    offset = xp.clip(xp.where(ok, 0.5 * (ca - cc) / safe, 0.0), -1.0, 1.0)
    v = xp.take(velocities, k, axis=0) + offset * dv
    # χ² ≈ cb + (curv / 2)(v − v_best)² / dv², so Δχ² = 1 at dv·sqrt(2 / curv).
    err = xp.where(ok, dv * xp.sqrt(2.0 / safe), xp.inf)
    return v, err, interior


def _huber_scores(wave_obs, dn, wn, good, prepared_wave, cand_m, cand_v, delta, niter=8):
    """Huber loss of candidate templates (n_star, k, n_q) at velocities (n_star, k), on frame pixels."""
    xp = array_namespace(dn)
    model = shifted_model(wave_obs, prepared_wave, cand_m, cand_v)
    use = good[:, None, :] & xp.isfinite(model)
    model = xp.where(use, model, 0.0)
    w = xp.where(use, wn[:, None, :], 0.0)
    d = dn[:, None, :]
    sw = xp.sqrt(w)
    hw = xp.ones_like(w)
    for _ in range(niter):  # IRLS, fixed iterations: no host round trip
        ww = w * hw
        den = xp.sum(ww * model * model, axis=2)
        amp = xp.sum(ww * d * model, axis=2) / xp.where(den > 0, den, 1.0)
        r = xp.abs(d - amp[:, :, None] * model) * sw
        hw = xp.where(r <= delta, 1.0, delta / xp.where(r > 0, r, 1.0))
    rho = xp.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))
    return 2.0 * xp.sum(xp.where(use, rho, 0.0), axis=2)  # on the χ² scale where |r| <= delta


def match_templates(spectra: SpectraBatch, prepared: PreparedGrid, *, velocities=None,
                    vrange=(-500.0, 500.0, 5.0), metric: str = "chi2", huber_delta: float = 3.0,
                    top_k: int = 16, refine: bool = True, fast: bool = False, n_fiducial: int = 12,
                    prior=None, good_regions=TELLURIC_DEFAULT, continuum_degree: int = 7,
                    block_size: int | None = None, max_memory=None) -> MatchResult:
    """Best template and radial velocity for every standard, all scanned at once.

    Parameters
    ----------
    spectra : standards on the frame's grid (backend arrays).
    prepared : :func:`~gpucal.fitting.prepare.prepare_grid` output; its ``norm_flux`` may be a host
        (memory-mapped) array, streamed to the backend block by block.
    velocities : (n_vel,) uniform km/s grid, or None for ``vrange`` = (vmin, vmax, step).
    metric : ``"chi2"``, or ``"huber"``: the ``top_k`` χ² candidates per star
        are re-scored by a Huber loss (IRLS for the amplitude, threshold
        ``huber_delta`` in σ), so a few bad pixels cannot pick the template.
    refine : one Gauss–Newton step in (Teff, logg, [M/H], [α/M]) from the best
        node toward its grid neighbours (:mod:`gpucal.fitting.refine`); the
        blend weights for :func:`~gpucal.fitting.refine.refined_templates` go in ``meta``.
    fast : velocity first from ``n_fiducial`` templates spread over the grid,
        then the whole grid at each star's velocity, then every lag for each
        star's ``top_k`` candidates.
    prior : (n_star, n_t) bool, nodes allowed per star (e.g. a colour Teff
        prior); a star whose prior allows nothing is scanned unrestricted.
        Only the nodes some star may take go through the GEMMs.
    block_size : templates per GEMM block; default from ``max_memory``
        (bytes, or ``$GPUCAL_MAX_MEMORY``, default 1 GiB), counting every
        array the scan holds.

    Returns
    -------
    MatchResult: best node, refined parameters and velocity with errors, χ²
    and degrees of freedom on the frame's pixels; ``meta["observed_good"]``
    (n_star, n_pix) bool, the usable pixels of
    :func:`~gpucal.fitting.prepare.normalise_observed`, for the fit to reuse.
    """
    if metric not in ("chi2", "huber"):
        raise InputError(f"unknown metric {metric!r}; use chi2 or huber")
    be = backend_of(spectra.flux)
    xp = be.xp
    if velocities is None:
        velocities = velocity_grid(*vrange, like=spectra.wave)
    n_vel = velocities.shape[0]
    dv = float(velocities[1] - velocities[0]) if n_vel > 1 else 0.0
    n_t = int(prepared.norm_flux.shape[0])
    dtype = xp.float32 if str(prepared.norm_flux.dtype).endswith("float32") else xp.float64
    dn, wn, good = normalise_observed(spectra, good_regions=good_regions, continuum_degree=continuum_degree)
    observed = (spectra.wave, dn, wn, good)
    budget = memory_budget(max_memory)
    plan = _phase_plan(prepared.wave, velocities)
    if block_size is None:
        block_size = _block_size(dn.shape[0], n_t, n_vel, int(prepared.wave.shape[0]), plan,
                                 4 if dtype == xp.float32 else 8, budget, per_row=spectra.wave.ndim == 2)
    sh = _shifted_phases(prepared.wave, spectra.wave, dn, wn, good, velocities, dtype, plan)
    chi2_t, vidx_t = _scan_grid(prepared, be, sh, block_size, fast=fast, n_fiducial=n_fiducial,
                                cols=_prior_columns(prior))
    if prior is not None:
        chi2_t = _apply_prior(chi2_t, prior)
    if fast or metric == "huber":
        tbest, kbest = _best_of_candidates(chi2_t, sh, prepared, be, observed, velocities,
                                           top_k=top_k, metric=metric, huber_delta=huber_delta)
    else:
        tbest = xp.argmin(chi2_t, axis=0)
        kbest = xp.take_along_axis(vidx_t, tbest[None, :], axis=0)[0, :]
    best_m = gather_templates(prepared.norm_flux, be, tbest)
    rv, rv_err, interior = _velocity_parabola(sh, best_m, kbest, velocities, dv)
    del sh
    chi2_pix, dof = chi2_on_pixels(*observed, prepared.wave, best_m, rv)
    red = chi2_pix / xp.astype(xp.maximum(dof, 1), xp.float64)
    rv_err = rv_err * xp.sqrt(xp.maximum(red, 1.0))
    params, params_err, blend = node_parameters(*observed, prepared, tbest, rv, red, refine=refine)
    # observed_good: the usable pixels of normalise_observed, (n_star, n_pix) bool, for the fit to reuse
    meta = {"rv_at_edge": ~interior, "observed_good": good, "n_velocities": n_vel, "velocity_step": dv,
            "vrange_min": float(velocities[0]), "vrange_max": float(velocities[n_vel - 1]),
            "n_templates": n_t, "block_size": block_size, "metric": metric, "fast": fast, **blend}
    return MatchResult(index=tbest, params=params, params_err=params_err, rv=rv, rv_err=rv_err,
                       chi2=chi2_pix, dof=dof, meta=meta)


def _block_size(n_star, n_t, n_vel, nq, plan, itemsize, budget, per_row=False) -> int:
    """Templates per GEMM block that keep every array the scan holds within ``budget`` bytes.

    Fixed: the shifted data (D, W and W·D in the scan dtype) with the
    interpolation's temporaries while they are built (positions, indices,
    weights, the good fraction, the float64 sums), and the per-template
    results (generously: 48 bytes a cell). Per template: its row and its
    square, and per lag the two products with the χ² temporaries. With
    per-fibre wavelengths (``per_row``) the interpolation's positions and
    indices are per star too: 48 bytes a cell more.
    """
    n_ph, length = (n_vel, nq) if plan is None else (plan[0], nq + max(plan[1]) - min(plan[1]))
    cells = n_star * n_ph * length
    fixed = 48 * n_ph * length + cells * (48 + 2 * itemsize + (48 if per_row else 0)) + 16 * n_star * n_t
    per_template = 2 * nq * itemsize + n_star * n_ph * (2 * itemsize + 48) + 40 * n_star
    if fixed + per_template > budget:
        raise InputError(
            f"memory budget {budget / 2**20:.0f} MiB is below the {(fixed + per_template) / 2**20:.0f} MiB "
            f"the scan of {n_star} stars x {n_vel} velocities x {nq} pixels needs; raise --max-memory"
        )
    return max(1, min(n_t, int((budget - fixed) // per_template)))


def _prior_columns(prior):
    """Templates that some star's ``prior`` (n_star, n_t) allows, (n_c,) indices; None where the scan needs them all.

    Every other node is +inf for every star after :func:`_apply_prior`, so
    leaving it out of the GEMMs changes no answer. A star whose prior allows
    nothing is scanned unrestricted: then every template is needed. One
    host decision per frame (the size of the template subset), not per block.
    """
    if prior is None:
        return None
    xp = array_namespace(prior)
    keep = xp.any(prior, axis=0)
    if not bool(xp.all(xp.any(prior, axis=1))) or bool(xp.all(keep)):
        return None
    return xp.nonzero(keep)[0]


def _scatter_columns(cols, n_t, val, v, fill_v):
    """An (n_t, n_star) table whose rows ``cols`` (sorted) are the (n_c, n_star) ``val`` and ``v``.

    Elsewhere +inf and ``fill_v``.
    """
    xp = array_namespace(val)
    at = xp.arange(n_t, dtype=cols.dtype, device=_device(val))
    pos = xp.clip(xp.searchsorted(cols, at), 0, cols.shape[0] - 1)  # where template t sits in ``cols``
    keep = (xp.take(cols, pos, axis=0) == at)[:, None]
    out_val = xp.where(keep, xp.take(val, pos, axis=0), xp.inf)
    return out_val, (None if v is None else xp.where(keep, xp.take(v, pos, axis=0), fill_v))


def _scan_grid(prepared: PreparedGrid, be, sh: _Shifted, block_size, *, fast: bool, n_fiducial: int, cols=None):
    """χ² of every template for every star, minimised over velocity, and at which velocity index: (n_t, n_star) each.

    Exhaustive: every (template, velocity). ``fast``: each star's velocity
    from ``n_fiducial`` templates spread over the grid, then the whole grid
    at that one velocity (one column per star); the velocity indices are then None.
    ``cols`` (:func:`_prior_columns`): only those templates are scanned, the
    others are +inf (velocity index that of an all-inf column, the first trial).
    """
    xp = be.xp
    n_t = int(prepared.norm_flux.shape[0])
    if cols is None:
        get_block, n_scan = template_blocks(prepared.norm_flux, be), n_t
    else:
        n_scan = int(cols.shape[0])

        def get_block(b0, b1):
            return gather_templates(prepared.norm_flux, be, cols[b0:b1])
    if not fast:
        val, v = _scan_exhaustive(get_block, n_scan, sh, block_size)
        return (val, v) if cols is None else _scatter_columns(cols, n_t, val, v, sh.vidx[0, 0])
    fid = [round(i * (n_t - 1) / max(n_fiducial - 1, 1)) for i in range(min(n_fiducial, n_t))]
    fid_m = gather_templates(prepared.norm_flux, be,
                             xp.asarray(sorted(set(fid)), dtype=xp.int64, device=_device(sh.d)))
    cf, kf = _scan_exhaustive(lambda a, b: fid_m[a:b, :], fid_m.shape[0], sh, block_size)
    tf = xp.argmin(cf, axis=0)[None, :]
    kfb = xp.take_along_axis(kf, tf, axis=0)[0, :]
    chi2_t, _ = _scan_exhaustive(get_block, n_scan, _at_velocity(sh, kfb), block_size)
    return (chi2_t, None) if cols is None else (_scatter_columns(cols, n_t, chi2_t, None, None)[0], None)


def _apply_prior(chi2_t, prior):
    """χ² (n_t, n_star) set to +inf where ``prior`` (n_star, n_t) forbids a node, unless it forbids all of a star's."""
    xp = array_namespace(chi2_t)
    allowed = xp.permute_dims(prior, (1, 0))
    any_allowed = xp.any(allowed, axis=0)
    return xp.where(allowed | ~any_allowed[None, :], chi2_t, xp.inf)


def _best_of_candidates(chi2_t, sh: _Shifted, prepared: PreparedGrid, be, observed, velocities, *,
                        top_k: int, metric: str, huber_delta: float):
    """Each star's ``top_k`` χ² candidates scanned over every velocity, then the best by χ² or Huber.

    ``observed`` is (wave_obs, dn, wn, good). Returns the best node and its
    velocity index, (n_star,) each.
    """
    xp = be.xp
    n_star, nq = sh.d.shape[0], sh.nq
    k = min(top_k, int(chi2_t.shape[0]))
    cand = xp.permute_dims(xp.argsort(chi2_t, axis=0)[:k, :], (1, 0))  # (n_star, k)
    cand_m = xp.reshape(gather_templates(prepared.norm_flux, be, xp.reshape(cand, (-1,))), (n_star, k, nq))
    score, ck = _candidates_best(cand_m, sh)  # (n_star, k): best χ² over velocity and where
    if metric == "huber":
        cv = xp.reshape(xp.take(velocities, xp.reshape(ck, (-1,)), axis=0), (n_star, k))
        score = _huber_scores(*observed, prepared.wave, cand_m, cv, huber_delta)
    j = xp.argmin(score, axis=1)[:, None]  # (n_star, 1)
    return xp.take_along_axis(cand, j, axis=1)[:, 0], xp.take_along_axis(ck, j, axis=1)[:, 0]


def _velocity_parabola(sh: _Shifted, best_m, kbest, velocities, dv):
    """Velocity (n_star,) km/s and its 1-σ error from float64 χ² at the best lag and its two neighbours; and whether interior."""
    xp = array_namespace(best_m)
    n_vel = velocities.shape[0]
    lags = xp.asarray([-1, 0, 1], dtype=kbest.dtype, device=_device(kbest))
    c3 = _chi2_at_lags(sh, best_m, xp.clip(kbest[:, None] + lags[None, :], 0, n_vel - 1))
    return _parabola(c3[:, 0], c3[:, 1], c3[:, 2], kbest, n_vel, velocities, dv)

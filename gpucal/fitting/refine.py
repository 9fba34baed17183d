"""Refinement around each star's best node: honest χ², grid parameters, the blended template.

Step of the mission after the scan (:mod:`gpucal.fitting.scan`), which
gives each star its best node t and velocity v. Here, on the frame's own
pixels (the working grid shifted by v and interpolated back):

* :func:`shifted_model` — templates on the working grid, shifted by v and
  read at the frame's pixels (also used by the Huber re-scoring);
* :func:`chi2_on_pixels` — the χ² (free amplitude) of a template, so that
  χ²/dof is an honest goodness of fit;
* :func:`node_parameters` / :func:`refine_parameters` — one weighted Gauss–Newton step in
  (Teff, logg, [M/H], [α/M]) from the node toward its grid neighbours
  (:func:`gpucal.fitting.prepare.grid_neighbours`), with 1-σ errors from the
  curvature and the blend weights it implies;
* :func:`refined_templates` — each star's template at its refined
  parameters, the linear blend of the node and its neighbours.

Shapes: wave_obs (n_pix,) Å, or (n_star, n_pix) per-fibre wavelengths; dn, wn, good (n_star, n_pix) (normalised flux,
its weight, usable pixels: :func:`gpucal.fitting.prepare.normalise_observed`);
templates (n_star, n_q) on the working grid wave_q (n_q,) Å; params (n_t, 4);
rv (n_star,) km/s.
"""

from __future__ import annotations

from array_api_compat import device as _device

from ..backends import array_namespace, backend_of, interp, to_backend
from ..containers import MatchResult, PreparedGrid
from ..units import doppler_factor
from .prepare import gather_templates, grid_neighbours

__all__ = ["shifted_model", "chi2_on_pixels", "node_parameters", "refine_parameters", "refined_templates"]


def shifted_model(wave_obs, wave_q, m, v):
    """Templates ``m`` (..., n_q) on the working grid ``wave_q``, shifted by ``v`` and read at the frame's pixels.

    ``v`` (km/s) broadcasts against ``m.shape[:-1]``. Returns (..., n_pix)
    float64, NaN where a shifted pixel falls outside the working grid.
    """
    xp = array_namespace(m)
    if wave_obs.ndim == 2 and getattr(v, "ndim", 0) > 1:  # per-fibre wavelengths: each star's own row, per candidate
        wave_obs = xp.reshape(wave_obs, (wave_obs.shape[0],) + (1,) * (v.ndim - 1) + (wave_obs.shape[1],))
    x = wave_obs / doppler_factor(v)[..., None]
    return interp(x, wave_q, xp.astype(m, xp.float64), left=xp.nan, right=xp.nan)


def chi2_on_pixels(wave_obs, dn, wn, good, wave_q, m, rv):
    """χ² (free amplitude) of templates ``m`` (n_star, n_q) shifted by ``rv``, on the frame pixels."""
    xp = array_namespace(dn)
    model = shifted_model(wave_obs, wave_q, m, rv)
    use = good & xp.isfinite(model)
    w = xp.where(use, wn, 0.0)
    model = xp.where(use, model, 0.0)
    den = xp.sum(w * model * model, axis=1)
    a = xp.sum(w * dn * model, axis=1) / xp.where(den > 0, den, 1.0)
    r = dn - a[:, None] * model
    chi2 = xp.sum(w * r * r, axis=1)
    dof = xp.sum(xp.astype(use, xp.int64), axis=1) - 2  # amplitude and velocity
    return chi2, dof


def node_parameters(wave_obs, dn, wn, good, prepared: PreparedGrid, tbest, rv, red, *, refine: bool = True):
    """Each star's grid parameters: refined around its best node, or the node's own.

    With ``refine`` (and more than one node) :func:`refine_parameters`;
    otherwise the node's parameters with NaN errors. Returns params
    (n_star, 4), errors (n_star, 4) and the blend for :func:`refined_templates`
    as a dict (``blend_index``, ``blend_frac``; empty without refinement).
    """
    be = backend_of(tbest)
    xp = be.xp
    params = to_backend(prepared.params, be, dtype=xp.float64)
    if refine and int(prepared.norm_flux.shape[0]) > 1:
        neighbours = prepared.neighbours if prepared.neighbours is not None else grid_neighbours(params)
        p, err, toward, frac = refine_parameters(
            wave_obs, dn, wn, good, prepared.wave, lambda idx: gather_templates(prepared.norm_flux, be, idx),
            tbest, rv, neighbours, params, red)
        return p, err, {"blend_index": toward, "blend_frac": frac}
    p = xp.take(params, tbest, axis=0)
    return p, xp.full(p.shape, xp.nan, dtype=xp.float64, device=_device(p)), {}


def refine_parameters(wave_obs, dn, wn, good, prepared_wave, get_rows, tbest, rv, neighbours, params, red):
    """One Gauss–Newton step in (Teff, logg, [M/H], [α/M]) around each star's best node.

    The model is a (T0 + Σ_j Δx_j ∂T/∂x_j) with the derivatives taken from the
    node's grid neighbours (central difference where both exist, one-sided
    otherwise), fitted by weighted linear least squares to the normalised
    spectrum on the frame's pixels. The step Δx is clipped to the
    neighbouring nodes; its 1-σ error comes from the curvature matrix
    (inflated by χ²/dof when that exceeds 1). This is the quadratic
    approximation of χ² around the node that the linear blend of
    :func:`refined_templates` reproduces.

    ``get_rows(idx)`` gives template rows on the backend; ``neighbours``
    (n_t, 4, 2) is :func:`gpucal.fitting.prepare.grid_neighbours`'s table,
    ``params`` (n_t, 4), ``red`` (n_star,) the node's χ²/dof. Returns refined
    params (n_star, 4), errors (n_star, 4), and blend indices / fractions
    (n_star, 4) for :func:`refined_templates`.
    """
    xp = array_namespace(dn)
    n_star = tbest.shape[0]
    n_par = params.shape[1]
    nb = xp.take(neighbours, tbest, axis=0)  # (n_star, n_par, 2)
    lo_i, hi_i = nb[:, :, 0], nb[:, :, 1]
    lo_s = xp.where(lo_i >= 0, lo_i, tbest[:, None])
    hi_s = xp.where(hi_i >= 0, hi_i, tbest[:, None])
    rows = xp.concat([tbest[:, None], lo_s, hi_s], axis=1)  # (n_star, 1 + 2 n_par)
    m = xp.reshape(get_rows(xp.reshape(rows, (-1,))), (n_star, rows.shape[1], -1))
    model = shifted_model(wave_obs, prepared_wave, m, rv[:, None])  # (n_star, 1 + 2 n_par, n_pix)
    use = good & xp.all(xp.isfinite(model), axis=1)
    model = xp.where(use[:, None, :], model, 0.0)
    p0 = xp.take(params, tbest, axis=0)
    x_lo = xp.reshape(xp.take(params, xp.reshape(lo_s, (-1,)), axis=0), (n_star, n_par, n_par))
    x_hi = xp.reshape(xp.take(params, xp.reshape(hi_s, (-1,)), axis=0), (n_star, n_par, n_par))
    x_lo, x_hi = xp.linalg.diagonal(x_lo), xp.linalg.diagonal(x_hi)
    span = x_hi - x_lo
    active = span > 0
    deriv = (model[:, 1 + n_par:, :] - model[:, 1:1 + n_par, :]) / xp.where(active, span, 1.0)[:, :, None]
    deriv = xp.where(active[:, :, None], deriv, 0.0)
    design = xp.concat([model[:, 0, :][:, None, :], deriv], axis=1)  # (n_star, 1 + n_par, n_pix)
    coef, cov = _weighted_step(design, xp.where(use, wn, 0.0), dn, active)
    amp = coef[:, 0]
    safe_amp = xp.where(amp != 0, amp, 1.0)
    dx = xp.clip(coef[:, 1:] / safe_amp[:, None], x_lo - p0, x_hi - p0)
    var = xp.linalg.diagonal(cov)[:, 1:] / (safe_amp * safe_amp)[:, None]
    err = xp.where(active, xp.sqrt(xp.maximum(var, 0.0) * xp.maximum(red, 1.0)[:, None]), xp.nan)
    toward = xp.where(dx >= 0, hi_s, lo_s)
    step = xp.where(dx >= 0, x_hi - p0, p0 - x_lo)
    frac = xp.where(active & (step > 0), xp.abs(dx) / xp.where(step > 0, step, 1.0), 0.0)
    return p0 + dx, err, toward, frac


def _weighted_step(design, w, dn, active):
    """Weighted least squares of ``dn`` on the rows of ``design`` (n_star, 1 + n_par, n_pix): coefficients and covariance.

    Parameter axes that are not ``active`` (no neighbours: a single value,
    e.g. [α/M] = 0) get a unit row, so their step is 0. Returns coef
    (n_star, 1 + n_par) and the inverse normal matrix (n_star, 1 + n_par, 1 + n_par).
    """
    xp = array_namespace(design)
    dev = _device(design)
    n_star, k = design.shape[0], design.shape[1]
    normal = (design * w[:, None, :]) @ xp.permute_dims(design, (0, 2, 1))
    rhs = xp.sum(design * (w * dn)[:, None, :], axis=2)
    fixed = xp.concat([xp.zeros((n_star, 1), dtype=xp.bool, device=dev), ~active], axis=1)
    eye = xp.eye(k, dtype=xp.float64, device=dev)
    fixed_f = xp.astype(fixed, xp.float64)
    keep = 1.0 - fixed_f
    normal = normal * keep[:, :, None] * keep[:, None, :] + eye[None, :, :] * fixed_f[:, None, :]
    # A relative ridge keeps the solve defined when one pixel carries all the weight (a tiny
    # variance) or none does (every pixel bad: unit system, zero step); the star is judged later.
    scale = xp.sum(xp.linalg.diagonal(normal), axis=1) / k
    normal = normal + xp.where(scale > 0, 1e-12 * scale, 1.0)[:, None, None] * eye[None, :, :]
    rhs = rhs * keep
    return xp.linalg.solve(normal, rhs[:, :, None])[:, :, 0], xp.linalg.inv(normal)


def refined_templates(flux, match: MatchResult):
    """Each star's template at its refined parameters, (n_star, n_w), on ``match``'s backend.

    Linear blend from the best node toward its neighbour along each parameter
    axis: T = T0 + Σ_j f_j (T_j − T0), exact at the nodes and first-order
    (multilinear to first order) in between. Without refinement it is T0.
    ``flux`` (n_t, n_w) may be a host (memory-mapped) grid: only the rows
    needed are read.
    """
    be = backend_of(match.index)
    xp = be.xp
    t0 = xp.astype(gather_templates(flux, be, match.index), xp.float64)
    toward, frac = match.meta.get("blend_index"), match.meta.get("blend_frac")
    if toward is None:
        return t0
    n_star, n_par = toward.shape
    tn = xp.astype(gather_templates(flux, be, xp.reshape(toward, (-1,))), xp.float64)
    tn = xp.reshape(tn, (n_star, n_par, t0.shape[1]))
    return t0 + (xp.astype(frac, xp.float64)[:, None, :] @ (tn - t0[:, None, :]))[:, 0, :]  # one product per star

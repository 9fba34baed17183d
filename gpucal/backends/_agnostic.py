"""Portable fallbacks for the operations in ``_ops``, written only in the array API standard.

Every function here takes arrays of one namespace, infers it with
``array_namespace``, creates new arrays on the device of its inputs and never
converts to NumPy, calls ``float()``/``bool()`` on an array, or branches on
array values, so it runs unchanged (and without host synchronisation) on
NumPy, CuPy, torch, JAX and array-api-strict.

Arguments are validated by the public wrappers in ``_ops``; these functions
assume shapes that satisfy the contracts documented there.
"""

import math

from array_api_compat import array_namespace
from array_api_compat import device as _device

__all__ = [
    "interp",
    "interp_rows",
    "masked_median",
    "savgol_filter",
    "batched_lstsq",
    "sigma_clip",
]


def _float_dtype(xp, *arrays):
    """The promoted dtype of ``arrays`` if it is real floating, else float64."""
    dt = xp.result_type(*arrays)
    return dt if xp.isdtype(dt, "real floating") else xp.float64


def broadcast_shapes(*shapes):
    """NumPy broadcasting of shape tuples (the standard has no ``broadcast_shapes``)."""
    ndim = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(ndim):
        dims = {s[len(s) - ndim + i] for s in shapes if len(s) - ndim + i >= 0} - {1}
        if len(dims) > 1:
            raise ValueError(f"shapes {', '.join(map(str, shapes))} do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def interp(x, xp_grid, fp, *, left=None, right=None):
    """Batched linear interpolation by ``searchsorted`` + ``take_along_axis`` (see ``_ops.interp``)."""
    xp = array_namespace(x, xp_grid, fp)
    dtype = _float_dtype(xp, fp)
    x = xp.astype(x, dtype, copy=False)
    grid = xp.astype(xp_grid, dtype, copy=False)
    fp = xp.astype(fp, dtype, copy=False)
    n, m = grid.shape[0], x.shape[-1]
    lead = broadcast_shapes(x.shape[:-1], fp.shape[:-1])
    if n == 1:
        out = xp.broadcast_to(fp, lead + (m,)) + xp.zeros_like(x)
    else:
        flat = xp.reshape(x, (-1,))
        hi = xp.clip(xp.searchsorted(grid, flat, side="right"), 1, n - 1)
        lo = hi - 1
        x0 = xp.reshape(xp.take(grid, lo), x.shape)
        x1 = xp.reshape(xp.take(grid, hi), x.shape)
        # clipping t to [0, 1] reproduces numpy.interp's edge values outside the grid
        t = xp.clip((x - x0) / (x1 - x0), 0.0, 1.0)
        x_lead = x.shape[:-1]
        if all(d == 1 for d in x_lead):
            # Positions shared by every row: gather columns once per row block with
            # plain take, no broadcast index arrays (they would cost 2x the output).
            rows = xp.reshape(fp, (-1, n))
            f0 = xp.reshape(xp.take(rows, lo, axis=1), fp.shape[:-1] + x.shape)
            f1 = xp.reshape(xp.take(rows, hi, axis=1), fp.shape[:-1] + x.shape)
        else:
            # Positions per row: one flat take on fp's own rows (row offset + column), never a
            # broadcast copy of fp nor broadcast index arrays; hi is always lo + 1.
            f_lead = (1,) * (len(lead) - (fp.ndim - 1)) + tuple(fp.shape[:-1])
            n_rows = math.prod(f_lead)
            row = xp.reshape(xp.arange(n_rows, dtype=lo.dtype, device=_device(fp)) * n, f_lead)
            at = xp.reshape(xp.broadcast_to(row[..., None], lead + (1,)) + xp.reshape(lo, x.shape), (-1,))
            flat = xp.reshape(fp, (-1,))
            f0 = xp.reshape(xp.take(flat, at), lead + (m,))
            f1 = xp.reshape(xp.take(flat[1:], at), lead + (m,))  # the next samples, no second index array
        f1 = f1 - f0
        f1 = f1 * t
        out = xp.reshape(f0 + f1, lead + (m,))
    return _outside(xp, x, grid, out, left, right)


def _outside(xp, x, grid, out, left, right):
    """``out`` with ``left`` / ``right`` where x lies below / above the grid (None: left alone).
    The same fill on both sides (NaN for NaN, the usual case) is one pass, not two."""
    n = grid.shape[0]
    dev = _device(out)
    same = (isinstance(left, (int, float)) and isinstance(right, (int, float))
            and (left == right or (math.isnan(left) and math.isnan(right))))
    if same:
        return xp.where((x < grid[0]) | (x > grid[n - 1]), xp.asarray(left, dtype=out.dtype, device=dev), out)
    if left is not None:
        out = xp.where(x < grid[0], xp.asarray(left, dtype=out.dtype, device=dev), out)
    if right is not None:
        out = xp.where(x > grid[n - 1], xp.asarray(right, dtype=out.dtype, device=dev), out)
    return out


def _masked_median(xp, x, good, axis, keepdims):
    """Median over ``good`` entries along ``axis`` of a floating ``x``; NaN where none."""
    filled = xp.where(good, x, xp.asarray(xp.inf, dtype=x.dtype, device=_device(x)))
    s = xp.sort(filled, axis=axis)
    count = xp.sum(xp.astype(good, xp.int64), axis=axis, keepdims=True)
    lo = xp.clip((count - 1) // 2, 0, None)
    hi = count // 2
    med = (xp.take_along_axis(s, lo, axis=axis) + xp.take_along_axis(s, hi, axis=axis)) / 2
    med = xp.where(count > 0, med, xp.asarray(xp.nan, dtype=x.dtype, device=_device(x)))
    return med if keepdims else xp.squeeze(med, axis=axis)


def masked_median(x, mask, *, axis=-1):
    """Masked median by one sort with bad entries set to +inf (see ``_ops.masked_median``)."""
    xp = array_namespace(x, mask)
    x = xp.astype(x, _float_dtype(xp, x), copy=False)
    good = xp.broadcast_to(mask, x.shape) & ~xp.isnan(x)
    return _masked_median(xp, x, good, axis, keepdims=False)


def _solve_small(xp, M, r, ok):
    """Solve stacked small systems M c = r (r: (..., K)); identity where ``ok`` is False."""
    K = M.shape[-1]
    eye = xp.eye(K, dtype=M.dtype, device=_device(M))
    okm = ok[..., None, None]
    M = xp.where(okm, M, eye)
    r = xp.where(ok[..., None], r, xp.zeros_like(r))
    return xp.linalg.solve(M, r[..., None])[..., 0]


def _first_coefficient(xp, moments, rhs, ok, K):
    """The constant term c_0 of each window's least-squares polynomial, (...,): the first entry of
    the solution of hankel(moments) c = rhs; NaN-free, 0 where ``ok`` is False.

    Degree 0 and 1 in closed form (c_0 = r_0 / m_0; Cramer's rule, c_0 = (m_2 r_0 − m_1 r_1) /
    (m_0 m_2 − m_1²)): a batched LAPACK solve of one 2×2 system per pixel costs ~10x the moments
    themselves (numpy, 20 × 4000 pixels). The moments are in u = d/h ∈ [−1, 1], so the 2×2
    determinant is well conditioned wherever the window holds two distinct good pixels, which a
    count ≥ 2 of distinct offsets guarantees. Higher degrees: :func:`_solve_small`."""
    if K > 2:
        return _solve_small(xp, _hankel(xp, moments, K), rhs, ok)[..., 0]
    m0 = moments[..., 0]
    if K == 1:
        num, den = rhs[..., 0], m0
    else:
        m1, m2 = moments[..., 1], moments[..., 2]
        num, den = m2 * rhs[..., 0] - m1 * rhs[..., 1], m0 * m2 - m1 * m1
    ok = ok & (den > 0)
    return xp.where(ok, num / xp.where(ok, den, 1.0), 0.0)


def _hankel(xp, moments, K):
    """(..., 2K-1) power moments -> (..., K, K) normal matrices M[a, b] = moments[a + b]."""
    rows = [xp.stack([moments[..., a + b] for b in range(K)], axis=-1) for a in range(K)]
    return xp.stack(rows, axis=-2)


def _savgol_interpolating(xp, y_m, good, window, axis):
    """``savgol_filter`` with polyorder = window − 1: the polynomial passes through every point of a
    full window, so a pixel is its own value where its whole window is good (the fitted value is
    the data, up to the rounding of the solve it skips) and unchanged, not good, elsewhere."""
    n = y_m.shape[-1]
    h = window // 2
    w = xp.astype(good, xp.int64)
    if h:
        pad = xp.zeros(w.shape[:-1] + (h,), dtype=xp.int64, device=_device(w))
        wp = xp.concat([pad, w, pad], axis=-1)
        count = wp[..., :n]
        for d in range(1, window):
            count = count + wp[..., d:d + n]
        # the first and last h pixels belong to the first / last full window, as in the general case
        first = xp.broadcast_to(xp.sum(w[..., :window], axis=-1)[..., None], w.shape[:-1] + (h,))
        last = xp.broadcast_to(xp.sum(w[..., n - window:], axis=-1)[..., None], w.shape[:-1] + (h,))
        count = xp.concat([first, count[..., h:n - h], last], axis=-1)
    else:
        count = w
    mask_out = good & (count >= window)
    return xp.moveaxis(y_m, -1, axis), xp.moveaxis(mask_out, -1, axis)


def _prefix_sum(xp, x):
    """Inclusive prefix sums along the last axis: ``xp.cumulative_sum`` where the namespace has it
    (array API 2023.12), else a product with a triangle of ones."""
    if hasattr(xp, "cumulative_sum"):
        return xp.cumulative_sum(x, axis=-1)
    idx = xp.arange(x.shape[-1], device=_device(x))
    return x @ xp.astype(idx[:, None] <= idx[None, :], x.dtype)  # tri[l, m] = l <= m


def _window_moments(xp, w, wy, h, K):
    """Centred-window moments along the last axis, shapes ``(..., n, 2K-1)`` and ``(..., n, K)``:

        moments[..., i, q] = Σ_{|d|<=h} w[i+d] u^q,   rhs[..., i, q] = Σ_{|d|<=h} wy[i+d] u^q,   u = d/h,

    w and wy counting as zero outside [0, n); h >= 1.

    Prefix sums instead of a loop over the 2h+1 offsets. One global prefix sum in the absolute
    index j would cancel badly (a window's sum is a difference of two running totals that grow like
    n^(q+1), then re-centred through (j − i)^q: ~(n/h)^q lost), so the axis is cut into blocks of
    B = 2h+1 pixels with the prefix sums restarted in each block and taken in a coordinate
    τ = (l − h)/h centred on the block (|τ| <= 1). A window spans its own block and at most one
    neighbour, so its sums are one or two in-block running sums or their differences (plain
    slices), and u = τ − σ, with σ the pixel's offset from the centre of that block (|σ| < 2),
    is expanded binomially. The rounding is then a few ulps of the window's Σ|terms| times at most 3^q,
    independent of n, like the offset loop. One component at a time, so the memory stays ~that of
    the outputs."""
    dev = _device(w)
    dt = w.dtype
    n = w.shape[-1]
    lead = w.shape[:-1]
    B = 2 * h + 1
    nb = -(-n // B)
    M = 2 * K - 1
    # one zero block before and after the nb blocks that hold the n pixels (and zeros to fill the last)
    zl = xp.zeros(lead + (B,), dtype=dt, device=dev)
    zr = xp.zeros(lead + ((nb + 1) * B - n,), dtype=dt, device=dev)
    blocks = [xp.reshape(xp.concat([zl, a, zr], axis=-1), lead + (nb + 2, B)) for a in (w, wy)]
    tau = (xp.arange(B, dtype=dt, device=dev) - h) / h
    # pixel p of a block: its own block holds window entries max(0, p-h) .. min(B-1, p+h); the rest
    # lie in the previous block (p < h: entries p+h+1 .. B-1) or the next (p > h: entries 0 .. p+h-B)
    p = xp.arange(B, dtype=dt, device=dev)
    sig_own = (p - h) / h
    sig_oth = xp.where(p < h, (p - h + B) / h, xp.where(p > h, (p - h - B) / h, 0.0))
    pow_own = [None] + [(-sig_own) ** e for e in range(1, M)]
    pow_oth = [None] + [(-sig_oth) ** e for e in range(1, M)]
    zero1 = xp.zeros(lead + (nb, 1), dtype=dt, device=dev)
    out = []
    for a, n_q in ((blocks[0], M), (blocks[1], K)):
        acc = [None] * n_q
        t_r = tau
        for r in range(n_q):
            if r > 1:
                t_r = t_r * tau
            # Q[..., k, l]: in-block running sums of a τ^r over entries 0 .. l of block k
            Q = _prefix_sum(xp, a * t_r if r else a)  # (..., nb + 2, B)
            own, prev, nxt = Q[..., 1 : nb + 1, :], Q[..., 0:nb, :], Q[..., 2 : nb + 2, :]
            end_own, end_prev = own[..., B - 1 : B], prev[..., B - 1 : B]
            s_own = xp.concat([own[..., h : 2 * h], end_own, end_own - own[..., :h]], axis=-1)
            s_oth = xp.concat([end_prev - prev[..., h : 2 * h], zero1, nxt[..., :h]], axis=-1)
            for q in range(r, n_q):
                if q == r:
                    term = s_own + s_oth
                else:
                    c = math.comb(q, r)
                    term = (c * pow_own[q - r]) * s_own + (c * pow_oth[q - r]) * s_oth
                acc[q] = term if acc[q] is None else acc[q] + term
        out.append(xp.reshape(xp.stack(acc, axis=-1), lead + (nb * B, n_q))[..., :n, :])
    return out[0], out[1]


def savgol_filter(y, mask, *, window, polyorder, axis=-1):
    """Masked Savitzky–Golay filter by local moment sums over offsets (see ``_ops.savgol_filter``)."""
    xp = array_namespace(y, mask)
    out_dtype = _float_dtype(xp, y)
    work = xp.float64
    dev = _device(y)
    y = xp.astype(y, out_dtype, copy=False)
    y_m = xp.moveaxis(y, axis, -1)
    good = xp.moveaxis(xp.broadcast_to(mask, y.shape), axis, -1) & xp.isfinite(y_m)
    n = y_m.shape[-1]
    h = window // 2
    K = polyorder + 1
    if K == window:
        return _savgol_interpolating(xp, y_m, good, window, axis)
    w = xp.astype(good, work)
    wy = xp.where(good, xp.astype(y_m, work), 0.0)

    # centred windows: moments Σ_d w[i+d] u^q and Σ_d w[i+d] y[i+d] u^q with u = d/h, by prefix sums
    moments, rhs = _window_moments(xp, w, wy, h, K)
    count = moments[..., 0]
    ok = count > K - 0.5
    value = _first_coefficient(xp, moments, rhs, ok, K)

    if h > 0:
        # the first and last h pixels take the fit over the first/last full window,
        # evaluated off-centre, as scipy.signal.savgol_filter(mode="interp") does
        u = (xp.arange(window, dtype=work, device=dev) - h) / h
        powers = xp.stack([u**q for q in range(2 * K - 1)], axis=-1)  # (window, 2K-1)
        pieces_v, pieces_c = [], []
        for sl, at in ((slice(0, window), slice(0, h)), (slice(n - window, n), slice(h + 1, window))):
            we, wye = w[..., sl], wy[..., sl]
            cnt = xp.sum(we, axis=-1)
            coef = _solve_small(xp, _hankel(xp, we @ powers, K), wye @ powers[:, :K], cnt > K - 0.5)
            pieces_v.append(coef @ xp.matrix_transpose(powers[at, :K]))
            pieces_c.append(xp.broadcast_to(cnt[..., None], cnt.shape + (h,)))
        value = xp.concat([pieces_v[0], value[..., h : n - h], pieces_v[1]], axis=-1)
        count = xp.concat([pieces_c[0], count[..., h : n - h], pieces_c[1]], axis=-1)

    mask_out = good & (count > K - 0.5)
    out = xp.where(mask_out, xp.astype(value, out_dtype), y_m)
    return xp.moveaxis(out, -1, axis), xp.moveaxis(mask_out, -1, axis)


def batched_lstsq(A, b, *, weights=None, ridge=0.0):
    """Weighted least squares by column-scaled normal equations (see ``_ops.batched_lstsq``)."""
    arrays = (A, b) if weights is None else (A, b, weights)
    xp = array_namespace(*arrays)
    dtype = _float_dtype(xp, *arrays)
    A = xp.astype(A, dtype, copy=False)
    b = xp.astype(b, dtype, copy=False)
    n, k = A.shape[-2], A.shape[-1]
    scale = xp.sqrt(xp.sum(A * A, axis=-2))
    scale = xp.where(scale > 0, scale, xp.ones_like(scale))
    As = A / scale[..., None, :]
    if weights is not None:
        weights = xp.astype(weights, dtype, copy=False)
    if A.ndim == 2:
        if weights is None:
            N = xp.matrix_transpose(As) @ As
            rhs = b @ As
        else:
            # one GEMM (batch, n) @ (n, k*k) builds every normal matrix; (batch, n, k) is never formed
            Q = xp.reshape(As[:, :, None] * As[:, None, :], (n, k * k))
            N = xp.reshape(weights @ Q, weights.shape[:-1] + (k, k))
            rhs = (weights * b) @ As
    else:
        Aw = As if weights is None else As * weights[..., :, None]
        N = xp.matrix_transpose(Aw) @ As
        rhs = (xp.matrix_transpose(Aw) @ b[..., None])[..., 0]
    if ridge:
        N = N + ridge * xp.eye(k, dtype=dtype, device=_device(A))
    lead = broadcast_shapes(N.shape[:-2], rhs.shape[:-1])
    N = xp.broadcast_to(N, lead + (k, k))
    rhs = xp.broadcast_to(rhs, lead + (k,))
    return xp.linalg.solve(N, rhs[..., None])[..., 0] / scale


def sigma_clip(x, *, weights=None, mask=None, nsigma=3.0, maxiter=5, axis=0, center="mean"):
    """Fixed-iteration sigma clipping (see ``_ops.sigma_clip``)."""
    arrays = tuple(a for a in (x, weights, mask) if a is not None)
    xp = array_namespace(*arrays)
    dtype = _float_dtype(xp, x)
    x = xp.astype(x, dtype, copy=False)
    kept = xp.isfinite(x)
    if mask is not None:
        kept = kept & xp.broadcast_to(mask, x.shape)
    xf = xp.where(kept, x, xp.zeros_like(x))
    if center == "mean":
        w = xp.ones_like(x) if weights is None else xp.broadcast_to(xp.astype(weights, dtype), x.shape)
    for _ in range(maxiter):
        if center == "mean":
            wk = xp.where(kept, w, xp.zeros_like(w))
            sw = xp.sum(wk, axis=axis, keepdims=True)
            has = sw > 0
            sw = xp.where(has, sw, xp.ones_like(sw))
            c = xp.sum(wk * xf, axis=axis, keepdims=True) / sw
            s = xp.sqrt(xp.sum(wk * (xf - c) ** 2, axis=axis, keepdims=True) / sw)
            kept = kept & has
        else:
            c = _masked_median(xp, xf, kept, axis, keepdims=True)
            s = 1.4826 * _masked_median(xp, xp.abs(xf - c), kept, axis, keepdims=True)
        # an entry once clipped stays clipped, so extra iterations after convergence change nothing
        kept = kept & (xp.abs(xf - c) <= nsigma * s)
    return kept


def _row_keys(xp, grid, x):
    """Each row of ``grid`` (R, n) and of ``x`` (R, m) moved to its own band of one increasing axis.

    Row r is shifted by r·span (span > every row's extent), and each x is first
    clipped into its own row's range, so one 1-D ``searchsorted`` (or interp) on
    the flattened keys finds every point within its own row. float64 keys.
    """
    g = xp.astype(grid, xp.float64)
    lo_all = xp.min(g)
    span = (xp.max(g) - lo_all) * 1.5 + 1.0
    r = xp.arange(g.shape[0], dtype=xp.float64, device=_device(g))[:, None] * span
    n = g.shape[-1]
    xc = xp.clip(xp.astype(x, xp.float64), g[:, :1], g[:, n - 1:])
    return (g - lo_all) + r, (xc - lo_all) + r


def interp_rows(x, grid, fp, *, left=None, right=None):
    """Linear interpolation with one abscissa grid per row (see ``_ops.interp_rows``); inputs broadcast to (R, ·)."""
    xp = array_namespace(x, grid, fp)
    dtype = _float_dtype(xp, fp)
    n, m = grid.shape[-1], x.shape[-1]
    lead = broadcast_shapes(x.shape[:-1], grid.shape[:-1], fp.shape[:-1])
    R = 1
    for d in lead:
        R *= d
    g = xp.reshape(xp.broadcast_to(grid, lead + (n,)), (R, n))
    f = xp.reshape(xp.broadcast_to(xp.astype(fp, dtype, copy=False), lead + (n,)), (R, n))
    xr = xp.reshape(xp.broadcast_to(x, lead + (m,)), (R, m))
    keys, xk = _row_keys(xp, g, xr)
    if n == 1:
        out = xp.broadcast_to(f, (R, m)) + xp.zeros((R, m), dtype=dtype, device=_device(f))
    else:
        pos = xp.searchsorted(xp.reshape(keys, (-1,)), xp.reshape(xk, (-1,)), side="right")
        base = xp.arange(R, dtype=pos.dtype, device=_device(pos))[:, None] * n
        hi = xp.clip(xp.reshape(pos, (R, m)) - base, 1, n - 1)
        lo = hi - 1
        x0, x1 = xp.take_along_axis(g, lo, axis=1), xp.take_along_axis(g, hi, axis=1)
        t = xp.astype(xp.clip((xp.astype(xr, x0.dtype) - x0) / (x1 - x0), 0.0, 1.0), dtype)
        f0 = xp.take_along_axis(f, lo, axis=1)
        out = f0 + (xp.take_along_axis(f, hi, axis=1) - f0) * t
    return _edges(xp, xp.reshape(out, lead + (m,)), xp.reshape(xr, lead + (m,)),
                  xp.reshape(g, lead + (n,)), left, right, dtype)


def _edges(xp, out, x, g, left, right, dtype):
    """``left`` / ``right`` where x lies below / above its own row's grid (None: keep the edge values)."""
    n = g.shape[-1]
    if left is not None:
        out = xp.where(x < g[..., :1], xp.asarray(left, dtype=dtype, device=_device(out)), out)
    if right is not None:
        out = xp.where(x > g[..., n - 1:], xp.asarray(right, dtype=dtype, device=_device(out)), out)
    return out

"""Operations the array API standard lacks (public, delegating module).

Each function infers the namespace from its inputs, checks its arguments once,
routes to a native implementation where one exists and agrees with the
portable fallback (the library :func:`~gpucal.backends._select.native_namespace`
names: numpy on NumPy, cupy on CuPy), and otherwise runs the fallback in
``_agnostic``, written only in the standard. Contracts (shapes, units,
dtypes) are in each docstring; they are the same on every backend. Results
live in the namespace and on the device of the inputs. No function here
synchronises with the host.
"""

from ..errors import InputError
from . import _agnostic
from ._select import array_namespace, native_namespace

__all__ = [
    "interp",
    "interp_rows",
    "masked_median",
    "savgol_filter",
    "batched_lstsq",
    "sigma_clip",
]


def _ns(*arrays):
    return array_namespace(*(a for a in arrays if a is not None))


def interp(x, xp_grid, fp, *, left=None, right=None):
    """Piecewise-linear interpolation, batched over leading axes.

    Parameters
    ----------
    x : array, shape (..., m)
        Query points (same units as ``xp_grid``).
    xp_grid : array, shape (n,)
        Strictly increasing abscissae.
    fp : array, shape (..., n)
        Values at ``xp_grid``. The leading axes of ``x`` and ``fp`` broadcast
        (e.g. ``x`` (V, 1, m) against ``fp`` (1, S, n) gives (V, S, m)).
    left, right : float, optional
        Value for ``x < xp_grid[0]`` / ``x > xp_grid[-1]``; ``None`` (default)
        uses the edge values of ``fp`` (``numpy.interp`` semantics).

    Returns
    -------
    array, shape broadcast(x.shape[:-1], fp.shape[:-1]) + (m,)
        In the floating dtype of ``fp`` (float64 for an integer ``fp``).

    Notes
    -----
    A 1-D ``fp`` on NumPy uses ``numpy.interp``, on CuPy ``cupy.interp``
    (both compute in float64; the result is cast back). Everything else
    runs ``searchsorted`` + ``take_along_axis``.

    Examples
    --------
    >>> import array_api_strict as xp
    >>> from gpucal.backends import interp
    >>> interp(xp.asarray([0.5, 2.0]), xp.asarray([0.0, 1.0]), xp.asarray([[0.0, 2.0], [1.0, 1.0]]))
    Array([[1., 2.],
           [1., 1.]], dtype=array_api_strict.float64)
    """
    xp = _ns(x, xp_grid, fp)
    if xp_grid.ndim != 1 or x.ndim < 1 or fp.ndim < 1:
        raise InputError(
            f"interp: need x (..., m), xp_grid (n,), fp (..., n); got {x.shape}, {xp_grid.shape}, {fp.shape}"
        )
    if fp.shape[-1] != xp_grid.shape[0] or xp_grid.shape[0] < 1:
        raise InputError(f"interp: fp has {fp.shape[-1]} values on its last axis but xp_grid has {xp_grid.shape[0]}")
    native = native_namespace(xp) if fp.ndim == 1 else None
    if native is not None:
        # numpy.interp is a compiled loop with no index arrays, cupy.interp one fused kernel;
        # identical semantics, in float64, so cast back to fp's floating dtype
        dtype = _agnostic._float_dtype(xp, fp)
        return native.asarray(native.interp(x, xp_grid, fp, left=left, right=right), dtype=dtype)
    return _agnostic.interp(x, xp_grid, fp, left=left, right=right)


def interp_rows(x, grid, fp, *, left=None, right=None):
    """Piecewise-linear interpolation where every row has its own abscissae (per-fibre wavelengths).

    Parameters
    ----------
    x : array, shape (..., m)
        Query points of each row.
    grid : array, shape (..., n)
        Each row's strictly increasing abscissae (e.g. a fibre's wavelengths).
    fp : array, shape (..., n)
        Values at ``grid``. The leading axes of the three broadcast.
    left, right : float, optional
        Value where ``x`` lies below / above its own row's grid; ``None``
        (default) uses that row's edge values (``numpy.interp`` semantics).

    Returns
    -------
    array, shape broadcast(leading axes) + (m,), in the floating dtype of ``fp``.

    Notes
    -----
    Rows are moved to disjoint bands of one increasing axis (row r shifted by
    r·span, each query clipped into its own row), so the whole batch is ONE
    1-D interpolation: on NumPy one ``numpy.interp`` call, on CuPy one
    ``cupy.interp`` kernel (float64 keys: exact to ~1e-16 of R·span), and
    elsewhere one ``searchsorted`` + ``take_along_axis`` with the weights taken
    from the original abscissae. No loop over rows.
    """
    xp = _ns(x, grid, fp)
    if x.ndim < 1 or grid.ndim < 1 or fp.shape[-1:] != grid.shape[-1:] or grid.shape[-1] < 1:
        raise InputError(
            f"interp_rows: need x (..., m), grid (..., n), fp (..., n); got {x.shape}, {grid.shape}, {fp.shape}"
        )
    native = native_namespace(xp)
    dtype = _agnostic._float_dtype(xp, fp)
    if native is None or grid.shape[-1] < 2 or xp.isdtype(dtype, "complex floating"):
        return _agnostic.interp_rows(x, grid, fp, left=left, right=right)
    lead = _agnostic.broadcast_shapes(x.shape[:-1], grid.shape[:-1], fp.shape[:-1])
    n, m = grid.shape[-1], x.shape[-1]
    g = native.reshape(native.broadcast_to(grid, lead + (n,)), (-1, n))
    xr = native.reshape(native.broadcast_to(x, lead + (m,)), (-1, m))
    keys, xk = _agnostic._row_keys(xp, g, xr)
    f = native.broadcast_to(fp, lead + (n,)).astype(native.float64).ravel()
    out = native.interp(xk.ravel(), keys.ravel(), f).reshape(lead + (m,)).astype(dtype)
    return _agnostic._edges(xp, out, native.reshape(xr, lead + (m,)), native.reshape(g, lead + (n,)),
                            left, right, dtype)


def masked_median(x, mask, *, axis=-1):
    """Median of ``x`` over the entries where ``mask`` is True, along ``axis``.

    Parameters
    ----------
    x : array
        Values; NaN entries are treated as masked, so
        ``masked_median(x, ~isnan(x))`` is a nanmedian.
    mask : bool array, broadcastable to ``x.shape``
        True = use the entry.
    axis : int, optional
        Axis to reduce (default last).

    Returns
    -------
    array
        ``x.shape`` without ``axis``, floating dtype of ``x``; NaN where no
        entry along ``axis`` is good. For an even count the mean of the two
        middle values, as ``numpy.median``.

    Notes
    -----
    One sort of ``x`` with bad entries replaced by +inf, then
    ``take_along_axis`` of the middle one(s) at a per-slice good count: no loop
    and no data-dependent shapes, on every backend (NumPy has no faster
    masked median: ``numpy.ma.median`` and ``nanmedian`` sort as well, slower).
    """
    _ns(x, mask)
    if not -x.ndim <= axis < x.ndim:
        raise InputError(f"masked_median: axis {axis} out of range for an array of shape {x.shape}")
    return _agnostic.masked_median(x, mask, axis=axis)


def savgol_filter(y, mask, *, window, polyorder, axis=-1):
    """Savitzky–Golay smoothing that ignores masked pixels and never un-masks them.

    Each output pixel is the value at that pixel of the least-squares
    polynomial of degree ``polyorder`` fitted to the good pixels of its
    window (masked pixels have zero weight).

    Parameters
    ----------
    y : array
        Data; non-finite values count as masked.
    mask : bool array, broadcastable to ``y.shape``
        True = good pixel.
    window : int
        Odd window length in pixels, ``polyorder < window <= y.shape[axis]``.
    polyorder : int
        Polynomial degree, ≥ 0.
    axis : int, optional
        Axis to filter along (default last).

    Returns
    -------
    smoothed : array, shape of ``y``, floating dtype of ``y``
    mask_out : bool array, shape of ``y``
        ``mask & isfinite(y) & (≥ polyorder + 1 good pixels in the window)``.
        Where it is False, ``smoothed`` equals ``y``.

    Notes
    -----
    Interior pixels use the window centred on them. The first and last
    ``window // 2`` pixels use the first/last full window, evaluated off
    centre, so with an all-True mask the result equals
    ``scipy.signal.savgol_filter(y, window, polyorder, mode="interp")``
    everywhere. The local moment sums are prefix sums restarted in blocks of
    one window (vectorised over all pixels; a window's rounding does not grow
    with the row's length), with positions scaled to [-1, 1] and in float64
    whatever the input dtype; the small
    ``(polyorder+1)²`` systems are solved in one batched ``linalg.solve``.
    scipy has no masked Savitzky–Golay filter, so every backend runs this.
    """
    _ns(y, mask)
    if not -y.ndim <= axis < y.ndim:
        raise InputError(f"savgol_filter: axis {axis} out of range for an array of shape {y.shape}")
    window, polyorder = int(window), int(polyorder)
    if window < 1 or window % 2 == 0:
        raise InputError(f"savgol_filter: window must be a positive odd integer, got {window}")
    if not 0 <= polyorder < window:
        raise InputError(f"savgol_filter: need 0 <= polyorder < window, got polyorder={polyorder}, window={window}")
    if y.shape[axis] < window:
        raise InputError(f"savgol_filter: window {window} is longer than the {y.shape[axis]} pixels along axis {axis}")
    return _agnostic.savgol_filter(y, mask, window=window, polyorder=polyorder, axis=axis)


def batched_lstsq(A, b, *, weights=None, ridge=0.0):
    """Weighted linear least squares for many right-hand sides, via normal equations.

    Minimises ``Σ_i w_i (A x - b)_i² + ridge Σ_j (s_j x_j)²`` with
    ``s_j = ||A[..., :, j]||₂`` (the ridge acts on the column-normalised
    problem, so it is scale-free).

    Parameters
    ----------
    A : array, shape (n, k) shared by every row, or (..., n, k)
        Design matrix. Use a well-conditioned basis (e.g. Legendre
        polynomials on [-1, 1]) for polynomial fits.
    b : array, shape (..., n)
        Data.
    weights : array, shape (..., n), optional
        Non-negative weights (e.g. inverse variances × mask); None = 1.
    ridge : float, optional
        Tikhonov term (see above); > 0 makes every system solvable, e.g.
        rows whose weights are all zero (which otherwise raise
        ``LinAlgError`` on NumPy and torch).

    Returns
    -------
    array, shape broadcast(...) + (k,)
        Floating dtype of the inputs.

    Notes
    -----
    Columns are scaled to unit norm before the normal matrices are formed
    (in the input dtype) and solved with ``xp.linalg.solve``. With a shared
    2-D ``A`` and per-row weights (batch, n), the normal matrices come from
    ONE matrix product ``weights @ (A_j A_l)`` of shape (batch, n) @ (n, k²),
    and ``(batch, n, k)`` is never formed. Matrix products and a batched
    solve are native everywhere, so every backend runs the same code.
    """
    _ns(A, b, weights)
    if A.ndim < 2 or b.ndim < 1 or b.shape[-1] != A.shape[-2]:
        raise InputError(f"batched_lstsq: need A (..., n, k) and b (..., n); got {A.shape} and {b.shape}")
    if weights is not None and (weights.ndim < 1 or weights.shape[-1] != A.shape[-2]):
        raise InputError(f"batched_lstsq: weights {weights.shape} do not match A {A.shape} on the n axis")
    if ridge < 0:
        raise InputError(f"batched_lstsq: ridge must be >= 0, got {ridge}")
    return _agnostic.batched_lstsq(A, b, weights=weights, ridge=ridge)


def sigma_clip(x, *, weights=None, mask=None, nsigma=3.0, maxiter=5, axis=0, center="mean"):
    """Iterative sigma clipping along ``axis``; returns the kept mask.

    Each iteration computes a centre ``c`` and scale ``s`` over the entries
    still kept and drops those with ``|x - c| > nsigma * s``. A dropped entry
    is never restored, so the iteration converges, and exactly ``maxiter``
    iterations are run (no data-dependent stop, hence no host
    synchronisation); iterations after convergence change nothing.

    Parameters
    ----------
    x : array
        Values; non-finite entries are never kept.
    weights : array broadcastable to ``x``, optional
        Non-negative weights for ``center="mean"`` (ignored by ``"median"``).
    mask : bool array broadcastable to ``x``, optional
        False entries are never kept and never used.
    nsigma : float, optional
        Clipping threshold in units of ``s``.
    maxiter : int, optional
        Number of iterations (≥ 0).
    axis : int, optional
        Axis along which centre and scale are computed (default 0, e.g.
        across stars for each pixel).
    center : {"mean", "median"}
        ``"mean"``: weighted mean and weighted population standard deviation
        ``sqrt(Σ w (x - c)² / Σ w)``. ``"median"``: median and 1.4826 × the
        median absolute deviation.

    Returns
    -------
    bool array, shape of ``x``
        True = kept. A slice with nothing kept (or zero total weight) keeps nothing.
    """
    _ns(x, weights, mask)
    if center not in ("mean", "median"):
        raise InputError(f"sigma_clip: center must be 'mean' or 'median', got {center!r}")
    if not -x.ndim <= axis < x.ndim:
        raise InputError(f"sigma_clip: axis {axis} out of range for an array of shape {x.shape}")
    if int(maxiter) < 0:
        raise InputError(f"sigma_clip: maxiter must be >= 0, got {maxiter}")
    return _agnostic.sigma_clip(
        x, weights=weights, mask=mask, nsigma=nsigma, maxiter=int(maxiter), axis=axis, center=center
    )

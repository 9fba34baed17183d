"""Continuous interpolation in a template grid: the cell that holds θ, its corners and their weights.

Part of the forward-model fit (:mod:`gpucal.fitting.forward`). A grid's nodes
lie on the product of its parameter axes (Teff, logg, [M/H], [α/M]); an axis
with one value is inactive (θ stays at that value). θ inside the grid is
interpolated multilinearly over the 2^D corners of the cell (box between
neighbouring axis values) that contains it, D the number of active axes:

    S(θ) = Σ_c w_c(θ) T_c,   w_c = Π_j (f_j if corner c is above along j else 1 − f_j),

f_j the fractional position of θ_j in the cell. S is exact at the nodes and
continuous across cell faces, so a fit moves freely from cell to cell.

Missing nodes. Grids are not always full cubes (the SDSS Kurucz grid misses a
node; BOSZ lacks hot dwarfs). A cell is *complete* when all its corners are
nodes of the grid; only complete cells are ever interpolated in, so nothing
is interpolated across a node that is not there. The hull a fit may use is
the union of the complete cells: a θ in an incomplete cell (or outside the
axes' range) is moved to the nearest point of the nearest complete cell
(nearest by cell-index distance, ties to the lower cell), and that move is
reported (``moved``), so a star that ends there is flagged as on the hull.

Shapes: params (n_t, 4) grid nodes; θ (n, 4); cell (n, 4) int64 lower-corner
indices along each axis; corner index / weight (n, n_c), n_c = 2^D; weight
derivatives (n, n_c, 4) per unit of each parameter.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from array_api_compat import device as _device

from ..backends import array_namespace, to_numpy
from ..errors import InputError

__all__ = ["CellGrid", "cell_grid", "locate", "corner_weights", "on_hull_face"]


@dataclass(frozen=True)
class CellGrid:
    """A grid's topology for continuous interpolation (built once per grid by :func:`cell_grid`).

    axes : per parameter, the sorted node values (host tuples); active : the
    parameters with more than one value; corners : (n_c, 4) host offsets of each
    corner; node : (Π n_j,) backend int64, the template index of every axis
    combination (−1 where the grid has no node); values : (4, n_max) backend
    float64 axis values padded with the last; n_axis : (4,) backend int64;
    target : (n_cells,) backend int64, for every cell the complete cell it is
    moved to (itself when complete); n_complete : how many cells are complete.
    """

    axes: tuple
    active: tuple
    corners: tuple
    node: object
    values: object
    n_axis: object
    target: object
    n_complete: int

    @property
    def n_corners(self) -> int:
        return len(self.corners)


def _strides(sizes):
    out, s = [], 1
    for n in reversed(sizes):
        out.append(s)
        s *= n
    return tuple(reversed(out))


def cell_grid(params) -> CellGrid:
    """The cells of the grid ``params`` (n_t, 4): node table, complete cells and where each incomplete one goes.

    Host work on the (small) parameter table, once per grid; the tables it
    returns live on ``params``'s device. InputError when no cell is complete
    (a grid with a single node along every axis is one complete "cell").
    """
    xp = array_namespace(params)
    dev = _device(params)
    rows = [tuple(r) for r in to_numpy(params).tolist()]
    n_par = len(rows[0])
    axes = tuple(tuple(sorted({r[j] for r in rows})) for j in range(n_par))
    sizes = [len(a) for a in axes]
    pos = [{v: k for k, v in enumerate(a)} for a in axes]
    strides = _strides(sizes)
    node = [-1] * (strides[0] * sizes[0])
    for t, r in enumerate(rows):
        node[sum(pos[j][r[j]] * strides[j] for j in range(n_par))] = t
    active = tuple(j for j in range(n_par) if sizes[j] > 1)
    corners = tuple(tuple(c[active.index(j)] if j in active else 0 for j in range(n_par))
                    for c in itertools.product((0, 1), repeat=len(active)))
    cell_sizes = [max(n - 1, 1) for n in sizes]
    cells = list(itertools.product(*[range(n) for n in cell_sizes]))
    complete = [all(node[sum((k[j] + c[j]) * strides[j] for j in range(n_par))] >= 0 for c in corners)
                for k in cells]
    good = [k for k, ok in zip(cells, complete) if ok]
    if not good:
        raise InputError("template grid has no complete cell: no two neighbouring nodes along every axis")
    target = []
    for k, ok in zip(cells, complete):
        best = k if ok else min(good, key=lambda g: (sum((a - b) ** 2 for a, b in zip(g, k)), g))
        target.append(sum(best[j] * _strides(cell_sizes)[j] for j in range(n_par)))
    n_max = max(sizes)
    values = [list(a) + [a[-1]] * (n_max - len(a)) for a in axes]
    return CellGrid(axes=axes, active=active, corners=corners,
                    node=xp.asarray(node, dtype=xp.int64, device=dev),
                    values=xp.asarray(values, dtype=xp.float64, device=dev),
                    n_axis=xp.asarray(sizes, dtype=xp.int64, device=dev),
                    target=xp.asarray(target, dtype=xp.int64, device=dev), n_complete=len(good))


def _axis_value(cg: CellGrid, j: int, k):
    xp = array_namespace(k)
    return xp.take(cg.values[j, :], k, axis=0)


def locate(cg: CellGrid, theta):
    """θ (n, 4) confined to the complete cells: (θ, cell (n, 4) int64, moved (n,) bool).

    θ is clipped to each axis's range, its cell found, and, where that cell is
    incomplete, θ clipped into the nearest complete cell (module docstring).
    ``moved`` is True where θ had to move (it was outside the hull).
    """
    xp = array_namespace(theta)
    n_par = theta.shape[1]
    sizes = [len(a) for a in cg.axes]
    cell_sizes = [max(n - 1, 1) for n in sizes]
    cstr = _strides(cell_sizes)
    cols, ks = [], []
    for j in range(n_par):
        lo, hi = cg.axes[j][0], cg.axes[j][-1]
        t = xp.clip(theta[:, j], lo, hi)
        if sizes[j] > 1:
            k = xp.searchsorted(cg.values[j, :sizes[j]], t, side="right") - 1
            k = xp.clip(k, 0, sizes[j] - 2)
        else:
            k = xp.zeros(t.shape, dtype=xp.int64, device=_device(t))
        cols.append(t)
        ks.append(xp.astype(k, xp.int64))
    flat = sum(ks[j] * cstr[j] for j in range(n_par))
    tgt = xp.take(cg.target, flat, axis=0)
    out_t, out_k = [], []
    for j in range(n_par):
        kj = (tgt // cstr[j]) % cell_sizes[j]
        if sizes[j] > 1:
            cols[j] = xp.clip(cols[j], _axis_value(cg, j, kj), _axis_value(cg, j, kj + 1))
        out_t.append(cols[j])
        out_k.append(kj)
    new = xp.stack(out_t, axis=1)
    moved = xp.any(new != theta, axis=1)
    return new, xp.stack(out_k, axis=1), moved


def corner_weights(cg: CellGrid, theta, cell):
    """Template index, weight and weight derivative of every corner of each θ's cell.

    θ (n, 4) must lie in ``cell`` (n, 4) (as :func:`locate` returns them).
    Returns idx (n, n_c) int64, w (n, n_c) float64 summing to 1, dw (n, n_c, 4)
    ∂w_c/∂θ_j per unit of θ_j (0 along inactive axes).
    """
    xp = array_namespace(theta)
    n_par = theta.shape[1]
    sizes = [len(a) for a in cg.axes]
    strides = _strides(sizes)
    frac, inv = [], []
    for j in range(n_par):
        if sizes[j] > 1:
            a0, a1 = _axis_value(cg, j, cell[:, j]), _axis_value(cg, j, cell[:, j] + 1)
            frac.append((theta[:, j] - a0) / (a1 - a0))
            inv.append(1.0 / (a1 - a0))
        else:
            frac.append(xp.zeros(theta.shape[:1], dtype=xp.float64, device=_device(theta)))
            inv.append(xp.zeros(theta.shape[:1], dtype=xp.float64, device=_device(theta)))
    idx, w, dw = [], [], []
    for c in cg.corners:
        factors = [frac[j] if c[j] else (1.0 - frac[j]) for j in range(n_par)]
        slopes = [inv[j] if c[j] else -inv[j] for j in range(n_par)]
        flat = sum((cell[:, j] + c[j]) * strides[j] for j in range(n_par))
        idx.append(xp.take(cg.node, flat, axis=0))
        prod = factors[0]
        for f in factors[1:]:
            prod = prod * f
        w.append(prod)
        grads = []
        for j in range(n_par):
            g = slopes[j]
            for i in range(n_par):
                if i != j:
                    g = g * factors[i]
            grads.append(g)
        dw.append(xp.stack(grads, axis=1))
    return xp.stack(idx, axis=1), xp.stack(w, axis=1), xp.stack(dw, axis=1)


def on_hull_face(cg: CellGrid, theta, cell):
    """(n,) bool: θ (in ``cell``, as :func:`locate` returns them) on the boundary of the complete cells'
    union — some direction ±e_j along an active axis leads out of every complete cell (the grid's
    edge, or the cells of a missing node): where the fit is held.

    A θ on a face of its cell is also on the faces of the cells beside it along the axes where it
    sits at a node value; the step across face j stays in the hull if any of those cells' neighbours
    across j is complete (host loops over the few axes, batched over θ).
    """
    xp = array_namespace(theta)
    cell_sizes = [max(len(a) - 1, 1) for a in cg.axes]
    cstr = _strides(cell_sizes)
    faces = {}
    for j in cg.active:
        faces[j] = (theta[:, j] <= _axis_value(cg, j, cell[:, j]), theta[:, j] >= _axis_value(cg, j, cell[:, j] + 1))
    out = xp.zeros(theta.shape[:1], dtype=xp.bool, device=_device(theta))
    for j in cg.active:
        others = [i for i in cg.active if i != j]
        for sj in (-1, 1):
            beyond = xp.zeros_like(out)
            for shifts in itertools.product((0, -1, 1), repeat=len(others)):
                ok = (cell[:, j] + sj >= 0) & (cell[:, j] + sj < cell_sizes[j])
                flat = (cell[:, j] + sj) * cstr[j]
                for i in range(theta.shape[1]):
                    if i == j:
                        continue
                    t = shifts[others.index(i)] if i in others else 0
                    if t:
                        ok = ok & faces[i][0 if t < 0 else 1] & (cell[:, i] + t >= 0) & (cell[:, i] + t < cell_sizes[i])
                    flat = flat + (cell[:, i] + t) * cstr[i]
                k = xp.where(ok, flat, 0)
                beyond = beyond | (ok & (xp.take(cg.target, k, axis=0) == k))
            out = out | (faces[j][0 if sj < 0 else 1] & ~beyond)
    return out

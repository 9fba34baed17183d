"""Host-side (NumPy) steps shared by the photometry room's modules.

Not a step of its own: the conversions of loosely typed inputs (lists,
scalars, NumPy or backend arrays) to host float64 arrays that the edge
modules and the colour priors need, and the least-squares polynomial of a
colour relation (a fit over the grid's ``n_t`` nodes, done once per grid on
the host). Kept here so that the array-API modules of the room (``synphot``,
``priors``) import no NumPy themselves.
"""

from __future__ import annotations

import numpy as np

from ..backends import to_numpy

__all__ = ["host_float", "fit_polynomial"]


def host_float(x) -> np.ndarray:
    """Host float64 copy of a sequence, scalar, NumPy or backend array."""
    if isinstance(x, (list, tuple, float, int, np.ndarray)) or np.isscalar(x):
        return np.array(x, dtype=np.float64)
    return np.array(to_numpy(x), dtype=np.float64)


def fit_polynomial(x, y, deg: int):
    """Least-squares polynomial ``y(x)`` of degree ``deg``, as ``numpy.polynomial`` fits it.

    ``x, y`` are host float64 ``(n,)`` arrays. Returns the ascending
    coefficients (a tuple of floats, in ``x``'s own domain) and the fitted
    ``y`` at ``x`` (host ``(n,)``). NumPy's scaled LAPACK least squares, so a
    relation is the same to the last bit whatever backend the grid lives on.
    """
    poly = np.polynomial.Polynomial.fit(x, y, deg).convert()
    return tuple(float(v) for v in poly.coef), poly(x)

"""Host-side (NumPy) steps shared by the photometry room's modules.

Not a step of its own: the conversions of loosely typed inputs (lists,
scalars, NumPy or backend arrays) to host float64 arrays that the edge
modules and the colour priors need, kept here so that the array-API modules
of the room (``synphot``, ``priors``) import no NumPy themselves.
"""

from __future__ import annotations

import numpy as np

from ..backends import to_numpy

__all__ = ["host_float"]


def host_float(x) -> np.ndarray:
    """Host float64 copy of a sequence, scalar, NumPy or backend array."""
    if isinstance(x, (list, tuple, float, int, np.ndarray)) or np.isscalar(x):
        return np.array(x, dtype=np.float64)
    return np.array(to_numpy(x), dtype=np.float64)

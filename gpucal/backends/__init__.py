"""The array-namespace layer.

gpucal's numerical code is written once against the Python array API and
runs on whatever namespace its inputs live in. This package is the only
numerical code that names numpy, cupy, scipy or cupyx:

* backend selection, host/device transfers and the one choice of native
  delegate per namespace (``_select``: :func:`native_namespace`);
* operations the array API standard lacks (``_ops``), each delegated to the
  native library (numpy on NumPy, cupy on CuPy) where it has the operation
  and agrees, with a portable fallback written in the standard (``_agnostic``);
* the device at run time (``_runtime``): synchronisation, memory-pool size,
  device name, cache-sized blocks, for code that times or sizes work.

It lives at ``gpucal.backends`` rather than a top-level ``backends`` package,
which would collide with an unrelated PyPI distribution.
"""

from ._select import (
    BACKEND_NAMES,
    Backend,
    array_namespace,
    backend_of,
    get_backend,
    native_namespace,
    to_backend,
    to_numpy,
)
from ._ops import (
    batched_lstsq,
    interp,
    interp_rows,
    masked_median,
    savgol_filter,
    sigma_clip,
)
from ._runtime import cache_columns, device_name, memory_pool_bytes, synchronize

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "array_namespace",
    "backend_of",
    "get_backend",
    "native_namespace",
    "to_backend",
    "to_numpy",
    "interp",
    "interp_rows",
    "masked_median",
    "savgol_filter",
    "batched_lstsq",
    "sigma_clip",
    "synchronize",
    "memory_pool_bytes",
    "device_name",
    "cache_columns",
]

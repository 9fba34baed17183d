"""Choosing an array backend and moving data between host and device.

These are the only functions in gpucal that move array data across the
host/device boundary: `to_backend` (host -> backend) and `to_numpy`
(backend -> host). Everything else works on whatever namespace its inputs
live in.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from array_api_compat import array_namespace as _compat_namespace
from array_api_compat import (
    is_array_api_strict_namespace,
    is_cupy_namespace,
    is_jax_namespace,
    is_numpy_namespace,
    is_torch_namespace,
)

from ..errors import BackendError

__all__ = [
    "Backend",
    "BACKEND_NAMES",
    "get_backend",
    "array_namespace",
    "backend_of",
    "native_namespace",
    "to_backend",
    "to_numpy",
]

logger = logging.getLogger("gpucal.backends")

BACKEND_NAMES = ("auto", "numpy", "cupy", "torch", "array_api_strict")
#: Namespaces array-api-compat knows that gpucal is not tested on: named, refused.
UNSUPPORTED = {"jax": "gpucal is not tested on JAX (no JAX in its test matrix)"}


@dataclass(frozen=True)
class Backend:
    """An array namespace and the device arrays are created on.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"cupy"``, ``"torch"`` or ``"array_api_strict"``.
    xp : module
        The array-API-compatible namespace (array-api-compat wrappers for
        numpy, cupy and torch).
    device : object or None
        Device new arrays are created on (``None`` means the namespace default).
    reason : str
        Why this backend was chosen (shown by ``gpucal info`` and logged).
    """

    name: str
    xp: Any = field(repr=False)
    device: Any = None
    reason: str = ""

    def asarray(self, x, dtype=None):
        """Host data -> this backend (alias of :func:`to_backend`)."""
        return to_backend(x, self, dtype=dtype)


def array_namespace(*arrays):
    """The array-API namespace of ``arrays`` (array-api-compat's, re-exported)."""
    return _compat_namespace(*arrays)


def native_namespace(xp):
    """The array library behind namespace ``xp`` whose own compiled routines gpucal calls: numpy, cupy, or None.

    The one place that decides delegation (as scipy's ``scipy_namespace_for``
    does for its own functions): the NumPy namespace (array-api-compat's
    wrapper) delegates to ``numpy``, CuPy's to ``cupy``; every other
    namespace (torch, JAX, array-api-strict) gets None and runs the portable
    fallback. The library is imported only when ``xp`` is its namespace.
    """
    if is_numpy_namespace(xp):
        return np
    if is_cupy_namespace(xp):
        import cupy

        return cupy
    return None


def _cupy_usable():
    """(ok, reason) for CuPy: importable AND at least one CUDA device answers."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        return False, f"cupy is not installed or failed to import ({type(exc).__name__}: {exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # raises CUDARuntimeError without a driver
        return False, f"cupy imports but no CUDA device answers ({type(exc).__name__}: {exc})"
    if n < 1:
        return False, "cupy imports but reports 0 CUDA devices"
    return True, f"cupy {cupy.__version__} with {n} CUDA device(s)"


def _make(name: str, reason: str) -> Backend:
    if name == "numpy":
        import array_api_compat.numpy as xp

        return Backend("numpy", xp, "cpu", reason)
    if name == "cupy":
        ok, why = _cupy_usable()
        if not ok:
            raise BackendError(f"backend 'cupy' is not usable: {why}")
        import array_api_compat.cupy as xp
        import cupy

        return Backend("cupy", xp, cupy.cuda.Device(), reason or why)
    if name == "torch":
        try:
            import array_api_compat.torch as xp  # imports torch: ImportError without it
        except ImportError as exc:
            raise BackendError(f"backend 'torch' is not usable: torch is not installed ({exc})") from None
        return Backend("torch", xp, xp.asarray(0.0).device, reason or "requested")
    if name in UNSUPPORTED:
        raise BackendError(f"backend {name!r} is not supported: {UNSUPPORTED[name]}; "
                           f"choose one of {', '.join(BACKEND_NAMES)}")
    if name == "array_api_strict":
        try:
            xp = importlib.import_module("array_api_strict")
        except ImportError as exc:
            raise BackendError(
                f"backend 'array_api_strict' is not usable: array-api-strict is not installed ({exc})"
            ) from None
        return Backend("array_api_strict", xp, None, reason or "requested")
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def get_backend(name: str | None = None) -> Backend:
    """Select the array backend.

    Parameters
    ----------
    name : str, optional
        One of ``auto``, ``numpy``, ``cupy``, ``torch`` (and
        ``array_api_strict`` for validation). Defaults to the
        ``GPUCAL_BACKEND`` environment variable, else ``auto``.

    ``auto`` picks CuPy when it imports and a CUDA device answers, else NumPy,
    and logs the choice and why. An explicitly named backend that cannot be
    used raises :class:`~gpucal.errors.BackendError`; it never falls back.
    """
    if isinstance(name, Backend):
        return name
    source = "argument"
    if name is None:
        name = os.environ.get("GPUCAL_BACKEND") or "auto"
        source = "GPUCAL_BACKEND" if os.environ.get("GPUCAL_BACKEND") else "default"
    name = name.strip().lower().replace("-", "_")
    if name == "auto":
        ok, why = _cupy_usable()
        if ok:
            backend = _make("cupy", f"auto: {why}")
        else:
            backend = _make("numpy", f"auto: GPU not usable, running on the CPU ({why})")
        logger.info("gpucal backend: %s (%s)", backend.name, backend.reason)
        return backend
    backend = _make(name, f"requested by {source}")
    logger.info("gpucal backend: %s (%s)", backend.name, backend.reason)
    return backend


def backend_of(x) -> Backend:
    """The Backend an existing array lives on (namespace and device)."""
    xp = array_namespace(x)
    from array_api_compat import device as _device

    if is_numpy_namespace(xp):
        name = "numpy"
    elif is_cupy_namespace(xp):
        name = "cupy"
    elif is_torch_namespace(xp):
        name = "torch"
    elif is_jax_namespace(xp):
        name = "jax"
    elif is_array_api_strict_namespace(xp):
        name = "array_api_strict"
    else:
        name = getattr(xp, "__name__", "unknown")
    return Backend(name, xp, _device(x), "inferred from an array")


def to_numpy(x) -> np.ndarray:
    """Any backend's array -> host NumPy array (one transfer, at the edges only)."""
    if isinstance(x, np.ndarray) or np.isscalar(x):
        return np.asarray(x)
    xp = array_namespace(x)
    if is_cupy_namespace(xp):
        return x.get()
    if is_torch_namespace(xp):
        return x.detach().cpu().numpy()
    if is_array_api_strict_namespace(xp):
        return np.asarray(x.to_device(xp.Device("CPU_DEVICE")))
    return np.asarray(x)


def to_backend(x, backend: Backend, dtype=None):
    """Host (or other-backend) data -> an array of ``backend`` on its device."""
    xp = backend.xp
    if not isinstance(x, np.ndarray) and not np.isscalar(x) and not isinstance(x, (list, tuple)):
        try:
            if array_namespace(x) is xp:
                return x if dtype is None else xp.astype(x, dtype)
        except TypeError:
            pass
        x = to_numpy(x)
    x = np.asarray(x)
    if backend.name == "cupy":
        import cupy

        with backend.device:
            out = cupy.asarray(x)
    elif backend.name == "torch":
        import torch

        # torch refuses to share read-only memory (cached grids are read-only).
        out = torch.as_tensor(x if x.flags.writeable else x.copy(), device=backend.device)
    elif backend.name == "array_api_strict":
        out = xp.asarray(x, device=backend.device) if backend.device is not None else xp.asarray(x)
    else:
        out = xp.asarray(x)
    return out if dtype is None else xp.astype(out, dtype)

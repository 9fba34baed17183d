"""The device at run time: waiting for it, its memory pool, its name, how to block work for it.

Host-side helpers for code that times or sizes work (``gpucal bench``), so
that it names no CuPy API itself. Each takes a :class:`Backend` or an array
(whose namespace and device are used). On CuPy they act on the array's (or
backend's) CUDA device; on every other namespace computation is already
synchronous, there is no memory pool to read (None), and the device is the
host CPU.
"""

from __future__ import annotations

import os
import platform

from array_api_compat import device as _device
from array_api_compat import is_array_api_strict_namespace, is_cupy_namespace, is_numpy_namespace

from ._select import Backend, array_namespace

__all__ = ["synchronize", "memory_pool_bytes", "device_name", "cache_columns"]

#: float64 elements per block that keep a streaming loop's working set within a CPU core's L2 cache.
HOST_BLOCK_ELEMENTS = 1 << 16


def _namespace_and_device(backend_or_array):
    if isinstance(backend_or_array, Backend):
        return backend_or_array.xp, backend_or_array.device
    return array_namespace(backend_or_array), _device(backend_or_array)


def _cuda_device(dev):
    """``dev`` as a ``cupy.cuda.Device`` (the current device when None)."""
    import cupy

    return dev if isinstance(dev, cupy.cuda.Device) else cupy.cuda.Device()


def synchronize(backend_or_array) -> None:
    """Wait until the work queued on the device has finished (before reading a clock).

    CuPy: every stream of the CUDA device. Elsewhere a no-op.
    """
    xp, dev = _namespace_and_device(backend_or_array)
    if is_cupy_namespace(xp):
        _cuda_device(dev).synchronize()


def memory_pool_bytes(backend_or_array, *, release_unused: bool = False) -> int | None:
    """Bytes the device's memory pool holds now (CuPy's default pool); None where there is no pool.

    With ``release_unused`` the pool first returns its free blocks to the
    device, so that the growth measured from here is what the work after it
    needed: an upper bound of that work's peak device memory.
    """
    xp, dev = _namespace_and_device(backend_or_array)
    if not is_cupy_namespace(xp):
        return None
    import cupy

    with _cuda_device(dev):
        pool = cupy.get_default_memory_pool()
        if release_unused:
            pool.free_all_blocks()
        return int(pool.total_bytes())


def device_name(backend_or_array) -> str:
    """What the work runs on, in words: the GPU's name on CuPy, else the host CPU and its core count."""
    xp, dev = _namespace_and_device(backend_or_array)
    if is_cupy_namespace(xp):
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(_cuda_device(dev).id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def cache_columns(x, rows: int) -> int | None:
    """Columns per block for a loop that streams many passes over a (rows, n) array, or None: no blocking.

    On the host (NumPy, array-api-strict) each pass over a whole large array
    goes to memory; blocks of about :data:`HOST_BLOCK_ELEMENTS` elements stay
    in the cache, at the price of one Python step per block. A GPU (CuPy,
    and any other namespace) gets the whole row: there a block is a kernel launch.
    """
    xp = array_namespace(x)
    if not (is_numpy_namespace(xp) or is_array_api_strict_namespace(xp)):
        return None
    return max(256, HOST_BLOCK_ELEMENTS // max(int(rows), 1))

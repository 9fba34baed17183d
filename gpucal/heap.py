"""The process's memory allocator, kept from handing a frame's temporaries back to the system.

Not a numerical step: a setting of the process that runs the command line (:func:`keep_heap`,
called once by :func:`gpucal.cli.main`) and of the dask workers it starts (:data:`MALLOC_ENV`, their
environment at spawn, read by glibc when they start).

A frame's kernels make temporaries of (n_star, n_pix) and (n_star, n_corner, n_pix) float64
arrays, 0.6-10 MB each, hundreds of times a frame. glibc's defaults return such blocks to the
system when they are freed (an mmap above 128 KiB, or a trimmed top of the heap), so the next one
is faulted in and zeroed page by page again. Measured on the 2-core VM (240 templates x 20
standards x 4000 px): 13 % of a frame's time in a batch and 0.35 s of a fresh `gpucal calibrate`
(0.6 s of system time -> 0.15 s). With these settings the heap keeps up to :data:`TRIM` bytes free
at its top and serves blocks up to :data:`MMAP_MAX` from it; a process's footprint stays that of
its largest frame, which it needs again for the next.

``GPUCAL_MALLOC=system`` leaves the allocator as it is. Where the C library is not glibc (macOS,
musl) nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MALLOC_ENV", "keep_heap"]

#: Blocks up to this size come from the heap, not a fresh mmap (glibc's largest allowed value on
#: 64-bit systems, 32 MiB).
MMAP_MAX = 32 * 1024 * 1024
#: Free bytes the heap keeps at its top before trimming.
TRIM = 512 * 1024 * 1024
#: Bytes added to each growth of the heap.
TOP_PAD = 64 * 1024 * 1024

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: The same settings as glibc's environment variables, for a process about to be spawned.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM),
              "MALLOC_TOP_PAD_": str(TOP_PAD)}


def keep_heap() -> bool:
    """Apply the settings to this process's glibc allocator; True where they took effect.

    Nothing is changed under ``GPUCAL_MALLOC=system``, off Linux, or where the C library has no
    ``mallopt`` (not glibc).
    """
    if os.environ.get("GPUCAL_MALLOC", "").strip().lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's name on Linux: no ldconfig subprocess (find_library)
    except OSError:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"))
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = [mallopt(_M_MMAP_THRESHOLD, MMAP_MAX), mallopt(_M_TRIM_THRESHOLD, TRIM), mallopt(_M_TOP_PAD, TOP_PAD)]
    return all(r == 1 for r in ok)

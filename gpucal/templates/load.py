"""Where a template grid comes from: ``"demo"``, a TemplateGrid, a prepared cache, a BOSZ directory or a FITS grid.

Step of the mission: the first call of a calibration, ``--templates SPEC``
turned into the grid every frame is matched against.

In: a spec (``"demo"``, a TemplateGrid, a path). Out: a TemplateGrid
(host arrays; a cache's flux and continuum memory-mapped float32).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..containers import TemplateGrid
from ..errors import InputError
from .cache import open_templates
from .demo import demo_grid
from .prepare import DEFAULT_VMAX

__all__ = ["load_templates", "lsf_window"]

_BASE_MARGIN = 0.005  # the relative margin every prepared grid has beyond the frame (templates.prepare)


def lsf_window(wave_range, *, lsf=None, vmax=None):
    """The frame range ``wave_range`` (min, max) Å widened so an on-the-fly grid covers a broad LSF and a wide
    velocity scan: by six σ of the largest FWHM of ``lsf`` (dict fwhm / fwhm_poly / resolution) over the range
    where that exceeds the 0.5 % every grid has, and by the Doppler factor of ``vmax`` km/s beyond ±500.

    Unchanged (the same cache key as before) for an LSF narrower than 0.5 % and ``|v|`` ≤ 500 km/s.
    """
    if wave_range is None:
        return None
    lo, hi = float(wave_range[0]), float(wave_range[1])
    if lsf and any(v is not None for v in lsf.values()):
        from ..fitting.lsf import instrument_fwhm
        from ..units import FWHM_TO_SIGMA

        probe = np.linspace(0.9 * lo, 1.1 * hi, 501)
        six = 6.0 * FWHM_TO_SIGMA * float(np.max(instrument_fwhm(probe, **lsf)))
        lo = lo - six if six > _BASE_MARGIN * lo else lo
        hi = hi + six if six > _BASE_MARGIN * hi else hi
    if vmax is not None and abs(float(vmax)) > DEFAULT_VMAX:
        from ..units import C_KMS

        def dop(v):
            return math.sqrt((1.0 + v / C_KMS) / (1.0 - v / C_KMS))

        extra = dop(min(abs(float(vmax)), 0.09 * C_KMS)) / dop(DEFAULT_VMAX)
        lo, hi = lo / extra, hi * extra
    return (max(lo, 1.0), hi)


def load_templates(spec, *, wave_range=None, medium="air", cache_dir=None, workers=None, lsf=None,
                   vmax=None) -> TemplateGrid:
    """A TemplateGrid from ``"demo"``, a TemplateGrid, a prepared cache or a BOSZ 2024 directory.

    A cache (``gpucal templates prepare``) is memory-mapped and checked against
    its inputs. A BOSZ directory is prepared on the fly (unconvolved, covering
    ``wave_range`` Å — default 3500-10000 — plus the g r i z bands and ±500 km/s,
    in ``medium``; widened by :func:`lsf_window` for the instrument ``lsf`` and
    the scan's largest ``|v|`` = ``vmax`` km/s) and cached in ``cache_dir`` (default ``$GPUCAL_CACHE_DIR`` or
    ``~/.cache/gpucal/templates``); see :mod:`gpucal.templates.cache`. A FITS
    grid file (``.fits``/``.fit``: the generic layout or SDSS's
    ``kurucz_stds_v5.fit``, :mod:`gpucal.templates.fitsgrid`) is prepared and
    cached the same way.
    """
    if isinstance(spec, TemplateGrid):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "demo":
        return demo_grid()
    if isinstance(spec, (str, os.PathLike)):
        return open_templates(spec, wave_range=lsf_window(wave_range, lsf=lsf, vmax=vmax), medium=medium,
                              cache_dir=cache_dir, workers=workers)
    raise InputError(f"--templates {spec!r}: expected 'demo', a prepared template cache, a BOSZ 2024 directory "
                     "or a FITS grid file")

"""Where a template grid comes from: ``"demo"``, a TemplateGrid, a prepared cache, a BOSZ directory or a FITS grid.

Step of the mission: the first call of a calibration, ``--templates SPEC``
turned into the grid every frame is matched against.

In: a spec (``"demo"``, a TemplateGrid, a path). Out: a TemplateGrid
(host arrays; a cache's flux and continuum memory-mapped float32).
"""

from __future__ import annotations

import os

from ..containers import TemplateGrid
from ..errors import InputError
from .cache import open_templates
from .demo import demo_grid

__all__ = ["load_templates"]


def load_templates(spec, *, wave_range=None, medium="air", cache_dir=None, workers=None) -> TemplateGrid:
    """A TemplateGrid from ``"demo"``, a TemplateGrid, a prepared cache or a BOSZ 2024 directory.

    A cache (``gpucal templates prepare``) is memory-mapped and checked against
    its inputs. A BOSZ directory is prepared on the fly (unconvolved, covering
    ``wave_range`` Å — default 3500-10000 — plus the g r i z bands and ±500 km/s,
    in ``medium``) and cached in ``cache_dir`` (default ``$GPUCAL_CACHE_DIR`` or
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
        return open_templates(spec, wave_range=wave_range, medium=medium, cache_dir=cache_dir, workers=workers)
    raise InputError(f"--templates {spec!r}: expected 'demo', a prepared template cache, a BOSZ 2024 directory "
                     "or a FITS grid file")

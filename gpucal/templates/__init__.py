"""templates room: template grids, from a release on disk to the grid every frame is matched against.

Modules
-------
bosz : the BOSZ 2024 release: file names, directory index, reader, writers of the same format.
prepare : a BOSZ subgrid -> one log-uniform working grid (window, flux-conserving resampling,
    parallel readers, optional LSF convolution).
keys : the cache format and version, and the SHA-256 digests that key and verify grids.
cache : the prepared grid as ``.npy`` + JSON, written atomically, memory-mapped and verified on load,
    prepared on demand for a BOSZ directory.
fitsgrid : template grids in one FITS file (a generic layout, SDSS's ``kurucz_stds_v5.fit``).
load : ``load_templates``: ``"demo"``, a TemplateGrid, a cache or a BOSZ directory -> a TemplateGrid.
demo : the analytic demo grid (``demo_grid``, ``demo_template``).

Other rooms import from here (``from ..templates import load_templates``), not from the modules.
"""

from ..containers import TemplateGrid
from ..errors import CorruptCacheError, StaleCacheError
from .bosz import (
    BOSZ_MEDIUM,
    FOUR_PI,
    BoszIndex,
    BoszModel,
    BoszSpectrum,
    bosz_file_name,
    bosz_subdir,
    bosz_wave_file_name,
    index_bosz,
    parse_bosz_name,
    read_bosz_spectrum,
    read_wave_file,
    write_bosz_spectrum,
    write_demo_bosz_tree,
    write_wave_file,
)
from .cache import (
    default_cache_dir,
    load_or_prepare_bosz,
    load_or_prepare_fits_grid,
    load_template_cache,
    open_array_store,
    open_templates,
    prepare_template_cache,
    write_array_store,
    write_template_cache,
)
from .fitsgrid import (
    FITS_GRID_SUFFIXES,
    FitsGridFile,
    is_fits_grid,
    prepare_fits_grid,
    read_fits_grid,
    write_fits_grid,
)
from .demo import DEMO_ALPHA, DEMO_LOGG, DEMO_MH, DEMO_TEFF, demo_grid, demo_template, demo_wave
from .keys import CACHE_FORMAT, CACHE_VERSION
from .load import load_templates
from .prepare import (
    DEFAULT_BANDS,
    DEFAULT_FRAME_RANGE,
    DEFAULT_VMAX,
    needed_wave_range,
    prepare_bosz_grid,
    resample_flux,
)

__all__ = [
    "TemplateGrid",
    "StaleCacheError",
    "CorruptCacheError",
    # bosz
    "BOSZ_MEDIUM",
    "FOUR_PI",
    "BoszModel",
    "BoszIndex",
    "BoszSpectrum",
    "parse_bosz_name",
    "bosz_file_name",
    "bosz_wave_file_name",
    "bosz_subdir",
    "index_bosz",
    "read_wave_file",
    "read_bosz_spectrum",
    "write_bosz_spectrum",
    "write_wave_file",
    "write_demo_bosz_tree",
    # prepare
    "DEFAULT_FRAME_RANGE",
    "DEFAULT_BANDS",
    "DEFAULT_VMAX",
    "needed_wave_range",
    "resample_flux",
    "prepare_bosz_grid",
    # keys
    "CACHE_FORMAT",
    "CACHE_VERSION",
    # cache
    "write_template_cache",
    "load_template_cache",
    "prepare_template_cache",
    "load_or_prepare_bosz",
    "open_templates",
    "default_cache_dir",
    "load_or_prepare_fits_grid",
    # fitsgrid
    "FITS_GRID_SUFFIXES",
    "FitsGridFile",
    "is_fits_grid",
    "read_fits_grid",
    "prepare_fits_grid",
    "write_fits_grid",
    "write_array_store",
    "open_array_store",
    # load
    "load_templates",
    # demo (the grid; the frame simulator is not part of this room)
    "DEMO_TEFF",
    "DEMO_LOGG",
    "DEMO_MH",
    "DEMO_ALPHA",
    "demo_grid",
    "demo_template",
    "demo_wave",
]

"""The prepared-grid cache: a TemplateGrid as memory-mappable ``.npy`` arrays plus a JSON sidecar (host edge module).

Step of the mission: keep a prepared grid (:mod:`gpucal.templates.prepare`)
on disk so that every later frame opens it in milliseconds, and never use
one that no longer matches its inputs.

Cache layout (a directory)
    ``params.npy`` float64 (n_t, 4) [Teff, logg, [M/H], [α/M]];
    ``wave.npy`` float64 (n_w,) Å, log-uniform; ``flux.npy`` and
    ``continuum.npy`` float32 (n_t, n_w) erg/s/cm²/Å; ``grid.json`` the
    sidecar: format and version, the parameters of every node, the grid
    (range, Δlnλ, medium), the LSF and ``resolution_fwhm``, the selection,
    and the inputs: each file's path relative to the source root, size,
    mtime and SHA-256, with ``inputs_sha256`` (SHA-256 over the sorted
    (path, SHA-256) pairs and the preparation settings) as the content hash.
    Arrays are written by ``numpy.save`` and opened with
    ``mmap_mode="r", allow_pickle=False``: a cache cannot run code.

Loading (:func:`load_template_cache`)
    checks the sidecar against the arrays and, where the source directory
    still exists, the inputs: a file whose size or mtime changed is hashed
    again, and a changed or missing input, or a new file in the inputs'
    folders that the selection would take, is refused (:class:`StaleCacheError`,
    naming the files). A cache whose source directory is gone (moved to
    another machine) loads with a warning. ``verify="full"`` re-hashes
    everything; ``verify="none"`` trusts the cache.

Prepared on demand (:func:`load_or_prepare_bosz`, :func:`open_templates`)
    a BOSZ directory given where a grid is expected is prepared once and
    cached under :func:`default_cache_dir`, keyed by the source path and the
    preparation options; a stale cache is prepared again.

In: a TemplateGrid (write) or a cache directory (load). Out: a TemplateGrid
whose flux and continuum are read-only float32 memory maps. NumPy on the host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np

from ..containers import TemplateGrid
from ..errors import InputError, StaleCacheError
from .bosz import BoszIndex, parse_bosz_name
from .keys import CACHE_FORMAT, CACHE_VERSION, _sha256_file, _sha256_text
from .prepare import prepare_bosz_grid

__all__ = [
    "write_template_cache",
    "load_template_cache",
    "prepare_template_cache",
    "load_or_prepare_bosz",
    "open_templates",
    "default_cache_dir",
]

logger = logging.getLogger("gpucal.templates.cache")

SIDECAR = "grid.json"
_ARRAYS = ("params", "wave", "flux", "continuum")


def _is_cache(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SIDECAR))


def write_template_cache(grid: TemplateGrid, out, *, overwrite: bool = False) -> str:
    """Write ``grid`` as a cache directory (see the module docstring); returns its path.

    The directory is built beside ``out`` and renamed into place, so a
    reader never sees a half-written cache. An existing cache is replaced
    only with ``overwrite``; an existing directory that is not a cache is
    never touched.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not _is_cache(out):
            raise InputError(f"{out}: exists and is not a gpucal template cache; choose another --out")
        if not overwrite:
            raise InputError(f"{out}: a template cache already exists (use --overwrite to replace it)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        arrays = {
            "params": np.ascontiguousarray(np.asarray(grid.params, dtype=np.float64)),
            "wave": np.ascontiguousarray(np.asarray(grid.wave, dtype=np.float64)),
            "flux": np.ascontiguousarray(np.asarray(grid.flux, dtype=np.float32)),
            "continuum": np.ascontiguousarray(np.asarray(grid.continuum if grid.continuum is not None
                                                         else grid.flux, dtype=np.float32)),
        }
        info = {}
        for name, arr in arrays.items():
            fname = os.path.join(tmp, f"{name}.npy")
            np.save(fname, arr, allow_pickle=False)
            info[name] = {"file": f"{name}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "sha256": _sha256_file(fname)}
        meta = dict(grid.meta)
        meta.update({"format": CACHE_FORMAT, "version": CACHE_VERSION, "arrays": info, "medium": grid.medium,
                     "resolution_fwhm": grid.resolution_fwhm, "has_continuum": grid.continuum is not None,
                     "params": arrays["params"].tolist()})
        with open(os.path.join(tmp, SIDECAR), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1, default=str)
        if os.path.exists(out):
            trash = f"{out}.old-{os.getpid()}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _input_changes(meta: dict, *, full: bool):
    """Descriptions of changed inputs, or None when the source cannot be checked."""
    src = meta["source"]
    root = src.get("root")
    if not root or not os.path.isdir(root):
        return None
    recs = list(src.get("files") or [])
    if src.get("wave_file"):
        recs.append(src["wave_file"])
    changes = []
    for rec in recs:
        p = os.path.join(root, rec["path"])
        try:
            st = os.stat(p)
        except OSError:
            changes.append(f"missing {rec['path']}")
            continue
        if full or st.st_size != rec.get("size") or st.st_mtime_ns != rec.get("mtime_ns"):
            if _sha256_file(p) != rec.get("sha256"):
                changes.append(f"changed {rec['path']}")
    # new files the selection would take, looked for in the folders the inputs
    # came from (not a walk of the whole library, which may hold 10⁵ files)
    had = {rec["path"] for rec in src.get("files") or []}
    res = src.get("bosz_resolution")
    found = []
    for sub in sorted({os.path.dirname(p) for p in had}):
        try:
            names = os.listdir(os.path.join(root, sub))
        except OSError:
            continue
        for name in names:
            try:
                m = parse_bosz_name(os.path.join(root, sub, name))
            except InputError:
                continue
            if ("orig" if m.resolution is None else m.resolution) == res:
                found.append(m)
    sel = meta.get("selection") or {}
    try:
        now = BoszIndex(root=root, resolution=None, wave_file=None, models=tuple(found)).select(
            **{k: sel.get(k) for k in ("teff", "logg", "mh", "alpha", "carbon", "vturb", "atmos")})
        have = {os.path.relpath(m.path, root) for m in now.models}
    except InputError as exc:
        changes.append(f"the selection no longer applies: {exc}")
        have = had
    changes += [f"new {p}" for p in sorted(have - had)]
    return changes


def load_template_cache(path, *, verify: str = "stat") -> TemplateGrid:
    """Open a prepared cache as a TemplateGrid (flux and continuum memory-mapped, float32).

    verify : ``"stat"`` (default) re-hashes inputs whose size or mtime
        changed and looks for new files the selection would take in the
        inputs' folders;
        ``"full"`` re-hashes every input and the cache's own arrays;
        ``"none"`` checks only the cache itself.

    Raises
    ------
    StaleCacheError
        The inputs changed since the cache was written (the message names them).
    InputError
        Not a cache, an unknown format or version, a missing or mis-shaped array.
    """
    path = os.path.abspath(os.fspath(path))
    side = os.path.join(path, SIDECAR)
    if verify not in ("stat", "full", "none"):
        raise InputError(f"verify must be 'stat', 'full' or 'none', got {verify!r}")
    try:
        with open(side, encoding="utf-8") as fh:
            meta = json.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: not a gpucal template cache (cannot read {SIDECAR}: {exc.strerror or exc})") from None
    except ValueError as exc:
        raise InputError(f"{side}: corrupt sidecar ({exc})") from None
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise InputError(f"{side}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                         f"{CACHE_FORMAT!r} version {CACHE_VERSION}; prepare the cache again")
    arrays = {name: _open_array(path, side, name, (meta.get("arrays") or {}).get(name), full=verify == "full")
              for name in _ARRAYS}
    n_t, n_w = arrays["flux"].shape
    if arrays["params"].shape != (n_t, 4) or arrays["wave"].shape != (n_w,) or arrays["continuum"].shape != (n_t, n_w):
        raise InputError(f"{path}: inconsistent array shapes in the cache")
    if verify != "none" and isinstance(meta.get("source"), dict):  # else no source files to check
        changes = _input_changes(meta, full=verify == "full")
        if changes is None:
            logger.warning("%s: source %s is not available; cache inputs not verified", path,
                           meta["source"].get("root"))
        elif changes:
            shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
            raise StaleCacheError(
                f"{path}: the template files it was prepared from have changed ({shown}); "
                f"prepare it again (gpucal templates prepare {meta['source']['root']} --out {path} --overwrite)"
            )
    meta["cache_path"] = path
    return TemplateGrid(params=np.array(arrays["params"]), wave=np.array(arrays["wave"]), flux=arrays["flux"],
                        continuum=arrays["continuum"] if meta.get("has_continuum", True) else None,
                        medium=meta.get("medium", "air"), resolution_fwhm=meta.get("resolution_fwhm", 0.0), meta=meta)


def _open_array(path: str, side: str, name: str, rec, *, full: bool) -> np.ndarray:
    """The cache's ``name`` array, memory-mapped read-only, checked against its sidecar record ``rec``."""
    if rec is None:
        raise InputError(f"{side}: no entry for the {name} array")
    fname = os.path.join(path, rec["file"])
    if os.path.basename(rec["file"]) != rec["file"]:
        raise InputError(f"{side}: array file {rec['file']!r} must lie in the cache directory")
    try:
        arr = np.load(fname, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{fname}: cannot load cache array ({exc})") from None
    if list(arr.shape) != list(rec["shape"]) or str(arr.dtype) != rec["dtype"]:
        raise InputError(f"{fname}: shape {arr.shape} {arr.dtype}, the sidecar says {tuple(rec['shape'])} "
                         f"{rec['dtype']} (truncated or replaced cache)")
    if full and _sha256_file(fname) != rec.get("sha256"):
        raise InputError(f"{fname}: content does not match the sidecar's SHA-256 (corrupt cache)")
    return arr


def prepare_template_cache(src, out, *, overwrite: bool = False, **options) -> TemplateGrid:
    """:func:`~gpucal.templates.prepare.prepare_bosz_grid` then :func:`write_template_cache`; returns the cache, opened."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not _is_cache(out):
        raise InputError(f"{out}: exists and is not a gpucal template cache; choose another --out")
    if _is_cache(out) and not overwrite:
        raise InputError(f"{out}: a template cache already exists (use --overwrite to replace it)")
    grid = prepare_bosz_grid(src, **options)
    write_template_cache(grid, out, overwrite=overwrite)
    return load_template_cache(out, verify="none")


def default_cache_dir() -> str:
    """``$GPUCAL_CACHE_DIR``, else ``$XDG_CACHE_HOME/gpucal/templates``, else ``~/.cache/gpucal/templates``."""
    if os.environ.get("GPUCAL_CACHE_DIR"):
        return os.environ["GPUCAL_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpucal", "templates")


def load_or_prepare_bosz(src, *, cache_dir=None, **options) -> TemplateGrid:
    """The cached grid for these options, prepared (and cached) when missing or stale.

    The cache lives in ``cache_dir`` (default :func:`default_cache_dir`) under a
    name derived from the source path and the options; a cache whose inputs
    changed is prepared again. Where the cache cannot be written the grid is
    used from memory (with a warning).
    """
    root = os.path.abspath(os.fspath(src))
    key = _sha256_text({"root": root, "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in sorted(options.items())
                                                  if k not in ("workers", "progress", "backend")}})
    path = os.path.join(cache_dir or default_cache_dir(), f"bosz-{key[:16]}")
    if _is_cache(path):
        try:
            return load_template_cache(path, verify="stat")
        except StaleCacheError as exc:
            logger.info("%s; preparing it again", exc)
        except InputError as exc:
            logger.warning("unusable template cache (%s); preparing it again", exc)
    grid = prepare_bosz_grid(root, **options)
    try:
        write_template_cache(grid, path, overwrite=True)
    except OSError as exc:
        logger.warning("cannot write the template cache %s (%s); using the grid from memory", path, exc)
        return grid
    logger.info("prepared %d BOSZ templates from %s into %s", grid.n_templates, root, path)
    return load_template_cache(path, verify="none")


def open_templates(spec, *, wave_range=None, medium="air", cache_dir=None, workers=None, progress=None) -> TemplateGrid:
    """A TemplateGrid from a prepared cache directory or a BOSZ directory (prepared on the fly and cached).

    ``wave_range`` (min, max) Å and ``medium`` describe the frame for a BOSZ
    directory (defaults: :data:`DEFAULT_FRAME_RANGE`, air); a prepared cache
    is used as it is.
    """
    path = os.fspath(spec)
    if _is_cache(path):
        return load_template_cache(path)
    if os.path.isdir(path):
        return load_or_prepare_bosz(path, cache_dir=cache_dir, wave=None if wave_range is None else tuple(wave_range),
                                    medium=medium, workers=workers, progress=progress)
    raise InputError(f"--templates {path!r}: not 'demo', a prepared template cache or a BOSZ directory")


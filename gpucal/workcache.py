"""The per-instrument working-grid cache: a grid prepared once per instrument setting, reused by every frame.

Step of the mission: *prepare* (pipeline step 3). :func:`prepared_grid` returns
what :func:`gpucal.fitting.prepare_grid` would — the grid LSF-convolved,
resampled onto the frame's log-uniform working grid and continuum-normalised,
a :class:`~gpucal.containers.PreparedGrid` (params (n_t, 4) float64, wave
(n_q,) Å, norm_flux (n_t, n_q) in the scan's dtype, neighbours (n_t, 4, 2)) —
:func:`colour_relations` what :func:`gpucal.photometry.fit_colour_relations`
would (the grid's colour–Teff relations), and :func:`band_matrices` makes the
band matrices (n_w, n_band) on the grid's wavelengths ready for
:func:`gpucal.photometry.band_matrix` (handed to it, so that a new process loads
no filter curve). Each comes from a cache when it holds it.

Key. SHA-256 over everything the result depends on: the grid (its params, wave,
medium, own resolution and flux — the flux's SHA-256 as a prepared cache's
sidecar records it where the flux is that cache's memory-mapped array, checked
when opened — see :func:`grid_fingerprint`), the LSF
(fwhm / fwhm_poly / resolution), the working wavelength grid's float64 bytes
(from the frame's wavelengths and the velocity step), dtype, vstep, the masked
regions, the continuum degree, the backend, the NumPy version and the source of
the gpucal package itself (a changed kernel makes new entries). A changed LSF,
grid or wavelength grid makes a new entry, never a stale hit.

Where. In memory: the last :data:`MEMORY_ENTRIES` entries of this process (so of
each dask worker), on the backend's device. On disk: ``<cache dir>/working/wg-<key>``
(``.npy`` arrays + ``entry.json``), ``fg-<key>`` (the forward fit's fine grid,
:func:`fit_grid`), ``rel-<key>`` (the relations, JSON) and ``bm-<key>`` (a band matrix),
written atomically and opened memory-mapped with ``allow_pickle=False`` and every
array checked against its SHA-256 by :func:`gpucal.templates.open_array_store`
(the prepared cache's own store, which knows nothing of what the arrays mean).
An entry that fails its checks is refused with a warning naming it, and prepared
again. ``GPUCAL_WORK_CACHE``: unset or ``disk`` (memory and disk, under
``$GPUCAL_CACHE_DIR`` or ``~/.cache/gpucal/templates``), a directory (memory and
disk there), ``memory`` (this process only) or ``off``. A cache that cannot be
written is used from memory, with a warning. :func:`list_entries` and
:func:`prune_entries` serve ``gpucal templates cache list|prune``.

Orchestration (like :mod:`gpucal.pipeline`): it calls the step rooms and the
store, and computes nothing itself.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from pathlib import Path

import numpy as np

from .backends import backend_of, to_backend, to_numpy
from .containers import ColourTeffRelation, PreparedGrid, TemplateGrid
from .errors import GpucalError, InputError
from .fitting import fit_grid as fitting_fit_grid
from .fitting import fit_wave, prepare_grid, working_grid
from .fitting.forward import FIT_OVERSAMPLE
from .photometry import band_matrix, fit_colour_relations, resolve_band, seed_band_matrix
from .templates import default_cache_dir, open_array_store, write_array_store

__all__ = ["prepared_grid", "fit_grid", "colour_relations", "band_matrices", "clear_memory", "work_cache_dir", "list_entries",
           "prune_entries", "grid_fingerprint", "STATS", "MEMORY_ENTRIES"]

logger = logging.getLogger("gpucal.workcache")

FORMAT = ("gpucal-working-grid", 1)
SIDECAR = "entry.json"
#: Entries kept in memory per process (least recently used dropped first).
MEMORY_ENTRIES = 4
#: Where each result came from, counted per process: {"memory": n, "disk": n, "prepared": n}.
STATS = collections.Counter()

_MEMORY: collections.OrderedDict = collections.OrderedDict()
_RELATIONS: dict = {}
_BANDS: set = set()  # keys of the band matrices this process has (seeded or computed)
_FINGERPRINTS: dict = {}  # id(flux) -> (weak reference to it, SHA-256 of its bytes): read-only arrays only
_CODE: list = []


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _code_fingerprint() -> str:
    """SHA-256 of every gpucal source file (once per process): new code, new entries."""
    if not _CODE:
        h = hashlib.sha256(np.__version__.encode())
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        _CODE.append(h.hexdigest())
    return _CODE[0]


def _bytes_sha(h, arr) -> None:
    a = np.ascontiguousarray(to_numpy(arr))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))


def _cache_flux_sha(grid: TemplateGrid):
    """The SHA-256 a prepared cache's sidecar records for ``grid.flux`` when ``grid.flux`` is that cache's
    whole ``flux.npy``, memory-mapped (verified when the cache was opened); else None."""
    meta = grid.meta if isinstance(grid.meta, dict) else {}
    rec = (meta.get("arrays") or {}).get("flux") if isinstance(meta.get("arrays"), dict) else None
    fname, path = getattr(grid.flux, "filename", None), meta.get("cache_path")
    if not (isinstance(rec, dict) and fname and path and meta.get("sidecar_sha256")):
        return None
    same = os.path.realpath(fname) == os.path.realpath(os.path.join(path, rec.get("file", "")))
    whole = list(grid.flux.shape) == list(rec.get("shape", ())) and grid.flux.flags.c_contiguous
    return rec.get("sha256") if same and whole else None


def grid_fingerprint(grid: TemplateGrid) -> str:
    """What identifies a grid's content: the SHA-256 of its params, wave, medium, own resolution and flux.

    The flux's is the one a prepared cache's sidecar records where ``grid.flux`` is that cache's
    memory-mapped array (checked when opened), else computed, and remembered per array object where
    params, wave and flux are all read-only (as the demo grid's are).
    """
    res = grid.resolution_fwhm  # a number (Å) or a resolution spec ("R:5000", "poly:...", a mapping)
    res = float(res) if isinstance(res, (int, float)) else (res if isinstance(res, (str, dict)) else repr(res))
    h = hashlib.sha256(json.dumps([grid.medium, res], sort_keys=True, default=str).encode())
    _bytes_sha(h, grid.params)
    _bytes_sha(h, grid.wave)
    flux_sha = _cache_flux_sha(grid)
    if flux_sha is not None:
        h.update(f"cache flux {flux_sha}".encode())
        return h.hexdigest()
    entry = _FINGERPRINTS.get(id(grid.flux))
    if entry is None or entry[0]() is not grid.flux:
        fh = hashlib.sha256()
        _bytes_sha(fh, grid.flux)
        entry = (None, fh.hexdigest())
        if getattr(getattr(grid.flux, "flags", None), "writeable", True) is False:  # else hashed again next time
            try:
                key = id(grid.flux)
                entry = (weakref.ref(grid.flux, lambda _r, key=key: _FINGERPRINTS.pop(key, None)), entry[1])
                _FINGERPRINTS[key] = entry
            except TypeError:
                pass
    h.update(f"flux {entry[1]}".encode())
    return h.hexdigest()


def _mode():
    """(memory on, disk directory or None) from ``GPUCAL_WORK_CACHE``."""
    v = os.environ.get("GPUCAL_WORK_CACHE", "").strip().lower()
    return v != "off", None if v in ("off", "memory") else work_cache_dir()


def work_cache_dir(root=None) -> str:
    """The working-grid cache directory: ``root``, else ``$GPUCAL_WORK_CACHE`` where it names a directory,
    else ``<default_cache_dir()>/working``."""
    v = os.environ.get("GPUCAL_WORK_CACHE", "").strip()
    root = root or (v if v.lower() not in ("", "off", "memory", "disk") else None)
    return os.path.abspath(os.fspath(root)) if root else os.path.join(default_cache_dir(), "working")


def clear_memory() -> None:
    """Forget this process's in-memory entries (the disk cache stays)."""
    _MEMORY.clear()
    _RELATIONS.clear()
    _BANDS.clear()


def _remember(key, value):
    _MEMORY[key] = value
    _MEMORY.move_to_end(key)
    while len(_MEMORY) > MEMORY_ENTRIES:
        _MEMORY.popitem(last=False)


def prepared_grid(grid: TemplateGrid, wave_obs, *, dtype, good_regions, vstep, fwhm=None, fwhm_poly=None,
                  resolution=None, continuum_degree: int = 7) -> PreparedGrid:
    """:func:`gpucal.fitting.prepare_grid` of ``grid`` for the frame's ``wave_obs``, through the cache.

    Same arguments and result (on ``wave_obs``'s backend), but ``dtype`` is a name ("float32" or
    "float64"); see the module docstring for the key.
    """
    be = backend_of(wave_obs)
    if dtype not in ("float32", "float64"):
        raise InputError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    lsf = {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else [float(c) for c in fwhm_poly],
           "resolution": resolution}
    wq = np.ascontiguousarray(to_numpy(working_grid(wave_obs, vstep)), dtype=np.float64)
    settings = {"grid": grid_fingerprint(grid), "lsf": lsf, "wq": hashlib.sha256(wq.tobytes()).hexdigest(),
                "n_q": int(wq.size), "dtype": dtype, "vstep": vstep, "medium": grid.medium,
                "regions": [list(map(float, r)) for r in (good_regions or ())],
                "continuum_degree": int(continuum_degree), "backend": be.name, "code": _code_fingerprint()}
    return _through_cache(settings, "wg", be, dtype,
                          lambda: prepare_grid(grid, wave_obs, dtype=getattr(be.xp, dtype), good_regions=good_regions,
                                               vstep=vstep, continuum_degree=continuum_degree, **lsf))


def fit_grid(grid: TemplateGrid, wave_obs, *, fwhm=None, fwhm_poly=None, resolution=None,
             oversample: int = FIT_OVERSAMPLE) -> PreparedGrid:
    """:func:`gpucal.fitting.fit_grid` (the forward fit's fine convolved grid, float32) through the cache.

    Keyed like :func:`prepared_grid` by the grid, the LSF, the fine wavelength grid's bytes, the
    oversampling, the backend and the code; stored as ``fg-<key>``.
    """
    be = backend_of(wave_obs)
    lsf = {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else [float(c) for c in fwhm_poly],
           "resolution": resolution}
    wq = np.ascontiguousarray(to_numpy(fit_wave(wave_obs, oversample)), dtype=np.float64)
    settings = {"kind": "fit grid", "grid": grid_fingerprint(grid), "lsf": lsf,
                "wq": hashlib.sha256(wq.tobytes()).hexdigest(), "n_q": int(wq.size), "oversample": int(oversample),
                "dtype": "float32", "medium": grid.medium, "backend": be.name, "code": _code_fingerprint()}
    return _through_cache(settings, "fg", be, "float32",
                          lambda: fitting_fit_grid(grid, wave_obs, oversample=oversample, **lsf))


def _through_cache(settings, prefix, be, dtype, compute) -> PreparedGrid:
    """The grid for ``settings``: from memory, else from disk (``<prefix>-<key>``), else ``compute()`` and stored."""
    key = _sha(settings)
    memory, disk = _mode()
    mkey = (key, str(be.device))
    if memory and mkey in _MEMORY:
        _MEMORY.move_to_end(mkey)
        STATS["memory"] += 1
        return _MEMORY[mkey]
    path = None if disk is None else os.path.join(disk, f"{prefix}-{key[:32]}")
    prep = _load_prepared(path, key, be, dtype) if path else None
    if prep is None:
        prep = compute()
        STATS["prepared"] += 1
        if path:
            _store_prepared(path, key, settings, prep)
    if memory:
        _remember(mkey, prep)
    return prep


def _prepared_dtypes(meta, dtype) -> dict:
    out = {"params": "float64", "wave": "float64", "norm_flux": dtype}
    return dict(out, neighbours="int64") if isinstance(meta, dict) and meta.get("has_neighbours") else out


def _refuse(path, exc) -> None:
    logger.warning("working-grid cache entry %s refused (%s); preparing it again", path, exc)


def _open_entry(path, key, dtypes, convert):
    """``convert(arrays, meta)`` of the entry at ``path``, or None when there is none or it is refused
    (with a warning naming it). ``dtypes``: the arrays expected, or a function of the sidecar giving them."""
    side = os.path.join(path, SIDECAR)
    if not os.path.isfile(side):
        return None
    try:
        if callable(dtypes):
            with open(side, encoding="utf-8") as fh:
                dtypes = dtypes(json.load(fh))
        arrays, meta = open_array_store(path, dtypes, fmt=FORMAT, sidecar=SIDECAR, what="working-grid cache entry")
        if meta.get("key") != key:
            raise InputError(f"{side}: entry for key {str(meta.get('key'))[:16]}..., not {key[:16]}...")
        out = convert(arrays, meta)
    except (GpucalError, OSError, ValueError, TypeError, KeyError) as exc:
        _refuse(path, exc)
        return None
    STATS["disk"] += 1
    _touch(path)
    return out


def _load_prepared(path, key, be, dtype):
    """The working grid at ``path`` on the backend, or None (see :func:`_open_entry`)."""
    def convert(arrays, meta):
        nb = arrays.get("neighbours")
        return PreparedGrid(params=to_backend(arrays["params"], be), wave=to_backend(arrays["wave"], be),
                            norm_flux=to_backend(arrays["norm_flux"], be), lsf=meta["lsf"],
                            neighbours=None if nb is None else to_backend(nb, be))
    return _open_entry(path, key, lambda meta: _prepared_dtypes(meta, dtype), convert)


def _store_prepared(path, key, settings, prep) -> None:
    arrays = {"params": to_numpy(prep.params), "wave": to_numpy(prep.wave), "norm_flux": to_numpy(prep.norm_flux)}
    if prep.neighbours is not None:
        arrays["neighbours"] = to_numpy(prep.neighbours).astype(np.int64)
    meta = {"kind": settings.get("kind", "working grid"), "key": key, "settings": settings, "lsf": prep.lsf,
            "has_neighbours": prep.neighbours is not None, "n_templates": prep.n_templates,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _store(path, arrays, meta)


def _store(path, arrays, meta) -> None:
    """Write an entry; never an error (another process may have written it first, or the disk is full)."""
    try:
        write_array_store(path, arrays, meta, fmt=FORMAT, sidecar=SIDECAR, overwrite=True,
                          what="working-grid cache entry")
    except (OSError, GpucalError) as exc:
        logger.warning("cannot write the working-grid cache entry %s (%s); using it from memory", path, exc)


def _touch(path) -> None:
    """Mark the entry used now (``prune --older-than`` goes by last use)."""
    try:
        os.utime(os.path.join(path, SIDECAR))
    except OSError:
        pass


def colour_relations(grid: TemplateGrid) -> tuple:
    """:func:`gpucal.photometry.fit_colour_relations` of ``grid``, through the cache (keyed by the grid's content)."""
    key = _sha({"grid": grid_fingerprint(grid), "code": _code_fingerprint(), "kind": "colour relations"})
    memory, disk = _mode()
    if memory and key in _RELATIONS:
        STATS["memory"] += 1
        return _RELATIONS[key]
    path = None if disk is None else os.path.join(disk, f"rel-{key[:32]}")
    rel = _load_relations(path, key) if path else None
    if rel is None:
        rel = fit_colour_relations(grid)
        STATS["prepared"] += 1
        if path:
            _store(path, {}, {"kind": "colour relations", "key": key,
                              "relations": [dataclasses.asdict(r) for r in rel],
                              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if memory:
        _RELATIONS[key] = rel
    return rel


def _load_relations(path, key):
    def convert(_, meta):
        return tuple(ColourTeffRelation(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in r.items()})
                     for r in meta["relations"])
    return _open_entry(path, key, {}, convert)


def band_matrices(grid: TemplateGrid, bands) -> None:
    """Make the band matrix of ``bands`` on ``grid.wave`` ready (:func:`gpucal.photometry.band_matrix`):
    from the disk cache where it is there (handed to the photometry room, which then loads no filter
    curve), else computed and stored. Keyed by the grid's content and the bands."""
    resolved = tuple(resolve_band(b) for b in ((bands,) if isinstance(bands, str) else bands))
    key = _sha({"grid": grid_fingerprint(grid), "bands": resolved, "code": _code_fingerprint(), "kind": "bands"})
    memory, disk = _mode()
    if key in _BANDS and memory:
        return
    path = None if disk is None else os.path.join(disk, f"bm-{key[:32]}")
    got = _load_bands(path, key) if path else None
    if got is not None:
        seed_band_matrix(grid.wave, resolved, *got)
    else:
        W, covered = band_matrix(grid.wave, resolved)
        STATS["prepared"] += 1
        if path:
            _store(path, {"W": np.asarray(W), "covered": np.asarray(covered)},
                   {"kind": "band matrix", "key": key, "bands": list(resolved),
                    "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if memory:
        _BANDS.add(key)


def _load_bands(path, key):
    return _open_entry(path, key, {"W": "float64", "covered": "bool"},
                       lambda arrays, _: (arrays["W"], arrays["covered"]))


# ------------------------------------------------------------------ gpucal templates cache list | prune


def list_entries(root=None) -> list:
    """Every entry of the working-grid cache: dicts of path, kind, bytes, last use (UTC), n_templates, lsf, n_q."""
    root = work_cache_dir(root)
    out = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, name)
        side = os.path.join(p, SIDECAR)
        if not (name.startswith(("wg-", "fg-", "rel-", "bm-")) and os.path.isfile(side)):
            continue
        try:
            with open(side, encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            meta = {"kind": "unreadable"}
        size = sum(f.stat().st_size for f in Path(p).iterdir() if f.is_file())
        s = meta.get("settings") or {}
        out.append({"path": p, "kind": meta.get("kind"), "bytes": size, "last_used": os.stat(side).st_mtime,
                    "n_templates": meta.get("n_templates"), "lsf": meta.get("lsf"), "n_q": s.get("n_q"),
                    "dtype": s.get("dtype"), "backend": s.get("backend")})
    return out


def prune_entries(root=None, *, older_than_days=None, keep_bytes=None, dry_run=False) -> list:
    """Remove entries unused for more than ``older_than_days``, then the least recently used beyond
    ``keep_bytes`` in all (with neither: every entry); returns the removed entries."""
    entries = sorted(list_entries(root), key=lambda e: e["last_used"], reverse=True)
    now, total, gone = time.time(), 0, []
    for e in entries:
        old = older_than_days is not None and now - e["last_used"] > 86400.0 * older_than_days
        total += e["bytes"]
        over = keep_bytes is not None and total > keep_bytes
        if old or over or (older_than_days is None and keep_bytes is None):
            gone.append(e)
            if not dry_run:
                shutil.rmtree(e["path"], ignore_errors=True)
    return gone

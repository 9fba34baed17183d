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
    checks the cache itself, always: the sidecar against its own SHA-256, every
    file of the cache a regular file inside the cache directory (no symbolic
    links), the arrays' shapes and dtypes, every array against its recorded
    SHA-256, and the sidecar's parameters, number of templates and wavelength
    range against ``params.npy`` and ``wave.npy`` (:class:`CorruptCacheError`,
    naming the cache and the file). The array hashes are cheap after the first
    open: a verification stamp (``.gpucal-verified.json``, written atomically
    beside the arrays, or under :func:`default_cache_dir` where the cache
    directory is read-only) records each array's (size, mtime, inode, device,
    ctime) when its hash last matched, and only an array whose ``stat`` differs
    is hashed again (``verify="full"`` hashes every array). A file changed less
    than :data:`RACY_S` seconds before it was hashed is not stamped (the
    filesystem's clock may not have ticked since). Where the source directory
    still exists, the inputs are checked too: a file whose size or mtime
    changed is hashed again, and a changed or missing input, or a new file in
    the inputs' folders that the selection would take, is refused
    (:class:`StaleCacheError`, naming the files). A cache whose source
    directory is gone (moved to another machine) loads with a warning.
    ``verify="full"`` re-hashes everything; ``verify="none"`` skips the inputs.

Prepared on demand (:func:`load_or_prepare_bosz`, :func:`open_templates`)
    a BOSZ directory given where a grid is expected is prepared once and
    cached under :func:`default_cache_dir`, keyed by the source path and the
    preparation options; a stale cache is prepared again. A FITS grid file
    (:mod:`gpucal.templates.fitsgrid`) goes the same way
    (:func:`load_or_prepare_fits_grid`, caches named ``fits-<key>``).

In: a TemplateGrid (write) or a cache directory (load). Out: a TemplateGrid
whose flux and continuum are read-only float32 memory maps. NumPy on the host.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import tempfile
import time

import numpy as np

from ..containers import TemplateGrid
from ..errors import CorruptCacheError, InputError, StaleCacheError
from .bosz import BoszIndex, parse_bosz_name
from .keys import CACHE_FORMAT, CACHE_VERSION, _sha256_file, _sha256_text, _sidecar_sha256
from .fitsgrid import FITS_GRID_SUFFIXES, is_fits_grid, prepare_fits_grid
from .prepare import prepare_bosz_grid

__all__ = [
    "write_template_cache",
    "load_template_cache",
    "prepare_template_cache",
    "load_or_prepare_bosz",
    "load_or_prepare_fits_grid",
    "open_templates",
    "default_cache_dir",
    "write_array_store",
    "open_array_store",
]

logger = logging.getLogger("gpucal.templates.cache")

SIDECAR = "grid.json"
STAMP = ".gpucal-verified.json"
_ARRAYS = ("params", "wave", "flux", "continuum")
_DTYPES = {"params": "float64", "wave": "float64", "flux": "float32", "continuum": "float32"}
#: A file whose ctime is less than this many seconds before its hash began is not stamped.
RACY_S = 2.0


def _is_cache(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SIDECAR))


def write_template_cache(grid: TemplateGrid, out, *, overwrite: bool = False) -> str:
    """Write ``grid`` as a cache directory (see the module docstring); returns its path.

    The directory is built beside ``out`` and renamed into place, so a
    reader never sees a half-written cache. An existing cache is replaced
    only with ``overwrite``; an existing directory that is not a cache is
    never touched.
    """
    arrays = {
        "params": np.asarray(grid.params, dtype=np.float64),
        "wave": np.asarray(grid.wave, dtype=np.float64),
        "flux": np.asarray(grid.flux, dtype=np.float32),
        "continuum": np.asarray(grid.continuum if grid.continuum is not None else grid.flux, dtype=np.float32),
    }
    meta = dict(grid.meta)
    meta.update({"medium": grid.medium, "resolution_fwhm": grid.resolution_fwhm,
                 "has_continuum": grid.continuum is not None, "params": arrays["params"].tolist()})
    return write_array_store(out, arrays, meta, overwrite=overwrite)


def write_array_store(out, arrays: dict, meta: dict, *, fmt=(CACHE_FORMAT, CACHE_VERSION),
                      sidecar: str = SIDECAR, overwrite: bool = False, what: str = "template cache") -> str:
    """Store named host ``arrays`` as ``.npy`` files plus a JSON ``sidecar`` (``meta`` with each array's
    file, shape, dtype and SHA-256, the format and its own SHA-256) in the directory ``out``.

    Built beside ``out`` and renamed into place: a reader never sees a half-written store. What the
    arrays mean is the caller's business. An existing store is replaced only with ``overwrite``; an
    existing directory that is not a store of this kind is never touched. Returns the path.
    """
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out):
        if not os.path.isfile(os.path.join(out, sidecar)):
            raise InputError(f"{out}: exists and is not a gpucal {what}; choose another --out")
        if not overwrite:
            raise InputError(f"{out}: a {what} already exists (use --overwrite to replace it)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        info = {}
        for name, arr in arrays.items():
            arr = np.ascontiguousarray(arr)
            fname = os.path.join(tmp, f"{name}.npy")
            np.save(fname, arr, allow_pickle=False)
            info[name] = {"file": f"{name}.npy", "dtype": str(arr.dtype), "shape": list(arr.shape),
                          "sha256": _sha256_file(fname)}
        meta = dict(meta)
        meta.update({"format": fmt[0], "version": fmt[1], "arrays": info})
        meta = json.loads(json.dumps(meta, default=str))  # as a reader will see it
        meta["sidecar_sha256"] = _sidecar_sha256(meta)
        with open(os.path.join(tmp, sidecar), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)
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


def open_array_store(path, dtypes: dict, *, fmt=(CACHE_FORMAT, CACHE_VERSION), sidecar: str = SIDECAR,
                     full: bool = False, what: str = "template cache") -> tuple:
    """The arrays of a store written by :func:`write_array_store`, memory-mapped read-only, and its sidecar.

    ``dtypes`` {name: dtype string} names the arrays the caller expects. Checked, always: the
    sidecar's format and its own SHA-256, every file a regular file inside ``path``, each array's
    dtype and shape, each array's SHA-256 (skipped where the verification stamp shows it unchanged;
    ``full`` hashes them all): :class:`CorruptCacheError` naming the file, else ``(arrays, meta)``.
    """
    path = os.path.abspath(os.fspath(path))
    meta = _read_sidecar(path, sidecar=sidecar, fmt=fmt, what=what)
    side = os.path.join(path, sidecar)
    recs = meta.get("arrays") if isinstance(meta.get("arrays"), dict) else {}
    arrays = {name: _open_array(path, side, name, recs.get(name), dt) for name, dt in dtypes.items()}
    _verify_arrays(path, meta, tuple(dtypes), full=full)
    return arrays, meta


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
    if src.get("kind") == "FITS grid":  # one file, no selection over a folder
        return changes
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

    The cache itself is always checked (see the module docstring): sidecar
    hash, regular files inside the directory, shapes and dtypes, every
    array's SHA-256 (skipped where the verification stamp shows the file
    unchanged since it last matched), the sidecar against the arrays.

    verify : ``"stat"`` (default) re-hashes inputs whose size or mtime
        changed and looks for new files the selection would take in the
        inputs' folders;
        ``"full"`` re-hashes every input and every array of the cache,
        whatever the stamp says;
        ``"none"`` checks only the cache itself.

    Raises
    ------
    StaleCacheError
        The inputs changed since the cache was written (the message names them).
    CorruptCacheError
        The cache changed since it was written: an array or the sidecar does
        not match its SHA-256, a file is a link or lies outside the cache, the
        sidecar disagrees with the arrays (the message names the file).
    InputError
        Not a cache, an unknown format or version.
    """
    path = os.path.abspath(os.fspath(path))
    if verify not in ("stat", "full", "none"):
        raise InputError(f"verify must be 'stat', 'full' or 'none', got {verify!r}")
    side = os.path.join(path, SIDECAR)
    arrays, meta = open_array_store(path, _DTYPES, full=verify == "full")
    n_t, n_w = arrays["flux"].shape
    if arrays["params"].shape != (n_t, 4) or arrays["wave"].shape != (n_w,) or arrays["continuum"].shape != (n_t, n_w):
        raise CorruptCacheError(f"{path}: inconsistent array shapes in the cache")
    params, wave = np.array(arrays["params"]), np.array(arrays["wave"])
    _cross_check(side, meta, params, wave, n_t)
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
    return TemplateGrid(params=params, wave=wave, flux=arrays["flux"],
                        continuum=arrays["continuum"] if meta.get("has_continuum", True) else None,
                        medium=meta.get("medium", "air"), resolution_fwhm=meta.get("resolution_fwhm", 0.0), meta=meta)


def _member(path: str, name: str, what: str) -> str:
    """``path/name``, refused unless it is a regular file (not a link) directly inside the cache ``path``."""
    if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
        raise CorruptCacheError(f"{path}: {what} file {name!r} must lie in the cache directory")
    fname = os.path.join(path, name)
    try:
        st = os.lstat(fname)
    except OSError as exc:
        raise CorruptCacheError(f"{fname}: cannot read the cache's {what} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise CorruptCacheError(f"{fname}: the cache's {what} is {kind}; a cache's files must be regular files "
                                f"inside it (prepare the cache again)")
    if os.path.dirname(os.path.realpath(fname)) != os.path.realpath(path):
        raise CorruptCacheError(f"{fname}: the cache's {what} resolves outside the cache directory")
    return fname


def _read_sidecar(path: str, *, sidecar: str = SIDECAR, fmt=(CACHE_FORMAT, CACHE_VERSION),
                  what: str = "template cache") -> dict:
    """The cache's sidecar, checked: a regular file, JSON, the known format and version, its own SHA-256."""
    side = os.path.join(path, sidecar)
    if not os.path.lexists(side) or not os.path.isdir(path):
        raise InputError(f"{path}: not a gpucal {what} (no {sidecar})")
    _member(path, sidecar, "sidecar")
    try:
        with open(side, encoding="utf-8") as fh:
            meta = json.load(fh)
    except OSError as exc:
        raise InputError(f"{path}: not a gpucal {what} (cannot read {sidecar}: {exc.strerror or exc})") from None
    except ValueError as exc:
        raise CorruptCacheError(f"{side}: corrupt sidecar ({exc})") from None
    if not isinstance(meta, dict):
        raise CorruptCacheError(f"{side}: corrupt sidecar (not a JSON object)")
    if meta.get("format") != fmt[0] or meta.get("version") != fmt[1]:
        raise InputError(f"{side}: format {meta.get('format')!r} version {meta.get('version')!r} is not "
                         f"{fmt[0]!r} version {fmt[1]}; prepare the cache again")
    if meta.get("sidecar_sha256") != _sidecar_sha256(meta):
        raise CorruptCacheError(f"{side}: content does not match its recorded SHA-256 (edited or corrupt sidecar); "
                                f"prepare the cache again")
    return meta


def _open_array(path: str, side: str, name: str, rec, dtype: str) -> np.ndarray:
    """The cache's ``name`` array, memory-mapped read-only, checked against its sidecar record ``rec``."""
    if not isinstance(rec, dict) or not {"file", "shape", "dtype", "sha256"} <= set(rec):
        raise CorruptCacheError(f"{side}: no complete entry for the {name} array")
    fname = _member(path, rec["file"], f"{name} array")
    if rec["dtype"] != dtype:
        raise CorruptCacheError(f"{side}: the {name} array is recorded as {rec['dtype']}, a cache holds {dtype}")
    try:
        arr = np.load(fname, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 -- whatever a damaged .npy raises, the cache is unusable
        raise CorruptCacheError(f"{fname}: cannot load cache array ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray) or list(arr.shape) != list(rec["shape"]) or str(arr.dtype) != rec["dtype"]:
        raise CorruptCacheError(f"{fname}: shape {getattr(arr, 'shape', None)} {getattr(arr, 'dtype', None)}, the "
                                f"sidecar says {tuple(rec['shape'])} {rec['dtype']} (truncated or replaced cache)")
    return arr


# ------------------------------------------------------------------ the arrays' hashes and the verification stamp


def _stat_key(st) -> list:
    """What the stamp compares: a file rewritten, replaced, copied or touched changes one of these."""
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns]


def _stamp_paths(path: str) -> list:
    """Where the stamp of the cache ``path`` may be: in the cache, then under the user's cache directory."""
    real = os.path.realpath(path)
    return [os.path.join(path, STAMP),
            os.path.join(default_cache_dir(), ".verified", _sha256_text(real)[:32] + ".json")]


def _read_stamps(path: str, meta: dict) -> dict:
    """{array name: {"stat", "sha256"}} from the stamps that belong to this cache and sidecar (unreadable ones ignored)."""
    entries = {}
    for where in reversed(_stamp_paths(path)):  # the cache's own stamp wins
        try:
            if not stat.S_ISREG(os.lstat(where).st_mode):
                continue
            with open(where, encoding="utf-8") as fh:
                rec = json.load(fh)
            if rec.get("cache") == os.path.realpath(path) and rec.get("sidecar_sha256") == meta["sidecar_sha256"]:
                entries.update({k: v for k, v in rec["arrays"].items() if isinstance(v, dict)})
        except (OSError, ValueError, TypeError, AttributeError, KeyError):
            continue
    return entries


def _write_stamp(path: str, meta: dict, entries: dict) -> None:
    """Write the stamp atomically (a recognisable temporary file renamed over it), in the cache or else
    under the user's cache directory; never an error (without a stamp every open hashes the arrays)."""
    text = json.dumps({"format": "gpucal-cache-stamp", "cache": os.path.realpath(path),
                       "sidecar_sha256": meta["sidecar_sha256"], "arrays": entries}, indent=1)
    for where in _stamp_paths(path):
        tmp = None
        try:
            os.makedirs(os.path.dirname(where), exist_ok=True)
            _remove_stale_stamp_temporaries(os.path.dirname(where))
            fd, tmp = tempfile.mkstemp(prefix=STAMP + ".", suffix=".tmp", dir=os.path.dirname(where))
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, where)
            return
        except OSError as exc:
            logger.debug("cannot write the verification stamp %s (%s)", where, exc)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
    logger.info("%s: no verification stamp could be written; its arrays are hashed on every open", path)


def _remove_stale_stamp_temporaries(folder: str) -> None:
    """Remove stamp temporaries (``.gpucal-verified.json.*.tmp``) over an hour old: left by a killed process."""
    now = time.time()
    for name in os.listdir(folder):
        if name.startswith(STAMP + ".") and name.endswith(".tmp"):
            try:
                if now - os.lstat(os.path.join(folder, name)).st_mtime > 3600:
                    os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _verify_arrays(path: str, meta: dict, names=_ARRAYS, *, full: bool) -> None:
    """Every array of the cache against its recorded SHA-256, skipping those the stamp shows unchanged.

    An array changed within :data:`RACY_S` seconds before its hash began, or
    during it, is not stamped: it is hashed again on the next open.
    """
    stamped = {} if full else _read_stamps(path, meta)
    entries, todo = {}, {}
    for name in names:
        rec = meta["arrays"][name]
        st = os.lstat(os.path.join(path, rec["file"]))
        old = stamped.get(name) or {}
        if old.get("stat") == _stat_key(st) and old.get("sha256") == rec["sha256"]:
            entries[name] = old
        else:
            todo[name] = st
    if not todo:
        return
    began = time.time_ns()
    for name, st in todo.items():
        rec = meta["arrays"][name]
        if _sha256_file(os.path.join(path, rec["file"])) != rec["sha256"]:
            raise CorruptCacheError(f"{path}: the {name} array ({rec['file']}) does not match the SHA-256 its sidecar "
                                    f"records (changed or corrupt cache); prepare the cache again")
        after = os.lstat(os.path.join(path, rec["file"]))
        if _stat_key(after) == _stat_key(st) and began - st.st_ctime_ns > RACY_S * 1e9:
            entries[name] = {"stat": _stat_key(st), "sha256": rec["sha256"]}
    if entries:
        _write_stamp(path, meta, entries)


# ------------------------------------------------------------------ the sidecar against the arrays


def _cross_check(side: str, meta: dict, params: np.ndarray, wave: np.ndarray, n_t: int) -> None:
    """The sidecar's parameters, template count, axes and wavelength grid against ``params.npy`` and ``wave.npy``."""
    bad = []
    try:
        recorded = np.asarray(meta.get("params"), dtype=np.float64)
    except (TypeError, ValueError):
        recorded = None
    if recorded is None or recorded.shape != params.shape or not np.array_equal(recorded, params, equal_nan=True):
        bad.append("params.npy differs from the parameters it records")
    if not (np.all(np.isfinite(params)) and np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0)):
        bad.append("params.npy or wave.npy holds non-finite values, or wave.npy is not increasing")
    if "n_templates" in meta and meta["n_templates"] != n_t:
        bad.append(f"it records {meta['n_templates']!r} templates, the arrays hold {n_t}")
    grid = meta.get("grid") if isinstance(meta.get("grid"), dict) else {}
    for key, have in (("n_wave", wave.size), ("wave_min", float(wave[0])), ("wave_max", float(wave[-1]))):
        if key in grid and grid[key] != have:
            bad.append(f"grid.{key} {grid[key]!r} but wave.npy has {have!r}")
    dln = grid.get("dlnlam", meta.get("dlnlam"))
    if dln is not None and wave.size > 1:
        have = float(np.log(wave[-1] / wave[0]) / (wave.size - 1))
        if not isinstance(dln, (int, float)) or not abs(have - dln) <= 1e-6 * abs(dln):
            bad.append(f"Δlnλ {dln!r} but wave.npy has {have!r}")
    if meta.get("medium") not in ("air", "vacuum") or grid.get("medium", meta.get("medium")) != meta.get("medium"):
        bad.append(f"medium {meta.get('medium')!r} / grid.medium {grid.get('medium')!r}")
    axes = meta.get("axes") if isinstance(meta.get("axes"), dict) else {}
    for k, axis in enumerate(("teff", "logg", "mh", "alpha")):
        if axis in axes and not set(np.unique(params[:, k]).tolist()) <= set(axes[axis] or ()):
            bad.append(f"params.npy's {axis} values are not the {axis} axis it records")
    if bad:
        raise CorruptCacheError(f"{side}: the sidecar does not match the cache's arrays ({'; '.join(bad)}); "
                                f"prepare the cache again")


def prepare_template_cache(src, out, *, overwrite: bool = False, **options) -> TemplateGrid:
    """:func:`~gpucal.templates.prepare.prepare_bosz_grid` (or, for a FITS grid file,
    :func:`~gpucal.templates.fitsgrid.prepare_fits_grid`) then :func:`write_template_cache`; returns the cache, opened."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not _is_cache(out):
        raise InputError(f"{out}: exists and is not a gpucal template cache; choose another --out")
    if _is_cache(out) and not overwrite:
        raise InputError(f"{out}: a template cache already exists (use --overwrite to replace it)")
    if is_fits_grid(src):  # a FITS grid file: the same cache, convolved when an LSF is given
        options = {k: v for k, v in options.items() if k not in ("workers", "progress")}
        grid = prepare_fits_grid(src, convolve=True, **options)
    else:
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
    return _cache_prepared(prepare_bosz_grid(root, **options), path, f"BOSZ templates from {root}")


def _cache_prepared(grid: TemplateGrid, path: str, what: str) -> TemplateGrid:
    """Write a grid prepared on demand to its cache ``path`` and open it; from memory when it cannot be written."""
    try:
        write_template_cache(grid, path, overwrite=True)
    except OSError as exc:
        logger.warning("cannot write the template cache %s (%s); using the grid from memory", path, exc)
        return grid
    logger.info("prepared %d %s into %s", grid.n_templates, what, path)
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
    if is_fits_grid(path):
        return load_or_prepare_fits_grid(path, cache_dir=cache_dir, medium=medium,
                                         wave=None if wave_range is None else tuple(wave_range))
    if os.path.isdir(path):
        return load_or_prepare_bosz(path, cache_dir=cache_dir, wave=None if wave_range is None else tuple(wave_range),
                                    medium=medium, workers=workers, progress=progress)
    raise InputError(f"--templates {path!r}: not 'demo', a prepared template cache, a BOSZ directory or a FITS grid "
                     f"file ({', '.join(FITS_GRID_SUFFIXES)})")


def load_or_prepare_fits_grid(src, *, cache_dir=None, **options) -> TemplateGrid:
    """The cached working grid of a FITS template grid file (:mod:`gpucal.templates.fitsgrid`), prepared when
    missing or stale (the file's size, mtime and SHA-256 are its inputs), as :func:`load_or_prepare_bosz` does."""
    path = os.path.abspath(os.fspath(src))
    opts = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(options.items())}
    cache = os.path.join(cache_dir or default_cache_dir(), f"fits-{_sha256_text({'file': path, 'options': opts})[:16]}")
    if _is_cache(cache):
        try:
            return load_template_cache(cache, verify="stat")
        except (StaleCacheError, InputError) as exc:
            logger.info("%s; preparing it again", exc)
    # messages name the file as the user spelled it
    return _cache_prepared(prepare_fits_grid(src, **options), cache, f"templates of {path}")

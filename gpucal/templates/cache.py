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
import math
import os
import shutil
import time

import numpy as np

from ..containers import TemplateGrid
from ..errors import GpucalError, InputError, StaleCacheError
from .bosz import BoszIndex, parse_bosz_name
from .keys import CACHE_FORMAT, CACHE_VERSION, _sha256_file, _sha256_text
from .prepare import DEFAULT_BANDS, DEFAULT_FRAME_RANGE, DEFAULT_VMAX, prepare_bosz_grid

__all__ = [
    "write_template_cache",
    "load_template_cache",
    "prepare_template_cache",
    "load_or_prepare_bosz",
    "open_templates",
    "default_cache_dir",
    "add_templates_parser",
    "run_templates_command",
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
    src = meta.get("source") or {}
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
    if verify != "none":
        changes = _input_changes(meta, full=verify == "full")
        if changes is None:
            logger.warning("%s: source %s is not available; cache inputs not verified", path,
                           (meta.get("source") or {}).get("root"))
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


# --------------------------------------------------------------------------- command line


def _range_arg(text):
    import argparse

    parts = text.split(":")
    try:
        if len(parts) == 1:
            v = float(parts[0])
            return (v, v)
        if len(parts) == 2:
            lo = float(parts[0]) if parts[0].strip() else -math.inf
            hi = float(parts[1]) if parts[1].strip() else math.inf
            if lo <= hi:
                return (lo, hi)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected MIN:MAX (either may be empty) or a value, got {text!r}")


def _floats_arg(text):
    import argparse

    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_templates_parser(sub) -> None:
    """Add ``templates prepare`` to the ``gpucal`` sub-command parsers."""
    p = sub.add_parser("templates", help="template grids: prepare a BOSZ 2024 cache")
    tsub = p.add_subparsers(dest="templates_command", required=True)
    q = tsub.add_parser(
        "prepare", help="read a BOSZ 2024 directory into a memory-mappable cache",
        description="Read BOSZ 2024 spectra (release layout) in parallel, resample them onto one log-uniform "
                    "grid covering the frame, the photometric bands and the velocity scan, optionally convolve "
                    "them to the instrument LSF, and write a float32 .npy + JSON cache. Negative ranges need "
                    "'=': --mh=-1:0.5.")
    q.add_argument("src", help="BOSZ directory (bosz2024_wave_r<R>.txt and r<R>/m<±MH>/ folders)")
    q.add_argument("--out", required=True, help="cache directory to write")
    for name, what in (("teff", "Teff (K)"), ("logg", "log g"), ("mh", "[M/H]"), ("alpha", "[α/M]"),
                       ("carbon", "[C/M]"), ("vturb", "microturbulence (km/s)")):
        q.add_argument(f"--{name}", type=_range_arg, default=None, metavar="MIN:MAX",
                       help=f"{what} to select: MIN:MAX (inclusive, either may be empty) or one value")
    q.add_argument("--atmos", default=None, help="atmosphere code(s), comma-separated, in order of preference")
    q.add_argument("--bosz-resolution", default=None, metavar="R|orig", help="subgrid r<R> (default: the only one)")
    lsf = q.add_mutually_exclusive_group()
    lsf.add_argument("--fwhm", type=float, help="instrument FWHM in Å (constant): store the grid convolved")
    lsf.add_argument("--fwhm-poly", type=_floats_arg, help="FWHM(λ) = c0 + c1 λ + ... in Å, ascending coefficients")
    lsf.add_argument("--resolution", type=float, help="instrument resolving power λ/Δλ")
    q.add_argument("--wave", type=_range_arg, default=None, metavar="MIN:MAX",
                   help=f"frame wavelength range in Å (default {DEFAULT_FRAME_RANGE[0]:g}:{DEFAULT_FRAME_RANGE[1]:g}); "
                        "the grid also covers the bands and the velocity scan")
    q.add_argument("--bands", default=",".join(DEFAULT_BANDS), help="photometric bands to cover (default g,r,i,z)")
    q.add_argument("--vmax", type=float, default=DEFAULT_VMAX, help="largest |RV| to allow for, km/s (default 500)")
    q.add_argument("--dlnlam", type=float, default=None, help="working-grid Δlnλ (default: the library's)")
    q.add_argument("--medium", choices=("air", "vacuum"), default="air", help="wavelength medium of the frame")
    q.add_argument("--workers", type=int, default=None, help="reader processes (default: the CPUs)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    q.add_argument("--backend", default=None, help="array backend of the convolution")
    q.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def run_templates_command(args) -> int:
    """Run ``gpucal templates prepare`` from parsed arguments; prints a one-line summary."""
    if args.templates_command != "prepare":
        raise GpucalError(f"unknown templates command {args.templates_command!r}")
    bands = tuple(b.strip() for b in args.bands.split(",") if b.strip())
    atmos = None if args.atmos is None else [a.strip() for a in args.atmos.split(",") if a.strip()]
    t0 = time.perf_counter()
    grid = prepare_template_cache(
        args.src, args.out, overwrite=args.overwrite, teff=args.teff, logg=args.logg, mh=args.mh, alpha=args.alpha,
        carbon=args.carbon, vturb=args.vturb, atmos=atmos, bosz_resolution=args.bosz_resolution, wave=args.wave,
        bands=bands, vmax=args.vmax, dlnlam=args.dlnlam, medium=args.medium, fwhm=args.fwhm,
        fwhm_poly=args.fwhm_poly, resolution=args.resolution, workers=args.workers,
        progress=False if args.no_progress else None, backend=args.backend,
    )
    g = grid.meta["grid"]
    print(f"wrote {grid.meta['cache_path']}: {grid.n_templates} templates, {g['wave_min']:.1f}-{g['wave_max']:.1f} Å "
          f"({g['n_wave']} pixels, dlnlam {g['dlnlam']:.3g}, {g['medium']}), resolution_fwhm "
          f"{grid.resolution_fwhm!r}, inputs sha256 {grid.meta['inputs_sha256'][:16]}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0

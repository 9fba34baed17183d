"""Prepared template grids: BOSZ files -> log-uniform working grid -> memory-mappable cache.

Step of the mission: read a template library once, in parallel, and keep it
in the form the grid scan consumes, so a frame never re-parses a text file.

Preparation (:func:`prepare_bosz_grid`)
    1. index and select BOSZ 2024 files (:mod:`gpucal.templates.bosz`);
    2. the wavelength window: the frame range (``wave``, default
       :data:`DEFAULT_FRAME_RANGE`) joined with the photometric bands'
       filter curves, widened by the velocity scan (±``vmax`` km/s) and by
       0.5 % (or six instrument σ, whichever is larger) for the LSF
       (:func:`needed_wave_range`);
    3. worker processes (``concurrent.futures``, tqdm progress bar) read only
       the lines inside the window, convert λ to the frame's medium, and
       resample F = 4πH and its continuum flux-conservingly onto one
       log-uniform grid (:func:`resample_flux`) whose Δlnλ is the library's
       own (the coarsest native step inside the window, so nothing is
       up-sampled; an aligned log-uniform library is copied exactly);
    4. when an instrument LSF is given, the grid is convolved to it on the
       array backend (batched over templates, :mod:`gpucal.fitting.lsf`),
       with the library's own resolution removed in quadrature.

What the grid holds (the design choice)
    Without an LSF the grid keeps the library's own resolution and
    ``resolution_fwhm`` says what it is (``"R:<R>"`` for BOSZ ``r<R>``): the
    pipeline (``matching.prepare_grid`` and ``calibration_vectors``)
    convolves it to the instrument. With an LSF the grid is stored already
    convolved and ``resolution_fwhm`` is the instrument's resolution spec
    (:func:`gpucal.fitting.lsf.resolution_spec`), so the pipeline's
    quadrature leaves σ_eff = 0 and its convolution is the identity for the
    same instrument (and still correct for any broader one). Either way the
    grid covers the full photometric bands, and synthetic photometry is
    done on it. ``gpucal templates prepare --fwhm ...`` pre-convolves;
    ``gpucal calibrate --templates BOSZ_DIR`` (which does not know the LSF
    when it loads) prepares an unconvolved grid and caches it.

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

Host-side edge module: NumPy arrays; only the LSF convolution runs on the
array backend.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import time

import numpy as np

from .. import __version__
from ..containers import TemplateGrid
from ..errors import CoverageError, GpucalError, InputError
from ..units import C_KMS, FWHM_TO_SIGMA, convert_medium
from .bosz import BOSZ_MEDIUM, BoszIndex, index_bosz, parse_bosz_name, read_bosz_spectrum, read_wave_file

__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "DEFAULT_FRAME_RANGE",
    "DEFAULT_BANDS",
    "DEFAULT_VMAX",
    "StaleCacheError",
    "needed_wave_range",
    "resample_flux",
    "prepare_bosz_grid",
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

CACHE_FORMAT = "gpucal-template-cache"
CACHE_VERSION = 1
SIDECAR = "grid.json"
_ARRAYS = ("params", "wave", "flux", "continuum")

#: Frame range (Å) assumed when the frame is not known (covers optical fibre spectrographs).
DEFAULT_FRAME_RANGE = (3500.0, 10000.0)
#: Photometric bands whose filter curves the grid must cover (Pan-STARRS g r i z).
DEFAULT_BANDS = ("g", "r", "i", "z")
#: Largest |radial velocity| (km/s) the grid must allow for (the default scan is ±500).
DEFAULT_VMAX = 500.0
_LSF_MARGIN = 0.005  # relative margin for an unknown LSF: six σ of R ≈ 500


class StaleCacheError(InputError):
    """A prepared template cache whose inputs changed after it was written."""


# --------------------------------------------------------------------------- wavelength window


def _lsf_args(fwhm, fwhm_poly, resolution) -> dict:
    return {"fwhm": fwhm, "fwhm_poly": None if fwhm_poly is None else [float(c) for c in fwhm_poly],
            "resolution": resolution}


def _has_lsf(lsf: dict) -> bool:
    return any(v is not None for v in lsf.values())


def needed_wave_range(wave=None, *, bands=DEFAULT_BANDS, vmax=DEFAULT_VMAX, fwhm=None, fwhm_poly=None,
                      resolution=None) -> tuple:
    """(lo, hi) Å of rest-frame template wavelengths a frame needs.

    The frame range ``wave`` = (min, max) Å (default :data:`DEFAULT_FRAME_RANGE`)
    joined with the full filter curves of ``bands``, divided / multiplied by
    the Doppler factor of ``vmax`` km/s, and widened by 0.5 % of λ or six σ of
    the instrument LSF, whichever is larger (the pipeline needs the frame
    plus six σ to convolve without edge effects).
    """
    lo, hi = DEFAULT_FRAME_RANGE if wave is None else (float(wave[0]), float(wave[1]))
    if not (0 < lo < hi and math.isfinite(hi)):
        raise InputError(f"wavelength window needs 0 < min < max Å, got {wave!r}")
    if bands:
        from ..photometry import load_filters

        for f in load_filters(tuple(bands)):
            lo, hi = min(lo, float(f.wavelength[0])), max(hi, float(f.wavelength[-1]))
    vmax = float(vmax)
    if not (0 <= vmax < 0.1 * C_KMS):
        raise InputError(f"vmax must be in [0, {0.1 * C_KMS:.0f}) km/s, got {vmax}")
    beta = vmax / C_KMS
    dop = math.sqrt((1.0 + beta) / (1.0 - beta))
    lo, hi = lo / dop, hi * dop
    pad_lo, pad_hi = _LSF_MARGIN * lo, _LSF_MARGIN * hi
    lsf = _lsf_args(fwhm, fwhm_poly, resolution)
    if _has_lsf(lsf):
        from ..fitting.lsf import instrument_fwhm

        probe = np.linspace(lo * (1 - 2 * _LSF_MARGIN), hi * (1 + 2 * _LSF_MARGIN), 1001)
        six_sigma = 6.0 * FWHM_TO_SIGMA * float(np.max(instrument_fwhm(probe, **lsf)))
        pad_lo, pad_hi = max(pad_lo, six_sigma), max(pad_hi, six_sigma)
    return (lo - pad_lo, hi + pad_hi)


# --------------------------------------------------------------------------- resampling


def _bin_edges(wave: np.ndarray) -> np.ndarray:
    """Pixel edges at geometric midpoints (exact bins of a log-uniform grid)."""
    mid = np.sqrt(wave[1:] * wave[:-1])
    return np.concatenate([[wave[0] ** 2 / mid[0]], mid, [wave[-1] ** 2 / mid[-1]]])


def resample_flux(wave_in, flux_in, wave_out, *, name="spectrum"):
    """Flux-conserving resampling of flux densities onto new pixels.

    Each input pixel is a bin (edges at geometric midpoints) of constant flux
    density; each output value is the mean flux density over its bin, so
    ∫F dλ over any set of whole output bins equals that of the input. An
    output grid whose bins coincide with input bins returns the input values.

    wave_in (n_in,), flux_in (..., n_in), wave_out (n_out,) Å, increasing.
    Returns (..., n_out) float64. CoverageError when the output bins reach
    beyond the input bins (``name`` goes in the message).
    """
    wi = np.asarray(wave_in, dtype=np.float64)
    wo = np.asarray(wave_out, dtype=np.float64)
    f = np.asarray(flux_in, dtype=np.float64)
    if wi.ndim != 1 or wo.ndim != 1 or wi.size < 2 or wo.size < 2 or f.shape[-1] != wi.size:
        raise InputError(f"{name}: resampling needs wave_in (n,), flux (..., n), wave_out (m,); "
                         f"got {wi.shape}, {f.shape}, {wo.shape}")
    ei, eo = _bin_edges(wi), _bin_edges(wo)
    if eo[0] < ei[0] or eo[-1] > ei[-1]:
        raise CoverageError(f"{name}: covers {ei[0]:.2f}-{ei[-1]:.2f} Å, the working grid needs "
                            f"{eo[0]:.2f}-{eo[-1]:.2f} Å")
    cum = np.concatenate([np.zeros(f.shape[:-1] + (1,)), np.cumsum(f * np.diff(ei), axis=-1)], axis=-1)
    k = np.clip(np.searchsorted(ei, eo, side="right") - 1, 0, ei.size - 2)
    t = (eo - ei[k]) / (ei[k + 1] - ei[k])
    at = cum[..., k] + t * (cum[..., k + 1] - cum[..., k])
    return np.diff(at, axis=-1) / np.diff(eo)


# --------------------------------------------------------------------------- workers

_WORKER: dict = {}


def _init_worker(shared: dict) -> None:
    _WORKER.clear()
    _WORKER.update(shared)


def _prepare_one(path: str):
    """Read one file's window, move it to the target medium, resample it (runs in a worker)."""
    st = os.stat(path) if os.path.exists(path) else None
    spec = read_bosz_spectrum(path, wave=_WORKER["wave"], window=_WORKER["window"], wave_file=_WORKER["wave_file"])
    both = np.stack([spec.flux, spec.continuum])
    if _WORKER["aligned"]:
        # the working grid is the library's own grid here: resampling would copy
        out = both
        if out.shape[1] != _WORKER["wave_out"].size:
            raise InputError(f"{path}: {out.shape[1]} lines in the working window, expected {_WORKER['wave_out'].size}")
    else:
        w = convert_medium(spec.wave, BOSZ_MEDIUM, _WORKER["medium"])
        out = resample_flux(w, both, _WORKER["wave_out"], name=path)
    size = st.st_size if st else None
    mtime = st.st_mtime_ns if st else None
    return out[0].astype(np.float32), out[1].astype(np.float32), spec.sha256, size, mtime


def _pool_context():
    # The platform's default start method: "spawn"/"forkserver" re-import the
    # caller's __main__, which fails for scripts read from stdin; the workers
    # only parse text (gzip, numpy.loadtxt, no BLAS or OpenMP), which is safe
    # in a forked child.
    return multiprocessing.get_context()


def _run_workers(paths, shared, workers, progress):
    from tqdm.auto import tqdm

    n = len(paths)
    if workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = max(1, min(cpus, math.ceil(n / 4)))
    workers = max(1, min(int(workers), n))
    bar = tqdm(total=n, desc="reading BOSZ spectra", unit="file", disable=(None if progress is None else not progress))
    try:
        if workers == 1:
            _init_worker(shared)
            try:
                for p in paths:
                    yield _prepare_one(p)
                    bar.update(1)
            finally:
                _WORKER.clear()
            return
        chunk = max(1, min(16, n // (workers * 4)))
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(),
                                    initializer=_init_worker, initargs=(shared,)) as ex:
            for res in ex.map(_prepare_one, paths, chunksize=chunk):
                yield res
                bar.update(1)
    finally:
        bar.close()


# --------------------------------------------------------------------------- preparation


def _sha256_text(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _selection(teff, logg, mh, alpha, carbon, vturb, atmos) -> dict:
    def rng(v):
        if v is None:
            return None
        if isinstance(v, (int, float)):
            return [float(v), float(v)]
        return [float(v[0]), float(v[1])]

    return {"teff": rng(teff), "logg": rng(logg), "mh": rng(mh), "alpha": rng(alpha), "carbon": rng(carbon),
            "vturb": rng(vturb), "atmos": None if atmos is None else ([atmos] if isinstance(atmos, str) else list(atmos))}


def _config(root, res, selection, window, dlnlam, medium, lsf, truncate, bands, vmax) -> dict:
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "root": root, "bosz_resolution": res,
            "selection": selection, "window": list(window), "dlnlam": dlnlam, "medium": medium, "lsf": lsf,
            "truncate": truncate if _has_lsf(lsf) else None, "bands": list(bands or ()), "vmax": vmax}


def prepare_bosz_grid(src, *, teff=None, logg=None, mh=None, alpha=None, carbon=None, vturb=None, atmos=None,
                      bosz_resolution=None, wave=None, bands=DEFAULT_BANDS, vmax=DEFAULT_VMAX, dlnlam=None,
                      medium="air", fwhm=None, fwhm_poly=None, resolution=None, truncate=4.0,
                      workers=None, progress=None, backend=None, block_size=64) -> TemplateGrid:
    """Read, resample and (optionally) convolve a BOSZ 2024 subgrid into a TemplateGrid.

    Parameters
    ----------
    src : BOSZ directory (release layout, see :func:`gpucal.templates.bosz.index_bosz`).
    teff, logg, mh, alpha, carbon, vturb : inclusive (min, max) or a value; None = all.
    atmos : atmosphere code(s), in order of preference for duplicates.
    bosz_resolution : R of the ``r<R>`` subgrid or ``"orig"`` (None: the only one present).
    wave : (min, max) Å of the frame; the grid covers it joined with ``bands``,
        ±``vmax`` km/s and the LSF margin (:func:`needed_wave_range`).
    dlnlam : Δlnλ of the working grid (default: the library's coarsest step
        inside the window).
    medium : "air" or "vacuum", the frame's medium; the grid is converted to it.
    fwhm, fwhm_poly, resolution : instrument LSF; given, the grid is stored
        convolved to it and ``resolution_fwhm`` is its spec; none, the grid keeps
        the library's resolution.
    workers : reader processes (default: the CPUs, at most one per 4 files; 1 = in this process).
    progress : tqdm bar (None: only on a terminal).
    backend : array backend of the convolution (default: ``GPUCAL_BACKEND`` / auto).

    Returns
    -------
    TemplateGrid with host arrays: params float64 (n_t, 4), wave float64 (n_w,),
    flux / continuum float32 (n_t, n_w) surface flux F = 4πH, ``meta`` the
    provenance that :func:`write_template_cache` stores in the sidecar.
    """
    t0 = time.perf_counter()
    if medium not in ("air", "vacuum"):
        raise InputError(f"medium must be 'air' or 'vacuum', got {medium!r}")
    lsf = _lsf_args(fwhm, fwhm_poly, resolution)
    convolve = _has_lsf(lsf)
    from ..fitting.lsf import instrument_fwhm, resolution_spec, template_fwhm_at

    if convolve:
        resolution_spec(**lsf)  # validates the arguments before any file is read
    frame = DEFAULT_FRAME_RANGE if wave is None else (float(wave[0]), float(wave[1]))
    index = index_bosz(src, resolution=bosz_resolution)
    selection = _selection(teff, logg, mh, alpha, carbon, vturb, atmos)
    sel = index.select(teff=teff, logg=logg, mh=mh, alpha=alpha, carbon=carbon, vturb=vturb, atmos=atmos)
    lo, hi = needed_wave_range(wave, bands=bands, vmax=vmax, **lsf)

    # native wavelengths in the target medium
    if sel.wave_file is not None:
        wave_src = read_wave_file(sel.wave_file)
        native_name = sel.wave_file
    else:
        probe = read_bosz_spectrum(sel.models[0].path)
        wave_src = probe.wave
        native_name = sel.models[0].path
    native = convert_medium(wave_src, BOSZ_MEDIUM, medium)
    if native[0] > lo or native[-1] < hi:
        missing = []
        if native[0] > lo:
            missing.append(f"{lo:.1f}-{native[0]:.1f} Å")
        if native[-1] < hi:
            missing.append(f"{native[-1]:.1f}-{hi:.1f} Å")
        raise CoverageError(
            f"{native_name}: the templates cover {native[0]:.1f}-{native[-1]:.1f} Å but the frame "
            f"{frame[0]:.1f}-{frame[1]:.1f} Å with bands "
            f"{','.join(bands or ()) or '-'}, ±{vmax:g} km/s and the LSF margin needs {lo:.1f}-{hi:.1f} Å; "
            f"missing {', '.join(missing)}"
        )
    dl_src = np.diff(np.log(wave_src))
    inside = (native[1:] >= lo) & (native[:-1] <= hi)
    if dlnlam is not None:
        d = float(dlnlam)
    elif np.max(np.abs(dl_src - np.median(dl_src))) <= 1e-6 * np.median(dl_src):
        # a log-uniform library: its step from the end points, free of the
        # rounding of individual wavelengths, so the working grid stays aligned
        # (the air/vacuum conversion changes Δlnλ by < 1e-5 of itself)
        d = math.log(wave_src[-1] / wave_src[0]) / (wave_src.size - 1)
    else:
        dl = np.diff(np.log(native))
        d = float(np.max(dl[inside] if np.any(inside) else dl))
    if not (d > 0 and math.isfinite(d)):
        raise InputError(f"dlnlam must be positive, got {dlnlam!r}")
    anchor = float(native[min(int(np.searchsorted(native, lo)), native.size - 1)])
    k_lo = math.floor(math.log(lo / anchor) / d + 1e-9)
    k_hi = math.ceil(math.log(hi / anchor) / d - 1e-9)
    ext = 0
    if convolve:
        probe_w = np.exp(np.linspace(math.log(lo) - 0.05, math.log(hi) + 0.05, 2001))
        eff2 = instrument_fwhm(probe_w, **lsf) ** 2 - template_fwhm_at(probe_w, sel.template_fwhm) ** 2
        if np.any(eff2 < -1e-9 * instrument_fwhm(probe_w, **lsf) ** 2):
            bad = probe_w[np.argmax(eff2 < 0)]
            raise InputError(f"{index.root}: the instrument FWHM is below the templates' own resolution "
                             f"({sel.template_fwhm}) at {bad:.1f} Å")
        rel = np.sqrt(np.clip(eff2, 0.0, None)) * FWHM_TO_SIGMA / probe_w
        ext = int(math.ceil(truncate * float(np.max(rel)) / d)) + 1
    k = np.arange(k_lo - ext, k_hi + ext + 1)
    wave_out = anchor * np.exp(d * k)
    edges = _bin_edges(wave_out)
    if edges[0] < native[0] or edges[-1] > native[-1]:
        raise CoverageError(
            f"{native_name}: the templates cover {native[0]:.1f}-{native[-1]:.1f} Å, the working grid with its "
            f"LSF margin needs {edges[0]:.1f}-{edges[-1]:.1f} Å"
        )
    # the lines each worker parses, in the files' own medium, one step wider than the bins
    win = convert_medium(np.array([edges[0] * math.exp(-2 * d), edges[-1] * math.exp(2 * d)]), medium, BOSZ_MEDIUM)
    win = (max(float(win[0]), float(wave_src[0])), min(float(win[1]), float(wave_src[-1])))
    aligned = False
    if sel.wave_file is not None and medium == BOSZ_MEDIUM:
        j = int(np.argmin(np.abs(native - wave_out[0])))
        if j + wave_out.size <= native.size:
            aligned = bool(np.max(np.abs(native[j:j + wave_out.size] / wave_out - 1.0)) < 1e-10)
        if aligned:  # read exactly the library's lines of the working grid
            win = (float(wave_src[j]), float(wave_src[j + wave_out.size - 1]))
    shared = {"wave": wave_src if sel.wave_file is not None else None, "wave_file": sel.wave_file,
              "window": win, "medium": medium, "wave_out": wave_out, "aligned": aligned}
    paths = [m.path for m in sel.models]
    n_t, n_out = len(paths), wave_out.size
    flux = np.empty((n_t, n_out), dtype=np.float32)
    cont = np.empty((n_t, n_out), dtype=np.float32)
    files = []
    for i, (f, c, sha, size, mtime) in enumerate(_run_workers(paths, shared, workers, progress)):
        flux[i], cont[i] = f, c
        files.append({"path": os.path.relpath(paths[i], index.root), "size": size, "mtime_ns": mtime, "sha256": sha})
    t_read = time.perf_counter() - t0

    if convolve:
        from ..backends import get_backend, to_backend, to_numpy
        from ..fitting.lsf import convolve_to_instrument

        be = get_backend(backend)
        core = slice(ext, n_out - ext)
        bw = to_backend(wave_out, be, dtype=be.xp.float64)
        out_f = np.empty((n_t, n_out - 2 * ext), dtype=np.float32)
        out_c = np.empty_like(out_f)
        for b0 in range(0, n_t, block_size):
            for src_arr, dst in ((flux, out_f), (cont, out_c)):
                blk = to_backend(src_arr[b0:b0 + block_size], be, dtype=be.xp.float64)
                conv = convolve_to_instrument(bw, blk, template_fwhm=sel.template_fwhm, truncate=truncate, **lsf)
                dst[b0:b0 + block_size] = to_numpy(conv)[:, core]
        flux, cont, wave_out = out_f, out_c, wave_out[core]
        res_spec = resolution_spec(**lsf)
        backend_name = be.name
    else:
        res_spec = sel.template_fwhm
        backend_name = None

    wave_file_rec = None
    if sel.wave_file is not None:
        st = os.stat(sel.wave_file)
        wave_file_rec = {"path": os.path.relpath(sel.wave_file, index.root), "size": st.st_size,
                         "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(sel.wave_file)}
    config = _config(index.root, index.resolution if index.resolution is not None else "orig", selection,
                     (lo, hi), dlnlam, medium, lsf, truncate, bands, vmax)
    inputs_sha = _sha256_text({"files": sorted((f["path"], f["sha256"]) for f in files),
                               "wave_file": None if wave_file_rec is None else wave_file_rec["sha256"],
                               "config": {k: v for k, v in config.items() if k != "root"}})
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "gpucal_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"kind": "BOSZ 2024", "root": index.root, "bosz_resolution": config["bosz_resolution"],
                   "medium_convention": "air above 2000 Å, vacuum below (IAU)", "wave_file": wave_file_rec,
                   "files": files},
        "selection": selection,
        "flux_unit": "erg/(s cm2 Angstrom)",
        "flux_kind": "surface flux F = 4 pi H",
        "grid": {"wave_min": float(wave_out[0]), "wave_max": float(wave_out[-1]), "n_wave": int(wave_out.size),
                 "dlnlam": d, "medium": medium, "needed_range": [lo, hi],
                 "frame_range": list(frame), "bands": list(bands or ()), "vmax_kms": vmax},
        "lsf": {**lsf, "convolved": convolve, "truncate": truncate if convolve else None, "backend": backend_name,
                "template_fwhm": sel.template_fwhm},
        "resolution_fwhm": res_spec,
        "n_templates": n_t,
        "config_sha256": _sha256_text(config),
        "inputs_sha256": inputs_sha,
        "timing_s": {"read_resample": t_read, "total": time.perf_counter() - t0},
    }
    params = sel.params
    return TemplateGrid(params=params, wave=wave_out, flux=flux, continuum=cont, medium=medium,
                        resolution_fwhm=res_spec, meta=meta)


# --------------------------------------------------------------------------- cache


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
    arrays = {}
    for name in _ARRAYS:
        rec = (meta.get("arrays") or {}).get(name)
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
        if verify == "full" and _sha256_file(fname) != rec.get("sha256"):
            raise InputError(f"{fname}: content does not match the sidecar's SHA-256 (corrupt cache)")
        arrays[name] = arr
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


def prepare_template_cache(src, out, *, overwrite: bool = False, **options) -> TemplateGrid:
    """:func:`prepare_bosz_grid` then :func:`write_template_cache`; returns the cache, opened."""
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

"""Template preparation: a BOSZ 2024 release -> one log-uniform working grid (host edge module).

Step of the mission: read a template library once, in parallel, into the
form the grid scan consumes, so a frame never re-parses a text file
(:mod:`gpucal.templates.cache` stores the result).

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

In: a BOSZ directory and a selection. Out: a TemplateGrid of host arrays,
params float64 (n_t, 4), wave float64 (n_w,) Å, flux / continuum float32
(n_t, n_w) erg/s/cm²/Å, and ``meta``, the provenance the cache stores.
NumPy on the host; only the LSF convolution runs on the array backend.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import time

import numpy as np

from .. import __version__
from ..containers import TemplateGrid
from ..errors import CoverageError, InputError
from ..units import C_KMS, FWHM_TO_SIGMA, convert_medium
from .bosz import BOSZ_MEDIUM, index_bosz, read_bosz_spectrum, read_wave_file
from .keys import CACHE_FORMAT, CACHE_VERSION, _sha256_file, _sha256_text

__all__ = [
    "DEFAULT_FRAME_RANGE",
    "DEFAULT_BANDS",
    "DEFAULT_VMAX",
    "needed_wave_range",
    "resample_flux",
    "prepare_bosz_grid",
]

#: Frame range (Å) assumed when the frame is not known (covers optical fibre spectrographs).
DEFAULT_FRAME_RANGE = (3500.0, 10000.0)
#: Photometric bands whose filter curves the grid must cover (Pan-STARRS g r i z).
DEFAULT_BANDS = ("g", "r", "i", "z")
#: Largest |radial velocity| (km/s) the grid must allow for (the default scan is ±500).
DEFAULT_VMAX = 500.0
_LSF_MARGIN = 0.005  # relative margin for an unknown LSF: six σ of R ≈ 500


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
    provenance that :func:`~gpucal.templates.cache.write_template_cache` stores in the sidecar.
    """
    t0 = time.perf_counter()
    if medium not in ("air", "vacuum"):
        raise InputError(f"medium must be 'air' or 'vacuum', got {medium!r}")
    lsf = _lsf_args(fwhm, fwhm_poly, resolution)
    convolve = _has_lsf(lsf)
    from ..fitting.lsf import resolution_spec

    if convolve:
        resolution_spec(**lsf)  # validates the arguments before any file is read
    frame = DEFAULT_FRAME_RANGE if wave is None else (float(wave[0]), float(wave[1]))
    index = index_bosz(src, resolution=bosz_resolution)
    selection = _selection(teff, logg, mh, alpha, carbon, vturb, atmos)
    sel = index.select(teff=teff, logg=logg, mh=mh, alpha=alpha, carbon=carbon, vturb=vturb, atmos=atmos)
    lo, hi = needed_wave_range(wave, bands=bands, vmax=vmax, **lsf)

    wave_src, native, native_name = _native_wave(sel, medium)
    _check_native_covers(native, native_name, (lo, hi), frame, bands, vmax)
    d = _working_step(wave_src, native, lo, hi, dlnlam)
    ext = _lsf_extension(index.root, sel.template_fwhm, lsf, lo, hi, d, truncate) if convolve else 0
    wave_out = _working_grid(native, native_name, lo, hi, d, ext)
    shared = _reader_settings(sel, wave_src, native, wave_out, d, medium)
    paths = [m.path for m in sel.models]
    flux, cont, files = _read_all(paths, index.root, shared, workers, progress)
    t_read = time.perf_counter() - t0

    if convolve:
        flux, cont, wave_out, backend_name = _convolve_grid(flux, cont, wave_out, ext, sel.template_fwhm, lsf,
                                                            truncate, backend, block_size)
        res_spec = resolution_spec(**lsf)
    else:
        res_spec = sel.template_fwhm
        backend_name = None

    config = _config(index.root, index.resolution if index.resolution is not None else "orig", selection,
                     (lo, hi), dlnlam, medium, lsf, truncate, bands, vmax)
    grid = {"wave_min": float(wave_out[0]), "wave_max": float(wave_out[-1]), "n_wave": int(wave_out.size),
            "dlnlam": d, "medium": medium, "needed_range": [lo, hi],
            "frame_range": list(frame), "bands": list(bands or ()), "vmax_kms": vmax}
    lsf_rec = {**lsf, "convolved": convolve, "truncate": truncate if convolve else None, "backend": backend_name,
               "template_fwhm": sel.template_fwhm}
    meta = _provenance(index.root, sel.wave_file, files, selection, config, grid, lsf_rec, res_spec, t0, t_read)
    return TemplateGrid(params=sel.params, wave=wave_out, flux=flux, continuum=cont, medium=medium,
                        resolution_fwhm=res_spec, meta=meta)


def _native_wave(sel, medium: str):
    """(the library's wavelengths as read, the same in ``medium``, the file they come from)."""
    if sel.wave_file is not None:
        wave_src = read_wave_file(sel.wave_file)
        native_name = sel.wave_file
    else:
        probe = read_bosz_spectrum(sel.models[0].path)
        wave_src = probe.wave
        native_name = sel.models[0].path
    return wave_src, convert_medium(wave_src, BOSZ_MEDIUM, medium), native_name


def _check_native_covers(native, native_name: str, needed: tuple, frame: tuple, bands, vmax) -> None:
    """CoverageError naming what is missing when the library does not cover ``needed`` (lo, hi) Å."""
    lo, hi = needed
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


def _working_step(wave_src, native, lo: float, hi: float, dlnlam) -> float:
    """Δlnλ of the working grid: ``dlnlam``, else a log-uniform library's own, else its coarsest inside (lo, hi)."""
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
    return d


def _lsf_extension(root: str, template_fwhm, lsf: dict, lo: float, hi: float, d: float, truncate: float) -> int:
    """Pixels added at each end so the LSF convolution (``truncate`` σ) has no edge effects inside (lo, hi)."""
    from ..fitting.lsf import instrument_fwhm, template_fwhm_at

    probe_w = np.exp(np.linspace(math.log(lo) - 0.05, math.log(hi) + 0.05, 2001))
    eff2 = instrument_fwhm(probe_w, **lsf) ** 2 - template_fwhm_at(probe_w, template_fwhm) ** 2
    if np.any(eff2 < -1e-9 * instrument_fwhm(probe_w, **lsf) ** 2):
        bad = probe_w[np.argmax(eff2 < 0)]
        raise InputError(f"{root}: the instrument FWHM is below the templates' own resolution "
                         f"({template_fwhm}) at {bad:.1f} Å")
    rel = np.sqrt(np.clip(eff2, 0.0, None)) * FWHM_TO_SIGMA / probe_w
    return int(math.ceil(truncate * float(np.max(rel)) / d)) + 1


def _working_grid(native, native_name: str, lo: float, hi: float, d: float, ext: int) -> np.ndarray:
    """The log-uniform working wavelengths (Å): step ``d``, anchored on a native pixel, (lo, hi) plus ``ext``."""
    anchor = float(native[min(int(np.searchsorted(native, lo)), native.size - 1)])
    k_lo = math.floor(math.log(lo / anchor) / d + 1e-9)
    k_hi = math.ceil(math.log(hi / anchor) / d - 1e-9)
    k = np.arange(k_lo - ext, k_hi + ext + 1)
    wave_out = anchor * np.exp(d * k)
    edges = _bin_edges(wave_out)
    if edges[0] < native[0] or edges[-1] > native[-1]:
        raise CoverageError(
            f"{native_name}: the templates cover {native[0]:.1f}-{native[-1]:.1f} Å, the working grid with its "
            f"LSF margin needs {edges[0]:.1f}-{edges[-1]:.1f} Å"
        )
    return wave_out


def _reader_settings(sel, wave_src, native, wave_out, d: float, medium: str) -> dict:
    """What every reader needs: the lines to parse (in the files' own medium), the target grid, alignment."""
    edges = _bin_edges(wave_out)
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
    return {"wave": wave_src if sel.wave_file is not None else None, "wave_file": sel.wave_file,
            "window": win, "medium": medium, "wave_out": wave_out, "aligned": aligned}


def _read_all(paths, root: str, shared: dict, workers, progress):
    """(flux, continuum) float32 (n_t, n_w) of every file, and each file's record (path under root, size, mtime, SHA-256)."""
    n_t, n_out = len(paths), shared["wave_out"].size
    flux = np.empty((n_t, n_out), dtype=np.float32)
    cont = np.empty((n_t, n_out), dtype=np.float32)
    files = []
    for i, (f, c, sha, size, mtime) in enumerate(_run_workers(paths, shared, workers, progress)):
        flux[i], cont[i] = f, c
        files.append({"path": os.path.relpath(paths[i], root), "size": size, "mtime_ns": mtime, "sha256": sha})
    return flux, cont, files


def _convolve_grid(flux, cont, wave_out, ext: int, template_fwhm, lsf: dict, truncate: float, backend, block_size: int):
    """Flux and continuum convolved to the instrument LSF on the backend, in blocks of templates, the
    ``ext`` margin pixels cut off again: (flux, continuum, wave_out, backend name)."""
    from ..backends import get_backend, to_backend, to_numpy
    from ..fitting.lsf import convolve_to_instrument

    n_t, n_out = flux.shape
    be = get_backend(backend)
    core = slice(ext, n_out - ext)
    bw = to_backend(wave_out, be, dtype=be.xp.float64)
    out_f = np.empty((n_t, n_out - 2 * ext), dtype=np.float32)
    out_c = np.empty_like(out_f)
    for b0 in range(0, n_t, block_size):
        for src_arr, dst in ((flux, out_f), (cont, out_c)):
            blk = to_backend(src_arr[b0:b0 + block_size], be, dtype=be.xp.float64)
            conv = convolve_to_instrument(bw, blk, template_fwhm=template_fwhm, truncate=truncate, **lsf)
            dst[b0:b0 + block_size] = to_numpy(conv)[:, core]
    return out_f, out_c, wave_out[core], be.name


def _provenance(root: str, wave_file, files: list, selection: dict, config: dict, grid: dict, lsf_rec: dict,
                res_spec, t0: float, t_read: float) -> dict:
    """The grid's ``meta``: source files and their hashes, selection, grid, LSF, content hashes, timing."""
    wave_file_rec = None
    if wave_file is not None:
        st = os.stat(wave_file)
        wave_file_rec = {"path": os.path.relpath(wave_file, root), "size": st.st_size,
                         "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(wave_file)}
    inputs_sha = _sha256_text({"files": sorted((f["path"], f["sha256"]) for f in files),
                               "wave_file": None if wave_file_rec is None else wave_file_rec["sha256"],
                               "config": {k: v for k, v in config.items() if k != "root"}})
    return {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "gpucal_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"kind": "BOSZ 2024", "root": root, "bosz_resolution": config["bosz_resolution"],
                   "medium_convention": "air above 2000 Å, vacuum below (IAU)", "wave_file": wave_file_rec,
                   "files": files},
        "selection": selection,
        "flux_unit": "erg/(s cm2 Angstrom)",
        "flux_kind": "surface flux F = 4 pi H",
        "grid": grid,
        "lsf": lsf_rec,
        "resolution_fwhm": res_spec,
        "n_templates": len(files),
        "config_sha256": _sha256_text(config),
        "inputs_sha256": inputs_sha,
        "timing_s": {"read_resample": t_read, "total": time.perf_counter() - t0},
    }

"""Template grids in one FITS file: a generic layout and SDSS's ``kurucz_stds_v5.fit`` (host NumPy edge module).

Step of the mission: a stellar grid that is not a BOSZ release, read into the
same :class:`~gpucal.containers.TemplateGrid` as BOSZ (log-uniform working
wavelengths in the frame's medium, flux float32) and cached through the
same prepared cache (:func:`gpucal.templates.cache.load_or_prepare_fits_grid`).

The generic layout (:func:`read_fits_grid`)
    * flux: the image HDU named ``FLUX``, else the primary image, else the
      first 2-D image: ``(n_model, n_pix)`` (``NAXIS2`` = models, ``NAXIS1`` =
      pixels), erg/s/cm²/Å (any absolute scale: the photometry fixes it);
    * wavelengths, the first of: an HDU named ``WAVE``, ``WAVELENGTH`` or
      ``LAMBDA`` (a 1-D image, or a table whose first column is the
      wavelength; unit from ``BUNIT`` / ``TUNIT1``, default Å), an HDU named
      ``LOGLAM`` (log10 λ in Å), else the spectral WCS of the flux header
      (linear, log-linear, ``WAVE``/``AWAV`` with any algorithm, ``DC-FLAG``,
      SDSS ``COEFF0``/``COEFF1``; :mod:`gpucal.spectral_wcs`);
    * the medium: ``AIRORVAC`` or ``WAVEMED`` (``AIR`` / ``VAC``) in the
      wavelength, flux or primary header, or ``CTYPE1`` ``AWAV`` / ``WAVE``.
      A grid that states none is refused (never guessed);
    * parameters: the table named ``PARAMS`` (or ``PARAMETERS``), else the first
      table with one row per model; columns by name, any case: Teff
      (``TEFF``, ``T_EFF``, ``TEMP``), logg (``LOGG``, ``LOG_G``, ``G``,
      ``GRAV``), [M/H] (``MH``, ``M_H``, ``FEH``, ``FE_H``, ``METAL``,
      ``Z``), [α/M] (``ALPHA``, ``AM``, ``A_M``, ``ALPHA_M``, ``AFE``; 0 when
      absent); optional model names (``MODEL``, ``NAME``);
    * resolution: ``FWHM`` (Å) or ``RESOLVPW`` (λ/Δλ) in the flux header,
      else the models count as unconvolved (FWHM 0).
    A grid need not be a full cube: any set of distinct nodes is read, and
    the scan and the refinement use only the nodes present.

SDSS ``kurucz_stds_v5.fit`` (recognised by its tables)
    89 models in the primary image, log10-uniform vacuum wavelengths in the
    IRAF WCS (``CRVAL1`` log10 Å, ``CD1_1`` = 1e-4, ``DC-FLAG = 1``); HDU 1 the
    parameters (``MODEL``, ``FEH``, ``TEFF``, ``G``, ``MAG``); HDU 2 the
    empirical correction idlspec2d's ``kurucz_restore`` divides the fluxes by
    (a Legendre series in λ over [``XMIN``, ``XMAX``], applied here the same
    way). Vacuum wavelengths and R ≈ 1800 (``"R:1800"``) are this file's
    documented properties; [α/M] = 0. One node (Teff 5000 K, logg 4.5,
    [Fe/H] −0.5) is missing.

Both: the span where every model's flux is positive is kept (the Kurucz file
has zero flux in its first and last pixels); a zero, negative or non-finite
flux inside it is an InputError naming the model.

In: a path. Out: :class:`FitsGridFile` (host float64) or, prepared for a
frame, a TemplateGrid: params float64 (n_t, 4), wave float64 (n_w,) Å
log-uniform, flux float32 (n_t, n_w), continuum None, ``meta`` provenance.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .. import __version__
from ..containers import TemplateGrid
from ..errors import InputError
from ..spectral_wcs import length_unit_to_angstrom, medium_from_headers, wcs_wavelengths
from ..units import convert_medium
from .keys import CACHE_FORMAT, CACHE_VERSION, _sha256_text
from .prepare import (
    DEFAULT_BANDS,
    DEFAULT_FRAME_RANGE,
    DEFAULT_VMAX,
    _check_native_covers,
    _working_grid,
    _working_step,
    needed_wave_range,
    resample_flux,
)

__all__ = ["FitsGridFile", "FITS_GRID_SUFFIXES", "is_fits_grid", "read_fits_grid", "prepare_fits_grid",
           "write_fits_grid"]

#: File name endings read as a FITS template grid.
FITS_GRID_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")
_WAVE_HDUS = ("WAVE", "WAVELENGTH", "LAMBDA")
_PARAM_HDUS = ("PARAMS", "PARAMETERS")
_COLUMNS = {
    "teff": ("TEFF", "T_EFF", "TEMP"),
    "logg": ("LOGG", "LOG_G", "G", "GRAV"),
    "mh": ("MH", "M_H", "FEH", "FE_H", "METAL", "Z"),
    "alpha": ("ALPHA", "AM", "A_M", "ALPHA_M", "AFE"),
}
_NAME_COLUMNS = ("MODEL", "NAME")
#: Resolution of SDSS's Kurucz grid (its documentation: R ≈ 1500-1800, convolved to SDSS).
KURUCZ_RESOLUTION = "R:1800.0"


@dataclass
class FitsGridFile:
    """One FITS grid as read (host arrays, the file's own wavelengths).

    wave (n_pix,) Å increasing in ``medium``; flux (n_model, n_pix) float64;
    params (n_model, 4) [Teff, logg, [M/H], [α/M]]; names: model names;
    resolution_fwhm: a resolution spec (:mod:`gpucal.fitting.lsf`);
    layout: ``"generic"`` or ``"sdss-kurucz"``; sha256 of the file's bytes.
    """

    path: str
    wave: np.ndarray
    flux: np.ndarray
    params: np.ndarray
    medium: str
    resolution_fwhm: object
    names: tuple
    layout: str
    sha256: str
    notes: tuple = ()


def is_fits_grid(path) -> bool:
    """True for an existing file whose name ends like a FITS file (:data:`FITS_GRID_SUFFIXES`)."""
    p = os.fspath(path)
    return os.path.isfile(p) and p.lower().endswith(FITS_GRID_SUFFIXES)


def _open(path: str):
    from astropy.io import fits

    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read the template grid ({exc.strerror or exc})") from None
    try:
        import io

        hdul = fits.open(io.BytesIO(raw), memmap=False, lazy_load_hdus=False)
    except Exception as exc:  # noqa: BLE001 -- anything astropy raises means "not a readable FITS file"
        raise InputError(f"{path}: not a readable FITS template grid ({type(exc).__name__}: {exc})") from None
    return hdul, hashlib.sha256(raw).hexdigest()


def _named(hdul, names):
    for h in hdul:
        if str(h.name).strip().upper() in names:
            return h
    return None


def _flux_hdu(hdul, path: str):
    h = _named(hdul, ("FLUX",))
    if h is None:
        h = next((x for x in hdul if x.is_image and x.data is not None and x.data.ndim == 2), None)
    if h is None or h.data is None or h.data.ndim != 2:
        raise InputError(f"{path}: no (n_model, n_pix) flux image (an HDU named FLUX or a 2-D primary image)")
    if h.data.shape[0] < 1 or h.data.shape[1] < 2:
        raise InputError(f"{path} [{h.name}]: flux image shape {h.data.shape} is too small")
    return h


def _column(names, aliases):
    upper = {n.upper(): n for n in names}
    return next((upper[a] for a in aliases if a in upper), None)


def _params_table(hdul, path: str, n_model: int):
    """(params (n_model, 4), names, HDU name) from the parameter table."""
    h = _named(hdul, _PARAM_HDUS)
    if h is None:
        h = next((x for x in hdul[1:] if not x.is_image and x.data is not None and len(x.data) == n_model
                  and _column(x.columns.names, _COLUMNS["teff"])), None)
    if h is None:
        raise InputError(f"{path}: no parameter table (a PARAMS table with TEFF, LOGG, MH[, ALPHA] and one row "
                         f"per model: {n_model})")
    where = f"{path} [{h.name or 'table'}]"
    if len(h.data) != n_model:
        raise InputError(f"{where}: {len(h.data)} rows for {n_model} models")
    cols = h.columns.names
    out = np.zeros((n_model, 4))
    for k, (axis, aliases) in enumerate(_COLUMNS.items()):
        name = _column(cols, aliases)
        if name is None:
            if axis == "alpha":
                continue
            raise InputError(f"{where}: no {axis} column (one of {', '.join(aliases)}); columns: {', '.join(cols)}")
        try:
            out[:, k] = np.asarray(h.data[name], dtype=np.float64).reshape(n_model)
        except (TypeError, ValueError):
            raise InputError(f"{where}: column {name} is not one number per model") from None
    bad = np.flatnonzero(~np.all(np.isfinite(out), axis=1))
    if bad.size:
        raise InputError(f"{where}: non-finite parameters for model(s) {', '.join(str(i) for i in bad[:5])}")
    ncol = _column(cols, _NAME_COLUMNS)
    names = tuple(str(v).strip() for v in h.data[ncol]) if ncol else tuple(f"row {i + 1}" for i in range(n_model))
    return out, names, h.name


def _wave_array(hdul, path: str, n_pix: int):
    """(wave Å, its header, HDU name) from a WAVE/WAVELENGTH/LAMBDA or LOGLAM HDU, or None."""
    h = _named(hdul, _WAVE_HDUS + ("LOGLAM",))
    if h is None:
        return None
    where = f"{path} [{h.name}]"
    if h.is_image:
        w, unit = h.data, h.header.get("BUNIT")
    else:
        w, unit = h.data[h.columns.names[0]], h.columns[0].unit
    w = np.asarray(w, dtype=np.float64).reshape(-1) if w is not None else np.zeros(0)
    if w.size != n_pix:
        raise InputError(f"{where}: {w.size} wavelengths for {n_pix} flux pixels")
    if h.name.strip().upper() == "LOGLAM":
        w = 10.0 ** w
    else:
        w = w * length_unit_to_angstrom(unit, f"{where} unit")
    return w, h.header, h.name


def _wavelengths(hdul, fh, path: str, n_pix: int):
    """(wave Å, medium) of the grid, the medium stated by a keyword or CTYPE1, never guessed."""
    arr = _wave_array(hdul, path, n_pix)
    if arr is not None:
        wave, whdr, wname = arr
        wcs_medium = None
    else:
        wave, wcs_medium = wcs_wavelengths(fh.header, n_pix, f"{path} [{fh.name}] WCS")
        whdr = wname = None
        if wave is None:
            raise InputError(f"{path}: no wavelengths: no WAVE, WAVELENGTH, LAMBDA or LOGLAM HDU and no spectral WCS "
                             f"(CRVAL1 and CDELT1 or CD1_1) in the [{fh.name}] header")
    medium = medium_from_headers([(whdr, wname), (fh.header, fh.name), (hdul[0].header, "PRIMARY")], path)
    if medium is not None and wcs_medium is not None and medium != wcs_medium:
        raise InputError(f"{path} [{fh.name}]: CTYPE1 says {wcs_medium} but the medium keyword says {medium}")
    return wave, medium or wcs_medium


def _kurucz_correction(hdul):
    """idlspec2d's empirical correction (flux is divided by it), or None when the file is not the Kurucz grid."""
    if len(hdul) < 3 or hdul[1].is_image or hdul[2].is_image:
        return None
    t1, t2 = set(hdul[1].columns.names), set(hdul[2].columns.names)
    if not ({"MODEL", "FEH", "TEFF", "G"} <= t1 and {"FUNC", "XMIN", "XMAX", "COEFF"} <= t2):
        return None
    row = hdul[2].data[0]
    if str(row["FUNC"]).strip().lower() != "legendre":
        raise InputError(f"kurucz correction function {row['FUNC']!r} is not 'legendre'")
    return float(row["XMIN"]), float(row["XMAX"]), np.asarray(row["COEFF"], dtype=np.float64)


def _resolution(fh, path: str):
    hdr = fh.header
    for key, fmt in (("FWHM", "{:r}"), ("RESOLVPW", "R:{:r}")):
        if key in hdr:
            v = hdr[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise InputError(f"{path} [{fh.name}] {key} = {v!r} must be a number >= 0")
            return float(v) if key == "FWHM" else f"R:{float(v)!r}"
    return 0.0


def _positive_span(wave, flux, names, path: str):
    """The pixels where every model is positive, as one contiguous span; a gap inside is an InputError."""
    good = np.all(np.isfinite(flux) & (flux > 0), axis=0)
    if not good.any():
        raise InputError(f"{path}: no pixel where every model's flux is positive")
    i0, i1 = int(np.argmax(good)), int(good.size - np.argmax(good[::-1]))
    inside = flux[:, i0:i1]
    bad = ~(np.isfinite(inside) & (inside > 0))
    if bad.any():
        m = int(np.flatnonzero(bad.any(axis=1))[0])
        j = int(np.flatnonzero(bad[m])[0]) + i0
        raise InputError(f"{path}: model {names[m]!r} has flux {float(flux[m, j])!r} at {wave[j]:.2f} Å, inside the "
                         f"range {wave[i0]:.2f}-{wave[i1 - 1]:.2f} Å where the other pixels are positive")
    return slice(i0, i1)


def read_fits_grid(path) -> FitsGridFile:
    """Read a FITS template grid (the generic layout or SDSS's Kurucz file; see the module docstring)."""
    path = os.fspath(path)
    hdul, sha = _open(path)
    with hdul:
        fh = _flux_hdu(hdul, path)
        flux = np.asarray(fh.data, dtype=np.float64)
        n_model, n_pix = flux.shape
        params, names, _ = _params_table(hdul, path, n_model)
        wave, medium = _wavelengths(hdul, fh, path, n_pix)
        corr = _kurucz_correction(hdul)
        layout, notes, res = "generic", (), _resolution(fh, path)
        if corr is not None:
            from numpy.polynomial import legendre

            xmin, xmax, coeff = corr
            flux = flux / legendre.legval(2.0 * (wave - xmin) / (xmax - xmin) - 1.0, coeff)
            layout, res = "sdss-kurucz", KURUCZ_RESOLUTION
            medium = medium or "vacuum"
            notes = ("fluxes divided by the file's empirical Legendre correction (idlspec2d kurucz_restore)",)
    if medium is None:
        raise InputError(f"{path}: the wavelengths' medium is not stated; add AIRORVAC = 'air' or 'vac' to the "
                         "header of the flux (or wavelength) HDU, or use CTYPE1 = 'AWAV' / 'WAVE'")
    if wave.size > 1 and np.all(np.diff(wave) < 0):
        wave, flux = wave[::-1].copy(), flux[:, ::-1].copy()
    if not np.all(np.diff(wave) > 0):
        raise InputError(f"{path}: wavelengths are not strictly monotonic")
    _, first = np.unique(params, axis=0, return_index=True)
    if first.size != n_model:
        dup = sorted(set(range(n_model)) - set(first.tolist()))[0]
        raise InputError(f"{path}: model {names[dup]!r} repeats the parameters {params[dup].tolist()} of another")
    span = _positive_span(wave, flux, names, path)
    return FitsGridFile(path=os.path.abspath(path), wave=wave[span].copy(), flux=flux[:, span].copy(), params=params,
                        medium=medium, resolution_fwhm=res, names=names, layout=layout, sha256=sha, notes=notes)


def _select(g: FitsGridFile, ranges: dict) -> np.ndarray:
    keep = np.ones(g.params.shape[0], dtype=bool)
    for k, axis in enumerate(_COLUMNS):
        r = ranges.get(axis)
        if r is not None:
            lo, hi = (r, r) if isinstance(r, (int, float)) else (float(r[0]), float(r[1]))
            tol = 1e-6 * max(1.0, abs(lo), abs(hi))
            keep &= (g.params[:, k] >= lo - tol) & (g.params[:, k] <= hi + tol)
    if not keep.any():
        raise InputError(f"{g.path}: no model matches the selection {ranges}")
    return keep


_BOSZ_ONLY = ("carbon", "vturb", "atmos", "bosz_resolution")


def prepare_fits_grid(src, *, teff=None, logg=None, mh=None, alpha=None, wave=None, bands=DEFAULT_BANDS,
                      vmax=DEFAULT_VMAX, dlnlam=None, medium="air", fwhm=None, fwhm_poly=None, resolution=None,
                      convolve=False, truncate=4.0, backend=None, block_size=64, **bosz_only) -> TemplateGrid:
    """A FITS grid as a TemplateGrid on a log-uniform working grid in ``medium``.

    The window is :func:`~gpucal.templates.prepare.needed_wave_range` of the
    frame range ``wave``, ``bands``, ±``vmax`` km/s and the LSF ``fwhm`` /
    ``fwhm_poly`` / ``resolution``. Δlnλ is the grid's own (log-uniform files)
    or its coarsest step inside the window; the flux is resampled
    flux-conservingly. ``convolve`` (``gpucal templates prepare --fwhm``):
    the grid is stored convolved to that LSF (its own resolution removed in
    quadrature) and ``resolution_fwhm`` is the LSF's spec; otherwise it keeps
    its own resolution. BOSZ-only selections (carbon, vturb, atmos,
    bosz_resolution) are refused when given; ``workers``/``progress`` ignored.
    """
    from .prepare import _convolve_grid, _has_lsf, _lsf_args, _lsf_extension

    t0 = time.perf_counter()
    given = sorted(k for k in _BOSZ_ONLY if bosz_only.get(k) is not None)
    if given:
        raise InputError(f"{src}: {', '.join(given)} select BOSZ files; a FITS grid has no such parameter")
    if medium not in ("air", "vacuum"):
        raise InputError(f"medium must be 'air' or 'vacuum', got {medium!r}")
    lsf = _lsf_args(fwhm, fwhm_poly, resolution)
    convolve = bool(convolve) and _has_lsf(lsf)
    g = read_fits_grid(src)
    sel = {"teff": teff, "logg": logg, "mh": mh, "alpha": alpha}
    keep = _select(g, sel)
    frame = DEFAULT_FRAME_RANGE if wave is None else (float(wave[0]), float(wave[1]))
    lo, hi = needed_wave_range(wave, bands=bands, vmax=vmax, **lsf)
    native = convert_medium(g.wave, g.medium, medium)
    _check_native_covers(native, os.fspath(src), (lo, hi), frame, bands, vmax)
    d = _working_step(g.wave, native, lo, hi, dlnlam)
    ext = _lsf_extension(os.fspath(src), g.resolution_fwhm, lsf, lo, hi, d, truncate) if convolve else 0
    wave_out = _working_grid(native, os.fspath(src), lo, hi, d, ext)
    flux = resample_flux(native, g.flux[keep], wave_out, name=os.fspath(src)).astype(np.float32)
    res_spec, backend_name = g.resolution_fwhm, None
    if convolve:
        from ..fitting.lsf import resolution_spec

        flux, _, wave_out, backend_name = _convolve_grid(flux, flux, wave_out, ext, g.resolution_fwhm, lsf,
                                                         truncate, backend, block_size)
        res_spec = resolution_spec(**lsf)
    meta = _meta(g, keep, sel, (lo, hi), frame, wave_out, d, medium, dlnlam, bands, vmax, lsf, convolve,
                 backend_name, res_spec, t0)
    return TemplateGrid(params=g.params[keep].copy(), wave=wave_out, flux=flux, continuum=None, medium=medium,
                        resolution_fwhm=res_spec, meta=meta)


def _meta(g, keep, sel, window, frame, wave_out, d, medium, dlnlam, bands, vmax, lsf, convolve, backend_name,
          res_spec, t0) -> dict:
    """The prepared grid's provenance (the cache's sidecar): the file and its SHA-256, selection, grid, LSF."""
    st = os.stat(g.path)
    files = [{"path": os.path.basename(g.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": g.sha256}]
    config = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "kind": "FITS grid", "selection": sel,
              "window": list(window), "dlnlam": dlnlam, "medium": medium, "bands": list(bands or ()), "vmax": vmax,
              "lsf": lsf if convolve else None}
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "gpucal_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"kind": "FITS grid", "layout": g.layout, "root": os.path.dirname(g.path), "files": files,
                   "wave_file": None, "file_medium": g.medium, "notes": list(g.notes)},
        "selection": sel, "models": [n for n, k in zip(g.names, keep) if k],
        "flux_unit": "erg/(s cm2 Angstrom)", "flux_kind": "as in the file (arbitrary absolute scale allowed)",
        "grid": {"wave_min": float(wave_out[0]), "wave_max": float(wave_out[-1]), "n_wave": int(wave_out.size),
                 "dlnlam": d, "medium": medium, "needed_range": list(window), "frame_range": list(frame),
                 "bands": list(bands or ()), "vmax_kms": vmax},
        "lsf": {**lsf, "convolved": convolve, "backend": backend_name, "template_fwhm": g.resolution_fwhm},
        "resolution_fwhm": res_spec, "n_templates": int(keep.sum()),
        "config_sha256": _sha256_text(config),
        "inputs_sha256": _sha256_text({"files": [(f["path"], f["sha256"]) for f in files], "config": config}),
        "timing_s": {"total": time.perf_counter() - t0},
    }


def write_fits_grid(path, wave, flux, params, *, medium, wcs=None, fwhm=None, names=None, overwrite=False) -> str:
    """Write models in the generic FITS grid layout (to convert another library; tests and benchmarks).

    wave (n_pix,) Å in ``medium``; flux (n_model, n_pix); params (n_model, 4).
    ``wcs=None`` writes a ``WAVE`` image HDU; ``"log10"`` (the wavelengths must
    be log10-uniform) an IRAF log-linear WCS (``DC-FLAG = 1``); ``"linear"`` a
    linear ``CTYPE1 = 'WAVE'/'AWAV'`` WCS. ``fwhm`` (Å) goes in the FWHM keyword.
    """
    from astropy.io import fits
    from astropy.table import Table

    wave = np.asarray(wave, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float32)
    prim = fits.PrimaryHDU(flux)
    prim.header["AIRORVAC"] = {"air": "air", "vacuum": "vac"}[medium]
    prim.header["BUNIT"] = "erg/(s cm2 Angstrom)"
    if fwhm is not None:
        prim.header["FWHM"] = float(fwhm)
    hdus = [prim]
    if wcs == "log10":
        step = float(np.log10(wave[-1] / wave[0]) / (wave.size - 1))
        prim.header.update({"CRVAL1": float(np.log10(wave[0])), "CD1_1": step, "CRPIX1": 1, "CTYPE1": "LINEAR",
                            "DC-FLAG": 1})
    elif wcs == "linear":
        prim.header.update({"CRVAL1": float(wave[0]), "CDELT1": float((wave[-1] - wave[0]) / (wave.size - 1)),
                            "CRPIX1": 1, "CTYPE1": "AWAV" if medium == "air" else "WAVE", "CUNIT1": "Angstrom"})
    else:
        w = fits.ImageHDU(wave, name="WAVE")
        w.header["BUNIT"] = "Angstrom"
        hdus.append(w)
    p = np.asarray(params, dtype=np.float64)
    cols = {"TEFF": p[:, 0], "LOGG": p[:, 1], "MH": p[:, 2], "ALPHA": p[:, 3]}
    if names is not None:
        cols["MODEL"] = list(names)
    hdus.append(fits.BinTableHDU(Table(cols), name="PARAMS"))
    fits.HDUList(hdus).writeto(os.fspath(path), overwrite=overwrite)
    return os.fspath(path)

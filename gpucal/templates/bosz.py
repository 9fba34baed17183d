"""BOSZ 2024 model spectra: file names, directory index, reader (host NumPy edge module).

Step of the mission: turn the released BOSZ 2024 files into arrays the grid
preparation (:mod:`gpucal.templates.prepare`) resamples and convolves and
:mod:`gpucal.templates.cache` caches.

The release, as this module reads it
    * file names ``bosz2024_<atmos>_t<Teff>_g<±logg>_m<±MH>_a<±alpha>_c<±carbon>
      _v<vturb>_r<R>_resam.txt.gz`` (e.g. ``bosz2024_mp_t5750_g+4.50_m-0.25_a+0.00
      _c+0.00_v1_r10000_resam.txt.gz``); logg with one or two decimals, any
      atmosphere code; the original-resolution products are ``r`` ``orig``
      (``_rorig_resam`` or ``_rorig_noresam``);
    * directory tree: ``bosz2024_wave_r<R>.txt`` (one wavelength per line, Å)
      at the root, spectra under ``r<R>/m<±MH>/``; ``rorig/m<±MH>/`` for the
      original resolution;
    * ``r<R>`` spectra: gzip text, two columns per line, the Eddington flux H
      and the continuum H (surface flux F = 4πH, erg/s/cm²/Å), one line per
      wavelength of the shared wavelength file, whose length the line count
      must match;
    * ``rorig`` spectra: three columns, wavelength (Å), H, continuum H, each
      file with its own (not necessarily uniform) wavelengths;
    * resolution: an ``r<R>`` spectrum has FWHM = λ/R (resolution spec
      ``"R:<R>"``, see :mod:`gpucal.fitting.lsf`); ``rorig`` is treated as
      infinitely sharp (0.0).

Wavelength medium
    BOSZ wavelengths follow the IAU convention (NOTES): air above 2000 Å,
    vacuum below (``BOSZ_MEDIUM = "air"``). :func:`gpucal.units.vacuum_to_air`
    is the IAU standard formula (Morton 2000, from Birch & Downs 1994) and
    :func:`gpucal.units.air_to_vacuum` its exact inverse (fixed-point iteration
    of the same formula, so a round trip returns the input to < 1e-9 Å); both
    leave λ < 2000 Å unchanged. :func:`gpucal.units.convert_medium` moves a
    grid to the frame's medium before it is resampled.

Writers of the same format (:func:`write_bosz_spectrum`, :func:`write_wave_file`,
:func:`write_demo_bosz_tree`: gpucal's analytic demo models as a BOSZ tree)
serve the tests and benchmarks.

Units: wavelengths in Å; the reader returns surface flux F = 4πH in
erg/s/cm²/Å. Errors name the file: a missing, truncated, corrupt or
mis-shaped file is an InputError, a file that does not cover the requested
wavelengths a CoverageError. A line read that is not all finite numbers
(``nan nan``, ``-1e30 abc``, a short line) is an InputError naming the file
and the line number in the file (``#`` header lines counted); only the lines
inside the requested window are parsed.
"""

from __future__ import annotations

import bisect
import gzip
import hashlib
import io
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from ..errors import CoverageError, InputError
from ..units import FWHM_PER_SIGMA

__all__ = [
    "BOSZ_MEDIUM",
    "FOUR_PI",
    "BoszModel",
    "BoszIndex",
    "parse_bosz_name",
    "bosz_file_name",
    "bosz_wave_file_name",
    "bosz_subdir",
    "index_bosz",
    "read_wave_file",
    "read_bosz_spectrum",
    "BoszSpectrum",
    "write_bosz_spectrum",
    "write_wave_file",
    "write_demo_bosz_tree",
]

logger = logging.getLogger("gpucal.templates.bosz")

#: Wavelength medium of BOSZ files: air above 2000 Å, vacuum below (IAU convention).
BOSZ_MEDIUM = "air"
FOUR_PI = 4.0 * math.pi

_NAME_RE = re.compile(
    r"^bosz2024_(?P<atmos>[A-Za-z0-9]+)_t(?P<teff>\d+(?:\.\d+)?)_g(?P<logg>[+-]?\d+\.\d{1,2})"
    r"_m(?P<mh>[+-]\d+\.\d+)_a(?P<alpha>[+-]\d+\.\d+)_c(?P<carbon>[+-]\d+\.\d+)"
    r"_v(?P<vturb>\d+(?:\.\d+)?)_r(?P<res>\d+|orig)_(?P<kind>resam|noresam)\.txt(?P<gz>\.gz)?$"
)
_WAVE_RE = re.compile(r"^bosz2024_wave_r(?P<res>\d+)\.txt(?:\.gz)?$")
_RDIR_RE = re.compile(r"^r(\d+|orig)$")


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class BoszModel:
    """One BOSZ spectrum file and its parameters.

    resolution : int R of an ``r<R>`` file, or None for ``rorig``.
    """

    path: str
    atmos: str
    teff: float
    logg: float
    mh: float
    alpha: float
    carbon: float
    vturb: float
    resolution: int | None

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def params(self) -> tuple:
        """(Teff, logg, [M/H], [α/M]) as gpucal's grids order them."""
        return (self.teff, self.logg, self.mh, self.alpha)


def parse_bosz_name(path) -> BoszModel:
    """Parameters of a BOSZ 2024 spectrum from its file name (InputError naming it if malformed)."""
    path = os.fspath(path)
    m = _NAME_RE.match(os.path.basename(path))
    if m is None:
        raise InputError(
            f"{path}: not a BOSZ 2024 spectrum name (expected bosz2024_<atmos>_t<Teff>_g+<logg>_m<±MH>"
            "_a<±alpha>_c<±carbon>_v<vturb>_r<R>_resam.txt.gz)"
        )
    g = m.groupdict()
    res = None if g["res"] == "orig" else int(g["res"])
    return BoszModel(path=path, atmos=g["atmos"], teff=float(g["teff"]), logg=float(g["logg"]),
                     mh=float(g["mh"]), alpha=float(g["alpha"]), carbon=float(g["carbon"]),
                     vturb=float(g["vturb"]), resolution=res)


def _signed(v: float) -> str:
    return f"{v:+.2f}"


def bosz_file_name(*, teff, logg, mh, alpha=0.0, carbon=0.0, vturb=1, resolution=10000, atmos="mp") -> str:
    """The release's file name for these parameters (``resolution=None``: ``rorig``)."""
    v = float(vturb)
    vt = str(int(v)) if v.is_integer() else f"{v:g}"
    res = "orig" if resolution is None else str(int(resolution))
    kind = "noresam" if resolution is None else "resam"
    return (f"bosz2024_{atmos}_t{int(round(float(teff)))}_g{_signed(float(logg))}_m{_signed(float(mh))}"
            f"_a{_signed(float(alpha))}_c{_signed(float(carbon))}_v{vt}_r{res}_{kind}.txt.gz")


def bosz_wave_file_name(resolution) -> str:
    """``bosz2024_wave_r<R>.txt``, the wavelength file shared by every ``r<R>`` spectrum."""
    return f"bosz2024_wave_r{int(resolution)}.txt"


def bosz_subdir(*, mh, resolution=10000) -> str:
    """``r<R>/m<±MH>`` (or ``rorig/m<±MH>``), where the release keeps a spectrum."""
    res = "orig" if resolution is None else str(int(resolution))
    return os.path.join(f"r{res}", f"m{_signed(float(mh))}")


# --------------------------------------------------------------------------- index


def _as_range(value, what: str):
    """None | scalar | (min, max) -> None or (lo, hi) floats (inclusive)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return (float(value), float(value))
    try:
        lo, hi = value
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise InputError(f"{what} selection must be a number or (min, max), got {value!r}") from None
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise InputError(f"{what} selection needs min <= max, got {value!r}")
    return (lo, hi)


def _in(v: float, rng) -> bool:
    if rng is None:
        return True
    tol = 1e-6 * max(1.0, abs(v))
    return rng[0] - tol <= v <= rng[1] + tol


@dataclass(frozen=True)
class BoszIndex:
    """The BOSZ spectra of one resolution found under a directory tree.

    root : the directory indexed; resolution : R, or None for ``rorig``;
    wave_file : the shared ``bosz2024_wave_r<R>.txt`` (None for ``rorig``);
    models : BoszModel tuple sorted by (Teff, logg, [M/H], [α/M], carbon, vturb, atmos).
    """

    root: str
    resolution: int | None
    wave_file: str | None
    models: tuple = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.models)

    @property
    def template_fwhm(self):
        """Resolution spec of these spectra: ``"R:<R>"`` (FWHM = λ/R), or 0.0 for ``rorig``."""
        return 0.0 if self.resolution is None else f"R:{float(self.resolution)!r}"

    @property
    def params(self) -> np.ndarray:
        """(n, 4) [Teff, logg, [M/H], [α/M]]."""
        return np.array([m.params for m in self.models], dtype=np.float64).reshape(-1, 4)

    def axes(self) -> dict:
        """Sorted distinct values of every parameter (for messages and sidecars)."""
        keys = ("teff", "logg", "mh", "alpha", "carbon", "vturb", "atmos")
        return {k: sorted({getattr(m, k) for m in self.models}) for k in keys}

    def select(self, *, teff=None, logg=None, mh=None, alpha=None, carbon=None, vturb=None, atmos=None) -> "BoszIndex":
        """The models inside every given inclusive range (a scalar selects one value).

        ``atmos`` is a code or a sequence of codes in order of preference: where
        two models differ only by atmosphere code the earlier code is kept.
        Without ``atmos``, such duplicates (and any other two models with the
        same [Teff, logg, [M/H], [α/M]]) are an InputError saying which
        selection (carbon, vturb, atmos) to narrow.
        """
        ranges = {k: _as_range(v, k) for k, v in
                  dict(teff=teff, logg=logg, mh=mh, alpha=alpha, carbon=carbon, vturb=vturb).items()}
        codes = None
        if atmos is not None:
            codes = [atmos] if isinstance(atmos, str) else [str(a) for a in atmos]
        keep = [m for m in self.models
                if all(_in(getattr(m, k), r) for k, r in ranges.items())
                and (codes is None or m.atmos in codes)]
        if not keep:
            ax = self.axes()
            have = "; ".join(f"{k} {_fmt_axis(v)}" for k, v in ax.items())
            want = ", ".join(f"{k} {r[0]:g}:{r[1]:g}" for k, r in ranges.items() if r is not None)
            if codes is not None:
                want += (", " if want else "") + f"atmos {','.join(codes)}"
            raise InputError(f"{self.root}: no BOSZ r{_rname(self.resolution)} model matches {want or 'the selection'} "
                             f"(available: {have})")
        by_params: dict = {}
        for m in keep:
            by_params.setdefault(m.params, []).append(m)
        out = []
        for p, group in by_params.items():
            if len(group) > 1 and codes is not None:
                rank = {c: i for i, c in enumerate(codes)}
                best = min(rank[m.atmos] for m in group)
                group = [m for m in group if rank[m.atmos] == best]
            if len(group) > 1:
                names = ", ".join(m.name for m in group[:4])
                raise InputError(
                    f"{self.root}: {len(group)} BOSZ models share Teff={p[0]:g} logg={p[1]:g} [M/H]={p[2]:+g} "
                    f"[α/M]={p[3]:+g} ({names}); narrow the selection with carbon, vturb or atmos "
                    "(--carbon, --vturb, --atmos CODE[,CODE] in order of preference)"
                )
            out.append(group[0])
        out.sort(key=_sort_key)
        return replace(self, models=tuple(out))


def _rname(res) -> str:
    return "orig" if res is None else str(res)


def _fmt_axis(values) -> str:
    if not values:
        return "-"
    if isinstance(values[0], str):
        return ",".join(values)
    return f"{values[0]:g}..{values[-1]:g} ({len(values)})"


def _sort_key(m: BoszModel):
    return (m.teff, m.logg, m.mh, m.alpha, m.carbon, m.vturb, m.atmos)


def index_bosz(root, *, resolution=None) -> BoszIndex:
    """Index the BOSZ 2024 spectra under ``root`` (the release layout, or one ``r<R>`` folder).

    Parameters
    ----------
    root : directory holding ``bosz2024_wave_r<R>.txt`` and ``r<R>/m<±MH>/``
        folders (or ``rorig/``), searched recursively; ``root`` may also be an
        ``r<R>`` folder itself, whose wavelength file is then looked for in
        the parent.
    resolution : int R, ``"orig"``, or None (the only resolution present).

    Raises
    ------
    InputError
        ``root`` is not a directory, holds no BOSZ spectrum, holds several
        resolutions and none was chosen, or the shared wavelength file of an
        ``r<R>`` grid is missing.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise InputError(f"{root}: BOSZ template directory not found")
    want = None if resolution is None else ("orig" if str(resolution).lower() in ("orig", "rorig", "none") else str(int(resolution)))
    models: dict = {}
    waves: dict = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fname in sorted(filenames):
            if not fname.startswith("bosz2024_"):
                continue
            full = os.path.join(dirpath, fname)
            wm = _WAVE_RE.match(fname)
            if wm:
                waves.setdefault(wm.group("res"), []).append(full)
                continue
            if _NAME_RE.match(fname) is None:
                logger.warning("%s: not a BOSZ 2024 spectrum name; ignored", full)
                continue
            model = parse_bosz_name(full)
            models.setdefault(_rname(model.resolution), []).append(model)
    if not models:
        raise InputError(f"{root}: no BOSZ 2024 spectra (bosz2024_*_r<R>_resam.txt.gz) found")
    found = sorted(models, key=lambda r: (r == "orig", int(r) if r != "orig" else 0))
    if want is None:
        if len(found) > 1:
            raise InputError(f"{root}: BOSZ spectra at several resolutions (r{', r'.join(found)}); choose one")
        want = found[0]
    if want not in models:
        raise InputError(f"{root}: no BOSZ r{want} spectra (found r{', r'.join(found)})")
    res = None if want == "orig" else int(want)
    wave_file = None
    if res is not None:
        candidates = sorted(waves.get(want, []), key=lambda p: (p.count(os.sep), p))
        if not candidates and _RDIR_RE.match(os.path.basename(root)):
            parent = os.path.join(os.path.dirname(root), bosz_wave_file_name(res))
            if os.path.isfile(parent):
                candidates = [parent]
        if not candidates:
            raise InputError(
                f"{root}: the wavelength file {bosz_wave_file_name(res)} of the r{res} spectra is missing "
                "(the release keeps it at the top of the tree, beside the r<R>/ folders)"
            )
        wave_file = candidates[0]
    return BoszIndex(root=root, resolution=res, wave_file=wave_file,
                     models=tuple(sorted(models[want], key=_sort_key)))


# --------------------------------------------------------------------------- media


# --------------------------------------------------------------------------- reader


@dataclass
class BoszSpectrum:
    """One spectrum read from a BOSZ file (host float64 arrays).

    wave : (n,) Å in the file's medium; flux, continuum : (n,) surface flux
    F = 4πH, erg/s/cm²/Å; sha256 : hex digest of the file's bytes as read.
    """

    wave: np.ndarray
    flux: np.ndarray
    continuum: np.ndarray
    sha256: str = ""
    path: str = ""


def _read_bytes(path: str) -> tuple:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{path}: cannot read BOSZ file ({exc.strerror or exc})") from None
    digest = hashlib.sha256(raw).hexdigest()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise InputError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    return raw, digest


def _line_bounds(data: bytes, path: str):
    """Start and end byte offsets of the data lines (blank lines and leading '#' lines skipped)."""
    end = len(data.rstrip())
    if end == 0:
        raise InputError(f"{path}: empty file")
    nl = np.flatnonzero(np.frombuffer(data, dtype=np.uint8, count=end) == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [end]])
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    k = 0
    while k < starts.size and data[starts[k]:ends[k]].lstrip().startswith(b"#"):
        k += 1
    starts, ends = starts[k:], ends[k:]
    if starts.size == 0:
        raise InputError(f"{path}: no data lines")
    return starts, ends


def _file_line(data: bytes, starts, k: int) -> int:
    """1-based line number in the file of data line ``k`` (comment and blank lines counted)."""
    return data.count(b"\n", 0, int(starts[k])) + 1


def _bad_line(data: bytes, starts, ends, i0: int, i1: int, ncol: int, path: str) -> InputError:
    """The error naming the first line in ``[i0, i1)`` that is not ``ncol`` finite numbers."""
    for k in range(i0, i1):
        text = data[int(starts[k]):int(ends[k])]
        tokens = text.split()
        shown = text.decode("ascii", "replace").strip()[:80]
        line = _file_line(data, starts, k)
        if len(tokens) != ncol:
            return InputError(f"{path}: malformed line {line}: expected {ncol} columns, "
                              f"found {len(tokens)} ({shown!r})")
        for tok in tokens:
            try:
                value = float(tok)
            except ValueError:
                word = tok.decode("ascii", "replace")
                return InputError(f"{path}: malformed line {line}: non-numeric value {word!r} ({shown!r})")
            if not math.isfinite(value):
                return InputError(f"{path}: non-finite value on line {line} ({shown!r})")
    return InputError(f"{path}: malformed lines {_file_line(data, starts, i0)}-{_file_line(data, starts, i1 - 1)}")


def _parse_rows(data: bytes, starts, ends, i0: int, i1: int, ncol: int, path: str) -> np.ndarray:
    """Lines ``[i0, i1)`` as an ``(i1 - i0, ncol)`` float64 array of finite numbers.

    A non-numeric, non-finite or short line is an InputError naming the file
    and its line number (counted in the file, comment lines included).
    """
    chunk = data[int(starts[i0]):int(ends[i1 - 1])]
    try:
        arr = np.loadtxt(io.BytesIO(chunk), dtype=np.float64, ndmin=2)
    except ValueError:
        raise _bad_line(data, starts, ends, i0, i1, ncol, path) from None
    if arr.shape != (i1 - i0, ncol) or not np.all(np.isfinite(arr)):
        raise _bad_line(data, starts, ends, i0, i1, ncol, path)
    return arr


def read_wave_file(path) -> np.ndarray:
    """The shared wavelengths (Å, file medium) of a ``bosz2024_wave_r<R>.txt`` file."""
    path = os.fspath(path)
    data, _ = _read_bytes(path)
    starts, ends = _line_bounds(data, path)
    arr = _parse_rows(data, starts, ends, 0, starts.size, 1, path)[:, 0]
    if arr.size < 2 or not np.all(np.diff(arr) > 0) or arr[0] <= 0:
        raise InputError(f"{path}: wavelengths must be positive and strictly increasing")
    return arr


def read_bosz_spectrum(path, *, wave=None, window=None, wave_file=None) -> BoszSpectrum:
    """Read one BOSZ spectrum, parsing only the lines inside ``window``.

    Parameters
    ----------
    path : a ``r<R>`` file (two columns H, H_cont, one line per entry of
        ``wave``) or an ``rorig`` file (three columns λ, H, H_cont; ``wave`` None).
    wave : (n,) the shared wavelengths (Å) of an ``r<R>`` file.
    window : (lo, hi) Å in the file's medium, or None for every line. The
        lines kept run from the last wavelength ≤ lo to the first ≥ hi, so
        the result brackets the window.
    wave_file : name of the shared wavelength file, for messages.

    Returns
    -------
    BoszSpectrum with F = 4πH and the continuum 4πH_cont, and the file's sha256.

    Raises
    ------
    InputError
        Missing, truncated or corrupt file, wrong column count, a line count
        that does not match ``wave``, malformed or non-finite numbers.
    CoverageError
        The file's wavelengths do not reach both ends of ``window``.
    """
    path = os.fspath(path)
    data, digest = _read_bytes(path)
    starts, ends = _line_bounds(data, path)
    n = starts.size
    first = data[int(starts[0]):int(ends[0])].split()
    ncol = len(first)
    if wave is not None:
        wave = np.asarray(wave, dtype=np.float64)
        if ncol != 2:
            raise InputError(f"{path}: expected 2 columns (H, continuum H) per line, found {ncol}")
        if n != wave.size:
            src = wave_file or "the shared wavelength file"
            raise InputError(f"{path}: {n} lines but {src} has {wave.size} wavelengths (truncated or mis-shaped file)")

        def wave_at(k):
            return wave[k]
    else:
        if ncol != 3:
            raise InputError(f"{path}: expected 3 columns (wavelength, H, continuum H) per line, found {ncol}")

        def wave_at(k):
            try:
                value = float(data[int(starts[k]):int(ends[k])].split()[0])
            except (ValueError, IndexError):
                value = math.nan
            if not math.isfinite(value):  # a NaN would steer the window search wrong
                raise _bad_line(data, starts, ends, k, k + 1, 3, path)
            return value

    w_first, w_last = wave_at(0), wave_at(n - 1)
    if window is None:
        i0, i1 = 0, n
    else:
        lo, hi = float(window[0]), float(window[1])
        if w_first > lo or w_last < hi:
            missing = []
            if w_first > lo:
                missing.append(f"{lo:.2f}-{w_first:.2f} Å")
            if w_last < hi:
                missing.append(f"{w_last:.2f}-{hi:.2f} Å")
            raise CoverageError(f"{path}: covers {w_first:.2f}-{w_last:.2f} Å, not {lo:.2f}-{hi:.2f} Å; "
                                f"missing {', '.join(missing)}")
        # binary search on the wavelengths: rorig files parse only ~log2(n) lines to find the window
        i0 = max(bisect.bisect_right(range(n), lo, key=wave_at) - 1, 0)
        i1 = min(bisect.bisect_left(range(n), hi, key=wave_at) + 1, n)
    arr = _parse_rows(data, starts, ends, i0, i1, ncol, path)
    if wave is not None:
        w, h, hc = wave[i0:i1], arr[:, 0], arr[:, 1]
    else:
        w, h, hc = arr[:, 0], arr[:, 1], arr[:, 2]
        if w.size > 1 and not np.all(np.diff(w) > 0):
            raise InputError(f"{path}: wavelengths are not strictly increasing")
    return BoszSpectrum(wave=np.array(w, dtype=np.float64), flux=FOUR_PI * h, continuum=FOUR_PI * hc,
                        sha256=digest, path=path)


# --------------------------------------------------------------------------- writer (fixtures, benchmarks)


def _format_rows(cols) -> bytes:
    arr = np.column_stack(cols)
    line = " ".join(["%.8e"] * arr.shape[1]) + "\n"
    return ((line * arr.shape[0]) % tuple(arr.ravel().tolist())).encode()


def write_wave_file(path, wave) -> str:
    """Write a ``bosz2024_wave_r<R>.txt`` file: one wavelength (Å) per line."""
    path = os.fspath(path)
    with open(path, "wb") as fh:
        fh.write(("\n".join(f"{v:.8f}" for v in np.asarray(wave, dtype=np.float64).tolist()) + "\n").encode())
    return path


def write_bosz_spectrum(path, eddington_flux, continuum, *, wave=None, compresslevel=6) -> str:
    """Write one spectrum in the release's format: gzip text, columns [λ,] H, H_cont.

    ``wave`` is written as a first column (the ``rorig`` format); without it
    the file has the two columns of an ``r<R>`` file.
    """
    path = os.fspath(path)
    cols = [eddington_flux, continuum] if wave is None else [wave, eddington_flux, continuum]
    with open(path, "wb") as fh:
        fh.write(gzip.compress(_format_rows(cols), compresslevel=compresslevel))
    return path


def write_demo_bosz_tree(root, *, teff, logg, mh, alpha=(0.0,), resolution=10000, wave_range=(3000.0, 11000.0),
                         dlnlam=1.0 / 20000.0, atmos="mp", carbon=0.0, vturb=1, compresslevel=1) -> list:
    """Write gpucal's analytic demo models as a BOSZ 2024 tree (for tests and benchmarks).

    Every node of teff × logg × mh × alpha gets a file in the release's
    layout and format: H = F/4π of :func:`gpucal.templates.demo.demo_grid` on
    a log-uniform air grid. ``resolution=R``: the models are convolved to
    FWHM = λ/R (a Gaussian in lnλ) and written as two columns beside a
    shared ``bosz2024_wave_r<R>.txt``; ``resolution=None``: ``rorig`` files
    with their own wavelength column, unconvolved, on a linear grid of
    about the same number of points. Returns the spectrum paths.
    """
    from scipy.ndimage import gaussian_filter1d

    from .demo import demo_grid, demo_template, demo_wave

    root = os.fspath(root)
    os.makedirs(root, exist_ok=True)
    grid = demo_grid(teff=teff, logg=logg, mh=mh, alpha=alpha, wave_range=wave_range, dlnlam=dlnlam)
    if resolution is None:
        n = demo_wave(wave_range, dlnlam).size
        wave = np.linspace(float(wave_range[0]), float(wave_range[1]), n)
        rows = [demo_template(*p, wave=wave, return_continuum=True) for p in grid.params]
        flux = np.stack([r[0] for r in rows])
        cont = np.stack([r[1] for r in rows])
    else:
        wave = np.asarray(grid.wave)
        sigma_pix = 1.0 / float(resolution) / FWHM_PER_SIGMA / float(dlnlam)
        flux = gaussian_filter1d(np.asarray(grid.flux), sigma_pix, axis=1, mode="nearest", truncate=6.0)
        cont = np.asarray(grid.continuum)
        write_wave_file(os.path.join(root, bosz_wave_file_name(resolution)), wave)
    paths = []
    for p, f, c in zip(grid.params, flux, cont):
        sub = os.path.join(root, bosz_subdir(mh=p[2], resolution=resolution))
        os.makedirs(sub, exist_ok=True)
        name = bosz_file_name(teff=p[0], logg=p[1], mh=p[2], alpha=p[3], carbon=carbon, vturb=vturb,
                              resolution=resolution, atmos=atmos)
        paths.append(write_bosz_spectrum(os.path.join(sub, name), f / FOUR_PI, c / FOUR_PI,
                                         wave=wave if resolution is None else None, compresslevel=compresslevel))
    return paths

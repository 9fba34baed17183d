"""Command line: ``gpucal demo | calibrate | info | templates | bench`` — every parser and handler.

Step: the top of the house. Parses arguments and calls the library:
:func:`gpucal.pipeline.calibrate_frame` (one frame),
:func:`gpucal.distributed.calibrate_frames` (several frames, ``--workers``,
``--scheduler``), :func:`gpucal.templates.cache.prepare_template_cache`
(``templates prepare``) and :mod:`gpucal.benchmark` (``bench``). It computes
nothing itself. One options builder, :func:`calibrate_options`, derived from
``calibrate_frame``'s signature, turns the parsed options into
``calibrate_frame`` keyword arguments for the single-frame run, the batch and
the demo alike, so no option can be dropped on one of the ways.

Errors gpucal raises on purpose (GpucalError) are printed as one line,
``gpucal: error: ...``, with exit status 2 and no traceback unless --debug.
An interrupt ends a command with one line too: SIGINT (Ctrl-C) prints
``gpucal: interrupted`` and exits 130, SIGTERM ``gpucal: terminated`` and
exits 143 (128 + the signal's number); files being written are removed.
Python warnings go to the debug log (shown with --debug only), also in the
LocalCluster worker processes that ``--workers`` starts. Heavy libraries
(numpy, matplotlib, dask) are imported by the handlers, never by ``--help``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import logging
import math
import os
import signal
import sys
import threading
import warnings
from pathlib import Path

from . import __version__
from .errors import GpucalError, InputError

__all__ = [
    "main",
    "build_parser",
    "calibrate_options",
    "PER_FRAME",
    "API_ONLY",
    "add_batch_options",
    "run_calibrate_many",
    "add_templates_parser",
    "run_templates_command",
    "add_bench_parser",
    "run_bench_command",
]

logger = logging.getLogger("gpucal")

#: calibrate_frame parameters that the commands fill themselves, per frame, never from an option
#: of the same name (``gpucal demo --out`` is a directory, not the output FITS).
PER_FRAME = ("frame", "out")

#: calibrate_frame parameters with no command-line option: Python API only, at their defaults on
#: the command line. A new calibrate_frame parameter must become an option or be listed here
#: (tests/test_cli.py checks it).
API_ONLY = {
    "mask_regions": "wavelength intervals (Å) left out of the fit; the command line uses the telluric bands",
    "bands": "catalogue bands to use; the command line uses every band the catalogue has",
    "match_radius": "catalogue cross-match radius (arcsec); the command line uses 1 arcsec",
    "dtype": "working precision of the scan; the command line uses float32",
    "max_phot_dev": "largest spread (mag) of a star's band residuals; the command line uses 0.3 mag",
    "command_line": "the command for the PROVENANCE table; the command line records its own (GPUCAL_COMMAND_LINE)",
}


# --------------------------------------------------------------------------- argument types


def _floats(text):
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _vrange(text):
    vals = text.split(":")
    if len(vals) != 3:
        raise argparse.ArgumentTypeError(f"expected VMIN:VMAX:STEP in km/s, got {text!r}")
    try:
        vmin, vmax, step = (float(v) for v in vals)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected VMIN:VMAX:STEP in km/s, got {text!r}") from None
    if not (math.isfinite(vmin) and math.isfinite(vmax) and math.isfinite(step) and vmin < vmax and step > 0):
        raise argparse.ArgumentTypeError(f"velocity range needs finite VMIN < VMAX and STEP > 0 (km/s), got {text!r}")
    return vmin, vmax, step


def _bound(text):
    """A positive number, or ``none`` (no bound)."""
    if text.strip().lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'none', got {text!r}")
    return value


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _range_arg(text):
    """``MIN:MAX`` (either may be empty: unbounded) or one value ``V`` (= ``V:V``)."""
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


def _workers_arg(text):
    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of workers or 'auto', got {text!r}")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse with gpucal's one-line errors (``gpucal: error: ...``, exit status 2)."""

    def error(self, message):
        self.exit(2, f"gpucal: error: {message} (see '{self.prog} --help')\n")


# Options whose value may start with '-' ("--vrange -500:500:5"): argparse would take it for an option.
_NEGATIVE_VALUE_OPTIONS = ("--vrange", "--fwhm-poly")


def _glue_negative_values(argv):
    """``--vrange -500:500:5`` -> ``--vrange=-500:500:5``."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _NEGATIVE_VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# --------------------------------------------------------------------------- parsers


def _add_common(p):
    p.add_argument("--backend", default=None,
                   help="numpy, cupy, torch or auto (default: $GPUCAL_BACKEND, else auto)")
    p.add_argument("--debug", action="store_true", help="show tracebacks, debug logging and Python warnings")


def _add_scan_options(p):
    p.add_argument("--vrange", type=_vrange, default=(-500.0, 500.0, 5.0), metavar="VMIN:VMAX:STEP",
                   help="radial-velocity scan in km/s (default -500:500:5)")
    p.add_argument("--max-memory", default=None,
                   help="scan working-set budget: bytes or with K/M/G suffix (default $GPUCAL_MAX_MEMORY, else 1G)")


def _add_calibration_options(p):
    """The calibrate_frame options ``demo`` and ``calibrate`` share (dest = the parameter's name)."""
    p.add_argument("--combine", choices=("weighted_mean", "floored_mean", "median"), default="floored_mean",
                   help="combination of the standards' vectors: inverse-variance mean, the same with each "
                        "star's model-error floor, or median (gpucal.calibration.combine)")
    p.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="Savitzky-Golay window in pixels for the combined vector (0 = none)")
    p.add_argument("--metric", choices=("chi2", "huber"), default="chi2",
                   help="template score: chi2, or huber (robust re-scoring of the best chi2 candidates)")
    _add_scan_options(p)
    p.add_argument("--min-stars", type=_positive_int, default=1, help="fewer usable standards is an error (default 1)")
    p.add_argument("--max-chi2-dof", type=float, default=None, help="exclude stars whose best chi2/dof exceeds this")
    # not given: calibrate_frame's own default (gpucal.calibration.verdicts; not imported here, --help
    # stays light); tests/test_sanity.py checks that these texts quote it
    p.add_argument("--max-frame-chi2-dof", type=_bound, default=argparse.SUPPRESS, metavar="X|none",
                   help="the frame is an error when every used star's chi2/dof exceeds this "
                        "(default 1000; 'none': no bound)")
    p.add_argument("--max-scatter", type=_bound, default=argparse.SUPPRESS, metavar="X|none",
                   help="the frame is an error when the used stars' vectors scatter more than this RMS "
                        "(default 0.2 = 20 %%; 'none': no bound)")
    p.add_argument("--ebv", type=float, default=None,
                   help="E(B-V) applied to the templates (F99, R_V=3.1) unless the catalogue has an ebv column")
    p.add_argument("--no-teff-prior", dest="teff_prior", action="store_false",
                   help="scan the whole grid even when colours give a Teff prior")
    p.add_argument("--fast", action="store_true", help="fast-path scan (velocity from fiducial templates first)")
    p.add_argument("--telluric", choices=("correct", "mask"), default="correct",
                   help="telluric bands: correct them with the absorption the standards measured (default; "
                        "pixels fewer than 3 standards measure or below 10%% transmission are flagged and "
                        "bridged) or mask them (bridged by the throughput around them)")
    p.add_argument("--recalibrate", action="store_true", default=argparse.SUPPRESS,
                   help="calibrate a frame that is already flux-calibrated (refused otherwise)")
    # issue 14: the continuous forward-model fit after the scan
    p.add_argument("--fit", choices=("continuous", "nodes"), default="continuous",
                   help="stellar parameters: continuous forward-model fit after the scan (default), "
                        "or the scan's node with one refinement step")


def add_batch_options(parser) -> None:
    """Add --workers, --scheduler, --batch-summary and --batch-panel to the calibrate sub-parser."""
    parser.add_argument("--workers", type=_workers_arg, nargs="?", const="auto", default=None, metavar="N",
                        help="run frames on a local dask cluster of N worker processes "
                             "(no N: one per core, or one per GPU with dask-cuda); needs gpucal[dist]")
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help="run frames on an existing dask cluster (tcp://host:8786 or a scheduler JSON file)")
    parser.add_argument("--batch-summary", default=None, metavar="JSON",
                        help="write the batch summary (all frames, night stability) here")
    parser.add_argument("--batch-panel", default=None, metavar="PNG",
                        help="write the night's panel (vectors, standards used/rejected, RMS) here")


def _add_calibrate_parser(sub):
    p = sub.add_parser("calibrate", help="flux-calibrate a reduced frame")
    p.add_argument("frames", nargs="+", metavar="FRAME",
                   help="reduced FITS frame(s); several run as a batch (see --workers)")
    p.add_argument("--templates", default="demo",
                   help="template grid: 'demo' (built in), a prepared cache, a BOSZ 2024 directory or a FITS grid "
                        "file (e.g. SDSS's kurucz_stds_v5.fit; docs/layouts.md)")
    p.add_argument("--photometry", default=None,
                   help="catalogue (CSV, ECSV, FITS or VOTable table: name, ra, dec, g, dg, r, dr, ...); in a batch "
                        "it may hold {stem} and {dir}, filled in from each frame's path; not given: the "
                        "magnitudes in the frame's fibre table")
    lsf = p.add_mutually_exclusive_group(required=True)
    lsf.add_argument("--fwhm", type=float, help="instrument FWHM in Å (constant)")
    lsf.add_argument("--fwhm-poly", type=_floats, help="FWHM(λ) = c0 + c1 λ + ... in Å, ascending coefficients")
    lsf.add_argument("--resolution", type=float, help="constant resolving power λ/Δλ")
    lsf.add_argument("--frame-lsf", action="store_true", default=None,
                     help="the frame's LSF image (FWHM in Å per fibre and pixel): exact in each star's vector, "
                          "the standards' median in the grid scan")
    p.add_argument("--out", default=None,
                   help="output FITS (default FRAME_fluxcal.fits); in a batch, a directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="write the JSON summary here; in a batch (several frames, --workers, --scheduler, "
                        "--batch-*) it is the batch summary, and giving it with --batch-summary is an error")
    p.add_argument("--qc", default=None, metavar="DIR",
                   help="write the QA images, index.html and report.json into DIR (in a batch: DIR/<stem>/, "
                        "and the night page DIR/index.html)")
    add_batch_options(p)
    _add_calibration_options(p)
    _add_common(p)
    # issue 15 (layouts)
    p.add_argument("--medium", choices=("air", "vacuum"), default=None,
                   help="wavelength medium of frames whose headers do not say (no WAVEMED/AIRORVAC, CTYPE1 neither "
                        "AWAV nor WAVE); without it such a frame is taken as air, with a warning")


def _add_demo_parser(sub):
    p = sub.add_parser("demo", help="simulate a frame, calibrate it with the built-in grid, report the error")
    p.add_argument("--out", default="gpucal-demo", help="output directory (default ./gpucal-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--no-plots", action="store_true", help="skip the QA images and the HTML report")
    _add_calibration_options(p)
    p.set_defaults(smooth=51)
    _add_common(p)


def add_templates_parser(sub) -> None:
    """Add ``templates prepare`` to the ``gpucal`` sub-command parsers."""
    # The defaults are gpucal.templates' DEFAULT_FRAME_RANGE, DEFAULT_BANDS and DEFAULT_VMAX, filled in by
    # the handler: importing gpucal.templates here would load NumPy for --help (test_workcache checks the texts).
    p = sub.add_parser("templates", help="template grids: prepare a BOSZ 2024 cache")
    tsub = p.add_subparsers(dest="templates_command", required=True)
    q = tsub.add_parser(
        "prepare", help="read a BOSZ 2024 directory into a memory-mappable cache",
        description="Read BOSZ 2024 spectra (release layout) in parallel, resample them onto one log-uniform "
                    "grid covering the frame, the photometric bands and the velocity scan, optionally convolve "
                    "them to the instrument LSF, and write a float32 .npy + JSON cache. Negative ranges need "
                    "'=': --mh=-1:0.5.")
    q.add_argument("src", help="BOSZ directory (bosz2024_wave_r<R>.txt and r<R>/m<±MH>/ folders) or a FITS grid "
                               "file (docs/layouts.md)")
    q.add_argument("--out", required=True, help="cache directory to write")
    for name, what in (("teff", "Teff (K)"), ("logg", "log g"), ("mh", "[M/H]"), ("alpha", "[α/M]"),
                       ("carbon", "[C/M]"), ("vturb", "microturbulence (km/s)")):
        q.add_argument(f"--{name}", type=_range_arg, default=None, metavar="MIN:MAX",
                       help=f"{what} to select: MIN:MAX (inclusive, either may be empty) or one value")
    q.add_argument("--atmos", default=None, help="atmosphere code(s), comma-separated, in order of preference")
    q.add_argument("--bosz-resolution", default=None, metavar="R|orig", help="subgrid r<R> (default: the only one)")
    lsf = q.add_mutually_exclusive_group()
    lsf.add_argument("--fwhm", type=float, help="instrument FWHM in Å (constant): store the grid convolved")
    lsf.add_argument("--fwhm-poly", type=_floats, help="FWHM(λ) = c0 + c1 λ + ... in Å, ascending coefficients")
    lsf.add_argument("--resolution", type=float, help="instrument resolving power λ/Δλ")
    q.add_argument("--wave", type=_range_arg, default=None, metavar="MIN:MAX",
                   help="frame wavelength range in Å (default 3500:10000); "
                        "the grid also covers the bands and the velocity scan")
    q.add_argument("--bands", default=None, help="photometric bands to cover (default g,r,i,z)")
    q.add_argument("--vmax", type=float, default=None, help="largest |RV| to allow for, km/s (default 500)")
    q.add_argument("--dlnlam", type=float, default=None, help="working-grid Δlnλ (default: the library's)")
    q.add_argument("--medium", choices=("air", "vacuum"), default="air", help="wavelength medium of the frame")
    q.add_argument("--workers", type=int, default=None, help="reader processes (default: the CPUs)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.add_argument("--overwrite", action="store_true", help="replace an existing cache")
    q.add_argument("--backend", default=None, help="array backend of the convolution")
    q.add_argument("--debug", action="store_true", help="show tracebacks, debug logging and Python warnings")
    _add_templates_cache_parser(tsub)


def _add_templates_cache_parser(tsub) -> None:
    """``gpucal templates cache list|prune``: the working-grid cache (gpucal.workcache)."""
    c = tsub.add_parser("cache", help="list or prune the working-grid cache (grids prepared per instrument setting)",
                        description="The working-grid cache keeps each template grid convolved to an instrument "
                                    "LSF and resampled to a frame's wavelength grid, and each grid's colour "
                                    "relations ($GPUCAL_WORK_CACHE: a directory, 'memory' or 'off'; default "
                                    "$GPUCAL_CACHE_DIR/working or ~/.cache/gpucal/templates/working).")
    csub = c.add_subparsers(dest="cache_command", required=True)
    for name, what in (("list", "list the entries: kind, size, last use, templates, LSF, pixels"),
                       ("prune", "remove entries unused for --older-than days, or beyond --keep in all, or --all")):
        q = csub.add_parser(name, help=what)
        q.add_argument("--dir", default=None, help="cache directory (default: see 'gpucal templates cache --help')")
        q.add_argument("--debug", action="store_true", help="show tracebacks, debug logging and Python warnings")
        if name == "prune":
            q.add_argument("--older-than", type=float, default=None, metavar="DAYS", help="last used before this")
            q.add_argument("--keep", default=None, metavar="SIZE",
                           help="keep the most recently used entries up to SIZE in all (bytes or K/M/G)")
            q.add_argument("--all", action="store_true", help="remove every entry")
            q.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")


def add_bench_parser(sub):
    """Add ``gpucal bench`` (the grid scan against the reference loop and a plain matrix product)."""
    p = sub.add_parser("bench", help="time the grid scan against the reference loop and a plain matrix product")
    p.add_argument("--stars", type=int, default=32, help="simulated standards (default 32)")
    p.add_argument("--templates", type=int, default=520,
                   help="grid size; above 520 the demo grid is tiled with jittered copies (default 520)")
    p.add_argument("--ref-templates", type=int, default=None,
                   help="templates the reference loop runs (default all; time extrapolated linearly if fewer)")
    p.add_argument("--snr", type=float, default=50.0, help="signal-to-noise of the simulated standards")
    p.add_argument("--memory-check", default=None, metavar="BUDGET",
                   help="also stream a memory-mapped grid 10x BUDGET (e.g. 256M) and report the peak")
    p.add_argument("--out", default=None, help="write the JSON result here")
    _add_scan_options(p)
    _add_common(p)
    _add_bench_frames_parser(p)
    return p


def _add_bench_frames_parser(p) -> None:
    """``gpucal bench frames``: N frames serially and on a LocalCluster, per-stage times (gpucal.benchmark_frames)."""
    bsub = p.add_subparsers(dest="bench_command", required=False, metavar="{frames}")
    q = bsub.add_parser("frames", help="N simulated frames serially and on a LocalCluster: s/frame, stages, frames/min",
                        description="Simulate N frames and calibrate them in one process, serially and on a "
                                    "LocalCluster; report per-frame wall time by stage, frames/min, a fresh "
                                    "process's time for one frame, and the cores the machine really delivers.")
    q.add_argument("--frames", type=_positive_int, default=10, help="number of frames (default 10)")
    q.add_argument("--templates", type=_positive_int, default=240,
                   help="grid nodes: the demo grid cut or tiled (default 240)")
    q.add_argument("--standards", type=_positive_int, default=20, help="standards per frame (default 20)")
    q.add_argument("--fibres", type=_positive_int, default=40, help="fibres per frame (default 40)")
    q.add_argument("--pixels", type=_positive_int, default=4000, help="pixels per fibre (default 4000)")
    q.add_argument("--workers", type=_workers_arg, default=2, metavar="N",
                   help="LocalCluster size; 0: serial only; 'auto': one per core (default 2)")
    q.add_argument("--repeat", type=_positive_int, default=1, help="runs of each mode, fastest counts (default 1)")
    q.add_argument("--no-fresh", dest="fresh", action="store_false",
                   help="skip the fresh-process timings (gpucal --help, one frame cold and warm)")
    q.add_argument("--fit", choices=("continuous", "nodes"), default="continuous",
                   help="stellar parameters of every frame: the continuous fit (default) or the node path")
    q.add_argument("--label", default=None, help="machine label in the result (default: the host name)")
    q.add_argument("--out", default=None,
                   help="JSON result (default bench/results/frames_<label>.json in a source checkout, else none)")
    _add_common(q)


def build_parser():
    parser = _Parser(prog="gpucal", description="Spectrophotometric flux calibration for fibre spectrographs.")
    parser.add_argument("--version", action="version", version=f"gpucal {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backend chosen, why, device and library versions")
    _add_common(p)
    _add_demo_parser(sub)
    _add_calibrate_parser(sub)
    add_templates_parser(sub)
    add_bench_parser(sub)
    return parser


# --------------------------------------------------------------------------- the options builder


def calibrate_options(args, **given) -> dict:
    """calibrate_frame keyword arguments from parsed options (an argparse Namespace).

    Every parameter of :func:`gpucal.pipeline.calibrate_frame`'s signature
    that ``args`` has an attribute for is passed — whatever its name, so a new
    parameter reaches calibrate_frame as soon as the parser has an option of
    that dest — except :data:`PER_FRAME` (``frame``, ``out``), which the
    command fills. An option left at None where the parameter's own default is
    None is left out (same meaning, and the batch summary records only what
    was set). ``given`` adds or overrides values (the demo's own grid and
    catalogue).
    """
    from .pipeline import calibrate_frame

    options = {}
    for name, param in inspect.signature(calibrate_frame).parameters.items():
        if name in PER_FRAME or not hasattr(args, name):
            continue
        value = getattr(args, name)
        if value is None and param.default is None:
            continue
        options[name] = value
    options.update(given)
    return options


# --------------------------------------------------------------------------- handlers


def _info(args):
    import platform

    from .backends import get_backend

    be = get_backend(args.backend)
    print(f"gpucal {__version__}")
    print(f"backend: {be.name}")
    print(f"reason: {be.reason}")
    print(f"device: {be.device}")
    print(f"python: {platform.python_version()}")
    for mod in ("numpy", "scipy", "astropy", "array_api_compat", "speclite", "cupy", "torch", "array_api_strict"):
        try:
            m = __import__(mod)
            print(f"{mod}: {getattr(m, '__version__', '?')}")
        except Exception:
            print(f"{mod}: not installed")
    return 0


def _is_batch(args) -> bool:
    return (len(args.frames) > 1 or args.workers is not None or args.scheduler is not None
            or args.batch_summary is not None or args.batch_panel is not None)


def _calibrate(args):
    if _is_batch(args):
        return run_calibrate_many(args)
    from .distributed import default_output_path
    from .io import check_output_path, write_text
    from .pipeline import calibrate_frame

    frame = args.frames[0]
    out = args.out or default_output_path(frame)
    # every destination is checked before the calibration, not after it
    if args.summary:
        check_output_path(args.summary, overwrite=args.overwrite, protect=frame)
    if args.qc and Path(args.qc).exists() and not Path(args.qc).is_dir():
        raise InputError(f"{args.qc}: --qc must be a directory")
    res = calibrate_frame(frame, out=out, **calibrate_options(args))
    if args.summary:
        write_text(args.summary, json.dumps(res.summary, indent=2, default=str), overwrite=args.overwrite,
                   protect=frame)
    if args.qc:
        from .report.html import write_frame_qa

        print(f"wrote {write_frame_qa(res, args.qc)} and the QA images")
    from .report.summary import percent

    s = res.summary
    print(f"wrote {out}: {s['n_stars_used']} standard(s) used, {s['n_stars_rejected']} rejected, "
          f"RMS scatter between standards {percent(s['rms_scatter'])}")
    return 0


def _batch_summary_path(args):
    """--batch-summary, or --summary standing for it; both given is refused (one would be ignored)."""
    summary, batch = getattr(args, "summary", None), getattr(args, "batch_summary", None)
    if summary is not None and batch is not None:
        raise InputError("--summary and --batch-summary both given: in a batch --summary is the batch summary; "
                         "give one of them")
    return batch if batch is not None else summary


def _batch_outputs(frames, out):
    if out is None:
        return None
    if len(frames) == 1 and not os.path.isdir(out):
        return [out]
    return out


def run_calibrate_many(args) -> int:
    """``gpucal calibrate FRAME [FRAME ...]`` with several frames, --workers, --scheduler or --batch-*.

    With several frames ``--out`` is a directory (``<out>/<stem>_fluxcal.fits``),
    ``--qc DIR`` gets one sub-directory per frame, and ``--summary`` stands for
    ``--batch-summary`` (giving both is an error). ``--photometry`` may hold
    ``{stem}`` / ``{dir}``. Every calibrate_frame option goes through
    :func:`calibrate_options`, as for one frame. Exit status 0 when every
    frame was calibrated, 1 when any failed (the others are still written).
    """
    from .distributed import calibrate_frames

    frames = list(getattr(args, "frames", None) or [args.frame])
    summary_path = _batch_summary_path(args)
    with _worker_warnings_to_debug_log(args):
        result = calibrate_frames(frames, outputs=_batch_outputs(frames, getattr(args, "out", None)),
                                  workers=getattr(args, "workers", None), scheduler=getattr(args, "scheduler", None),
                                  progress=True, summary_path=summary_path,
                                  panel_path=getattr(args, "batch_panel", None), qc_dir=getattr(args, "qc", None),
                                  **calibrate_options(args))
    from .report.summary import percent

    for r in result.records:
        if r.ok:
            s = r.summary
            print(f"ok      {r.path} -> {r.out_path}: {s['n_stars_used']} standard(s) used, "
                  f"{s['n_stars_rejected']} rejected, RMS scatter between standards {percent(s['rms_scatter'])}")
        else:
            print(f"FAILED  {r.path}: {r.error_type}: {r.error}")
    s = result.summary
    ex = s["execution"]
    where = "serially" if ex["mode"] == "serial" else f"on {ex['n_workers']} worker(s) ({ex['mode']})"
    print(f"calibrated {s['n_ok']} of {s['n_frames']} frame(s) {where} in {s['wall_s']:.1f} s "
          f"({s['frames_per_minute']:.1f} frames/min)")
    for p in (result.summary_path, result.panel_path, result.summary.get("night_page")):
        if p:
            print(f"wrote {p}")
    return 0 if result.n_failed == 0 else 1


def _demo_truth(res, sim):
    """Recovery error of the demo: the calibration against the simulation's true throughput."""
    import numpy as np

    from .fitting import TELLURIC_DEFAULT

    true_cal = 1.0 / np.asarray(sim.truth["throughput"])
    outside = np.ones(res.wave.shape, bool)
    for lo, hi in TELLURIC_DEFAULT:
        outside &= ~((res.wave >= lo) & (res.wave <= hi))
    rel = res.cal / true_cal - 1.0
    rms = float(np.sqrt(np.mean(rel[outside] ** 2)))
    truth = {
        "throughput_rms_error_outside_telluric": rms,
        "max_abs_error_outside_telluric": float(np.max(np.abs(rel[outside]))),
        "true_rv_kms": np.asarray(sim.truth["rv"]).tolist(),
        "true_params": np.asarray(sim.truth["params"]).tolist(),
        **_demo_band_residuals(res, sim),
    }
    return true_cal, truth


def _demo_band_residuals(res, sim) -> dict:
    """What remains of the O2 A and B bands in the program spectra: the median over the program
    fibres and the band's pixels of the 5-pixel running median of calibrated / true − 1."""
    import numpy as np

    prog = np.asarray(sim.truth["program_fibres"], dtype=int)
    if prog.size == 0:
        return {}
    rel = res.flux[prog] / sim.truth["program_true_flux"] - 1.0
    rel5 = np.median(np.lib.stride_tricks.sliding_window_view(rel, 5, axis=1), axis=-1)
    wave5 = res.wave[2:-2]
    return {f"program_residual_{name}_band": float(np.nanmedian(rel5[:, (wave5 >= lo) & (wave5 <= hi)]))
            for name, lo, hi in (("A", 7594.0, 7700.0), ("B", 6867.0, 6960.0))}


def _demo(args):
    """Simulate a frame with known throughput, calibrate it, and report the recovery error."""
    import time

    import numpy as np

    from .io import write_frame
    from .pipeline import calibrate_frame
    from .report.html import write_frame_qa
    from .report.qc import format_summary, write_summary
    from .simulate import simulate_frame, write_catalogue_csv

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = simulate_frame(seed=args.seed, snr=args.snr, telluric=_demo_transmission())
    frame_path, cat_path = out / "demo_frame.fits", out / "demo_catalogue.csv"
    write_frame(frame_path, sim.flux, sim.var, sim.wave, sim.fibres, medium="air", overwrite=True)
    write_catalogue_csv(sim.catalogue, cat_path)
    options = calibrate_options(args, templates="demo", photometry=str(cat_path), fwhm=float(sim.truth["fwhm"]),
                                overwrite=True)
    res = calibrate_frame(str(frame_path), out=out / "calibrated.fits", **options)
    true_cal, res.summary["demo_truth"] = _demo_truth(res, sim)
    rms = res.summary["demo_truth"]["throughput_rms_error_outside_telluric"]
    write_summary(res.summary, out / "summary.json")
    if not args.no_plots:
        prog = np.asarray(sim.truth["program_fibres"], dtype=int)
        program = None
        if prog.size:
            row = prog[0]
            program = (str(sim.fibres["NAME"][row]), res.flux[row], sim.truth["program_true_flux"][0])
        write_frame_qa(res, out, truth_cal=true_cal, program=program)
    print(format_summary(res.summary))
    print(f"recovered throughput vs truth: {100 * rms:.3f} % RMS outside telluric bands "
          f"(backend {res.summary['backend']}, {time.perf_counter() - t0:.1f} s)")
    band = res.summary["demo_truth"]
    if "program_residual_A_band" in band:
        print(f"program spectra in the O2 A / B bands: {100 * band['program_residual_A_band']:+.2f} % / "
              f"{100 * band['program_residual_B_band']:+.2f} % residual (telluric {res.summary['telluric']['mode']})")
    print(f"wrote {out / 'calibrated.fits'}, {out / 'summary.json'}"
          + ("" if args.no_plots else f", the QA images and the report {out / 'index.html'}"))
    return 0


def _demo_transmission():
    """The demo's atmosphere: resolved O2 and H2O lines of realistic depths (gpucal.simulate_tellurics)."""
    import functools

    from .simulate_tellurics import REALISTIC_BANDS, line_transmission

    return functools.partial(line_transmission, bands=REALISTIC_BANDS)


def run_templates_command(args) -> int:
    """Run ``gpucal templates prepare`` from parsed arguments; prints a one-line summary."""
    import time

    from .templates import DEFAULT_BANDS, DEFAULT_VMAX, prepare_template_cache

    if args.templates_command == "cache":
        return run_templates_cache_command(args)
    if args.templates_command != "prepare":
        raise GpucalError(f"unknown templates command {args.templates_command!r}")
    bands = DEFAULT_BANDS if args.bands is None else tuple(b.strip() for b in args.bands.split(",") if b.strip())
    vmax = DEFAULT_VMAX if args.vmax is None else args.vmax
    atmos = None if args.atmos is None else [a.strip() for a in args.atmos.split(",") if a.strip()]
    t0 = time.perf_counter()
    grid = prepare_template_cache(
        args.src, args.out, overwrite=args.overwrite, teff=args.teff, logg=args.logg, mh=args.mh, alpha=args.alpha,
        carbon=args.carbon, vturb=args.vturb, atmos=atmos, bosz_resolution=args.bosz_resolution, wave=args.wave,
        bands=bands, vmax=vmax, dlnlam=args.dlnlam, medium=args.medium, fwhm=args.fwhm,
        fwhm_poly=args.fwhm_poly, resolution=args.resolution, workers=args.workers,
        progress=False if args.no_progress else None, backend=args.backend,
    )
    g = grid.meta["grid"]
    print(f"wrote {grid.meta['cache_path']}: {grid.n_templates} templates, {g['wave_min']:.1f}-{g['wave_max']:.1f} Å "
          f"({g['n_wave']} pixels, dlnlam {g['dlnlam']:.3g}, {g['medium']}), resolution_fwhm "
          f"{grid.resolution_fwhm!r}, inputs sha256 {grid.meta['inputs_sha256'][:16]}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def run_bench_command(args) -> int:
    """Run ``gpucal bench`` from parsed arguments; prints the table, writes JSON if asked."""
    if getattr(args, "bench_command", None) == "frames":
        return run_bench_frames_command(args)
    from .benchmark import format_report, run_scan_benchmark

    for name in ("stars", "templates", "ref_templates"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    out = None
    if args.out is not None:
        out = Path(args.out)
        if not out.parent.is_dir():
            raise InputError(f"--out {out}: directory {out.parent} does not exist")
    result = run_scan_benchmark(backend=args.backend or os.environ.get("GPUCAL_BACKEND") or "auto",
                                n_star=args.stars, n_templates=args.templates, ref_templates=args.ref_templates,
                                vrange=args.vrange, max_memory=args.max_memory, snr=args.snr,
                                memory_check=args.memory_check)
    print(format_report(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


def _size_arg(text) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = str(text).strip().upper().rstrip("B")
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise InputError(f"--keep {text!r}: expected a size in bytes, or with a K/M/G/T suffix")
    return int(value)


def run_templates_cache_command(args) -> int:
    """``gpucal templates cache list|prune``: one line per entry."""
    import time

    from .workcache import list_entries, prune_entries, work_cache_dir

    root = work_cache_dir(args.dir)
    if args.cache_command == "list":
        entries = list_entries(root)
    else:
        if args.older_than is None and args.keep is None and not args.all:
            raise InputError("gpucal templates cache prune: give --older-than DAYS, --keep SIZE or --all")
        entries = prune_entries(root, older_than_days=args.older_than, dry_run=args.dry_run,
                                keep_bytes=None if args.keep is None else _size_arg(args.keep))
    for e in entries:
        lsf = ", ".join(f"{k} {v}" for k, v in (e.get("lsf") or {}).items() if v is not None)
        used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e["last_used"]))
        what = f"{e['n_templates']} templates x {e['n_q']} px {e['dtype']} {e['backend']}, {lsf}" \
            if e["kind"] == "working grid" else e["kind"]
        print(f"{os.path.basename(e['path'])}  {e['bytes'] / 2**20:8.1f} MiB  used {used} UTC  {what}")
    verb = "" if args.cache_command == "list" else " would be removed" if args.dry_run else " removed"
    print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}{verb} "
          f"({sum(e['bytes'] for e in entries) / 2**20:.1f} MiB) in {root}")
    return 0


def run_bench_frames_command(args) -> int:
    """``gpucal bench frames``: the table, and the JSON result (named by the machine's label)."""
    import re

    from .benchmark_frames import format_frames_report, run_frames_benchmark

    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.label) if args.label else None
    out = Path(args.out) if args.out else None
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    if out is None and results.is_dir():
        import socket

        out = results / f"frames_{label or re.sub(r'[^A-Za-z0-9_.-]+', '_', socket.gethostname())}.json"
    if out is not None and not out.parent.is_dir():
        raise InputError(f"--out {out}: directory {out.parent} does not exist")
    result = run_frames_benchmark(n_frames=args.frames, n_templates=args.templates, n_standards=args.standards,
                                  n_fibres=args.fibres, n_pix=args.pixels, workers=args.workers or 0,
                                  repeat=args.repeat, backend=args.backend, label=label, fresh=args.fresh,
                                  fit=args.fit)
    print(format_frames_report(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    ok = all(r["n_ok"] == r["n_frames"] for r in result["all_runs"])
    return 0 if ok else 1


# --------------------------------------------------------------------------- warnings, logging, main


def _log_warning(message, category, filename, lineno, file=None, line=None):
    """A ``warnings.showwarning`` that writes to gpucal's debug log instead of stderr."""
    logger.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


def dask_setup(worker):
    """dask preload hook: a LocalCluster worker that ``--workers`` starts (without --debug) imports this
    module and routes its Python warnings to its debug log, as :func:`main` does in this process."""
    warnings.showwarning = _log_warning


def _worker_warnings_to_debug_log(args):
    """Context in which new LocalCluster workers preload this module (see :func:`dask_setup`)."""
    if getattr(args, "debug", False) or getattr(args, "workers", None) in (None, 0, 1):  # 0, 1: serial
        return contextlib.nullcontext()
    try:
        import dask
    except ImportError:  # calibrate_frames says what to install
        return contextlib.nullcontext()
    preload = list(dask.config.get("distributed.worker.preload", default=None) or [])
    return dask.config.set({"distributed.worker.preload": [*preload, "gpucal.cli"]})


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="gpucal: %(levelname)s: %(message)s")
    # Third-party chatter stays at warning level unless --debug.
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises :class:`_Terminated` while the command runs (main thread only), then as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _command_line(argv):
    """GPUCAL_COMMAND_LINE set to this command while it runs (read for the PROVENANCE table, also by
    the dask workers this process starts), restored after."""
    import shlex

    before = os.environ.get("GPUCAL_COMMAND_LINE")
    os.environ["GPUCAL_COMMAND_LINE"] = shlex.join(["gpucal", *(sys.argv[1:] if argv is None else list(argv))])
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("GPUCAL_COMMAND_LINE", None)
        else:
            os.environ["GPUCAL_COMMAND_LINE"] = before


def main(argv=None):
    from .heap import keep_heap

    keep_heap()  # the frame's temporaries stay in the heap (gpucal/heap.py); GPUCAL_MALLOC=system: not
    parser = build_parser()
    args = parser.parse_args(_glue_negative_values(sys.argv[1:] if argv is None else list(argv)))
    _configure_logging(args.debug)
    handler = {"info": _info, "calibrate": _calibrate, "demo": _demo, "templates": run_templates_command,
               "bench": run_bench_command}[args.command]
    # Python warnings (a numpy RuntimeWarning, a library's deprecation) go to the debug log:
    # without --debug the user sees gpucal's own messages only.
    with warnings.catch_warnings(), _sigterm_raises(), _command_line(argv):
        warnings.showwarning = _log_warning
        try:
            return handler(args)
        except GpucalError as exc:
            if args.debug:
                raise
            print(f"gpucal: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if args.debug:
                raise
            print("gpucal: interrupted", file=sys.stderr)
            return 128 + int(signal.SIGINT)
        except _Terminated:
            if args.debug:
                raise
            print("gpucal: terminated", file=sys.stderr)
            return 128 + int(signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())

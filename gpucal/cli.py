"""Command line: ``gpucal demo | calibrate | info | templates | bench``.

Errors gpucal raises on purpose (GpucalError) are printed as one line,
``gpucal: error: ...``, with exit status 2 and no traceback unless --debug.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .errors import GpucalError, InputError

__all__ = ["main"]


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


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


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


def _add_common(p):
    p.add_argument("--backend", default=None,
                   help="numpy, cupy, torch, jax or auto (default: $GPUCAL_BACKEND, else auto)")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def _add_calibration_options(p):
    p.add_argument("--combine", choices=("weighted_mean", "median"), default="weighted_mean")
    p.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="Savitzky-Golay window in pixels for the combined vector (0 = none)")
    p.add_argument("--metric", choices=("chi2", "huber"), default="chi2",
                   help="template score: chi2, or huber (robust re-scoring of the best chi2 candidates)")
    p.add_argument("--vrange", type=_vrange, default=(-500.0, 500.0, 5.0), metavar="VMIN:VMAX:STEP",
                   help="radial-velocity scan in km/s (default -500:500:5)")
    p.add_argument("--min-stars", type=_positive_int, default=1, help="fewer usable standards is an error (default 1)")
    p.add_argument("--max-chi2-dof", type=float, default=None, help="exclude stars whose best chi2/dof exceeds this")
    p.add_argument("--max-memory", default=None,
                   help="scan working-set budget: bytes or with K/M/G suffix (default $GPUCAL_MAX_MEMORY, else 1G)")


def build_parser():
    parser = _Parser(prog="gpucal", description="Spectrophotometric flux calibration for fibre spectrographs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="backend chosen, why, device and library versions")
    _add_common(p)

    p = sub.add_parser("demo", help="simulate a frame, calibrate it with the built-in grid, report the error")
    p.add_argument("--out", default="gpucal-demo", help="output directory (default ./gpucal-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=50.0)
    p.add_argument("--no-plots", action="store_true", help="skip the QC PNGs")
    _add_calibration_options(p)
    p.set_defaults(smooth=51)
    _add_common(p)

    p = sub.add_parser("calibrate", help="flux-calibrate a reduced frame")
    p.add_argument("frames", nargs="+", metavar="FRAME",
                   help="reduced FITS frame(s); several run as a batch (see --workers)")
    p.add_argument("--templates", default="demo",
                   help="template grid: 'demo' (built in), a prepared cache, or a BOSZ 2024 directory")
    p.add_argument("--photometry", required=True, help="catalogue CSV (name, ra, dec, g, dg, r, dr, i, di, z, dz)")
    lsf = p.add_mutually_exclusive_group(required=True)
    lsf.add_argument("--fwhm", type=float, help="instrument FWHM in Å (constant)")
    lsf.add_argument("--fwhm-poly", type=_floats, help="FWHM(λ) = c0 + c1 λ + ... in Å, ascending coefficients")
    lsf.add_argument("--resolution", type=float, help="constant resolving power λ/Δλ")
    p.add_argument("--out", default=None, help="output FITS (default FRAME_fluxcal.fits)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--summary", default=None, help="write the JSON summary here")
    p.add_argument("--qc", default=None, metavar="DIR", help="write QC PNGs into DIR")
    p.add_argument("--ebv", type=float, default=None,
                   help="E(B-V) applied to the templates (F99, R_V=3.1) unless the catalogue has an ebv column")
    p.add_argument("--no-teff-prior", dest="teff_prior", action="store_false",
                   help="scan the whole grid even when colours give a Teff prior")
    p.add_argument("--fast", action="store_true", help="fast-path scan (velocity from fiducial templates first)")
    from .distributed import add_batch_options

    add_batch_options(p)
    _add_calibration_options(p)
    _add_common(p)

    from .templates.cache import add_templates_parser

    add_templates_parser(sub)

    from .benchmark import add_bench_parser

    p = add_bench_parser(sub)
    p.add_argument("--vrange", type=_vrange, default=(-500.0, 500.0, 5.0), metavar="VMIN:VMAX:STEP",
                   help="radial-velocity scan in km/s (default -500:500:5)")
    p.add_argument("--max-memory", default=None,
                   help="scan working-set budget: bytes or with K/M/G suffix (default $GPUCAL_MAX_MEMORY, else 1G)")
    _add_common(p)
    return parser


def _info(args):
    import platform

    from . import __version__
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


def _calibrate(args):
    if len(args.frames) > 1 or args.workers is not None or args.scheduler is not None:
        from .distributed import run_calibrate_many

        return run_calibrate_many(args)
    args.frame = args.frames[0]
    from .pipeline import calibrate_frame

    from .io.frames import check_output_path, write_text

    out = args.out or str(Path(args.frame).with_suffix("")) + "_fluxcal.fits"
    # every destination is checked before the calibration, not after it
    if args.summary:
        check_output_path(args.summary, overwrite=args.overwrite, protect=args.frame)
    if args.qc and Path(args.qc).exists() and not Path(args.qc).is_dir():
        raise InputError(f"{args.qc}: --qc must be a directory")
    res = calibrate_frame(
        args.frame, templates=args.templates, photometry=args.photometry, fwhm=args.fwhm,
        fwhm_poly=args.fwhm_poly, resolution=args.resolution, out=out, overwrite=args.overwrite,
        backend=args.backend, combine=args.combine, smooth=args.smooth, metric=args.metric,
        vrange=args.vrange, min_stars=args.min_stars, max_chi2_dof=args.max_chi2_dof,
        max_memory=args.max_memory, ebv=args.ebv, teff_prior=args.teff_prior, fast=args.fast,
    )
    if args.summary:
        write_text(args.summary, json.dumps(res.summary, indent=2, default=str), overwrite=args.overwrite,
                   protect=args.frame)
    if args.qc:
        from .report.qc import write_qc_plots

        write_qc_plots(res, args.qc)
    s = res.summary
    print(f"wrote {out}: {s['n_stars_used']} standard(s) used, {s['n_stars_rejected']} rejected, "
          f"RMS scatter {s['rms_scatter']}")
    return 0


def _demo(args):
    """Simulate a frame with known throughput, calibrate it, and report the recovery error."""
    import time

    import numpy as np

    from .io.frames import write_frame
    from .fitting.masks import TELLURIC_DEFAULT
    from .pipeline import calibrate_frame
    from .report.qc import format_summary, write_qc_plots, write_summary
    from .simulate import simulate_frame, write_catalogue_csv

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sim = simulate_frame(seed=args.seed, snr=args.snr)
    frame_path, cat_path = out / "demo_frame.fits", out / "demo_catalogue.csv"
    write_frame(frame_path, sim.flux, sim.var, sim.wave, sim.fibres, overwrite=True)
    write_catalogue_csv(sim.catalogue, cat_path)
    fwhm = float(sim.truth["fwhm"])
    res = calibrate_frame(
        str(frame_path), templates="demo", photometry=str(cat_path), fwhm=fwhm,
        out=out / "calibrated.fits", overwrite=True, backend=args.backend, combine=args.combine,
        smooth=args.smooth, metric=args.metric, vrange=args.vrange, min_stars=args.min_stars,
        max_chi2_dof=args.max_chi2_dof, max_memory=args.max_memory,
    )
    true_cal = 1.0 / np.asarray(sim.truth["throughput"])
    outside = np.ones(res.wave.shape, bool)
    for lo, hi in TELLURIC_DEFAULT:
        outside &= ~((res.wave >= lo) & (res.wave <= hi))
    rel = res.cal / true_cal - 1.0
    rms = float(np.sqrt(np.mean(rel[outside] ** 2)))
    res.summary["demo_truth"] = {
        "throughput_rms_error_outside_telluric": rms,
        "max_abs_error_outside_telluric": float(np.max(np.abs(rel[outside]))),
        "true_rv_kms": np.asarray(sim.truth["rv"]).tolist(),
        "true_params": np.asarray(sim.truth["params"]).tolist(),
    }
    write_summary(res.summary, out / "summary.json")
    if not args.no_plots:
        prog = np.asarray(sim.truth["program_fibres"], dtype=int)
        program = None
        if prog.size:
            row = prog[0]
            program = (str(sim.fibres["NAME"][row]), res.flux[row], sim.truth["program_true_flux"][0])
        write_qc_plots(res, out, truth_cal=true_cal, program=program)
    print(format_summary(res.summary))
    print(f"recovered throughput vs truth: {100 * rms:.3f} % RMS outside telluric bands "
          f"(backend {res.summary['backend']}, {time.perf_counter() - t0:.1f} s)")
    print(f"wrote {out / 'calibrated.fits'}, {out / 'summary.json'}" + ("" if args.no_plots else ", QC PNGs"))
    return 0


def _templates(args):
    from .templates.cache import run_templates_command

    return run_templates_command(args)


def _bench(args):
    from .benchmark import run_bench_command

    return run_bench_command(args)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(_glue_negative_values(sys.argv[1:] if argv is None else list(argv)))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="gpucal: %(levelname)s: %(message)s")
    # Third-party chatter stays at warning level unless --debug.
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.debug else logging.WARNING)
    try:
        return {"info": _info, "calibrate": _calibrate, "demo": _demo, "templates": _templates, "bench": _bench}[args.command](args)
    except GpucalError as exc:
        if args.debug:
            raise
        print(f"gpucal: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

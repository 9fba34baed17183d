"""Report: a calibrated frame's summary, FITS keywords and HISTORY (host values only).

* :func:`frame_summary` — the JSON-able dict returned in
  ``CalibrationOutput.summary`` and written by ``--summary``;
* :func:`fits_keywords` — the ``FLUXCAL*`` primary-header keywords;
* :func:`history_lines` — one HISTORY line per standard used.

Nothing here computes a result: every number arrives measured.
"""

from __future__ import annotations

import math

from .. import __version__

__all__ = ["frame_summary", "fits_keywords", "history_lines", "percent"]


def percent(fraction, digits: int = 2) -> str:
    """A fraction as per cent text with ``digits`` decimals ("1.92 %"), "n/a" for None or NaN."""
    if fraction is None or not math.isfinite(float(fraction)):
        return "n/a"
    return f"{100.0 * float(fraction):.{digits}f} %"


def _finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _percent_value(x, digits: int = 3):
    """A fraction as a number in per cent rounded to ``digits`` decimals (None when not finite)."""
    x = _finite_or_none(x)
    return None if x is None else round(100.0 * x, digits)


def _star_entry(i, names, fibres, h, reasons) -> dict:
    p = h["params"][i]
    return dict(name=names[i], fibre=int(fibres[i]), used=bool(h["used"][i]), reason=reasons[i],
                teff=float(p[0]), logg=float(p[1]), mh=float(p[2]), alpha=float(p[3]),
                rv=float(h["rv"][i]), rv_err=float(h["rv_err"][i]), scale=float(h["scale"][i]),
                chi2_dof=float(h["chi2"][i]))


def frame_summary(*, frame_path, backend, names, fibres, h, reasons, options, n_templates,
                  bad_per_fibre, timing, warnings) -> dict:
    """The frame's summary dict.

    options : combine, smooth, metric, vrange, lsf (the settings reported);
    h : host arrays (used, rms, measured and the per-star values of
    :func:`~gpucal.report.stars.per_star_table`); bad_per_fibre : {fibre number: bad pixels};
    timing : {stage: seconds}.
    """
    n_used = int(h["used"].sum())
    return {
        "frame": str(frame_path), "gpucal_version": __version__, "backend": backend.name,
        "device": str(backend.device), "n_standards": len(names), "n_stars_used": n_used,
        "n_stars_rejected": len(names) - n_used, "rms_scatter": _finite_or_none(h["rms"]),
        "rms_scatter_percent": _percent_value(h["rms"]),
        "method": options["combine"], "smooth": options["smooth"], "metric": options["metric"],
        "vrange_kms": list(options["vrange"]),
        "lsf": {k: v for k, v in options["lsf"].items() if v is not None},
        "n_templates": int(n_templates), "fraction_interpolated": float(1 - h["measured"].mean()),
        "bad_pixels_per_fibre": bad_per_fibre,
        "stars": [_star_entry(i, names, fibres, h, reasons) for i in range(len(names))],
        "timing_s": dict(timing),
        "warnings": list(warnings),
        "telluric": _telluric_entry(options, h),
    }


def _telluric_entry(options, h) -> dict:
    """The telluric mode asked for and applied (``correct`` where any pixel was), and its pixel counts."""
    if "telluric_corrected" not in h:
        return {"requested": options.get("telluric", "mask"), "mode": "mask"}
    counts = {f"n_{k}": int(h[f"telluric_{k}"].sum()) for k in ("band", "corrected", "saturated", "uncovered")}
    return {"requested": options["telluric"], "mode": "correct" if counts["n_corrected"] else "mask",
            "min_stars": int(options["telluric_min_stars"]), **counts}


def fits_keywords(summary: dict) -> dict:
    """``FLUXCAL*`` keywords {name: (value, comment)} from a frame summary."""
    rms = summary["rms_scatter"]
    return {
        "FLUXCAL": (True, "flux calibration applied by gpucal"),
        "FCALVERS": (__version__, "gpucal version"),
        "FCALBACK": (summary["backend"], "array backend"),
        "FCALMETH": (summary["method"], "combination of per-star vectors"),
        "FCALNSTD": (summary["n_stars_used"], "standard stars used"),
        "FCALNREJ": (summary["n_stars_rejected"], "standard stars rejected or excluded"),
        "FCALRMS": (rms if rms is not None else -1.0, "median fractional RMS between standards"),
        "FCALSMOO": (int(summary["smooth"]), "Savitzky-Golay window (pixels, 0 = none)"),
        "FCALINTP": (summary["fraction_interpolated"], "fraction of pixels interpolated"),
        **_telluric_keywords(summary.get("telluric", {})),
    }


def _telluric_keywords(tell: dict) -> dict:
    """FCALTELL (the mode applied) and, when correcting, the pixels corrected / flagged."""
    out = {"FCALTELL": (tell.get("mode", "mask"), "telluric bands: correct (standards) or mask")}
    if "n_corrected" in tell:
        out.update(FCALTCOR=(tell["n_corrected"], "telluric pixels corrected by the standards"),
                   FCALTSAT=(tell["n_saturated"], "telluric pixels saturated (T < 0.1), bridged"),
                   FCALTUNC=(tell["n_uncovered"], f"telluric pixels bridged: < {tell['min_stars']} standards"))
    return out


def history_lines(names, fibres, h) -> list:
    """One HISTORY line per standard used: its parameters, RV and scale."""
    return [
        f"gpucal {__version__}: star {names[i]} fibre {fibres[i]} Teff={h['params'][i, 0]:.0f} "
        f"logg={h['params'][i, 1]:.2f} [M/H]={h['params'][i, 2]:+.2f} [a/M]={h['params'][i, 3]:+.2f} "
        f"RV={h['rv'][i]:.1f}km/s scale={h['scale'][i]:.4e}"
        for i in range(len(names)) if h["used"][i]
    ]

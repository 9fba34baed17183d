"""Quality-control plots (matplotlib, Agg) and the JSON/text summary.

Edge module: works on the host NumPy arrays of a
:class:`gpucal.pipeline.CalibrationOutput`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["write_qc_plots", "write_summary", "format_summary"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_qc_plots(res, outdir, *, truth_cal=None, program=None):
    """Write QC PNGs into ``outdir``; return their paths.

    vectors.png : each standard's Cal(λ) (used solid, excluded dotted) and the
        combined vector, interpolated stretches marked (and the true vector
        when ``truth_cal`` (n_pix,) is given).
    residuals.png : per-star fractional residuals from the combined vector.
    program.png : when ``program = (name, calibrated, truth)`` is given, a
        calibrated program spectrum against its true flux.
    """
    plt = _plt()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    wave = res.wave
    paths = []
    tab = res.per_star
    fig, ax = plt.subplots(figsize=(10, 5))
    for i in range(res.star_cal.shape[0]):
        used = bool(tab["USED"][i])
        y = np.where(res.star_mask[i], res.star_cal[i], np.nan)
        ax.plot(wave, y, lw=0.5, alpha=0.6 if used else 0.4, ls="-" if used else ":",
                label=f"{tab['NAME'][i]}{'' if used else ' (excluded)'}")
    ax.plot(wave, np.where(res.measured, res.cal, np.nan), "k", lw=1.2, label="combined")
    ax.plot(wave, np.where(~res.measured, res.cal, np.nan), "r", lw=1.2, label="interpolated (flagged)")
    if truth_cal is not None:
        ax.plot(wave, truth_cal, "c--", lw=1.0, label="truth")
    finite = res.cal[np.isfinite(res.cal)]
    if finite.size:
        ax.set_ylim(0, 2.0 * np.nanpercentile(finite, 99))
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("Cal (erg/s/cm²/Å per count)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"calibration vectors: {res.summary['n_stars_used']} used, {res.summary['n_stars_rejected']} rejected")
    fig.tight_layout()
    paths.append(out / "vectors.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4))
    comb = np.where(res.measured, res.cal, np.nan)
    for i in range(res.star_cal.shape[0]):
        r = np.where(res.star_mask[i], res.star_cal[i] / comb - 1.0, np.nan)
        ax.plot(wave, 100 * r, lw=0.4, label=str(tab["NAME"][i]))
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(-20, 20)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("star / combined − 1 (%)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    paths.append(out / "residuals.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if program is not None:
        name, calibrated, truth = program
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.plot(wave, calibrated, lw=0.5, label=f"{name} calibrated")
        ax.plot(wave, truth, lw=0.8, label="truth")
        ax.set_xlabel("wavelength (Å)")
        ax.set_ylabel("flux (erg/s/cm²/Å)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "program.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_summary(summary: dict, path):
    """Write the JSON summary (host scalars only)."""
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
    return Path(path)


def format_summary(summary: dict) -> str:
    """A few human-readable lines: stars used/rejected and why."""
    lines = [f"{summary['n_stars_used']} of {summary['n_standards']} standards used "
             f"(backend {summary['backend']}, RMS scatter {summary['rms_scatter']})"]
    for s in summary["stars"]:
        state = "used" if s["used"] else f"EXCLUDED: {s['reason']}"
        lines.append(f"  {s['name']:>10s} fibre {s['fibre']:4d} Teff {s['teff']:5.0f} logg {s['logg']:.2f} "
                     f"[M/H] {s['mh']:+.2f} RV {s['rv']:+7.1f}±{s['rv_err']:.1f} km/s "
                     f"chi2/dof {s['chi2_dof']:.2f}  {state}")
    return "\n".join(lines)

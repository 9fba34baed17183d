"""Quality-control images of one calibrated frame (matplotlib, Agg), and its text summary.

Step: report (11), beside the output frame. In: a
:class:`~gpucal.containers.CalibrationOutput` (host NumPy arrays), whose
``extra`` holds the QA arrays the pipeline measured: ``zeropoint`` (n_pix,) and
``star_zeropoint`` (n_star, n_pix) AB mag, ``bin_wave`` (n_bin,) Å and
``bin_residual`` (n_star, n_bin) fractions, ``model`` / ``observed`` (n_star, n_pix)
erg/s/cm²/Å (each standard's scaled model, and the standard calibrated with
the combined vector), ``fit_residual`` (n_star, n_pix) fractions and ``mask_counts``.
Out: PNG files (:data:`QC_IMAGES`); nothing is computed here beyond scaling to
per cent. Fractions are shown in per cent everywhere, to two decimals
(:func:`~gpucal.report.summary.percent`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fitting import TELLURIC_BANDS
from .summary import percent

__all__ = ["write_qc_plots", "write_summary", "format_summary", "QC_IMAGES"]

#: The QA images and what each shows (file name -> caption), in report order.
QC_IMAGES = {
    "metrics.png": "Metrics of the frame: standards used and rejected, scatter, interpolated and flagged pixels",
    "standards.png": "Each standard: observed (calibrated with the combined vector) vs its scaled model, "
                     "and the residual in per cent",
    "zeropoint.png": "Zeropoint: AB magnitude giving one count per pixel, per standard and combined",
    "photometry.png": "Photometric residuals per band: synthetic minus catalogue magnitude after scaling (mmag)",
    "residuals.png": "Each standard's vector over the combined one, binned, telluric bands shaded",
    "bands.png": "The combined vector at full resolution in the telluric bands (red: interpolated)",
    "vectors.png": "Every standard's calibration vector and the combined vector",
}
#: Standards drawn in the per-standard panels (the rest are in the tables).
MAX_STAR_PANELS = 8


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _shade_tellurics(ax, wave):
    for lo, hi, _ in TELLURIC_BANDS:
        if hi >= wave[0] and lo <= wave[-1]:
            ax.axvspan(lo, hi, color="0.85", lw=0, zorder=0)


def _save(fig, out: Path, name: str, paths: list, plt) -> None:
    if len(fig.axes) <= 2:  # tight_layout costs seconds on a figure of many axes; those set their margins
        fig.tight_layout()
    fig.savefig(out / name, dpi=90)
    plt.close(fig)
    paths.append(out / name)


def _star_label(tab, i) -> str:
    return f"{tab['NAME'][i]} (fibre {tab['FIBRE'][i]}){'' if tab['USED'][i] else ' excluded'}"


def _plot_standards(res, plt):
    ex, tab = res.extra, res.per_star
    n = min(res.star_cal.shape[0], MAX_STAR_PANELS)
    fig, axes = plt.subplots(2 * n, 1, figsize=(10, 2.6 * n), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * n})
    for i in range(n):
        ax, rx = axes[2 * i, 0], axes[2 * i + 1, 0]
        ax.plot(res.wave, ex["observed"][i], lw=0.5, color="0.3", label="observed (calibrated)")
        ax.plot(res.wave, ex["model"][i], lw=0.7, color="tab:orange", label="scaled model")
        _shade_tellurics(ax, res.wave)
        ax.set_ylabel("erg/s/cm²/Å", fontsize=7)
        ax.set_title(_star_label(tab, i), fontsize=8, loc="left")
        ax.legend(fontsize=6, loc="upper right")
        rx.plot(res.wave, 100.0 * ex["fit_residual"][i], lw=0.4, color="tab:blue")
        rx.axhline(0, color="k", lw=0.6)
        rx.set_ylim(-10, 10)
        rx.set_ylabel("resid. %", fontsize=7)
        _shade_tellurics(rx, res.wave)
    axes[-1, 0].set_xlabel("wavelength (Å)")
    fig.subplots_adjust(left=0.08, right=0.98, top=1 - 0.35 / (2.6 * n), bottom=0.45 / (2.6 * n), hspace=0.45)
    return fig


def _plot_zeropoint(res, plt):
    ex, tab = res.extra, res.per_star
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i in range(ex["star_zeropoint"].shape[0]):
        ax.plot(res.wave, ex["star_zeropoint"][i], lw=0.5, alpha=0.7, ls="-" if tab["USED"][i] else ":",
                label=_star_label(tab, i))
    ax.plot(res.wave, np.where(res.measured, ex["zeropoint"], np.nan), "k", lw=1.3, label="combined")
    ax.plot(res.wave, np.where(~res.measured, ex["zeropoint"], np.nan), "r", lw=1.3, label="combined, interpolated")
    _shade_tellurics(ax, res.wave)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("zeropoint (AB mag for 1 count/pixel)")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _plot_photometry(res, plt):
    tab = res.per_star
    cols = [c for c in tab.colnames if c.startswith("DMAG_")]
    fig, ax = plt.subplots(figsize=(8, 4))
    n = len(tab)
    width = 0.8 / max(n, 1)
    x = np.arange(len(cols))
    for i in range(n):
        y = [1000.0 * float(tab[c][i]) for c in cols]
        ax.bar(x + (i - (n - 1) / 2) * width, y, width, label=_star_label(tab, i))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([c[5:] for c in cols])
    ax.set_ylabel("synthetic − catalogue (mmag)")
    ax.set_xlabel("band")
    ax.legend(fontsize=6, ncol=2)
    return fig


def _plot_binned(res, plt):
    ex, tab = res.extra, res.per_star
    fig, ax = plt.subplots(figsize=(10, 4))
    for i in range(ex["bin_residual"].shape[0]):
        ax.plot(ex["bin_wave"], 100.0 * ex["bin_residual"][i], "o-", ms=3, lw=0.8, label=_star_label(tab, i))
    _shade_tellurics(ax, res.wave)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("star / combined − 1 (%), binned")
    ax.legend(fontsize=6, ncol=3)
    return fig


def _plot_bands(res, plt):
    bands = [(lo, hi) for lo, hi, _ in TELLURIC_BANDS if hi >= res.wave[0] and lo <= res.wave[-1]]
    fig, axes = plt.subplots(1, max(len(bands), 1), figsize=(3 * max(len(bands), 1), 3), squeeze=False)
    for ax, (lo, hi) in zip(axes[0], bands):
        pad = 0.5 * (hi - lo)
        sel = (res.wave >= lo - pad) & (res.wave <= hi + pad)
        w, c, m = res.wave[sel], res.cal[sel], res.measured[sel]
        ax.plot(w, np.where(m, c, np.nan), "k.-", ms=2, lw=0.6)
        ax.plot(w, np.where(~m, c, np.nan), "r.-", ms=2, lw=0.6)
        ax.axvspan(lo, hi, color="0.85", lw=0, zorder=0)
        ax.set_title(f"{lo:.0f}–{hi:.0f} Å", fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0, 0].set_ylabel("Cal (erg/s/cm²/Å per count)", fontsize=7)
    fig.subplots_adjust(left=0.07, right=0.99, top=0.9, bottom=0.12, wspace=0.3)
    return fig


def metrics_lines(summary: dict) -> list:
    """The metrics of a frame as (label, text) pairs: the metrics panel, the HTML and the CLI."""
    s = summary
    rows = [("standards used", f"{s['n_stars_used']} of {s['n_standards']}"),
            ("rejected / excluded", str(s["n_stars_rejected"])),
            ("RMS scatter between standards", percent(s["rms_scatter"])),
            ("vector interpolated", percent(s["fraction_interpolated"])),
            ("backend", f"{s['backend']} ({s['device']})"),
            ("combination", f"{s['method']}, smooth {s['smooth']} px, metric {s['metric']}")]
    for name, n in (s.get("mask_pixels") or {}).items():
        rows.append((f"MASK {name} pixels", f"{n:d}"))
    rows.append(("wall time", f"{sum((s.get('timing_s') or {}).values()):.1f} s"))
    return rows


def _plot_metrics(res, plt):
    rows = metrics_lines(res.summary)
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 0.6))
    ax.axis("off")
    for k, (label, text) in enumerate(rows):
        y = 1.0 - (k + 0.5) / len(rows)
        ax.text(0.0, y, label, fontsize=9, va="center", transform=ax.transAxes)
        ax.text(0.62, y, text, fontsize=9, va="center", family="monospace", transform=ax.transAxes)
    ax.set_title(Path(str(res.summary["frame"])).name or "frame", fontsize=10, loc="left")
    return fig


def _plot_vectors(res, plt, truth_cal):
    tab = res.per_star
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i in range(res.star_cal.shape[0]):
        used = bool(tab["USED"][i])
        y = np.where(res.star_mask[i], res.star_cal[i], np.nan)
        ax.plot(res.wave, y, lw=0.5, alpha=0.6 if used else 0.4, ls="-" if used else ":", label=_star_label(tab, i))
    ax.plot(res.wave, np.where(res.measured, res.cal, np.nan), "k", lw=1.2, label="combined")
    ax.plot(res.wave, np.where(~res.measured, res.cal, np.nan), "r", lw=1.2, label="interpolated (flagged)")
    if truth_cal is not None:
        ax.plot(res.wave, truth_cal, "c--", lw=1.0, label="truth")
    finite = res.cal[np.isfinite(res.cal)]
    if finite.size:
        ax.set_ylim(0, 2.0 * np.nanpercentile(finite, 99))
    _shade_tellurics(ax, res.wave)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("Cal (erg/s/cm²/Å per count)")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(f"calibration vectors: {res.summary['n_stars_used']} used, {res.summary['n_stars_rejected']} rejected")
    return fig


def _plot_program(res, plt, program):
    name, calibrated, truth = program
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(res.wave, calibrated, lw=0.5, label=f"{name} calibrated")
    ax.plot(res.wave, truth, lw=0.8, label="truth")
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("flux (erg/s/cm²/Å)")
    ax.legend()
    return fig


def write_qc_plots(res, outdir, *, truth_cal=None, program=None):
    """Write the QA PNGs (:data:`QC_IMAGES`) into ``outdir``; return their paths in report order.

    truth_cal : (n_pix,) the true vector, drawn in vectors.png (the demo);
    program : ``(name, calibrated, truth)``, a calibrated program spectrum against its
    true flux, as program.png.
    """
    plt = _plt()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    draw = {"metrics.png": lambda: _plot_metrics(res, plt), "standards.png": lambda: _plot_standards(res, plt),
            "zeropoint.png": lambda: _plot_zeropoint(res, plt), "photometry.png": lambda: _plot_photometry(res, plt),
            "residuals.png": lambda: _plot_binned(res, plt), "bands.png": lambda: _plot_bands(res, plt),
            "vectors.png": lambda: _plot_vectors(res, plt, truth_cal)}
    for name in QC_IMAGES:
        _save(draw[name](), out, name, paths, plt)
    if program is not None:
        _save(_plot_program(res, plt, program), out, "program.png", paths, plt)
    return paths


def write_summary(summary: dict, path):
    """Write the JSON summary (host scalars only)."""
    Path(path).write_text(json.dumps(summary, indent=2, default=str))
    return Path(path)


def format_summary(summary: dict) -> str:
    """A few human-readable lines: stars used/rejected and why."""
    lines = [f"{summary['n_stars_used']} of {summary['n_standards']} standards used "
             f"(backend {summary['backend']}, RMS scatter between standards {percent(summary['rms_scatter'])})"]
    for s in summary["stars"]:
        state = "used" if s["used"] else f"EXCLUDED: {s['reason']}"
        lines.append(f"  {s['name']:>10s} fibre {s['fibre']:4d} Teff {s['teff']:5.0f} logg {s['logg']:.2f} "
                     f"[M/H] {s['mh']:+.2f} RV {s['rv']:+7.1f}±{s['rv_err']:.1f} km/s "
                     f"chi2/dof {s['chi2_dof']:.2f}  {state}")
    return "\n".join(lines)

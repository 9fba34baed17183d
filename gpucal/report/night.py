"""The night report: a batch summary (JSON) and a PNG panel over many calibrated frames.

Step: report, after :func:`gpucal.distributed.calibrate_frames`. In: the
batch's FrameRecords (host data: each frame's summary dict and its combined
vector ``wave, cal, cal_var (n_pix,)`` float64 in Å and erg/s/cm²/Å per
count, ``measured (n_pix,)`` bool), the wall time and how the batch ran.
Out: the summary dict (JSON-safe: host scalars, non-finite floats as null)
and a 2×2 PNG panel. The only arithmetic here is the night's stability: each
frame's vector over the per-pixel median of all frames' vectors.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import warnings
from pathlib import Path

import numpy as np

from .. import __version__
from ..containers import BatchResult

__all__ = ["batch_summary", "write_batch_summary", "write_batch_panel"]


def _stem(path: str) -> str:
    return Path(path).with_suffix("").name


def _finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(obj):
    """Host scalars only, non-finite floats as null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite_or_none(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _night_ratios(records):
    """Each calibrated frame's combined vector over the night's median vector.

    Vectors are put on the wavelength grid of the first calibrated frame
    (linear interpolation; NaN outside a frame's range) and only measured,
    positive pixels count. Returns (wave, ratios (n_ok, n_pix), levels (n_ok,),
    shape_rms (n_ok,)): ``level`` is the median fractional offset from the
    night (> 0: more flux per count, i.e. less transmission), ``shape_rms``
    the RMS of the ratio once that level is divided out.
    """
    ok = [r for r in records if r.ok]
    if not ok:
        return None, np.empty((0, 0)), np.empty(0), np.empty(0)
    wave = ok[0].wave
    rows = []
    for r in ok:
        y = np.where(r.measured & np.isfinite(r.cal) & (r.cal > 0), r.cal, np.nan)
        if r.wave.shape != wave.shape or not np.array_equal(r.wave, wave):
            y = np.interp(wave, r.wave, y, left=np.nan, right=np.nan)
        rows.append(y)
    vec = np.vstack(rows)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan():
        ref = np.nanmedian(vec, axis=0)
        ratio = vec / ref
        level = np.nanmedian(ratio, axis=1)
        shape = np.sqrt(np.nanmean((ratio / level[:, None] - 1.0) ** 2, axis=1))
    return wave, ratio, level - 1.0, shape


@contextlib.contextmanager
def _quiet_nan():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        yield


def _frame_row(r, night) -> dict:
    """One frame's entry of the batch summary; ``night`` yields (level, shape) per calibrated frame."""
    row = {"path": r.path, "ok": r.ok, "out_path": r.out_path, "error": r.error, "error_type": r.error_type,
           "elapsed_s": r.elapsed_s, "cpu_s": r.cpu_s, "worker": r.worker}
    if r.ok:
        s = r.summary
        level, shape = next(night)
        row.update(n_standards=s["n_standards"], n_stars_used=s["n_stars_used"],
                   n_stars_rejected=s["n_stars_rejected"], rms_scatter=s["rms_scatter"],
                   level_vs_night=level, shape_rms_vs_night=shape, backend=s["backend"], summary=s)
    elif r.traceback:
        row["traceback"] = r.traceback
    return row


def batch_summary(records, wall, info, templates, options) -> dict:
    """The batch summary dict (JSON-safe) of ``records`` (FrameRecords in input order).

    ``wall`` is the batch's wall time (s), ``info`` how it ran (mode,
    scheduler, workers), ``templates`` the template spec and ``options`` the
    calibration options shared by every frame.
    """
    _, _, levels, shapes = _night_ratios(records)
    night = iter(zip(levels, shapes))
    frames = [_frame_row(r, night) for r in records]
    n_ok = sum(r.ok for r in records)
    rms = [r.summary["rms_scatter"] for r in records if r.ok and r.summary["rms_scatter"] is not None]
    summary = {
        "gpucal_version": __version__,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n_frames": len(records), "n_ok": n_ok, "n_failed": len(records) - n_ok,
        "wall_s": wall, "frames_per_minute": 60.0 * len(records) / wall if wall > 0 else None,
        "execution": info,
        "options": dict(options, templates=templates),
        "night": {
            "reference": "per-pixel median of the calibrated frames' combined vectors (measured pixels only)",
            "median_rms_scatter": float(np.median(rms)) if rms else None,
            "level_vs_night_std": float(np.nanstd(levels)) if len(levels) else None,
            "level_vs_night_range": [float(np.nanmin(levels)), float(np.nanmax(levels))] if len(levels) else None,
            "max_shape_rms_vs_night": float(np.nanmax(shapes)) if len(shapes) else None,
        },
        "frames": frames,
    }
    return _jsonable(summary)


def write_batch_summary(result: BatchResult, path) -> Path:
    """Write ``result.summary`` as JSON; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.summary, indent=2, allow_nan=False))
    return path


def _labels(records) -> list:
    return [_stem(r.path) for r in records]


def _plot_vectors(ax, records, ok, colour):
    for r in ok:
        ax.plot(r.wave, np.where(r.measured, r.cal, np.nan), lw=0.7, color=colour[id(r)], label=_stem(r.path))
    finite = np.concatenate([r.cal[np.isfinite(r.cal)] for r in ok]) if ok else np.empty(0)
    if finite.size:
        ax.set_ylim(0, 1.5 * np.percentile(finite, 99))
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("Cal (erg/s/cm²/Å per count)")
    ax.set_title(f"combined vectors: {len(ok)} of {len(records)} frames calibrated")
    if 0 < len(ok) <= 12:
        ax.legend(fontsize=7, ncol=2)


def _plot_ratios(ax, ok, wave, ratio, colour):
    for r, row in zip(ok, ratio):
        ax.plot(wave, 100.0 * (row - 1.0), lw=0.6, color=colour[id(r)])
    ax.axhline(0, color="k", lw=0.8)
    if ratio.size and np.isfinite(ratio).any():
        lim = max(1.0, 1.2 * float(np.nanpercentile(np.abs(100.0 * (ratio - 1.0)), 99)))
        ax.set_ylim(-lim, lim)
    ax.set_xlabel("wavelength (Å)")
    ax.set_ylabel("frame / night median − 1 (%)")
    ax.set_title("stability: each vector over the night's median")


def _plot_standards(ax, records, x, n_failed):
    used = np.array([r.summary["n_stars_used"] if r.ok else 0 for r in records])
    rej = np.array([r.summary["n_stars_rejected"] if r.ok else 0 for r in records])
    ax.bar(x, used, color="tab:green", label="used")
    ax.bar(x, rej, bottom=used, color="tab:orange", label="rejected")
    for i, r in enumerate(records):
        if not r.ok:
            ax.text(i, 0.1, r.error_type or "failed", rotation=90, ha="center", va="bottom", fontsize=7,
                    color="tab:red")
    ax.set_ylabel("standards")
    ax.set_title(f"standards per frame ({n_failed} frame(s) failed, shaded)")
    ax.legend(fontsize=8)


def _plot_scatter_and_level(ax, records, x, levels):
    rms = np.array([np.nan if not r.ok or r.summary["rms_scatter"] is None else 100.0 * r.summary["rms_scatter"]
                    for r in records])
    lev = np.full(len(records), np.nan)
    lev[[i for i, r in enumerate(records) if r.ok]] = 100.0 * levels
    ax.plot(x, rms, "o-", color="tab:blue", label="RMS scatter between standards")
    ax.plot(x, lev, "s--", color="tab:purple", label="level vs night median")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("%")
    ax.set_title("RMS scatter and level per frame (failed frames shaded)")
    ax.legend(fontsize=8)


def _per_frame_axis(ax, records, x, labels):
    """Failed frames shaded, frame names as ticks (at most ~40 of them)."""
    step = max(1, len(records) // 40)
    for i, r in enumerate(records):
        if not r.ok:
            ax.axvspan(i - 0.45, i + 0.45, color="tab:red", alpha=0.25, lw=0)
    ax.set_xticks(x[::step])
    ax.set_xticklabels(labels[::step], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(records) - 0.4)


def write_batch_panel(result: BatchResult, path) -> Path:
    """Write the night's PNG panel; return the path.

    Top left: every calibrated frame's combined vector (interpolated stretches
    left out). Top right: each vector over the night's median, in %. Bottom
    left: standards used and rejected per frame (failed frames marked).
    Bottom right: RMS scatter between standards and the frame's level offset
    from the night, in %.
    """
    from .qc import _plt

    plt = _plt()
    records = result.records
    ok = [r for r in records if r.ok]
    wave, ratio, levels, _ = _night_ratios(records)
    x = np.arange(len(records))
    cmap = plt.get_cmap("viridis")
    colour = {id(r): cmap(k / max(len(ok) - 1, 1)) for k, r in enumerate(ok)}

    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    _plot_vectors(axes[0, 0], records, ok, colour)
    _plot_ratios(axes[0, 1], ok, wave, ratio, colour)
    _plot_standards(axes[1, 0], records, x, result.n_failed)
    _plot_scatter_and_level(axes[1, 1], records, x, levels)
    labels = _labels(records)
    for ax in axes[1]:
        _per_frame_axis(ax, records, x, labels)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

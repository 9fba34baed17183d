"""``gpucal bench frames``: a night of frames in one process, serially and on a LocalCluster, stage by stage.

Host-side harness (it times, it does not calibrate). It builds a template grid of
``n_templates`` nodes (the 240-node demo grid, cut or tiled with jittered [α/M]
copies, written as a prepared cache so every worker memory-maps it), simulates
``n_frames`` frames of ``n_fibres`` fibres (``n_standards`` of them standards)
and ``n_pix`` pixels with their catalogues, and calibrates them with
:func:`gpucal.distributed.calibrate_frames`:

* serially in this process, then on a LocalCluster of ``workers`` processes
  (``--repeat`` times each, alternating; the fastest of each counts);
* per frame: wall and CPU seconds and the pipeline's stages (``timing_s`` of the
  frame summary: read, prepare, scan, [fit,] vectors, combine, apply, report,
  write), the first frame of a run apart from the rest (it prepares the
  working grid, or opens it from the disk cache);
* frames/min with and without the first frame and the cluster's start-up;
* ``gpucal --help`` and one frame in a fresh ``python -m gpucal.cli calibrate``
  process, first with an empty working-grid cache, then with the entry the
  first one left (what a night's first frame costs once the cache is warm);
* how many cores' worth of CPU ``workers`` busy processes really get here.

The result (a dict, written as JSON to ``bench/results/frames_<label>.json``) names
the machine: host, CPU count, label, library versions and BLAS thread settings.
Units: seconds, frames per minute.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .workcache import clear_memory

__all__ = ["run_frames_benchmark", "format_frames_report", "STAGES"]

#: The pipeline's stages, in order (``fit`` where the forward-model fit runs).
STAGES = ("read", "prepare", "scan", "fit", "vectors", "combine", "apply", "report", "write")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "astropy", "dask", "distributed", "cupy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _commit():
    """The git commit of the gpucal source being timed, where it is a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _spin(seconds: float) -> float:
    """Burn ``seconds`` of this process's CPU time; return the wall time it took."""
    t, c = time.perf_counter(), time.process_time()
    while time.process_time() - c < seconds:
        pass
    return time.perf_counter() - t


def parallel_capacity(n: int, seconds: float = 1.0) -> float:
    """Cores' worth of CPU that ``n`` concurrent busy processes actually get (``n`` on an idle machine)."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n) as pool:
        list(pool.map(_spin, [0.05] * n))  # start the processes first
        walls = list(pool.map(_spin, [seconds] * n))
    return n * seconds / max(walls)


def bench_grid(n_templates: int):
    """The demo grid cut to (the nodes nearest the simulated F/G standards), or tiled up to (copy k offset
    by 0.01·k in [α/M]), ``n_templates`` nodes."""
    from .templates.demo import demo_grid

    g = demo_grid(wave_range=(3300.0, 10500.0))
    p, f = np.asarray(g.params), np.asarray(g.flux)
    if n_templates < len(p):
        near = np.sort(np.argsort(np.abs(p[:, 0] - 6000.0) / 250.0 + np.abs(p[:, 1] - 4.25) / 0.5
                                  + np.abs(p[:, 2] + 0.25) / 0.5, kind="stable")[:n_templates])
        p, f = p[near], f[near]
        g = dataclasses.replace(g, continuum=None if g.continuum is None else np.asarray(g.continuum)[near])
    reps = -(-n_templates // len(p))
    params = np.concatenate([p + [0.0, 0.0, 0.0, 0.01 * k] for k in range(reps)])[:n_templates]
    flux = np.concatenate([f] * reps)[:n_templates]
    cont = None if g.continuum is None else np.concatenate([np.asarray(g.continuum)] * reps)[:n_templates]
    return dataclasses.replace(g, params=params, flux=flux, continuum=cont,
                               meta=dict(g.meta, source=f"demo grid, {n_templates} nodes (bench frames)"))


def _make_inputs(d: Path, n_frames, n_templates, n_standards, n_fibres, n_pix) -> tuple:
    from .io import write_frame
    from .simulate import simulate_frame, write_catalogue_csv
    from .templates import write_template_cache

    cache = write_template_cache(bench_grid(n_templates), d / "grid")
    n_sky = max(1, (n_fibres - n_standards) // 4)
    paths = []
    for seed in range(n_frames):
        sim = simulate_frame(n_standards=n_standards, n_program=max(1, n_fibres - n_standards - n_sky), n_sky=n_sky,
                             n_pix=n_pix, seed=1000 + seed)
        p = d / f"frame{seed:03d}.fits"
        write_frame(p, sim.flux, sim.var, sim.wave, sim.fibres, overwrite=True, medium="air")
        write_catalogue_csv(sim.catalogue, d / f"frame{seed:03d}_cat.csv")
        paths.append(str(p))
    return cache, paths


def _stage_medians(records) -> dict:
    laps = [r.summary.get("timing_s", {}) for r in records if r.ok and r.summary]
    names = [s for s in STAGES if any(s in lap for lap in laps)]
    names += sorted({k for lap in laps for k in lap} - set(names))
    return {s: statistics.median(lap.get(s, 0.0) for lap in laps) for s in names} if laps else {}


def after_first(records) -> tuple:
    """The steady rate once every worker has finished its first frame: (frames, seconds).

    A worker's first frame prepares (or loads) the working grid, as the first frame of a serial
    batch does; here it is left out per worker. From the last of those first frames' ends to the
    batch's last end, and the frames that ended in between. (0, 0.0) with no frame after them.
    """
    by_worker = {}
    for r in records:
        by_worker.setdefault((r.worker.get("host"), r.worker.get("pid")), []).append(r.finished_unix)
    t1 = max(min(ends) for ends in by_worker.values())
    later = [t for r in records if (t := r.finished_unix) > t1]
    return (len(later), max(later) - t1) if later else (0, 0.0)


def _per_frame(k, seconds):
    return seconds / k if k else None


def _run(paths, d: Path, name: str, workers, cache, fwhm, backend, fit="continuous") -> dict:
    from .distributed import calibrate_frames

    res = calibrate_frames(paths, outputs=d / name, workers=workers, progress=False, overwrite=True,
                           templates=cache, photometry="{dir}/{stem}_cat.csv", fwhm=fwhm, backend=backend, fit=fit)
    ex, n = res.summary["execution"], len(paths)
    wall, start = res.summary["wall_s"], ex["cluster_start_s"]
    recs = res.records
    first = recs[0].elapsed_s
    rest = recs[1:] if n > 1 else recs
    # after the first frame (and the cluster's start-up): the steady rate of a night
    steady = max(wall - start - first, 1e-9) if workers in (None, 0, 1) else max(wall - start, 1e-9)
    row = {
        "mode": ex["mode"], "n_workers": ex["n_workers"], "n_frames": n, "n_ok": res.n_ok,
        "backend": next((r.summary["backend"] for r in res.ok), None),
        "wall_s": wall, "cluster_start_s": start, "first_frame_s": first,
        "frames_per_min": 60.0 * n / wall,
        "frames_per_min_steady": 60.0 * (len(rest) if workers in (None, 0, 1) else n) / steady,
        "s_per_frame_steady": steady / (len(rest) if workers in (None, 0, 1) else n),
        # a cluster's rate once each worker has its working grid (its first frame left out)
        "s_per_frame_after_first": _per_frame(*after_first(recs)),
        "median_frame_s": statistics.median(r.elapsed_s for r in rest),
        "median_frame_cpu_s": statistics.median(r.cpu_s for r in rest),
        "stages_first_s": dict(recs[0].summary.get("timing_s", {})) if recs[0].ok else {},
        "stages_median_s": _stage_medians(rest),
    }
    if res.n_failed:
        row["errors"] = [f"{r.path}: {r.error_type}: {r.error}" for r in res.failed]
    return row


def _timed(cmd, env) -> tuple:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    return time.perf_counter() - t, proc.returncode, proc.stderr[-2000:]


def _fresh_process(d: Path, frame: str, cache: str, fwhm: float, backend, fit="continuous", environ=None) -> dict:
    """``gpucal --help`` and one frame in new processes: cold, then warm working-grid cache.

    ``environ``: their environment (default this process's), e.g. as it was before a LocalCluster
    wrote its workers' settings into this process's."""
    env = dict(os.environ if environ is None else environ, GPUCAL_WORK_CACHE=str(d / "fresh-work"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    base = [sys.executable, "-m", "gpucal.cli"]
    run = [*base, "calibrate", frame, "--templates", cache, "--photometry", frame[:-5] + "_cat.csv",
           "--fwhm", str(fwhm), "--out", str(d / "fresh.fits"), "--overwrite", "--fit", fit,
           *(["--backend", backend] if backend else [])]
    out = {"help_s": _timed([*base, "--help"], env)[0],
           "python_startup_s": _timed([sys.executable, "-c", "pass"], env)[0]}
    for name in ("cold_cache", "warm_cache"):
        wall, rc, err = _timed(run, env)
        out[f"frame_{name}_s"] = wall
        if rc:
            out[f"frame_{name}_error"] = err
    return out


def run_frames_benchmark(*, n_frames=10, n_templates=240, n_standards=20, n_fibres=40, n_pix=4000, workers=2,
                         repeat=1, fwhm=2.0, backend=None, label=None, fresh=True, fit="continuous") -> dict:
    """Time ``n_frames`` frames serially and on ``workers`` processes; see the module docstring."""
    # as the run starts: dask's nanny writes its workers' spawn environment (BLAS pins) into this
    # process's os.environ, and the load average is the machine's before this benchmark loads it
    blas_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    environ = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="gpucal-bench-frames-") as tmp:
        d = Path(tmp)
        cache, paths = _make_inputs(d, n_frames, n_templates, n_standards, n_fibres, n_pix)
        n_par = os.cpu_count() if workers == "auto" else max(int(workers), 2)
        capacity = parallel_capacity(n_par)
        runs = {"serial": [], "cluster": []}
        saved = os.environ.get("GPUCAL_WORK_CACHE")
        try:
            for i in range(repeat):  # each run starts with an empty working-grid cache: its first frame prepares
                for mode, w in (("serial", 0), ("cluster", workers)):
                    if mode == "cluster" and workers in (0, 1):
                        continue
                    os.environ["GPUCAL_WORK_CACHE"] = str(d / f"work-{mode}-{i}")
                    clear_memory()
                    runs[mode].append(_run(paths, d, mode, w, cache, fwhm, backend, fit))
        finally:
            if saved is None:
                os.environ.pop("GPUCAL_WORK_CACHE", None)
            else:
                os.environ["GPUCAL_WORK_CACHE"] = saved
        fresh_rows = _fresh_process(d, paths[0], cache, fwhm, backend, fit, environ) if fresh else None
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items() if v}
    return {
        "benchmark": "gpucal bench frames (gpucal/benchmark_frames.py)",
        "label": label or socket.gethostname(), "host": socket.gethostname(), "machine": platform.machine(),
        "processor": platform.processor() or None, "cpu_count": os.cpu_count(), "versions": _versions(),
        "blas_env": blas_env, "load_average": load,
        "parallel_capacity": {"processes": n_par, "effective_cores": capacity},
        "frame": {"n_templates": n_templates, "n_standards": n_standards, "n_fibres": n_fibres, "n_pix": n_pix,
                  "n_frames": n_frames, "fwhm": fwhm},
        "fit": fit, "forward_fit": "fit" in best.get("serial", {}).get("stages_median_s", {}),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": _commit(),
        "repeat": repeat, "best": best, "fresh_process": fresh_rows,
        "all_runs": [r for v in runs.values() for r in v],
    }


def _fmt_s(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_frames_report(r: dict) -> str:
    """The result as a few lines of text: the runs, the stage table, the fresh-process times."""
    f = r["frame"]
    lines = [f"{f['n_frames']} frames of {f['n_templates']} templates x {f['n_standards']} standards x "
             f"{f['n_pix']} px ({f['n_fibres']} fibres) on {r['label']} ({r['cpu_count']} CPUs; "
             f"{r['parallel_capacity']['processes']} busy processes get "
             f"{r['parallel_capacity']['effective_cores']:.2f} cores' worth)",
             f"{'mode':<8}{'workers':>8}{'ok':>4}{'wall s':>8}{'first s':>8}{'s/frame':>9}{'frames/min':>11}"
             f"{'cpu s/frame':>12}{'after 1st':>10}"]
    for row in r["best"].values():
        lines.append(f"{row['mode']:<8}{row['n_workers']:>8}{row['n_ok']:>4}{row['wall_s']:>8.2f}"
                     f"{row['first_frame_s']:>8.2f}{row['s_per_frame_steady']:>9.3f}"
                     f"{row['frames_per_min_steady']:>11.1f}{row['median_frame_cpu_s']:>12.3f}"
                     f"{_fmt_s(row.get('s_per_frame_after_first')):>10}")
    lines.append("s/frame: after the first frame (serial) or from the cluster's start (local); after 1st: once "
                 "every worker has finished its first frame")
    lines.append("median seconds per stage, frames after the first (first frame in brackets):")
    for row in r["best"].values():
        st, first = row["stages_median_s"], row["stages_first_s"]
        lines.append(f"  {row['mode']:<7}" + "  ".join(f"{k} {v:.3f} ({first.get(k, 0.0):.2f})" for k, v in st.items()))
    fr = r.get("fresh_process")
    if fr:
        lines.append(f"fresh process: gpucal --help {fr['help_s']:.2f} s "
                     f"(python alone {fr['python_startup_s']:.2f} s); "
                     f"one frame {fr['frame_cold_cache_s']:.2f} s with an empty working-grid cache, "
                     f"{fr['frame_warm_cache_s']:.2f} s with it warm")
    return "\n".join(lines)

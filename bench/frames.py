"""Frames per minute: serial calibrate_frames() against a dask cluster, in one run.

Simulates N demo frames (5 standards, 10 program stars, 5 sky fibres, 4000
pixels each, each with its own catalogue), calibrates them serially in this
process and then on a LocalCluster of W single-threaded worker processes (or
one worker per GPU with dask-cuda and a GPU backend), and reports frames per
minute, with and without the cluster's start-up, and their ratio. Both runs
include one template-grid load per process, as a user's run would. Serial and
cluster runs alternate ``--repeat`` times and the fastest of each counts
(shared virtual machines are noisy); per-frame CPU time beside wall time shows
when processes were starved. A CPU-bound spin in W concurrent processes
measures how many cores' worth of CPU the machine really delivers, which caps
the speed-up.

    python bench/frames.py                      # 8 frames, serial vs 2 workers, numpy
    python bench/frames.py --backend cupy --workers auto --label h100

Writes bench/results/frames_<label>.json (label: the host name by default).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gpucal.distributed import calibrate_frames
from gpucal.io import write_frame
from gpucal.simulate import simulate_frame, write_catalogue_csv

RESULTS = Path(__file__).resolve().parent / "results"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "dask", "distributed", "cupy", "dask_cuda"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    return out


def _spin(seconds: float) -> float:
    """Burn ``seconds`` of this process's CPU time; return the wall time it took."""
    t, c = time.perf_counter(), time.process_time()
    while time.process_time() - c < seconds:
        pass
    return time.perf_counter() - t


def _parallel_capacity(n: int, seconds: float = 1.0) -> float:
    """Cores' worth of CPU that ``n`` concurrent processes actually get (n on an idle, unshared machine):
    a virtual machine's vCPUs may deliver less, which caps any multi-process speed-up."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(n) as pool:
        list(pool.map(_spin, [0.05] * n))  # start the processes first
        walls = list(pool.map(_spin, [seconds] * n))
    return n * seconds / max(walls)


def _make_frames(d: Path, n: int) -> list:
    paths = []
    for seed in range(n):
        sim = simulate_frame(seed=1000 + seed)
        p = d / f"frame{seed:03d}.fits"
        write_frame(p, sim.flux, sim.var, sim.wave, sim.fibres, overwrite=True)
        write_catalogue_csv(sim.catalogue, d / f"frame{seed:03d}_cat.csv")
        paths.append(str(p))
    return paths


def _run(paths, d: Path, name: str, workers, backend) -> tuple:
    res = calibrate_frames(paths, outputs=d / name, workers=workers, progress=False, overwrite=True,
                           templates="demo", photometry="{dir}/{stem}_cat.csv", fwhm=2.0, backend=backend)
    ex = res.summary["execution"]
    wall, start = res.summary["wall_s"], ex["cluster_start_s"]
    n = len(paths)
    row = {
        "mode": ex["mode"], "n_workers": ex["n_workers"], "n_frames": n, "n_ok": res.n_ok,
        "backend": next((r.summary["backend"] for r in res.ok), None),
        "wall_s": wall, "cluster_start_s": start,
        "frames_per_min": 60.0 * n / wall,
        "frames_per_min_excl_start": 60.0 * n / (wall - start),
        "median_frame_s": float(np.median([r.elapsed_s for r in res.records])),
        "median_frame_cpu_s": float(np.median([r.cpu_s for r in res.records])),
    }
    if res.n_failed:
        row["errors"] = [f"{r.path}: {r.error_type}: {r.error}" for r in res.failed]
    return row, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=8, help="number of demo frames (default 8)")
    ap.add_argument("--workers", default="2",
                    help="cluster size: a number, 'auto' (one per core or GPU), or 0 to skip the cluster run")
    ap.add_argument("--backend", default="numpy", help="array backend for every frame (default numpy)")
    ap.add_argument("--repeat", type=int, default=2, help="alternate serial and cluster runs this often; "
                    "the fastest of each counts (default 2)")
    ap.add_argument("--label", default=None, help="result label (default: the host name)")
    args = ap.parse_args(argv)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", args.label or socket.gethostname())
    workers = args.workers if args.workers == "auto" else int(args.workers)

    with tempfile.TemporaryDirectory(prefix="gpucal-bench-frames-") as tmp:
        d = Path(tmp)
        paths = _make_frames(d, args.frames)
        n_par = os.cpu_count() if workers == "auto" else max(int(workers), 2)
        capacity = _parallel_capacity(n_par)
        runs = {"serial": [], "cluster": []}
        for _ in range(args.repeat):
            runs["serial"].append(_run(paths, d, "serial", 0, args.backend))
            if workers not in (0, 1):
                runs["cluster"].append(_run(paths, d, "cluster", workers, args.backend))
    best = {k: min(v, key=lambda rr: rr[0]["wall_s"]) for k, v in runs.items() if v}
    serial, sres = best["serial"]
    comparison = None
    if "cluster" in best:
        cluster, cres = best["cluster"]
        diffs = [float(np.nanmax(np.abs(a.cal / b.cal - 1.0))) for a, b in zip(sres.records, cres.records)
                 if a.ok and b.ok]
        comparison = {
            "ratio_frames_per_min": cluster["frames_per_min"] / serial["frames_per_min"],
            "ratio_frames_per_min_excl_start": cluster["frames_per_min_excl_start"] / serial["frames_per_min"],
            # Workers run BLAS on one thread; the serial run uses this process's BLAS threads.
            "max_rel_diff_cal_serial_vs_cluster": max(diffs) if diffs else None,
        }
    all_runs = [rr[0] for v in runs.values() for rr in v]
    best_runs = [b[0] for b in best.values()]

    result = {
        "benchmark": "frames per minute, serial vs dask cluster (bench/frames.py)",
        "label": label, "host": socket.gethostname(), "machine": platform.machine(),
        "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
        "versions": _versions(),
        "blas_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "parallel_capacity": {"processes": n_par, "effective_cores": capacity},
        "frame": {"n_fibre": 20, "n_standards": 5, "n_pix": 4000},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "repeat": args.repeat, "best": best_runs, "comparison": comparison, "all_runs": all_runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"frames_{label}.json"
    out.write_text(json.dumps(result, indent=2))

    print(f"{args.frames} demo frames on {socket.gethostname()} ({os.cpu_count()} CPUs), backend {args.backend}; "
          f"{n_par} CPU-bound processes get {capacity:.2f} cores' worth of CPU here")
    print(f"best of {args.repeat}:")
    print(f"{'mode':<12}{'workers':>8}{'ok':>5}{'wall s':>9}{'start s':>9}{'frames/min':>12}"
          f"{'excl start':>12}{'s/frame':>9}{'cpu s/frame':>13}")
    for r in best_runs:
        print(f"{r['mode']:<12}{r['n_workers']:>8}{r['n_ok']:>5}{r['wall_s']:>9.2f}{r['cluster_start_s']:>9.2f}"
              f"{r['frames_per_min']:>12.1f}{r['frames_per_min_excl_start']:>12.1f}{r['median_frame_s']:>9.2f}"
              f"{r['median_frame_cpu_s']:>13.2f}")
    if comparison:
        print(f"cluster / serial: {comparison['ratio_frames_per_min']:.2f}x "
              f"({comparison['ratio_frames_per_min_excl_start']:.2f}x excluding cluster start-up); "
              f"max |Δcal/cal| serial vs cluster {comparison['max_rel_diff_cal_serial_vs_cluster']:.1e}")
    print(f"wrote {out}")
    return 0 if all(r["n_ok"] == r["n_frames"] for r in all_runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: preparing a BOSZ-format template grid vs a plain ``numpy.loadtxt`` loop, and loading the cache.

Generates N BOSZ 2024 files (gzip text, shared wavelength file, release
layout) from gpucal's demo models at R = 10 000 over 3000-11000 Å
(Δlnλ = 1/20000, 26 000 lines each) in a temporary directory, then times

* ``loadtxt loop``: ``numpy.loadtxt`` of every file, whole, one after another
  (the reference: what a per-file reader does);
* ``prepare`` with 1 worker and with one worker per CPU: index, parse only the
  window the default frame + g r i z + ±500 km/s needs, F = 4πH, resample onto
  the log-uniform working grid (:func:`gpucal.templates.cache.prepare_bosz_grid`);
* ``prepare + cache``: the same with the float32 ``.npy`` + JSON cache written;
* ``cache load``: opening the cache (sidecar, memory maps, input check by
  stat) and reading all of its flux into memory.

Writes ``bench/results/prepare_<machine>.json`` and prints a table.

    python bench/prepare.py [--n 100] [--machine NAME] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

import numpy as np


def _best(fn, repeat):
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="number of template files (default 100)")
    ap.add_argument("--machine", default=None, help="machine name for the results file (default: host name)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions, best time kept (default 3)")
    ap.add_argument("--workers", type=int, default=None, help="parallel workers (default: the CPUs)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    import gpucal
    from gpucal.templates.bosz import index_bosz, write_demo_bosz_tree
    from gpucal.templates.cache import load_template_cache, prepare_bosz_grid, prepare_template_cache

    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.machine or platform.node() or "unknown")
    n_cpu = os.cpu_count() or 1
    workers = args.workers or n_cpu
    # 100 nodes: 10 Teff x 5 logg x 2 [M/H] (more nodes when --n asks for them)
    n_teff = max(10, int(np.ceil(args.n / 10)))
    teff = 4500.0 + 250.0 * np.arange(n_teff)
    logg, mh = (3.0, 3.5, 4.0, 4.5, 5.0), (-0.5, 0.0)

    with tempfile.TemporaryDirectory(prefix="gpucal-bench-") as tmp:
        root = os.path.join(tmp, "bosz")
        t0 = time.perf_counter()
        paths = write_demo_bosz_tree(root, teff=teff, logg=logg, mh=mh, resolution=10000,
                                     wave_range=(3000.0, 11000.0), dlnlam=1.0 / 20000.0)
        paths = sorted(paths)[: args.n]
        t_gen = time.perf_counter() - t0
        # keep exactly N files in the tree so every method reads the same set
        keep = set(paths)
        for p in list(index_bosz(root).models):
            if p.path not in keep:
                os.remove(p.path)
        n_files = len(paths)
        wave_file = index_bosz(root).wave_file
        n_lines = int(np.loadtxt(wave_file).size)
        size_gz = sum(os.path.getsize(p) for p in paths)

        def loadtxt_loop():
            w = np.loadtxt(wave_file)
            return w, [np.loadtxt(p) for p in paths]

        t_loop, _ = _best(loadtxt_loop, args.repeat)
        t_prep1, grid = _best(lambda: prepare_bosz_grid(root, workers=1, progress=False), args.repeat)
        t_prepn, _ = _best(lambda: prepare_bosz_grid(root, workers=workers, progress=False), args.repeat)
        cache = os.path.join(tmp, "cache")
        t_cache, _ = _best(lambda: prepare_template_cache(root, cache, overwrite=True, workers=workers,
                                                          progress=False), args.repeat)

        def load_all():
            g = load_template_cache(cache, verify="stat")
            return float(np.asarray(g.flux, dtype=np.float32).sum())

        t_open, _ = _best(lambda: load_template_cache(cache, verify="stat"), args.repeat)
        t_load, _ = _best(load_all, args.repeat)
        cache_bytes = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))

    result = {
        "benchmark": "prepare",
        "machine": machine,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": n_cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpucal": gpucal.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_files": n_files,
        "lines_per_file": n_lines,
        "resolution": 10000,
        "file_range_angstrom": [3000.0, 11000.0],
        "gzip_bytes": size_gz,
        "grid": {"n_templates": grid.n_templates, "n_wave": int(grid.wave.size),
                 "wave_range": [float(grid.wave[0]), float(grid.wave[-1])], "dlnlam": grid.dlnlam,
                 "cache_bytes": cache_bytes},
        "workers": workers,
        "repeat": args.repeat,
        "generate_s": t_gen,
        "timings_s": {
            "loadtxt_loop": t_loop,
            "prepare_1_worker": t_prep1,
            f"prepare_{workers}_workers": t_prepn,
            f"prepare_and_cache_{workers}_workers": t_cache,
            "cache_open": t_open,
            "cache_load_all_flux": t_load,
        },
        "speedup_vs_loadtxt_loop": {
            "prepare_1_worker": t_loop / t_prep1,
            f"prepare_{workers}_workers": t_loop / t_prepn,
            "cache_load_all_flux": t_loop / t_load,
        },
        "notes": "loadtxt loop parses every line of every file; prepare parses the lines of the working window "
                 f"({grid.wave[0]:.0f}-{grid.wave[-1]:.0f} Å) and also resamples and hashes every file. "
                 "Best of `repeat` runs; files in the page cache.",
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"prepare_{machine}.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)

    rows = [
        ("numpy.loadtxt loop (all lines)", t_loop, 1.0),
        ("prepare, 1 worker", t_prep1, t_loop / t_prep1),
        (f"prepare, {workers} workers", t_prepn, t_loop / t_prepn),
        (f"prepare + write cache, {workers} workers", t_cache, t_loop / t_cache),
        ("cache open (memmap, stat check)", t_open, t_loop / t_open),
        ("cache open + read all flux", t_load, t_loop / t_load),
    ]
    print(f"{n_files} BOSZ-format files, R=10000, {n_lines} lines each, {size_gz / 1e6:.1f} MB gzip; "
          f"machine {machine}, {n_cpu} CPUs")
    print(f"grid: {grid.n_templates} x {grid.wave.size} px, {grid.wave[0]:.0f}-{grid.wave[-1]:.0f} Å, "
          f"cache {cache_bytes / 1e6:.1f} MB")
    print(f"{'step':44s} {'time [s]':>9s} {'files/s':>9s} {'vs loop':>8s}")
    for name, t, sp in rows:
        print(f"{name:44s} {t:9.3f} {n_files / t:9.1f} {sp:7.1f}x")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the grid scan against the reference loop and a plain matrix product.

``gpucal bench`` (see :mod:`gpucal.benchmark` for what is timed and how) with
two defaults of its own: the NumPy backend, and the JSON written to
bench/results/scan_<label>.json (``--label``, default <backend>-<host>):

    python bench/scan.py                                 # CPU: 520 templates x 201 velocities x 32 stars
    python bench/scan.py --memory-check 160M             # plus a memory-mapped grid 10x the budget
    python bench/scan.py --backend cupy --templates 20800 --ref-templates 520 --label cupy-h200
"""

import socket
import sys
from pathlib import Path

from gpucal.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    label = None
    if "--label" in args:
        i = args.index("--label")
        label = args[i + 1]
        del args[i:i + 2]
    if "--backend" not in args:
        args += ["--backend", "numpy"]
    backend = args[args.index("--backend") + 1]
    if "--out" not in args:
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        args += ["--out", str(results / f"scan_{label or f'{backend}-{socket.gethostname()}'}.json")]
    sys.exit(main(["bench", *args]))

"""Benchmark of the grid scan against the reference loop and a plain matrix product.

The same as ``gpucal bench`` (see :mod:`gpucal.benchmark` for what is timed
and how), writing its JSON to bench/results/scan_<label>.json:

    python bench/scan.py                                 # CPU: 520 templates x 201 velocities x 32 stars
    python bench/scan.py --memory-check 64M              # plus a memory-mapped grid 10x the budget
    python bench/scan.py --backend cupy --templates 20800 --ref-templates 520 --label cupy-h200
"""

import sys
from pathlib import Path

from gpucal.benchmark import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_out=Path(__file__).resolve().parent / "results"))

"""Frames per minute, stage by stage: ``gpucal bench frames`` (gpucal/benchmark_frames.py) as a script.

N simulated frames (default 10 frames of 240 templates x 20 standards x 4000 pixels, 40 fibres)
calibrated in one process serially and on a LocalCluster of W workers; per-frame seconds by stage
(read, prepare, scan, fit, vectors, combine, apply, report, write), frames/min after the first frame,
a fresh process's time for one frame (working-grid cache cold, then warm), and how many cores' worth
of CPU W busy processes really get here.

    PYTHONPATH=$PWD python3 bench/frames.py --label vm-shared            # 2 workers, numpy
    PYTHONPATH=$PWD python3 bench/frames.py --backend cupy --workers 0 --templates 20800 --label h200

Writes bench/results/frames_<label>.json (label: the host name by default). Every option:
``gpucal bench frames --help``.
"""

import sys

from gpucal.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "frames", *sys.argv[1:]]))

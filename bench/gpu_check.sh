#!/usr/bin/env bash
# One prepared GPU session: the test suite's cupy cases (the working-grid cache and,
# once merged, the forward fit among them), the scan benchmark at GPU size, the demo
# and the frames benchmark on cupy (gpucal bench frames, 20 800 and 240 templates). Wheels the GPU image
# lacks travel in .whl/ (see the device tool's README); results go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpucal-gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -m gpucal.cli info 2>&1 | tee -a "$OUT/device.txt"
timeout 180 python3 -m pytest -q -p no:cacheprovider -k cupy \
  tests/test_backends.py tests/test_select.py tests/test_calibration.py tests/test_matching.py \
  tests/test_end_to_end.py tests/test_photometry.py tests/test_lsf.py tests/test_bosz.py tests/test_extinction.py \
  tests/test_masks.py tests/test_workcache.py $(ls tests/test_forward*.py 2>/dev/null) \
  2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 bench/scan.py --backend cupy --templates 20800 --ref-templates 520 --max-memory 32G \
  --label cupy-gpu 2>&1 | tail -12 | tee "$OUT/scan_gpu.txt"
timeout 90 python3 bench/scan.py --backend cupy --templates 520 --max-memory 32G --label cupy-gpu-520 \
  --memory-check 256M \
  2>&1 | tail -12 | tee "$OUT/scan_gpu_520.txt"
cp bench/results/scan_cupy-gpu*.json "$OUT/" 2>/dev/null
timeout 45 python3 -m gpucal.cli demo --backend cupy --out /tmp/demo-gpu --no-plots 2>&1 | tail -9 | tee "$OUT/demo_gpu.txt"
# Frames end to end (issue 17): 10 frames of 20 800 templates x 20 standards x 4000 px in one process
# (the first prepares the working grid on the GPU, the rest find it cached), then the demo size; stage
# table, frames/s = 60 / s_per_frame_steady; the fresh-process rows time one frame cold and warm.
export GPUCAL_WORK_CACHE=/tmp/gpucal-work
# (Worst case, every timeout reached, the script runs past the device tool's 600 s per command:
# split it in two calls there, or drop the 520-template scan.)
timeout 150 python3 bench/frames.py --backend cupy --workers 0 --frames 10 --templates 20800 --label cupy-gpu-20800 \
  2>&1 | tail -9 | tee "$OUT/frames_gpu_20800.txt"
timeout 45 python3 bench/frames.py --backend cupy --workers 0 --frames 10 --templates 240 --no-fresh --label cupy-gpu-240 \
  2>&1 | tail -8 | tee "$OUT/frames_gpu_240.txt"
cp bench/results/frames_cupy-gpu*.json "$OUT/" 2>/dev/null
ls "$OUT"

"""Many frames: one calibrate_frame() per frame, as dask.distributed tasks.

Step: N reduced FITS frames in -> N calibrated frames out (written by the
workers), and one FrameRecord per frame (host data: the frame's summary dict
and its combined calibration vector Cal(λ), erg/s/cm²/Å per count on the
frame's wavelength grid in Å). The night report built from the records — a
batch summary (JSON) and a PNG panel — lives in :mod:`gpucal.report.night`.

Execution
---------
* serial (``workers`` None, 0 or 1 and no ``scheduler``): frames run one after
  another in this process; dask is not needed.
* ``workers=N`` (N >= 2) or ``"auto"``: a LocalCluster of single-threaded
  worker processes (``"auto"``: one per core), or dask-cuda's
  LocalCUDACluster with one worker per GPU when dask-cuda is installed, a GPU
  is visible and the backend runs on GPUs (``cupy``, ``torch``, or
  ``auto`` with CuPy installed). BLAS/OpenMP pools in the worker processes
  are set to one thread, since the processes already fill the cores.
* ``scheduler=ADDRESS`` (or a scheduler JSON file, or a ``distributed.Client``):
  an existing cluster (SLURM via dask-jobqueue, ``dask scheduler`` by hand).

Tasks carry paths and the template *spec* (``"demo"`` or a path), never the
template arrays: each worker process loads the grid once and keeps it in a
module-level cache. A task returns only small host data (the frame's summary
dict and its combined vector), never the calibrated frame, which the worker
writes to disk itself. A frame that fails, with a GpucalError or anything
unexpected, becomes a record with the error's type and message; the other
frames go on.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import logging
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .containers import FrameRecord, BatchResult
from .errors import BackendError, GpucalError, InputError
from .report.night import batch_summary, write_batch_panel, write_batch_summary

__all__ = [
    "calibrate_frames",
    "write_batch_summary",
    "write_batch_panel",
    "default_output_path",
]

logger = logging.getLogger("gpucal")

_INSTALL_HINT = "install it with: pip install 'gpucal[dist]'"

#: Thread pools of numerical libraries pinned to one thread in LocalCluster
#: worker processes (one process per core already fills the machine).
_ONE_THREAD_ENV = {name: "1" for name in (
    "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS",
)}

_PLACEHOLDERS = ("{stem}", "{dir}")


# --------------------------------------------------------------------------- records


# --------------------------------------------------------------------------- worker side


@functools.lru_cache(maxsize=4)
def _worker_templates(spec: str):
    """The template grid for ``spec``, loaded once per process (module-level cache)."""
    from .pipeline import load_templates

    return load_templates(spec)


def _worker_info(options: dict) -> dict:
    """The process that ran a task, and the calibrate_frame options it received (templates and out aside)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "template_loads": _worker_templates.cache_info().misses, "options": dict(options)}


def _stem(path: str) -> str:
    return Path(path).with_suffix("").name


def _calibrate_one(path: str, out: str, templates, options: dict, qc_dir: str | None = None,
                   links: dict | None = None) -> FrameRecord:
    """Calibrate one frame and return its FrameRecord; never raises (runs on a worker).

    With ``qc_dir``, the frame's QA images and page go to ``qc_dir/<stem>/``, its page linked
    by ``links`` (night, previous, next)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        from .pipeline import calibrate_frame

        grid = _worker_templates(templates) if isinstance(templates, str) else templates
        res = calibrate_frame(path, templates=grid, out=out, **options)
        if qc_dir is not None:
            from .report.html import write_frame_qa

            write_frame_qa(res, Path(qc_dir) / _stem(path), links=links)
    except Exception as exc:  # one frame's failure, whatever it is, must not stop the batch
        return FrameRecord(
            path=path, ok=False, error=str(exc), error_type=type(exc).__name__,
            traceback=None if isinstance(exc, GpucalError) else traceback.format_exc(),
            elapsed_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, worker=_worker_info(options),
            finished_unix=time.time(),
        )
    return FrameRecord(
        path=path, ok=True, out_path=res.out_path, summary=res.summary,
        wave=np.asarray(res.wave, dtype=np.float64), cal=np.asarray(res.cal, dtype=np.float64),
        cal_var=np.asarray(res.cal_var, dtype=np.float64), measured=np.asarray(res.measured, dtype=bool),
        elapsed_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, worker=_worker_info(options),
        finished_unix=time.time(),
    )


# --------------------------------------------------------------------------- client side


def default_output_path(path: str) -> str:
    """``<frame>_fluxcal.fits`` next to the frame: the output of a frame given no output path
    (here and in single-frame ``gpucal calibrate``)."""
    return str(Path(path).with_suffix("")) + "_fluxcal.fits"


def _resolve_outputs(paths: list, outputs) -> list:
    if outputs is None:
        outs = [default_output_path(p) for p in paths]
    elif isinstance(outputs, (str, os.PathLike)):
        d = Path(outputs)
        if d.exists() and not d.is_dir():
            raise InputError(f"outputs={str(d)!r} is a file; give a directory or one output path per frame")
        d.mkdir(parents=True, exist_ok=True)
        outs = [str(d / (_stem(p) + "_fluxcal.fits")) for p in paths]
    else:
        outs = [os.fspath(o) for o in outputs]
        if len(outs) != len(paths):
            raise InputError(f"outputs: {len(outs)} path(s) for {len(paths)} frame(s)")
    seen = {}
    for p, o in zip(paths, outs):
        key = os.path.abspath(o)
        if key in seen:
            raise InputError(f"frames {seen[key]} and {p} would both be written to {o}")
        if key == os.path.abspath(p):
            raise InputError(f"{p}: the output would overwrite the input frame")
        seen[key] = p
    return outs


def _per_frame_photometry(paths: list, photometry) -> list:
    """One photometry argument per frame: a shared value, a sequence, or a path
    pattern with ``{stem}`` / ``{dir}`` filled in from each frame's path."""
    if isinstance(photometry, (list, tuple)):
        if len(photometry) != len(paths):
            raise InputError(f"photometry: {len(photometry)} catalogue(s) for {len(paths)} frame(s)")
        return list(photometry)
    if isinstance(photometry, (str, os.PathLike)):
        text = os.fspath(photometry)
        if any(tok in text for tok in _PLACEHOLDERS):
            return [text.replace("{stem}", _stem(p)).replace("{dir}", str(Path(p).parent)) for p in paths]
        return [text] * len(paths)
    return [photometry] * len(paths)


def _check_options(options: dict) -> None:
    from .pipeline import calibrate_frame

    allowed = set(inspect.signature(calibrate_frame).parameters) - {"frame", "out"}
    for key in options:
        if key == "out":
            raise InputError("calibrate_frames: use outputs=, not out=")
        if key not in allowed:
            raise InputError(f"calibrate_frames: unknown calibration option {key!r} "
                             f"(calibrate_frame accepts {', '.join(sorted(allowed))})")


def _parse_workers(workers):
    """None, 0, 1 -> None (serial); 'auto' -> 'auto'; N >= 2 -> N."""
    if workers is None:
        return None
    if isinstance(workers, str):
        if workers.strip().lower() == "auto":
            return "auto"
        try:
            workers = int(workers)
        except ValueError:
            raise InputError(f"workers: expected a number or 'auto', got {workers!r}") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise InputError(f"workers: expected a non-negative number or 'auto', got {workers!r}")
    return workers if workers >= 2 else None


def _import_distributed(what: str):
    try:
        import distributed
    except ImportError:
        raise BackendError(f"{what} needs dask.distributed, which is not installed; {_INSTALL_HINT}") from None
    return distributed


def _wants_gpu(backend) -> bool:
    """Whether frames would run on a GPU: a GPU backend asked for, or "auto" with CuPy installed."""
    name = (getattr(backend, "name", backend) or os.environ.get("GPUCAL_BACKEND") or "auto").strip().lower()
    if name == "auto":
        return importlib.util.find_spec("cupy") is not None
    return name in ("cupy", "torch")


def _n_gpus() -> int:
    try:
        from dask_cuda.utils import get_n_gpus
    except ImportError:
        return 0
    try:
        return int(get_n_gpus())
    except Exception:  # no driver, no NVML: no GPU workers
        return 0


@contextlib.contextmanager
def _client(workers, scheduler, backend):
    """Yield (client, info) for a LocalCluster / LocalCUDACluster / existing scheduler."""
    what = f"workers={workers!r}" if scheduler is None else f"scheduler={scheduler!r}"
    distributed = _import_distributed(what)
    with _quiet_dask_logs():
        if scheduler is None:
            cluster, mode = _local_cluster(distributed, workers, backend)
            with cluster, distributed.Client(cluster) as client:
                logger.info("dask %s cluster: %d worker(s), scheduler %s%s", mode, len(client.nthreads()),
                            cluster.scheduler_address,
                            f", dashboard {client.dashboard_link}" if importlib.util.find_spec("bokeh") else "")
                yield client, {"mode": mode, "scheduler": cluster.scheduler_address}
        elif isinstance(scheduler, distributed.Client):
            yield scheduler, {"mode": "client", "scheduler": scheduler.scheduler.address}
        else:
            text = os.fspath(scheduler)
            # A scheduler file may not exist yet while the scheduler starts: the client waits for it.
            kw = {"scheduler_file": text} if text.endswith(".json") else {"address": text}
            try:
                client = distributed.Client(timeout="30s", **kw)
            except (OSError, TimeoutError) as exc:
                raise GpucalError(f"cannot connect to the dask scheduler {text!r}: {exc}") from None
            with client:
                yield client, {"mode": "scheduler", "scheduler": client.scheduler.address}


@contextlib.contextmanager
def _quiet_dask_logs():
    # distributed logs every worker start and stop at INFO on its own handler; keep them for --debug.
    log = logging.getLogger("distributed")
    level = log.level
    if not logger.isEnabledFor(logging.DEBUG):
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def _local_cluster(distributed, workers, backend):
    """A LocalCUDACluster (one worker per GPU) when dask-cuda, a GPU and a GPU-capable backend are there,
    else a LocalCluster of single-threaded processes; returns (cluster, mode)."""
    n_gpu = _n_gpus() if _wants_gpu(backend) else 0
    if n_gpu:
        from dask_cuda import LocalCUDACluster

        if workers != "auto" and workers > n_gpu:
            raise InputError(f"workers={workers}: only {n_gpu} GPU(s) visible, one worker per GPU at most "
                             "(use --backend numpy for CPU workers)")
        return LocalCUDACluster(n_workers=None if workers == "auto" else workers, threads_per_worker=1,
                                dashboard_address=":0"), "local-cuda"
    import dask
    from dask.system import CPU_COUNT

    n = CPU_COUNT if workers == "auto" else workers
    # ":0": the scheduler's HTTP server (and dashboard, when bokeh is installed) on a free port,
    # so that several batches on one machine do not contend for 8787.
    with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environ()}):
        return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                        env=dict(_ONE_THREAD_ENV)), "local"


def _worker_environ() -> dict:
    """The environment each LocalCluster worker process is spawned with: dask's own, the thread pools
    pinned to one thread, and the allocator settings of :mod:`gpucal.heap` instead of dask's
    ``MALLOC_TRIM_THRESHOLD_=65536`` (none under ``GPUCAL_MALLOC=system``).

    That setting fixes glibc's mmap threshold at its 128 KiB default, so every temporary of a frame's
    (n_star, n_pix) arrays (640 KB at 20 x 4000) is a fresh mmap, zeroed page by page: measured on the
    2-core VM, the same NumPy loop took 0.87 s of CPU with it and 0.24 s without, and a frame in a
    worker 2.6 CPU-s against 0.89 in one process (bench frames, 240 x 20 x 4000). A worker holds its
    working grids for the whole batch anyway; what trimming would return to the system is small.
    """
    import dask

    from .heap import MALLOC_ENV

    env = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ", default=None) or {}).items()
           if k != "MALLOC_TRIM_THRESHOLD_"}
    system = os.environ.get("GPUCAL_MALLOC", "").strip().lower() == "system"
    return {**env, **_ONE_THREAD_ENV, **({} if system else MALLOC_ENV)}


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A tqdm bar on stderr; log lines printed meanwhile go above it rather than through it."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with tqdm(total=total, desc="gpucal", unit="frame", disable=not enabled, file=sys.stderr) as bar:
        if not enabled:
            yield bar
            return
        with logging_redirect_tqdm():
            yield bar


def _run_serial(jobs, on_done) -> None:
    for i, args in jobs:
        on_done(i, _calibrate_one(*args))


def _run_cluster(client, jobs, on_done) -> None:
    from distributed import as_completed

    futures = {}
    for i, args in jobs:
        fut = client.submit(_calibrate_one, *args, key=f"gpucal-calibrate-{i}-{_stem(args[0])}", pure=False)
        futures[fut] = i
    for fut in as_completed(list(futures)):
        i = futures.pop(fut)
        try:
            rec = fut.result()
        except Exception as exc:  # the worker died or the task could not run at all
            rec = FrameRecord(path=jobs[i][1][0], ok=False, error=str(exc) or repr(exc),
                              error_type=type(exc).__name__)
        on_done(i, rec)
        fut.release()


def _plan(paths, outputs, workers, scheduler, qc_dir, calibrate_kwargs):
    """Check every argument before any work; return (paths, jobs, templates, options, workers).

    ``jobs`` is a list of ``(index, (path, out, templates, options, qc_dir))``,
    the arguments of :func:`_calibrate_one`; ``options`` are the options every
    frame shares (photometry aside, resolved per frame).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise InputError("calibrate_frames: no frames given")
    _check_options(calibrate_kwargs)
    outs = _resolve_outputs(paths, outputs)
    workers = _parse_workers(workers)
    distributed_run = scheduler is not None or workers is not None
    options = dict(calibrate_kwargs)
    templates = options.pop("templates", "demo")
    if isinstance(templates, os.PathLike):
        templates = os.fspath(templates)
    if distributed_run and not isinstance(templates, str):
        raise InputError("on a cluster, templates must be a spec ('demo' or a path) that each worker loads "
                         f"once, not a {type(templates).__name__}")
    if distributed_run and "backend" in options and not isinstance(options["backend"], (str, type(None))):
        options["backend"] = options["backend"].name  # a Backend holds a module: send its name
    phot = _per_frame_photometry(paths, options.pop("photometry", None))
    qc = None if qc_dir is None else os.fspath(qc_dir)
    jobs = [(i, (p, o, templates, dict(options, photometry=ph), qc, _page_links(paths, i)))
            for i, (p, o, ph) in enumerate(zip(paths, outs, phot))]
    return paths, jobs, templates, options, workers


def _run(jobs, n_frames, workers, scheduler, backend, progress):
    """Run the jobs serially (``workers`` and ``scheduler`` None) or on a cluster; return
    (records in input order, execution info, wall seconds)."""
    records = [None] * n_frames
    t0 = time.perf_counter()
    info = {"mode": "serial", "scheduler": None, "n_workers": 1, "cluster_start_s": 0.0}
    with _progress(n_frames, progress) as bar:
        n_failed = 0

        def on_done(i, rec):
            nonlocal n_failed
            records[i] = rec
            if not rec.ok:
                n_failed += 1
                bar.set_postfix(failed=n_failed, refresh=False)
                logger.warning("%s failed: %s: %s", rec.path, rec.error_type, rec.error)
            bar.update(1)

        if scheduler is None and workers is None:
            _run_serial(jobs, on_done)
        else:
            with _client(workers, scheduler, backend) as (client, cinfo):
                info.update(cinfo, cluster_start_s=time.perf_counter() - t0, n_workers=len(client.nthreads()))
                _run_cluster(client, jobs, on_done)
    return records, info, time.perf_counter() - t0


def calibrate_frames(paths, *, outputs=None, workers=None, scheduler=None, progress=True,
                     summary_path=None, panel_path=None, qc_dir=None, **calibrate_kwargs) -> BatchResult:
    """Flux-calibrate many frames, serially or as tasks on a dask cluster.

    Parameters
    ----------
    paths : sequence of FITS frame paths.
    outputs : None (``<frame>_fluxcal.fits`` next to each frame), a directory
        (``<dir>/<stem>_fluxcal.fits``), or one output path per frame.
    workers : None, 0 or 1: serial, in this process (dask not needed);
        N >= 2: a LocalCluster of N single-threaded processes (or N GPU
        workers, see the module docstring); ``"auto"``: one per core or GPU.
    scheduler : address (``tcp://host:8786``), scheduler JSON file, or a
        ``distributed.Client`` of an existing cluster; overrides ``workers``.
    progress : show a tqdm progress bar (stderr).
    summary_path, panel_path : where to write the batch JSON and PNG panel.
    qc_dir : write each frame's QA images, page and report.json into ``qc_dir/<stem>/``
        (linked to the previous and next frames and to the night), and the night page
        ``qc_dir/index.html`` with night.json and night.png, linking every calibrated frame.
    **calibrate_kwargs : passed to :func:`gpucal.pipeline.calibrate_frame`
        (``templates``, ``photometry``, ``fwhm``, ``backend``, ``overwrite``,
        ...). ``templates`` must be a spec (``"demo"`` or a path) on a cluster,
        so that each worker loads the grid once. ``photometry`` may be one
        catalogue for all frames, one per frame (a sequence), or a pattern
        with ``{stem}`` and ``{dir}`` taken from each frame's path.

    Returns
    -------
    BatchResult. A frame that fails is a record with ``ok=False``, its error
    message and type; it never stops the others.

    Raises
    ------
    InputError for bad arguments, BackendError when a cluster is asked for
    and dask.distributed is not installed.
    """
    paths, jobs, templates, options, workers = _plan(paths, outputs, workers, scheduler, qc_dir, calibrate_kwargs)
    records, info, wall = _run(jobs, len(paths), workers, scheduler, options.get("backend"), progress)

    summary = batch_summary(records, wall, info, templates, options)
    result = BatchResult(records=records, summary=summary)
    if summary_path is not None:
        result.summary_path = str(write_batch_summary(result, summary_path))
    if panel_path is not None:
        result.panel_path = str(write_batch_panel(result, panel_path))
    if qc_dir is not None:
        summary["night_page"] = str(_night_page(result, qc_dir))
    return result


def _page_links(paths: list, i: int) -> dict:
    """A frame page's links (relative to ``qc_dir/<stem>/``): the night page, the previous and next frames."""
    def page(j):
        return f"../{_stem(paths[j])}/index.html" if 0 <= j < len(paths) else None

    return {"night": "../index.html", "previous": page(i - 1), "next": page(i + 1)}


def _night_page(result: BatchResult, qc_dir) -> Path:
    """The night page ``qc_dir/index.html`` (and night.json, night.png), linking each calibrated frame's page."""
    from .report.html import relink_frame_pages, write_night_report

    panel = write_batch_panel(result, Path(qc_dir) / "night.png")
    have = set(relink_frame_pages(qc_dir, [_stem(r.path) for r in result.records if r.ok]))
    pages = {r.path: f"{_stem(r.path)}/index.html" for r in result.records if r.ok and _stem(r.path) in have}
    captions = {"night.png": "Combined vectors, stability against the night's median, standards and scatter per frame"}
    return write_night_report(result.summary, qc_dir, pages, images=[panel], captions=captions)[0]

"""``gpucal bench``: the grid scan against the reference loop and a plain matrix product.

In ONE process on the same inputs:

* reference: a per-star, per-template Python loop written the way the
  reference module's package does it — FFT cross-correlation of the
  continuum-normalised spectra for the velocity (peak refined by a
  parabola), then the template shifted to that velocity, continuum-normalised
  on the frame's pixels and scored by χ² with a free amplitude — on the same
  prepared (convolved, resampled) grid, in host NumPy;
* gpucal's scan, exhaustive and fast path (:func:`gpucal.fitting.match_templates`),
  on the chosen backend;
* a plain matrix product of the scan's size, (n_t, n_q) @ (n_q, n_star·n_vel)
  in float32, as the hardware yardstick;
* optionally (``--memory-check``) the exhaustive scan streaming a
  memory-mapped grid ten times the memory budget, with its peak memory.

The result is a dict (and JSON) with sizes, seconds, speed-ups, achieved
GFLOP/s and its fraction of the plain product, peak memory, agreement with
the reference and with the simulation's truth, backend and device. This is
host-side harness code: it times, it does not calibrate.
"""

from __future__ import annotations

import math
import platform
import socket
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from .backends import device_name, get_backend, interp, memory_pool_bytes, synchronize, to_numpy
from .containers import PreparedGrid, SpectraBatch
from .fitting import convolve_to_instrument, match_templates, memory_budget, normalise_observed, prepare_grid, velocity_grid
from .simulate import simulate_frame
from .templates.demo import demo_grid
from .units import C_KMS

__all__ = ["run_scan_benchmark", "format_report"]

# The F/G-star subgrid of the reference NOTES: Teff 5000-8000 K step 250, logg 3.5-5.0,
# [M/H] -1.0..+1.0, [α/M] 0 and +0.25: 13 x 4 x 5 x 2 = 520 nodes.
_GRID_AXES = dict(teff=tuple(np.arange(5000.0, 8001.0, 250.0)), logg=(3.5, 4.0, 4.5, 5.0),
                  mh=(-1.0, -0.5, 0.0, 0.5, 1.0), alpha=(0.0, 0.25))


def build_inputs(n_star, snr=50.0, seed=0, vrange=(-500.0, 500.0, 5.0), n_nodes=None):
    """The 520-node demo grid and a simulated frame of ``n_star`` standards drawn from it (truth kept).

    The stars are drawn from the first ``n_nodes`` nodes (default all), the
    velocities uniformly over the middle 60 % of ``vrange``.
    """
    grid = demo_grid(**_GRID_AXES)
    rng = np.random.default_rng(seed)
    p = np.asarray(grid.params)
    n_nodes = len(p) if n_nodes is None else min(n_nodes, len(p))
    idx = rng.choice(n_nodes, n_star, replace=n_star > n_nodes)
    rvs = rng.uniform(0.6 * vrange[0], 0.6 * vrange[1], n_star)
    sim = simulate_frame(n_standards=n_star, n_program=1, n_sky=1, params=[tuple(p[i]) for i in idx],
                         rvs=rvs, snr=snr, seed=seed)
    return grid, sim, idx, rvs


def standards(sim, be):
    """The simulated frame's standards as a SpectraBatch on backend ``be``."""
    rows = np.asarray(sim.truth["std_fibres"])
    f, v = sim.flux[rows], sim.var[rows]
    return SpectraBatch(wave=be.asarray(sim.wave), flux=be.asarray(f), var=be.asarray(v),
                        mask=be.asarray(np.isfinite(f) & (v > 0)), fibre_ids=rows + 1,
                        names=tuple(str(i) for i in range(len(rows))))


def _tiled_params(prep, n_templates):
    """Parameters of ``n_templates`` rows tiling a prepared grid, copy k offset by 0.01 k in [α/M] (distinct rows)."""
    reps = -(-n_templates // int(prep.params.shape[0]))
    return np.concatenate([to_numpy(prep.params) + [0, 0, 0, 0.01 * k] for k in range(reps)])[:n_templates]


def tile_grid(prep, n_templates, be, seed=1):
    """A prepared grid tiled up to ``n_templates`` rows, copies jittered by 0.1 % (distinct rows)."""
    base = to_numpy(prep.norm_flux)
    reps = -(-n_templates // base.shape[0])
    rng = np.random.default_rng(seed)
    parts = [base] + [base * (1 + 1e-3 * rng.standard_normal(base.shape)).astype(np.float32) for _ in range(reps - 1)]
    big = np.concatenate(parts)[:n_templates].astype(np.float32)
    return PreparedGrid(params=be.asarray(_tiled_params(prep, n_templates)), wave=prep.wave, norm_flux=be.asarray(big), lsf=prep.lsf)


def _legendre_continuum(vander, y, good, niter=3, clip_low=1.5, clip_high=3.0):
    """The reference package's per-spectrum continuum: clipped Legendre fit to ln(flux)."""
    keep = good & (y > 0)
    lny = np.log(np.where(y > 0, y, 1.0))
    for _ in range(niter + 1):
        coef = np.linalg.lstsq(vander[keep], lny[keep], rcond=None)[0]
        r = lny - vander @ coef
        sig = np.std(r[keep])
        keep = good & (y > 0) & (r > -clip_low * sig) & (r < clip_high * sig)
    return np.exp(vander @ coef)


def _ccf_setup(wave_obs, dn, good, wq, velocities, oversample=1):
    """One star's side of the FFT cross-correlation: its normalised spectrum on a log-λ grid.

    The grid is the working grid ``wq``, or ``oversample`` times finer.
    Returns what :func:`_ccf_velocity` needs.
    """
    dl = np.log(wq[1] / wq[0]) / oversample
    grid = wq if oversample == 1 else wq[0] * np.exp(dl * np.arange((wq.size - 1) * oversample + 1))
    nfft = 1 << int(np.ceil(np.log2(2 * grid.size)))
    lags = np.concatenate([np.arange(0, nfft // 2), np.arange(-nfft // 2, 0)])
    vel = C_KMS * np.tanh(lags * dl)
    inside = np.flatnonzero((vel >= velocities[0]) & (vel <= velocities[-1]))
    d = np.interp(grid, wave_obs, dn, left=0, right=0)
    g = np.interp(grid, wave_obs, good.astype(float), left=0, right=0) > 0.999
    return {"grid": grid, "dl": dl, "nfft": nfft, "lags": lags, "inside": inside,
            "fx": np.fft.rfft(np.where(g, d - 1.0, 0.0), nfft)}


def _ccf_velocity(ccf, template, wq):
    """Velocity (km/s) and 1 + z of the cross-correlation peak of a template on ``wq`` (parabola through 3 lags)."""
    if ccf["grid"] is not wq:
        template = np.interp(ccf["grid"], wq, template)
    nfft, lags = ccf["nfft"], ccf["lags"]
    cc = np.fft.irfft(ccf["fx"] * np.conj(np.fft.rfft(template - 1.0, nfft)), nfft)
    k = ccf["inside"][np.argmax(cc[ccf["inside"]])]
    km, kp = (k - 1) % nfft, (k + 1) % nfft
    den = cc[km] - 2 * cc[k] + cc[kp]
    off = 0.5 * (cc[km] - cc[kp]) / den if den < 0 else 0.0
    u = (lags[k] + off) * ccf["dl"]
    return C_KMS * np.tanh(u), np.exp(u)


def reference_loop(wave_obs, dn, wn, good, wq, norm, conv, velocities):
    """Per star, per template, as the reference package does it (host NumPy).

    FFT cross-correlation of the continuum-normalised spectra on the working
    grid for the velocity (peak refined by a parabola through the three lags
    around it), then the template (convolved, on the working grid) shifted to
    that velocity onto the frame's pixels, continuum-normalised there, and
    its χ² with a free amplitude. Velocities use the same relativistic
    convention as gpucal (1 + z = exp(lag · Δlnλ)).
    Returns each star's best template index and velocity (km/s).
    """
    n_star, n_t = dn.shape[0], norm.shape[0]
    x = 2 * (np.log(wave_obs) - np.log(wave_obs[0])) / np.log(wave_obs[-1] / wave_obs[0]) - 1
    vander = np.polynomial.legendre.legvander(x, 7)
    best = np.full(n_star, -1)
    best_v = np.full(n_star, np.nan)
    best_c = np.full(n_star, np.inf)
    for s in range(n_star):
        ccf = _ccf_setup(wave_obs, dn[s], good[s], wq, velocities)
        for t in range(n_t):
            v, one_z = _ccf_velocity(ccf, norm[t], wq)
            shifted = np.interp(wave_obs / one_z, wq, conv[t], left=np.nan, right=np.nan)
            use = good[s] & np.isfinite(shifted)
            model = np.where(use, shifted, 0.0)
            model = np.where(use, model / _legendre_continuum(vander, model, use), 0.0)
            w = np.where(use, wn[s], 0.0)
            a = np.sum(w * dn[s] * model) / np.sum(w * model * model)
            chi2 = np.sum(w * (dn[s] - a * model) ** 2)
            if chi2 < best_c[s]:
                best_c[s], best[s], best_v[s] = chi2, t, v
    return best, best_v


def fine_ccf_velocities(wave_obs, dn, good, wq, norm, index, velocities, oversample=4):
    """The reference's velocity of each star's chosen template, with the correlation ``oversample`` x finer.

    On the working grid (about the frame's pixel, ~65 km/s here) the
    three-lag parabola locks the peak toward whole lags; on a finer grid
    that bias falls below the noise. Used to compare velocities, not timed.
    """
    return np.array([_ccf_velocity(_ccf_setup(wave_obs, dn[s], good[s], wq, velocities, oversample),
                                   norm[index[s]], wq)[0] for s in range(dn.shape[0])])


def _timed(fn, be, repeat=3):
    """Best of ``repeat`` wall-clock runs after one warm-up, device synchronised."""
    fn()
    synchronize(be)
    times = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        synchronize(be)
        times.append(time.perf_counter() - t0)
    return min(times), out


def _peak_memory(fn, be):
    """Peak bytes ``fn`` allocates, and its result: the device memory pool's growth, tracemalloc on NumPy, else None."""
    base = memory_pool_bytes(be, release_unused=True)
    if base is not None:
        out = fn()
        synchronize(be)
        return memory_pool_bytes(be) - base, out  # what the pool grew to hold: an upper bound of the peak
    if be.name != "numpy":
        out = fn()
        synchronize(be)
        return None, out  # tracemalloc sees NumPy's allocations only
    tracemalloc.start()
    try:
        out = fn()
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def _velocity_stats(a, b):
    d = np.abs(np.asarray(a) - np.asarray(b))
    return {"max": float(np.max(d)), "rms": float(np.sqrt(np.mean(d ** 2))), "within_1kms": float(np.mean(d <= 1.0))}


def _write_tiled_memmap(path, base, n_t):
    """A float32 .npy of ``n_t`` rows repeating ``base`` (n_b, n_q), written block by block."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_t, base.shape[1]))
    for k in range(-(-n_t // base.shape[0])):
        rows = min(base.shape[0], n_t - k * base.shape[0])
        mm[k * base.shape[0]:k * base.shape[0] + rows] = base[:rows]
    mm.flush()


def _streamed_scan(spec, prep, vel, be, budget, path, n_t):
    """The exhaustive scan of the memory-mapped grid at ``path``: (peak bytes, seconds, result).

    The memory map is opened and closed here, so the file can be removed after.
    """
    grid = np.load(path, mmap_mode="r")
    streamed = PreparedGrid(params=be.asarray(_tiled_params(prep, n_t)), wave=prep.wave, norm_flux=grid, lsf=prep.lsf)
    t0 = time.perf_counter()
    peak, res = _peak_memory(
        lambda: match_templates(spec, streamed, velocities=vel, refine=False, max_memory=budget), be)
    return peak, time.perf_counter() - t0, res


def _memory_check(spec, prep, vel, be, budget):
    """The exhaustive scan streaming a memory-mapped grid 10x ``budget``: peak bytes, block size, same answer."""
    base = to_numpy(prep.norm_flux).astype(np.float32)
    n_t = int(math.ceil(10 * budget / base[0].nbytes))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "grid.npy"
        _write_tiled_memmap(path, base, n_t)
        peak, seconds, res = _streamed_scan(spec, prep, vel, be, budget, path, n_t)
    return {"budget_bytes": int(budget), "grid_bytes": int(n_t * base[0].nbytes), "templates": n_t,
            "block_size": int(res.meta["block_size"]), "peak_bytes": None if peak is None else int(peak),
            "peak_under_budget": None if peak is None else bool(peak < budget), "seconds": seconds,
            "index_mod_base": to_numpy(res.index) % base.shape[0]}


def _plain_matmul(be, n_t, nq, n_cols):
    """Seconds and GFLOP/s of a float32 (n_t, n_q) @ (n_q, n_cols) product on ``be``: the hardware yardstick."""
    rng = np.random.default_rng(0)
    a = be.asarray(rng.standard_normal((n_t, nq)).astype(np.float32))
    b = be.asarray(rng.standard_normal((nq, n_cols)).astype(np.float32))
    seconds, _ = _timed(lambda: a @ b, be)
    return seconds, 2.0 * n_t * nq * n_cols / seconds / 1e9


def _scan_inputs(be, n_star, n_templates, vrange, snr, seed):
    """The benchmark's frame, prepared grid (tiled to ``n_templates``), standards and trial velocities on ``be``."""
    grid, sim, true_idx, true_rv = build_inputs(n_star, snr=snr, seed=seed, vrange=vrange, n_nodes=n_templates)
    wave = be.asarray(sim.wave)
    fwhm = float(sim.truth["fwhm"])
    prep = prepare_grid(grid, wave, fwhm=fwhm, vstep=float(vrange[2]))
    n_base = int(prep.norm_flux.shape[0])
    if n_templates != n_base:
        prep = tile_grid(prep, n_templates, be)
    inputs = {"grid": grid, "sim": sim, "fwhm": fwhm, "true_idx": true_idx, "true_rv": true_rv, "n_base": n_base}
    return inputs, prep, standards(sim, be), velocity_grid(*vrange, like=wave)


def _reference(inputs, spec, prep, vel, ref_templates):
    """The reference loop on the host over the first ``ref_templates`` nodes (default all).

    Returns its seconds (extrapolated linearly to every node), each star's
    template index and velocity, the velocity with a 4x finer correlation,
    and the number of nodes it ran.
    """
    grid, sim, fwhm = inputs["grid"], inputs["sim"], inputs["fwhm"]
    n_t = int(prep.norm_flux.shape[0])
    dn, wn, good = (to_numpy(v) for v in normalise_observed(spec))
    n_ref = min(ref_templates or n_t, n_t)
    wq = to_numpy(prep.wave)
    norm_host = to_numpy(prep.norm_flux[:n_ref, :]).astype(np.float64)
    gw = np.asarray(grid.wave)
    conv = np.asarray(interp(wq, gw, convolve_to_instrument(gw, np.asarray(grid.flux[:n_ref], np.float64), fwhm=fwhm)))
    t0 = time.perf_counter()
    ref_idx, ref_v = reference_loop(np.asarray(sim.wave), dn, wn, good, wq, norm_host, conv, to_numpy(vel))
    t_ref = (time.perf_counter() - t0) * n_t / n_ref
    ref_fine_v = fine_ccf_velocities(np.asarray(sim.wave), dn, good, wq, norm_host, ref_idx, to_numpy(vel))
    return {"seconds": t_ref, "index": ref_idx, "rv": ref_v, "fine_rv": ref_fine_v, "n_run": n_ref}


def _agreement(inputs, r_ex, r_fast, ref, n_t):
    """Agreement of the exhaustive and fast scans with each other, the truth and (when it ran every node) the reference."""
    ref_idx, ref_v, ref_fine_v = ref["index"], ref["rv"], ref["fine_rv"]
    n_base, true_idx, true_rv = inputs["n_base"], inputs["true_idx"], inputs["true_rv"]
    # A tiled grid holds jittered copies of the base grid: compare base nodes, not copies.
    ex_idx, ex_v = to_numpy(r_ex.index) % n_base, to_numpy(r_ex.rv)
    fa_idx, fa_v = to_numpy(r_fast.index) % n_base, to_numpy(r_fast.rv)
    agree = {"fast_vs_exhaustive_same_template": float(np.mean(fa_idx == ex_idx)),
             "fast_vs_exhaustive_dv_kms": _velocity_stats(fa_v, ex_v),
             "exhaustive_vs_truth_dv_kms": _velocity_stats(ex_v, true_rv),
             "exhaustive_same_template_as_truth": float(np.mean(ex_idx == true_idx))}
    if ref["n_run"] >= min(n_t, n_base):  # the reference ran every distinct node the scan saw
        agree.update({
            "exhaustive_vs_reference_same_template": float(np.mean(ex_idx == ref_idx)),
            "fast_vs_reference_same_template": float(np.mean(fa_idx == ref_idx)),
            "exhaustive_vs_reference_dv_kms": _velocity_stats(ex_v, ref_v),
            "fast_vs_reference_dv_kms": _velocity_stats(fa_v, ref_v),
            "reference_vs_truth_dv_kms": _velocity_stats(ref_v, true_rv),
            "exhaustive_vs_reference_fine_ccf_dv_kms": _velocity_stats(ex_v, ref_fine_v),
            "fast_vs_reference_fine_ccf_dv_kms": _velocity_stats(fa_v, ref_fine_v),
            "reference_fine_ccf_vs_truth_dv_kms": _velocity_stats(ref_fine_v, true_rv),
            "reference_same_template_as_truth": float(np.mean(ref_idx == true_idx)),
        })
    return agree


def run_scan_benchmark(*, backend="numpy", n_star=32, n_templates=520, ref_templates=None,
                       vrange=(-500.0, 500.0, 5.0), max_memory=None, snr=50.0, memory_check=None, seed=0):
    """Run the benchmark; returns the result dict (see the module docstring).

    ``ref_templates``: templates the reference loop runs (default all; its
    time is extrapolated linearly when fewer). ``memory_check``: a budget in
    bytes (or "256M") for the streamed run, or None to skip it.
    """
    be = get_backend(backend)
    inputs, prep, spec, vel = _scan_inputs(be, n_star, n_templates, vrange, snr, seed)
    n_t, nq, n_vel = int(prep.norm_flux.shape[0]), int(prep.wave.shape[0]), int(vel.shape[0])
    flops = 4.0 * n_t * nq * n_star * n_vel  # two products of 2·n_t·n_q·(n_star·n_vel) flops

    def scan(fast):
        return match_templates(spec, prep, velocities=vel, refine=False, fast=fast, max_memory=max_memory)

    t_ex, r_ex = _timed(lambda: scan(False), be)
    t_fast, r_fast = _timed(lambda: scan(True), be)
    mem_ex, _ = _peak_memory(lambda: scan(False), be)
    t_mm, gf_mm = _plain_matmul(be, n_t, nq, n_star * n_vel)
    ref = _reference(inputs, spec, prep, vel, ref_templates)
    t_ref, n_ref = ref["seconds"], ref["n_run"]
    result = {
        "machine": socket.gethostname(), "backend": be.name, "device": device_name(be),
        "python": platform.python_version(), "numpy": np.__version__,
        "sizes": {"templates": n_t, "velocities": n_vel, "stars": n_star, "working_pixels": nq,
                  "frame_pixels": int(inputs["sim"].wave.size), "snr": snr, "vrange_kms": list(vrange)},
        "seconds": {"reference_loop": t_ref, "reference_loop_measured_templates": n_ref,
                    "scan_exhaustive": t_ex, "scan_fast": t_fast, "plain_matmul": t_mm},
        "speedup_vs_reference": {"exhaustive": t_ref / t_ex, "fast": t_ref / t_fast},
        "gflops": {"exhaustive": flops / t_ex / 1e9, "plain_matmul": gf_mm},
        "fraction_of_plain_matmul": {"exhaustive": flops / t_ex / 1e9 / gf_mm},
        "memory": {"budget_bytes": int(memory_budget(max_memory)), "block_size": int(r_ex.meta["block_size"]),
                   "peak_bytes_exhaustive": None if mem_ex is None else int(mem_ex)},
        "agreement": _agreement(inputs, r_ex, r_fast, ref, n_t),
        "notes": "reference time extrapolated linearly from the measured templates" if n_ref < n_t else "",
    }
    result["fit"] = fit_timing(inputs, spec, prep, vel, be)
    if memory_check is not None:
        mc = _memory_check(spec, prep, vel, be, memory_budget(memory_check))
        same = mc.pop("index_mod_base")
        mc["same_templates_as_in_memory_scan"] = float(np.mean(same == to_numpy(r_ex.index) % inputs["n_base"]))
        result["memory_check"] = mc
    return result


def _mib(n):
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def format_report(result) -> str:
    """A short human-readable table of :func:`run_scan_benchmark`'s result."""
    s, sec, sp = result["sizes"], result["seconds"], result["speedup_vs_reference"]
    ag = result["agreement"]
    lines = [f"{s['templates']} templates x {s['velocities']} velocities x {s['stars']} stars x "
             f"{s['working_pixels']} pixels on {result['backend']} ({result['device']})",
             f"  reference loop   {sec['reference_loop']:9.3f} s"
             + (f"  (extrapolated from {sec['reference_loop_measured_templates']} templates)" if result["notes"] else ""),
             f"  scan exhaustive  {sec['scan_exhaustive']:9.3f} s  {sp['exhaustive']:8.1f}x  "
             f"{result['gflops']['exhaustive']:8.1f} GFLOP/s "
             f"({100 * result['fraction_of_plain_matmul']['exhaustive']:.0f} % of the plain matrix product)",
             f"  scan fast path   {sec['scan_fast']:9.3f} s  {sp['fast']:8.1f}x",
             f"  plain matmul     {sec['plain_matmul']:9.3f} s  {result['gflops']['plain_matmul']:8.1f} GFLOP/s",
             f"  peak memory (exhaustive) {_mib(result['memory']['peak_bytes_exhaustive'])}, "
             f"budget {_mib(result['memory']['budget_bytes'])}, block {result['memory']['block_size']}"]
    if "exhaustive_vs_reference_same_template" in ag:
        dv = ag["exhaustive_vs_reference_dv_kms"]
        lines.append(f"  vs reference: same template {100 * ag['exhaustive_vs_reference_same_template']:.0f} % "
                     f"(fast {100 * ag['fast_vs_reference_same_template']:.0f} %), velocity within 1 km/s "
                     f"{100 * dv['within_1kms']:.0f} %, max {dv['max']:.2f}, RMS {dv['rms']:.2f} km/s")
        dv = ag["exhaustive_vs_reference_fine_ccf_dv_kms"]
        lines.append(f"  vs the reference's velocity with a 4x finer correlation: within 1 km/s "
                     f"{100 * dv['within_1kms']:.0f} %, max {dv['max']:.2f}, RMS {dv['rms']:.2f} km/s")
        lines.append(f"  vs truth RMS velocity: scan {ag['exhaustive_vs_truth_dv_kms']['rms']:.2f}, "
                     f"reference {ag['reference_vs_truth_dv_kms']['rms']:.2f}, "
                     f"reference with the finer correlation {ag['reference_fine_ccf_vs_truth_dv_kms']['rms']:.2f} km/s")
    lines.append(f"  fast vs exhaustive: same template {100 * ag['fast_vs_exhaustive_same_template']:.0f} %, "
                 f"max velocity difference {ag['fast_vs_exhaustive_dv_kms']['max']:.2f} km/s")
    if "fit" in result:
        lines.append(format_fit_timing(result["fit"]))
    if "memory_check" in result:
        mc = result["memory_check"]
        lines.append(f"  streamed grid {_mib(mc['grid_bytes'])} with budget {_mib(mc['budget_bytes'])}: "
                     f"peak {_mib(mc['peak_bytes'])}, block {mc['block_size']}, {mc['seconds']:.1f} s")
    return "\n".join(lines)


# --------------------------------------------------------------------------- issue 14: the continuous fit's cost
def _subset(spec, n):
    return SpectraBatch(wave=spec.wave, flux=spec.flux[:n, :], var=spec.var[:n, :], mask=spec.mask[:n, :],
                        fibre_ids=spec.fibre_ids[:n], names=spec.names[:n])


def fit_timing(inputs, spec, prep, vel, be, n_stars=(20, 32)):
    """Seconds of the scan (as the pipeline runs it, with refinement) and of the continuous fit after it.

    For each n in ``n_stars`` (at most the frame's standards): the scan of n standards and
    :func:`gpucal.fitting.fit_forward` from its answer; and, once, the preparation of each
    one's grid (:func:`prepare_grid` for the scan, :func:`fit_grid` for the fit). None when
    the prepared grid was tiled (the fit needs the grid's own nodes).
    """
    from .fitting import fit_forward, fit_grid

    if int(prep.norm_flux.shape[0]) != inputs["n_base"]:
        return None
    t_prep, fg = _timed(lambda: fit_grid(inputs["grid"], spec.wave, fwhm=inputs["fwhm"]), be, repeat=1)
    out = {"prepare_fit_grid": t_prep, "fit_working_pixels": int(fg.wave.shape[0]), "stars": {}}
    for n in [k for k in n_stars if k <= int(spec.flux.shape[0])]:
        sub = _subset(spec, n)
        t_scan, match = _timed(lambda: match_templates(sub, prep, velocities=vel), be, repeat=1)
        t_fit, res = _timed(lambda: fit_forward(sub, fg, match), be, repeat=1)
        out["stars"][str(n)] = {"scan": t_scan, "fit": t_fit, "fit_over_scan": t_fit / t_scan,
                                "converged": float(np.mean(to_numpy(res.meta["converged"])))}
    return out


def format_fit_timing(ft) -> str:
    """One line per star count: the scan's and the fit's seconds (for :func:`format_report`)."""
    if not ft:
        return "  continuous fit: not timed (tiled grid)"
    lines = [f"  continuous fit ({ft['fit_working_pixels']} working pixels; its grid prepared in "
             f"{ft['prepare_fit_grid']:.2f} s):"]
    for n, r in ft["stars"].items():
        lines.append(f"    {n:>3} standards: scan {r['scan']:7.3f} s, fit {r['fit']:7.3f} s "
                     f"({r['fit_over_scan']:.2f}x the scan), converged {100 * r['converged']:.0f} %")
    return "\n".join(lines)

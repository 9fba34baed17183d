"""Mutation check: does a test meant to guard a quantity fail when that quantity is made wrong?

Each mutation is a small source edit (one or more exact string replacements, each of which must
occur exactly once) applied to a COPY of the repository's ``gpucal/`` and ``tests/`` in a
temporary directory; then only the test files meant to guard that quantity are run there
(``pytest -x -q``, ``PYTHONPATH`` = the copy, a per-mutation time limit). A mutation is *caught*
when pytest reports a failure (exit status 1), *missed* when the guard tests pass, and reported as
*timeout* or *error* (collection error, usage error) otherwise, which count as not caught; a
mutation whose source text is no longer found (the code moved on) is reported *stale*.

Guard files that do not exist in the tree are left out of the run and listed in the report, so the
table shows where a guard is still to be written. ``--baseline`` first runs every guard list on
the unmutated copy (a guard list that fails unmutated proves nothing).

    PYTHONPATH=$PWD python3 bench/mutations.py                    # all, table + JSON
    PYTHONPATH=$PWD python3 bench/mutations.py --only median_pi_over_2 --timeout 120
    PYTHONPATH=$PWD python3 bench/mutations.py --baseline --json bench/results/mutations_vm.json

Host-only tooling: it imports nothing from gpucal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    """One deliberate bug: ``edits`` (old, new) in ``path``, guarded by ``guards`` (test files or node ids)."""

    id: str
    path: str
    edits: tuple
    guards: tuple
    quantity: str


MUTATIONS = (
    Mutation(
        "fwhm_sigma_x1.05", "gpucal/units.py",
        (("FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))",
          "FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0)) / 1.05"),),
        ("tests/test_lsf.py", "tests/test_scan_oracle.py"),
        "the LSF width: σ per unit FWHM 5 % too large (the simulator uses the same constant)"),
    Mutation(
        "median_pi_over_2", "gpucal/calibration/combine.py",
        (("return comb, (math.pi / 2.0) * wvar, measured, mask", "return comb, 1.0 * wvar, measured, mask"),),
        ("tests/test_calibration.py", "tests/test_pulls.py",
         "tests/test_options.py::test_median_combination_differs_and_both_are_within_tolerance"),
        "the variance of the median-combined vector (π/2 × the weighted-mean variance)"),
    Mutation(
        "vector_scale_term_dropped", "gpucal/calibration/vectors.py",
        (("frac = xp.where(good, var / (safe_flux * safe_flux), xp.nan) + frac_s",
          "frac = xp.where(good, var / (safe_flux * safe_flux), xp.nan)"),),
        ("tests/test_calibration.py", "tests/test_pulls.py"),
        "the per-star vector variance: the photometric-scale term (σ_s/s)²"),
    Mutation(
        "rv_err_x2", "gpucal/fitting/scan.py",
        (("rv_err = rv_err * xp.sqrt(xp.maximum(red, 1.0))", "rv_err = 2.0 * rv_err * xp.sqrt(xp.maximum(red, 1.0))"),),
        ("tests/test_matching.py", "tests/test_pulls.py"),
        "the radial-velocity error rv_err"),
    Mutation(
        "params_err_x2", "gpucal/fitting/refine.py",
        (("err = xp.where(active, xp.sqrt(", "err = 2.0 * xp.where(active, xp.sqrt("),),
        ("tests/test_matching.py", "tests/test_pulls.py"),
        "the stellar-parameter errors params_err (refine_parameters' curvature errors)"),
    Mutation(
        "huber_is_chi2", "gpucal/fitting/scan.py",
        (("hw = xp.where(r <= delta, 1.0, delta / xp.where(r > 0, r, 1.0))", "hw = xp.ones_like(w)"),
         ("rho = xp.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))", "rho = 0.5 * r * r")),
        ("tests/test_matching.py", "tests/test_options.py::test_huber_metric_resists_an_artefact_the_normalisation_keeps"),
        "the Huber score of --metric huber (IRLS weights and the loss)"),
    Mutation(
        "doppler_sign_flipped", "gpucal/units.py",
        (("beta = v_kms / C_KMS", "beta = -v_kms / C_KMS"),),
        ("tests/test_matching.py", "tests/test_properties.py"),
        "the Doppler factor's sign (positive = receding)"),
    Mutation(
        "ab_zeropoint_plus_0.01mag", "gpucal/photometry/bands.py",
        (("return col / zeropoint", "return col / (zeropoint * 10.0 ** (0.4 * 0.01))"),),
        ("tests/test_photometry.py",),
        "the AB zero point of the synthetic photometry (against speclite)"),
    # The options (tests/test_options.py): an option that silently stops reaching the computation.
    Mutation(
        "ebv_ignored", "gpucal/pipeline.py",
        (("    if np.any(ebv_star != 0):\n        model = redden(", "    if False:\n        model = redden("),),
        ("tests/test_options.py::test_ebv_recovers_the_throughput_of_reddened_standards",),
        "--ebv: the templates reddened by E(B−V)"),
    Mutation(
        "teff_prior_ignored", "gpucal/pipeline.py",
        (("prior=prior[2], fast=fast, metric=metric)", "prior=None, fast=fast, metric=metric)"),),
        ("tests/test_options.py::test_no_teff_prior_lets_the_spectrum_decide_where_the_prior_binds",),
        "the colour Teff prior (on by default, off with --no-teff-prior)"),
    Mutation(
        "smooth_ignored", "gpucal/pipeline.py",
        (("method=combine, smooth=smooth)", "method=combine, smooth=0)"),),
        ("tests/test_options.py::test_smooth_gives_a_smoother_vector_as_close_to_the_truth",),
        "--smooth: the Savitzky-Golay smoothing of the combined vector"),
    Mutation(
        "rv_edge_verdict_dropped", "gpucal/pipeline.py",
        (('"rv_at_edge": match.meta["rv_at_edge"],', '"rv_at_edge": match.meta["rv_at_edge"] & False,'),),
        ("tests/test_options.py::test_narrow_vrange_excludes_the_star_at_its_edge",),
        "--vrange: a star whose velocity lies at the scan's edge is excluded"),
    Mutation(
        "max_chi2_dof_ignored", "gpucal/pipeline.py",
        (('checks["chi2_dof"] = ~(_reduced_chi2(match) <= max_chi2_dof)',
          'checks["chi2_dof"] = ~(_reduced_chi2(match) <= 1e30)'),),
        ("tests/test_options.py::test_max_chi2_dof_excludes_the_worst_fitting_star",),
        "--max-chi2-dof: stars above the χ²/dof limit are excluded"),
    # Code of this round (issues 14-18): the same kinds of slip in the new rooms.
    Mutation(
        "continuum_degree_8", "gpucal/fitting/prepare.py",
        (("dtype=None, continuum_degree: int = 7, good_regions=TELLURIC_DEFAULT,",
          "dtype=None, continuum_degree: int = 8, good_regions=TELLURIC_DEFAULT,"),),
        ("tests/test_scan_oracle.py",),
        "the scan's template continuum (degree 7, as the standards')"),
    Mutation(
        "fit_params_err_x2", "gpucal/fitting/forward.py",
        (("err4 = xp.where(free[None, :4], err[:, :4], xp.nan)", "err4 = 2.0 * xp.where(free[None, :4], err[:, :4], xp.nan)"),),
        ("tests/test_pulls.py", "tests/test_forward.py"),
        "the continuous fit's parameter errors params_err (from its curvature)"),
    Mutation(
        "fit_rv_err_x2", "gpucal/fitting/forward.py",
        (("params_err=err4, rv=v, rv_err=err[:, 4],", "params_err=err4, rv=v, rv_err=2.0 * err[:, 4],"),),
        ("tests/test_pulls.py", "tests/test_forward.py"),
        "the continuous fit's RV error (from its curvature)"),
    Mutation(
        "telluric_var_term_dropped", "gpucal/calibration/telluric.py",
        (("xp.where(corrected, trans_var, 0.0) / (safe_t * safe_t)", "0.0 * trans_var / (safe_t * safe_t)"),),
        ("tests/test_telluric.py",),
        "the corrected vector's variance: the transmission's own term σ²_T/T²"),
    Mutation(
        "telluric_median_pi_over_2", "gpucal/calibration/telluric.py",
        (("value, var = masked_median(t, keep, axis=0), (math.pi / 2.0) / safe",
          "value, var = masked_median(t, keep, axis=0), 1.0 / safe"),),
        ("tests/test_telluric.py::test_transmission_error_matches_its_scatter_for_both_combinations",),
        "the variance of the median-combined transmission"),
    Mutation(
        "perfibre_applied_on_common_grid", "gpucal/calibration/resample.py",
        (("    c = interp(wave_fibres, wave_c, cal)\n", "    c = interp(wave_c + 0.0 * wave_fibres, wave_c, cal)\n"),),
        ("tests/test_perfibre.py",),
        "per-fibre wavelengths: the combined vector read at each fibre's own wavelengths"),
    Mutation(
        "workcache_key_without_lsf", "gpucal/workcache.py",
        (('settings = {"grid": grid_fingerprint(grid), "lsf": lsf,', 'settings = {"grid": grid_fingerprint(grid), "lsf": None,'),),
        ("tests/test_workcache.py",),
        "the working-grid cache key: a changed LSF must make a new entry"),
    Mutation(
        "mask_interp_bit_dropped", "gpucal/calibration/maskbits.py",
        (("    m = m | _flag(~measured, INTERP, xp)[None, :]\n", "    m = m | _flag(measured & ~measured, INTERP, xp)[None, :]\n"),),
        ("tests/test_outputs.py",),
        "the MASK's INTERP bit (pixels where the vector was interpolated)"),
    # this session's code (issues 14, 15, 17)
    Mutation(
        "model_floor_zero", "gpucal/calibration/combine.py",
        (("    return xp.sqrt(xp.maximum(ms / xp.where(usum > 0, usum, 1.0), 0.0))",
          "    return 0.0 * xp.sqrt(xp.maximum(ms / xp.where(usum > 0, usum, 1.0), 0.0))"),),
        ("tests/test_combine_floor.py",),
        "floored_mean's per-star model-error floor (a tilted star with a tiny variance holds the weight)"),
    Mutation(
        "hull_face_never", "gpucal/fitting/cells.py",
        (("            out = out | (faces[j][0 if sj < 0 else 1] & ~beyond)",
          "            out = out | (faces[j][0 if sj < 0 else 1] & ~beyond & False)"),),
        ("tests/test_forward.py", "tests/test_fitsgrid.py"),
        "on_hull_face: a θ held at a face beyond which no complete cell lies (missing node, grid edge)"),
    Mutation(
        "lsf_ratio_one", "gpucal/fitting/lsfratio.py",
        (("    return divide_ratio(spectra, ratio)", "    return divide_ratio(spectra, ratio * 0.0 + 1.0)"),),
        ("tests/test_perfibre.py",),
        "the per-fibre LSF ratio in the continuous fit"),
    Mutation(
        "fit_slope_dropped", "gpucal/fitting/forward.py",
        (("    dlnx = (wc[:, None, :] @ slope)[:, 0, :] / pb.dln", "    dlnx = 0.0 * (wc[:, None, :] @ slope)[:, 0, :] / pb.dln"),),
        ("tests/test_forward.py", "tests/test_pulls.py"),
        "the continuous fit's ∂S/∂v (the interpolant's slope): the RV and its error"),
    Mutation(
        "fit_grid_key_no_lsf", "gpucal/workcache.py",
        (('    settings = {"kind": "fit grid", "grid": grid_fingerprint(grid), "lsf": lsf,',
          '    settings = {"kind": "fit grid", "grid": grid_fingerprint(grid), "lsf": None,'),),
        ("tests/test_workcache.py",),
        "the fit grid's cache key: a changed LSF must make a new entry"),
)


class StaleMutation(Exception):
    """A mutation's source text is no longer in the tree (the code moved on): update the list."""


def _copy_tree(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in ("gpucal", "tests"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "pytest.ini", "conftest.py"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, dest / name)


def _apply(root: Path, m: Mutation) -> None:
    path = root / m.path
    text = path.read_text()
    for old, new in m.edits:
        n = text.count(old)
        if n != 1:
            raise StaleMutation(f"{m.path} holds {n} copies of {old!r} (need exactly 1): update the list")
        text = text.replace(old, new)
    path.write_text(text)


def _present(root: Path, guards) -> tuple:
    have = [g for g in guards if (root / g.split("::")[0]).is_file()]
    return have, [g for g in guards if g not in have]


def _pytest(root: Path, guards, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *guards]
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"rc": None, "status": "timeout", "wall_s": round(time.perf_counter() - t0, 1),
                "failed": _failed(out), "tail": out[-600:]}
    out = run.stdout + run.stderr
    status = {0: "passed", 1: "failed", 5: "no tests"}.get(run.returncode, "error")
    return {"rc": run.returncode, "status": status, "wall_s": round(time.perf_counter() - t0, 1),
            "failed": _failed(out), "tail": out[-600:]}


def _failed(out: str) -> list:
    return sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)))


def run_mutation(m: Mutation, timeout: float, mutate: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"gpucal-mut-{m.id}-") as tmp:
        root = Path(tmp)
        _copy_tree(root)
        if mutate:
            try:
                _apply(root, m)
            except StaleMutation as exc:
                return dict(id=m.id, path=m.path, quantity=m.quantity, guards_run=[], guards_absent=list(m.guards),
                            verdict="stale", rc=None, status="stale", wall_s=0.0, failed=[], tail=str(exc))
        guards, absent = _present(root, m.guards)
        res = _pytest(root, guards, timeout) if guards else {"rc": None, "status": "no guard", "wall_s": 0.0,
                                                           "failed": [], "tail": ""}
    verdict = {"failed": "caught", "passed": "missed"}.get(res["status"], res["status"])
    if not mutate:
        verdict = "ok" if res["status"] == "passed" else f"BASELINE {res['status']}"
    return dict(id=m.id, path=m.path, quantity=m.quantity, guards_run=guards, guards_absent=absent,
                verdict=verdict, **res)


def table(rows) -> str:
    lines = ["| mutation | file | verdict | first failing test | guard files run | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['id']}` | {r['path']} | **{r['verdict']}** | {', '.join(r['failed'][:2]) or '—'} | "
                     f"{', '.join(g.removeprefix('tests/') for g in r['guards_run'])} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutation ids to run (default: all)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per mutation (default 180)")
    ap.add_argument("--baseline", action="store_true", help="also run each guard list unmutated first")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.id in args.only]
    if args.list:
        for m in chosen:
            print(f"{m.id:28s} {m.path:34s} {m.quantity}")
        return 0
    if args.only and len(chosen) != len(set(args.only)):
        raise SystemExit(f"unknown mutation id(s): {sorted(set(args.only) - {m.id for m in MUTATIONS})}")
    baseline, rows = [], []
    for m in chosen:
        if args.baseline:
            baseline.append(run_mutation(m, args.timeout, mutate=False))
            print(f"baseline {m.id}: {baseline[-1]['verdict']} ({baseline[-1]['wall_s']} s)", flush=True)
        rows.append(run_mutation(m, args.timeout))
        print(f"{m.id}: {rows[-1]['verdict']} {rows[-1]['failed'][:1]} ({rows[-1]['wall_s']} s)", flush=True)
    print()
    print(table(rows))
    missed = [r for r in rows if r["verdict"] != "caught"]
    for r in missed:
        print(f"NOT CAUGHT {r['id']} ({r['verdict']}): unguarded quantity: {r['quantity']}"
              + (f"; guard files absent: {', '.join(r['guards_absent'])}" if r["guards_absent"] else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(
            host=platform.node(), python=platform.python_version(), cpus=os.cpu_count(),
            timeout_s=args.timeout, when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            baseline=baseline, mutations=rows, caught=sum(r["verdict"] == "caught" for r in rows),
            n=len(rows), table=table(rows)), indent=1) + "\n")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())

"""``gpucal bench``: the reference loop, the result's numbers and the command line (small sizes)."""

import json

import numpy as np
import pytest

from gpucal.backends import get_backend, to_numpy
from gpucal.benchmark import (
    build_inputs,
    fine_ccf_velocities,
    reference_loop,
    run_scan_benchmark,
    standards,
)
from gpucal.cli import main
from gpucal.fitting import match_templates, normalise_observed, prepare_grid, velocity_grid
from gpucal.containers import TemplateGrid


@pytest.fixture(scope="module")
def small():
    """A 40-node slice of the benchmark grid and 4 standards drawn from it."""
    grid, sim, idx, rvs = build_inputs(4, snr=100.0, seed=3)
    keep = np.unique(np.concatenate([idx, np.arange(0, len(grid.params), 13)]))
    sub = TemplateGrid(params=np.asarray(grid.params)[keep], wave=grid.wave, flux=np.asarray(grid.flux)[keep],
                       medium=grid.medium)
    true_sub = np.searchsorted(keep, idx)
    return sub, sim, true_sub, rvs


def test_reference_loop_finds_the_truth_and_agrees_with_the_scan(small):
    from gpucal.benchmark import interp, convolve_to_instrument

    grid, sim, true_idx, true_rv = small
    be = get_backend("numpy")
    wave = be.asarray(sim.wave)
    fwhm = float(sim.truth["fwhm"])
    prep = prepare_grid(grid, wave, fwhm=fwhm)
    spec = standards(sim, be)
    vel = velocity_grid(-400.0, 400.0, 5.0, like=wave)
    res = match_templates(spec, prep, velocities=vel, refine=False)
    dn, wn, good = (to_numpy(a) for a in normalise_observed(spec))
    wq, norm = to_numpy(prep.wave), to_numpy(prep.norm_flux).astype(np.float64)
    gw = np.asarray(grid.wave)
    conv = np.asarray(interp(wq, gw, convolve_to_instrument(gw, np.asarray(grid.flux, np.float64), fwhm=fwhm)))
    ref_idx, ref_v = reference_loop(np.asarray(sim.wave), dn, wn, good, wq, norm, conv, to_numpy(vel))
    np.testing.assert_array_equal(ref_idx, true_idx)
    np.testing.assert_array_equal(to_numpy(res.index), ref_idx)
    # The correlation on the working grid locks toward whole lags (~65 km/s here); a 4x finer one
    # does not, but the unweighted correlation still errs by a few km/s where the χ² scan does not.
    np.testing.assert_allclose(ref_v, true_rv, atol=8.0)
    fine = fine_ccf_velocities(np.asarray(sim.wave), dn, good, wq, norm, ref_idx, to_numpy(vel))
    np.testing.assert_allclose(fine, true_rv, atol=4.0)
    np.testing.assert_allclose(to_numpy(res.rv), true_rv, atol=1.0)


def test_run_scan_benchmark_reports_consistent_numbers():
    r = run_scan_benchmark(n_star=3, n_templates=40, vrange=(-400.0, 400.0, 10.0), memory_check="40M")
    s, sec = r["sizes"], r["seconds"]
    assert (s["templates"], s["stars"], s["velocities"]) == (40, 3, 81)
    flops = 4.0 * s["templates"] * s["working_pixels"] * s["stars"] * s["velocities"]
    assert r["gflops"]["exhaustive"] == pytest.approx(flops / sec["scan_exhaustive"] / 1e9)
    assert r["speedup_vs_reference"]["fast"] == pytest.approx(sec["reference_loop"] / sec["scan_fast"])
    assert r["fraction_of_plain_matmul"]["exhaustive"] == pytest.approx(
        r["gflops"]["exhaustive"] / r["gflops"]["plain_matmul"])
    assert r["agreement"]["fast_vs_exhaustive_same_template"] == 1.0
    ag = r["agreement"]  # the stars are drawn from the 40 nodes scanned, at velocities inside the range
    assert ag["exhaustive_same_template_as_truth"] == 1.0 and ag["exhaustive_vs_reference_same_template"] == 1.0
    assert ag["exhaustive_vs_truth_dv_kms"]["max"] < 1.5
    assert ag["exhaustive_vs_reference_dv_kms"]["rms"] <= ag["exhaustive_vs_reference_dv_kms"]["max"] < 8.0
    mc = r["memory_check"]
    assert mc["grid_bytes"] >= 10 * mc["budget_bytes"] - 4 * s["working_pixels"]
    assert mc["peak_under_budget"] and mc["peak_bytes"] < mc["budget_bytes"]
    assert mc["same_templates_as_in_memory_scan"] == 1.0
    assert r["fit"] is None  # a tiled grid: the fit needs the grid's own nodes (timed at the full size, bench/)
    json.dumps(r)  # serialisable as written


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--backend", "numpy", "--stars", "2", "--templates", "20", "--vrange", "-40:40:5",
               "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["backend"] == "numpy" and data["sizes"]["templates"] == 20
    assert "plain matmul" in capsys.readouterr().out
    agree = data["agreement"]  # numbers, not only that it ran: the scan finds the simulated stars
    assert agree["exhaustive_same_template_as_truth"] == 1.0 and agree["fast_vs_exhaustive_same_template"] == 1.0
    assert agree["exhaustive_vs_truth_dv_kms"]["rms"] < 1.0 and agree["fast_vs_exhaustive_dv_kms"]["max"] == 0.0
    assert all(v > 0 for v in data["seconds"].values()) and data["speedup_vs_reference"]["exhaustive"] > 1.0


@pytest.mark.parametrize("argv, message", [
    (["--stars", "0"], "--stars"),
    (["--ref-templates", "-3"], "--ref-templates"),
    (["--out", "/nonexistent-dir/x.json"], "does not exist"),
])
def test_cli_bench_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "--backend", "numpy", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpucal: error:") and message in err and "\n" not in err

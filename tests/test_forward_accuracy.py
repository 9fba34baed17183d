"""Issue 14's acceptance, reduced for CI: off-node standards behind a structured throughput.

A frame from gpucal.simulate.simulate_offnode_frame (standards flux-interpolated between demo
nodes at random off-node parameters, S/N 50, RVs within ±150 km/s, a steep blue cut-off, a 10-20 %
dip, a few-per-cent ripple, telluric bands) is calibrated through calibrate_frame with the
continuous fit and with the node path, on an 81-node cut of the demo grid and 1500 pixels. The
full-size numbers (240 nodes, 4000 pixels, 20 and 6 standards) are bench/forward_accuracy.py's,
in bench/results/forward_accuracy_vm.json.
"""

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import median_filter

from gpucal.fitting.masks import TELLURIC_DEFAULT
from gpucal.io import write_frame
from gpucal.pipeline import calibrate_frame
from gpucal.simulate import offnode_grid, simulate_offnode_frame, write_catalogue_csv

BOX = ((5100.0, 6900.0), (4.1, 4.9), (-0.4, 0.4))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    g = offnode_grid()
    p = np.asarray(g.params)
    keep = (p[:, 0] >= 5000) & (p[:, 0] <= 7000) & (p[:, 1] >= 4.0) & (p[:, 2] >= -0.5) & (p[:, 2] <= 0.5)
    grid = dataclasses.replace(g, params=p[keep], flux=np.asarray(g.flux)[keep], meta={},
                               continuum=None if g.continuum is None else np.asarray(g.continuum)[keep])
    sim = simulate_offnode_frame(n_std=8, n_prog=4, n_sky=1, n_pix=1500, wave_range=(3800.0, 9200.0), seed=3,
                                 box=BOX, spectra="interpolated")
    d = tmp_path_factory.mktemp("offnode")
    write_frame(d / "f.fits", sim.flux, sim.var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, d / "c.csv")
    runs = {fit: calibrate_frame(str(d / "f.fits"), templates=grid, photometry=str(d / "c.csv"), fwhm=2.0, fit=fit)
            for fit in ("continuous", "nodes")}
    return sim, runs


def _teff_errors(res, sim):
    fib = np.asarray(sim.fibres["FIBRE"])[np.asarray(sim.truth["std_fibres"])]
    k = {int(f): i for i, f in enumerate(fib)}
    idx = np.array([k[int(f)] for f in np.asarray(res.per_star["FIBRE"])])
    return np.asarray(res.per_star["TEFF"]) - sim.truth["params"][idx, 0], \
        np.asarray(res.per_star["RV"]) - sim.truth["rv"][idx]


def _program_rms(res, sim):
    rows = np.asarray(sim.truth["program_fibres"])
    rel = median_filter(res.flux[rows] / sim.truth["program_true_flux"] - 1.0, size=(1, 51), mode="nearest")
    thr = sim.truth["throughput"]
    good = np.ones(sim.wave.shape, bool) & (thr >= 0.1 * thr.max())
    for lo, hi in TELLURIC_DEFAULT:
        good &= ~((sim.wave >= lo) & (sim.wave <= hi))
    return float(np.sqrt(np.mean(rel[:, good] ** 2)))


def test_continuous_fit_beats_the_nodes_on_parameters_and_calibration(case):
    sim, runs = case
    dt_c, dv_c = _teff_errors(runs["continuous"], sim)
    dt_n, _ = _teff_errors(runs["nodes"], sim)
    print("median |dTeff| continuous", np.median(np.abs(dt_c)), "nodes", np.median(np.abs(dt_n)),
          "program rms", _program_rms(runs["continuous"], sim), _program_rms(runs["nodes"], sim))
    assert np.median(np.abs(dt_c)) < 0.5 * np.median(np.abs(dt_n))
    assert np.median(np.abs(dt_c)) < 80.0
    assert float(np.sqrt(np.mean(dv_c**2))) < 1.5
    assert _program_rms(runs["continuous"], sim) < _program_rms(runs["nodes"], sim)
    assert runs["continuous"].summary["n_stars_used"] == 8

"""Issue 15 (part B): per-fibre wavelengths and per-fibre resolution end to end.

Kernels on the ``xp`` fixture against brute-force NumPy loops; the pipeline on
simulated frames whose fibres carry their own wavelength solutions and LSFs.
"""

import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import interp_rows


def _rows_oracle(x, grid, fp, left=None, right=None):
    return np.stack([np.interp(x[i], grid[i], fp[i], left=left, right=right) for i in range(grid.shape[0])])


@pytest.mark.parametrize("edges", [(None, None), (np.nan, -1.0)])
def test_interp_rows_matches_a_loop_of_numpy_interp(backend, edges):
    rng = np.random.default_rng(5)
    n_row, n, m = 7, 50, 80
    grid = np.sort(rng.uniform(4000.0, 4100.0, (n_row, n)), axis=1) + rng.uniform(-3, 3, (n_row, 1))
    fp = rng.normal(size=(n_row, n))
    x = rng.uniform(3990.0, 4110.0, (n_row, m))
    x[:, 0] = grid[:, 0]  # on the first and last abscissae exactly
    x[:, 1] = grid[:, -1]
    got = interp_rows(backend.asarray(x), backend.asarray(grid), backend.asarray(fp), left=edges[0], right=edges[1])
    assert_close(got, _rows_oracle(x, grid, fp, *edges), rtol=1e-12, atol=1e-12, backend=backend)


def test_interp_rows_broadcasts_a_shared_query_and_keeps_float32(backend):
    rng = np.random.default_rng(6)
    grid = np.cumsum(rng.uniform(0.5, 1.5, (4, 30)), axis=1)
    fp = rng.normal(size=(4, 30)).astype(np.float32)
    x = np.linspace(0.0, 30.0, 45)
    got = interp_rows(backend.asarray(x[None, :]), backend.asarray(grid), backend.asarray(fp))
    assert str(got.dtype).endswith("float32") and tuple(got.shape) == (4, 45)
    want = _rows_oracle(np.broadcast_to(x, (4, 45)), grid, fp.astype(np.float64))
    assert_close(got, want, rtol=2e-6, atol=2e-6, backend=backend)

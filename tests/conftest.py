"""Shared fixtures: the ``backend``/``xp`` fixtures run a test on every namespace.

Namespaces: numpy, array-api-strict on its default device and on its
non-default ``Device("device1")`` (catches device mixing and implicit NumPy
conversion, which raises there), torch on the CPU when installed, and cupy
when a CUDA device answers. A missing backend is a skip that names it and why.
"""

import numpy as np
import pytest

from gpucal.backends import Backend, get_backend, to_numpy
from gpucal.errors import BackendError


def _strict(device_name):
    xs = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")
    dev = xs.Device(device_name) if device_name else None
    return Backend("array_api_strict", xs, dev, f"test fixture ({device_name or 'default device'})")


def _named(name):
    try:
        return get_backend(name)
    except BackendError as exc:
        pytest.skip(f"{name}: {exc}")


BACKEND_PARAMS = ["numpy", "array_api_strict", "array_api_strict:device1", "torch", "cupy"]


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request) -> Backend:
    """A Backend (namespace + device) for each namespace under test."""
    name = request.param
    if name == "array_api_strict":
        return _strict(None)
    if name == "array_api_strict:device1":
        return _strict("device1")
    return _named(name)


@pytest.fixture
def xp(backend):
    """The array namespace of ``backend``."""
    return backend.xp


def assert_close(actual, desired, *, rtol=1e-7, atol=0.0, backend=None, err_msg=""):
    """Compare a backend array with a NumPy oracle, checking namespace and device too."""
    if backend is not None:
        from gpucal.backends import array_namespace
        from array_api_compat import device

        assert array_namespace(actual) is array_namespace(backend.asarray(np.zeros(1)))
        if backend.device is not None and backend.name == "array_api_strict":
            assert device(actual) == backend.device
    np.testing.assert_allclose(to_numpy(actual), np.asarray(desired), rtol=rtol, atol=atol, err_msg=err_msg)


def tol(dtype_name):
    """Relative tolerance appropriate to a float dtype name."""
    return {"float64": 1e-10, "float32": 2e-5}[dtype_name]


def small_demo_cache(directory):
    """A 30-template cache cut from the demo grid (F/G dwarfs, Teff 5500-6500 K, logg >= 4,
    -0.5 <= [M/H] <= 0) written to ``directory``: a small frame calibrates in a second or two."""
    import dataclasses

    from gpucal.templates.cache import write_template_cache
    from gpucal.templates.demo import demo_grid

    grid = demo_grid()
    p = np.asarray(grid.params)
    keep = (p[:, 0] >= 5500) & (p[:, 0] <= 6500) & (p[:, 1] >= 4.0) & (p[:, 2] >= -0.5) & (p[:, 2] <= 0.0)
    sub = dataclasses.replace(grid, params=p[keep], flux=np.asarray(grid.flux)[keep], meta={},
                              continuum=None if grid.continuum is None else np.asarray(grid.continuum)[keep])
    return write_template_cache(sub, directory)

"""Backend selection (get_backend, GPUCAL_BACKEND), the native delegate, host/device round trips, run-time helpers."""

import dataclasses

import numpy as np
import pytest

from gpucal.backends import (
    Backend,
    _select,
    backend_of,
    device_name,
    get_backend,
    memory_pool_bytes,
    native_namespace,
    synchronize,
    to_backend,
    to_numpy,
)
from gpucal.errors import BackendError


def _no_gpu(monkeypatch):
    monkeypatch.setattr(_select, "_cupy_usable", lambda: (False, "no CUDA device (test)"))


def test_named_backends():
    import array_api_compat.numpy

    b = get_backend("numpy")
    assert (b.name, b.xp) == ("numpy", array_api_compat.numpy)
    assert get_backend(" NumPy ").name == "numpy"
    assert get_backend("array-api-strict").name == "array_api_strict"
    assert get_backend(b) is b


def test_torch_backend():
    pytest.importorskip("torch", reason="torch is not installed")
    b = get_backend("torch")
    assert b.name == "torch"
    assert b.xp.__name__.endswith("torch")


def test_auto_without_gpu_is_numpy(monkeypatch):
    _no_gpu(monkeypatch)
    b = get_backend("auto")
    assert b.name == "numpy"
    assert "GPU not usable" in b.reason


def test_env_variable(monkeypatch):
    _no_gpu(monkeypatch)
    monkeypatch.setenv("GPUCAL_BACKEND", "array_api_strict")
    b = get_backend()
    assert b.name == "array_api_strict"
    assert "GPUCAL_BACKEND" in b.reason
    monkeypatch.setenv("GPUCAL_BACKEND", "")
    assert get_backend().name == "numpy"
    monkeypatch.delenv("GPUCAL_BACKEND")
    assert get_backend().name == "numpy"
    monkeypatch.setenv("GPUCAL_BACKEND", "nonsense")
    with pytest.raises(BackendError, match="nonsense"):
        get_backend()


def test_cupy_without_gpu_raises(monkeypatch):
    ok, why = _select._cupy_usable()
    if ok:
        pytest.skip(f"cupy: a CUDA device is usable here ({why})")
    with pytest.raises(BackendError, match="cupy"):
        get_backend("cupy")


def test_cupy_never_falls_back(monkeypatch):
    _no_gpu(monkeypatch)
    with pytest.raises(BackendError, match="no CUDA device"):
        get_backend("cupy")


def test_unknown_name():
    with pytest.raises(BackendError, match="unknown backend"):
        get_backend("tensorflow")


@pytest.mark.parametrize("dtype", ["float64", "float32", "int64", "bool"])
def test_round_trip(backend, dtype):
    host = (np.arange(12).reshape(3, 4) % 3).astype(dtype)
    arr = to_backend(host, backend)
    assert backend_of(arr).name == backend.name
    if backend.device is not None and backend.name == "array_api_strict":
        assert backend_of(arr).device == backend.device
    back = to_numpy(arr)
    assert isinstance(back, np.ndarray) and back.dtype == host.dtype
    np.testing.assert_array_equal(back, host)
    assert to_backend(arr, backend) is arr
    np.testing.assert_array_equal(to_numpy(backend.asarray(host, dtype=backend.xp.float32)), host.astype("float32"))


def test_to_numpy_of_numpy_and_scalars():
    a = np.arange(3.0)
    assert to_numpy(a) is a
    assert to_numpy(2.5) == 2.5


def test_backend_is_immutable():
    b = get_backend("numpy")
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.name = "cupy"
    assert isinstance(b, Backend)


def test_native_namespace_picks_the_delegate(backend):
    """numpy on NumPy, cupy on CuPy, None (portable fallback) on every other namespace."""
    native = native_namespace(backend.xp)
    want = {"numpy": "numpy", "cupy": "cupy"}.get(backend.name)
    assert (None if native is None else native.__name__) == want


def test_runtime_helpers_on_every_backend(backend):
    """synchronize, memory_pool_bytes and device_name take a Backend or an array; a pool only on CuPy."""
    arr = backend.asarray(np.arange(4.0))
    for obj in (backend, arr):
        assert synchronize(obj) is None
        assert isinstance(device_name(obj), str) and device_name(obj)
    if backend.name != "cupy":
        assert memory_pool_bytes(backend) is None and memory_pool_bytes(arr, release_unused=True) is None
        return
    held = memory_pool_bytes(backend, release_unused=True)
    big = backend.asarray(np.zeros(2**20))  # 8 MiB
    assert memory_pool_bytes(arr) >= held + big.nbytes


def test_jax_is_named_and_refused_not_advertised():
    """JAX is not in the test matrix, so gpucal neither lists it nor runs on it silently."""
    from gpucal.backends import BACKEND_NAMES

    assert "jax" not in BACKEND_NAMES
    with pytest.raises(BackendError, match="backend 'jax' is not supported: gpucal is not tested on JAX"):
        get_backend("jax")

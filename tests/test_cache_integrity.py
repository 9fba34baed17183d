"""A prepared template cache is checked on every open: changed, linked or inconsistent caches are refused (issue 19)."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucal.errors import CorruptCacheError, GpucalError, InputError
from gpucal.templates import cache as tcache
from gpucal.templates import load_template_cache, write_template_cache
from gpucal.templates.demo import demo_grid
from gpucal.templates.keys import _sha256_file, _sidecar_sha256

FILES = ("params.npy", "wave.npy", "flux.npy", "continuum.npy", "grid.json")


def _tiny():
    return demo_grid(teff=(5500.0, 6000.0), logg=(4.5,), mh=(0.0,), wave_range=(4000.0, 4100.0), dlnlam=1 / 2000)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(tmp_path / "user-cache"))
    return write_template_cache(_tiny(), tmp_path / "cache")


def _edit_sidecar(path, edit):
    """Rewrite the sidecar by ``edit(meta)`` and record its new SHA-256, as a careful tamperer would."""
    side = os.path.join(path, "grid.json")
    meta = json.load(open(side))
    edit(meta)
    meta["sidecar_sha256"] = _sidecar_sha256(meta)
    json.dump(meta, open(side, "w"))


def _replace_array(path, name, arr, *, rehash=False):
    np.save(os.path.join(path, f"{name}.npy"), arr, allow_pickle=False)
    if rehash:
        _edit_sidecar(path, lambda m: m["arrays"][name].update(sha256=_sha256_file(os.path.join(path, f"{name}.npy"))))


def _grid_equal(a, b):
    for name in ("params", "wave", "flux", "continuum"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
    assert (a.medium, a.resolution_fwhm) == (b.medium, b.resolution_fwhm)
    assert {k: v for k, v in a.meta.items() if k != "cache_path"} == {k: v for k, v in b.meta.items()
                                                                      if k != "cache_path"}


# ------------------------------------------------------------------ the cases of the issue


def test_every_template_replaced_by_the_first_is_refused(cache):
    flux = np.load(os.path.join(cache, "flux.npy"))
    _replace_array(cache, "flux", np.repeat(flux[:1], flux.shape[0], axis=0))
    with pytest.raises(CorruptCacheError, match=f"{cache}: the flux array .*flux.npy.* SHA-256"):
        load_template_cache(cache)


def test_teff_plus_3000_is_refused(cache):
    params = np.load(os.path.join(cache, "params.npy"))
    _replace_array(cache, "params", params + np.array([3000.0, 0, 0, 0]))
    with pytest.raises(CorruptCacheError, match="the params array .*params.npy"):
        load_template_cache(cache, verify="none")
    # with its hash recorded again, the sidecar's own parameters still disagree
    _replace_array(cache, "params", params + np.array([3000.0, 0, 0, 0]), rehash=True)
    with pytest.raises(CorruptCacheError, match="grid.json: the sidecar does not match .*params.npy differs"):
        load_template_cache(cache)


def test_one_flipped_data_byte_is_refused(cache):
    for name in ("params", "wave", "flux", "continuum"):
        fname = os.path.join(cache, f"{name}.npy")
        raw = bytearray(open(fname, "rb").read())
        raw[-3] ^= 0x01
        open(fname, "wb").write(bytes(raw))
        with pytest.raises(CorruptCacheError, match=f"the {name} array"):
            load_template_cache(cache)
        raw[-3] ^= 0x01
        open(fname, "wb").write(bytes(raw))
        load_template_cache(cache)


def test_an_array_linked_out_of_the_cache_is_refused(cache, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(os.path.join(cache, "flux.npy"), outside)  # the very same bytes
    os.remove(os.path.join(cache, "flux.npy"))
    os.symlink(outside, os.path.join(cache, "flux.npy"))
    with pytest.raises(CorruptCacheError, match="flux.npy: the cache's flux array is a symbolic link"):
        load_template_cache(cache)


def test_a_linked_sidecar_or_a_file_outside_the_cache_is_refused(cache, tmp_path):
    _edit_sidecar(cache, lambda m: m["arrays"]["wave"].update(file="../wave.npy"))
    with pytest.raises(CorruptCacheError, match="'../wave.npy' must lie in the cache directory"):
        load_template_cache(cache)
    shutil.move(os.path.join(cache, "grid.json"), tmp_path / "grid.json")
    os.symlink(tmp_path / "grid.json", os.path.join(cache, "grid.json"))
    with pytest.raises(CorruptCacheError, match="grid.json: the cache's sidecar is a symbolic link"):
        load_template_cache(cache)
    os.remove(os.path.join(cache, "grid.json"))
    os.mkdir(os.path.join(cache, "grid.json"))
    with pytest.raises(CorruptCacheError, match="not a regular file"):
        load_template_cache(cache)


def test_an_edited_sidecar_is_refused(cache):
    side = os.path.join(cache, "grid.json")
    meta = json.load(open(side))
    meta["resolution_fwhm"] = 0.5
    json.dump(meta, open(side, "w"))
    with pytest.raises(CorruptCacheError, match="grid.json: content does not match its recorded SHA-256"):
        load_template_cache(cache, verify="none")


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.update(n_templates=3), "records 3 templates, the arrays hold 2"),
    (lambda m: m["axes"].update(teff=[5500.0, 6500.0]), "teff values are not the teff axis"),
    (lambda m: m.update(dlnlam=1 / 4000), "Δlnλ"),
    (lambda m: m.update(medium="vaccum"), "medium 'vaccum'"),
    (lambda m: m.update(grid={"wave_min": 3999.0}), "grid.wave_min 3999.0"),
    (lambda m: m.update(params=m["params"][:1]), "params.npy differs"),
])
def test_the_sidecar_is_cross_checked_against_the_arrays(cache, edit, needle):
    _edit_sidecar(cache, edit)
    with pytest.raises(CorruptCacheError, match=needle):
        load_template_cache(cache)


def test_arrays_never_unpickled(cache, monkeypatch):
    calls = []
    real = np.load
    monkeypatch.setattr(tcache.np, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_template_cache(cache)
    assert len(calls) == 4 and all(k.get("allow_pickle") is False for k in calls)
    monkeypatch.undo()
    obj = np.empty(2, dtype=object)
    obj[:] = [{"a": 1}, {"b": 2}]
    np.save(os.path.join(cache, "wave.npy"), obj, allow_pickle=True)
    _edit_sidecar(cache, lambda m: m["arrays"]["wave"].update(sha256=_sha256_file(os.path.join(cache, "wave.npy"))))
    with pytest.raises(CorruptCacheError, match="wave.npy: cannot load cache array .*Python objects"):
        load_template_cache(cache)


def test_corrupt_cache_error_is_an_input_error():
    import gpucal.templates as tpkg

    assert issubclass(CorruptCacheError, InputError) and tpkg.CorruptCacheError is CorruptCacheError


# ------------------------------------------------------------------ the verification stamp


def _count_hashes(monkeypatch):
    hashed = []
    real = tcache._sha256_file
    monkeypatch.setattr(tcache, "_sha256_file", lambda p: hashed.append(os.path.basename(p)) or real(p))
    return hashed


def test_stamp_makes_the_next_open_free_and_a_changed_file_is_hashed_again(cache, monkeypatch):
    monkeypatch.setattr(tcache, "RACY_S", 0.0)
    hashed = _count_hashes(monkeypatch)
    load_template_cache(cache)
    assert sorted(hashed) == ["continuum.npy", "flux.npy", "params.npy", "wave.npy"]
    assert os.path.isfile(os.path.join(cache, ".gpucal-verified.json"))
    assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]
    hashed.clear()
    load_template_cache(cache)
    assert hashed == []
    load_template_cache(cache, verify="full")
    assert len(hashed) == 4
    hashed.clear()
    fname = os.path.join(cache, "flux.npy")
    st = os.stat(fname)
    raw = bytearray(open(fname, "rb").read())
    raw[-1] ^= 0x80
    open(fname, "wb").write(bytes(raw))
    os.utime(fname, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the inode's ctime still moved
    with pytest.raises(CorruptCacheError, match="the flux array"):
        load_template_cache(cache)
    assert hashed == ["flux.npy"]


def test_a_file_changed_just_before_it_was_hashed_is_not_stamped(cache, monkeypatch):
    hashed = _count_hashes(monkeypatch)
    load_template_cache(cache)  # written a moment ago: within RACY_S
    load_template_cache(cache)
    assert len(hashed) == 8 and not os.path.exists(os.path.join(cache, ".gpucal-verified.json"))


def test_stamp_goes_to_the_user_cache_dir_when_the_cache_is_read_only(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(tcache, "RACY_S", 0.0)
    real = tempfile.mkstemp
    blocked = {cache}

    def mkstemp(*a, dir=None, **k):
        if dir in blocked:
            raise PermissionError(13, "Permission denied", dir)
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tcache.tempfile, "mkstemp", mkstemp)
    hashed = _count_hashes(monkeypatch)
    load_template_cache(cache)
    load_template_cache(cache)
    assert len(hashed) == 4 and not os.path.exists(os.path.join(cache, ".gpucal-verified.json"))
    assert len(os.listdir(tmp_path / "user-cache" / ".verified")) == 1
    # nowhere to write: every open hashes, and still loads
    shutil.rmtree(tmp_path / "user-cache")
    blocked.add(str(tmp_path / "user-cache" / ".verified"))
    hashed.clear()
    load_template_cache(cache)
    load_template_cache(cache)
    assert len(hashed) == 8


def test_a_stamp_of_another_cache_or_a_garbled_stamp_is_ignored(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(tcache, "RACY_S", 0.0)
    load_template_cache(cache)
    copy = str(tmp_path / "copy")
    shutil.copytree(cache, copy)  # the stamp travels along but names the original
    hashed = _count_hashes(monkeypatch)
    load_template_cache(copy)
    assert len(hashed) == 4
    open(os.path.join(cache, ".gpucal-verified.json"), "w").write("{not json")
    hashed.clear()
    load_template_cache(cache)
    assert len(hashed) == 4


# ------------------------------------------------------------------ random corruption never gives another result


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    path = write_template_cache(_tiny(), tmp_path_factory.mktemp("clean") / "cache")
    return path, load_template_cache(path, verify="full")


def _corrupt(fname, where, mask, truncate):
    """Truncate ``fname`` at fraction ``where`` of its length, or XOR the byte there with ``mask``."""
    raw = bytearray(open(fname, "rb").read())
    at = int(where * len(raw))
    if truncate:
        raw = raw[:at]
    else:
        raw[at] ^= mask
    open(fname, "wb").write(bytes(raw))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(FILES), where=st.floats(0.0, 1.0, exclude_max=True), mask=st.integers(1, 255),
       truncate=st.booleans())
def test_random_corruption_is_an_error_or_the_same_grid(clean, which, where, mask, truncate):
    src, want = clean
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cache")
        shutil.copytree(src, path)
        fname = os.path.join(path, which)
        _corrupt(fname, where, mask, truncate)
        try:
            got = load_template_cache(path)
        except GpucalError:
            return
        _grid_equal(got, want)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(FILES + (".gpucal-verified.json",)), where=st.floats(0.0, 1.0, exclude_max=True),
       mask=st.integers(1, 255), truncate=st.booleans())
def test_random_corruption_of_a_stamped_cache_is_an_error_or_the_same_grid(clean, which, where, mask, truncate,
                                                                           monkeypatch):
    """The same with a stamp in place (and corruption of the stamp itself): the stamp never hides a change."""
    src, want = clean
    monkeypatch.setattr(tcache, "RACY_S", 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cache")
        shutil.copytree(src, path)
        load_template_cache(path)
        assert os.path.isfile(os.path.join(path, ".gpucal-verified.json"))
        fname = os.path.join(path, which)
        st_before = os.stat(fname)
        _corrupt(fname, where, mask, truncate)
        # the filesystem clock has ticked since the stamp (what RACY_S guarantees outside this test)
        os.utime(fname, ns=(st_before.st_atime_ns, st_before.st_mtime_ns + 10**9))
        try:
            got = load_template_cache(path)
        except GpucalError:
            return
        _grid_equal(got, want)


def test_a_stamp_temporary_left_by_a_killed_process_is_removed(cache, monkeypatch):
    monkeypatch.setattr(tcache, "RACY_S", 0.0)
    old = os.path.join(cache, ".gpucal-verified.json.abc123.tmp")
    new = os.path.join(cache, ".gpucal-verified.json.def456.tmp")
    for p in (old, new):
        open(p, "w").write("{")
    os.utime(old, (1.0, 1.0))
    load_template_cache(cache)
    assert not os.path.exists(old) and os.path.exists(new)  # a fresh one may be another writer's

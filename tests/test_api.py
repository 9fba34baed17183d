"""The public API: every name the README shows imports from ``gpucal`` itself."""

import subprocess
import sys

import pytest

import gpucal

README_API = ("calibrate_frame", "calibrate_frames", "load_templates", "prepare_grid", "match_templates",
              "scale_template_to_photometry", "calibration_vectors", "combine_calibration_vectors",
              "apply_flux_calibration", "synthetic_mags", "get_backend")
ERRORS = ("GpucalError", "BackendError", "InputError", "CoverageError", "NoStandardsError", "PhotometryError",
          "CalibrationError", "StaleCacheError", "CorruptCacheError")


@pytest.mark.parametrize("name", gpucal.__all__)
def test_every_public_name_imports(name):
    ns = {}
    exec(f"from gpucal import {name}", ns)
    assert ns[name] is getattr(gpucal, name)
    if name != "__version__":
        assert callable(ns[name])


def test_readme_api_and_errors_are_public():
    assert set(README_API) | set(ERRORS) <= set(gpucal.__all__)
    for name in ERRORS:
        assert issubclass(getattr(gpucal, name), gpucal.GpucalError)
    assert isinstance(gpucal.__version__, str) and gpucal.__version__.count(".") >= 2


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'calibrate_everything'"):
        gpucal.calibrate_everything  # noqa: B018


def test_import_gpucal_is_light():
    """``import gpucal`` loads no numerics, plotting or cluster code until a name is used."""
    code = ("import sys, gpucal; heavy = [m for m in ('numpy', 'scipy', 'astropy', 'matplotlib', 'dask') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""

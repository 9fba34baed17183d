"""Extinction of templates: the law against dust_extinction, per-star curves on every backend."""

import astropy.units as u
import numpy as np
import pytest

from conftest import assert_close
from gpucal.backends import to_numpy
from gpucal.errors import InputError
from gpucal.photometry.extinction import extinction_curve, extinction_law, redden
from gpucal.photometry import synthetic_mags

WAVE = np.exp(np.arange(np.log(3000.0), np.log(25000.0), 1.0 / 5000))


def test_law_is_fitzpatrick99_rv31():
    from dust_extinction.parameter_averages import F99

    k = extinction_law(WAVE)
    np.testing.assert_allclose(k, 3.1 * F99(Rv=3.1)(WAVE * u.AA), rtol=1e-12)
    # A(λ)/E(B−V) falls from ~4.1 at B to ~3.0 at V and ~0.35 at Ks.
    kb, kv, kk = np.interp([4400.0, 5500.0, 21600.0], WAVE, k)
    assert 3.9 < kb < 4.3 and 2.9 < kv < 3.2 and 0.25 < kk < 0.45
    assert not k.flags.writeable
    assert extinction_law(WAVE) is k  # cached per grid


def test_other_laws_and_rv():
    from dust_extinction.parameter_averages import CCM89

    np.testing.assert_allclose(extinction_law(WAVE, law="CCM89", r_v=5.0), 5.0 * CCM89(Rv=5.0)(WAVE * u.AA), rtol=1e-12)
    with pytest.raises(InputError, match="unknown extinction law"):
        extinction_law(WAVE, law="nosuch")
    with pytest.raises(InputError, match="R_V"):
        extinction_law(WAVE, r_v=-1.0)


def test_outside_the_law_range_is_held_at_the_end():
    wave = np.array([500.0, 900.0, 1001.0, 30000.0, 40000.0, 300000.0])
    k = extinction_law(wave)
    assert k[0] == k[1] == pytest.approx(k[2], rel=1e-2)
    assert k[4] == k[5] == pytest.approx(extinction_law(np.array([1e4 / 0.3]))[0], rel=1e-9)
    assert np.all(np.isfinite(k))


def test_curve_on_backends(backend):
    ebv = np.array([0.0, 0.1, 0.5])
    curve = extinction_curve(backend.asarray(WAVE), backend.asarray(ebv))
    assert tuple(curve.shape) == (3, WAVE.size)
    expect = 10.0 ** (-0.4 * ebv[:, None] * extinction_law(WAVE)[None, :])
    assert_close(curve, expect, rtol=1e-12, backend=backend)
    flux = backend.asarray(np.ones((3, WAVE.size)))
    assert_close(redden(WAVE, flux, ebv), expect, rtol=1e-12, backend=backend)


def test_host_input_gives_numpy():
    curve = extinction_curve(WAVE, [0.2])
    assert isinstance(curve, np.ndarray) and curve.shape == (1, WAVE.size)


def test_synthetic_colour_excess_matches_ebv():
    """E(B−V) measured through Bessell B and V of a reddened F star is close to the input."""
    from gpucal.templates.demo import demo_template

    flux = demo_template(6500.0, 4.5, 0.0, 0.0, WAVE)[None, :]
    red = redden(WAVE, flux, [0.2])
    d = synthetic_mags(WAVE, red, ("bessell-B", "bessell-V")) - synthetic_mags(WAVE, flux, ("bessell-B", "bessell-V"))
    excess = d[0, 0] - d[0, 1]
    assert excess == pytest.approx(0.2, rel=0.08)
    # A(V)/E(B−V) ~ R_V.
    assert d[0, 1] / excess == pytest.approx(3.1, rel=0.08)


def test_bad_ebv_names_the_stars():
    with pytest.raises(InputError, match=r"star\(s\) 1, 3"):
        extinction_curve(WAVE, [0.1, np.nan, 0.0, np.inf])
    with pytest.raises(InputError, match="1-D"):
        extinction_curve(WAVE, np.zeros((2, 2)))
    with pytest.raises(InputError, match="one value per spectrum"):
        redden(WAVE, np.ones((2, WAVE.size)), [0.1])
    with pytest.raises(InputError, match="pixels"):
        redden(WAVE[:-1], np.ones((1, WAVE.size)), [0.1])
    assert to_numpy(extinction_curve(WAVE, [0.0])).min() == 1.0

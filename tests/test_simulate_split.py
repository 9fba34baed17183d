"""simulate_frame's steps keep their own random streams: options that change one step leave the others' draws alone."""

import numpy as np

from gpucal.simulate import simulate_frame

SMALL = dict(n_standards=7, n_program=2, n_sky=1, n_pix=300, wave_range=(5000.0, 5600.0), seed=3)


def _same_frame(a, b):
    assert np.array_equal(a.wave, b.wave) and np.array_equal(a.flux, b.flux) and np.array_equal(a.var, b.var)
    for ta, tb in ((a.fibres, b.fibres), (a.catalogue, b.catalogue)):
        assert ta.colnames == tb.colnames
        assert all(np.array_equal(ta[c], tb[c]) for c in ta.colnames)


def test_given_rvs_equal_to_the_drawn_ones_give_the_same_frame():
    """The standards' extra RVs are drawn even when ``rvs`` is given, so the later draws do not move."""
    a = simulate_frame(**SMALL)
    _same_frame(a, simulate_frame(rvs=a.truth["rv"], **SMALL))
    _same_frame(a, simulate_frame(params=a.truth["params"], **SMALL))


def test_mag_noise_changes_only_the_catalogue_magnitudes():
    a, b = simulate_frame(**SMALL), simulate_frame(mag_noise=True, **SMALL)
    assert np.array_equal(a.flux, b.flux) and np.array_equal(a.truth["mags"], b.truth["mags"])
    assert all(np.array_equal(a.fibres[c], b.fibres[c]) for c in a.fibres.colnames)
    assert all(np.array_equal(a.catalogue[c], b.catalogue[c]) for c in ("name", "ra", "dec", "dg", "dr", "di", "dz"))
    assert not np.array_equal(a.catalogue["g"], b.catalogue["g"])


def test_noise_false_is_the_noisy_frame_without_its_noise():
    a, b = simulate_frame(**SMALL), simulate_frame(noise=False, **SMALL)
    assert np.array_equal(b.flux, b.truth["counts_true"]) and np.array_equal(a.truth["counts_true"], b.flux)
    assert np.array_equal(a.var, b.var) and not np.array_equal(a.flux, b.flux)
    assert all(np.array_equal(a.fibres[c], b.fibres[c]) for c in a.fibres.colnames)

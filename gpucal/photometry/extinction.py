"""Interstellar extinction of model spectra before photometric scaling.

Step of the mission: a reddened standard is matched by a reddened template.
Given a per-star colour excess ``ebv (n_star,)`` (mag, from the catalogue's
``ebv`` column or the command line) the template grid's spectra are multiplied
by the transmission ``10**(−0.4 · k(λ) · E(B−V))`` of a standard extinction
law, ``k(λ) = A(λ)/E(B−V) = R_V · A(λ)/A(V)``, before synthetic photometry,
scaling and the calibration vector.

The law is evaluated on the host once per wavelength grid with the
``dust-extinction`` package (Fitzpatrick 1999, R_V = 3.1 by default, or any
other R_V-dependent law of ``dust_extinction.parameter_averages``); the
per-star transmission ``(n_star, n_w)`` is formed on the namespace and device
of ``ebv``. Wavelengths in Å.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..backends import array_namespace, backend_of, to_backend, to_numpy
from ..errors import InputError
from ._host import host_float

__all__ = ["DEFAULT_LAW", "DEFAULT_RV", "extinction_law", "extinction_curve", "redden"]

DEFAULT_LAW = "F99"
DEFAULT_RV = 3.1


def _host_wave(wave) -> np.ndarray:
    w = np.asarray(wave if isinstance(wave, (list, tuple)) else to_numpy(wave), dtype=np.float64)
    if w.ndim != 1 or w.shape[0] < 1 or not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise InputError(f"wavelength grid must be 1-D, finite and positive (Å), got shape {w.shape}")
    return w


@functools.lru_cache(maxsize=16)
def _law_cached(wave_bytes: bytes, law: str, r_v: float) -> np.ndarray:
    import astropy.units as u
    from dust_extinction import parameter_averages

    model_cls = getattr(parameter_averages, law, None)
    if model_cls is None or not isinstance(model_cls, type):
        names = ", ".join(n for n in getattr(parameter_averages, "__all__", ()) if n[:1].isupper())
        raise InputError(f"unknown extinction law {law!r}; use one of dust_extinction's R_V laws ({names})")
    try:
        model = model_cls(Rv=r_v)
    except Exception as exc:  # dust_extinction raises its own errors for an R_V out of range
        raise InputError(f"extinction law {law} does not accept R_V = {r_v}: {exc}") from None
    w = np.frombuffer(wave_bytes, dtype=np.float64)
    # The law is defined on x = 1/λ in [x_lo, x_hi] µm⁻¹; beyond it the curve is
    # held at its end values. No supported filter reaches past F99's
    # 1000 Å – 3.3 µm, so synthetic photometry never sees the held values.
    x_lo, x_hi = (float(v) for v in model.x_range)
    lam_lo, lam_hi = 1e4 / x_hi, 1e4 / x_lo
    clipped = np.clip(w, lam_lo * (1 + 1e-12), lam_hi * (1 - 1e-12))
    k = np.asarray(model(clipped * u.AA), dtype=np.float64) * r_v
    k.flags.writeable = False
    return k


def extinction_law(wave, *, law: str = DEFAULT_LAW, r_v: float = DEFAULT_RV) -> np.ndarray:
    """k(λ) = A(λ)/E(B−V) on ``wave`` (host float64, read-only, cached per grid).

    Parameters
    ----------
    wave : (n_w,) Å, host or backend (read on the host).
    law : name of an R_V-dependent law in ``dust_extinction.parameter_averages``
        (default ``"F99"``, Fitzpatrick 1999, PASP 111, 63).
    r_v : R_V = A(V)/E(B−V), default 3.1.

    Outside the law's range (F99: 1000 Å – 3.33 µm) k is held at the value
    at the nearest end.
    """
    try:
        r_v = float(r_v)
    except (TypeError, ValueError):
        r_v = math.nan
    if not (math.isfinite(r_v) and r_v > 0):
        raise InputError(f"R_V must be a positive number, got {r_v!r}")
    w = _host_wave(wave)
    return _law_cached(w.tobytes(), str(law), r_v)


def extinction_curve(wave, ebv, *, law: str = DEFAULT_LAW, r_v: float = DEFAULT_RV):
    """Transmission 10**(−0.4 k(λ) E(B−V)) per star, shape (n_star, n_w).

    Parameters
    ----------
    wave : (n_w,) Å (host or backend).
    ebv : (n_star,) E(B−V) in mag, a host sequence or a backend array; the
        result is float64 on the namespace and device of ``ebv`` (NumPy for
        host input). Must be finite: fill unknown values before (e.g.
        :func:`gpucal.photometry.match_ebv` with ``default``).
    law, r_v : see :func:`extinction_law`.

    Raises
    ------
    InputError
        ``ebv`` is not 1-D or holds a non-finite value (the message names
        the star indices).
    """
    k = extinction_law(wave, law=law, r_v=r_v)
    if isinstance(ebv, (list, tuple, float, int)) or isinstance(ebv, np.ndarray):
        ebv = np.asarray(ebv, dtype=np.float64)
    xp = array_namespace(ebv)
    if ebv.ndim != 1:
        raise InputError(f"ebv must be 1-D (n_star,), got shape {tuple(ebv.shape)}")
    host = to_numpy(ebv)
    bad = np.nonzero(~np.isfinite(host))[0]
    if bad.size:
        raise InputError(
            f"E(B-V) is not finite for star(s) {', '.join(map(str, bad[:10]))}; give a value (or 0) for every star"
        )
    e = xp.astype(ebv, xp.float64)
    kd = to_backend(np.array(k), backend_of(ebv), dtype=xp.float64)
    return 10.0 ** (-0.4 * e[:, None] * kd[None, :])


def redden(wave, flux, ebv, *, law: str = DEFAULT_LAW, r_v: float = DEFAULT_RV):
    """``flux (n_star, n_w)`` times :func:`extinction_curve`, on ``flux``'s namespace and device.

    ``ebv`` (n_star,) may be host or on ``flux``'s backend.
    """
    if flux.ndim != 2:
        raise InputError(f"flux must be 2-D (n_star, n_w), got shape {tuple(flux.shape)}")
    ebv_host = host_float(ebv)
    if ebv_host.ndim != 1 or ebv_host.shape[0] != int(flux.shape[0]):
        raise InputError(f"ebv must have one value per spectrum ({int(flux.shape[0])}), got shape {ebv_host.shape}")
    curve = extinction_curve(wave, to_backend(ebv_host, backend_of(flux)), law=law, r_v=r_v)
    if int(curve.shape[1]) != int(flux.shape[1]):
        raise InputError(f"flux has {int(flux.shape[1])} pixels but the wavelength grid has {int(curve.shape[1])}")
    return flux * curve

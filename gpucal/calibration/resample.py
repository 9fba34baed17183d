"""Per-fibre wavelengths: per-star vectors to one common grid, and the combined vector back to every fibre.

Step of the mission between the per-star vectors (:mod:`.vectors`, each star
on its own wavelengths) and the combination (:mod:`.combine`, one grid), and
again at the application (:mod:`.apply`):

* :func:`common_grid` — the grid the stars are combined on: at every pixel
  index the mean of the fibres' wavelengths (n_pix,), increasing because
  every row is;
* :func:`to_common_grid` — each star's vector, variance and mask linearly
  interpolated onto it: Cal_c = (1−t) Cal_j + t Cal_{j+1},
  σ²_c = (1−t)² σ²_j + t² σ²_{j+1} (independent pixels), good only where both
  neighbours are good and inside the star's own range;
* :func:`cal_at_fibres` — the combined vector read at every fibre's own
  wavelengths (n_fibre, n_pix); its variance is interpolated linearly (the
  combined vector is smooth and its neighbouring pixels correlated, so this
  neither gains nor loses variance), and beyond the common grid's ends the
  edge values hold, marked not measured.

Everything is one batched interpolation over all stars / fibres
(:func:`gpucal.backends.interp_rows`): no loop over fibres. Shapes: star or
fibre axis 0; wavelengths Å; Cal in erg/s/cm²/Å per count.
"""

from __future__ import annotations

from array_api_compat import device as _device

from ..backends import array_namespace, interp, interp_rows
from ..containers import CalibrationVectors

__all__ = ["common_grid", "to_common_grid", "cal_at_fibres"]


def common_grid(wave):
    """(n_pix,) Å: the mean over fibres of ``wave`` (n_fibre, n_pix) at each pixel; a 1-D ``wave`` as it is."""
    xp = array_namespace(wave)
    return wave if wave.ndim == 1 else xp.mean(wave, axis=0)


def to_common_grid(vectors: CalibrationVectors, wave_rows, wave_c, *, band=None) -> CalibrationVectors:
    """Per-star vectors on their own wavelengths ``wave_rows`` (n_star, n_pix) -> on ``wave_c`` (n_c,).

    Returns CalibrationVectors (n_star, n_c) on ``wave_c``; see the module docstring.
    Vectors that keep the telluric bands (``resp``, ``resp_var``) carry them the same
    way; ``band`` (n_c,) bool is then the bands' pixels on ``wave_c``.
    """
    xp = array_namespace(vectors.cal, wave_c)
    n_star, n_pix = vectors.cal.shape
    rows = xp.broadcast_to(wave_rows, (n_star, n_pix))
    index = xp.broadcast_to(xp.arange(n_pix, dtype=xp.float64, device=_device(wave_c)), (n_star, n_pix))
    pos = interp_rows(wave_c[None, :], rows, index, left=-1.0, right=float(n_pix))  # fractional pixel
    inside = (pos >= 0.0) & (pos <= n_pix - 1.0)
    lo = xp.astype(xp.clip(xp.floor(pos), 0.0, n_pix - 2.0), xp.int64)
    t = xp.clip(pos - xp.astype(lo, xp.float64), 0.0, 1.0)
    hi = lo + 1

    def at(a, i):
        return xp.take_along_axis(a, i, axis=1)

    def carry(val, var, valid):
        m_lo, m_hi = at(valid, lo), at(valid, hi)
        # a neighbour with zero weight (t = 0 or 1 exactly) need not be good
        good = inside & (m_lo | (t == 1.0)) & (m_hi | (t == 0.0))
        y_lo, y_hi = xp.where(m_lo, at(val, lo), 0.0), xp.where(m_hi, at(val, hi), 0.0)
        s_lo, s_hi = xp.where(m_lo, at(var, lo), 0.0), xp.where(m_hi, at(var, hi), 0.0)
        return (xp.where(good, (1.0 - t) * y_lo + t * y_hi, xp.nan),
                xp.where(good, (1.0 - t) ** 2 * s_lo + t * t * s_hi, xp.nan), good)

    cal, var, good = carry(vectors.cal, vectors.var, vectors.mask)
    out = CalibrationVectors(wave=wave_c, cal=cal, var=var, mask=good)
    if vectors.resp is not None:
        if band is None:
            raise ValueError("to_common_grid: vectors keep the telluric bands; give band on the common grid")
        out.resp, out.resp_var, _ = carry(vectors.resp, vectors.resp_var, xp.isfinite(vectors.resp))
        out.band = band
    return out


def cal_at_fibres(wave_fibres, wave_c, cal, cal_var, measured):
    """The combined vector (n_c,) on ``wave_c`` read at every fibre's wavelengths ``wave_fibres`` (n_fibre, n_pix).

    Returns (cal, cal_var, measured), (n_fibre, n_pix) each; a fibre pixel is
    measured where both common-grid neighbours are, and not beyond the grid's ends.
    """
    xp = array_namespace(wave_fibres, cal)
    n = wave_c.shape[0]
    c = interp(wave_fibres, wave_c, cal)
    cv = interp(wave_fibres, wave_c, cal_var)
    m = interp(wave_fibres, wave_c, xp.astype(measured, xp.float64), left=0.0, right=0.0) > 1.0 - 1e-9
    return c, cv, m & (wave_fibres >= wave_c[0]) & (wave_fibres <= wave_c[n - 1])

"""Instrument line-spread function: convolve templates to the frame's resolution.

Step of the mission: put the template grid at the instrument's resolution
before it is compared with observed spectra.

Instrument resolution
    The FWHM in Å is given in exactly one way: constant (``fwhm``), a
    polynomial in wavelength with ascending coefficients (``fwhm_poly``:
    FWHM(λ) = c0 + c1 λ + c2 λ² + …, λ in Å), or a constant resolving power
    (``resolution``: FWHM = λ / R).

Template resolution (``template_fwhm``, ``TemplateGrid.resolution_fwhm``)
    The resolution the templates already have, removed in quadrature
    (σ_eff² = σ_inst² − σ_tmpl²; Gaussians compose in quadrature). A
    *resolution spec* is one of

    * a number ≥ 0: constant FWHM in Å (``0.0`` = infinitely sharp);
    * ``"R:<R>"``: constant resolving power, FWHM = λ / R (BOSZ ``r<R>`` files);
    * ``"poly:c0,c1,..."``: FWHM(λ) in Å, ascending coefficients;
    * a string holding a plain number (Å), as JSON sidecars store it;
    * a mapping with exactly one of ``fwhm`` / ``fwhm_poly`` / ``resolution``;
    * a callable ``f(wave) -> FWHM`` (Å) in the namespace of ``wave``.

    :func:`resolution_spec` turns instrument arguments into the canonical
    spec, so a grid pre-convolved to an instrument records exactly the
    resolution it has and a second convolution to the same instrument is the
    identity (σ_eff = 0 at every pixel).

The kernel
    ``out(λ_i) = ∫ f(λ') N(λ' − λ_i; σ(λ_i)) dλ'``: a Gaussian in Å whose width
    is that of the output pixel. On a log-uniform grid (λ_j = λ_i e^{(j−i)d},
    d = Δlnλ) the integral becomes a sum over pixel offsets Δ = j − i with
    weights ``exp(−(e^{Δd} − 1)² / 2s_i²) · e^{Δd}`` (s_i = σ_i / λ_i; the last
    factor is the Jacobian dλ'/dlnλ'), normalised per output pixel. σ is
    evaluated at every pixel, so the width varies smoothly across the band:
    no chunks, no steps. A constant FWHM in Å is a kernel that is constant in
    Å (narrower in pixels towards the red), not constant in velocity. The
    sum converges spectrally to the integral for σ ≳ 1 pixel.

Shapes: wave (n_w,) Å, log-uniform; flux (..., n_w) (a batch of templates);
output (..., n_w), dtype of ``flux``, on its namespace and device. The kernel
loop runs on the array namespace of the inputs (NumPy, CuPy, torch, ...). It
is not a Gaussian filter in pixels: on a log grid that would be skewed
relative to a Gaussian in Å and lack the Jacobian.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from array_api_compat import device as _device

from ..backends import array_namespace, cache_columns, interp_rows, to_numpy
from ..errors import InputError
from ..units import FWHM_TO_SIGMA

__all__ = [
    "instrument_fwhm",
    "resolution_spec",
    "parse_resolution_spec",
    "template_fwhm_at",
    "convolve_to_instrument",
    "convolve_fwhm",
    "representative_fwhm_poly",
    "fwhm_on_grid",
    "fwhm_from_resolution",
]


#: Relative σ below which a pixel is left as it is (σ far below a pixel).
_MIN_REL_SIGMA = 1e-12


def _check_lsf_args(fwhm, fwhm_poly, resolution):
    given = [a is not None for a in (fwhm, fwhm_poly, resolution)]
    if sum(given) != 1:
        raise InputError("give exactly one of --fwhm, --fwhm-poly or --resolution")
    if fwhm is not None and not (fwhm > 0 and math.isfinite(fwhm)):
        raise InputError(f"--fwhm must be a positive number of Å, got {fwhm!r}")
    if resolution is not None and not (resolution > 0 and math.isfinite(resolution)):
        raise InputError(f"--resolution must be a positive λ/Δλ, got {resolution!r}")
    if fwhm_poly is not None and (len(fwhm_poly) == 0 or not all(math.isfinite(c) for c in fwhm_poly)):
        raise InputError(f"--fwhm-poly needs finite coefficients, got {fwhm_poly!r}")


def instrument_fwhm(wave, *, fwhm=None, fwhm_poly=None, resolution=None):
    """FWHM in Å at each wavelength (same namespace, device and shape as ``wave``)."""
    _check_lsf_args(fwhm, fwhm_poly, resolution)
    xp = array_namespace(wave)
    if fwhm is not None:
        return xp.full_like(wave, float(fwhm))
    if resolution is not None:
        return wave / float(resolution)
    out = xp.zeros_like(wave)
    for c in reversed(list(fwhm_poly)):  # Horner, ascending coefficients
        out = out * wave + float(c)
    return out


def resolution_spec(*, fwhm=None, fwhm_poly=None, resolution=None):
    """The canonical resolution spec of an instrument setting.

    Returns a float (constant FWHM in Å), ``"R:<R>"`` or ``"poly:c0,c1,..."``,
    with every number written by ``repr`` so it parses back to the same float.
    """
    _check_lsf_args(fwhm, fwhm_poly, resolution)
    if fwhm is not None:
        return float(fwhm)
    if resolution is not None:
        return f"R:{float(resolution)!r}"
    return "poly:" + ",".join(repr(float(c)) for c in fwhm_poly)


def parse_resolution_spec(spec):
    """A resolution spec as ``dict(fwhm=, fwhm_poly=, resolution=)`` or a callable.

    A constant FWHM of 0 (infinitely sharp) comes back as ``{"fwhm": 0.0, ...}``;
    a callable is returned unchanged. Raises InputError naming the spec when
    it is malformed.
    """
    empty = {"fwhm": None, "fwhm_poly": None, "resolution": None}
    if callable(spec):
        return spec
    if isinstance(spec, bool):
        raise InputError(f"resolution spec must be a number, 'R:<R>', 'poly:c0,c1,...' or a callable, got {spec!r}")
    if isinstance(spec, (int, float)):
        v = float(spec)
        if not (v >= 0 and math.isfinite(v)):
            raise InputError(f"template FWHM must be a finite number of Å >= 0, got {spec!r}")
        return {**empty, "fwhm": v}
    if isinstance(spec, Mapping):
        out = {**empty, **{k: spec.get(k) for k in empty}}
        unknown = set(spec) - set(empty)
        if unknown or sum(v is not None for v in out.values()) != 1:
            raise InputError(f"resolution spec mapping needs exactly one of fwhm, fwhm_poly, resolution; got {dict(spec)!r}")
        if out["fwhm"] is not None:
            return parse_resolution_spec(float(out["fwhm"]))
        if out["resolution"] is not None:
            return parse_resolution_spec(f"R:{float(out['resolution'])!r}")
        return parse_resolution_spec("poly:" + ",".join(repr(float(c)) for c in out["fwhm_poly"]))
    if isinstance(spec, str):
        text = spec.strip()
        head, sep, body = text.partition(":")
        try:
            if not sep:
                return parse_resolution_spec(float(text))
            kind = head.strip().lower()
            if kind == "r":
                r = float(body)
                if not (r > 0 and math.isfinite(r)):
                    raise ValueError
                return {**empty, "resolution": r}
            if kind == "poly":
                coeffs = [float(c) for c in body.split(",")]
                if not coeffs or not all(math.isfinite(c) for c in coeffs):
                    raise ValueError
                return {**empty, "fwhm_poly": coeffs}
        except ValueError:
            pass
    raise InputError(
        f"resolution spec must be a number of Å, 'R:<R>', 'poly:c0,c1,...', a mapping or a callable, got {spec!r}"
    )


def template_fwhm_at(wave, spec):
    """FWHM in Å of a resolution spec at each wavelength (namespace and device of ``wave``)."""
    xp = array_namespace(wave)
    parsed = parse_resolution_spec(spec)
    if callable(parsed):
        out = xp.asarray(parsed(wave), device=_device(wave))
        if out.shape != wave.shape:
            out = xp.broadcast_to(out, wave.shape)
        out = xp.astype(out, wave.dtype)
        if not bool(xp.all(xp.isfinite(out) & (out >= 0.0))):
            raise InputError("a template resolution callable returned a negative or non-finite FWHM")
        return out
    if parsed["fwhm"] is not None:
        return xp.full_like(wave, parsed["fwhm"])
    return instrument_fwhm(wave, fwhm_poly=parsed["fwhm_poly"], resolution=parsed["resolution"])


def _log_dlnlam(wave):
    """Δlnλ of a log-uniform grid; InputError when ``wave`` is not one."""
    xp = array_namespace(wave)
    n = wave.shape[0]
    if wave.ndim != 1 or n < 2:
        raise InputError(f"the LSF needs a 1-D wavelength grid of at least 2 pixels, got shape {wave.shape}")
    lo, hi = float(wave[0]), float(wave[n - 1])
    if not (lo > 0 and hi > lo):
        raise InputError(f"the LSF needs positive increasing wavelengths, got {lo}..{hi} Å")
    d = math.log(hi / lo) / (n - 1)
    dl = xp.log(wave[1:]) - xp.log(wave[:-1])
    # One host check at set-up time: a non-log-uniform grid would silently
    # give the wrong kernel width.
    if float(xp.max(xp.abs(dl - d))) > 1e-6 * d:
        raise InputError(
            f"the LSF convolution needs a log-uniform (constant Δlnλ) grid; {lo:.2f}-{hi:.2f} Å is not one"
        )
    return d


def _convolve_log(flux, rel_sigma, dlnlam: float, half_width: int):
    """Σ_Δ w_iΔ f_{i+Δ} / Σ_Δ w_iΔ with w = exp(−(e^{Δd}−1)²/2s_i² + Δd), float64 accumulation.

    On the host the pixels go in cache-sized blocks (:func:`gpucal.backends.cache_columns`):
    every pixel sums the same terms in the same order, so the result is the same to the bit.
    """
    xp = array_namespace(flux, rel_sigma)
    dev = _device(flux)
    out_dtype = flux.dtype if xp.isdtype(flux.dtype, "real floating") else xp.float64
    f = xp.astype(flux, xp.float64)
    s = xp.astype(rel_sigma, xp.float64)
    n = f.shape[-1]
    h = min(max(int(half_width), 0), n - 1)
    positive = s > _MIN_REL_SIGMA
    # s_i = 0 is the identity: unit weight at Δ = 0 and none elsewhere.
    neg_inv_2s2 = -0.5 / xp.where(positive, s, 1.0) ** 2
    if h:
        pad = xp.zeros(f.shape[:-1] + (h,), dtype=xp.float64, device=dev)
        padded = xp.concat([pad, f, pad], axis=-1)
    else:
        padded = f
    idx = xp.arange(n, device=dev)
    span = cache_columns(f, math.prod(f.shape[:-1])) or n
    blocks = []
    for c0 in range(0, n, span):
        c1 = min(n, c0 + span)
        blocks.append(_convolve_block(padded, positive[..., c0:c1], neg_inv_2s2[..., c0:c1], idx[c0:c1],
                                      c0, c1, n, h, dlnlam))
    return xp.astype(blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=-1), out_dtype)


def _convolve_block(padded, positive, neg_inv_2s2, idx, c0, c1, n, h, dlnlam):
    """Pixels [c0, c1) of :func:`_convolve_log` (``padded``: the flux with h zeros each side)."""
    xp = array_namespace(padded)
    num = xp.zeros(padded.shape[:-1] + (c1 - c0,), dtype=xp.float64, device=_device(padded))
    den = xp.zeros((c1 - c0,), dtype=xp.float64, device=_device(padded))
    for d in range(-h, h + 1):
        u = d * dlnlam
        t2 = math.expm1(u) ** 2
        k = xp.where(positive, xp.exp(neg_inv_2s2 * t2 + u), 1.0 if d == 0 else 0.0)
        # zero padding keeps the numerator right; the denominator counts only
        # pixels inside the array, so the kernel is renormalised at the edges
        inside = xp.astype((idx + d >= 0) & (idx + d < n), xp.float64)
        num = num + k * padded[..., h + d + c0: h + d + c1]
        den = den + k * inside
    return num / den


def convolve_to_instrument(wave, flux, *, fwhm=None, fwhm_poly=None, resolution=None,
                           template_fwhm=0.0, truncate: float = 4.0):
    """Convolve spectra on a log-uniform grid with the instrument's Gaussian LSF.

    Parameters
    ----------
    wave : array (n_w,)
        Å, log-uniform (constant Δlnλ), strictly increasing.
    flux : array (..., n_w)
        Spectra; leading axes are a batch (templates). NaNs spread to their
        neighbours: fill bad pixels first.
    fwhm, fwhm_poly, resolution
        The instrument resolution, exactly one (see the module docstring).
    template_fwhm
        The templates' own resolution spec (float Å, ``"R:<R>"``,
        ``"poly:..."``, mapping or callable), removed in quadrature.
    truncate
        Kernel half-width ``h = ceil(truncate · max σ)`` pixels; the kernel is
        not cut per pixel, so narrower pixels get proportionally more of it.

    Returns
    -------
    array (..., n_w), dtype of ``flux`` (computed in float64). The first and
    last ``h`` pixels use a kernel renormalised over the pixels that exist.

    Raises
    ------
    InputError
        Where the instrument FWHM is finer than the template's own resolution
        anywhere in ``wave`` (a deconvolution is never faked), or ``wave`` is
        not log-uniform.
    """
    fw = instrument_fwhm(wave, fwhm=fwhm, fwhm_poly=fwhm_poly, resolution=resolution)
    return convolve_fwhm(wave, flux, fw, template_fwhm=template_fwhm, truncate=truncate)


def convolve_fwhm(wave, flux, fw, *, template_fwhm=0.0, truncate: float = 4.0):
    """:func:`convolve_to_instrument` with the instrument FWHM given as an array.

    ``fw`` : FWHM in Å at each pixel of ``wave``, (n_w,) or per spectrum
    (..., n_w), broadcasting against ``flux`` (..., n_w): a per-fibre LSF
    (each star's row) is applied to each star's template in the same pass.
    """
    xp = array_namespace(wave, flux, fw)
    n = wave.shape[0]
    if flux.ndim < 1 or flux.shape[-1] != n:
        raise InputError(f"flux {flux.shape} does not match the wavelength grid ({n},) on its last axis")
    if fw.shape[-1] != n:
        raise InputError(f"the FWHM array {fw.shape} does not match the wavelength grid ({n},) on its last axis")
    if not (truncate > 0 and math.isfinite(truncate)):
        raise InputError(f"truncate must be a positive number of σ, got {truncate!r}")
    dlnlam = _log_dlnlam(wave)
    tf = template_fwhm_at(wave, template_fwhm)
    eff2 = fw * fw - tf * tf
    # One host check at set-up time (not in a scan): refuse an LSF narrower
    # than the template's own resolution; equal widths (a grid already at
    # this resolution) are allowed up to rounding and give the identity.
    bad = eff2 < -1e-9 * (tf * tf)
    if bool(xp.any(bad | ~xp.isfinite(fw))):
        anywhere = xp.reshape(xp.any(xp.reshape(bad | ~xp.isfinite(fw), (-1, n)), axis=0), (n,))
        first = float(wave[int(xp.argmax(xp.astype(anywhere, xp.int32)))])
        raise InputError(
            f"the instrument FWHM is below the template grid's own resolution ({template_fwhm!r}) "
            f"or not finite, first at {first:.1f} Å (grid {float(wave[0]):.1f}-{float(wave[n - 1]):.1f} Å)"
        )
    rel_sigma = xp.sqrt(xp.clip(eff2, 0.0, None)) * FWHM_TO_SIGMA / wave
    half = int(math.ceil(truncate * float(xp.max(rel_sigma)) / dlnlam))
    return _convolve_log(flux, rel_sigma, dlnlam, half)


def representative_fwhm_poly(wave, fw, *, degree: int = 3):
    """One LSF for a batch of fibres: ascending coefficients of a polynomial FWHM(λ) in Å.

    ``wave``, ``fw`` : (n_spec, n_pix) or (n_pix,) Å, each fibre's wavelengths and
    FWHM there. The median FWHM over the fibres at each pixel, fitted by a
    least-squares polynomial of ``degree`` in λ (Å; the fit is done in a
    centred, scaled variable and converted back). Used where one LSF must
    serve every fibre (the grid scan); set-up time, host floats out.
    """
    xp = array_namespace(wave, fw)
    shape = fw.shape if fw.ndim >= wave.ndim else wave.shape
    w2 = xp.reshape(xp.broadcast_to(wave, shape), (-1, shape[-1]))
    f2 = xp.reshape(xp.broadcast_to(fw, shape), w2.shape)
    x = xp.mean(w2, axis=0)
    y = xp.sort(f2, axis=0)[(f2.shape[0] - 1) // 2, :]
    mid = float(x[x.shape[0] // 2])
    half = float(xp.max(xp.abs(x - mid)))
    t = (x - mid) / half
    powers = xp.stack([t ** k for k in range(degree + 1)], axis=1)
    coef = xp.linalg.solve(xp.permute_dims(powers, (1, 0)) @ powers, xp.permute_dims(powers, (1, 0)) @ y)
    c = [float(v) for v in to_numpy(coef).tolist()]
    # Σ c_k ((λ − mid)/half)^k as ascending coefficients in λ (binomial expansion).
    out = [0.0] * (degree + 1)
    for k, ck in enumerate(c):
        for j in range(k + 1):
            out[j] += ck * math.comb(k, j) * (-mid) ** (k - j) / half ** k
    return out


def fwhm_on_grid(wave_t, wave_obs, fw):
    """Each star's LSF FWHM (Å) carried from its pixels onto a template grid: (n_star, n_w).

    ``wave_obs`` (n_pix,) or (n_star, n_pix) the stars' wavelengths, ``fw``
    (n_star, n_pix) the FWHM there; beyond a star's range its edge value holds.
    One batched interpolation (:func:`gpucal.backends.interp_rows`).
    """
    xp = array_namespace(wave_t, fw)
    rows = xp.broadcast_to(wave_obs, fw.shape)
    return interp_rows(wave_t[None, :], rows, fw)


def fwhm_from_resolution(wave, rdata):
    """FWHM in Å per fibre and pixel from a DESI-style resolution matrix: (n_fibre, n_pix).

    ``rdata`` (n_fibre, n_diag, n_pix): the band-diagonal kernel of each output
    pixel (row d is the diagonal at pixel offset n_diag//2 − d; the sign does
    not enter the width). ``wave`` (n_pix,) or (n_fibre, n_pix) Å. The kernel's
    second central moment in pixels (negative ringing clipped to 0) is taken as
    a Gaussian σ and converted with the local dispersion |dλ/dpix|:
    FWHM = √(8 ln 2) σ |dλ/dpix|. The kernel describes binned pixels, so σ
    includes the pixel's own 1/12 px², as a point-sampled model needs.
    """
    xp = array_namespace(wave, rdata)
    n_diag = rdata.shape[-2]
    k = xp.astype(xp.arange(n_diag, device=_device(rdata)), xp.float64)
    k = (n_diag // 2 - k)[:, None]
    r = xp.clip(xp.astype(rdata, xp.float64), 0.0, None)
    norm = xp.sum(r, axis=-2)
    norm = xp.where(norm > 0, norm, xp.nan)
    mean = xp.sum(r * k, axis=-2) / norm
    var = xp.sum(r * k * k, axis=-2) / norm - mean * mean
    n = wave.shape[-1]
    w = xp.astype(wave, xp.float64)
    # |dλ/dpix| by central differences, one-sided at the ends
    inner = 0.5 * (w[..., 2:] - w[..., :-2])
    disp = xp.abs(xp.concat([w[..., 1:2] - w[..., :1], inner, w[..., n - 1:] - w[..., n - 2:n - 1]], axis=-1))
    return math.sqrt(8.0 * math.log(2.0)) * xp.sqrt(xp.clip(var, 0.0, None)) * disp

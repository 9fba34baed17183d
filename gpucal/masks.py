"""Wavelength regions excluded from matching and calibration (telluric bands).

Input: a wavelength array (n_pix,) in Å; output: a boolean array of the same
namespace and device, True where the pixel is usable.
"""

from __future__ import annotations

from .backends import array_namespace
from .errors import InputError

__all__ = ["TELLURIC_DEFAULT", "parse_regions", "region_mask"]

#: Default telluric absorption bands (Å): O2 B/A bands and H2O bands.
TELLURIC_DEFAULT = (
    (6860.0, 6960.0),
    (7150.0, 7340.0),
    (7590.0, 7700.0),
    (8100.0, 8360.0),
    (8920.0, 9200.0),
)


def parse_regions(text: str):
    """Parse ``"lo-hi,lo-hi"`` (Å) or ``"none"`` into a tuple of (lo, hi) pairs."""
    text = text.strip()
    if text.lower() in ("", "none"):
        return ()
    if text.lower() in ("telluric", "default"):
        return TELLURIC_DEFAULT
    out = []
    for part in text.split(","):
        try:
            lo, hi = (float(v) for v in part.split("-"))
        except ValueError:
            raise InputError(f"mask region {part!r} is not of the form LO-HI in Å") from None
        if not lo < hi:
            raise InputError(f"mask region {part!r}: LO must be below HI")
        out.append((lo, hi))
    return tuple(out)


def region_mask(wave, regions=TELLURIC_DEFAULT):
    """True where ``wave`` lies outside every (lo, hi) region (inclusive bounds)."""
    xp = array_namespace(wave)
    good = xp.ones(wave.shape, dtype=xp.bool, device=_device(wave))
    for lo, hi in regions:
        good = good & ~((wave >= lo) & (wave <= hi))
    return good


def _device(x):
    from array_api_compat import device

    return device(x)

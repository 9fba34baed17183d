"""Step 5: the combined calibration applied to every fibre, variance propagated.

:func:`apply_flux_calibration`: F = C · Cal, σ²_F = σ²_C Cal² + C² σ²_Cal.
Shapes: flux, var (n_fibre, n_pix) with the fibre axis given by the caller —
never inferred from the shape, so square frames are safe; cal, cal_var
(n_pix,), or per fibre (the frame's shape) when the fibres have their own wavelengths. Counts in, erg/s/cm²/Å out.
"""

from __future__ import annotations

from ..backends import array_namespace
from ..errors import InputError

__all__ = ["apply_flux_calibration"]


def apply_flux_calibration(flux, var, cal, cal_var, *, fibre_axis: int = 0):
    """Calibrate every fibre: F = C · Cal, σ²_F = σ²_C Cal² + C² σ²_Cal.

    flux, var : 2-D frames with the fibre axis ``fibre_axis`` (0 or 1) given
    by the caller — never inferred from the shape, so square frames are safe.
    cal, cal_var : (n_pix,), or the frame's shape (each fibre's own calibration at
    its own wavelengths). NaN (bad) pixels stay NaN.
    """
    xp = array_namespace(flux, cal)
    if flux.ndim != 2 or var.shape != flux.shape:
        raise InputError(f"flux and variance must be 2-D and alike, got {flux.shape} and {var.shape}")
    if fibre_axis not in (0, 1):
        raise InputError(f"fibre_axis must be 0 or 1, got {fibre_axis}")
    pix_axis = 1 - fibre_axis
    if cal.ndim == 2:  # per-fibre wavelengths: each fibre's own calibration (resample.cal_at_fibres)
        if cal.shape != flux.shape or cal_var.shape != flux.shape:
            raise InputError(f"a per-fibre calibration {cal.shape} must have the frame's shape {flux.shape}")
        c, cv = cal, cal_var
    elif flux.shape[pix_axis] != cal.shape[0]:
        raise InputError(
            f"calibration has {cal.shape[0]} pixels but the frame's pixel axis ({pix_axis}) has {flux.shape[pix_axis]}"
        )
    else:
        c = cal[None, :] if fibre_axis == 0 else cal[:, None]
        cv = cal_var[None, :] if fibre_axis == 0 else cal_var[:, None]
    # a pixel the input marks bad (zero or NaN variance) stays marked in the output
    xp = array_namespace(flux, var, cal)
    return flux * c, xp.where(var > 0, var * c * c + flux * flux * cv, var)

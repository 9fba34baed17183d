"""Report: the per-star table of a calibrated frame (host values only, no computation).

:func:`per_star_table` lays out, one row per standard in frame order, what the
pipeline measured and decided: parameters, RV, photometric scale, χ²/dof,
per-band magnitude residuals, pixel counts, how the photometry was matched,
whether the star was used and, if not, why. Written to the ``FLUXSTD``
extension and shown in the QC report.

Units (TUNIT of every physical column): TEFF, TEFF_COLOUR, TEFF_COLOUR_ERR K; LOGG
log(cm.s**-2); MH, ALPHA dex; RV, RV_ERR km/s; DMAG_* mag. SCALE (template surface
flux to observed flux, (R/d)²), CHI2_DOF and the counts are dimensionless. Units
astropy cannot write in FITS (the logarithmic ones) travel as the column's
``meta["tunit"]``, which the writer puts in TUNIT.
"""

from __future__ import annotations

import numpy as np

from ..containers import PARAM_NAMES

__all__ = ["per_star_table"]

#: FITS units of the logarithmic parameters (astropy writes no function unit to FITS).
_LOG_UNITS = {"LOGG": "log(cm.s**-2)", "MH": "dex", "ALPHA": "dex"}


def per_star_table(names, fibres, h: dict, bands, match_info, reasons, *, teff_colour=None):
    """An astropy Table of the standards.

    names, fibres : (n_star,) names and 1-based fibre numbers; h : host arrays
    (params (n_star, 4), rv, rv_err, scale, scale_err, chi2, n_bands,
    residual (n_star, n_band), n_good, n_outlier, used); bands : the
    photometry's band names; match_info, reasons : per-star strings;
    teff_colour : optional (teff, teff_err) of the colour prior.
    """
    from astropy.table import Table

    t = Table()
    t["NAME"] = list(names)
    t["FIBRE"] = fibres
    for j, p in enumerate(PARAM_NAMES):
        t[p.upper()] = h["params"][:, j]
    t["TEFF"].unit = "K"
    for name, unit in _LOG_UNITS.items():
        t[name].meta["tunit"] = unit
    t["RV"] = h["rv"]
    t["RV"].unit = "km/s"
    t["RV_ERR"] = h["rv_err"]
    t["RV_ERR"].unit = "km/s"
    t["SCALE"] = h["scale"]
    t["SCALE_ERR"] = h["scale_err"]
    t["CHI2_DOF"] = h["chi2"]
    t["N_BANDS"] = h["n_bands"]
    for j, b in enumerate(bands):
        t[f"DMAG_{b.split('-')[-1].upper()}"] = h["residual"][:, j]
        t[f"DMAG_{b.split('-')[-1].upper()}"].unit = "mag"
    t["N_GOOD"] = h["n_good"]
    t["N_OUTLIER"] = h["n_outlier"]  # the star's own outlier pixels left out of the combination
    t["PHOT_MATCH"] = list(match_info)
    t["USED"] = h["used"].astype(bool)
    t["REASON"] = [r or "-" for r in reasons]
    if teff_colour is not None:
        t["TEFF_COLOUR"] = np.asarray(teff_colour[0], dtype=float)
        t["TEFF_COLOUR_ERR"] = np.asarray(teff_colour[1], dtype=float)
        t["TEFF_COLOUR"].unit = t["TEFF_COLOUR_ERR"].unit = "K"
    return t

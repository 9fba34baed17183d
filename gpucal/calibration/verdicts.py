"""Each standard: used, or the first reason it is not — decided in one place.

A verdict is one integer per star, on the backend: 0 = usable, k > 0 = the
k-th check of :data:`CHECKS` failed first. The mask that enters the
combination (``usable``) and the reason written to the per-star table are
both read from that one array, so they cannot drift apart. Checks are
applied in priority order — the cause, not its consequences: a star with
too few good input pixels is reported as that, not as also having too few
good vector pixels.

* :func:`star_verdicts` — the verdicts from the checks known before the
  combination (input pixels, duplicates, photometry, velocity edge, vector
  pixels, χ²/dof);
* :meth:`Verdicts.then` — a later check (the combination's discrepant stars,
  stars it could not use) added at lower priority;
* :func:`duplicate_of` — the earlier standard a fibre is bit-identical to;
* :func:`verdict_reasons` — the host-side text of each verdict;
* :func:`frame_verdict` — the frame as a whole: when every used standard's
  χ²/dof is absurd, or the standards disagree beyond a bound, the frame is
  not calibratable (its likely cause named), whatever each star's verdict.

Shapes: every check is (n_star,) bool, True = the star fails it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from array_api_compat import device as _device

from ..backends import array_namespace

__all__ = ["CHECKS", "MIN_GOOD_FRACTION", "MAX_FRAME_CHI2_DOF", "MAX_SCATTER", "LIKELY_CAUSES", "Verdicts",
           "star_verdicts", "duplicate_of", "verdict_reasons", "frame_verdict"]

#: A standard needs at least this fraction of its pixels good to be used.
MIN_GOOD_FRACTION = 0.5

#: A frame whose every used standard has a best χ²/dof above this is an error, not a calibration.
#: Clean simulated frames give 1.1-1.8 at S/N 50, 3-13 at S/N 200 and 12-311 at S/N 1000 (template
#: mismatch grows as S/N²; the lowest star of a frame at most 58); a transposed 2dF frame gave 10 000+.
MAX_FRAME_CHI2_DOF = 1000.0

#: A frame whose used standards' vectors scatter (combined RMS, summary['rms_scatter']) more than this
#: (0.2 = 20 %) is an error. Clean simulated frames give 0.001-0.026 at S/N 50-1000 (the demo 0.019);
#: 1000 x 1000 frames stored transposed give 1.06-1.19.
MAX_SCATTER = 0.2

#: What usually makes a whole frame fit badly: named in the error.
LIKELY_CAUSES = "frame stored transposed? wrong LSF? wrong air/vacuum medium?"

#: Every check a standard must pass, in priority order (the first failure is its reason).
CHECKS = (
    "few_input_pixels",
    "duplicate",
    "no_photometry",
    "photometry_inconsistent",
    "rv_at_edge",
    "fit_not_converged",
    "few_vector_pixels",
    "chi2_dof",
    "discrepant",
    "not_combined",
)


@dataclass(frozen=True)
class Verdicts:
    """code : (n_star,) int backend array, 0 = usable, else 1 + index in :data:`CHECKS`."""

    code: object

    @property
    def usable(self):
        """(n_star,) bool: the stars that passed every check so far."""
        return self.code == 0

    def then(self, check: str, fails):
        """These verdicts with ``check`` applied to the stars still usable."""
        xp = array_namespace(self.code)
        return Verdicts(xp.where(self.usable & fails, CHECKS.index(check) + 1, self.code))


def star_verdicts(checks: dict) -> Verdicts:
    """Verdicts from ``checks`` (name -> (n_star,) bool, True = fails); unnamed checks pass.

    The first failing check in :data:`CHECKS` order is each star's verdict.
    """
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown verdict checks {sorted(unknown)}; known: {CHECKS}")
    first = next(iter(checks.values()))
    xp = array_namespace(first)
    code = xp.zeros(first.shape, dtype=xp.int64, device=_device(first))
    for k in range(len(CHECKS) - 1, -1, -1):  # lowest priority first, so the first failure wins
        if CHECKS[k] in checks:
            code = xp.where(checks[CHECKS[k]], k + 1, code)
    return Verdicts(code)


def duplicate_of(flux, var):
    """For each row, the first earlier row bit-identical in flux and variance, else -1.

    flux, var : (n_star, n_pix). NaN equals NaN here: a copied fibre copies its
    bad pixels too. The same data twice is not a second star.
    """
    xp = array_namespace(flux, var)

    def same(a):
        return (a[:, None, :] == a[None, :, :]) | (xp.isnan(a[:, None, :]) & xp.isnan(a[None, :, :]))

    eq = xp.all(same(flux) & same(var), axis=2)  # (n, n)
    n = flux.shape[0]
    idx = xp.arange(n, device=_device(flux))
    earlier = eq & (idx[None, :] < idx[:, None])
    return xp.where(xp.any(earlier, axis=1), xp.argmax(xp.astype(earlier, xp.int8), axis=1), -1)


def verdict_reasons(code, details: dict) -> list:
    """The reason text of each star's verdict ("" for a used star); host values only.

    details : per-check host data for the messages — ``n_pix`` (int),
    ``n_in``, ``n_good``, ``chi2`` (n_star,), ``dup_fibre`` (n_star,) fibre
    number of the earlier copy, ``match_info`` and ``phot_reasons`` (lists
    of str), ``vrange`` (tuple), ``max_chi2_dof``, ``level`` (n_star,) log
    level from the combination.
    """
    d = details
    text = {
        "few_input_pixels": lambda i: f"too few good pixels ({int(d['n_in'][i])} of {d['n_pix']})",
        "duplicate": lambda i: f"duplicate of fibre {int(d['dup_fibre'][i])} (identical flux and variance)",
        "no_photometry": lambda i: f"no usable photometry ({d['match_info'][i]})",
        "photometry_inconsistent": lambda i: d["phot_reasons"][i],
        "rv_at_edge": lambda i: f"velocity at the edge of the scan range {d['vrange'][0]}..{d['vrange'][1]} km/s",
        "fit_not_converged": lambda i: "the continuous parameter fit did not converge (--fit nodes to compare)",
        "few_vector_pixels": lambda i: f"too few good pixels ({int(d['n_good'][i])} of {d['n_pix']})",
        "chi2_dof": lambda i: f"chi2/dof {d['chi2'][i]:.2f} above {d['max_chi2_dof']}",
        "discrepant": lambda i: (f"discrepant: level {100 * (math.exp(d['level'][i]) - 1):+.1f}% "
                                 "from the other standards"),
        "not_combined": lambda i: "no pixel in common with the other standards",
    }
    return ["" if int(c) == 0 else text[CHECKS[int(c) - 1]](i) for i, c in enumerate(code)]


def frame_verdict(chi2_used, rms_scatter, max_frame_chi2_dof=MAX_FRAME_CHI2_DOF, max_scatter=MAX_SCATTER):
    """Why the frame as a whole is not a calibration, or None; host values only.

    chi2_used : best χ²/dof of each used standard (a sequence of floats);
    rms_scatter : the combination's RMS scatter between the used standards
    (None or NaN: not measured, e.g. one star). A bound of None is not
    applied. The text names the likely causes (:data:`LIKELY_CAUSES`) and the
    option that sets the bound.
    """
    chi2 = [float(c) for c in chi2_used if c is not None and math.isfinite(float(c))]
    if max_frame_chi2_dof is not None and chi2 and min(chi2) > max_frame_chi2_dof:
        return (f"every used standard fits badly: best chi2/dof {min(chi2):.4g} to {max(chi2):.4g}, above "
                f"{max_frame_chi2_dof:g} (--max-frame-chi2-dof); {LIKELY_CAUSES} variance underestimated?")
    rms = None if rms_scatter is None else float(rms_scatter)
    if max_scatter is not None and rms is not None and math.isfinite(rms) and rms > max_scatter:
        return (f"the standards disagree: RMS scatter {rms:.3g} between their calibration vectors, above "
                f"{max_scatter:g} (--max-scatter); {LIKELY_CAUSES}")
    return None

"""Telluric absorption: the bands of the Earth's atmosphere.

Step of the mission: the pixels the template match must not trust as they
stand. The bands are excluded from the fit
(:func:`gpucal.fitting.masks.region_mask` with :data:`TELLURIC_DEFAULT`);
the demo simulator imprints them (:data:`TELLURIC_BANDS`, with depths;
:mod:`gpucal.simulate_tellurics` resolves their lines by absorber,
:data:`TELLURIC_KINDS`). The correction itself — the absorption the
standards measure, kept in the vector at full resolution and never smoothed
across — is a step of the calibration room: :mod:`gpucal.calibration.telluric`.

Units: band edges in Å (the frame's medium), depths as the fraction of the
flux absorbed at a band's deepest point.
"""

from __future__ import annotations

__all__ = ["TELLURIC_BANDS", "TELLURIC_DEFAULT", "TELLURIC_KINDS", "TELLURIC_KIND"]

#: Telluric bands as (lo, hi, depth): edges in Å and the demo simulator's peak depth
#: (O2 B band, H2O, O2 A band, H2O, H2O; the O2 A and B bands are the deep ones).
TELLURIC_BANDS = (
    (6860.0, 6960.0, 0.35),  # O2 B band
    (7150.0, 7340.0, 0.15),  # H2O
    (7590.0, 7700.0, 0.40),  # O2 A band
    (8100.0, 8360.0, 0.12),  # H2O
    (8920.0, 9200.0, 0.25),  # H2O
)

#: The same bands as (lo, hi) edges in Å: the regions excluded by default from matching and calibration.
TELLURIC_DEFAULT = tuple((lo, hi) for lo, hi, _ in TELLURIC_BANDS)

#: What absorbs in each band of :data:`TELLURIC_BANDS` (same order): O2 (A, B bands; their depth
#: scales with airmass only) or H2O (scales with the precipitable water as well).
TELLURIC_KINDS = ("O2_B", "H2O", "O2_A", "H2O", "H2O")

#: The absorber of a band, keyed by its (lo, hi) edges in Å.
TELLURIC_KIND = {(lo, hi): kind for (lo, hi, _), kind in zip(TELLURIC_BANDS, TELLURIC_KINDS)}

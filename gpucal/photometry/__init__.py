"""The photometry room: put observed standards and model spectra on one photometric scale.

Modules (other rooms import from this package, not from them):

* ``bands`` — band names and aliases, AB/Vega systems, speclite filter curves, the band matrix;
* ``synphot`` — batched synthetic maggies and magnitudes (one matrix product);
* ``vega`` — CALSPEC Vega spectra, each band's m_Vega − m_AB;
* ``catalogue`` — the edge: read catalogue CSVs and FIBRES magnitudes, match them to the standards;
* ``priors`` — Teff(colour) relations fitted to a template grid, the Teff prior and its check;
* ``consistency`` — stars whose bands disagree after the scale fit;
* ``extinction`` — interstellar extinction of model spectra (dust_extinction laws).
"""

from ..containers import ColourTeffRelation, Photometry
from .bands import BAND_ALIASES, REFCAT2_BANDS, band_matrix, band_system, load_filters, resolve_band, seed_band_matrix
from .catalogue import (
    CATALOGUE_FORMATS,
    fibre_bands,
    fibres_ebv,
    match_ebv,
    match_photometry,
    photometry_from_fibres,
    read_catalogue,
)
from .consistency import photometric_consistency
from .extinction import DEFAULT_LAW, DEFAULT_RV, extinction_curve, extinction_law, redden
from .priors import (
    PRIOR_COLOURS,
    default_colour_relations,
    fit_colour_relations,
    fit_colour_teff,
    teff_disagreement,
    teff_from_colour,
    teff_prior_mask,
)
from .synphot import coverage_message, synthetic_maggies, synthetic_mags
from .vega import system_offsets, vega_offsets, vega_reference, vega_spectrum

__all__ = [
    # bands
    "BAND_ALIASES",
    "REFCAT2_BANDS",
    "resolve_band",
    "band_system",
    "load_filters",
    "band_matrix",
    "seed_band_matrix",
    # synthetic photometry
    "coverage_message",
    "synthetic_maggies",
    "synthetic_mags",
    # Vega
    "vega_spectrum",
    "vega_reference",
    "vega_offsets",
    "system_offsets",
    # catalogues
    "read_catalogue",
    "match_photometry",
    "match_ebv",
    "photometry_from_fibres",
    "fibres_ebv",
    "fibre_bands",
    "CATALOGUE_FORMATS",
    # colour priors
    "ColourTeffRelation",
    "PRIOR_COLOURS",
    "fit_colour_teff",
    "fit_colour_relations",
    "default_colour_relations",
    "teff_from_colour",
    "teff_prior_mask",
    "teff_disagreement",
    # consistency
    "photometric_consistency",
    # extinction
    "DEFAULT_LAW",
    "DEFAULT_RV",
    "extinction_law",
    "extinction_curve",
    "redden",
    # containers the room fills (defined in gpucal.containers)
    "Photometry",
]

"""The report room: what a calibration measured, laid out for people and machines.

* :mod:`.stars` — the per-star table (``FLUXSTD``);
* :mod:`.summary` — a frame's summary, its FITS keywords and HISTORY;
* :mod:`.provenance` — what went in, how it ran, by what, when (PROVENANCE, FCAL* keywords);
* :mod:`.qc` — QA images of one frame (matplotlib, imported on use);
* :mod:`.night` — the night summary of a batch and its panel;
* :mod:`.html` — static HTML pages and their JSON, per frame and per night.

Nothing here computes a result; every number arrives measured.
"""

from .night import batch_summary, write_batch_panel, write_batch_summary
from .stars import per_star_table
from .summary import fits_keywords, frame_summary, history_lines

__all__ = ["per_star_table", "frame_summary", "fits_keywords", "history_lines", "batch_summary",
           "write_batch_summary", "write_batch_panel"]

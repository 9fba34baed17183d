"""Report: a calibrated frame's provenance — what went in, how it was run, by what, when.

Step: report (11). In: what pipeline.py / cli.py hand over (host values): the
input frame's path and SHA-256, the photometry file's, the template grid's id
and hash, the LSF, every calibrate_frame option, the command line, the date
(UTC). Out: a JSON-able record (``summary["provenance"]``), the ``FCAL*``
provenance keywords of the primary header and the ``PROVENANCE`` table
(columns KEY, VALUE, both strings, one row per item). Nothing is measured or
hashed here: every value arrives computed.
"""

from __future__ import annotations

import json
import os
import platform

from .. import __version__

__all__ = ["provenance_record", "provenance_keywords", "provenance_table"]


def _text(value) -> str:
    """A value as readable text: JSON where it is JSON, else its str (a grid object, a Photometry)."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, default=_short)
    except (TypeError, ValueError):
        return _short(value)


def _short(value) -> str:
    """A non-JSON option (an in-memory Frame, grid or Photometry) as its class name, not its arrays."""
    name = type(value).__name__
    return name if name in ("Frame", "TemplateGrid", "Photometry", "Backend") else str(value)


def provenance_record(*, frame_path, frame_sha256, photometry_path, photometry_sha256, grid_id, grid_hash,
                      lsf, options, command_line, date_utc, versions=None) -> dict:
    """The provenance dict (JSON-able; every value a str, a number or None).

    frame_path / photometry_path : "" for in-memory inputs (then the hash is None);
    lsf : {fwhm | fwhm_poly | resolution: value}; options : every calibrate_frame
    keyword as called; command_line : the argv joined (None when called from Python);
    versions : {library: version} of the run (default: gpucal, python).
    """
    libs = {"gpucal": __version__, "python": platform.python_version()}
    libs.update(versions or {})
    return {
        "schema": "gpucal-provenance/1",
        "input_frame": os.path.basename(str(frame_path)) if frame_path else "",
        "input_frame_path": str(frame_path or ""),
        "input_frame_sha256": frame_sha256,
        "photometry": os.path.basename(str(photometry_path)) if photometry_path else "",
        "photometry_path": str(photometry_path or ""),
        "photometry_sha256": photometry_sha256,
        "template_grid": str(grid_id),
        "template_grid_hash": grid_hash,
        "lsf": {k: v for k, v in lsf.items() if v is not None},
        "options": {k: _text(v) if not isinstance(v, (bool, int, float, type(None))) else v
                    for k, v in options.items()},
        "command_line": command_line,
        "gpucal_version": __version__,
        "versions": libs,
        "date_utc": date_utc,
    }


def provenance_keywords(record: dict) -> dict:
    """``FCAL*`` provenance keywords {name: (value, comment)}; long values are in PROVENANCE.

    FCALINP / FCALPHOT / FCALGRID: input frame, photometry file, template grid; FCALISHA /
    FCALPSHA / FCALGSHA: their SHA-256 (64 hex digits, no room for a comment); FCALLSF: the
    LSF given; FCALDATE: the date of the calibration (UTC, ISO 8601).
    """
    lsf = ", ".join(f"{k}={_text(v)}" for k, v in record["lsf"].items()) or "none"

    def card(value, comment):  # a comment only where it fits on the card beside the value
        return value, comment if len(str(value)) + len(comment) <= 64 else ""

    kw = {
        "FCALINP": card(record["input_frame"][:68] or "(in memory)", "input frame (PROVENANCE has the path)"),
        "FCALISHA": card(record["input_frame_sha256"] or "", ""),
        "FCALPHOT": card(record["photometry"][:68] or "(in memory)", "photometry file"),
        "FCALPSHA": card(record["photometry_sha256"] or "", ""),
        "FCALGRID": card(record["template_grid"][-68:], "template grid (the end of its path)"),
        "FCALGSHA": card(record["template_grid_hash"] or "", ""),
        "FCALLSF": card(lsf[:68], "instrument LSF given"),
        "FCALDATE": card(record["date_utc"], "date of the calibration (UTC)"),
    }
    return kw


def provenance_table(record: dict):
    """The PROVENANCE table: KEY, VALUE (str), one row per item, options as ``option.<name>``."""
    from astropy.table import Table

    rows = [(k, _text(v) if v is not None else "") for k, v in record.items()
            if k not in ("options", "versions", "lsf")]
    rows += [(f"lsf.{k}", _text(v)) for k, v in record["lsf"].items()]
    rows += [(f"option.{k}", _text(v)) for k, v in record["options"].items()]
    rows += [(f"version.{k}", str(v)) for k, v in record["versions"].items()]
    return Table(rows=rows, names=("KEY", "VALUE"), dtype=(str, str))

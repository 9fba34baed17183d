"""Report: static, self-contained HTML pages (and the same content as JSON) per frame and per night.

Step: report (11), after the QA images (:mod:`.qc`) and the night summary
(:mod:`.night`). In: a frame's :class:`~gpucal.containers.CalibrationOutput`
(host) and the paths of its QA PNGs; for a night, the batch summary dict and
each frame's page. Out: ``index.html`` (inline CSS, images embedded as
``data:`` URIs, no script, no network: viewable offline and movable as one
file) and ``report.json`` / ``night.json`` whose schemas are documented and
versioned in docs/report_schema.md (:data:`SCHEMA_VERSION`). Links: a frame
page to the night page and to the previous and next frames; the night page
to every frame page. Fractions are shown in per cent to two decimals.
Nothing is computed here.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from pathlib import Path

from .night import _jsonable

__all__ = ["SCHEMA_VERSION", "write_frame_qa", "relink_frame_pages", "frame_report", "night_report", "render_frame_html", "render_night_html",
           "write_frame_report", "write_night_report"]

#: Version of the frame and night report schemas (docs/report_schema.md); bumped on any change.
SCHEMA_VERSION = "1.0"

_CSS = """
body{font-family:sans-serif;margin:1.2em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:0.85em;margin:0.4em 0}
th,td{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}tr.bad td{background:#fde8e8}tr.ok td.v{color:#176}
nav a{margin-right:1em}figure{margin:0.8em 0}figcaption{font-size:0.85em;color:#555}
img{max-width:100%;border:1px solid #ddd}code{font-size:0.85em}
"""


def _utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _num(x, fmt: str) -> str:
    """``x`` formatted, "n/a" for None; a value that rounds to zero is written without a sign ("0", not "-0")."""
    if x is None:
        return "n/a"
    text = format(float(x), fmt)
    return text[1:] if text.startswith("-") and float(text) == 0.0 else text


def _star_rows(output) -> list:
    """One dict per standard: identity, verdict, parameters and per-band residuals (mag)."""
    tab = output.per_star
    bands = [c for c in tab.colnames if c.startswith("DMAG_")]
    rows = []
    for i, s in enumerate(output.summary["stars"]):
        rows.append({"name": s["name"], "fibre": s["fibre"], "used": s["used"],
                     "verdict": "used" if s["used"] else s["reason"], "teff_k": s["teff"], "logg": s["logg"],
                     "mh": s["mh"], "alpha": s["alpha"], "rv_kms": s["rv"], "rv_err_kms": s["rv_err"],
                     "chi2_dof": s["chi2_dof"], "dmag": {b[5:]: float(tab[b][i]) for b in bands}})
    return rows


def frame_report(output, *, images=(), captions=None, links=None) -> dict:
    """The frame report (JSON-able dict, schema ``gpucal-frame-report`` :data:`SCHEMA_VERSION`).

    images : QA image paths (file names are recorded); captions : {file name: caption};
    links : {"night", "previous", "next"}: relative hrefs or None.
    """
    s = output.summary
    captions = captions or {}
    metrics = {"n_standards": s["n_standards"], "n_stars_used": s["n_stars_used"],
               "n_stars_rejected": s["n_stars_rejected"], "rms_scatter_percent": s.get("rms_scatter_percent"),
               "fraction_interpolated_percent": round(100.0 * s["fraction_interpolated"], 3),
               "mask_pixels": s.get("mask_pixels", {}), "backend": s["backend"], "device": s["device"],
               "method": s["method"], "smooth": s["smooth"], "metric": s["metric"],
               "wall_s": round(sum((s.get("timing_s") or {}).values()), 3)}
    bits = output.extra.get("mask_bits") or {}
    return _jsonable({
        "schema": "gpucal-frame-report", "schema_version": SCHEMA_VERSION, "created_utc": _utc(),
        "frame": os.path.basename(str(s["frame"])), "frame_path": str(s["frame"]),
        "output": output.out_path, "gpucal_version": s["gpucal_version"], "metrics": metrics,
        "stars": _star_rows(output),
        "mask_bits": {k: {"value": v, "meaning": m} for k, (v, m) in bits.items()},
        "provenance": s.get("provenance"), "warnings": list(s.get("warnings", [])),
        "images": [{"file": Path(p).name, "caption": captions.get(Path(p).name, "")} for p in images],
        "links": dict({"night": None, "previous": None, "next": None}, **(links or {})),
    })


def _table(head, rows, classes=None, ident=None) -> str:
    """An HTML table (``id`` = ``ident``); ``head`` and cells are text (escaped); the first column left-aligned."""
    th = "".join(f'<th{" class=l" if k == 0 else ""}>{html.escape(h)}</th>' for k, h in enumerate(head))
    body = []
    for j, row in enumerate(rows):
        cls = f' class="{classes[j]}"' if classes else ""
        tds = "".join(f'<td{" class=l" if k == 0 else ""}>{html.escape(str(c))}</td>' for k, c in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    return (f"<table{f' id={ident}' if ident else ''}><thead><tr>{th}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = html.escape(caption)
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(path.name)}: {cap}</figcaption></figure>")


def _nav(links: dict) -> str:
    labels = (("night", "night summary"), ("previous", "previous frame"), ("next", "next frame"))
    items = [f'<a href="{html.escape(links[k])}">{lab}</a>' for k, lab in labels if links.get(k)]
    return f"<nav>{''.join(items)}</nav>" if items else ""


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<link rel="icon" href="data:,"><style>{_CSS}</style></head><body>{body}</body></html>\n')


def render_frame_html(report: dict, image_dir) -> str:
    """The frame page of ``report`` (:func:`frame_report`), its images read from ``image_dir``."""
    m = report["metrics"]
    stars = report["stars"]
    bands = list(dict.fromkeys(b for s in stars for b in s["dmag"]))  # the table's band order
    star_rows = [[s["name"], s["fibre"], s["verdict"], f"{s['teff_k']:.0f}", f"{s['logg']:.2f}", f"{s['mh']:+.2f}",
                  f"{s['rv_kms']:+.1f} ± {s['rv_err_kms']:.1f}", f"{s['chi2_dof']:.2f}",
                  *[_num(None if s["dmag"].get(b) is None else 1000 * s["dmag"][b], ".0f") for b in bands]]
                 for s in stars]
    metric_rows = [["standards used", f"{m['n_stars_used']} of {m['n_standards']}"],
                   ["rejected / excluded", m["n_stars_rejected"]],
                   ["RMS scatter between standards", _pc(m["rms_scatter_percent"])],
                   ["vector interpolated", _pc(m["fraction_interpolated_percent"])],
                   ["backend", f"{m['backend']} ({m['device']})"],
                   ["combination", f"{m['method']}, smooth {m['smooth']} px, metric {m['metric']}"],
                   ["wall time", f"{m['wall_s']:.1f} s"]]
    metric_rows += [[f"MASK {k} pixels", v] for k, v in m["mask_pixels"].items()]
    prov = report.get("provenance") or {}
    prov_rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)]
                 for k, v in prov.items() if k != "options"]
    prov_rows += [[f"option {k}", v] for k, v in (prov.get("options") or {}).items()]
    bit_rows = [[k, v["value"], v["meaning"]] for k, v in report["mask_bits"].items()]
    body = [_nav(report["links"]), f"<h1>gpucal frame report: {html.escape(report['frame'])}</h1>",
            f"<p>output <code>{html.escape(str(report['output']))}</code>, gpucal {report['gpucal_version']}, "
            f"{report['created_utc']}</p>",
            "<h2>Metrics</h2>", _table(["metric", "value"], metric_rows, ident="metrics"),
            "<h2>Standards</h2>",
            _table(["name", "fibre", "verdict", "Teff K", "logg", "[M/H]", "RV km/s", "chi2/dof",
                    *[f"dmag {b} (mmag)" for b in bands]], star_rows,
                   ["ok" if s["used"] else "bad" for s in stars], ident="stars"),
            "<h2>Warnings</h2>" + (_table(["warning"], [[w] for w in report["warnings"]], ident="warnings")
                                    if report["warnings"]
                                    else "<p>none</p>"),
            "<h2>QA images</h2>", *[_img(Path(image_dir) / im["file"], im["caption"]) for im in report["images"]],
            "<h2>MASK bits</h2>", _table(["bit", "value", "meaning"], bit_rows, ident="maskbits"),
            "<h2>Provenance</h2>", _table(["key", "value"], prov_rows, ident="provenance")]
    return _page(f"gpucal {report['frame']}", "".join(body))


def _pc(value) -> str:
    """A number already in per cent, to two decimals."""
    return "n/a" if value is None else f"{float(value):.2f} %"


def write_frame_report(output, outdir, *, images=(), captions=None, links=None) -> tuple:
    """Write ``outdir/index.html`` and ``outdir/report.json`` of one frame; return their paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    report = frame_report(output, images=images, captions=captions, links=links)
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / "index.html").write_text(render_frame_html(report, out), encoding="utf-8")
    return out / "index.html", out / "report.json"


def night_report(summary: dict, pages: dict, *, images=(), captions=None) -> dict:
    """The night report (JSON-able, schema ``gpucal-night-report`` :data:`SCHEMA_VERSION`).

    summary : :func:`~gpucal.report.night.batch_summary`'s dict; pages : {frame path: relative
    href of its page}; images : night image paths (the panel).
    """
    def pc(x):
        return None if x is None else round(100.0 * x, 3)

    frames = []
    for row in summary["frames"]:
        frames.append({"frame": os.path.basename(row["path"]), "path": row["path"], "ok": row["ok"],
                       "page": pages.get(row["path"]), "output": row.get("out_path"),
                       "n_standards": row.get("n_standards"), "n_stars_used": row.get("n_stars_used"),
                       "n_stars_rejected": row.get("n_stars_rejected"),
                       "rms_scatter_percent": pc(row.get("rms_scatter")),
                       "level_vs_night_percent": pc(row.get("level_vs_night")),
                       "shape_rms_vs_night_percent": pc(row.get("shape_rms_vs_night")),
                       "error_type": row.get("error_type"), "error": row.get("error")})
    n = summary["night"]
    captions = captions or {}
    return _jsonable({
        "schema": "gpucal-night-report", "schema_version": SCHEMA_VERSION, "created_utc": _utc(),
        "gpucal_version": summary["gpucal_version"], "n_frames": summary["n_frames"], "n_ok": summary["n_ok"],
        "n_failed": summary["n_failed"], "wall_s": summary["wall_s"],
        "night": {"median_rms_scatter_percent": pc(n["median_rms_scatter"]),
                  "level_vs_night_std_percent": pc(n["level_vs_night_std"]),
                  "max_shape_rms_vs_night_percent": pc(n["max_shape_rms_vs_night"])},
        "frames": frames,
        "images": [{"file": Path(p).name, "caption": captions.get(Path(p).name, "")} for p in images],
    })


def render_night_html(report: dict, image_dir) -> str:
    """The night page of ``report`` (:func:`night_report`): the frames table, linked, and the panel."""
    rows, classes, n = [], [], report["night"]
    for f in report["frames"]:
        link = (f'<a href="{html.escape(f["page"])}">{html.escape(f["frame"])}</a>' if f["page"]
                else html.escape(f["frame"]))
        verdict = "calibrated" if f["ok"] else f"FAILED {f['error_type']}: {f['error']}"
        rows.append([link, verdict, _cell(f["n_stars_used"]), _cell(f["n_stars_rejected"]),
                     _pc(f["rms_scatter_percent"]), _pc(f["level_vs_night_percent"]),
                     _pc(f["shape_rms_vs_night_percent"])])
        classes.append("ok" if f["ok"] else "bad")
    head = ["frame", "verdict", "used", "rejected", "RMS scatter", "level vs night", "shape vs night"]
    th = "".join(f"<th{' class=l' if k < 2 else ''}>{h}</th>" for k, h in enumerate(head))
    body_rows = "".join(f'<tr class="{c}">' + "".join(
        f"<td{' class=l' if k < 2 else ''}>{cell if k == 0 else html.escape(str(cell))}</td>"
        for k, cell in enumerate(r)) + "</tr>" for r, c in zip(rows, classes))
    summary_rows = [["frames calibrated", f"{report['n_ok']} of {report['n_frames']}"],
                    ["median RMS scatter", _pc(n["median_rms_scatter_percent"])],
                    ["level vs night, std", _pc(n["level_vs_night_std_percent"])],
                    ["largest shape RMS vs night", _pc(n["max_shape_rms_vs_night_percent"])],
                    ["wall time", f"{report['wall_s']:.1f} s"]]
    body = [f"<h1>gpucal night report: {report['n_frames']} frame(s)</h1>",
            f"<p>gpucal {report['gpucal_version']}, {report['created_utc']}</p>",
            "<h2>Night</h2>", _table(["metric", "value"], summary_rows, ident="night"),
            "<h2>Frames</h2>", f"<table id=frames><thead><tr>{th}</tr></thead><tbody>{body_rows}</tbody></table>",
            *[_img(Path(image_dir) / im["file"], im["caption"]) for im in report["images"]]]
    return _page("gpucal night report", "".join(body))


def _cell(x) -> str:
    return "" if x is None else str(x)


def write_night_report(summary: dict, outdir, pages: dict, *, images=(), captions=None) -> tuple:
    """Write ``outdir/index.html`` and ``outdir/night.json``; return their paths."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    report = night_report(summary, pages, images=images, captions=captions)
    (out / "night.json").write_text(json.dumps(report, indent=1, allow_nan=False))
    (out / "index.html").write_text(render_night_html(report, out), encoding="utf-8")
    return out / "index.html", out / "night.json"


def write_frame_qa(output, outdir, *, truth_cal=None, program=None, links=None) -> Path:
    """The QA images (:func:`~gpucal.report.qc.write_qc_plots`) and the frame's page and JSON in
    ``outdir``; returns the page's path."""
    from .qc import QC_IMAGES, write_qc_plots

    images = write_qc_plots(output, outdir, truth_cal=truth_cal, program=program)
    captions = dict(QC_IMAGES, **{"program.png": "A calibrated program spectrum against its true flux"})
    return write_frame_report(output, outdir, images=images, captions=captions, links=links)[0]


def relink_frame_pages(qc_dir, stems) -> list:
    """Link the frame pages ``qc_dir/<stem>/`` that exist, in ``stems`` order, to their neighbours
    and the night page ``qc_dir/index.html`` (a failed frame has no page to link); returns their stems."""
    qc = Path(qc_dir)
    have = [st for st in stems if (qc / st / "report.json").is_file()]
    for k, st in enumerate(have):
        report = json.loads((qc / st / "report.json").read_text())
        report["links"] = {"night": "../index.html",
                           "previous": f"../{have[k - 1]}/index.html" if k > 0 else None,
                           "next": f"../{have[k + 1]}/index.html" if k + 1 < len(have) else None}
        (qc / st / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))
        (qc / st / "index.html").write_text(render_frame_html(report, qc / st), encoding="utf-8")
    return have

"""Reliability (issue 9): every bad input is one clear error, nothing is lost, results are reproducible.

Every bad input is a :class:`Case`: how to build it (a file beside a good
simulated frame, or a command-line argument) and the words its one-line
message must contain (the file, HDU, fibre or star). Each case runs the real
command line, ``gpucal calibrate``, in a work directory with relative paths,
so the messages are those in ``docs/bad_inputs.md``, and checks: exit status
2, exactly one ``gpucal: error: ...`` line, no traceback, no output file, no
temporary file left behind and the input frame unchanged.
``test_docs_table_lists_every_case`` keeps the table and the cases in step.

Cases that still expose a bug outside io.py are marked ``xfail(strict=True)`` with
the bug in the reason; the fix removes the mark.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from gpucal.cli import main
from gpucal.errors import BackendError
from gpucal.io import file_sha256, read_calibrated_frame, read_frame, write_frame
from gpucal.pipeline import calibrate_frame
from gpucal.simulate import simulate_frame, write_catalogue_csv

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"

#: A small frame (7 fibres x 1000 pixels, 3 standards): a calibration takes well under a second.
SIM = dict(seed=3, snr=50.0, n_pix=1000, wave_range=(5000.0, 6500.0), n_standards=3, n_program=2, n_sky=2)
FWHM = 2.0
VRANGE = (-200.0, 200.0, 5.0)
# The '=' form: "--vrange -200:200:5" is refused by argparse (see the vrange-negative-with-space case).
VRANGE_ARG = "--vrange=-200:200:5"


# --------------------------------------------------------------------------- workspace


@dataclass
class Workspace:
    """A directory holding a good frame and catalogue; cases add their own files beside them."""

    root: Path
    sim: object
    good: str = "good.fits"
    cat: str = "cat.csv"

    def path(self, name) -> Path:
        return self.root / name

    def frame(self, name: str, mutate: Callable) -> str:
        """A copy of the good frame changed by ``mutate(hdul)`` (which may return a new HDUList)."""
        with fits.open(self.path(self.good)) as src:
            hdul = fits.HDUList([h.copy() for h in src])
        hdul = mutate(hdul) or hdul
        hdul.writeto(self.path(name), overwrite=True, output_verify="silentfix")
        return name

    def raw(self, name: str, data: bytes) -> str:
        self.path(name).write_bytes(data)
        return name

    def text(self, name: str, text: str) -> str:
        self.path(name).write_text(text)
        return name

    def catalogue_rows(self):
        lines = self.path(self.cat).read_text().splitlines()
        return lines[0], lines[1:]

    def argv(self, frame=None, *extra, photometry=None, out=None, lsf=("--fwhm", str(FWHM))):
        return ["calibrate", frame or self.good, "--photometry", photometry or self.cat, *lsf,
                VRANGE_ARG, "--backend", "numpy", *(["--out", out] if out else []), *extra]


def _make_workspace(root: Path) -> Workspace:
    sim = simulate_frame(**SIM)
    ws = Workspace(root=root, sim=sim)
    write_frame(ws.path(ws.good), sim.flux, sim.var, sim.wave, sim.fibres)
    write_catalogue_csv(sim.catalogue, ws.path(ws.cat))
    return ws


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return _make_workspace(tmp_path_factory.mktemp("reliability"))


@pytest.fixture
def in_ws(ws, monkeypatch):
    """Run in the workspace (relative paths, as in the docs table), templates cached there."""
    monkeypatch.chdir(ws.root)
    monkeypatch.setenv("GPUCAL_CACHE_DIR", str(ws.root / "template-cache"))
    return ws


def run_cli(argv):
    """``gpucal`` in-process: (exit status, stdout, stderr). Uncaught exceptions propagate."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as exc:  # argparse
            rc = exc.code
    return rc, out.getvalue(), err.getvalue()


def error_line(rc, err) -> str:
    """The one ``gpucal: error: ...`` line, after checking the exit status and that nothing else is an error."""
    assert "Traceback" not in err, err
    assert rc == 2, f"exit status {rc}, stderr: {err!r}"
    lines = [ln for ln in err.splitlines() if ln.startswith("gpucal: error: ")]
    others = [ln for ln in err.splitlines() if "error:" in ln and not ln.startswith("gpucal: error: ")]
    assert len(lines) == 1 and not others, f"expected one 'gpucal: error: ...' line, got: {err!r}"
    # the message is one line: nothing (a continuation) follows it
    assert [ln for ln in err.splitlines() if ln.strip()][-1] == lines[0], f"message spans lines: {err!r}"
    return lines[0][len("gpucal: error: "):]


def _temp_files(root: Path):
    return sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------- frame mutations


def _fibres_hdu(hdul, change):
    t = Table(hdul["FIBRES"].data)
    t = change(t) or t
    hdu = fits.table_to_hdu(t)
    hdu.name = "FIBRES"
    hdul[hdul.index_of("FIBRES")] = hdu


def _std_rows(hdul):
    types = np.char.strip(np.asarray(hdul["FIBRES"].data["TYPE"]).astype(str))
    return np.flatnonzero(types == "C")


def _wcs_instead_of_wavela(**cards):
    def mutate(h):
        del h["WAVELA"]
        h[0].header.update({"CRVAL1": 5000.0, "CDELT1": 1.5, "CRPIX1": 1.0, **cards})
    return mutate


def _set(hdu_name, attr, fn):
    def mutate(h):
        setattr(h[hdu_name], attr, fn(getattr(h[hdu_name], attr)))
    return mutate


def _replace_hdu(name, new):
    def mutate(h):
        h[h.index_of(name)] = new()
    return mutate


def _with_card(ws: Workspace, name: str, hdu_index: int, key: str, value: str) -> str:
    """The good frame with one integer card of HDU ``hdu_index`` rewritten in the raw bytes."""
    raw = bytearray(ws.path(ws.good).read_bytes())
    starts = [m.start() for m in re.finditer(rb"SIMPLE  =|XTENSION=", bytes(raw)) if m.start() % 2880 == 0]
    start = starts[hdu_index]
    for j in range(start, start + 2880 * 4, 80):
        if raw[j:j + 8] == key.encode().ljust(8):
            raw[j:j + 80] = (key.ljust(8) + "= " + value.rjust(20)).ljust(80).encode()
            return ws.raw(name, bytes(raw))
    raise AssertionError(f"no {key} card in HDU {hdu_index}")


def _truncated(ws, name, frac):
    data = ws.path(ws.good).read_bytes()
    return ws.raw(name, data[: int(len(data) * frac)])


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(ws)`` writes what it needs and returns the argv; ``needles`` must be in the message."""

    id: str
    what: str
    build: Callable
    needles: tuple
    xfail: str = ""
    # False where --out exists before the run (or is the input): it must then be left unchanged
    check_out: bool = True


def _frame_case(id, what, mutate, *needles, xfail=""):
    return Case(id, what, lambda ws: ws.argv(ws.frame(f"{id}.fits", mutate), out=f"out-{id}.fits"),
                (f"{id}.fits",) + needles, xfail)


def _raw_case(id, what, make, *needles):
    return Case(id, what, lambda ws: ws.argv(make(ws, f"{id}.fits"), out=f"out-{id}.fits"),
                (f"{id}.fits",) + needles)


def _cat_case(id, what, make, *needles, xfail=""):
    return Case(id, what, lambda ws: ws.argv(photometry=make(ws, f"{id}.csv"), out=f"out-{id}.fits"),
                needles, xfail)


def _arg_case(id, what, *args, needles=(), lsf=("--fwhm", str(FWHM)), xfail=""):
    return Case(id, what, lambda ws: ws.argv(None, *args, out=f"out-{id}.fits", lsf=lsf), tuple(needles), xfail)


def _cat_text(transform):
    """A catalogue made by ``transform(header, rows) -> text`` from the good one."""
    def make(ws, name):
        hdr, rows = ws.catalogue_rows()
        return ws.text(name, transform(hdr, rows))
    return make


def _cols(rows, keep):
    return [",".join(v for k, v in enumerate(r.split(",")) if keep(k)) for r in rows]


def _mags(rows, mag, err):
    return [",".join(r.split(",")[:3] + [mag, err] * 4) for r in rows]



FRAME_CASES = [
    Case("missing-file", "frame path does not exist",
         lambda ws: ws.argv("nope.fits", out="out-missing-file.fits"), ("nope.fits", "file not found")),
    Case("directory", "frame path is a directory",
         lambda ws: ws.argv(str(ws.path("subdir").mkdir(exist_ok=True) or "subdir"), out="out-directory.fits"),
         ("subdir", "is a directory")),
    _raw_case("empty-file", "zero-byte file", lambda ws, n: ws.raw(n, b""), "empty file"),
    _raw_case("text-file", "a text file named .fits", lambda ws, n: ws.raw(n, b"not FITS\n" * 400),
              "not a readable FITS file"),
    _raw_case("truncated-10pc", "FITS file cut at 10 %", lambda ws, n: _truncated(ws, n, 0.10), "truncated"),
    _raw_case("truncated-60pc", "FITS file cut at 60 %", lambda ws, n: _truncated(ws, n, 0.60), "truncated"),
    _raw_case("truncated-last-block", "FITS file missing its last bytes", lambda ws, n: _truncated(ws, n, 0.999),
              "truncated"),
    _raw_case("header-naxis-huge", "VARIANCE header NAXIS = 999999999 (astropy would loop for minutes)",
              lambda ws, n: _with_card(ws, n, 1, "NAXIS", "999999999"), "[HDU 1]", "NAXIS = 999999999"),
    _raw_case("header-gcount-negative", "VARIANCE header GCOUNT = -1",
              lambda ws, n: _with_card(ws, n, 1, "GCOUNT", "-1"), "[HDU 1]", "GCOUNT = -1"),
    _raw_case("header-tfields-huge", "FIBRES header TFIELDS = 999999999 (astropy would allocate gigabytes)",
              lambda ws, n: _with_card(ws, n, 3, "TFIELDS", "999999999"), "[HDU 3]", "TFIELDS = 999999999"),
    _raw_case("header-naxis2-past-eof", "primary NAXIS2 larger than the file holds",
              lambda ws, n: _with_card(ws, n, 0, "NAXIS2", "70000"), "[HDU 0]", "truncated"),
    _frame_case("no-primary-image", "primary HDU without data",
                _replace_hdu("PRIMARY", fits.PrimaryHDU), "[PRIMARY]", "no image data"),
    _frame_case("primary-3d", "primary image 3-D", _set(0, "data", lambda d: d[None]), "[PRIMARY]", "2-D"),
    _frame_case("primary-1d", "primary image 1-D", _set(0, "data", lambda d: d[0]), "[PRIMARY]", "2-D"),
    _frame_case("no-variance", "no VARIANCE HDU", lambda h: h.__delitem__("VARIANCE"), "no VARIANCE"),
    _frame_case("variance-shape", "VARIANCE one pixel short",
                _set("VARIANCE", "data", lambda d: d[:, :-1]), "[VARIANCE]", "(7, 999)", "(7, 1000)"),
    _frame_case("variance-is-table", "VARIANCE is a binary table",
                _replace_hdu("VARIANCE", lambda: fits.BinTableHDU(Table({"a": [1.0]}), name="VARIANCE")),
                "[VARIANCE]", "image HDU"),
    _frame_case("negative-variance", "negative variance in fibre 5",
                lambda h: h["VARIANCE"].data.__setitem__((4, slice(10, 13)), -1.0),
                "[VARIANCE]", "negative variance", "fibre(s) 5"),
    _frame_case("wavela-length", "WAVELA one pixel short",
                _set("WAVELA", "data", lambda d: d[:-1]), "[WAVELA]", "999 wavelengths for 1000 pixels"),
    _frame_case("wavela-nan", "NaN wavelength", lambda h: h["WAVELA"].data.__setitem__(7, np.nan),
                "[WAVELA]", "NaN/inf"),
    _frame_case("wavela-inf", "infinite wavelength", lambda h: h["WAVELA"].data.__setitem__(7, np.inf),
                "[WAVELA]", "NaN/inf"),
    _frame_case("wavela-non-monotonic", "wavelengths go back at pixel 501",
                lambda h: h["WAVELA"].data.__setitem__(500, h["WAVELA"].data[100]),
                "[WAVELA]", "not strictly monotonic", "pixels 500 and 501"),
    _frame_case("wavela-negative", "wavelengths below zero",
                _set("WAVELA", "data", lambda d: d - 5500.0), "[WAVELA]", "positive"),
    _frame_case("wavela-per-fibre-non-monotonic", "2-D WAVELA whose fibre 4 row goes back at pixel 501",
                _set("WAVELA", "data", lambda d: np.tile(d, (7, 1)) - (d[500] - d[100]) * (
                    (np.arange(7) == 3)[:, None] & (np.arange(d.size) == 500)[None, :])),
                "[WAVELA]", "fibre 4", "not strictly monotonic", "pixels 500 and 501"),
    _frame_case("wavela-3d", "3-D WAVELA", _set("WAVELA", "data", lambda d: d[None, None]),
                "[WAVELA]", "1-D or 2-D"),
    _frame_case("wavela-unit-not-length", "WAVELA BUNIT = 'Jy'",
                lambda h: h["WAVELA"].header.__setitem__("BUNIT", "Jy"), "[WAVELA] BUNIT", "'Jy'"),
    _frame_case("no-wavelengths", "no WAVELA and no WCS", lambda h: h.__delitem__("WAVELA"), "no wavelengths"),
    _frame_case("wcs-dc-flag", "IRAF DC-FLAG = 1 (log-linear)", _wcs_instead_of_wavela(**{"DC-FLAG": 1}),
                "[PRIMARY] WCS", "DC-FLAG"),
    _frame_case("wcs-crval-text", "CRVAL1 is text", _wcs_instead_of_wavela(CRVAL1="abc"),
                "[PRIMARY] WCS", "CRVAL1"),
    _frame_case("wcs-zero-step", "CDELT1 = 0", _wcs_instead_of_wavela(CDELT1=0.0),
                "[PRIMARY]", "not strictly monotonic"),
    _frame_case("wcs-unknown-unit", "CUNIT1 = 'blorg'", _wcs_instead_of_wavela(CUNIT1="blorg"),
                "CUNIT1", "'blorg'"),
    _frame_case("wcs-structured-unit", "CUNIT1 = '(m, s)' (astropy structured unit)",
                _wcs_instead_of_wavela(CUNIT1="(m, s)"), "CUNIT1", "not a length"),
    _frame_case("bad-medium", "WAVEMED = 'WATER'", lambda h: h[0].header.__setitem__("WAVEMED", "WATER"),
                "WAVEMED", "'WATER'"),
    _frame_case("no-fibres", "no FIBRES HDU", lambda h: h.__delitem__("FIBRES"), "no FIBRES"),
    _frame_case("fibres-is-image", "FIBRES is an image",
                _replace_hdu("FIBRES", lambda: fits.ImageHDU(np.zeros(3), name="FIBRES")),
                "[FIBRES]", "binary table"),
    _frame_case("fibres-without-type", "FIBRES without a TYPE column",
                lambda h: _fibres_hdu(h, lambda t: t.remove_column("TYPE")), "[FIBRES]", "no TYPE column"),
    _frame_case("fibres-row-count", "FIBRES one row short",
                lambda h: _fibres_hdu(h, lambda t: t[:-1]), "[FIBRES]", "6 rows", "7 fibres"),
    _frame_case("no-standards", "no fibre has TYPE 'C'",
                lambda h: _fibres_hdu(h, lambda t: t["TYPE"].__setitem__(slice(None), "P")),
                "[FIBRES]", "no standard-star fibre"),
    _frame_case("no-names-or-coordinates", "standards without NAME, RA, DEC: nothing to match photometry to",
                lambda h: _fibres_hdu(h, lambda t: t.remove_columns(["NAME", "RA", "DEC"])),
                "fewer than --min-stars 1", "no usable photometry (unmatched)"),
    _frame_case("all-standards-nan", "every standard's flux NaN",
                lambda h: h[0].data.__setitem__(_std_rows(h), np.nan), "fewer than --min-stars 1",
                "too few good pixels"),
    _frame_case("variance-all-zero", "every variance 0 (all pixels bad)",
                _set("VARIANCE", "data", lambda d: np.zeros_like(d)), "fewer than --min-stars 1"),
    # ambiguous side inputs (issue 19)
    _frame_case("wavela-unit-dex", "WAVELA BUNIT = 'dex(Angstrom)' over log10 wavelengths",
                lambda h: _set("WAVELA", "data", np.log10)(h) or h["WAVELA"].header.__setitem__("BUNIT", "dex(Angstrom)"),
                "[WAVELA] BUNIT", "'dex(Angstrom)' is logarithmic"),
    _frame_case("wcs-unit-log", "CUNIT1 = 'log(Angstrom)'", _wcs_instead_of_wavela(CUNIT1="log(Angstrom)"),
                "CUNIT1", "'log(Angstrom)' is logarithmic"),
    # per-fibre wavelengths and LSF (issue 15): tests/test_perfibre.py
    _frame_case("wavela-per-fibre-reversed", "2-D WAVELA whose fibre 4 row runs red to blue, the others blue to red",
                _set("WAVELA", "data", lambda d: np.where((np.arange(7) == 3)[:, None], d[::-1], d)),
                "[WAVELA]", "different directions", "fibre(s) 4"),
    _frame_case("lsf-shape", "LSF image one pixel short",
                lambda h: h.append(fits.ImageHDU(np.full((7, 999), 2.0), name="LSF")), "[LSF]", "(7, 999)"),
    _frame_case("lsf-non-positive", "LSF image with FWHM 0 in fibre 2",
                lambda h: h.append(fits.ImageHDU(np.where((np.arange(7) == 1)[:, None], 0.0, np.full((7, 1000), 2.0)),
                                                 name="LSF")), "[LSF]", "not finite and positive", "fibre(s) 2"),
]

CATALOGUE_CASES = [
    Case("catalogue-missing", "--photometry path does not exist",
         lambda ws: ws.argv(photometry="nope.csv", out="out-catalogue-missing.fits"), ("nope.csv", "no such file")),
    Case("catalogue-is-fits", "--photometry given a FITS file",
         lambda ws: ws.argv(photometry=ws.good, out="out-catalogue-is-fits.fits"),
         ("good.fits", "none of the Refcat2 band columns")),
    _cat_case("catalogue-empty", "empty CSV", lambda ws, n: ws.text(n, ""),
              "catalogue-empty.csv", "column"),
    _cat_case("catalogue-no-name-or-coordinates", "CSV without name, ra, dec",
              _cat_text(lambda h, r: "\n".join(_cols([h] + r, lambda k: k >= 3)) + "\n"),
              "catalogue-no-name-or-coordinates.csv", "no 'name' column and no 'ra'/'dec'"),
    _cat_case("catalogue-ra-without-dec", "CSV with ra but no dec",
              _cat_text(lambda h, r: "\n".join(_cols([h] + r, lambda k: k != 2)) + "\n"),
              "catalogue-ra-without-dec.csv", "'ra' column but no 'dec'"),
    _cat_case("catalogue-no-bands", "CSV without any magnitude column",
              _cat_text(lambda h, r: "\n".join(_cols([h] + r, lambda k: k < 3)) + "\n"),
              "catalogue-no-bands.csv", "band columns"),
    _cat_case("catalogue-ragged", "a row with more fields than the header",
              _cat_text(lambda h, r: "\n".join([h, r[0] + ",1,2,3"] + r[1:]) + "\n"),
              "catalogue-ragged.csv", "cannot read as CSV"),
    _cat_case("catalogue-header-only", "CSV with a header and no rows: no standard matched",
              _cat_text(lambda h, r: h + "\n"), "good.fits", "fewer than --min-stars 1",
              "STD001: no usable photometry (unmatched)"),
    _cat_case("catalogue-magnitudes-missing", "every magnitude 99 (missing): no usable photometry for any standard",
              _cat_text(lambda h, r: "\n".join([h] + _mags(r, "99.0", "0.01")) + "\n"),
              "good.fits", "fewer than --min-stars 1", "STD001: no usable photometry"),
    _cat_case("catalogue-magnitudes-text", "magnitudes are text",
              _cat_text(lambda h, r: "\n".join([h] + _mags(r, "abc", "abc")) + "\n"),
              "good.fits", "fewer than --min-stars 1", "STD002: no usable photometry"),
    _cat_case("catalogue-negative-errors", "magnitude errors negative",
              _cat_text(lambda h, r: "\n".join([h] + _mags(r, "15.0", "-0.01")) + "\n"),
              "good.fits", "fewer than --min-stars 1", "STD003: no usable photometry"),
    _cat_case("catalogue-nothing-matches", "other names, positions 10 degrees away",
              _cat_text(lambda h, r: "\n".join([h] + [",".join(["X" + x.split(",")[0], "10.0", "10.0"]
                                                               + x.split(",")[3:]) for x in r]) + "\n"),
              "good.fits", "STD001: no usable photometry (unmatched: nearest entry"),
    # ambiguous side inputs (issue 19)
    _cat_case("catalogue-duplicate-star", "STD001 twice, the row 1 mag too faint first",
              _cat_text(lambda h, r: "\n".join([h, _fainter(r[0])] + r) + "\n"),
              "catalogue-duplicate-star.csv", "duplicate entries",
              "star 'STD001': rows 1, 2 (named 'STD001') differ"),
]


def _bosz(ws, name, **kw):
    from gpucal.templates.bosz import write_demo_bosz_tree

    root = ws.path(name)
    if not root.exists():
        write_demo_bosz_tree(root, resolution=2000, dlnlam=1 / 4000, teff=(5750.0, 6000.0), logg=(4.5,),
                             mh=(0.0,), **kw)
    return root


def _bosz_without_wave(ws, name):
    from gpucal.templates.bosz import bosz_wave_file_name

    root = _bosz(ws, name)
    wave_file = root / bosz_wave_file_name(2000)
    if wave_file.exists():
        wave_file.unlink()
    return name



def _tampered_cache(tamper):
    """A prepared cache of the demo grid, changed by ``tamper(cache_dir)`` after it was written."""
    def make(ws, name):
        from gpucal.templates import demo_grid, write_template_cache

        path = ws.path(name)
        if not path.exists():
            write_template_cache(demo_grid(), path)
            tamper(path)
        return name
    return make


def _npy_edit(array, change):
    def tamper(path):
        np.save(path / f"{array}.npy", change(np.load(path / f"{array}.npy")), allow_pickle=False)
    return tamper


def _flip_last_byte(array):
    def tamper(path):
        raw = bytearray((path / f"{array}.npy").read_bytes())
        raw[-1] ^= 0x01
        (path / f"{array}.npy").write_bytes(bytes(raw))
    return tamper


def _flux_linked_out(path):
    outside = path.parent / f"{path.name}-flux.npy"
    os.replace(path / "flux.npy", outside)
    os.symlink(outside, path / "flux.npy")


def _sidecar_edit(path):
    meta = json.loads((path / "grid.json").read_text())
    meta["resolution_fwhm"] = 1.0
    (path / "grid.json").write_text(json.dumps(meta))


def _cache_case(id, what, tamper, *needles):
    return Case(id, what, lambda ws: ws.argv(None, "--templates", _tampered_cache(tamper)(ws, id),
                                             out=f"out-{id}.fits"), (id,) + needles)


#: The BOSZ model of the template cases below whose line 2600 (about 5750 Å) is made bad.
_BAD_MODEL = "bosz2024_mp_t5750_g+4.50_m+0.00_a+0.00_c+0.00_v1_r2000_resam.txt.gz"


def _bosz_with_line(ws, name, line):
    """A BOSZ tree whose model :data:`_BAD_MODEL` reads ``line`` on its line 2600."""
    import gzip

    root = _bosz(ws, name)
    path = next(root.rglob(_BAD_MODEL))
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    text[2599] = line
    path.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))
    return name


def _fainter(row):
    """A catalogue row with every magnitude 1 mag fainter (errors unchanged)."""
    v = row.split(",")
    return ",".join(v[:3] + [f"{float(x) + 1.0:.6f}" if k % 2 == 0 else x for k, x in enumerate(v[3:])])


TEMPLATE_CASES = [
    Case("templates-missing", "--templates path does not exist",
         lambda ws: ws.argv(None, "--templates", "nope-templates", out="out-templates-missing.fits"),
         ("nope-templates",)),
    Case("templates-empty-directory", "--templates directory without BOSZ spectra",
         lambda ws: ws.argv(None, "--templates", str(ws.path("empty-templates").mkdir(exist_ok=True)
                                                    or "empty-templates"), out="out-templates-empty.fits"),
         ("empty-templates", "no BOSZ 2024 spectra")),
    Case("templates-no-wavelength-file", "BOSZ directory without bosz2024_wave_r2000.txt",
         lambda ws: ws.argv(None, "--templates", _bosz_without_wave(ws, "bosz-no-wave"),
                            out="out-templates-no-wave.fits"),
         ("bosz-no-wave", "bosz2024_wave_r2000.txt", "missing")),
    Case("templates-do-not-cover-frame", "frame at 10000-13000 Å, demo grid ends at 11000 Å",
         lambda ws: ws.argv(ws.frame("red-frame.fits", _set("WAVELA", "data", lambda d: 2.0 * d)),
                            out="out-templates-cover.fits"),
         ("does not cover", "11000")),
    Case("templates-do-not-cover-frame-named", "same; the message names the frame",
         lambda ws: ws.argv(ws.frame("red-frame.fits", _set("WAVELA", "data", lambda d: 2.0 * d)),
                            out="out-templates-cover.fits"),
         ("red-frame.fits", "does not cover")),
    Case("templates-bosz-too-narrow", "BOSZ grid covering only 5500-9000 Å",
         lambda ws: ws.argv(None, "--templates", _bosz(ws, "bosz-narrow", wave_range=(5500.0, 9000.0)).name,
                            out="out-templates-narrow.fits", lsf=("--fwhm", "4")),
         ("bosz-narrow", "5500")),
    # prepared-cache integrity (issue 19)
    _cache_case("cache-flux-replaced", "cache whose flux.npy holds the first template in every row",
                _npy_edit("flux", lambda f: np.repeat(f[:1], f.shape[0], axis=0)), "flux array", "SHA-256"),
    _cache_case("cache-teff-shifted", "cache whose params.npy has 3000 K added to every Teff",
                _npy_edit("params", lambda p: p + np.array([3000.0, 0.0, 0.0, 0.0])), "params array", "SHA-256"),
    _cache_case("cache-byte-flipped", "cache with one data byte of continuum.npy flipped",
                _flip_last_byte("continuum"), "continuum array", "SHA-256"),
    _cache_case("cache-array-symlink", "cache whose flux.npy is a symbolic link to a file outside it",
                _flux_linked_out, "flux.npy", "symbolic link"),
    _cache_case("cache-sidecar-edited", "cache whose grid.json has resolution_fwhm edited",
                _sidecar_edit, "grid.json", "SHA-256"),
    # ambiguous side inputs (issue 19)
    Case("templates-bosz-nan-row", "a BOSZ spectrum with a line 'nan nan'",
         lambda ws: ws.argv(None, "--templates", _bosz_with_line(ws, "bosz-nan-row", "nan nan"),
                            out="out-templates-bosz-nan-row.fits"),
         ("bosz-nan-row", _BAD_MODEL, "non-finite value on line 2600 ('nan nan')")),
    Case("templates-bosz-text-row", "a BOSZ spectrum with a line '-1e30 abc'",
         lambda ws: ws.argv(None, "--templates", _bosz_with_line(ws, "bosz-text-row", "-1e30 abc"),
                            out="out-templates-bosz-text-row.fits"),
         ("bosz-text-row", _BAD_MODEL, "malformed line 2600: non-numeric value 'abc' ('-1e30 abc')")),
]


ARG_CASES = [
    _arg_case("fwhm-zero", "--fwhm 0", lsf=("--fwhm", "0"), needles=("--fwhm", "positive")),
    _arg_case("fwhm-negative", "--fwhm -1", lsf=("--fwhm=-1",), needles=("--fwhm", "positive")),
    _arg_case("fwhm-nan", "--fwhm nan", lsf=("--fwhm", "nan"), needles=("--fwhm", "nan")),
    _arg_case("resolution-zero", "--resolution 0", lsf=("--resolution", "0"), needles=("--resolution",)),
    _arg_case("fwhm-not-a-number", "--fwhm abc", lsf=("--fwhm", "abc"), needles=("--fwhm",)),
    _arg_case("no-resolution-option", "none of --fwhm/--fwhm-poly/--resolution", lsf=(),
              needles=("--fwhm",)),
    _arg_case("combine-unknown", "--combine mean", "--combine", "mean", needles=("--combine",)),
    _arg_case("vrange-reversed", "--vrange=200:-200:5", "--vrange=200:-200:5", needles=("velocity range",)),
    _arg_case("vrange-nan", "--vrange=nan:200:5", "--vrange=nan:200:5", needles=("velocity range",)),
    _arg_case("vrange-too-wide", "--vrange=-1e6:1e6:5", "--vrange=-1e6:1e6:5", needles=("beyond",)),
    _arg_case("vrange-zero-step", "--vrange=-200:200:0", "--vrange=-200:200:0", needles=("velocity",)),
    _arg_case("vrange-negative-step", "--vrange=-200:200:-5", "--vrange=-200:200:-5", needles=("velocity",)),
    _arg_case("backend-unknown", "--backend bogus", "--backend", "bogus", needles=("unknown backend 'bogus'",)),
    _arg_case("max-memory-tiny", "--max-memory 10 (bytes)", "--max-memory", "10", needles=("memory budget",)),
    _arg_case("max-memory-negative", "--max-memory -10", "--max-memory=-10", needles=("memory budget",)),
    _arg_case("smooth-negative", "--smooth -3", "--smooth=-3", needles=("window",)),
    _arg_case("smooth-longer-than-frame", "--smooth 100001", "--smooth", "100001", needles=("window 100001",)),
    _arg_case("min-stars-above-standards", "--min-stars 5 with 3 standards", "--min-stars", "5",
              needles=("good.fits", "3 usable standard(s), fewer than --min-stars 5")),
    _arg_case("max-chi2-dof-zero", "--max-chi2-dof 0: every star excluded", "--max-chi2-dof", "0",
              needles=("good.fits", "STD001: chi2/dof", "above 0.0")),
    _arg_case("min-stars-zero", "--min-stars 0 with every star excluded (--max-chi2-dof 0)",
              "--min-stars", "0", "--max-chi2-dof", "0", needles=("--min-stars",)),
    Case("summary-directory-missing", "--summary in a directory that does not exist",
         lambda ws: ws.argv(None, "--summary", "no-such-dir/summary.json", out="out-summary-dir.fits"),
         ("no-such-dir",)),
    Case("qc-is-a-file", "--qc naming an existing file", lambda ws: ws.argv(None, "--qc", ws.cat, out="out-qc.fits"),
         ("cat.csv",)),
]

def _gpu_usable() -> bool:
    from gpucal.backends import get_backend

    try:
        get_backend("cupy")
    except BackendError:
        return False
    return True


if not _gpu_usable():
    ARG_CASES.append(_arg_case("backend-cupy-without-gpu", "--backend cupy on a machine without a GPU",
                               "--backend", "cupy", needles=("cupy", "not usable")))


def _symlink_to_good(ws, name):
    link = ws.path(name)
    if not link.is_symlink():
        link.symlink_to(ws.path(ws.good))
    return name


def _hardlink_to_good(ws, name):
    link = ws.path(name)
    if not link.exists():
        os.link(ws.path(ws.good), link)
    return name


def _existing(ws, name):
    ws.path(name).write_text("keep me")
    return name


OUTPUT_CASES = [
    Case("out-exists", "--out names an existing file (no --overwrite)",
         lambda ws: ws.argv(None, out=_existing(ws, "existing.fits")), ("existing.fits", "--overwrite"),
         check_out=False),
    Case("out-is-input", "--out is the input frame", lambda ws: ws.argv(None, "--overwrite", out=ws.good),
         ("good.fits", "refusing to write over the input frame"), check_out=False),
    Case("out-is-input-other-spelling", "--out is ./good.fits", lambda ws: ws.argv(None, "--overwrite", out="./good.fits"),
         ("refusing to write over the input frame",), check_out=False),
    Case("out-is-symlink-to-input", "--out is a symbolic link to the input (with --overwrite)",
         lambda ws: ws.argv(None, "--overwrite", out=_symlink_to_good(ws, "link.fits")),
         ("link.fits", "refusing to write over the input frame"), check_out=False),
    Case("out-is-hard-link-to-input", "--out is a hard link to the input (with --overwrite)",
         lambda ws: ws.argv(None, "--overwrite", out=_hardlink_to_good(ws, "hardlink.fits")),
         ("hardlink.fits", "refusing to write over the input frame"), check_out=False),
    Case("out-directory-missing", "--out in a directory that does not exist",
         lambda ws: ws.argv(None, out="no-such-dir/out.fits"), ("no-such-dir", "does not exist")),
    Case("out-is-a-directory", "--out is a directory",
         lambda ws: ws.argv(None, "--overwrite", out=str(ws.path("outdir").mkdir(exist_ok=True) or "outdir")),
         ("outdir", "is a directory"), check_out=False),
    Case("default-out-exists", "no --out and FRAME_fluxcal.fits exists",
         lambda ws: ws.argv(None) if _existing(ws, "good_fluxcal.fits") else None,
         ("good_fluxcal.fits", "--overwrite"), check_out=False),
]

# frames, layouts and grids as other pipelines write them (issue 15)
def _desi_case(id, what, change, *needles):
    """A DESI-style copy of the good frame (io/desi.py layout), its HDUs changed by ``change(hdul)``."""
    def make(ws):
        from gpucal.io import write_desi_frame

        sim, name = ws.sim, f"{id}.fits"
        typ = np.char.strip(np.asarray(sim.fibres["TYPE"]).astype(str))
        fm = Table({"TARGETID": np.arange(len(typ)), "NAME": np.asarray(sim.fibres["NAME"]).astype(str),
                    "TARGET_RA": sim.fibres["RA"], "TARGET_DEC": sim.fibres["DEC"],
                    "OBJTYPE": np.where(typ == "C", "STD", np.where(typ == "S", "SKY", "TGT"))})
        write_desi_frame(ws.path(name), sim.flux, 1.0 / sim.var, sim.wave, fm, overwrite=True)
        with fits.open(ws.path(name)) as src:
            hdul = fits.HDUList([h.copy() for h in src])
        hdul = change(hdul) or hdul
        hdul.writeto(ws.path(name), overwrite=True, output_verify="silentfix")
        return ws.argv(name, out=f"out-{id}.fits")
    return Case(id, what, make, (f"{id}.fits",) + needles)


def _fits_grid(ws, name, change=None):
    from gpucal.templates import demo_grid, write_fits_grid

    g = demo_grid(teff=(5750.0, 6000.0), logg=(4.5,), mh=(0.0,), alpha=(0.0,), dlnlam=1 / 4000)
    flux = np.array(g.flux, dtype=np.float64)
    write_fits_grid(ws.path(name), g.wave, flux, g.params, medium="air", overwrite=True)
    if change is not None:
        with fits.open(ws.path(name), mode="update") as h:
            change(h)
    return name


def _grid_case(id, what, change, *needles):
    return Case(id, what, lambda ws: ws.argv(None, "--templates", _fits_grid(ws, f"{id}.fits", change),
                                             out=f"out-{id}.fits"), (f"{id}.fits",) + needles)


LAYOUT_CASES = [
    _frame_case("wcs-frequency-axis", "WCS with CTYPE1 = 'FREQ'", _wcs_instead_of_wavela(CTYPE1="FREQ"),
                "[PRIMARY] WCS", "not a wavelength axis"),
    _frame_case("wcs-log-and-dc-flag", "CTYPE1 = 'WAVE-LOG' and DC-FLAG = 1 together",
                _wcs_instead_of_wavela(CTYPE1="WAVE-LOG", **{"DC-FLAG": 1}), "[PRIMARY] WCS", "contradict"),
    Case("medium-contradicts-header", "--medium vacuum on a frame whose WAVEMED says AIR",
         lambda ws: ws.argv(ws.frame("medium-air.fits", lambda h: h[0].header.__setitem__("WAVEMED", "AIR")),
                            "--medium", "vacuum", out="out-medium-contradicts-header.fits"),
         ("medium-air.fits", "--medium vacuum contradicts", "air")),
    _desi_case("desi-ivar-shape", "DESI frame whose IVAR is one pixel short",
               lambda h: setattr(h["IVAR"], "data", h["IVAR"].data[:, :-1]), "[IVAR]", "does not match"),
    _desi_case("desi-negative-ivar", "DESI frame with a negative IVAR in fibre 3",
               lambda h: h["IVAR"].data.__setitem__((2, 5), -1.0), "[IVAR]", "negative", "fibre(s) 3"),
    _desi_case("desi-no-objtype", "DESI FIBERMAP without OBJTYPE or a standards column",
               lambda h: h.__setitem__("FIBERMAP", fits.BinTableHDU(Table(h["FIBERMAP"].data)[["TARGETID"]],
                                                                    name="FIBERMAP")),
               "[FIBERMAP]", "no OBJTYPE column"),
    _desi_case("desi-wavelength-per-fibre", "DESI WAVELENGTH per fibre, fibre 2 shifted",
               lambda h: setattr(h["WAVELENGTH"], "data", np.tile(h["WAVELENGTH"].data, (7, 1))
                                 + 0.3 * (np.arange(7) == 1)[:, None]), "[WAVELENGTH]", "one (n_pix,) grid"),
    _grid_case("fits-grid-no-medium", "--templates FITS grid whose headers do not say air or vacuum",
               lambda h: h[0].header.__delitem__("AIRORVAC"), "medium is not stated", "AIRORVAC"),
    _grid_case("fits-grid-no-params", "--templates FITS grid without a parameter table",
               lambda h: h.__delitem__("PARAMS"), "no parameter table"),
    _grid_case("fits-grid-nan-model", "--templates FITS grid with a NaN inside model 2",
               lambda h: h[0].data.__setitem__((1, 4000), np.nan), "model 'row 2'", "nan"),
]

ALL_CASES = FRAME_CASES + CATALOGUE_CASES + TEMPLATE_CASES + ARG_CASES + OUTPUT_CASES + LAYOUT_CASES


def _param(case):
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def _out_path(argv):
    return argv[argv.index("--out") + 1] if "--out" in argv else None


def run_case(case: Case, ws: Workspace):
    """Build and run one case in the workspace (cwd): (argv, exit status, stderr)."""
    argv = case.build(ws)
    frame = argv[1]
    before = {p: file_sha256(p) for p in {frame, ws.good, ws.cat} if os.path.isfile(p)}
    out = _out_path(argv) or str(Path(frame).with_suffix("")) + "_fluxcal.fits"
    out_before = file_sha256(out) if os.path.isfile(out) else None
    rc, _, err = run_cli(argv)
    for p, h in before.items():
        assert file_sha256(p) == h, f"{p} was modified"
    if not case.check_out and out_before is not None:
        assert file_sha256(out) == out_before, f"{out} was modified"
    return argv, rc, err


@pytest.mark.parametrize("case", [_param(c) for c in ALL_CASES])
def test_bad_input_is_one_clear_error(case, in_ws):
    argv, rc, err = run_case(case, in_ws)
    msg = error_line(rc, err)
    for needle in case.needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    out = _out_path(argv)
    if out and case.check_out:
        assert not os.path.exists(out), f"{out} written despite the error"
    assert _temp_files(in_ws.root) == []


def test_debug_shows_the_traceback(in_ws):
    argv = in_ws.argv("nope.fits", "--debug")
    from gpucal.errors import InputError

    with pytest.raises(InputError, match="nope.fits: file not found"):
        main(argv)


def test_docs_table_lists_every_case():
    """docs/bad_inputs.md has a row for every case here (and no stale ones)."""
    text = DOCS.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\|\s*`([a-z0-9-]+)`\s*\|", text, flags=re.M))
    ids = {c.id for c in ALL_CASES} | {"backend-cupy-without-gpu"}
    assert ids - documented == set(), f"cases missing from {DOCS.name}: {sorted(ids - documented)}"
    extra = documented - ids - set(DOC_ONLY_IDS)
    assert extra == set(), f"rows in {DOCS.name} without a test: {sorted(extra)}"


#: Rows of the docs table backed by dedicated tests (here and in test_properties.py) rather than by a Case.
DOC_ONLY_IDS = (
    "vrange-negative-with-space", "summary-exists", "bad-pixels-counted", "bad-pixels-stay-bad",
    "zero-variance-pixel-output", "standard-too-few-good-pixels", "one-standard-all-nan", "hot-pixel-in-standard",
    "tiny-variance-in-standard", "descending-wavelengths", "vacuum-wavelengths", "header-card-unwritable", "star-without-photometry",
    "star-velocity-outside-scan", "star-chi2-above-limit", "star-discrepant", "too-few-usable-standards",
    "overwrite-replaces", "write-fails", "write-interrupted", "output-directory-not-writable",
    "same-inputs-same-bytes", "numpy-vs-array-api-strict", "numpy-vs-cupy", "counts-times-k",
    "fibres-permuted", "duplicate-standard", "duplicate-only-standard", "corrupted-frames-200",
    # ambiguous side inputs (issue 19): tests/test_ambiguous.py
    "catalogue-duplicate-identical", "catalogue-duplicate-unmatched", "fibre-names-duplicate",
    # issue 19: interrupts, temporary files, frame sanity (tests/test_interrupts.py, tests/test_sanity.py)
    "sigint-mid-run", "sigterm-mid-run", "killed-mid-write", "stale-temporary-not-ours", "frame-transposed",
    "frame-chi2-absurd", "clean-frames-within-bounds", "corrupted-frames-quiet",
    # issue 15: accepted now (tests/test_layouts.py, tests/test_fitsgrid.py)
    "wcs-log-linear", "medium-unknown", "catalogue-fits-table", "photometry-from-fibres", "fits-grid-missing-node",
    # issue 15: per-fibre wavelengths are accepted (tests/test_perfibre.py)
    "wavela-per-fibre-differ",
    # issue 16: telluric correction (tests/test_telluric.py)
    "telluric-unknown-mode", "telluric-too-few-standards", "telluric-saturated",
    # issue 18: calibrated inputs, unknown extensions (tests/test_outputs.py)
    "input-already-calibrated", "input-bunit-flux-density", "input-unknown-extensions",
)


def test_vrange_negative_with_space(in_ws):
    argv = [a for a in in_ws.argv(None, out="out-vrange-space.fits") if a != VRANGE_ARG]
    rc, _, err = run_cli(argv + ["--vrange", "-200:200:5"])
    assert rc == 0, err


def test_summary_exists_is_not_overwritten(in_ws):
    (in_ws.root / "summary-exists.json").write_text("keep me")
    rc, _, err = run_cli(in_ws.argv(None, "--summary", "summary-exists.json", out="out-summary-exists.fits"))
    try:
        assert (in_ws.root / "summary-exists.json").read_text() == "keep me"
        assert "--overwrite" in error_line(rc, err)
    finally:
        for p in ("out-summary-exists.fits",):
            if (in_ws.root / p).exists():
                (in_ws.root / p).unlink()


# --------------------------------------------------------------------------- a calibrated baseline


@pytest.fixture(scope="module")
def base(ws):
    """The good frame calibrated once (NumPy), written to base.fits."""
    return calibrate_frame(str(ws.path(ws.good)), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE,
                           backend="numpy", out=str(ws.path("base.fits")), overwrite=True)


def _frame_obj(ws):
    return read_frame(ws.path(ws.good))


# --------------------------------------------------------------------------- bad pixels are data


@pytest.fixture(scope="module")
def bad_pixels(ws):
    """A frame with bad pixels of every kind, calibrated once."""
    sim = ws.sim
    flux, var = sim.flux.copy(), sim.var.copy()
    types = np.asarray(sim.fibres["TYPE"])
    std, prog = np.flatnonzero(types == "C"), np.flatnonzero(types == "P")
    p = prog[0]
    flux[p, 100:110] = np.nan      # 10 NaN flux
    var[p, 200:205] = 0.0          # 5 zero variance
    var[p, 300:303] = np.nan       # 3 NaN variance
    var[p, 400] = np.inf           # 1 infinite variance
    flux[std[0], 500:520] = np.nan  # a standard with 20 bad pixels: still used
    var[std[1], :600] = 0.0        # a standard with 60 % bad pixels: excluded
    path = ws.path("bad-pixels.fits")
    write_frame(path, flux, var, sim.wave, sim.fibres, overwrite=True)
    before = file_sha256(path)
    out = ws.path("bad-pixels-out.fits")
    res = calibrate_frame(str(path), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy",
                          out=str(out), overwrite=True)
    assert file_sha256(path) == before
    expected = {int(f): 0 for f in np.asarray(sim.fibres["FIBRE"])}
    expected[p + 1] = 19
    expected[std[0] + 1] = 20
    expected[std[1] + 1] = 600
    return dict(res=res, cal=read_calibrated_frame(out), p=p, std=std, expected=expected,
                names=np.asarray(sim.fibres["NAME"]))


def test_bad_pixels_are_counted_per_fibre(bad_pixels):
    counts = {int(k): int(v) for k, v in bad_pixels["res"].summary["bad_pixels_per_fibre"].items()}
    assert counts == bad_pixels["expected"]


def test_standard_with_too_few_good_pixels_is_excluded_with_a_reason(bad_pixels):
    res, std, names = bad_pixels["res"], bad_pixels["std"], bad_pixels["names"]
    tab = {str(r["NAME"]): r for r in res.per_star}
    assert not tab[names[std[1]]]["USED"]
    assert "too few good pixels" in tab[names[std[1]]]["REASON"]
    assert tab[names[std[0]]]["USED"] and tab[names[std[2]]]["USED"]
    stars = {s["name"]: s for s in res.summary["stars"]}
    assert "too few good pixels" in stars[names[std[1]]]["reason"] and not stars[names[std[1]]]["used"]
    assert res.summary["n_stars_used"] == 2 and res.summary["n_stars_rejected"] == 1


def test_bad_pixels_stay_bad_in_the_calibrated_frame(bad_pixels):
    cal, p, std = bad_pixels["cal"], bad_pixels["p"], bad_pixels["std"]
    assert np.isnan(cal.flux[p, 100:110]).all()
    assert np.isnan(cal.var[p, 300:303]).all()
    assert not np.isfinite(cal.var[p, 400])
    assert np.isnan(cal.flux[std[0], 500:520]).all()
    good = np.ones(cal.flux.shape[1], bool)
    good[[*range(100, 110), *range(200, 205), *range(300, 303), 400]] = False
    assert np.isfinite(cal.flux[p, good]).all() and (cal.var[p, good] > 0).all()


def test_zero_variance_pixel_stays_marked_bad(bad_pixels):
    cal, p = bad_pixels["cal"], bad_pixels["p"]
    v = cal.var[p, 200:205]
    assert np.all((v == 0) | np.isnan(v))


def test_one_standard_all_nan_is_excluded(ws):
    fr = _frame_obj(ws)
    fr.flux[fr.standards[0]] = np.nan
    res = calibrate_frame(fr, photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy")
    row = res.per_star[0]
    assert not row["USED"] and "too few good pixels" in row["REASON"]


@pytest.mark.parametrize("where,value", [("flux", 1e6), ("var", 1e-3)], ids=["hot-pixel", "tiny-variance"])
def test_one_extreme_pixel_in_a_standard_does_not_break_the_calibration(ws, base, where, value):
    """1-of-3 clipping across stars cannot reject it: the star's own outlier mask and weight cap do."""
    fr = _frame_obj(ws)
    getattr(fr, where)[fr.standards[0], 500] = value
    res = calibrate_frame(fr, photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy")
    assert np.nanmax(np.abs(res.cal / base.cal - 1.0)) < 0.1


def test_header_card_astropy_cannot_write_is_left_out(ws, base, tmp_path, caplog):
    raw = bytearray(ws.path(ws.good).read_bytes())
    pos = raw.index(b"EXTEND  =")
    raw[pos:pos + 80] = b"CTYPE1\\ = 'X'".ljust(80)  # an illegal keyword astropy reads but will not write
    src = tmp_path / "odd-card.fits"
    src.write_bytes(bytes(raw))
    fr = read_frame(src)
    out = tmp_path / "odd-card-out.fits"
    from gpucal.io import write_calibrated_frame

    write_calibrated_frame(out, fr, base.flux, base.var, cal_wave=base.wave, cal=base.cal, cal_var=base.cal_var,
                           cal_measured=base.measured)
    with fits.open(out) as hdul:
        assert not any("\\" in k for k in hdul[0].header)
    assert "left out" in caplog.text


# --------------------------------------------------------------------------- descending wavelengths


@pytest.mark.parametrize("wave_hdu", ["WAVELA", "wcs"])
def test_descending_wavelengths_give_the_same_calibration(ws, base, wave_hdu):
    sim = ws.sim
    path = ws.path(f"descending-{wave_hdu}.fits")
    write_frame(path, sim.flux[:, ::-1], sim.var[:, ::-1], sim.wave[::-1], sim.fibres, wave_hdu=wave_hdu,
                overwrite=True)
    out = ws.path(f"descending-{wave_hdu}-out.fits")
    res = calibrate_frame(str(path), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy",
                          out=str(out), overwrite=True)
    np.testing.assert_allclose(res.cal, base.cal, rtol=1e-10)
    np.testing.assert_allclose(res.flux, base.flux, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(res.per_star["RV"]), np.asarray(base.per_star["RV"]), rtol=0, atol=1e-6)
    with fits.open(out) as hdul:  # the file keeps the input's (descending) pixel order
        np.testing.assert_allclose(hdul[0].data[:, ::-1], base.flux, rtol=1e-10)
        if wave_hdu == "WAVELA":
            assert np.all(np.diff(hdul["WAVELA"].data) < 0)


def test_vacuum_frame_gives_the_air_frame_calibration(ws, base):
    from gpucal.units import air_to_vacuum

    sim = ws.sim
    path = ws.path("vacuum.fits")
    write_frame(path, sim.flux, sim.var, air_to_vacuum(sim.wave), sim.fibres, medium="vacuum", overwrite=True)
    res = calibrate_frame(str(path), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy")
    assert _rel(res.cal, base.cal) < 1e-6
    np.testing.assert_allclose(np.asarray(res.per_star["RV"]), np.asarray(base.per_star["RV"]), atol=0.1)


# --------------------------------------------------------------------------- per-star failures


def _per_star(res):
    return {str(r["NAME"]): (bool(r["USED"]), str(r["REASON"])) for r in res.per_star}


def _summary_reasons(res):
    return {s["name"]: (s["used"], s["reason"]) for s in res.summary["stars"]}


def test_star_without_photometry_is_excluded(ws):
    cat = ws.sim.catalogue[1:]  # STD001 is missing, and nothing lies near it
    path = ws.path("cat-without-std001.csv")
    write_catalogue_csv(cat, path)
    res = calibrate_frame(str(ws.path(ws.good)), photometry=str(path), fwhm=FWHM, vrange=VRANGE, backend="numpy")
    used, reason = _per_star(res)["STD001"]
    assert not used and reason.startswith("no usable photometry (unmatched")
    assert _summary_reasons(res)["STD001"][1].startswith("no usable photometry")
    assert res.summary["n_stars_used"] == 2


def test_star_with_velocity_outside_the_scan_is_excluded(ws):
    # STD001 moves at -85 km/s: a -50..50 km/s scan does not cover it
    res = calibrate_frame(str(ws.path(ws.good)), photometry=str(ws.path(ws.cat)), fwhm=FWHM,
                          vrange=(-50.0, 50.0, 5.0), backend="numpy")
    used, reason = _per_star(res)["STD001"]
    assert not used and "edge of the scan range" in reason
    assert [u for u, _ in _per_star(res).values()].count(True) == 2


def test_chi2_threshold_excludes_the_worst_star(ws, base):
    chi2 = {str(r["NAME"]): float(r["CHI2_DOF"]) for r in base.per_star}
    worst = max(chi2, key=chi2.get)
    limit = 0.5 * (max(chi2.values()) + sorted(chi2.values())[-2])
    res = calibrate_frame(str(ws.path(ws.good)), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE,
                          backend="numpy", max_chi2_dof=limit)
    table = _per_star(res)
    assert not table[worst][0] and f"above {limit}" in table[worst][1]
    assert sum(u for u, _ in table.values()) == 2


def test_discrepant_star_is_rejected_by_the_combination(ws):
    cat = ws.sim.catalogue.copy()
    for b in "griz":
        cat[b][1] += 1.0  # STD002 one magnitude too faint in every band
    path = ws.path("cat-std002-off.csv")
    write_catalogue_csv(cat, path)
    res = calibrate_frame(str(ws.path(ws.good)), photometry=str(path), fwhm=FWHM, vrange=VRANGE, backend="numpy")
    used, reason = _per_star(res)["STD002"]
    assert not used and "discrepant" in reason
    assert res.summary["n_stars_rejected"] == 1


def test_too_few_usable_standards_writes_nothing(ws):
    from gpucal.errors import CalibrationError

    out = ws.path("min-stars-out.fits")
    with pytest.raises(CalibrationError, match=r"2 usable standard\(s\), fewer than --min-stars 3; STD001"):
        calibrate_frame(str(ws.path(ws.good)), photometry=str(ws.path(ws.cat)), fwhm=FWHM,
                        vrange=(-50.0, 50.0, 5.0), backend="numpy", min_stars=3, out=str(out))
    assert not out.exists() and _temp_files(ws.root) == []


# --------------------------------------------------------------------------- atomic outputs


def test_overwrite_replaces_an_existing_output(ws, base, tmp_path):
    out = tmp_path / "cal.fits"
    out.write_text("old")
    calibrate_frame(_frame_obj(ws), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend="numpy",
                    out=str(out), overwrite=True)
    _assert_same_but_provenance(out, ws.path("base.fits"))
    assert _temp_files(tmp_path) == []


#: Cards that say when, how and from which file a frame was calibrated (issue 18): they differ between
#: two runs of the same inputs, as does the PROVENANCE table; CHECKSUM follows them, DATASUM's comment
#: holds the time of writing.
_PROVENANCE_CARDS = {"FCALINP", "FCALISHA", "FCALPHOT", "FCALPSHA", "FCALGRID", "FCALGSHA", "FCALLSF", "FCALDATE",
                     "CHECKSUM"}


def _assert_same_but_provenance(a, b):
    """Files ``a`` and ``b`` hold the same HDUs with bit-identical data units and the same header cards,
    provenance aside (the PROVENANCE table, :data:`_PROVENANCE_CARDS`, DATASUM's comment)."""
    with fits.open(a) as ha, fits.open(b) as hb:
        assert [h.name for h in ha] == [h.name for h in hb]
        for x, y in zip(ha, hb):
            if x.name == "PROVENANCE":
                continue
            assert _data_bytes(a, x) == _data_bytes(b, y), x.name
            cards = [[(c.keyword, c.value, "" if c.keyword == "DATASUM" else c.comment) for c in h.header.cards
                      if c.keyword not in _PROVENANCE_CARDS] for h in (x, y)]
            assert cards[0] == cards[1], x.name


def _data_bytes(path, hdu) -> bytes:
    info = hdu.fileinfo()
    with open(path, "rb") as fh:
        fh.seek(info["datLoc"])
        return fh.read(info["datSpan"])


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_leaves_the_old_file_and_no_temporary(ws, base, tmp_path, monkeypatch, failure):
    from gpucal.errors import InputError

    out = tmp_path / "cal.fits"
    out.write_text("old")

    def broken_writeto(self, fileobj, *args, **kwargs):
        fileobj.write(b"SIMPLE  =                    T" + b" " * 100)  # a partial file, then the failure
        raise failure

    monkeypatch.setattr(fits.HDUList, "writeto", broken_writeto)
    expected = InputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        calibrate_frame(_frame_obj(ws), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE,
                        backend="numpy", out=str(out), overwrite=True)
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.fits"]


def test_unwritable_output_directory_is_an_input_error(ws, base, tmp_path, monkeypatch):
    import tempfile

    from gpucal.errors import InputError

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(InputError, match=r"cal\.fits: cannot write in .*Permission denied"):
        calibrate_frame(_frame_obj(ws), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE,
                        backend="numpy", out=str(tmp_path / "cal.fits"))
    assert list(tmp_path.iterdir()) == []


def test_write_text_is_atomic_and_refuses_like_the_frame_writer(ws, tmp_path):
    from gpucal.errors import InputError
    from gpucal.io import check_output_path, write_text

    target = tmp_path / "summary.json"
    write_text(target, "{}")
    assert target.read_text() == "{}"
    with pytest.raises(InputError, match="--overwrite"):
        write_text(target, "new")
    with pytest.raises(InputError, match="--overwrite"):
        check_output_path(target)
    write_text(target, "new", overwrite=True)
    assert target.read_text() == "new"
    with pytest.raises(InputError, match="refusing to write over the input frame"):
        check_output_path(ws.path(ws.good), overwrite=True, protect=ws.path(ws.good))
    with pytest.raises(InputError, match="does not exist"):
        write_text(tmp_path / "nowhere" / "s.json", "x")
    check_output_path(tmp_path / "fresh.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


# --------------------------------------------------------------------------- reproducibility


def test_same_inputs_give_a_bit_identical_file(ws, base, tmp_path):
    out = tmp_path / "again.fits"
    rc, _, err = run_cli(ws.argv(str(ws.path(ws.good)), out=str(out), photometry=str(ws.path(ws.cat)))
                         + ["--summary", str(tmp_path / "s.json")])
    assert rc == 0, err
    _assert_same_but_provenance(out, ws.path("base.fits"))
    summary = json.loads((tmp_path / "s.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("timing_s", "provenance")} == json.loads(
        json.dumps({k: v for k, v in base.summary.items() if k not in ("timing_s", "provenance")}, default=str))
    # the provenance differs only in when and how the run was made
    differ = {k for k, v in summary["provenance"].items() if v != base.summary["provenance"][k]}
    assert differ <= {"date_utc", "command_line", "options"}, differ


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    ok = np.isfinite(a) & np.isfinite(b) & (b != 0)
    return float(np.max(np.abs(a[ok] / b[ok] - 1.0))) if ok.any() else 0.0


def _compare(res, base, rtol):
    for name in ("cal", "cal_var", "flux", "var"):
        assert _rel(getattr(res, name), getattr(base, name)) <= rtol, name
    assert np.array_equal(np.asarray(res.per_star["USED"]), np.asarray(base.per_star["USED"]))


def test_numpy_and_array_api_strict_agree(ws, base):
    xs = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")
    from gpucal.backends import Backend

    strict = Backend("array_api_strict", xs, None, "reliability test")
    res = calibrate_frame(_frame_obj(ws), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend=strict)
    _compare(res, base, 1e-12)


def test_numpy_and_cupy_agree(ws, base):
    from gpucal.backends import get_backend

    try:
        cupy = get_backend("cupy")
    except BackendError as exc:
        pytest.skip(f"cupy: {exc}")
    res = calibrate_frame(_frame_obj(ws), photometry=str(ws.path(ws.cat)), fwhm=FWHM, vrange=VRANGE, backend=cupy)
    _compare(res, base, 1e-5)

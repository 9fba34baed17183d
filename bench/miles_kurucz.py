"""Issue 14's MILES table: real MILES stars fitted continuously against SDSS's Kurucz grid.

The 40 MILES F/G/K stars of ../shared/data/miles_fgk (FWHM 2.5 Å, air, 3540-7410 Å, catalogue
Teff/logg/[Fe/H] in params.csv) are observed in one frame: every star inside the grid's Teff range
(kurucz_stds_v5.fit: 5000-7000 K) is broadened to 6.5 Å FWHM, scaled to r = 15, multiplied by a
smooth throughput (a Gaussian in ln λ, no ripple) and given Gaussian noise at S/N 50 per pixel.
Its g and r (speclite, Pan-STARRS) are the catalogue. The frame is calibrated by
gpucal.pipeline.calibrate_frame(fit="continuous") and, per star, the script prints and writes the
catalogue Teff/logg/[Fe/H], the fitted values ± errors and the fit's flags (match.meta: converged,
on_hull, fit_fallback), then the summary statistics. A star that fell back to the node path is
reported with the node path's parameters (those the pipeline uses) and, under ``fit_own``, the
continuous fit's own. The grid spans logg 4.0-4.5 and [Fe/H] -2..0
only: a star outside those is fitted (it is inside in Teff) and marked ``logg_outside`` /
``feh_outside``; its hull flag is expected.

Usage: PYTHONPATH=$PWD python3 bench/miles_kurucz.py --out bench/results/miles_kurucz_vm.json
(also writes the note's table, bench/results/miles_kurucz_vm.md)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
MILES = os.path.join(ROOT, "miles_fgk")
KURUCZ = os.path.join(ROOT, "kurucz_stds_v5.fit")
GRID_TEFF, GRID_LOGG, GRID_FEH = (5000.0, 7000.0), (4.0, 4.5), (-2.0, 0.0)
FWHM = 6.5  # Å: above the Kurucz grid's own resolution (R ≈ 1500-1800) over 3700-7300 Å


def miles_catalogue(path=MILES):
    """params.csv as a list of dicts (file, id, teff, logg, feh)."""
    with open(os.path.join(path, "params.csv"), newline="") as fh:
        return [dict(file=r["file"], id=r["miles_id"], teff=float(r["teff"]), logg=float(r["logg"]),
                     feh=float(r["feh"])) for r in csv.DictReader(fh)]


def select_stars(stars, teff_range=GRID_TEFF):
    """(inside, skipped): stars inside the grid's Teff range; the others with why they are skipped."""
    inside = [s for s in stars if teff_range[0] <= s["teff"] <= teff_range[1]]
    skipped = [dict(s, why=f"Teff {s['teff']:.0f} K outside the grid's {teff_range[0]:.0f}-{teff_range[1]:.0f} K")
               for s in stars if not teff_range[0] <= s["teff"] <= teff_range[1]]
    return inside, skipped


def throughput(wave):
    """A smooth throughput (counts per 1e-13 erg/s/cm²/Å): a Gaussian in ln λ peaking at 5600 Å."""
    return 3e4 * np.exp(-0.5 * (np.log(wave / 5600.0) / 0.25) ** 2)


def write_miles_frame(stars, directory, *, snr=50.0, seed=5, wave_range=(3700.0, 7300.0)):
    """The frame and catalogue of ``stars`` (dicts of miles_catalogue) in ``directory``; returns (frame, cat, wave)."""
    import astropy.units as u
    import speclite.filters
    from astropy.io import fits
    from astropy.table import Table
    from scipy.ndimage import gaussian_filter1d

    from gpucal.io import write_frame

    flux = []
    for s in stars:
        with fits.open(os.path.join(MILES, s["file"])) as h:
            f = np.asarray(h[0].data, dtype=np.float64)
            wave = h[0].header["CRVAL1"] + h[0].header["CDELT1"] * np.arange(f.size)
            sig = np.sqrt(FWHM**2 - h[0].header.get("FWHM", 2.5) ** 2) / 2.3548200450309493 / h[0].header["CDELT1"]
        flux.append(gaussian_filter1d(f, sig))
    sel = (wave > 3700.0) & (wave < 7300.0)  # the photometry on the whole spectrum, the frame on wave_range
    wave, flux = wave[sel], np.array(flux)[:, sel]
    filt = speclite.filters.load_filters("panstarrs-g", "panstarrs-r")
    r = np.asarray(filt.get_ab_magnitudes(flux * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA)["panstarrs-r"])
    flux = flux * 10 ** (-0.4 * (15.0 - r))[:, None] / 1e-13  # r = 15, in units of 1e-13 erg/s/cm²/Å
    mags = filt.get_ab_magnitudes(flux * 1e-13 * u.erg / u.s / u.cm**2 / u.AA, wave * u.AA)
    sel = (wave > wave_range[0]) & (wave < wave_range[1])
    wave, flux = wave[sel], flux[:, sel]
    counts = flux * throughput(wave)
    var = (counts / snr) ** 2
    counts = counts + np.random.default_rng(seed).standard_normal(counts.shape) * np.sqrt(var)
    n = len(stars)
    names = [f"M{s['id']}" for s in stars]
    fibres = Table({"NAME": names, "TYPE": ["C"] * n, "RA": 150.0 + 0.01 * np.arange(n), "DEC": np.full(n, 2.0)})
    frame, cat = os.path.join(directory, "miles.fits"), os.path.join(directory, "cat.csv")
    write_frame(frame, counts, var, wave, fibres, medium="air")
    Table({"name": names, "ra": fibres["RA"], "dec": fibres["DEC"], "g": mags["panstarrs-g"], "dg": np.full(n, 0.01),
           "r": mags["panstarrs-r"], "dr": np.full(n, 0.01)}).write(cat, format="ascii.csv", overwrite=True)
    return frame, cat, wave


def calibrate_with_flags(frame, cat, **kw):
    """calibrate_frame(fit="continuous"), the fit's meta flags (converged, on_hull, fit_fallback) and params_err.

    The flags are read off the match the pipeline's ``_fit`` returns (a wrapper, for this script only).
    """
    import gpucal.pipeline as pl
    from gpucal.backends import to_numpy

    seen = {}
    inner = pl._fit

    def spy(*a, **k):
        m = inner(*a, **k)
        seen.update({key: to_numpy(m.meta[key]) for key in ("converged", "on_hull", "fit_fallback")
                     if m.meta.get(key) is not None})
        seen["params_err"] = to_numpy(m.params_err)
        return m

    own = pl.with_node_fallback

    def spy_fallback(fit, node, back=None):  # the fit's own answer, before a star that did not converge takes the node's
        seen["fit_params"], seen["fit_err"] = to_numpy(fit.params), to_numpy(fit.params_err)
        return own(fit, node, back)

    pl._fit, pl.with_node_fallback = spy, spy_fallback
    try:
        res = pl.calibrate_frame(frame, templates=KURUCZ, photometry=cat, fwhm=FWHM, fit="continuous",
                                 backend="numpy", **kw)
    finally:
        pl._fit, pl.with_node_fallback = inner, own
    return res, seen


def star_rows(stars, res, flags):
    """One dict per star: catalogue and fitted parameters, errors, the fit's flags, used."""
    tab = res.per_star
    idx = {str(n): i for i, n in enumerate(tab["NAME"])}
    rows = []
    for k, s in enumerate(stars):
        i = idx[f"M{s['id']}"]
        row = dict(id=s["id"], teff_cat=s["teff"], logg_cat=s["logg"], feh_cat=s["feh"])
        for j, (col, key) in enumerate((("TEFF", "teff"), ("LOGG", "logg"), ("MH", "feh"))):
            row[f"{key}_fit"] = float(tab[col][i])
            row[f"{key}_err"] = float(flags["params_err"][k, j])
        row.update({f: bool(flags[f][k]) if f in flags else None for f in ("converged", "on_hull", "fit_fallback")})
        if row["fit_fallback"] and "fit_params" in flags:  # the table holds the node's; the fit's own too
            row.update(fit_own={key: float(flags["fit_params"][k, j]) for j, key in enumerate(("teff", "logg", "feh"))})
        row.update(used=bool(tab["USED"][i]), dteff=row["teff_fit"] - s["teff"], dlogg=row["logg_fit"] - s["logg"],
                   dfeh=row["feh_fit"] - s["feh"],
                   logg_outside=not GRID_LOGG[0] <= s["logg"] <= GRID_LOGG[1],
                   feh_outside=not GRID_FEH[0] <= s["feh"] <= GRID_FEH[1])
        rows.append(row)
    return rows


def summary(rows):
    """Median |Δ| and mean Δ of each parameter, over all stars and over those inside the grid in all three."""
    def stats(sub):
        if not sub:
            return {}
        d = {k: np.array([r[k] for r in sub]) for k in ("dteff", "dlogg", "dfeh")}
        return dict(n=len(sub), n_converged=sum(bool(r["converged"]) for r in sub),
                    n_on_hull=sum(bool(r["on_hull"]) for r in sub), n_fallback=sum(bool(r["fit_fallback"]) for r in sub),
                    n_used=sum(r["used"] for r in sub),
                    **{f"median_abs_{k}": float(np.median(np.abs(v))) for k, v in d.items()},
                    **{f"mean_{k}": float(np.mean(v)) for k, v in d.items()},
                    **{f"std_{k}": float(np.std(v)) for k, v in d.items()})
    inside = [r for r in rows if not (r["logg_outside"] or r["feh_outside"])]
    return dict(all=stats(rows), inside_grid=stats(inside))


def markdown(rows, skipped, stats):
    """The note's table: one line per star, then the skipped stars and the summary."""
    out = ["| star | Teff cat | Teff fit | logg cat | logg fit | [Fe/H] cat | [Fe/H] fit | conv | hull | fallback | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = ", ".join(n for n, on in (("logg outside grid", r["logg_outside"]),
                                         ("[Fe/H] outside grid", r["feh_outside"])) if on)
        if r.get("fit_own"):
            note += (", " if note else "") + "fit's own: {teff:.0f} / {logg:.2f} / {feh:.2f}".format(**r["fit_own"])
        out.append(f"| M{r['id']} | {r['teff_cat']:.0f} | {r['teff_fit']:.0f} ± {r['teff_err']:.0f} | {r['logg_cat']:.2f} | "
                   f"{r['logg_fit']:.2f} ± {r['logg_err']:.2f} | {r['feh_cat']:+.2f} | {r['feh_fit']:+.2f} ± "
                   f"{r['feh_err']:.2f} | {'yes' if r['converged'] else 'NO'} | {'yes' if r['on_hull'] else ''} | "
                   f"{'yes' if r['fit_fallback'] else ''} | {note} |")
    out.append("")
    out.append("Skipped: " + "; ".join(f"M{s['id']} ({s['why']})" for s in skipped))
    for key, st in stats.items():
        if st:
            out.append(f"{key}: n {st['n']}, converged {st['n_converged']}, on hull {st['n_on_hull']}, fell back "
                       f"{st['n_fallback']}; median |ΔTeff| {st['median_abs_dteff']:.0f} K, mean ΔTeff "
                       f"{st['mean_dteff']:+.0f} K, median |Δlogg| {st['median_abs_dlogg']:.2f}, median |Δ[Fe/H]| "
                       f"{st['median_abs_dfeh']:.2f}")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--machine", default="2-core VM, shared")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    stars, skipped = select_stars(miles_catalogue())
    for s in skipped:
        print(f"skipped M{s['id']}: {s['why']}")
    with tempfile.TemporaryDirectory() as tmp:
        frame, cat, _ = write_miles_frame(stars, tmp, snr=args.snr, seed=args.seed)
        t0 = time.perf_counter()
        res, flags = calibrate_with_flags(frame, cat)
        wall = time.perf_counter() - t0
    rows = star_rows(stars, res, flags)
    print(f"{'star':>6} {'Teff cat':>8} {'Teff fit':>14} {'logg cat':>8} {'logg fit':>11} {'[Fe/H] cat':>10} "
          f"{'[Fe/H] fit':>12}  conv hull fall used")
    for r in rows:
        print(f"M{r['id']:>5} {r['teff_cat']:8.0f} {r['teff_fit']:7.0f} ± {r['teff_err'] or 0:4.0f} {r['logg_cat']:8.2f} "
              f"{r['logg_fit']:5.2f} ± {r['logg_err'] or 0:.2f} {r['feh_cat']:10.2f} {r['feh_fit']:6.2f} ± "
              f"{r['feh_err'] or 0:.2f}  {r['converged']!s:>4} {r['on_hull']!s:>4} {r['fit_fallback']!s:>4} "
              f"{r['used']!s:>4}{'  logg outside grid' if r['logg_outside'] else ''}"
              f"{'  [Fe/H] outside grid' if r['feh_outside'] else ''}"
              + (f"  fit's own: {r['fit_own']['teff']:.0f} {r['fit_own']['logg']:.2f} {r['fit_own']['feh']:.2f}"
                 if r.get("fit_own") else ""))
    stats = summary(rows)
    print(json.dumps(stats, indent=1))
    if args.out:
        with open(args.out.rsplit(".", 1)[0] + ".md", "w", encoding="utf-8") as fh:
            fh.write(markdown(rows, skipped, stats))
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"machine": args.machine, "snr": args.snr, "seed": args.seed, "fwhm": FWHM, "wall_s": wall,
                       "timing_s": res.summary.get("timing_s"), "skipped": skipped, "stars": rows, "summary": stats},
                      fh, indent=1)


if __name__ == "__main__":
    main()

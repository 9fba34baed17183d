"""The FITS guard: hostile or damaged FITS files become one InputError, found early (host edge module).

Step of the mission: the first thing done to every input file, before the
readers of :mod:`gpucal.io.frames` look at its content.

astropy trusts a header's sizes (NAXIS, NAXISn, TFIELDS, PCOUNT, GCOUNT):
NAXIS = 999999999 makes it loop for minutes, TFIELDS = 999999999 allocates
gigabytes, a negative GCOUNT sends it to a wrong offset. :func:`_scan_layout`
walks every header with a minimal card reader first and refuses sizes out of
range or past the end of the file; :func:`_open` then opens the file
read-only and parses every card and data unit at once (:func:`_load_hdu`), so
a damaged file fails here, quickly, with the file and HDU named
(``FILE [HDU n NAME]: ...``), never later with an astropy exception.

In: a path. Out: an ``astropy.io.fits.HDUList``, fully loaded, read-only
(the caller closes it). Computes nothing.
"""

from __future__ import annotations

import math
import os
import warnings

from astropy.io import fits

from ..errors import InputError

# What astropy makes of a header it cannot classify (no data attribute to read).
_UNUSABLE_HDU_TYPES = {"_BaseHDU", "_ValidHDU", "_CorruptedHDU"}
_BITPIX_BYTES = {8: 1, 16: 2, 32: 4, 64: 8, -32: 4, -64: 8}
#: More HDUs than this is not a reduced frame (and stops a damaged file from being parsed forever).
_MAX_HDUS = 64
_MAX_HEADER_BLOCKS = 1000
_BLOCK = 2880


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hdu_label(hdu, index: int) -> str:
    """``HDU n`` (0-based) plus its EXTNAME when that can still be read."""
    try:
        name = str(hdu.header.get("EXTNAME", "PRIMARY" if index == 0 else "")).strip()
    except Exception:  # an unparsable EXTNAME card: the index alone still locates the HDU
        name = ""
    return f"HDU {index} {name}" if name else f"HDU {index}"


def _card_int(cards: dict, key: bytes):
    """Integer value of a raw header card, or None when absent or not a plain integer."""
    raw = cards.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _scan_layout(path: str, file_size: int) -> None:
    """Check every header's sizes with a minimal card reader before astropy parses the file.

    astropy trusts NAXIS, NAXISn, TFIELDS, PCOUNT and GCOUNT: NAXIS = 999999999
    makes it loop for minutes, TFIELDS = 999999999 allocates gigabytes, and a
    negative GCOUNT sends it looking for the next header at a wrong offset. So
    each header is walked here first (only those integer cards are read) and
    any size that is out of range or runs past the end of the file is refused,
    naming the HDU. Anything this reader cannot follow (not a FITS header, a
    value that is not a plain integer, trailing bytes) is left to astropy,
    whose own errors _open reports.
    """
    offset = 0
    offset = 0
    with open(path, "rb") as fh:
        for index in range(_MAX_HDUS + 1):
            if offset >= file_size:
                return
            if index == _MAX_HDUS:
                raise InputError(f"{path}: more than {_MAX_HDUS} HDUs; not a reduced frame (corrupt file?)")
            fh.seek(offset)
            header = _header_cards(fh, index)
            if header is None:
                return
            cards, n_blocks = header
            where = f"{path} [HDU {index}]"
            n_bytes = _data_bytes(cards, index, where)
            if n_bytes is None:
                return
            start = offset + n_blocks * _BLOCK
            if start + n_bytes > file_size:
                raise InputError(
                    f"{where}: corrupt or truncated FITS file: the header announces {n_bytes} data bytes "
                    f"from byte {start}, but the file has {file_size} bytes"
                )
            offset = start + -(-n_bytes // _BLOCK) * _BLOCK


def _header_cards(fh, index: int):
    """(value cards, length in 2880-byte blocks) of the header at ``fh``'s position.

    Only ``KEYWORD= value`` cards are kept, as raw bytes (the first of each
    keyword). None when astropy should judge: a header that is truncated,
    endless, or does not start as a FITS header.
    """
    cards: dict = {}
    n_blocks = 0
    while True:
        block = fh.read(_BLOCK)
        if len(block) < _BLOCK or n_blocks >= _MAX_HEADER_BLOCKS:
            return None  # truncated or endless header: astropy reports it
        if n_blocks == 0 and not block.startswith(b"SIMPLE  =" if index == 0 else b"XTENSION="):
            return None
        n_blocks += 1
        for j in range(0, _BLOCK, 80):
            key = block[j:j + 8].rstrip()
            if key == b"END":
                return cards, n_blocks
            if block[j + 8:j + 10] == b"= " and key not in cards:
                cards[key] = block[j + 10:j + 80].split(b"/")[0].strip()


def _data_bytes(cards: dict, index: int, where: str):
    """Bytes of the data unit a header announces, its sizes checked (InputError naming ``where``).

    None when a size card is not a plain integer (astropy judges those).
    """
    bitpix, naxis = _card_int(cards, b"BITPIX"), _card_int(cards, b"NAXIS")
    if bitpix is None or naxis is None:
        return None
    if bitpix not in _BITPIX_BYTES:
        raise InputError(f"{where}: corrupt FITS header: BITPIX = {bitpix} (8, 16, 32, 64, -32 or -64)")
    if not 0 <= naxis <= 999:
        raise InputError(f"{where}: corrupt FITS header: NAXIS = {naxis} (0 to 999)")
    dims = [_card_int(cards, b"NAXIS%d" % k) for k in range(1, naxis + 1)]
    pcount = _card_int(cards, b"PCOUNT") if b"PCOUNT" in cards else 0
    gcount = _card_int(cards, b"GCOUNT") if b"GCOUNT" in cards else 1
    tfields = _card_int(cards, b"TFIELDS") if b"TFIELDS" in cards else 0
    if any(v is None for v in dims + [pcount, gcount, tfields]):
        return None
    for name, value, low, high in [("PCOUNT", pcount, 0, None), ("GCOUNT", gcount, 1, None),
                                   ("TFIELDS", tfields, 0, 999)] + [
            (f"NAXIS{k + 1}", d, 0, None) for k, d in enumerate(dims)]:
        if value < low or (high is not None and value > high):
            rng = f"{low} to {high}" if high is not None else f">= {low}"
            raise InputError(f"{where}: corrupt FITS header: {name} = {value} ({rng})")
    if index == 0 and dims and dims[0] == 0 and cards.get(b"GROUPS") == b"T":
        dims = dims[1:]  # random groups: NAXIS1 = 0 is not a data axis
    return _BITPIX_BYTES[bitpix] * gcount * (pcount + math.prod(dims)) if naxis else 0


def _load_hdu(hdu, index: int, path: str) -> None:
    """Parse every header card and read the data unit now, so corruption is found here, named."""
    where = _hdu_label(hdu, index)
    if type(hdu).__name__ in _UNUSABLE_HDU_TYPES:
        raise InputError(f"{path} [{where}]: corrupt FITS header (not a valid image or table HDU)")
    try:
        for card in hdu.header.cards:
            _ = card.value
        _ = hdu.data
        if isinstance(hdu, fits.BinTableHDU):
            _ = hdu.columns
    except Exception as exc:  # noqa: BLE001 -- astropy raises many types for damaged files
        raise InputError(
            f"{path} [{where}]: corrupt or truncated FITS file ({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _open(path: str):
    """fits.open, read-only and fully loaded, with truncation/corruption as InputError.

    The header sizes are checked first (:func:`_scan_layout`); then every
    card is parsed and every data unit read before the list is returned, so a
    damaged file fails here, quickly, with the file and HDU named, never later
    with an astropy exception.
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a FITS file")
    file_size = os.path.getsize(path)
    if file_size == 0:
        raise InputError(f"{path}: empty file, not a FITS file")
    _scan_layout(path, file_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, mode="readonly", memmap=False, lazy_load_hdus=True)
        except Exception as exc:  # noqa: BLE001 -- astropy raises many types for damaged files
            raise InputError(f"{path}: not a readable FITS file ({type(exc).__name__}: {_first_line(exc)})") from None
        index = 0
        try:
            for index, hdu in enumerate(hdul):  # lazy: HDU i + 1 is located only after HDU i was checked
                if index >= _MAX_HDUS:
                    raise InputError(f"{path}: more than {_MAX_HDUS} HDUs; not a reduced frame (corrupt file?)")
                _load_hdu(hdu, index, path)
        except InputError:
            hdul.close()
            raise
        except Exception as exc:  # noqa: BLE001 -- raised while astropy parses the next header
            hdul.close()
            raise InputError(
                f"{path}: corrupt FITS file after HDU {index} ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        except BaseException:
            hdul.close()
            raise
    for w in caught:
        msg = str(w.message)
        if "truncated" in msg.lower() or "error validating header" in msg.lower():
            hdul.close()
            raise InputError(f"{path}: corrupt or truncated FITS file ({_first_line(msg)})")
    return hdul

"""io room: frames in and out, the FITS guard, safe files (host edge modules; they compute nothing).

Modules
-------
frames : read_frame / write_frame (the input layouts), write_calibrated_frame /
    read_calibrated_frame (the output layout), wavelength WCS, medium and unit helpers.
desi : the DESI-style layout (FLUX, IVAR, MASK, WAVELENGTH, RESOLUTION, FIBERMAP) in and out.
guard : the hostile-FITS checks every input file passes before it is read.
files : file_sha256, check_output_path, write_text and the atomic writes behind every output.

Other rooms import from here (``from ..io import read_frame``), not from the modules.
"""

from ..containers import CalibratedFrame, Frame
from .desi import is_desi_layout, read_desi_frame, write_desi_frame
from .files import check_output_path, file_sha256, write_text
from .frames import (
    FLUX_BUNIT,
    VAR_BUNIT,
    WAVE_TOL,
    read_calibrated_frame,
    read_frame,
    write_calibrated_frame,
    write_frame,
)

__all__ = [
    "Frame",
    "CalibratedFrame",
    "read_frame",
    "write_frame",
    "write_calibrated_frame",
    "read_calibrated_frame",
    "write_desi_frame",
    "read_desi_frame",
    "is_desi_layout",
    "check_output_path",
    "write_text",
    "file_sha256",
    "FLUX_BUNIT",
    "VAR_BUNIT",
    "WAVE_TOL",
]

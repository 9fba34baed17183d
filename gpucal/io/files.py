"""Safe files: checksums, destination refusals and atomic writes (host edge module).

Step of the mission: the last thing done to every output. The input frame
is never opened for writing and can never be the destination (whatever the
spelling or link); an existing file is replaced only with ``overwrite``;
data is written to a temporary file in the destination directory, synced,
and moved into place with ``os.replace``, so a reader never sees a
half-written file and a failure (full disk, no permission, an interrupt)
leaves no temporary file and an existing destination as it was. OS and
astropy write errors become InputError naming the path.

Temporary files are named ``.<name>.gpucal-<host>-<pid>-<random>.tmp``
(:func:`temp_prefix`). A process killed outright (SIGKILL, power loss) cannot
remove its own, so before writing ``<name>`` a run removes the stale ones of
that name: regular files of this pattern, made on this host, whose process no
longer runs (:func:`remove_stale_temps`). Nothing else is ever removed.

:func:`check_output_path` applies the refusals up front, so a caller can
check every destination before the work that fills it; :func:`write_text`
writes side outputs (a JSON summary) the same way FITS frames are written.
Computes nothing but SHA-256 digests of file bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import tempfile

from astropy.io import fits

from ..errors import InputError

__all__ = ["file_sha256", "check_output_path", "write_text", "temp_prefix", "remove_stale_temps"]


def file_sha256(path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _host() -> str:
    """This machine's name as it appears in temporary-file names (letters, digits, '.', '-')."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname() or "localhost")


def temp_prefix(path) -> str:
    """The name prefix of this process's temporary files for ``path``:
    ``.<name>.gpucal-<host>-<pid>-`` (a random part and ``.tmp`` follow)."""
    return f".{os.path.basename(os.fspath(path))}.gpucal-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a process of ours: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep the file
    return True


def remove_stale_temps(path) -> list:
    """Remove the temporary files an earlier, killed gpucal run left for ``path``; return their names.

    Only regular files named ``.<name>.gpucal-<host>-<pid>-<random>.tmp`` for
    this very ``<name>``, made on this host by a process that no longer runs,
    are removed; files of live processes, other hosts (a shared disk), other
    names or any other pattern are left alone. Errors are ignored: the write
    that follows reports its own.
    """
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    pattern = re.compile(rf"\.{re.escape(os.path.basename(path))}\.gpucal-(?P<host>[A-Za-z0-9._-]+)-"
                         rf"(?P<pid>[0-9]+)-[a-z0-9_]+\.tmp")
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for name in names:
        m = pattern.fullmatch(name)
        if m is None or m["host"] != _host() or _pid_alive(int(m["pid"])):
            continue
        full = os.path.join(d, name)
        try:
            if stat.S_ISREG(os.lstat(full).st_mode):
                os.unlink(full)
                removed.append(name)
        except OSError:
            pass
    return removed


def _check_destination(path: str, overwrite: bool, protect=None) -> None:
    if protect:
        same = False
        try:
            same = os.path.exists(path) and os.path.exists(protect) and os.path.samefile(path, protect)
        except OSError:
            same = False
        if same or os.path.realpath(path) == os.path.realpath(protect):
            raise InputError(
                f"{path}: refusing to write over the input frame {protect}; "
                "input files are never modified, choose another output path"
            )
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory")
    if os.path.lexists(path) and not overwrite:
        raise InputError(f"{path}: output file exists; use --overwrite (overwrite=True) to replace it")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise InputError(f"{path}: output directory {d} does not exist")


def check_output_path(path, *, overwrite: bool = False, protect=None) -> None:
    """Raise InputError unless ``path`` may be written: never the file ``protect`` (the input,
    whatever the spelling or link), never an existing file unless ``overwrite``, and only into
    an existing directory. Cheap: call it for every output before the work that fills them.
    """
    _check_destination(os.fspath(path), overwrite, None if protect is None else os.fspath(protect))


def _atomic_write(hdul: fits.HDUList, path: str, overwrite: bool, protect=None, checksum: bool = False,
                  tail: bytes = b"") -> None:
    """Write ``hdul`` to a temporary file beside ``path`` and move it into place (``checksum``:
    CHECKSUM and DATASUM on every HDU; ``tail``: whole HDUs, as bytes, appended after them)."""
    def write(fh):
        hdul.writeto(fh, output_verify="exception", checksum=checksum)
        fh.write(tail)

    _atomic(write, path, overwrite, protect)


def write_text(path, text: str, *, overwrite: bool = False, protect=None) -> None:
    """Write ``text`` (UTF-8) atomically, with the refusals of :func:`check_output_path`."""
    data = str(text).encode("utf-8")
    _atomic(lambda fh: fh.write(data), os.fspath(path), overwrite,
            None if protect is None else os.fspath(protect))


def _atomic(write, path: str, overwrite: bool, protect=None) -> None:
    """``write(fileobj)`` into a temporary file beside ``path``, then move it into place.

    Whatever happens (a full disk, no permission, an interrupt) the temporary
    file is removed and an existing ``path`` is left as it was; OS errors
    become InputError naming ``path``. Stale temporary files of ``path`` that
    killed runs left are removed first (:func:`remove_stale_temps`).
    """
    _check_destination(path, overwrite, protect)
    d = os.path.dirname(os.path.abspath(path))
    remove_stale_temps(path)
    try:
        tmp = tempfile.NamedTemporaryFile(delete=False, dir=d, prefix=temp_prefix(path), suffix=".tmp")
    except OSError as exc:
        raise InputError(f"{path}: cannot write in {d} ({exc.strerror or exc})") from None
    tmp_name = tmp.name
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        # the destination may have appeared since the check: never replace it without overwrite
        if not overwrite and os.path.lexists(path):
            raise InputError(f"{path}: output file exists; use --overwrite (overwrite=True) to replace it")
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        if isinstance(exc, InputError):
            raise
        if isinstance(exc, (fits.VerifyError, ValueError)):
            raise InputError(f"{path}: cannot write FITS file ({' '.join(str(exc).split())})") from exc
        if isinstance(exc, OSError):
            raise InputError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise

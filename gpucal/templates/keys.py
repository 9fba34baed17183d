"""What names a prepared template grid: the cache format and version, and SHA-256 digests (host).

Step of the mission: shared by the preparation (:mod:`gpucal.templates.prepare`,
which hashes its settings and inputs into a grid's provenance) and the cache
(:mod:`gpucal.templates.cache`, which keys, writes and verifies grids by
these digests), so that neither imports the other's internals.

In: JSON-serialisable settings or a file path. Out: hex SHA-256 strings.
"""

from __future__ import annotations

import hashlib
import json

__all__ = ["CACHE_FORMAT", "CACHE_VERSION"]

#: ``format`` of a cache sidecar (and of a prepared grid's provenance).
CACHE_FORMAT = "gpucal-template-cache"
#: ``version`` of that format; a cache of another version is prepared again.
#: 2: the sidecar records its own SHA-256 (``sidecar_sha256``).
CACHE_VERSION = 2


def _sha256_text(obj) -> str:
    """Hex SHA-256 of ``obj`` as sorted-key JSON (anything JSON cannot hold as its ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _sidecar_sha256(meta: dict) -> str:
    """Hex SHA-256 of a sidecar's content as JSON holds it, less its own ``sidecar_sha256`` entry."""
    return _sha256_text({k: v for k, v in meta.items() if k != "sidecar_sha256"})


def _sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()

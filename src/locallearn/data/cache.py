"""A cache of decoded arrays, so slow sources (JPEG/PNG folders and archives) decode once.

Arrays are stored as one uncompressed ``.npz`` per source in ``$LOCALLEARN_CACHE_DIR``
(default ``~/.cache/locallearn``), keyed by a fingerprint of the source: the sha256 of
a file's bytes, or for a folder a hash of its sorted relative paths, sizes and mtimes.
Files are written to a temporary name and renamed into place, so a crash never leaves
a half-written cache entry; an unreadable entry is ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CACHE_DIR_ENV = "LOCALLEARN_CACHE_DIR"
log = logging.getLogger("locallearn")
# Bump when the decoded layout changes, so that old entries are not reused.
CACHE_VERSION = 1

Arrays = dict[str, np.ndarray]
_file_hashes: dict[tuple[str, int, int], str] = {}


def cache_dir() -> Path:
    """The cache folder: ``$LOCALLEARN_CACHE_DIR`` or ``~/.cache/locallearn``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "locallearn"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (remembered per path, size and mtime in this process)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _file_hashes[key] = digest.hexdigest()
    return _file_hashes[key]


def fingerprint(path: Path) -> str:
    """Identify a source: sha256 of a file, or of a folder's (path, size, mtime) listing."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = item.stat()
        digest.update(f"{item.relative_to(path).as_posix()}\0{stat.st_size}\0".encode())
        digest.update(f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_path(kind: str, source_hash: str, options: dict[str, Any] | None = None) -> Path:
    """Where the entry for ``kind`` decoded from a source with ``source_hash`` lives."""
    spec = json.dumps([CACHE_VERSION, kind, source_hash, options or {}], sort_keys=True)
    key = hashlib.sha256(spec.encode()).hexdigest()[:24]
    return cache_dir() / f"{kind}-{key}.npz"


def cached_arrays(
    kind: str,
    source_hash: str,
    build: Callable[[], Arrays],
    keys: Sequence[str],
    options: dict[str, Any] | None = None,
) -> Arrays:
    """Return the arrays cached for this source, or ``build()`` them and cache them.

    Args:
        kind: short name of the decoder (part of the file name), e.g. ``"imagefolder"``.
        source_hash: :func:`fingerprint` of the source.
        build: decodes the source; returns named arrays (no object arrays).
        keys: names that a valid entry must hold; an entry lacking one is rebuilt.
        options: decoding options that change the result (e.g. a resize), part of the key.
    """
    path = cache_path(kind, source_hash, options)
    arrays = _read(path, keys)
    if arrays is None:
        log.info("decoding %s into the cache %s (only this once; later runs read it)", kind, path)
        arrays = build()
        _write(path, arrays)
    return arrays


def _read(path: Path, keys: Sequence[str]) -> Arrays | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring unreadable cache file {path} ({err}); rebuilding", stacklevel=3)
        return None
    if not set(keys) <= set(arrays):
        warnings.warn(f"cache file {path} lacks {sorted(set(keys) - set(arrays))}; rebuilding",
                      stacklevel=3)
        return None
    return arrays


def _write(path: Path, arrays: Arrays) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as err:
        # A read-only or full disk must not stop training: just decode next time again.
        warnings.warn(f"could not write cache file {path} ({err})", stacklevel=3)

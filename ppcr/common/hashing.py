"""SHA-256 of files, computed once per file version and cached, so that a 16 GB base model is not re-read
on every load.

The cache is a small JSON file (``$PPCR_CACHE_DIR``, else ``$XDG_CACHE_HOME/ppcr``, else ``~/.cache/ppcr``:
``file_sha256.json``) keyed by the file's resolved path, and valid while its size, modification time
(nanoseconds), inode and device are those recorded with the hash: any rewrite of the file (in place or
by replacing it) changes at least one of them, and the file is hashed again. Concurrent writers (ranks of
one node) replace the cache file atomically; one may drop another's new entry, which costs a re-hash,
never a wrong hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

CACHE_NAME = "file_sha256.json"


def cache_dir() -> Path:
    """Where the hash cache lives."""
    if os.environ.get("PPCR_CACHE_DIR"):
        return Path(os.environ["PPCR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ppcr"


def _version(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a broken one: hashing again is always correct


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the hash is still right, only not remembered


def sha256_uncached(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of the file at ``path``, from the cache when this version of the file was hashed before."""
    resolved = Path(path).resolve()
    version = _version(resolved.stat())
    cache_file = cache_dir() / CACHE_NAME
    cache = _read_cache(cache_file)
    entry = cache.get(str(resolved))
    if isinstance(entry, dict) and entry.get("version") == version and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = sha256_uncached(resolved)
    if _version(resolved.stat()) != version:  # written to while it was read: the hash is of no one version
        raise OSError(f"{resolved} changed while it was being hashed; hash it again when nothing writes to it")
    cache = _read_cache(cache_file)  # re-read: another process may have added entries meanwhile
    cache[str(resolved)] = {"version": version, "sha256": digest}
    _write_cache(cache_file, cache)
    return digest

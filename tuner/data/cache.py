"""Decode-once image cache: uint8 arrays on disk, memory-mapped on every later use.

A cache entry is keyed by the source's content fingerprint, the block (split),
the image size and the channel count, so every trial, every epoch and every
later run of any study on the same data reads the decoded pixels straight from
disk. Entries are written to a temporary file and renamed, so an interrupted
run never leaves a half-written entry behind, and each has a record of its size
and checksum beside it, so one cut short or changed later is noticed and built again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: each entry's sidecar records its size and checksum


def cache_key(**parts: object) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _digest(path: Path) -> str:
    digest = hashlib.blake2b()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _damage(path: Path, sidecar: Path) -> str | None:
    """Why the entry cannot be trusted (cut short, changed, its record missing), or None if it is whole."""
    try:
        record = json.loads(sidecar.read_text())
        size = path.stat().st_size
    except (OSError, ValueError) as err:
        return f"its record {sidecar.name} is unreadable ({err})"
    if record.get("bytes") != size:
        return f"it has {size} bytes where {record.get('bytes')} were written"
    if record.get("blake2b") != _digest(path):
        return "its checksum does not match"
    return None


def cached_array(
    cache_dir: Path, key: str, build: Callable[[], np.ndarray], *, describe: str = "", action: str = "decoding"
) -> tuple[np.ndarray, bool]:
    """Return ``(array, hit)``: the memory-mapped entry for ``key``, building and storing it on a miss.

    An entry whose size or checksum differs from its record (a copy cut short, a quota hit mid-write)
    is built again, with a warning. If the entry cannot be written (a full disk, a read-only folder),
    the array built in memory is used this time, with a warning naming the path."""
    path = cache_dir / f"{key}.npy"
    sidecar = path.with_suffix(".json")
    if path.exists():
        damage = _damage(path, sidecar)
        if damage is None:
            log.debug("cache hit %s (%s)", path, describe)
            return np.load(path, mmap_mode="r"), True
        log.warning("the cache entry %s is damaged (%s); %s it again", path, damage, action)
    else:
        log.info("%s %s once into the cache %s", action, describe or key, path)
    array = build()
    try:
        _store(array, path, sidecar, describe)
    except OSError as err:
        log.warning(
            "could not write the cache entry %s (%s); using the images in memory this time", path, err.strerror or err
        )
        return array, False
    return np.load(path, mmap_mode="r"), False


def _store(array: np.ndarray, path: Path, sidecar: Path, describe: str) -> None:
    """Entry and record, each written whole or not at all; the record first, so an entry that exists has one
    (parallel workers may race here, and either copy is the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp_record = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            np.save(fh, array)
        record = {
            "describe": describe,
            "shape": list(array.shape),
            "bytes": tmp.stat().st_size,
            "blake2b": _digest(tmp),
        }
        tmp_record.write_text(json.dumps(record))
        os.replace(tmp_record, sidecar)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_record.unlink(missing_ok=True)

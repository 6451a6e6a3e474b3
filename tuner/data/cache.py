"""Decode-once image cache: uint8 arrays on disk, memory-mapped on every later use.

A cache entry is keyed by the source's content fingerprint, the block (split),
the image size and the channel count, so every trial, every epoch and every
later run of any study on the same data reads the decoded pixels straight from
disk. Entries are written to a temporary file and renamed, so an interrupted
run never leaves a half-written entry behind.
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

CACHE_FORMAT = 1


def cache_key(**parts: object) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cached_array(
    cache_dir: Path, key: str, build: Callable[[], np.ndarray], *, describe: str = "", action: str = "decoding"
) -> tuple[np.ndarray, bool]:
    """Return ``(array, hit)``: the memory-mapped entry for ``key``, building and storing it on a miss."""
    path = cache_dir / f"{key}.npy"
    if path.exists():
        log.debug("cache hit %s (%s)", path, describe)
        return np.load(path, mmap_mode="r"), True
    log.info("%s %s once into the cache %s", action, describe or key, path)
    array = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)  # atomic: parallel workers may race here, and either copy is the same
    finally:
        tmp.unlink(missing_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"describe": describe, "shape": list(array.shape)}))
    return np.load(path, mmap_mode="r"), False

"""Data sources: where images and labels come from, before any decoding.

A source lists its items in *blocks*: ``train`` / ``val`` / ``test`` when the
source defines its splits (MedMNIST ``.npz``, ``root/{train,val,test}/<class>``,
a CSV ``split`` column), or one ``all`` block that ``tuner`` splits itself.
Blocks decode lazily, so a block that is not asked for (the test block during
``optimize``) is neither decoded nor are its labels read.

Supported: an image folder, a CSV manifest (``path,label[,group][,split]`` by
default; other column names via :class:`CsvColumns`), a MedMNIST-style ``.npz``
and the built-in ``synthetic`` set. A manifest may also carry a per-item tag
(e.g. annotator agreement) by which hard training examples can be left out.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from tuner.data import synthetic
from tuner.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
SPLITS = ("train", "val", "test")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")

# decode(image_size, channels) -> uint8 array N×C×S×S
Decoder = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Block:
    """Items of one split (or ``all``): raw label strings, optional groups, a lazy decoder."""

    name: str
    labels: tuple[str, ...]
    groups: tuple[str, ...] | None
    decode: Decoder
    natural_channels: int
    tags: tuple[str, ...] | None = None  # the manifest's hard-example column, when one is named


@dataclass(frozen=True)
class CsvColumns:
    """Which manifest columns hold what; ``image_dir`` is where paths are relative to (default: the CSV's folder)."""

    path: str = "path"
    label: str = "label"
    split: str = "split"
    group: str | None = None
    tag: str | None = None
    image_dir: str = ""


@dataclass(frozen=True)
class Source:
    kind: str
    description: str
    fingerprint: str
    blocks: Callable[[bool], list[Block]]  # include_test -> blocks


# ------------------------------------------------------------------ decoding


def _decode_file(path: Path, size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            # JPEG draft mode decodes at a reduced scale directly: much faster for large photos.
            img.draft("L" if channels == 1 else "RGB", (size, size))
            return decode_image(img, size, channels)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def decode_image(img: Image.Image, size: int, channels: int) -> np.ndarray:
    """A PIL image as C×size×size uint8, converted and resized as every image tuner decodes."""
    img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def decode_files(paths: list[Path], size: int, channels: int) -> np.ndarray:
    """Decode and resize image files in parallel threads (PIL releases the GIL while decoding)."""
    out = np.empty((len(paths), channels, size, size), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(lambda p: _decode_file(p, size, channels), paths)):
            out[i] = arr
    return out


def _file_channels(path: Path) -> int:
    try:
        with Image.open(path) as img:
            return 1 if img.mode in GREY_MODES else 3
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot decode image {path}: {err}") from None


def resize_array(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """N×H×W or N×H×W×C uint8 -> N×C×S×S uint8 (antialiased bilinear; a no-op when the size matches)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != channels:
        x = x.expand(-1, 3, -1, -1) if channels == 3 else x.float().mean(1, keepdim=True).round().to(torch.uint8)
    if x.shape[-1] != size or x.shape[-2] != size:
        chunks = [
            F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            for c in x.split(1024)
        ]
        x = torch.cat(chunks)
    return x.contiguous().numpy()


def _files_fingerprint(paths: list[Path], extra: bytes = b"") -> str:
    """Content key of a set of files: their paths, sizes and modification times."""
    digest = hashlib.sha256(extra)
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:20]


# ------------------------------------------------------------------ sources


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _file_block(
    name: str,
    paths: list[Path],
    labels: list[str],
    groups: list[str] | None = None,
    tags: list[str] | None = None,
) -> Block:
    return Block(
        name=name,
        labels=tuple(labels),
        groups=tuple(groups) if groups is not None else None,
        decode=lambda size, channels: decode_files(paths, size, channels),
        natural_channels=_file_channels(paths[0]),
        tags=tuple(tags) if tags is not None else None,
    )


def _class_folders(root: Path) -> list[tuple[str, list[Path]]]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    out = []
    for folder in classes:
        files = _list_images(folder)
        if not files:
            raise DataError(f"class folder {folder} has no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
        out.append((folder.name, files))
    if len(out) < 2:
        found = ", ".join(name for name, _ in out) or "none"
        raise DataError(f"image folder {root} must hold one sub-folder per class, at least two, but found: {found}")
    return out


def folder_source(root: Path) -> Source:
    """``root/<class>/*`` or ``root/{train,val,test}/<class>/*``."""
    has_splits = (root / "train").is_dir()
    split_roots = {s: root / s for s in SPLITS if (root / s).is_dir()} if has_splits else {"all": root}
    if has_splits:
        # The test folder is fingerprinted by its file list only; its images are decoded only when asked for.
        all_files = [f for r in split_roots.values() for f in _list_images(r)]
    else:
        all_files = _list_images(root)
    if not all_files:
        raise DataError(f"image folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def blocks(include_test: bool) -> list[Block]:
        out = []
        for name, split_root in split_roots.items():
            if name == "test" and not include_test:
                continue
            pairs = [(cls, f) for cls, files in _class_folders(split_root) for f in files]
            out.append(_file_block(name, [f for _, f in pairs], [c for c, _ in pairs]))
        return out

    return Source("folder", f"image folder {root}", _files_fingerprint(all_files), blocks)


_SPLIT = "\0split"  # the normalised split of a manifest row, under a key no CSV header can have


def csv_source(path: Path, columns: CsvColumns = CsvColumns()) -> Source:
    """A manifest with a path and a label column, and optionally group, split and tag columns."""
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read CSV manifest {path}: {err}") from None
    found = list(rows[0]) if rows else []
    group = columns.group or ("group" if "group" in found else None)
    required = [columns.path, columns.label] + [c for c in (group, columns.tag) if c]
    missing = [c for c in required if c not in found]
    if missing or not rows:
        raise DataError(
            f"CSV manifest {path} must have columns {', '.join(required)}[, {columns.split}], "
            f"but {'it is empty' if not rows else 'is missing ' + ', '.join(missing) + '; found ' + ', '.join(found)}"
        )
    base = path.parent / columns.image_dir
    has_split = columns.split in found
    for i, row in enumerate(rows, start=2):
        row[_SPLIT] = row[columns.split].strip().lower() if has_split else "all"
        if has_split and row[_SPLIT] not in SPLITS:
            raise DataError(
                f"{path}, line {i}: {columns.split} must be one of {', '.join(SPLITS)}, "
                f"but got {columns.split}={row[columns.split]!r}"
            )
        file = base / row[columns.path]
        if not file.is_file():
            raise DataError(f"{path}, line {i}: image {file} does not exist")

    def blocks(include_test: bool) -> list[Block]:
        names = [s for s in SPLITS if any(r[_SPLIT] == s for r in rows)] if has_split else ["all"]
        out = []
        for name in names:
            if name == "test" and not include_test:
                continue
            chosen = [r for r in rows if r[_SPLIT] == name]
            out.append(
                _file_block(
                    name,
                    [base / r[columns.path] for r in chosen],
                    [r[columns.label] for r in chosen],
                    [r[group] for r in chosen] if group else None,
                    [r[columns.tag] for r in chosen] if columns.tag else None,
                )
            )
        return out

    fingerprint = _files_fingerprint([base / r[columns.path] for r in rows], extra=path.read_bytes())
    return Source("csv", f"CSV manifest {path}", fingerprint, blocks)


def labelled_folder_source(root: Path, label: str) -> Source:
    """Every image under ``root`` (any depth), all of class ``label``: e.g. a folder of synthetic lesions."""
    files = _list_images(root)
    if not files:
        raise DataError(f"image folder {root} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")

    def blocks(include_test: bool) -> list[Block]:
        return [_file_block("all", files, [label] * len(files))]

    return Source("folder", f"image folder {root} (all {label})", _files_fingerprint(files, label.encode()), blocks)


def npz_source(path: Path) -> Source:
    """MedMNIST layout: ``{train,val,test}_images`` (N×H×W[×C] uint8) and ``…_labels`` (N or N×1)."""
    try:
        archive = np.load(path, allow_pickle=False)
        keys = set(archive.files)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {path} as a NumPy .npz archive: {err}") from None
    names = [s for s in SPLITS if f"{s}_images" in keys or f"{s}_labels" in keys]
    for name in names:
        if f"{name}_images" not in keys or f"{name}_labels" not in keys:
            raise DataError(
                f"{path} has {name}_images or {name}_labels but not both; keys found: {', '.join(sorted(keys))}"
            )
    if "train" not in names:
        raise DataError(
            f"{path} must hold train_images and train_labels (and optionally val_… and test_…), "
            f"but its keys are: {', '.join(sorted(keys)) or 'none'}"
        )

    def block(name: str) -> Block:
        labels = archive[f"{name}_labels"]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataError(
                f"{path}: {name}_labels must be one label per image (N or N×1), but got shape {labels.shape}"
            )
        shape = archive[f"{name}_images"].shape if name == "train" else None
        natural = 3 if shape is not None and len(shape) == 4 and shape[-1] == 3 else 1

        def decode(size: int, channels: int) -> np.ndarray:
            images = archive[f"{name}_images"]
            if images.ndim not in (3, 4) or len(images) != len(labels):
                raise DataError(
                    f"{path}: {name}_images must be N×H×W or N×H×W×C for {len(labels)} labels, but got {images.shape}"
                )
            return resize_array(images, size, channels)

        return Block(name, tuple(str(int(v)) for v in labels), None, decode, natural)

    def blocks(include_test: bool) -> list[Block]:
        return [block(name) for name in names if include_test or name != "test"]

    return Source("npz", f"NumPy archive {path}", _file_digest(path), blocks)


def synthetic_source(*, n_images: int = 2000, minority_fraction: float = 0.09, seed: int = 0) -> Source:
    params = f"v{synthetic.GENERATOR_VERSION}-{n_images}-{minority_fraction}-{seed}"

    def decode(size: int, channels: int) -> np.ndarray:
        images, _ = synthetic.make_synthetic(n_images, image_size=size, minority_fraction=minority_fraction, seed=seed)
        return images if channels == 3 else resize_array(images.transpose(0, 2, 3, 1), size, 1)

    def blocks(include_test: bool) -> list[Block]:
        labels = synthetic.synthetic_labels(n_images, minority_fraction=minority_fraction, seed=seed)
        names = tuple(synthetic.CLASS_NAMES[int(v)] for v in labels)
        return [Block("all", names, None, decode, 3)]

    return Source(
        "synthetic",
        f"built-in synthetic skin lesions ({params})",
        hashlib.sha256(params.encode()).hexdigest()[:20],
        blocks,
    )


def open_source(
    source: str,
    *,
    columns: CsvColumns = CsvColumns(),
    synthetic_options: dict | None = None,
) -> Source:
    """Pick the source by what ``source`` names: ``synthetic``, a ``.npz``, a ``.csv`` or a folder."""
    for key, column in (("group_column", columns.group), ("hard_example_column", columns.tag)):
        if column and not source.lower().endswith(".csv"):
            raise DataError(f"{key}={column!r} needs a CSV manifest with that column, but the source is {source}")
    if source == "synthetic":
        return synthetic_source(**(synthetic_options or {}))
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source} does not exist; expected an image folder, a .csv manifest, a .npz file or 'synthetic'"
        )
    if path.is_dir():
        return folder_source(path)
    if path.suffix.lower() == ".npz":
        return npz_source(path)
    if path.suffix.lower() == ".csv":
        return csv_source(path, columns)
    raise DataError(f"data source {source} must be an image folder, a .csv manifest or a .npz file")

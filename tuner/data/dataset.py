"""From a source to decoded, split, labelled arrays: what a trial trains on.

``load_dataset`` decodes each block once into the cache, applies label aliases,
assigns splits (or honours the source's own) and returns the train and
validation splits, plus the test split only when asked (refit, evaluate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tuner.data.cache import cache_key, cached_array
from tuner.data.sources import Block, CsvColumns, Source, labelled_folder_source, open_source
from tuner.data.splits import assign_splits
from tuner.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 N×C×H×W
    labels: np.ndarray  # int64 class indices
    groups: np.ndarray | None = None
    tags: np.ndarray | None = None  # the manifest's hard-example column, as strings

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


@dataclass(frozen=True)
class Dataset:
    class_names: tuple[str, ...]
    train: Split
    val: Split
    test: Split | None
    positive_index: int | None  # binary: the class whose recall/precision/AUROC are reported
    channels: int
    image_size: int
    description: str
    fingerprint: str
    cache_hits: dict[str, bool] = field(default_factory=dict)
    extra: Split | None = None  # extra training-only images (data.extra_train), never validated or tested on

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _natural_key(label: str) -> tuple[int, int | str]:
    return (0, int(label)) if label.isdigit() else (1, label)


def _decoded(block: Block, fingerprint: str, size: int, channels: int, cache_dir: Path) -> tuple[np.ndarray, bool]:
    key = cache_key(source=fingerprint, block=block.name, size=size, channels=channels)
    images, hit = cached_array(
        cache_dir,
        key,
        lambda: block.decode(size, channels),
        # "all": a source without its own splits, split later: "2000 images", not "2000 all images"
        describe=f"{len(block.labels)} {'' if block.name == 'all' else block.name + ' '}images at {size}px",
    )
    if len(images) != len(block.labels):
        raise DataError(
            f"the cached {block.name} images ({len(images)}) do not match the source's {len(block.labels)} labels"
        )
    return images, hit


def load_dataset(
    source: str,
    *,
    image_size: int,
    channels: int | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    columns: CsvColumns = CsvColumns(),
    label_aliases: dict[str, str] | None = None,
    positive_class: str | None = None,
    synthetic_options: dict | None = None,
    extra_train: tuple[str, str | None] | None = None,
    cache_dir: Path = Path("studies/cache"),
    include_test: bool = False,
) -> Dataset:
    """Load, decode once, split. The test split is only read with ``include_test=True``.

    ``extra_train`` is ``(source, label)``: images that may join training only (e.g. synthetic
    minority images); with a label, every image under that folder has that class.
    """
    src = open_source(source, columns=columns, synthetic_options=synthetic_options)
    blocks = {b.name: b for b in src.blocks(include_test)}
    channels = channels or next(iter(blocks.values())).natural_channels
    aliases = label_aliases or {}
    hits: dict[str, bool] = {}
    parts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
    for name, block in blocks.items():
        images, hits[name] = _decoded(block, src.fingerprint, image_size, channels, cache_dir)
        labels = np.array([aliases.get(v, v) for v in block.labels], dtype=object)
        groups = np.array(block.groups, dtype=object) if block.groups is not None else None
        tags = np.array(block.tags, dtype=object) if block.tags is not None else None
        parts[name] = (images, labels, groups, tags)

    # Sources without their own splits get seeded, stratified (grouped) ones; a source with
    # train but no val gets its val carved out of train the same way.
    if "all" in parts or "val" not in parts:
        whole = "all" if "all" in parts else "train"
        images, labels, groups, tags = parts.pop(whole)
        test_share = test_fraction if whole == "all" else None
        split = assign_splits(labels, groups, val_fraction=val_fraction, test_fraction=test_share, seed=split_seed)
        for name in ("train", "val", "test"):
            mask = split == name
            if mask.any() and (name != "test" or include_test):
                parts[name] = (
                    np.asarray(images[mask]),
                    labels[mask],
                    None if groups is None else groups[mask],
                    None if tags is None else tags[mask],
                )

    class_names = tuple(sorted(set(parts["train"][1]) | set(parts["val"][1]), key=_natural_key))
    if len(class_names) < 2:
        raise DataError(
            f"{src.description} has only one class ({', '.join(class_names)}); a classifier needs at least two"
        )
    index = {name: i for i, name in enumerate(class_names)}
    splits: dict[str, Split] = {}
    for name, (images, labels, groups, tags) in parts.items():
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(
                f"the {name} split of {src.description} has classes not seen in training: {', '.join(unknown)}"
            )
        splits[name] = Split(np.asarray(images), np.array([index[v] for v in labels], dtype=np.int64), groups, tags)
    extra = None
    if extra_train is not None:
        extra, hits["extra_train"] = _extra_split(*extra_train, index, image_size, channels, aliases, cache_dir)

    positive_index = None
    if positive_class is not None:
        if positive_class not in index:
            raise DataError(
                f"positive_class must be one of the classes {', '.join(class_names)}, but got positive_class={positive_class!r}"
            )
        positive_index = index[positive_class]
    elif len(class_names) == 2:
        positive_index = int(np.argmin(splits["train"].class_counts(2)))  # the minority class

    return Dataset(
        class_names=class_names,
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        positive_index=positive_index,
        channels=channels,
        image_size=image_size,
        description=src.description,
        fingerprint=src.fingerprint,
        cache_hits=hits,
        extra=extra,
    )


def _decode_blocks(
    src: Source, blocks: list[Block], image_size: int, channels: int, aliases: dict[str, str], cache_dir: Path
) -> tuple[np.ndarray, list[str], np.ndarray | None, bool]:
    """Several blocks as one: images, aliased label names, groups (if every block has them), all cached."""
    images, labels, groups, hit = [], [], [], True
    for block in blocks:
        decoded, block_hit = _decoded(block, src.fingerprint, image_size, channels, cache_dir)
        images.append(np.asarray(decoded))
        labels += [aliases.get(v, v) for v in block.labels]
        groups += list(block.groups) if block.groups is not None else []
        hit = hit and block_hit
    return np.concatenate(images), labels, np.array(groups, dtype=object) if groups else None, hit


def _extra_split(
    source: str,
    label: str | None,
    index: dict[str, int],
    image_size: int,
    channels: int,
    aliases: dict[str, str],
    cache_dir: Path,
) -> tuple[Split, bool]:
    """All images of an extra training source, labelled with the main data's class indices."""
    path = Path(source).expanduser()
    if label is not None:
        if not path.is_dir():
            raise DataError(f"data.extra_train.source {source} must be an image folder when a label is given")
        src = labelled_folder_source(path, label)
    else:
        src = open_source(source)
    images, labels, _, hit = _decode_blocks(src, src.blocks(True), image_size, channels, aliases, cache_dir)
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(
            f"the extra training images in {source} have classes the data set does not: {', '.join(unknown)}; "
            f"its classes are {', '.join(index)}"
        )
    return Split(images, np.array([index[v] for v in labels], dtype=np.int64)), hit


def load_labelled_images(
    source: str,
    *,
    image_size: int,
    channels: int,
    label_aliases: dict[str, str] | None = None,
    columns: CsvColumns = CsvColumns(),
    cache_dir: Path = Path("studies/cache"),
) -> tuple[Split, list[str], str, str]:
    """For evaluating a saved model: the source's own test split if it defines one, else all its images.

    Returns the split (labels index into the returned, sorted label names), those names,
    the source's description and which part was used ("test" or "all").
    """
    src = open_source(source, columns=columns)
    blocks = {b.name: b for b in src.blocks(True)}
    chosen = [blocks["test"]] if "test" in blocks else list(blocks.values())
    images, labels, groups, _ = _decode_blocks(src, chosen, image_size, channels, label_aliases or {}, cache_dir)
    names = sorted(set(labels), key=_natural_key)
    index = {name: i for i, name in enumerate(names)}
    split = Split(images, np.array([index[v] for v in labels], dtype=np.int64), groups)
    return split, names, src.description, "test" if "test" in blocks else "all"

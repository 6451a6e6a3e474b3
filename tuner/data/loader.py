"""Batches straight from a uint8 tensor that lives on the training device.

Small data sets (a few thousand images) fit in GPU memory many times over, so
the decoded pixels are moved there once; each batch is then an index, a
conversion to float, the batched augmentation and a normalisation, all on the
device. No DataLoader workers, no per-image Python, no host-to-device copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from tuner.data.augment import BatchAugment


@dataclass(frozen=True)
class Normalize:
    """Per-channel ``(x / 255 - mean) / std`` for pixel values in [0, 255]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` in place (a fresh batch the caller owns)."""
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return x.mul_(1 / (255 * std)).add_(-mean / std)  # in place: far faster than addcmul(out=x) on CPU


@dataclass(frozen=True)
class TensorSplit:
    """One split's images (uint8, N×C×H×W) and labels (int64), on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray, device: torch.device) -> TensorSplit:
        # A copy: the cache is a read-only memory map, and torch wants writable memory.
        x = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(device)
        y = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        return cls(x, y)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, indices: np.ndarray) -> TensorSplit:
        idx = torch.from_numpy(indices).to(self.images.device)
        return TensorSplit(torch.index_select(self.images, 0, idx), torch.index_select(self.labels, 0, idx))

    def join(self, other: TensorSplit) -> TensorSplit:
        return TensorSplit(torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]))


def iterate_batches(
    split: TensorSplit,
    indices: torch.Tensor,
    batch_size: int,
    *,
    normalize: Normalize | None,
    augment: BatchAugment | None = None,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` in the order of ``indices`` (already shuffled or resampled by the caller).
    ``normalize=None``: the rows are features already (cached-feature trials), used as they are."""
    indices = indices.to(split.images.device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        # index_select: several times faster than advanced indexing on CPU. Pixel values stay 0..255.
        x = torch.index_select(split.images, 0, idx).to(torch.float32)
        if augment is not None and augment.active:
            assert generator is not None, "augmentation needs a generator"
            x = augment(x, generator)
        if normalize is not None:
            x = normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, torch.index_select(split.labels, 0, idx)

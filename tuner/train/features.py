"""Cached-feature trials: a frozen pretrained backbone, fed the same images without train-time
augmentation, computes the same features in every epoch of every trial.

Such trials compute each image's features once per (images, backbone, weights, image size,
normalisation, precision), keep them in the disk cache beside the decoded pixels, and train only
the head on them: the same training as the full path (same batches, same head, same loss), in a
fraction of the time. A trial is eligible when nothing changes a training image between epochs or
trials: ``freeze_backbone: true``, pretrained weights, ``augment: none``, no mixup/cutmix, and no
per-trial images (``drop_hard``, ``extra_ratio``, SMOTE/ADASYN); others take the full path.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuner.data import SYNTHESIZING, Normalize, TensorSplit, cache_key, cached_array, iterate_batches
from tuner.train.hparams import Hyperparameters
from tuner.train.loop import autocast
from tuner.train.weights import resolve_pretrained


def uses_cached_features(hparams: Hyperparameters) -> bool:
    """Whether every epoch of this trial would feed the frozen backbone exactly the same images."""
    return (
        hparams.freeze_backbone
        and hparams.pretrained is not False  # a random frozen backbone differs with every seed
        and hparams.augment == "none"
        and hparams.mixup_alpha == 0
        and hparams.cutmix_alpha == 0
        and not hparams.drop_hard
        and hparams.extra_ratio == 0
        and hparams.imbalance not in SYNTHESIZING
    )


def _weights_identity(hparams: Hyperparameters) -> str:
    """The weights file the backbone came from, as path, size and modification time."""
    path = resolve_pretrained(hparams.model, hparams.pretrained)
    if path is None:
        return "none"
    stat = os.stat(path)
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


@torch.inference_mode()
def embed(
    backbone: nn.Module,
    split: TensorSplit,
    *,
    normalize: Normalize,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
) -> torch.Tensor:
    """The backbone's features of every image of ``split`` (eval mode, in order), as float32."""
    backbone.eval()
    device = split.images.device
    out = []
    for x, _ in iterate_batches(
        split, torch.arange(len(split)), batch_size, normalize=normalize, channels_last=channels_last
    ):
        with autocast(device, amp_dtype):
            out.append(backbone(x).float())
    return torch.cat(out)


def cached_features(
    backbone: nn.Module,
    split: TensorSplit,
    hparams: Hyperparameters,
    *,
    normalize: Normalize,
    cache_dir: Path | None,
    batch_size: int,
    amp_dtype: torch.dtype | None,
    channels_last: bool,
    describe: str,
) -> TensorSplit:
    """``split`` with each image replaced by its features, from the disk cache when they were computed
    before (``cache_dir=None``: computed now, kept nowhere)."""

    def compute() -> np.ndarray:
        features = embed(
            backbone,
            split,
            normalize=normalize,
            batch_size=batch_size,
            amp_dtype=amp_dtype,
            channels_last=channels_last,
        )
        return features.cpu().numpy()

    if cache_dir is None:
        array = compute()
    else:
        key = cache_key(
            kind="features",
            images=hashlib.sha256(split.images.cpu().numpy().tobytes()).hexdigest(),
            shape=list(split.images.shape),
            model=hparams.model,
            weights=_weights_identity(hparams),
            drop_path=hparams.drop_path,  # eval mode ignores it; kept so the key states the whole backbone
            mean=list(normalize.mean),
            std=list(normalize.std),
            amp=str(amp_dtype),  # the cache key keeps its name: entries stay valid
        )
        array, _ = cached_array(
            cache_dir, key, compute, describe=f"{describe} ({hparams.model})", action="computing features of"
        )
    return TensorSplit(torch.from_numpy(np.array(array)).to(split.images.device), split.labels)

"""A built-in, procedurally drawn skin-lesion data set (no files, no downloads).

Benign lesions are round, smooth-bordered and of one colour; malignant ones are
asymmetric, with an irregular, blurred border and several colours: the ABCD
cues dermatologists use. Every cue is driven by a hidden "malignancy" score
whose distributions overlap between the classes, and each image also carries
skin-tone variation, shading, hairs and noise, so the task is learnable but not
trivially separable (a tuned small CNN reaches a validation AUROC around 0.9;
see the README). Deterministic for a given seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("benign", "malignant")
GENERATOR_VERSION = 2

_SKIN = torch.tensor([[0.93, 0.78, 0.66], [0.80, 0.62, 0.48], [0.62, 0.44, 0.32]])
_LESION = torch.tensor(
    [
        [0.45, 0.28, 0.18],  # brown
        [0.25, 0.14, 0.09],  # dark brown
        [0.08, 0.06, 0.07],  # black
        [0.35, 0.40, 0.55],  # blue-grey
        [0.65, 0.25, 0.22],  # red
    ]
)


def _smooth_noise(n: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = torch.rand(n, 1, cells, cells, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)[:, 0]


def _draw(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    n = labels.numel()
    rand = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    malignant = labels.float()
    # The hidden score that drives every cue; the classes overlap on it.
    score = (0.25 + 0.40 * malignant + 0.15 * torch.randn(n, generator=generator)).clamp(0, 1)

    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cx = (rand(n) - 0.5) * 0.3
    cy = (rand(n) - 0.5) * 0.3
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rho = torch.sqrt(dx**2 + dy**2)
    theta = torch.atan2(dy, dx)

    # Border: radius as a sum of harmonics. Low ones (asymmetry) and high ones (irregularity) grow with the score.
    radius = 0.35 + 0.25 * rand(n)
    border = torch.ones(n, size, size)
    for k in range(1, 13):
        scale = 0.22 * score * (0.4 + rand(n)) if k <= 3 else 0.10 * score**1.5 * rand(n)
        if k == 2:
            scale = scale + 0.08 * rand(n)  # benign lesions may be elliptical, but stay symmetric
        phase = rand(n) * 2 * math.pi
        border = border + scale[:, None, None] * torch.cos(k * theta + phase[:, None, None])
    softness = 0.01 + 0.06 * score * rand(n)
    mask = torch.sigmoid((radius[:, None, None] * border - rho) / softness[:, None, None])

    # Colour: one base tone; more tones blotched in as the score rises.
    base = _LESION[torch.randint(0, 2, (n,), generator=generator)]
    colour = base[:, :, None, None].expand(n, 3, size, size).clone()
    for _ in range(2):
        other = _LESION[torch.randint(1, len(_LESION), (n,), generator=generator)]
        blotch = _smooth_noise(n, size, 5, generator)
        weight = ((blotch - 0.55) * 6).clamp(0, 1) * (score * 1.4 - 0.25 + 0.2 * rand(n)).clamp(0, 1)[:, None, None]
        colour = colour + weight[:, None] * (other[:, :, None, None] - colour)
    colour = colour * (0.85 + 0.3 * _smooth_noise(n, size, 6, generator))[:, None]

    # Skin: a random tone with shading, then hairs and sensor noise on top of everything.
    tone = rand(n)[:, None]
    skin = torch.where(
        tone < 0.5, _SKIN[0] + (_SKIN[1] - _SKIN[0]) * tone * 2, _SKIN[1] + (_SKIN[2] - _SKIN[1]) * (tone - 0.5) * 2
    )
    shade = 0.85 + 0.3 * _smooth_noise(n, size, 3, generator)
    image = skin[:, :, None, None] * shade[:, None] * (1 - mask[:, None]) + colour * mask[:, None]
    for _ in range(3):
        present = (rand(n) < 0.35).float()
        angle = rand(n) * math.pi
        offset = (rand(n) - 0.5) * 1.6
        dist = (xx[None] * torch.sin(angle)[:, None, None] - yy[None] * torch.cos(angle)[:, None, None]) - offset[
            :, None, None
        ]
        hair = torch.exp(-((dist / 0.015) ** 2)) * present[:, None, None]
        image = image * (1 - 0.7 * hair[:, None])
    image = image + 0.04 * torch.randn(image.shape, generator=generator)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def _labels(n_images: int, minority_fraction: float, generator: torch.Generator) -> torch.Tensor:
    n_malignant = max(2, round(n_images * minority_fraction))
    labels = torch.zeros(n_images, dtype=torch.int64)
    labels[torch.randperm(n_images, generator=generator)[:n_malignant]] = 1
    return labels


def synthetic_labels(n_images: int = 2000, *, minority_fraction: float = 0.09, seed: int = 0) -> np.ndarray:
    """The labels :func:`make_synthetic` gives for these settings, without drawing any image."""
    return _labels(n_images, minority_fraction, torch.Generator().manual_seed(seed)).numpy()


def make_synthetic(
    n_images: int = 2000, *, image_size: int = 64, minority_fraction: float = 0.09, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: uint8 N×3×S×S and int64 labels (1 = malignant)."""
    generator = torch.Generator().manual_seed(seed)
    labels = _labels(n_images, minority_fraction, generator)
    chunks = [_draw(labels[i : i + 256], image_size, generator) for i in range(0, n_images, 256)]
    return torch.cat(chunks).numpy(), labels.numpy()

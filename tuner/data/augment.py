"""Batched augmentation on the training device, with random parameters per sample.

torchvision's transforms draw one set of parameters per call, so applying them
to a whole batch would rotate every image by the same angle. Here each sample
gets its own flip, rotation, scale, translation, shear and perspective, composed
into one 3×3 matrix (output -> input coordinates); a single ``grid_sample`` call
then warps the whole batch. ``choice`` gives each sample one of several
transforms, like torchvision's ``RandomChoice``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    hflip: float = 0.0  # probability
    vflip: float = 0.0  # probability
    rotation: float = 0.0  # degrees, uniform in [-rotation, rotation]
    expand: bool = False  # zoom a rotated image out until its corners fit (torchvision's expand=True, resized back)
    scale: float = 0.0  # zoom uniform in [1 - scale, 1 + scale]
    translate: float = 0.0  # fraction of the image size
    shear: float = 0.0  # degrees
    perspective: float = 0.0  # torchvision's RandomPerspective distortion_scale
    perspective_p: float = 0.5  # probability of a perspective warp
    choice: tuple[AugmentConfig, ...] = ()  # each sample also gets one of these, drawn uniformly
    brightness: float = 0.0  # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.0  # factor uniform in [1 - c, 1 + c]
    interpolation: str = "bilinear"  # or "nearest" (torchvision's RandomRotation default)

    @property
    def geometric(self) -> bool:
        return bool(self.rotation or self.scale or self.translate or self.shear or self.perspective or self.choice)


_AFFINE = AugmentConfig(rotation=15.0, scale=0.1, translate=0.1, shear=5.0)
_ROTATE_EXPAND = AugmentConfig(rotation=180.0, expand=True)
_PERSPECTIVE = AugmentConfig(perspective=0.5)

AUGMENT_PRESETS: dict[str, AugmentConfig] = {
    "none": AugmentConfig(),
    "hflip": AugmentConfig(hflip=0.5),
    "flip": AugmentConfig(hflip=0.5, vflip=0.5),
    "flip_rotate": AugmentConfig(hflip=0.5, vflip=0.5, rotation=20.0),
    "affine": replace(_AFFINE, hflip=0.5),
    "light": AugmentConfig(hflip=0.5, rotation=10.0, scale=0.05, translate=0.05, brightness=0.1, contrast=0.1),
    "rotate180": AugmentConfig(hflip=0.5, vflip=0.5, rotation=180.0),
    "rotate180_expand": _ROTATE_EXPAND,
    "perspective": _PERSPECTIVE,
    # TrivialAugment's idea (Müller & Hutter 2021) kept to what suits grey medical images: flips, then ONE
    # geometric op per image at a uniform random strength (or none), plus mild brightness and contrast;
    # no colour, solarize or posterize ops.
    "trivial": AugmentConfig(
        hflip=0.5,
        vflip=0.5,
        brightness=0.2,
        contrast=0.2,
        choice=(
            AugmentConfig(),
            AugmentConfig(rotation=30.0),
            AugmentConfig(shear=15.0),
            AugmentConfig(translate=0.15),
            AugmentConfig(scale=0.2),
        ),
    ),
    # flips, then one of: rotation with expansion, a sure perspective warp, an affine warp
    "flip_random_choice": AugmentConfig(
        hflip=0.5, vflip=0.5, choice=(_ROTATE_EXPAND, replace(_PERSPECTIVE, perspective_p=1.0), _AFFINE)
    ),
}


def _uniform(n: int, half_width: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) * 2 - 1) * half_width


def sampling_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (N, C, H, W), align_corners=False)`` by broadcasting: same values,
    several times faster on CPU than its batched matrix product. A 3×3 ``theta`` is a projective
    map (perspective): its third row divides the first two."""
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = ((torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1)[:, None]
    grid = torch.empty(theta.shape[0], height, width, 2, device=theta.device, dtype=theta.dtype)
    t = theta[:, :, :, None, None]
    for axis in (0, 1):
        torch.add(t[:, axis, 0] * xs, t[:, axis, 1] * ys + t[:, axis, 2], out=grid[..., axis])
    if theta.shape[1] == 3:
        grid /= (t[:, 2, 0] * xs + t[:, 2, 1] * ys + t[:, 2, 2])[..., None]
    return grid


def homographies(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """N×3×3 projective maps taking the 4 points ``source[i]`` (N×4×2) to ``target[i]``."""
    x, y = source[..., 0], source[..., 1]
    u, v = target[..., 0], target[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_u = torch.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
    rows_v = torch.stack([zero, zero, zero, x, y, one, -v * x, -v * y], -1)
    h = torch.linalg.solve(torch.cat([rows_u, rows_v], 1), torch.cat([u, v], 1))
    return torch.cat([h, torch.ones_like(h[:, :1])], 1).reshape(-1, 3, 3)


CORNERS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])


def perspective_matrices(n: int, distortion: float, p: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandomPerspective per sample: each corner moves inwards by up to ``distortion``
    of the half-size; the output at the moved corners shows the image's corners."""
    inward = -CORNERS.sign() * torch.rand(n, 4, 2, generator=generator) * distortion
    warp = torch.rand(n, generator=generator) < p
    moved = CORNERS + inward * warp[:, None, None]
    return homographies(moved, CORNERS.expand(n, -1, -1))


def affine_matrices(c: AugmentConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample 2×3 matrices mapping output to input coordinates (as ``affine_grid`` expects)."""
    angle = _uniform(n, math.radians(c.rotation), generator)
    zoom = 1 + _uniform(n, c.scale, generator)
    if c.expand:  # a square rotated by angle needs a canvas |cos| + |sin| times as wide
        zoom = zoom / (angle.cos().abs() + angle.sin().abs())
    shear = torch.tan(_uniform(n, math.radians(c.shear), generator))
    flip_x = torch.where(torch.rand(n, generator=generator) < c.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator) < c.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # rotation @ shear @ (flip / zoom)
    a = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    s = torch.zeros(n, 2, 2)
    s[:, 0, 0], s[:, 0, 1], s[:, 1, 1] = 1.0, shear, 1.0
    d = torch.diag_embed(torch.stack([flip_x, flip_y], -1) / zoom[:, None])
    linear = a @ s @ d
    shift = torch.stack([_uniform(n, 2 * c.translate, generator), _uniform(n, 2 * c.translate, generator)], -1)
    return torch.cat([linear, shift[:, :, None]], dim=2)


def geometric_matrices(c: AugmentConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    bottom = torch.tensor([[[0.0, 0.0, 1.0]]]).expand(n, -1, -1)
    m = torch.cat([affine_matrices(c, n, generator), bottom], 1)
    if c.perspective:
        m = m @ perspective_matrices(n, c.perspective, c.perspective_p, generator)
    if c.choice:
        options = torch.stack([geometric_matrices(o, n, generator) for o in c.choice])
        picked = torch.randint(len(c.choice), (n,), generator=generator)
        m = m @ options[picked, torch.arange(n)]
    return m


class BatchAugment:
    """Callable that augments a float batch ``N×C×H×W`` of pixel values in [0, 255] on its own device."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config

    @classmethod
    def from_name(cls, name: str) -> BatchAugment:
        if name not in AUGMENT_PRESETS:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}, but got augment={name!r}")
        return cls(AUGMENT_PRESETS[name])

    @property
    def active(self) -> bool:
        return self.config != AugmentConfig()

    def affine_matrices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample 2×3 matrices mapping output to input coordinates (as ``affine_grid`` expects)."""
        return affine_matrices(self.config, n, generator)

    def matrices(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Per-sample 3×3 output -> input maps: the affine part, then perspective, then the sample's choice."""
        return geometric_matrices(self.config, n, generator)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        c = self.config
        n = x.shape[0]
        if c.geometric:
            projective = c.perspective or c.choice
            theta = self.matrices(n, generator) if projective else self.affine_matrices(n, generator)
            theta = theta.to(x.device, x.dtype, non_blocking=True)
            grid = sampling_grid(theta, x.shape[-2], x.shape[-1])
            x = F.grid_sample(x, grid, mode=c.interpolation, padding_mode="zeros", align_corners=False)
        elif c.hflip or c.vflip:
            # Flips alone need no resampling: select between the image and its mirror.
            for prob, dim in ((c.hflip, -1), (c.vflip, -2)):
                if prob:
                    flip = (torch.rand(n, generator=generator) < prob).to(x.device, non_blocking=True)
                    x = torch.where(flip[:, None, None, None], x.flip(dim), x)
        if c.brightness or c.contrast:
            gain = (1 + _uniform(n, c.brightness, generator)).to(x.device, x.dtype)[:, None, None, None]
            contrast = (1 + _uniform(n, c.contrast, generator)).to(x.device, x.dtype)[:, None, None, None]
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean) * gain
            x = x.clamp(0, 255)
        return x

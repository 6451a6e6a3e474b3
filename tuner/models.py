"""Model factory: any timm model name, plus small built-in networks.

Every model is a backbone that returns pooled features followed by a head of
optional hidden layers and dropouts, so the head is the same whatever the
backbone: ``build_model("resnet18", num_outputs=2, in_chans=1, hidden_sizes=(512, 128), dropout=0.3)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import timm
import torch
from torch import nn

from tuner.errors import TunerError


class SmallCNN(nn.Module):
    """``depth`` blocks of conv-BN-ReLU-maxpool, channels doubling from ``width``, global average pool."""

    def __init__(self, in_chans: int, *, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i in range(depth):
            out = width * 2**i
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2) if i < depth - 1 else nn.AdaptiveAvgPool2d(1))
            channels = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class PixelMLP(nn.Module):
    """Flattened, normalised pixels; the head adds the hidden layers."""

    def __init__(self, in_chans: int, image_size: int) -> None:
        super().__init__()
        self.num_features = in_chans * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _small_cnn(in_chans: int, image_size: int, width: int, depth: int) -> nn.Module:
    return SmallCNN(in_chans, width=width, depth=depth)


def _mlp(in_chans: int, image_size: int, width: int, depth: int) -> nn.Module:
    return PixelMLP(in_chans, image_size)


BUILTIN_MODELS: dict[str, Callable[[int, int, int, int], nn.Module]] = {
    "small_cnn": _small_cnn,
    "mlp": _mlp,
}


def check_model_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a built-in or a timm model."""
    if name in BUILTIN_MODELS or timm.is_model(name):
        return
    close = timm.list_models(f"*{name[:4]}*")[:8] if len(name) >= 4 else []
    hint = f"; similar timm names: {', '.join(close)}" if close else ""
    raise TunerError(
        f"model must be a built-in ({', '.join(BUILTIN_MODELS)}) or a timm model name, but got model={name!r}{hint}"
    )


class Classifier(nn.Module):
    """Backbone (features) + head. A frozen backbone stays in eval mode (its BatchNorm statistics too)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, *, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_head(
    in_features: int, num_outputs: int, *, hidden_sizes: Sequence[int] = (), dropout: float = 0.0
) -> nn.Module:
    """[dropout, linear, ReLU] per hidden size, then dropout and the output layer."""
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(in_features, size), nn.ReLU(inplace=True)]
        in_features = size
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_features, num_outputs))
    return nn.Sequential(*layers)


def _timm_backbone(name: str, *, in_chans: int, image_size: int, drop_path: float, pretrained: bool) -> nn.Module:
    kwargs = {"num_classes": 0, "in_chans": in_chans, "pretrained": pretrained}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    try:
        # Vision transformers need the input size at construction; CNNs do not accept it.
        return timm.create_model(name, img_size=image_size, **kwargs)
    except TypeError:
        return timm.create_model(name, **kwargs)


def build_model(
    name: str,
    *,
    num_outputs: int,
    in_chans: int,
    image_size: int,
    width: int = 32,
    depth: int = 3,
    hidden_sizes: Sequence[int] = (),
    dropout: float = 0.0,
    drop_path: float = 0.0,
    pretrained: bool = False,
    freeze_backbone: bool = False,
) -> Classifier:
    """Build a classifier with ``num_outputs`` logits."""
    check_model_name(name)
    if name in BUILTIN_MODELS:
        backbone = BUILTIN_MODELS[name](in_chans, image_size, width, depth)
    else:
        backbone = _timm_backbone(
            name, in_chans=in_chans, image_size=image_size, drop_path=drop_path, pretrained=pretrained
        )
    head = build_head(backbone.num_features, num_outputs, hidden_sizes=hidden_sizes, dropout=dropout)
    return Classifier(backbone, head, freeze_backbone=freeze_backbone)

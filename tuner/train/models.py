"""Model factory: any timm or torchvision classification model, plus small built-in networks.

Every model is a backbone that returns pooled features followed by a head of
optional hidden layers and dropouts, so the head is the same whatever the
backbone: ``build_model("resnet18", num_outputs=2, in_chans=1, hidden_sizes=(512, 128), dropout=0.3)``.
A name is looked up among the built-ins, then timm, then torchvision (``alexnet``);
``torchvision/resnet18`` asks for torchvision's model where both have the name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.errors import TunerError
from tuner.train.weights import load_by_order, read_state_dict, resolve_pretrained, tensor_names

# timm and torchvision are imported where a model of theirs is asked for: importing them takes seconds
# (torchvision pulls in torch's compiler stack), which every worker and every small-CNN study would pay.

POOLINGS = ("avg", "max", "flatten")


class SmallCNN(nn.Module):
    """``depth`` blocks of conv-[BN-]ReLU-maxpool, channels doubling from ``width``, then a global
    average or max pool, or (``flatten``) the last block's whole feature map, as classic CNNs do."""

    def __init__(
        self,
        in_chans: int,
        *,
        width: int = 32,
        depth: int = 3,
        batch_norm: bool = True,
        pooling: str = "avg",
        image_size: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for i in range(depth):
            out = width * 2**i
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]
            if i < depth - 1 or pooling == "flatten":
                layers.append(nn.MaxPool2d(2))
            channels = out
        if pooling == "flatten":
            side = image_size // 2**depth
            if side < 1:
                raise TunerError(f"pooling=flatten: {depth} blocks halve {image_size} px to nothing; use fewer blocks")
            self.num_features = channels * side * side
        else:
            layers.append(nn.AdaptiveAvgPool2d(1) if pooling == "avg" else nn.AdaptiveMaxPool2d(1))
            self.num_features = channels
        self.features = nn.Sequential(*layers, nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class PixelMLP(nn.Module):
    """Flattened, normalised pixels; the head adds the hidden layers."""

    def __init__(self, in_chans: int, image_size: int) -> None:
        super().__init__()
        self.num_features = in_chans * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _small_cnn(in_chans: int, image_size: int, *, width: int, depth: int, batch_norm: bool, pooling: str) -> nn.Module:
    return SmallCNN(in_chans, width=width, depth=depth, batch_norm=batch_norm, pooling=pooling, image_size=image_size)


def _mlp(in_chans: int, image_size: int, **_: object) -> nn.Module:
    return PixelMLP(in_chans, image_size)


BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": _small_cnn,
    "mlp": _mlp,
}
TORCHVISION_PREFIX = "torchvision/"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_name(name: str) -> str | None:
    """The torchvision classification model ``name`` stands for, if timm does not have it first."""
    if name in BUILTIN_MODELS:
        return None
    import timm
    import torchvision

    if name.startswith(TORCHVISION_PREFIX):
        name = name[len(TORCHVISION_PREFIX) :]
    elif timm.is_model(name):
        return None
    return name if name in torchvision.models.list_models(module=torchvision.models) else None


def check_model_name(name: str) -> None:
    """Raise a clear error unless ``name`` is a built-in, a timm or a torchvision model."""
    if name in BUILTIN_MODELS:
        return
    import timm

    if timm.is_model(name) or torchvision_name(name):
        return
    close = timm.list_models(f"*{name[:4]}*")[:8] if len(name) >= 4 else []
    hint = f"; similar timm names: {', '.join(close)}" if close else ""
    raise TunerError(
        f"model must be a built-in ({', '.join(BUILTIN_MODELS)}), a timm or a torchvision model name, "
        f"but got model={name!r}{hint}"
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
    in_features: int,
    num_outputs: int,
    *,
    hidden_sizes: Sequence[int] = (),
    dropout: float = 0.0,
    dropout_layers: int = 0,
) -> nn.Module:
    """[dropout, linear, ReLU] per hidden size, then dropout and the output layer.

    ``dropout_layers`` > 0 keeps dropout in front of only the last that many linear layers
    (1 = just before the output); 0 puts it in front of every one.
    """
    layers: list[nn.Module] = []
    sizes = [*hidden_sizes, num_outputs]
    for i, size in enumerate(sizes):
        if dropout > 0 and (dropout_layers == 0 or i >= len(sizes) - dropout_layers):
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(in_features, size))
        if i < len(sizes) - 1:
            layers.append(nn.ReLU(inplace=True))
        in_features = size
    return nn.Sequential(*layers)


def _timm_backbone(name: str, *, in_chans: int, image_size: int, drop_path: float, pretrained: bool | str) -> nn.Module:
    weights = resolve_pretrained(name, pretrained)
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if drop_path > 0:
        kwargs["drop_path_rate"] = drop_path
    model = _create_timm(name, image_size, pretrained=False, **kwargs)
    if weights is None:
        return model
    state = read_state_dict(weights)
    if tensor_names(model.state_dict()) <= set(state):
        # timm's own names: timm loads the file, adapting the first conv to in_chans, dropping the
        # classifier and resampling position embeddings to the image size.
        return _create_timm(name, image_size, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    load_by_order(model, state, source=str(weights), model_name=name)
    return model


def _create_timm(name: str, image_size: int, **kwargs: Any) -> nn.Module:
    import timm

    try:
        # Vision transformers need the input size at construction; CNNs do not accept it, and say so.
        try:
            return timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "drop_path_rate" in str(err):
            raise TunerError(f"{name} has no drop path (stochastic depth); set drop_path: 0 for it") from None
        raise


class TorchvisionBackbone(nn.Module):
    """A torchvision classifier with its last linear layer removed; grey images are repeated to 3 channels."""

    def __init__(self, name: str, *, in_chans: int, weights: Path | None) -> None:
        super().__init__()
        if in_chans not in (1, 3):
            raise TunerError(f"torchvision models take 1 or 3 channels, but the data has {in_chans}")
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
        if weights is not None:
            model.load_state_dict(read_state_dict(weights))
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TunerError(f"torchvision model {name!r} has no final linear layer to replace with tuner's head")
        parent, _, child = linears[-1].rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        self.num_features = getattr(holder, child).in_features
        setattr(holder, child, nn.Identity())
        self.model = model
        self.in_chans = in_chans
        self.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # torchvision's weights' normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1) if self.in_chans == 1 else x)


def set_transformer_dropout(backbone: nn.Module, *, pos_dropout: float, block_dropout: float, blocks: int) -> None:
    """Dropout after the position embedding, and inside the last ``blocks`` transformer blocks (0 = all)."""
    if pos_dropout > 0:
        if not isinstance(getattr(backbone, "pos_drop", None), nn.Dropout):
            raise TunerError("pos_dropout needs a vision transformer (a timm model with a position-embedding dropout)")
        backbone.pos_drop.p = pos_dropout  # type: ignore[union-attr]
    if block_dropout > 0:
        all_blocks = getattr(backbone, "blocks", None)
        if not isinstance(all_blocks, nn.Sequential):
            raise TunerError("block_dropout needs a vision transformer (a timm model with .blocks)")
        for block in list(all_blocks)[-blocks if blocks else 0 :]:
            for module in block.modules():
                if isinstance(module, nn.Dropout):
                    module.p = block_dropout


def build_model(
    name: str,
    *,
    num_outputs: int,
    in_chans: int,
    image_size: int,
    width: int = 32,
    depth: int = 3,
    batch_norm: bool = True,
    pooling: str = "avg",
    hidden_sizes: Sequence[int] = (),
    dropout: float = 0.0,
    dropout_layers: int = 0,
    drop_path: float = 0.0,
    pos_dropout: float = 0.0,
    block_dropout: float = 0.0,
    dropout_blocks: int = 0,
    pretrained: bool | str = False,
    freeze_backbone: bool = False,
) -> Classifier:
    """Build a classifier with ``num_outputs`` logits."""
    check_model_name(name)
    tv_name = torchvision_name(name)
    if drop_path > 0 and (name in BUILTIN_MODELS or tv_name is not None):
        raise TunerError(f"drop_path applies to timm models that have it, not to {name}; set drop_path: 0 for it")
    if name in BUILTIN_MODELS:
        resolve_pretrained(name, pretrained)
        backbone = BUILTIN_MODELS[name](
            in_chans, image_size, width=width, depth=depth, batch_norm=batch_norm, pooling=pooling
        )
    elif tv_name is not None:
        backbone = TorchvisionBackbone(tv_name, in_chans=in_chans, weights=resolve_pretrained(name, pretrained))
    else:
        backbone = _timm_backbone(
            name, in_chans=in_chans, image_size=image_size, drop_path=drop_path, pretrained=pretrained
        )
    set_transformer_dropout(backbone, pos_dropout=pos_dropout, block_dropout=block_dropout, blocks=dropout_blocks)
    # timm's VGG pools 512 channels but its pre-logits MLP returns head_hidden_size (4096) features.
    features = int(getattr(backbone, "head_hidden_size", None) or getattr(backbone, "num_features"))  # noqa: B009
    head = build_head(features, num_outputs, hidden_sizes=hidden_sizes, dropout=dropout, dropout_layers=dropout_layers)
    return Classifier(backbone, head, freeze_backbone=freeze_backbone)

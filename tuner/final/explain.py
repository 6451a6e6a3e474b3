"""Where a final model looks: Grad-CAM maps, averaged over its networks and test-time views as its
probabilities are.

The maps come from the ``grad-cam`` package (pytorch-grad-cam); this module chooses the layer, turns a
vision transformer's tokens back into a grid, and averages: each network's map of each flipped view is
flipped back, and the mean is the model's map. A map is for one class: the predicted one unless asked
otherwise; for a network with one logit (the positive class's), the other class's score is its negative.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from tuner.data import Normalize
from tuner.errors import TunerError
from tuner.train import TTA_VIEWS, Classifier, SavedModel

if TYPE_CHECKING:
    from PIL.Image import Image

Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TargetLayer:
    """The layer whose activations and gradients make the map, and how its output becomes N×C×H×W."""

    name: str
    module: nn.Module
    reshape: Reshape | None = None


def _output_shapes(model: nn.Module, channels: int, image_size: int) -> dict[str, tuple[int, ...]]:
    """Each module's output shape for one image, in the order the modules finish (a block after its parts)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor):
            shapes.setdefault(name, tuple(output.shape))

    hooks = [
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name, module in model.named_modules()
        if name
    ]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def _token_grid(backbone: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, patch grid) of a timm vision transformer, else None."""
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    prefix = getattr(backbone, "num_prefix_tokens", None)
    if grid is None or prefix is None:
        return None
    return int(prefix), (int(grid[0]), int(grid[1]))


def _tokens_to_map(prefix: int, grid: tuple[int, int]) -> Reshape:
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        return patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def find_target_layer(model: Classifier, *, channels: int, image_size: int, name: str | None = None) -> TargetLayer:
    """The layer to explain ``model`` at: ``name`` if given (``backbone.layer3``; the ``backbone.`` may be left
    out), else a vision transformer's last block's first norm (its tokens still mix in that block's
    attention), else the last layer with a spatial map (a CNN's last stage, before the global pool)."""
    shapes = _output_shapes(model, channels, image_size)
    tokens = _token_grid(model.backbone)
    if name is None:
        blocks = getattr(model.backbone, "blocks", None)
        if tokens is not None and isinstance(blocks, nn.Sequential) and hasattr(blocks[-1], "norm1"):
            name = f"backbone.blocks.{len(blocks) - 1}.norm1"
        else:
            spatial = [n for n, s in shapes.items() if len(s) == 4 and s[2] > 1 and s[3] > 1]
            if not spatial or getattr(model.backbone, "output_fmt", "NCHW") != "NCHW":
                raise TunerError(
                    "Grad-CAM needs a convolutional network (N×C×H×W feature maps) or a vision transformer, "
                    f"and this model's backbone ({type(model.backbone).__name__}) has no such layer"
                )
            name = spatial[-1]
    elif name not in shapes and f"backbone.{name}" in shapes:
        name = f"backbone.{name}"
    if name not in shapes:
        close = [n for n in shapes if name.rsplit(".", 1)[-1] in n][:6]
        hint = f"; layers with a similar name: {', '.join(close)}" if close else ""
        raise TunerError(f"the model has no layer {name!r} (names as in model.named_modules()){hint}")
    shape = shapes[name]
    if len(shape) == 4:
        return TargetLayer(name, model.get_submodule(name))
    if len(shape) == 3 and tokens is not None and shape[1] == tokens[0] + tokens[1][0] * tokens[1][1]:
        return TargetLayer(name, model.get_submodule(name), _tokens_to_map(*tokens))
    raise TunerError(
        f"layer {name!r} gives {'×'.join(map(str, shape))} outputs; Grad-CAM needs a feature map "
        "(N×C×H×W) or a vision transformer's tokens"
    )


class ClassScore:
    """The score Grad-CAM differentiates for one image: the class's logit (for one logit, the positive
    class's logit or its negative)."""

    def __init__(self, index: int, positive_index: int | None) -> None:
        self.index, self.positive_index = index, positive_index

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == 1:
            positive = 1 if self.positive_index is None else self.positive_index
            return logits[..., 0] if self.index == positive else -logits[..., 0]
        return logits[..., self.index]


@contextmanager
def _inputs_only(model: nn.Module) -> Iterator[None]:
    """Gradients flow to the activations through the input, none are kept for the weights."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def grad_cam_maps(
    models: Sequence[Classifier],
    images: np.ndarray,
    targets: Sequence[int],
    *,
    normalize: Normalize,
    positive_index: int | None,
    tta: str = "none",
    layer: str | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, str]:
    """Grad-CAM maps (float32 N×S×S in [0, 1]) of uint8 images N×C×S×S for the class indices ``targets``,
    averaged over ``models`` and the ``tta`` views, and the first network's layer name."""
    from pytorch_grad_cam import GradCAM

    n, channels, size = len(images), images.shape[1], images.shape[-1]
    views = TTA_VIEWS[tta]
    device = next(models[0].parameters()).device
    total = np.zeros((n, images.shape[2], size), dtype=np.float64)
    first_layer = ""
    for model in models:
        target = find_target_layer(model, channels=channels, image_size=size, name=layer)
        first_layer = first_layer or target.name
        with _inputs_only(model), GradCAM(model, [target.module], reshape_transform=target.reshape) as cam:
            for start in range(0, n, batch_size):
                x = normalize(torch.from_numpy(np.array(images[start : start + batch_size])).to(device).float())
                scores = [ClassScore(int(k), positive_index) for k in targets[start : start + batch_size]]
                for dims in views:
                    maps = cam(input_tensor=(x.flip(dims) if dims else x).requires_grad_(), targets=scores)
                    total[start : start + len(x)] += np.flip(maps, axis=dims) if dims else maps
    return (total / (len(models) * len(views))).astype(np.float32), first_layer


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM maps of a model for some images, with what the model said about them."""

    images: np.ndarray  # uint8 N×C×S×S, as the model saw them
    maps: np.ndarray  # float32 N×S×S in [0, 1]: where evidence for the explained class lies
    explained: tuple[str, ...]  # the class each map is for
    predicted: tuple[str, ...]
    probabilities: np.ndarray  # N×K, columns in class_names order
    class_names: tuple[str, ...]
    layer: str

    def __len__(self) -> int:
        return len(self.maps)

    def overlays(self, *, size: int = 224) -> list[Image]:
        """Each map over its image (jet colours, half transparent), scaled up to at least ``size`` pixels."""
        from PIL import Image as PILImage
        from pytorch_grad_cam.utils.image import show_cam_on_image

        side = max(size, self.images.shape[-1])
        result = []
        for pixels, heat in zip(self.images, self.maps, strict=True):
            rgb = np.repeat(pixels, 3, axis=0) if pixels.shape[0] == 1 else pixels[:3]
            picture = PILImage.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0))).resize((side, side))
            mask = np.asarray(PILImage.fromarray(heat, mode="F").resize((side, side), PILImage.Resampling.BILINEAR))
            base = np.asarray(picture, dtype=np.float32) / 255
            result.append(PILImage.fromarray(show_cam_on_image(base, np.clip(mask, 0, 1), use_rgb=True)))
        return result

    def save(self, out_dir: str | Path, names: Sequence[str] | None = None, *, size: int = 224) -> list[Path]:
        """``<name>_cam.png`` per image, ``explanations.csv`` (class, probabilities) and ``maps.npz`` (the raw
        maps) in ``out_dir``; the paths of the overlays."""
        out = Path(out_dir)
        names = list(names) if names is not None else [f"image_{i:04d}" for i in range(len(self))]
        try:
            out.mkdir(parents=True, exist_ok=True)
            paths = []
            for name, overlay in zip(names, self.overlays(size=size), strict=True):
                paths.append(out / f"{name}_cam.png")
                overlay.save(paths[-1])
            with (out / "explanations.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image", "predicted", "explained", *(f"prob_{c}" for c in self.class_names), "map"])
                for name, pred, expl, probs, path in zip(
                    names, self.predicted, self.explained, self.probabilities, paths, strict=True
                ):
                    writer.writerow([name, pred, expl, *(f"{p:.6f}" for p in probs), path.name])
            np.savez_compressed(out / "maps.npz", maps=self.maps, names=np.array(names), layer=self.layer)
        except OSError as err:
            raise TunerError(f"cannot write the explanations to {out}: {err.strerror or err}") from None
        return paths


def explain_model(
    saved: SavedModel, pixels: np.ndarray, *, target: str | None = None, layer: str | None = None, batch_size: int = 32
) -> Explanation:
    """Grad-CAM maps of ``saved`` for uint8 images N×C×S×S at its size: for ``target`` (a class name), else
    for each image's predicted class."""
    if target is not None and target not in saved.class_names:
        raise TunerError(f"class must be one of {', '.join(saved.class_names)}, but got {target!r}")
    probs = saved.probabilities(pixels)
    predicted = saved.decide(probs).tolist()
    targets = predicted if target is None else [saved.class_names.index(target)] * len(pixels)
    maps, name = grad_cam_maps(
        saved.models,
        pixels,
        targets,
        normalize=saved.normalize,
        positive_index=saved.positive_index,
        tta=saved.tta,
        layer=layer,
        batch_size=batch_size,
    )
    return Explanation(
        images=pixels,
        maps=maps,
        explained=tuple(saved.class_names[k] for k in targets),
        predicted=tuple(saved.class_names[k] for k in predicted),
        probabilities=probs.numpy(),
        class_names=saved.class_names,
        layer=name,
    )


def error_gallery(
    saved: SavedModel, images: np.ndarray, labels: np.ndarray, probs: torch.Tensor, path: Path, *, count: int = 8
) -> Path | None:
    """A figure of the ``count`` most confident errors among ``images`` (true ``labels``, the model's
    ``probs``) with the maps of the class the model wrongly chose; None when it made no error."""
    predicted = saved.decide(probs).numpy()
    wrong = np.flatnonzero(predicted != labels)
    if not len(wrong):
        return None
    confidence = probs.numpy()[wrong, predicted[wrong]]
    chosen = wrong[np.argsort(-confidence, kind="stable")[:count]]
    explanation = explain_model(saved, np.asarray(images[chosen]))
    truth = [saved.class_names[k] for k in labels[chosen]]
    title = f"The {len(chosen)} most confident of {len(wrong)} errors on {len(labels)} test images"
    return _gallery_figure(explanation, truth, path, title=title)


def _gallery_figure(
    explanation: Explanation, truth: Sequence[str], path: Path, *, title: str, columns: int = 4, tile: int = 160
) -> Path:
    """Each map over its image, captioned with the true and the predicted class: one PNG, composed with PIL
    (a matplotlib figure of eight panels takes a second to draw; this, milliseconds)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    columns = min(columns, len(explanation))
    rows = -(-len(explanation) // columns)
    head, caption, gap = 30, 34, 8
    sheet = PILImage.new("RGB", (columns * (tile + gap) + gap, head + rows * (tile + caption + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((gap, 8), title, fill="black", font=ImageFont.load_default(size=14))
    probs = explanation.probabilities
    for i, overlay in enumerate(explanation.overlays(size=tile)):
        x, y = gap + (i % columns) * (tile + gap), head + (i // columns) * (tile + caption + gap)
        k = explanation.class_names.index(explanation.predicted[i])
        draw.text((x, y), f"true {truth[i]}", fill="black", font=font)
        draw.text((x, y + 15), f"predicted {explanation.predicted[i]} ({probs[i, k]:.2f})", fill="black", font=font)
        sheet.paste(overlay.resize((tile, tile)), (x, y + caption))
    sheet.save(path)
    return path

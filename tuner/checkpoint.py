"""A saved model: weights plus everything needed to rebuild and use it, and nothing else.

``model.pt`` holds ``{state_dict, hparams, space, class_names, image_size,
channels, normalize, threshold, positive_index, seed, versions, provenance}``.
:func:`load_model` rebuilds the network from those fields alone, so
``evaluate`` and ``predict`` need neither the study nor the space file.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import timm
import torch

from tuner import __version__
from tuner.data.loader import Normalize, TensorSplit, iterate_batches
from tuner.engine import predict
from tuner.errors import TunerError
from tuner.hparams import Hyperparameters
from tuner.losses import logits_to_probs
from tuner.models import Classifier
from tuner.training import build_classifier

FORMAT = 1


@dataclass(frozen=True)
class SavedModel:
    model: Classifier
    hparams: Hyperparameters
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    normalize: Normalize
    threshold: float | None
    positive_index: int | None
    info: dict[str, Any]

    def probabilities(self, images: np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities for uint8 images N×C×S×S (already at this model's size)."""
        device = next(self.model.parameters()).device
        split = TensorSplit.from_numpy(images, np.zeros(len(images), dtype=np.int64), device)
        batches = iterate_batches(split, torch.arange(len(split)), batch_size, normalize=self.normalize)
        to_probs = partial(logits_to_probs, num_classes=len(self.class_names), positive_index=self.positive_index)
        probs, _, _ = predict(self.model, batches, to_probs=to_probs)
        return probs.cpu()

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Predicted class per row: the frozen threshold on the positive class (binary) or arg-max."""
        if self.threshold is not None and self.positive_index is not None and probs.shape[1] == 2:
            positive = probs[:, self.positive_index] >= self.threshold
            return torch.where(positive, self.positive_index, 1 - self.positive_index)
        return probs.argmax(1)


def save_model(
    path: Path,
    model: Classifier,
    *,
    hparams: Hyperparameters,
    space: dict,
    class_names: tuple[str, ...],
    image_size: int,
    channels: int,
    normalize: Normalize,
    threshold: float | None,
    positive_index: int | None,
    seed: int,
    provenance: dict,
) -> Path:
    payload = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "hparams": hparams.model_dump(mode="json"),
        "space": space,
        "class_names": list(class_names),
        "image_size": image_size,
        "channels": channels,
        "normalize": {"mean": list(normalize.mean), "std": list(normalize.std)},
        "threshold": threshold,
        "positive_index": positive_index,
        "seed": seed,
        "versions": {
            "tuner": __version__,
            "torch": str(torch.__version__),
            "timm": timm.__version__,
            "optuna": optuna.__version__,
            "python": platform.python_version(),
        },
        "provenance": provenance,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model(path: Path, device: torch.device | str = "cpu") -> SavedModel:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TunerError(f"model file {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise TunerError(f"cannot read model file {path}: {type(err).__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise TunerError(f"{path} is not a tuner model file (format {FORMAT})")
    hparams = Hyperparameters(**payload["hparams"])
    class_names = tuple(payload["class_names"])
    model = build_classifier(
        hparams, num_classes=len(class_names), channels=payload["channels"], image_size=payload["image_size"]
    )
    model.load_state_dict(payload["state_dict"])
    model.to(device).eval()
    norm = payload["normalize"]
    return SavedModel(
        model=model,
        hparams=hparams,
        class_names=class_names,
        image_size=payload["image_size"],
        channels=payload["channels"],
        normalize=Normalize(tuple(norm["mean"]), tuple(norm["std"])),
        threshold=payload["threshold"],
        positive_index=payload["positive_index"],
        info={k: payload[k] for k in ("seed", "versions", "provenance", "space")},
    )

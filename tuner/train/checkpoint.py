"""A saved model: weights plus everything needed to rebuild and use it, and nothing else.

``model.pt`` holds ``{state_dicts, tta, hparams, space, class_names, image_size,
channels, normalize, threshold, positive_index, seed, versions, provenance}``:
one network, or several of one recipe (seeds, folds) whose probabilities are
averaged, each over the ``tta`` views. :func:`load_model` rebuilds the networks
from those fields alone, so ``evaluate`` and ``predict`` need neither the study
nor the space file. Files of format 1 (one ``state_dict``, no TTA) still load.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from tuner import __version__
from tuner.data import Normalize
from tuner.errors import TunerError
from tuner.train.build import build_classifier
from tuner.train.hparams import Hyperparameters
from tuner.train.inference import average_probabilities, check_tta
from tuner.train.models import Classifier

FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclass(frozen=True)
class SavedModel:
    models: tuple[Classifier, ...]  # averaged
    tta: str
    hparams: Hyperparameters
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    normalize: Normalize
    threshold: float | None
    positive_index: int | None
    info: dict[str, Any]

    def probabilities(self, images: np.ndarray, *, batch_size: int = 256) -> torch.Tensor:
        """Class probabilities for uint8 images N×C×S×S (already at this model's size): the mean over the
        networks and the test-time views, exactly as refit computed them."""
        return average_probabilities(
            self.models,
            images,
            normalize=self.normalize,
            num_classes=len(self.class_names),
            positive_index=self.positive_index,
            tta=self.tta,
            batch_size=batch_size,
        )

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """Predicted class per row: the frozen threshold on the positive class (binary) or arg-max."""
        return decide(probs, self.threshold, self.positive_index)


def decide(probs: torch.Tensor, threshold: float | None, positive_index: int | None) -> torch.Tensor:
    """Predicted class per row of N×K probabilities: ``threshold`` on the positive class (binary) or arg-max."""
    if threshold is not None and positive_index is not None and probs.shape[1] == 2:
        positive = probs[:, positive_index] >= threshold
        return torch.where(positive, positive_index, 1 - positive_index)
    return probs.argmax(1)


def save_model(
    path: Path,
    models: Sequence[Classifier],
    *,
    tta: str = "none",
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
) -> SavedModel:
    """Write ``models`` and what rebuilds them to ``path``; the same model as :func:`load_model` would read
    back, holding the networks given (no second read of the file)."""
    payload = {
        "format": FORMAT,
        "state_dicts": [{k: v.detach().cpu() for k, v in model.state_dict().items()} for model in models],
        "tta": check_tta(tta),
        "hparams": hparams.model_dump(mode="json"),
        "space": space,
        "class_names": list(class_names),
        "image_size": image_size,
        "channels": channels,
        "normalize": {"mean": list(normalize.mean), "std": list(normalize.std)},
        "threshold": threshold,
        "positive_index": positive_index,
        "seed": seed,
        "versions": versions(),
        "provenance": provenance,
    }
    try:
        save_atomically(payload, path)
    except OSError as err:
        raise TunerError(f"cannot write the model file {path}: {err.strerror or err}") from None
    return _saved_model(models, payload)


def versions() -> dict[str, str]:
    """The versions a model was made with, as model.pt and the model card record them."""
    return {
        "tuner": __version__,
        "torch": str(torch.__version__),
        "timm": timm.__version__,
        "optuna": importlib.metadata.version("optuna"),  # recorded without importing the search stack
        "python": platform.python_version(),
    }


def save_atomically(payload: dict, path: Path) -> None:
    """``torch.save`` whole or not at all: to a temporary file renamed over ``path``. Serialised in memory
    first, so a full disk or a read-only folder is an ``OSError`` naming the file (torch's own writer
    raises a bare ``RuntimeError`` there) and no half-written file is left behind."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(buffer.getbuffer())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_model(path: Path, device: torch.device | str = "cpu") -> SavedModel:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TunerError(f"model file {path} does not exist") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise TunerError(f"cannot read model file {path}: {type(err).__name__}: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise TunerError(f"{path} is not a tuner model file (format {' or '.join(map(str, READABLE_FORMATS))})")
    hparams = Hyperparameters(**payload["hparams"])
    class_names = tuple(payload["class_names"])
    states = payload["state_dicts"] if "state_dicts" in payload else [payload["state_dict"]]
    models = []
    for state in states:
        # The saved weights replace everything the pretrained file would give: no need for that file here.
        model = build_classifier(
            hparams.model_copy(update={"pretrained": False}),
            num_classes=len(class_names),
            channels=payload["channels"],
            image_size=payload["image_size"],
        )
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return _saved_model(models, payload)


def _saved_model(models: Sequence[Classifier], payload: dict[str, Any]) -> SavedModel:
    norm = payload["normalize"]
    return SavedModel(
        models=tuple(models),
        tta=payload.get("tta", "none"),
        hparams=Hyperparameters(**payload["hparams"]),
        class_names=tuple(payload["class_names"]),
        image_size=payload["image_size"],
        channels=payload["channels"],
        normalize=Normalize(tuple(norm["mean"]), tuple(norm["std"])),
        threshold=payload["threshold"],
        positive_index=payload["positive_index"],
        info={k: payload[k] for k in ("seed", "versions", "provenance", "space")},
    )

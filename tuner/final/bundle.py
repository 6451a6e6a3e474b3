"""A final model as a MONAI bundle, the form medical-imaging teams share and deploy models in.

    <bundle>/configs/metadata.json   MONAI's metadata: versions, network_data_format (input, classes),
                                     plus the threshold, positive class, test-time views and networks
    <bundle>/configs/inference.json  MONAI's config: network_def, dataset, inferer, evaluator, run
    <bundle>/models/model.pt         a plain state dict of network_def
    <bundle>/models/model.onnx       the same graph in ONNX (as ``tuner export`` writes it)
    <bundle>/docs/README.md          the model card, in the Model Zoo's sections

``network_def`` is :class:`BundleNetwork`: the ONNX export's graph (normalisation, every network, every
test-time view, the average) rebuilt from plain config values, so MONAI's ``ConfigParser`` instantiates it
and ``verify_net_in_out`` checks it. Its input is float pixels in [0, 255], N×C×S×S; its output the class
probabilities. ``python -m monai.bundle run`` writes ``probabilities.csv`` for a folder of images, with the
probabilities ``tuner predict`` gives.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tuner import __version__
from tuner.errors import TunerError
from tuner.final.evaluation import write_image_predictions
from tuner.final.export import ProbabilityGraph, export_onnx
from tuner.final.model_card import model_card
from tuner.final.results import RefitReport
from tuner.train import SavedModel, decide

BUNDLE_VERSION = "1.0.0"
# The schema MONAI's verify_metadata checks metadata.json against (it downloads it when given this URL).
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
NETWORK = "network_def"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class BundleNetwork(ProbabilityGraph):
    """:class:`ProbabilityGraph` built from plain values (a bundle's ``network_def``): ``networks`` copies
    of the classifier ``hparams`` describes, whose weights come from the bundle's ``models/model.pt``."""

    def __init__(
        self,
        hparams: dict[str, Any],
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        networks: int = 1,
        tta: str = "none",
        positive_index: int | None = None,
    ) -> None:
        from tuner.train import Hyperparameters, build_classifier

        blueprint = Hyperparameters(**hparams).model_copy(update={"pretrained": False})
        members = [
            build_classifier(blueprint, num_classes=len(class_names), channels=channels, image_size=image_size)
            for _ in range(networks)
        ]
        super().__init__(
            members, tta=tta, num_classes=len(class_names), positive_index=positive_index, mean=mean, std=std
        )


class ImageFolder:
    """The images of a folder, sorted by name (the bundle's ``dataset``): listed when first read, so the
    workflow can be built and checked before its ``dataset_dir`` is named."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @functools.cached_property
    def files(self) -> list[Path]:
        if not self.directory.is_dir():
            raise TunerError(f"dataset_dir {self.directory} is not a folder of images")
        files = sorted(p for p in self.directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise TunerError(f"dataset_dir {self.directory} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return files


class BundleInference:
    """The bundle's ``evaluator``: loads ``models/model.pt`` into the network, decodes each image as tuner
    does, runs MONAI's inferer and writes one row per image: path, each class's probability, the label
    (the frozen threshold on the positive class when there is one, else the most probable class)."""

    def __init__(
        self,
        network: nn.Module,
        dataset: ImageFolder,
        inferer: Any,
        checkpoint: str,
        output: str,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        threshold: float | None = None,
        positive_index: int | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.network, self.dataset, self.inferer = network, dataset, inferer
        self.checkpoint, self.output = Path(checkpoint), Path(output)
        self.class_names, self.image_size, self.channels = list(class_names), image_size, channels
        self.threshold, self.positive_index = threshold, positive_index
        self.device, self.batch_size = torch.device(device), batch_size

    def run(self) -> Path:
        from tuner.data import decode_files

        self.network.load_state_dict(torch.load(self.checkpoint, map_location="cpu", weights_only=True))
        self.network.to(self.device).eval()
        probs: list[list[float]] = []
        labels: list[str] = []
        with torch.no_grad():
            for start in range(0, len(self.dataset.files), self.batch_size):
                files = self.dataset.files[start : start + self.batch_size]
                pixels = torch.from_numpy(decode_files(files, self.image_size, self.channels)).to(self.device)
                batch = self.inferer(pixels.float(), self.network).cpu()
                probs += batch.tolist()
                labels += [self.class_names[i] for i in decide(batch, self.threshold, self.positive_index).tolist()]
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with self.output.open("w", newline="") as fh:
            write_image_predictions(fh, self.dataset.files, probs, labels, self.class_names)
        return self.output


def metadata(saved: SavedModel, card: str | None, *, monai_version: str) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's keys, then what tuner's decision rule needs."""
    names = list(saved.class_names)
    positive = None if saved.positive_index is None else names[saved.positive_index]
    provenance = saved.info.get("provenance") or {}
    versions = saved.info.get("versions") or {}
    source = f"study {provenance.get('study')}, trial {provenance.get('trial')}" if provenance.get("study") else None
    return {
        "schema": SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {
            BUNDLE_VERSION: f"exported by tuner {__version__} from a model made with tuner {versions.get('tuner')}"
        },
        "monai_version": monai_version,
        "pytorch_version": str(torch.__version__).split("+")[0].split("a")[0],  # as MONAI's init_bundle writes it
        "numpy_version": np.__version__,
        # what the bundle's code needs: tuner builds the network and decodes the images
        "required_packages_version": {
            "tuner": __version__,
            **{name: importlib.metadata.version(name) for name in ("timm", "pillow")},
        },
        "name": f"tuner {saved.hparams.model} classifier" + (f" ({source})" if source else ""),
        "task": f"{len(names)}-class image classification: {', '.join(names)}",
        "description": (
            f"{saved.hparams.model} found by a tuner search"
            + (f" ({source})" if source else "")
            + f"; {ensemble(saved)}. "
            "The model card is docs/README.md."
        ),
        "authors": "tuner",
        "copyright": "Copyright (c) the authors of the data and of the study",
        "intended_use": "Measured only on the locked test split in docs/README.md; not evaluated for clinical use.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "RGB" if saved.channels == 3 else "magnitude",
                    "modality": "regular",
                    "num_channels": saved.channels,
                    "spatial_shape": [saved.image_size, saved.image_size],
                    "dtype": "float32",
                    "value_range": [0, 255],
                    "is_patch_data": False,
                    "channel_def": {"0": "R", "1": "G", "2": "B"} if saved.channels == 3 else {"0": "grey"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(names),
                    "spatial_shape": [1, len(names)],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): name for i, name in enumerate(names)},
                }
            },
        },
        # tuner's decision rule and what the network holds
        "classes": names,
        "positive_class": positive,
        "threshold": saved.threshold,
        "tta": saved.tta,
        "networks": len(saved.models),
        "model_card": "docs/README.md" if card else None,
    }


def inference_config(saved: SavedModel) -> dict[str, Any]:
    """``configs/inference.json``: every id MONAI's inference workflow requires (``workflow_type="infer"``)."""
    names = list(saved.class_names)
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "images",
        "output_dir": "$@bundle_root + '/eval'",
        NETWORK: {
            "_target_": "tuner.final.bundle.BundleNetwork",
            "hparams": saved.hparams.model_dump(mode="json"),
            "class_names": names,
            "image_size": saved.image_size,
            "channels": saved.channels,
            "mean": list(saved.normalize.mean),
            "std": list(saved.normalize.std),
            "networks": len(saved.models),
            "tta": saved.tta,
            "positive_index": saved.positive_index,
        },
        "network": "$@network_def.to(@device)",
        "dataset": {"_target_": "tuner.final.bundle.ImageFolder", "directory": "@dataset_dir"},
        "inferer": {"_target_": "SimpleInferer"},
        "evaluator": {
            "_target_": "tuner.final.bundle.BundleInference",
            "network": "@network",
            "dataset": "@dataset",
            "inferer": "@inferer",
            "checkpoint": "$@bundle_root + '/models/model.pt'",
            "output": "$@output_dir + '/probabilities.csv'",
            "class_names": names,
            "image_size": saved.image_size,
            "channels": saved.channels,
            "threshold": saved.threshold,
            "positive_index": saved.positive_index,
            "device": "@device",
        },
        "run": ["$@evaluator.run()"],
    }


def ensemble(saved: SavedModel) -> str:
    """What is averaged, in words: "2 networks, each over the 'flips' test-time views, probabilities averaged"."""
    networks = f"{len(saved.models)} network" + ("s" if len(saved.models) > 1 else "")
    views = "" if saved.tta == "none" else f", each over the {saved.tta!r} test-time views"
    averaged = ", probabilities averaged" if views or len(saved.models) > 1 else ""
    return networks + views + averaged


def bundle_readme(saved: SavedModel, card: str | None) -> str:
    """``docs/README.md``: the Model Zoo's sections, the model card's facts under them."""
    names = ", ".join(saved.class_names)
    lines = [
        "# Model Overview",
        "",
        f"A {saved.hparams.model} image classifier ({names}) found by a tuner hyperparameter search and refit "
        f"on train + validation: {ensemble(saved)}.",
        "",
        f"Input: float pixels in [0, 255], N×{saved.channels}×{saved.image_size}×{saved.image_size} (not "
        "normalised; the network normalises). Output: N×K class probabilities, K in the order of "
        "`channel_def` in configs/metadata.json; the decision rule (positive class, threshold) is there too.",
        "",
        "## MONAI Bundle Commands",
        "",
        "Probabilities for a folder of images, written to `eval/probabilities.csv`:",
        "",
        "    python -m monai.bundle run --config_file configs/inference.json --meta_file configs/metadata.json \\",
        "        --workflow_type infer --bundle_root . --dataset_dir /path/to/images",
        "",
        "Check the metadata against MONAI's schema (downloaded from the `schema` URL) and the network against "
        "the metadata:",
        "",
        "    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath schema.json",
        "    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\",
        "        --config_file configs/inference.json",
        "",
        f"The network's code is tuner's: run the bundle where tuner {__version__} is installed with its monai extra. "
        "`models/model.onnx` is the same model for ONNX Runtime alone (uint8 images in).",
        "",
    ]
    if card:
        # The card's own title becomes a section, its sections subsections.
        lines += [("#" + line if line.startswith("#") else line) for line in card.splitlines()]
    else:
        lines += ["## Model card", "", "No MODEL_CARD.md was found beside the model file."]
    lines += ["", "# License", "", "The license of the training data applies; state it here before sharing.", ""]
    return "\n".join(lines)


def export_bundle(saved: SavedModel, path: Path, *, model_file: Path, report: RefitReport | None = None) -> Path:
    """Write ``saved`` (read from ``model_file``) as a MONAI bundle folder at ``path`` (absent or empty), whole
    or not at all. Its docs/README.md holds the MODEL_CARD.md beside ``model_file``, else the card of
    ``report``."""
    card_file = model_file.with_name("MODEL_CARD.md")
    card = card_file.read_text() if card_file.is_file() else (model_card(report) if report is not None else None)
    try:
        monai_version = importlib.metadata.version("monai")
    except importlib.metadata.PackageNotFoundError:
        raise TunerError("exporting a MONAI bundle needs the monai extra: pip install 'tuner[monai]'") from None
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise TunerError(f"{path} already exists and is not an empty folder; name a new folder for the bundle")
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        # Rebuilt from the config's values, then given the weights: the bundle's network_def is checked here.
        config = inference_config(saved)
        network = {k: v for k, v in config[NETWORK].items() if k != "_target_"}
        graph = BundleNetwork(**network)
        graph.load_state_dict(ProbabilityGraph.of(saved).state_dict())
        (staging / "models").mkdir(parents=True)
        (staging / "configs").mkdir()
        (staging / "docs").mkdir()
        torch.save(graph.state_dict(), staging / "models" / "model.pt")
        export_onnx(saved, staging / "models" / "model.onnx")
        for name, content in (("metadata", metadata(saved, card, monai_version=monai_version)), ("inference", config)):
            (staging / "configs" / f"{name}.json").write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        (staging / "docs" / "README.md").write_text(bundle_readme(saved, card))
        if path.exists():
            path.rmdir()
        staging.replace(path)
    except OSError as err:
        raise TunerError(f"cannot write the bundle {path}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path

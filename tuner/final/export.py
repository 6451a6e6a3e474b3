"""A final model as one ONNX graph: uint8 images in, class probabilities out, nothing to re-implement.

The graph holds what ``tuner predict`` does between the decoded image and the probabilities: scaling and
normalisation, every network of the ensemble (seeds, folds), every test-time view (flips), and the average.
The classes, the positive class and the threshold travel in the graph's metadata, so a service in any
language can apply the decision rule too. Exported through ``torch.onnx.export`` (the ``torch.export``
based exporter) with a dynamic batch axis; ONNX Runtime's probabilities equal ``predict``'s (tested).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from tuner.errors import TunerError
from tuner.train import TTA_VIEWS, SavedModel, logits_to_probs

OPSET = 18
INPUT, OUTPUT = "images", "probabilities"


class ProbabilityGraph(nn.Module):
    """uint8 images N×C×S×S -> N×K class probabilities, as :func:`tuner.train.average_probabilities`
    computes them: each network over each test-time view, averaged."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        members: Sequence[nn.Module],
        *,
        tta: str,
        num_classes: int,
        positive_index: int | None,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.views = TTA_VIEWS[tta]
        self.num_classes, self.positive_index = num_classes, positive_index
        std_ = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        mean_ = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        # The same two steps as tuner.data.Normalize, so the graph rounds as predict does.
        self.register_buffer("scale", 1 / (255 * std_))
        self.register_buffer("shift", -mean_ / std_)

    @classmethod
    def of(cls, saved: SavedModel) -> ProbabilityGraph:
        """The graph of a final model, holding its networks."""
        return cls(
            saved.models,
            tta=saved.tta,
            num_classes=len(saved.class_names),
            positive_index=saved.positive_index,
            mean=saved.normalize.mean,
            std=saved.normalize.std,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() * self.scale + self.shift
        total = None
        for member in self.members:
            for dims in self.views:
                logits = member(x.flip(dims) if dims else x)
                probs = logits_to_probs(logits, num_classes=self.num_classes, positive_index=self.positive_index)
                total = probs if total is None else total + probs
        assert total is not None
        return total / (len(self.members) * len(self.views))


def metadata(saved: SavedModel) -> dict[str, str]:
    """What a service needs beside the graph, as the graph's metadata (string values; lists as JSON)."""
    positive = None if saved.positive_index is None else saved.class_names[saved.positive_index]
    return {
        "classes": json.dumps(list(saved.class_names)),
        "positive_class": json.dumps(positive),
        "threshold": json.dumps(saved.threshold),
        "decision": (
            f"{positive} when its probability >= threshold, else the other class"
            if positive is not None and saved.threshold is not None and len(saved.class_names) == 2
            else "the class of highest probability"
        ),
        "image_size": str(saved.image_size),
        "channels": str(saved.channels),
        "input": f"{INPUT}: uint8 N×{saved.channels}×{saved.image_size}×{saved.image_size} (RGB or grey, not normalised)",
        "networks": str(len(saved.models)),
        "tta": saved.tta,
        "model": saved.hparams.model,
        "producer": "tuner",
    }


def export_onnx(saved: SavedModel, path: Path) -> Path:
    """Write ``saved`` as one ONNX graph at ``path`` (a whole file: no external weights beside it)."""
    try:
        import onnx
    except ImportError:
        raise TunerError("exporting to ONNX needs the onnx extra: pip install 'tuner[onnx]'") from None
    graph = ProbabilityGraph.of(saved).eval()
    example = torch.zeros(2, saved.channels, saved.image_size, saved.image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=[OUTPUT],
            opset_version=OPSET,
            dynamic_shapes={"images": {0: batch}},
            external_data=False,
            verbose=False,
        )
    assert program is not None
    proto = program.model_proto
    for key, value in metadata(saved).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        onnx.save_model(proto, str(tmp))
        tmp.replace(path)
    except OSError as err:
        raise TunerError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path

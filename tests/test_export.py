"""`tuner export`: one ONNX graph that ONNX Runtime runs to the probabilities `tuner predict` gives, for one
network with flipped test-time views and for a fold ensemble of a timm network; classes and threshold in
its metadata; any batch size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import tuner
from tests.conftest import invoke, tiny_space, unavailable, write_lesion_npz


@pytest.fixture(scope="module")
def ort():
    try:
        import onnxruntime
    except ImportError:
        unavailable("onnxruntime", "pip install -e '.[test]' installs it")
    return onnxruntime


@pytest.fixture(scope="module")
def refits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuner.FinalModel]]:
    """Two final models: one small CNN over four flipped views, and two folds of timm's test ResNet."""
    root = tmp_path_factory.mktemp("export")
    npz = write_lesion_npz(root / "lesions.npz")
    data = {"source": str(npz), "image_size": 16, "label_aliases": {"0": "benign", "1": "malignant"}}
    studies = root / "studies"
    models = {}
    for name, params, how in (
        ("cnn", {}, {"tta": "flips"}),
        ("resnet", {"model": "test_resnet", "pretrained": False}, {"folds": 2}),
    ):
        space = tiny_space(
            study={"name": name, "n_trials": 1, "artifacts": False}, data=data, train={"max_epochs": 2}, params=params
        )
        study = tuner.optimize(space, storage=f"sqlite:///{studies}/{name}.db", cache_dir=studies, progress=False)
        models[name] = tuner.refit(
            study, out_dir=studies / name, cache_dir=studies, bootstrap=10, progress=False, **how
        )
    return npz, models


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_onnx_runtime_gives_the_probabilities_predict_gives(refits, name, workdir, ort):
    npz, models = refits
    model = models[name]
    onnx_file = workdir / f"{name}.onnx"
    result = invoke("export", "--model", model.path, "--to", onnx_file)
    assert result.exit_code == 0, result.output
    assert f"{onnx_file}: uint8 images N×3×16×16 in, probabilities of benign, malignant out" in result.stdout

    test = np.load(npz)["test_images"]  # N×H×W×C
    expected = model.predict_proba(test)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    [given] = session.get_inputs()
    assert given.name == "images" and given.type == "tensor(uint8)" and given.shape[1:] == [3, 16, 16]
    pixels = np.ascontiguousarray(test.transpose(0, 3, 1, 2))
    [probs] = session.run(None, {"images": pixels})
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    [one] = session.run(None, {"images": pixels[:1]})  # the batch axis is free
    np.testing.assert_allclose(one, expected[:1], atol=1e-5)

    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == ["benign", "malignant"] and json.loads(meta["positive_class"]) == "malignant"
    assert json.loads(meta["threshold"]) == model.threshold
    assert meta["networks"] == str(len(model.saved.models)) and meta["tta"] == model.saved.tta
    decided = np.where(probs[:, 1] >= json.loads(meta["threshold"]), "malignant", "benign")
    assert decided.tolist() == model.predict(test), "the metadata's rule gives predict's labels"


def test_export_needs_an_onnx_file_name(refits, workdir):
    _, models = refits
    result = invoke("export", "--model", models["cnn"].path, "--to", workdir / "model.pt")
    assert result.exit_code == 2 and "must end in .onnx" in result.stderr
    assert not (workdir / "model.pt").exists()

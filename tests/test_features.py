"""Cached-feature trials: the same training as the full path, features computed once and cached."""

from __future__ import annotations

import pytest
import torch

from tuner.train.build import RunSettings, build_classifier
from tuner.train.hparams import Hyperparameters
from tuner.train.run import train_model

SETTINGS = RunSettings(max_epochs=4, patience=None, monitor="val_auroc", mode="max", eval_batch_size=64)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A timm backbone's weights saved to a file, standing in for pretrained ones."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), path)
    return str(path)


def _frozen(weights: str, **changes) -> Hyperparameters:
    settings = {
        "model": "resnet10t",
        "pretrained": weights,
        "freeze_backbone": True,
        "hidden_sizes": (16,),
        "dropout": 0.2,
        "lr": 3e-3,
        "batch_size": 32,
    }
    return Hyperparameters(**{**settings, **changes})


def test_cached_features_train_the_head_exactly_as_the_full_path(tiny_data, weights, tmp_path):
    from dataclasses import replace

    hp = _frozen(weights)
    full_model, full = train_model(hp, tiny_data, replace(SETTINGS, reuse_features=False), seed=3)
    cache = tmp_path / "cache"
    model, cached = train_model(hp, tiny_data, replace(SETTINGS, feature_cache=cache), seed=3)
    # Same batches, same head, same dropout draws: the same validation curve up to float rounding.
    for key in ("train_loss", "val_loss", "val_auroc"):
        assert cached.history[key] == pytest.approx(full.history[key], abs=2e-4), key
    assert cached.best_epoch == full.best_epoch
    # The whole classifier comes back (frozen backbone + trained head) and so does its best state.
    assert set(cached.best_state) == set(full_model.state_dict())
    whole = build_classifier(hp, num_classes=2, channels=3, image_size=16)
    whole.load_state_dict(cached.best_state)
    from functools import partial

    from tuner.train.build import model_normalization
    from tuner.train.inference import average_probabilities

    probs = partial(average_probabilities, num_classes=2, positive_index=tiny_data.positive_index)
    normalize = model_normalization(whole, "resnet10t", 3)
    torch.testing.assert_close(
        probs([whole], tiny_data.val, normalize=normalize), cached.best_val_probs, atol=1e-4, rtol=0
    )
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, full_model.backbone.state_dict()[name]), name

    # The features were computed once, into two cache entries (train, validation); a second trial
    # with other head settings reads them back and computes nothing.
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 2
    _, again = train_model(
        _frozen(weights, dropout=0.0, lr=1e-2), tiny_data, replace(SETTINGS, feature_cache=cache), seed=4
    )
    assert sorted(cache.glob("*.npy")) == entries and again.epochs_run == 4
    # Faster, by how much is the benchmark's to say; here only that the cached epochs are not slower.
    assert cached.seconds_per_epoch <= full.seconds_per_epoch * 1.5


@pytest.mark.parametrize(
    "changes",
    [{"augment": "flip"}, {"freeze_backbone": False}, {"mixup_alpha": 0.2}, {"imbalance": "smote"}],
)
def test_trials_that_change_an_image_take_the_full_path(tiny_data, weights, tmp_path, changes):
    from dataclasses import replace

    cache = tmp_path / "cache"
    train_model(_frozen(weights, **changes), tiny_data, replace(SETTINGS, max_epochs=1, feature_cache=cache), seed=0)
    assert not list(cache.glob("*.npy"))


@pytest.fixture(scope="module")
def tiny_data(tiny_device_data):
    return tiny_device_data

from __future__ import annotations

import math
import signal
import subprocess
import sys

import pytest
import torch

from tuner.data import load_dataset
from tuner.data.device import DeviceData
from tuner.train.build import RunSettings, build_classifier, seed_everything
from tuner.train.hparams import IMBALANCES, OPTIMIZERS, SCHEDULERS, Hyperparameters
from tuner.train.loop import NonFiniteLossError
from tuner.train.run import train_model


def test_the_training_stack_does_not_import_optuna_or_the_space():
    code = (
        "import sys, tuner.train, tuner.train.run, tuner.train.loop; "
        "print('optuna' in sys.modules, any(m.startswith('tuner.search') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


@pytest.fixture(scope="module")
def tiny_data(tiny_device_data) -> DeviceData:
    return tiny_device_data


SETTINGS = RunSettings(max_epochs=4, patience=None, monitor="val_auroc", mode="max")


def test_a_ctrl_c_the_garbage_collector_swallows_still_stops_training(tiny_data, monkeypatch):
    """SIGINT handled while a ``__del__`` runs raises KeyboardInterrupt there, where Python prints it as
    ignored and goes on; training still stops at the end of the epoch."""
    from tuner import interrupts

    class Dropped:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs here, inside the finalizer

    swallowed: list = []
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)
    monkeypatch.setattr(interrupts, "_requested", False)
    previous = signal.getsignal(signal.SIGINT)
    interrupts.install()
    try:
        Dropped()
        assert [s.exc_type for s in swallowed] == [KeyboardInterrupt]  # lost, as Python loses it
        reported: list[int] = []
        with pytest.raises(KeyboardInterrupt):
            train_model(
                Hyperparameters(width=8, depth=2), tiny_data, SETTINGS, seed=0, on_epoch=lambda e, m: reported.append(e)
            )
        assert reported == []  # stopped at the end of the first epoch, before it was reported
    finally:
        signal.signal(signal.SIGINT, previous)


# What each name must build, written out here rather than read from the registry: a registry that maps
# "adam" to SGD fails this test.
OPTIMIZER_CLASSES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _expected_lrs(scheduler: str, lr: float) -> list[float] | None:
    """The rate of each of 4 epochs for step_size=2, milestones=(2, 3), gamma=0.5, worked out by hand."""
    return {
        "none": [lr] * 4,
        "step": [lr, lr, lr / 2, lr / 2],
        "multistep": [lr, lr, lr / 2, lr / 4],
        "exponential": [lr, lr / 2, lr / 4, lr / 8],
        "cosine": [lr * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)],
    }.get(scheduler)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_optimizer_and_scheduler_trains(tiny_data, optimizer, scheduler):
    from tuner.train.build import build_components

    lr = 3e-3 if optimizer != "sgd" else 3e-2
    hp = Hyperparameters(
        width=8,
        depth=2,
        optimizer=optimizer,
        scheduler=scheduler,
        lr=lr,
        batch_size=32,
        step_size=2,
        milestones=(2, 3),
        gamma=0.5,
        momentum=0.8,
    )
    built = build_components(hp, tiny_data, SETTINGS, seed=0).optimizer
    assert type(built) is OPTIMIZER_CLASSES[optimizer]
    assert built.defaults.get("momentum", 0.8) == 0.8
    _, result = train_model(hp, tiny_data, SETTINGS, seed=0)
    losses = result.history["train_loss"]
    assert losses[-1] < losses[0], losses
    assert result.epochs_run == 4 and 1 <= result.best_epoch <= 4
    lrs = result.history["lr"]
    expected = _expected_lrs(scheduler, lr)
    if expected is not None:
        assert lrs == pytest.approx(expected, rel=1e-6), lrs
    elif scheduler == "onecycle":  # per step: up from lr/25 to lr, then down to lr/25/1e4 at the last step
        assert lr / 25 < lrs[0] <= lr and lrs[-1] < lr / 1000 and max(lrs) <= lr, lrs
    else:  # plateau: lowered by its factor, never raised
        assert all(b == a or b == pytest.approx(a * 0.1) for a, b in zip(lrs, lrs[1:], strict=False)), lrs


def test_gradient_accumulation_of_four_batches_of_16_is_one_step_on_64(tiny_data):
    """Four batches of 16 accumulated make the same update as one batch of 64 (the loss of each scaled by
    a quarter); stepping after every batch of 16 does not."""
    import copy

    from tuner.train.loop import train_one_epoch
    from tuner.train.optim import LRSchedule

    torch.manual_seed(0)
    hp = Hyperparameters(model="mlp", hidden_sizes=(32,), dropout=0.0, batch_norm=False)  # no batch statistics
    model = build_classifier(hp, num_classes=2, channels=3, image_size=16)
    x, y = torch.rand(128, 3, 16, 16), torch.randint(0, 2, (128,))

    def trained(batch_size: int, accumulate: int) -> torch.nn.Module:
        m = copy.deepcopy(model)
        batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, 128, batch_size)]
        train_one_epoch(
            m,
            batches,
            loss_fn=torch.nn.CrossEntropyLoss(),
            optimizer=torch.optim.SGD(m.parameters(), lr=0.5),
            schedule=LRSchedule(None, "none"),
            accumulate_steps=accumulate,
        )
        return m

    whole, accumulated, every = trained(64, 1), trained(16, 4), trained(16, 1)
    for (name, a), b, c in zip(whole.named_parameters(), accumulated.parameters(), every.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
        assert not torch.allclose(a, c, atol=1e-4), name
    hp = Hyperparameters(width=8, depth=2, batch_size=16, accumulate_steps=4, loss="focal", lr=5e-3)
    _, result = train_model(hp, tiny_data, SETTINGS, seed=0)
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]


def test_non_finite_loss_raises(tiny_data):
    hp = Hyperparameters(
        model="mlp", hidden_sizes=(256, 256, 256, 256), optimizer="sgd", lr=10.0, momentum=0.99, batch_size=16
    )
    with pytest.raises(NonFiniteLossError):
        train_model(hp, tiny_data, SETTINGS, seed=0)


def test_early_stopping_and_best_state(tiny_data):
    settings = RunSettings(max_epochs=30, patience=2, monitor="val_auroc", mode="max")
    model, result = train_model(Hyperparameters(width=4, depth=2, lr=0.05, batch_size=32), tiny_data, settings, seed=0)
    assert result.stopped_early and result.epochs_run == result.best_epoch + 2
    assert result.best_value == max(result.history["val_auroc"])
    assert set(result.best_state) == set(model.state_dict())


def test_same_seed_same_result(tiny_data):
    hp = Hyperparameters(width=4, depth=2, augment="affine", imbalance="oversample", batch_size=32)
    a = train_model(hp, tiny_data, SETTINGS, seed=5)[1].history
    b = train_model(hp, tiny_data, SETTINGS, seed=5)[1].history
    assert a["val_auroc"] == b["val_auroc"] and a["train_loss"] == b["train_loss"]


def test_frozen_backbone_only_trains_the_head(tiny_data):
    hp = Hyperparameters(model="test_resnet", freeze_backbone=True, hidden_sizes=(16,), dropout=0.2, batch_size=64)
    model, result = train_model(
        hp, tiny_data, RunSettings(max_epochs=1, patience=None, monitor="val_auroc", mode="max"), seed=0
    )
    seed_everything(0)
    fresh = build_classifier(hp, num_classes=2, channels=3, image_size=16)
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    # weights and BatchNorm statistics of the backbone are exactly as initialised
    torch.testing.assert_close(model.backbone.state_dict(), fresh.backbone.state_dict())
    assert not torch.equal(model.head[-1].weight, fresh.head[-1].weight)
    assert result.epochs_run == 1


@pytest.fixture
def tagged_data(csv_manifest, tmp_path):
    """The CSV manifest with an annotator-agreement column, plus a folder of 'synthetic' malignant images."""
    import csv

    from tests.conftest import make_image_folder
    from tuner.data.sources import CsvColumns

    rows = list(csv.DictReader(csv_manifest.open()))
    for i, row in enumerate(rows):
        row["agreement"] = ("3/7", "4/7", "7/7")[i % 3]
    with csv_manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    extra = make_image_folder(tmp_path / "extra", {"malignant": 12}, seed=9) / "malignant"
    ds = load_dataset(
        str(csv_manifest),
        image_size=12,
        columns=CsvColumns(group="patient", tag="agreement"),
        extra_train=(str(extra), "malignant"),
        cache_dir=tmp_path / "cache",
    )
    return ds, DeviceData.from_dataset(ds, torch.device("cpu"))


def test_training_pool_drops_hard_examples_adds_extra_images_and_leaves_validation_alone(tagged_data):
    import numpy as np

    from tuner.data.device import training_pool
    from tuner.train.build import loss_class_weights

    ds, data = tagged_data
    malignant = ds.class_names.index("malignant")
    pool, labels = training_pool(Hyperparameters(), data, seed=0)
    assert pool is data.train and labels is data.train_labels  # nothing asked, nothing copied

    hp = Hyperparameters(drop_hard=("3/7", "4/7"), extra_ratio=1.0)
    pool, labels = training_pool(hp, data, seed=0)
    kept = ds.train.tags == "7/7"
    real_malignant = int((ds.train.labels[kept] == malignant).sum())
    assert len(pool) == len(labels) == kept.sum() + min(12, real_malignant)
    assert (np.bincount(labels, minlength=2)[malignant]) == real_malignant + min(12, real_malignant)
    assert torch.equal(pool.labels, torch.from_numpy(labels))
    assert len(data.val) == len(ds.val) and data.val.labels.tolist() == ds.val.labels.tolist()

    smote, smote_labels = training_pool(Hyperparameters(imbalance="smote"), data, seed=0)
    assert len(set(np.bincount(smote_labels).tolist())) == 1, "SMOTE balances the training pool"
    assert len(smote) > len(data.train) and len(data.train) == len(ds.train)

    weights = loss_class_weights(Hyperparameters(class_weights={"malignant": 0.85, "benign": 0.5}), data, labels)
    assert weights[malignant] == 0.85 and weights[1 - malignant] == 0.5
    balanced = loss_class_weights(Hyperparameters(class_weights="balanced"), data, labels)
    assert balanced[malignant] > 1 > balanced[1 - malignant]


def test_per_class_multipliers_and_weights_train_by_class_name(tagged_data):
    from tuner.errors import TunerError

    _, data = tagged_data
    hp = Hyperparameters(
        width=4,
        depth=2,
        batch_size=8,
        imbalance="multiply",
        class_multipliers={"malignant": 3.0},
        class_weights="balanced",
        drop_hard=("3/7",),
        extra_ratio=0.5,
    )
    _, result = train_model(hp, data, SETTINGS, seed=0)
    assert result.epochs_run == 4
    with pytest.raises(TunerError, match="class_multipliers names class 'cancer'"):
        train_model(hp.model_copy(update={"class_multipliers": {"cancer": 3.0}}), data, SETTINGS, seed=0)


@pytest.mark.parametrize("strategy", IMBALANCES)
def test_every_imbalance_strategy_keeps_its_promise_on_training_only(tiny_data, strategy, monkeypatch):
    import numpy as np

    from tuner.data.imbalance import SYNTHESIZING, epoch_indices, target_counts
    from tuner.train.build import build_components

    hp = Hyperparameters(width=4, depth=2, imbalance=strategy, ratio=2.0, class_multipliers={"malignant": 2.5})
    val_before = tiny_data.val.images.clone()
    c = build_components(hp, tiny_data, SETTINGS, seed=0)
    labels = tiny_data.train_labels
    counts = np.bincount(labels, minlength=2)
    if strategy in SYNTHESIZING:  # new minority images, made once, up to the ratio (ADASYN: about)
        made, wanted = np.bincount(c.pool_labels, minlength=2), list(target_counts(labels, strategy, 2.0).values())
        assert made[0] == wanted[0] and abs(made[1] - wanted[1]) <= (0 if strategy == "smote" else 0.1 * wanted[1])
    else:
        assert c.pool is tiny_data.train
    epoch = epoch_indices(c.pool_labels, c.strategy, ratio=2.0, seed=1, multipliers=c.multipliers)
    drawn = np.bincount(c.pool_labels[epoch], minlength=2)
    if strategy == "weighted_sampler":
        assert drawn.sum() == counts.sum() and abs(drawn[0] - drawn[1]) < 0.3 * drawn.sum()
    else:
        assert drawn.tolist() == list(target_counts(c.pool_labels, c.strategy, 2.0, c.multipliers).values())
    assert torch.equal(tiny_data.val.images, val_before), "validation is never resampled"
    # ...and the training loop trains on what the strategy draws: the labels of the batches of one epoch
    import tuner.train.run as run

    trained: list[torch.Tensor] = []

    def recording(pool, order, *args, **kwargs):  # tuner's own batching, watched (training batches only)
        for x, y in real(pool, order, *args, **kwargs):
            if pool is not tiny_data.val:
                trained.append(y)
            yield x, y

    real = run.iterate_batches
    monkeypatch.setattr(run, "iterate_batches", recording)
    one_epoch = RunSettings(max_epochs=1, patience=None, monitor="val_auroc", mode="max")
    train_model(hp, tiny_data, one_epoch, seed=0)
    seen = np.bincount(torch.cat(trained).numpy(), minlength=2)
    epoch = epoch_indices(c.pool_labels, c.strategy, ratio=2.0, seed=0 * 1009 + 1, multipliers=c.multipliers)  # epoch 1
    assert seen.tolist() == np.bincount(c.pool_labels[epoch], minlength=2).tolist(), strategy


def _direct_fit(data: DeviceData, **overrides):
    """engine.fit called directly (no tuner builders beyond the components), on the tiny data."""
    from functools import partial

    from tuner.data.loader import iterate_batches
    from tuner.train.build import build_components
    from tuner.train.loop import fit
    from tuner.train.losses import logits_to_probs
    from tuner.train.metrics import classification_metrics

    hp = Hyperparameters(width=4, depth=2, lr=0.05, batch_size=32)
    c = build_components(hp, data, SETTINGS, seed=0)
    generator = torch.Generator().manual_seed(0)

    def batches(split, order, size):
        return iterate_batches(split, order, size, normalize=c.normalize)

    kwargs = {
        "train_batches": lambda epoch: batches(data.train, torch.randperm(len(data.train), generator=generator), 32),
        "val_batches": lambda: batches(data.val, torch.arange(len(data.val)), 64),
        "loss_fn": c.loss_fn,
        "to_probs": partial(logits_to_probs, num_classes=2, positive_index=data.positive_index),
        "metrics_fn": partial(classification_metrics, positive_index=data.positive_index),
        "optimizer": c.optimizer,
        "schedule": c.schedule,
        "max_epochs": 12,
        "monitor": "val_loss",
        "mode": "min",
        "patience": 2,
        **overrides,
    }
    return c.model, fit(c.model, **kwargs)


def test_fit_keeps_the_best_epoch_and_stops_after_patience(tiny_data):
    model, result = _direct_fit(tiny_data)
    losses = result.history["val_loss"]
    assert result.epochs_run == len(losses) and result.best_epoch == 1 + losses.index(min(losses))
    assert result.best_value == min(losses)
    if result.stopped_early:
        assert result.epochs_run - result.best_epoch == 2
    # The state kept is the best epoch's: loaded back, it reproduces that epoch's validation probabilities.
    model.load_state_dict(result.best_state)
    from tuner.train.loop import predict

    probs, _, _ = predict(
        model,
        [(x, y) for x, y in _val_batches(tiny_data)],
        to_probs=lambda logits: logits.softmax(1),
    )
    assert torch.allclose(probs, result.best_val_probs, atol=1e-5)


def _val_batches(data: DeviceData):
    from tuner.data.loader import Normalize, iterate_batches

    return iterate_batches(data.val, torch.arange(len(data.val)), 64, normalize=Normalize((0.5,) * 3, (0.5,) * 3))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": "maximize"}, "mode must be 'max' or 'min', but got mode='maximize'"),
        ({"max_epochs": 0}, "max_epochs must be at least 1, but got max_epochs=0"),
        ({"patience": 0}, "patience must be None or at least 1, but got patience=0"),
        ({"accumulate_steps": 0}, "accumulate_steps must be at least 1"),
        ({"grad_clip": -1.0}, "grad_clip must be 0 (off) or positive"),
        ({"val_batches": None}, "without validation batches monitor must be 'train_loss', but got monitor='val_loss'"),
        ({"monitor": "val_aucroc"}, "monitor must be one of"),
        ({"ema_decay": 1.0}, "ema_decay must be 0 (off) or in (0, 1), but got ema_decay=1.0"),
    ],
)
def test_fit_checks_its_arguments_like_optuna_constructors(tiny_data, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _direct_fit(tiny_data, **overrides)


def test_a_pretrained_backbone_can_learn_slower_than_its_head(tiny_data):
    from tuner.train.build import build_components

    hp = Hyperparameters(width=4, depth=2, lr=1e-2, backbone_lr_ratio=0.1, scheduler="onecycle", hidden_sizes=(8,))
    c = build_components(hp, tiny_data, SETTINGS, seed=0)
    head, backbone = c.optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(p) for p in c.model.head.parameters()}
    assert {id(p) for p in backbone["params"]} == {id(p) for p in c.model.backbone.parameters()}
    assert backbone["max_lr"] == pytest.approx(0.1 * head["max_lr"]) and head["max_lr"] == pytest.approx(1e-2)
    _, result = train_model(hp, tiny_data, SETTINGS, seed=0)
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]
    # The default keeps one rate for all: the same training as before the option existed.
    same = build_components(Hyperparameters(width=4, depth=2, lr=1e-2), tiny_data, SETTINGS, seed=0)
    assert {g["lr"] for g in same.optimizer.param_groups} == {1e-2}


def test_weight_averaging_validates_and_returns_the_average_without_changing_training(tiny_data):
    hp = Hyperparameters(width=4, depth=2, lr=0.05, batch_size=32)
    settings = RunSettings(max_epochs=4, patience=None, monitor="val_loss", mode="min")
    plain_model, plain = train_model(hp, tiny_data, settings, seed=0)
    # A decay of almost 0 averages nothing: the same validation as without, so it is the average that
    # is validated and nothing else changed.
    _, none = train_model(hp.model_copy(update={"ema_decay": 1e-9}), tiny_data, settings, seed=0)
    assert none.history["val_loss"] == pytest.approx(plain.history["val_loss"], rel=1e-5)

    ema_model, ema = train_model(hp.model_copy(update={"ema_decay": 0.9}), tiny_data, settings, seed=0)
    assert ema.history["train_loss"] == plain.history["train_loss"]  # the trained weights follow the same path
    assert ema.history["val_loss"] != pytest.approx(plain.history["val_loss"], rel=1e-3)

    def weights(model: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert not torch.allclose(weights(ema_model), weights(plain_model))  # the model returned is the average
    from tuner.train.loop import predict

    ema_model.load_state_dict(ema.best_state)  # and the best epoch's state is the average's too
    probs, _, _ = predict(ema_model, list(_val_batches(tiny_data)), to_probs=lambda logits: logits.softmax(1))
    assert torch.allclose(probs, ema.best_val_probs, atol=1e-5)


def test_warmup_raises_the_rate_linearly_then_hands_over_to_the_schedule(tiny_data):
    settings = RunSettings(max_epochs=6, patience=None, monitor="val_auroc", mode="max")
    hp = Hyperparameters(width=4, depth=2, lr=0.01, batch_size=32, scheduler="cosine", warmup_epochs=2)
    _, result = train_model(hp, tiny_data, settings, seed=0)
    cosine_over_the_rest = [0.01 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert result.history["lr"] == pytest.approx([0.01 / 3, 0.02 / 3, *cosine_over_the_rest])
    from tuner.errors import TunerError

    with pytest.raises(TunerError, match="not to scheduler='onecycle' \\(it warms up by itself\\)"):
        train_model(hp.model_copy(update={"scheduler": "onecycle"}), tiny_data, settings, seed=0)


def test_mixup_and_cutmix_blend_batches_and_weigh_both_labels():
    import numpy as np
    from timm.loss import SoftTargetCrossEntropy

    from tuner.train.losses import CrossEntropy
    from tuner.train.mixing import MixedTargets, MixingLoss, mix_batches

    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 1, 0, 1, 0])
    ((mixed, t),) = mix_batches([(x, y)], mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, rng=np.random.default_rng(1))
    assert isinstance(t, MixedTargets) and 0 < t.lam < 1
    torch.testing.assert_close(mixed, t.lam * x + (1 - t.lam) * x.flip(0))
    assert torch.equal(t.first, y) and torch.equal(t.second, y.flip(0))

    ((cut, t),) = mix_batches([(x, y)], mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, rng=np.random.default_rng(2))
    from_partner = (cut == x.flip(0)) & (cut != x)
    kept = 1 - from_partner[0, 0].float().mean().item()  # the box is the same for every image
    assert t.lam == pytest.approx(kept) and 0 < t.lam < 1

    ((same, t),) = mix_batches([(x, y)], mixup_alpha=0.4, cutmix_alpha=0.0, prob=0.0, rng=np.random.default_rng(1))
    assert same is x and t is y  # mixup_prob 0: nothing blended

    # For cross-entropy the weighted sum of both labels' losses is timm's soft-target loss.
    logits = torch.randn(6, 2, generator=gen)
    soft = 0.3 * torch.nn.functional.one_hot(y, 2) + 0.7 * torch.nn.functional.one_hot(y.flip(0), 2)
    loss = MixingLoss(CrossEntropy(None))(logits, MixedTargets(y, y.flip(0), 0.3))
    torch.testing.assert_close(loss, SoftTargetCrossEntropy()(logits, soft.float()))
    assert MixingLoss(CrossEntropy(None))(logits, y) == CrossEntropy(None)(logits, y)  # validation: plain


def test_a_trial_trains_with_mixup_and_cutmix_reproducibly(tiny_data):
    hp = Hyperparameters(width=4, depth=2, batch_size=32, mixup_alpha=0.4, cutmix_alpha=1.0, loss="focal")
    a = train_model(hp, tiny_data, SETTINGS, seed=3)[1].history
    b = train_model(hp, tiny_data, SETTINGS, seed=3)[1].history
    plain = train_model(hp.model_copy(update={"mixup_alpha": 0.0, "cutmix_alpha": 0.0}), tiny_data, SETTINGS, seed=3)
    assert a["train_loss"] == b["train_loss"] and a["val_auroc"] == b["val_auroc"]
    assert a["train_loss"] != plain[1].history["train_loss"]
    assert all(math.isfinite(v) for v in a["train_loss"])

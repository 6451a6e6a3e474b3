from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from tuner.train.losses import build_loss, logits_to_probs
from tuner.train.metrics import classification_metrics


@pytest.mark.parametrize("positive_index", [0, 1])
def test_binary_metrics_equal_sklearn_on_the_same_predictions(positive_index):
    rng = np.random.default_rng(positive_index)
    target = rng.integers(0, 2, 300)
    p1 = np.clip(0.3 * target + rng.uniform(0, 0.7, 300), 0, 1)
    probs = torch.tensor(np.stack([1 - p1, p1], 1), dtype=torch.float32)
    got = classification_metrics(probs, torch.tensor(target), positive_index=positive_index)

    is_pos = (target == positive_index).astype(int)
    score = probs[:, positive_index].numpy()
    pred = (score >= 0.5).astype(int)
    assert got["auroc"] == pytest.approx(skm.roc_auc_score(is_pos, score), abs=1e-6)
    assert got["auprc"] == pytest.approx(skm.average_precision_score(is_pos, score), abs=1e-6)
    assert got["f1"] == pytest.approx(skm.f1_score(is_pos, pred), abs=1e-6)
    assert got["recall"] == pytest.approx(skm.recall_score(is_pos, pred), abs=1e-6)
    assert got["precision"] == pytest.approx(skm.precision_score(is_pos, pred), abs=1e-6)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(is_pos, pred), abs=1e-6)
    assert got["specificity"] == pytest.approx(skm.recall_score(is_pos, pred, pos_label=0), abs=1e-6)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(is_pos, pred), abs=1e-6)


def test_ranking_metrics_use_probabilities_not_thresholded_labels():
    # All scores below 0.5: thresholded labels are all negative, yet the ranking is perfect.
    target = torch.tensor([0, 0, 1, 1])
    p1 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = classification_metrics(torch.stack([1 - p1, p1], 1), target, positive_index=1)
    assert got["auroc"] == 1.0 and got["auprc"] == pytest.approx(1.0)
    assert got["recall"] == 0.0


def test_multiclass_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[target]
    probs = torch.tensor(logits).softmax(1).float()
    got = classification_metrics(probs, torch.tensor(target))
    pred = probs.argmax(1).numpy()
    assert got["auroc"] == pytest.approx(
        skm.roc_auc_score(target, probs.numpy(), multi_class="ovr", average="macro"), abs=1e-5
    )
    assert got["f1"] == pytest.approx(skm.f1_score(target, pred, average="macro"), abs=1e-6)
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(target, pred), abs=1e-6)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(target, pred), abs=1e-6)


def test_one_logit_bce_probabilities_put_the_positive_class_where_it_belongs():
    logits = torch.tensor([[2.0], [-1.0]])
    probs = logits_to_probs(logits, num_classes=2, positive_index=0)
    assert probs[0, 0] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    torch.testing.assert_close(probs.sum(1), torch.ones(2))
    loss = build_loss("bce", num_classes=2, positive_index=0)
    # target 0 is the positive class: a large positive logit means a small loss
    assert loss(torch.tensor([[5.0]]), torch.tensor([0])) < loss(torch.tensor([[5.0]]), torch.tensor([1]))


def test_class_weights_weigh_each_item_by_its_class():
    """Weighted CE and focal are the per-item losses weighted by their class's weight, over the sum of
    the weights (PyTorch's weighted mean); focal is CE scaled by (1 - p_true)^gamma."""
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    weights = torch.tensor([0.5, 3.0])
    per_item = -torch.log_softmax(logits, 1)[torch.arange(8), target]
    w = weights[target]
    weighted = build_loss("ce", num_classes=2, class_weights=weights)(logits, target)
    torch.testing.assert_close(weighted, (w * per_item).sum() / w.sum())
    focal = build_loss("focal", num_classes=2, class_weights=weights, focal_gamma=2.0)(logits, target)
    torch.testing.assert_close(focal, (w * (1 - torch.exp(-per_item)) ** 2 * per_item).sum() / w.sum())
    plain = build_loss("ce", num_classes=2)(logits, target)
    torch.testing.assert_close(plain, per_item.mean())


def test_multiclass_report_puts_the_focus_class_first():
    from tuner.train.metrics import evaluation_report

    target = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    probs = torch.eye(3)[torch.tensor([0, 1, 1, 1, 2, 2, 0])]
    report = evaluation_report(probs, target, class_names=("normal", "benign", "cancer"), positive_index=2)
    assert report["focus_class"] == "cancer" and report["focus_recall"] == pytest.approx(2 / 3)
    assert report["per_class"]["benign"]["recall"] == 1.0 and report["confusion_matrix"][2] == [1, 0, 2]
    assert report["recall"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)  # macro


@pytest.mark.parametrize("classes", [2, 3])
def test_every_metric_a_space_can_name_is_computed_and_nothing_else(classes):
    """The metric names live in one place: the schema's allowed values are derived from it, and the
    metrics computed each epoch are exactly those names (so no study.metric can be a KeyError)."""
    from pydantic import ValidationError

    from tuner.metric_names import FOCUS_NAMES, METRIC_NAMES, VALIDATION_METRICS
    from tuner.search.space import StudySettings

    probs = torch.softmax(torch.randn(30, classes, generator=torch.Generator().manual_seed(0)), 1)
    computed = classification_metrics(probs, torch.arange(30) % classes, positive_index=classes - 1)
    assert set(computed) == {*METRIC_NAMES, *FOCUS_NAMES}
    assert set(VALIDATION_METRICS) == {f"val_{name}" for name in (*computed, "loss")}
    for name in VALIDATION_METRICS:
        assert StudySettings(metric=name).metric == name
    with pytest.raises(ValidationError, match="val_auroc"):
        StudySettings(metric="val_mcc")

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


# Nine validation scores with one best cut for each rule, worked out by hand:
#   positives 0.135 0.45 0.63 0.72, negatives 0.09 0.18 0.27 0.36 0.54 (predict positive when score >= t)
#   t:          0.72  0.63  0.54  0.45  0.36  0.27  0.18  0.135
#   recall:     1/4   2/4   2/4   3/4   3/4   3/4   3/4   4/4
#   fpr:        0     0     1/5   1/5   2/5   3/5   4/5   4/5
#   tpr - fpr:  .25   .50   .30   .55   .35   .15  -.05   .20   -> youden 0.45 (not the first cut of full recall)
#   F1:         .40   .67   .57   .75   .67   .60   .55   .67   -> max_f1 0.45
#   highest t with recall >= 0.75: 0.45; with recall >= 1: 0.135
HAND_SCORES = [0.135, 0.45, 0.63, 0.72, 0.09, 0.18, 0.27, 0.36, 0.54]
HAND_TARGET = [1, 1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize(
    ("rule", "recall", "expected"),
    [("youden", 0.95, 0.45), ("max_f1", 0.95, 0.45), ("target_recall", 0.75, 0.45), ("target_recall", 1.0, 0.135),
     ("fixed", 0.95, 0.5)],
)  # fmt: skip
@pytest.mark.parametrize("positive_index", [0, 1])
def test_threshold_rules_pick_the_cut_worked_out_by_hand(rule, recall, expected, positive_index):
    from tuner.train.metrics import choose_threshold

    score = torch.tensor(HAND_SCORES)
    probs = torch.stack([score, 1 - score] if positive_index == 0 else [1 - score, score], 1)
    is_pos = torch.tensor(HAND_TARGET)
    target = is_pos if positive_index == 1 else 1 - is_pos
    got = choose_threshold(probs, target, positive_index=positive_index, rule=rule, recall=recall)
    assert got == pytest.approx(expected)
    if rule == "youden":  # and against scikit-learn's ROC curve
        fpr, tpr, cuts = skm.roc_curve(HAND_TARGET, HAND_SCORES)
        assert got == pytest.approx(cuts[np.argmax(tpr - fpr)])


def _binary_probs(score: np.ndarray) -> torch.Tensor:
    p = torch.tensor(score, dtype=torch.float32)
    return torch.stack([1 - p, p], 1)


def test_bootstrap_ci_of_auroc_matches_its_known_standard_error():
    """Scores of 300 positives ~ N(1, 1) and 300 negatives ~ N(0, 1) (logistic-squashed): the 95% interval's
    half-width is close to 1.96 times Hanley and McNeil's standard error of the AUROC, computed independently."""
    from scipy.stats import norm

    from tuner.final.evaluation import bootstrap_ci
    from tuner.train.metrics import classification_metrics

    rng = np.random.default_rng(0)
    n = 300
    raw = np.concatenate([rng.normal(1, 1, n), rng.normal(0, 1, n)])
    target = torch.tensor([1] * n + [0] * n)
    probs = _binary_probs(1 / (1 + np.exp(-raw)))
    auc = classification_metrics(probs, target)["auroc"]
    assert auc == pytest.approx(norm.cdf(1 / np.sqrt(2)), abs=0.04)  # the population AUROC, 0.760
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se = np.sqrt((auc * (1 - auc) + (n - 1) * (q1 - auc**2) + (n - 1) * (q2 - auc**2)) / (n * n))
    low, high = bootstrap_ci([probs], target, positive_index=1, thresholds=0.5, bootstrap=400)["auroc"]
    assert low < auc < high
    assert (high - low) / 2 == pytest.approx(1.96 * se, rel=0.2), (low, high, se)


def test_bootstrap_of_all_resamples_at_once_gives_the_one_by_one_intervals():
    """Binary, ungrouped: every resample in one batched call. One image per group draws the same resamples
    and takes the one-by-one path: the intervals agree, for two seeds at their own thresholds."""
    from tuner.final.evaluation import bootstrap_ci

    rng = np.random.default_rng(2)
    target = torch.from_numpy((rng.random(80) < 0.3).astype(np.int64))
    seeds = [_binary_probs(np.clip(0.3 * target.numpy() + rng.random(80) * 0.7, 0, 1)) for _ in range(2)]
    kw = {"positive_index": 1, "thresholds": [0.4, 0.55], "bootstrap": 200}
    batched = bootstrap_ci(seeds, target, **kw)
    one_by_one = bootstrap_ci(seeds, target, groups=np.arange(80), **kw)
    assert batched.keys() == one_by_one.keys() and len(batched) == 8
    for name, (low, high) in batched.items():
        assert low < high and (low, high) == pytest.approx(one_by_one[name], abs=1e-6), name


def test_grouped_bootstrap_resamples_whole_patients():
    """Each of 120 patients contributes four identical images: resampling images treats copies as independent
    evidence and narrows the interval by about sqrt(4); resampling patients (groups) gives the width of
    120 independent images."""
    from tuner.final.evaluation import bootstrap_ci

    rng = np.random.default_rng(1)
    n = 120
    raw = np.concatenate([rng.normal(1, 1, n // 2), rng.normal(0, 1, n // 2)])
    labels = np.array([1] * (n // 2) + [0] * (n // 2))
    one = bootstrap_ci([_binary_probs(raw)], torch.tensor(labels), positive_index=1, thresholds=0.5, bootstrap=400)
    copies = np.repeat(raw, 4), torch.tensor(np.repeat(labels, 4))
    groups = np.repeat(np.arange(n), 4)
    kw = {"positive_index": 1, "thresholds": 0.5, "bootstrap": 400}
    by_image = bootstrap_ci([_binary_probs(copies[0])], copies[1], **kw)
    by_patient = bootstrap_ci([_binary_probs(copies[0])], copies[1], groups=groups, **kw)
    width = {
        name: ci["auroc"][1] - ci["auroc"][0]
        for name, ci in [("one", one), ("image", by_image), ("patient", by_patient)]
    }
    assert width["patient"] == pytest.approx(width["one"], rel=0.2), width
    assert width["patient"] / width["image"] == pytest.approx(2.0, rel=0.2), width

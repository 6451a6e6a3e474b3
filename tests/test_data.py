from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests.conftest import make_image_folder
from tuner.data import load_dataset
from tuner.data.augment import AUGMENT_PRESETS, BatchAugment
from tuner.data.imbalance import balanced_class_weights, epoch_indices, synthesize, target_counts
from tuner.data.sources import CsvColumns
from tuner.data.splits import assign_splits
from tuner.data.synthetic import make_synthetic, synthetic_labels
from tuner.errors import DataError


def test_image_folder_is_split_stratified_and_reproducibly(image_folder, tmp_path):
    kw = dict(image_size=16, cache_dir=tmp_path / "cache", val_fraction=0.25, test_fraction=0.25, split_seed=7)
    a = load_dataset(str(image_folder), include_test=True, **kw)
    b = load_dataset(str(image_folder), include_test=True, **kw)
    assert a.class_names == ("benign", "malignant")
    assert a.train.images.shape[1:] == (3, 16, 16) and a.train.images.dtype == np.uint8
    assert len(a.train) + len(a.val) + len(a.test) == 40
    for split in (a.train, a.val, a.test):
        assert split.class_counts(2)[1] >= 1, "every split keeps the minority class"
    np.testing.assert_array_equal(a.val.images, b.val.images)
    assert a.positive_index == 1, "the minority class is the default positive class"


def test_given_splits_are_honoured_and_val_is_carved_from_train(tmp_path):
    make_image_folder(tmp_path / "d" / "train", {"benign": 20, "malignant": 10})
    make_image_folder(tmp_path / "d" / "test", {"benign": 6, "malignant": 3}, seed=5)
    ds = load_dataset(str(tmp_path / "d"), image_size=12, cache_dir=tmp_path / "c", val_fraction=0.2, include_test=True)
    assert len(ds.test) == 9
    assert len(ds.train) + len(ds.val) == 30 and len(ds.val) == 6


def test_grayscale_folder_gives_one_channel(tmp_path):
    root = make_image_folder(tmp_path / "g", {"benign": 10, "malignant": 10}, grey=True)
    ds = load_dataset(str(root), image_size=12, cache_dir=tmp_path / "c")
    assert ds.channels == 1 and ds.train.images.shape[1] == 1


def test_grouped_split_never_puts_a_patient_in_two_splits(csv_manifest, tmp_path):
    ds = load_dataset(
        str(csv_manifest),
        image_size=12,
        columns=CsvColumns(group="patient"),
        cache_dir=tmp_path / "c",
        include_test=True,
        split_seed=3,
    )
    groups = [set(s.groups.tolist()) for s in (ds.train, ds.val, ds.test)]
    assert groups[0] and groups[1] and groups[2]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    assert sum(len(g) for g in groups) == 20


def test_assign_splits_grouped_many_seeds():
    groups = np.array([f"p{i // 4}" for i in range(400)], dtype=object)
    labels = np.array([int(g[1:]) % 5 == 0 for g in groups], dtype=int)  # label is a property of the patient
    splits = []
    for seed in range(5):
        split = assign_splits(labels, groups, val_fraction=0.2, test_fraction=0.2, seed=seed)
        owner = {}
        for g, s in zip(groups, split, strict=True):
            assert owner.setdefault(g, s) == s  # no patient in two splits
        for name in ("val", "test"):
            part = split == name
            assert 0.15 <= part.mean() <= 0.25, (seed, name, part.mean())  # about the fraction asked for
            assert abs(labels[part].mean() - labels.mean()) <= 0.06  # stratified: the same share of positives
        assert (split == assign_splits(labels, groups, val_fraction=0.2, test_fraction=0.2, seed=seed)).all()
        splits.append(split)
    assert len({tuple(s) for s in splits}) == 5, "each seed draws its own split"


def test_cache_is_reused_on_the_second_run(image_folder, tmp_path):
    cache = tmp_path / "cache"
    first = load_dataset(str(image_folder), image_size=16, cache_dir=cache)
    files = sorted(cache.glob("*.npy"))
    stamps = [f.stat().st_mtime_ns for f in files]
    second = load_dataset(str(image_folder), image_size=16, cache_dir=cache)
    assert first.cache_hits == {"all": False} and second.cache_hits == {"all": True}
    assert [f.stat().st_mtime_ns for f in sorted(cache.glob("*.npy"))] == stamps
    np.testing.assert_array_equal(first.train.images, second.train.images)
    # Another size is another entry; a changed file changes the key.
    load_dataset(str(image_folder), image_size=20, cache_dir=cache)
    assert len(list(cache.glob("*.npy"))) == 2
    victim = next((image_folder / "benign").iterdir())
    os.utime(victim, ns=(victim.stat().st_atime_ns, victim.stat().st_mtime_ns + 10**9))
    assert load_dataset(str(image_folder), image_size=16, cache_dir=cache).cache_hits == {"all": False}


def test_npz_test_split_is_never_read_without_include_test(tmp_path):
    """test_labels holds an object array: np.load refuses it, so touching it would raise."""
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(
        path,
        train_images=rng.integers(0, 255, (40, 10, 10), dtype=np.uint8),
        train_labels=np.array([[0]] * 30 + [[1]] * 10, dtype=np.uint8),
        val_images=rng.integers(0, 255, (10, 10, 10), dtype=np.uint8),
        val_labels=np.array([[0]] * 7 + [[1]] * 3, dtype=np.uint8),
        test_images=np.array([object()] * 5, dtype=object),
        test_labels=np.array([object()] * 5, dtype=object),
    )
    ds = load_dataset(str(path), image_size=8, cache_dir=tmp_path / "c")
    assert ds.test is None and len(ds.train) == 40 and ds.train.images.shape == (40, 1, 8, 8)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_dataset(str(path), image_size=8, cache_dir=tmp_path / "c", include_test=True)


def test_folder_test_images_are_not_decoded_without_include_test(tmp_path):
    make_image_folder(tmp_path / "d" / "train", {"benign": 12, "malignant": 6})
    make_image_folder(tmp_path / "d" / "val", {"benign": 4, "malignant": 2}, seed=2)
    (tmp_path / "d" / "test" / "benign").mkdir(parents=True)
    (tmp_path / "d" / "test" / "malignant").mkdir(parents=True)
    (tmp_path / "d" / "test" / "benign" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "d" / "test" / "malignant" / "broken.png").write_bytes(b"not a png")
    ds = load_dataset(str(tmp_path / "d"), image_size=12, cache_dir=tmp_path / "c")
    assert ds.test is None
    with pytest.raises(DataError, match="cannot decode image .*broken.png"):
        load_dataset(str(tmp_path / "d"), image_size=12, cache_dir=tmp_path / "c", include_test=True)


def test_breastmnist_given_splits(breastmnist, tmp_path):
    ds = load_dataset(
        str(breastmnist),
        image_size=28,
        cache_dir=tmp_path / "c",
        label_aliases={"0": "malignant", "1": "benign"},
        positive_class="malignant",
    )
    assert ds.class_names == ("benign", "malignant")
    assert ds.train.class_counts(2) == [399, 147] and ds.val.class_counts(2) == [57, 21]
    assert ds.class_names[ds.positive_index] == "malignant" and ds.test is None


def test_label_aliases_merge_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", {"normal": 10, "benign": 10, "malignant": 8})
    aliases = {"normal": "benign", "malignant": "cancer"}
    ds = load_dataset(str(root), image_size=12, cache_dir=tmp_path / "c", label_aliases=aliases, include_test=True)
    assert ds.class_names == ("benign", "cancer")
    splits = [ds.train, ds.val, ds.test]
    counts = np.bincount(np.concatenate([split.labels for split in splits]), minlength=2)
    assert counts.tolist() == [20, 8], "every normal image joined benign; none dropped"


def test_synthetic_is_deterministic_and_imbalanced():
    a, ya = make_synthetic(120, image_size=24, minority_fraction=0.1, seed=3)
    b, yb = make_synthetic(120, image_size=24, minority_fraction=0.1, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ya, yb)
    np.testing.assert_array_equal(ya, synthetic_labels(120, minority_fraction=0.1, seed=3))
    assert a.shape == (120, 3, 24, 24) and ya.sum() == 12
    assert not np.array_equal(a, make_synthetic(120, image_size=24, minority_fraction=0.1, seed=4)[0])


@pytest.mark.parametrize(
    ("strategy", "ratio", "expected"),
    [
        ("none", 1.0, {0: 90, 1: 10}),
        ("undersample", 1.0, {0: 10, 1: 10}),
        ("undersample", 3.0, {0: 30, 1: 10}),
        ("oversample", 1.0, {0: 90, 1: 90}),
        ("oversample", 2.0, {0: 90, 1: 45}),
        ("multiply", 1.0, {0: 45, 1: 125}),
    ],
)
def test_imbalance_strategies_give_the_promised_counts(strategy, ratio, expected):
    labels = np.array([0] * 90 + [1] * 10)
    multipliers = {0: 0.5, 1: 12.5}  # only 'multiply' reads them
    assert target_counts(labels, strategy, ratio, multipliers) == expected
    for epoch in range(3):
        idx = epoch_indices(labels, strategy, ratio=ratio, seed=epoch, multipliers=multipliers)
        counts = np.bincount(labels[idx], minlength=2)
        assert dict(enumerate(counts.tolist())) == expected
        assert idx.max() < len(labels), "indices point into the training split only"


def test_multiply_repeats_every_minority_item_and_draws_the_fraction_afresh():
    labels = np.array([0] * 30 + [1] * 4)
    epochs = [epoch_indices(labels, "multiply", seed=s, multipliers={1: 2.5}) for s in range(8)]
    for idx in epochs:
        minority = np.bincount(idx[labels[idx] == 1], minlength=34)[30:]
        assert sorted(minority.tolist()) == [2, 2, 3, 3]  # each twice, two of them a third time
    assert len({tuple(np.sort(idx)) for idx in epochs}) > 1


@pytest.mark.parametrize(("strategy", "ratio"), [("smote", 1.0), ("smote", 2.0), ("adasyn", 1.0)])
def test_smote_and_adasyn_make_new_minority_images_between_real_ones(strategy, ratio):
    images, labels = make_synthetic(200, image_size=12, minority_fraction=0.15, seed=2)
    new, new_labels = synthesize(images, labels, strategy, ratio=ratio, seed=0)
    counts = np.bincount(labels, minlength=2)
    wanted = target_counts(labels, strategy, ratio)
    assert new.dtype == np.uint8 and new.shape[1:] == images.shape[1:]
    assert set(new_labels.tolist()) == {1}, "only the minority class gets new images"
    if strategy == "smote":
        assert len(new) == wanted[1] - counts[1]
    else:  # ADASYN draws per-neighbourhood counts that add up to about the target
        assert abs(len(new) - (wanted[1] - counts[1])) <= 0.1 * wanted[1]
    minority = images[labels == 1].reshape(counts[1], -1)
    copies = sum(bool((minority == img.reshape(1, -1)).all(1).any()) for img in new)
    assert copies < 0.1 * len(new), "new images, not copies (a tiny step towards a neighbour rounds back)"
    # interpolations stay inside the minority images' pixel range
    assert (new.reshape(len(new), -1) >= minority.min(0)).all() and (new.reshape(len(new), -1) <= minority.max(0)).all()


def test_undersampling_sees_different_majority_items_each_epoch():
    labels = np.array([0] * 90 + [1] * 10)
    a = set(epoch_indices(labels, "undersample", ratio=1.0, seed=1).tolist())
    b = set(epoch_indices(labels, "undersample", ratio=1.0, seed=2).tolist())
    assert a != b


def test_weighted_sampler_balances_in_expectation():
    labels = np.array([0] * 900 + [1] * 100)
    idx = epoch_indices(labels, "weighted_sampler", seed=0)
    assert len(idx) == 1000 and 0.4 < labels[idx].mean() < 0.6


def test_balanced_class_weights_match_sklearn_rule():
    w = balanced_class_weights(np.array([0] * 90 + [1] * 10), 2)
    np.testing.assert_allclose(w, [100 / (2 * 90), 100 / (2 * 10)])


@pytest.mark.parametrize("name", sorted(AUGMENT_PRESETS))
def test_augmentations_keep_shape_and_dtype_and_differ_per_sample(name):
    x = (torch.rand(1, 3, 24, 24) * 255).expand(16, -1, -1, -1).contiguous()  # the same image 16 times
    out = BatchAugment.from_name(name)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    distinct = len({tuple(o.flatten().tolist()) for o in out})
    assert distinct == 1 if name == "none" else distinct > 1


def test_unknown_augmentation_lists_the_valid_ones():
    with pytest.raises(ValueError, match="flip_rotate"):
        BatchAugment.from_name("mixup")


def test_perspective_maps_the_moved_corners_onto_the_image_corners():
    from tuner.data.augment import CORNERS, homographies, perspective_matrices

    moved = CORNERS + torch.tensor([[0.3, 0.1], [-0.2, 0.25], [-0.05, -0.4], [0.1, -0.1]])
    h = homographies(moved[None], CORNERS[None])[0]
    mapped = torch.cat([moved, torch.ones(4, 1)], 1) @ h.T
    torch.testing.assert_close(mapped[:, :2] / mapped[:, 2:], CORNERS, atol=1e-5, rtol=0)
    never = perspective_matrices(4, 0.5, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(never, torch.eye(3).expand(4, -1, -1), atol=1e-6, rtol=0)


def test_rotation_with_expansion_keeps_the_whole_image_in_view():
    x = torch.full((64, 1, 32, 32), 255.0)
    out = BatchAugment.from_name("rotate180_expand")(x, torch.Generator().manual_seed(0))
    # The rotated square fits inside: the frame's corners are empty, its centre is not.
    assert (out[:, :, 0, 0] < 128).all() and (out[:, :, 16, 16] > 250).all()
    assert out.sum() < x.sum()


def test_random_choice_gives_samples_different_kinds_of_warp():
    from tuner.data.augment import AUGMENT_PRESETS, geometric_matrices

    m = geometric_matrices(AUGMENT_PRESETS["flip_random_choice"], 300, torch.Generator().manual_seed(0))
    projective = (m[:, 2, :2].abs() > 1e-6).any(1)
    assert 0.15 < projective.float().mean() < 0.5, "about a third get a perspective warp"


def test_sampling_grid_equals_affine_grid():
    from torch.nn.functional import affine_grid

    from tuner.data.augment import sampling_grid

    theta = BatchAugment.from_name("affine").affine_matrices(5, torch.Generator().manual_seed(1))
    torch.testing.assert_close(sampling_grid(theta, 13, 17), affine_grid(theta, [5, 3, 13, 17], align_corners=False))
    square = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]]).expand(5, -1, -1)], 1)
    torch.testing.assert_close(sampling_grid(square, 13, 17), sampling_grid(theta, 13, 17))

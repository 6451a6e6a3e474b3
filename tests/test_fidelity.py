"""``train.epoch_images``: an epoch of a fixed number of images, for large sets (cheaper pruning steps)."""

from __future__ import annotations

import numpy as np

from tests.conftest import invoke, tiny_space, write_space
from tuner.data import epoch_chunk
from tuner.search.keys import TrialKey
from tuner.search.storage import load_existing_study


def _passes(size: int):
    def draw(p: int) -> np.ndarray:
        return np.random.default_rng(p).permutation(size)

    return draw


def test_fixed_size_epochs_slice_whole_passes_in_order_and_repeat_exactly() -> None:
    draw = _passes(10)
    epochs = [epoch_chunk(draw, k, 4) for k in range(1, 6)]  # 20 images: two whole passes
    assert all(len(e) == 4 for e in epochs)
    stream = np.concatenate(epochs)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert np.array_equal(stream[:10], draw(0)) and np.array_equal(stream[10:], draw(1))
    # Epoch 4 alone (a resumed trial) is what it was in the run: no state carried between epochs.
    assert np.array_equal(epoch_chunk(draw, 4, 4), epochs[3])
    assert np.array_equal(epoch_chunk(draw, 1, 25), np.concatenate([draw(0), draw(1), draw(2)[:5]]))


def test_a_study_with_fixed_size_epochs_trains_and_prunes_in_those_steps(workdir) -> None:
    space = tiny_space(
        study={"n_trials": 3, "pruner": {"name": "successive_halving", "min_resource": 1}},
        train={"max_epochs": 4, "patience": None, "device": "cpu", "epoch_images": 48},
    )
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    study = load_existing_study("tiny", None)
    completed = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert completed
    for t in completed:
        assert t.user_attrs[TrialKey.IMAGES_PER_EPOCH] == 48  # of about 150 training images
    for t in study.trials:
        assert len(t.user_attrs[TrialKey.HISTORY]["val_auroc"]) == len(t.intermediate_values)
    assert max(len(t.intermediate_values) for t in study.trials) == 4
    refit = invoke("refit", "--study", "tiny", "--bootstrap", "50")
    assert refit.exit_code == 0, refit.output

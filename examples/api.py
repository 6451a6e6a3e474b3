"""tuner from Python: a short search on the built-in synthetic skin lesions, its final model, predictions.

    python examples/api.py

The same calls work in a notebook, where the progress bars show under the cell. The space is a dict here;
a path to a YAML file works the same (``tuner.optimize("search_spaces/quickstart.yaml")``).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

import tuner

SPACE = {
    "study": {"name": "api_example", "metric": "val_auroc", "n_trials": 3},
    "data": {"source": "synthetic", "image_size": 24, "synthetic": {"n_images": 300, "minority_fraction": 0.2}},
    "train": {"max_epochs": 2, "device": "cpu"},
    "params": {
        "model": "small_cnn",
        "width": 8,
        "depth": 3,
        "lr": {"low": 1e-3, "high": 1e-2, "log": True},
        "batch_size": 32,
        "class_weights": {"choices": ["none", "balanced"]},
    },
}


def main() -> None:
    study = tuner.optimize(SPACE)  # an optuna.Study, stored in studies/api_example.db
    print("best trial", study.best_trial.number, study.best_params)

    model = tuner.refit(study, seeds=2)  # trained on train+val, read once on the test split
    report = model.report
    assert report is not None
    auroc = report.final_summary["auroc"]
    print(f"test AUROC {auroc.mean:.3f} (95% CI {auroc.ci_low:.3f}-{auroc.ci_high:.3f}), {report.networks} networks")

    # Two new images drawn here (PIL images; file paths and uint8 arrays work too): a brown and a violet spot.
    images = [_spot((90, 50, 30)), _spot((40, 30, 80))]
    probabilities = model.predict_proba(images)  # one row per image, columns in model.classes order
    print(model.classes, probabilities.round(3), model.predict(images))

    same = tuner.load_model(model.path)  # later, elsewhere: the saved file and its report
    assert np.array_equal(same.predict_proba(images), probabilities)


def _spot(colour: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (24, 24), (200, 200, 200))
    ImageDraw.Draw(image).ellipse((6, 6, 18, 18), fill=colour)
    return image


if __name__ == "__main__":
    main()

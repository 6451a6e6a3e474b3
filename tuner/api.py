"""tuner from Python (a notebook, a script): the functions the ``tuner`` commands themselves call.

    import tuner
    study = tuner.optimize("search_spaces/quickstart.yaml", n_trials=10)   # an optuna.Study
    model = tuner.refit(study, seeds=3)                                  # a FinalModel, model.pt written
    model.predict_proba(["lesion.png"]), model.report.final_summary["auroc"]
    tuner.load_model("studies/quickstart/refit/model.pt").predict(images)

Mistakes raise tuner's own errors (:class:`tuner.errors.TunerError` and its kinds) with the message the
command line prints; nothing here exits the process. Progress shows as bars in a terminal or a Jupyter
notebook (``progress=False`` turns it off) and as one log line per epoch elsewhere.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from tuner import interrupts
from tuner.errors import DataError, TunerError

if TYPE_CHECKING:
    import optuna
    from PIL.Image import Image

    from tuner.final.explain import Explanation
    from tuner.final.results import EvaluationReport, RefitReport
    from tuner.search.space import SearchSpace
    from tuner.train.checkpoint import SavedModel

SpaceLike = Union[str, Path, Mapping[str, Any], "SearchSpace"]
# One image or several: file paths, PIL images, or uint8 arrays H×W, H×W×C or N×H×W×C (channels last,
# as PIL and MedMNIST give them); a list may mix them.
ImagesLike = Union[str, Path, "Image", np.ndarray, Sequence[Union[str, Path, "Image", np.ndarray]]]

CACHE_DIR = Path("studies/cache")


def load_space(
    space: SpaceLike,
    overrides: Mapping[str, Any] | None = None,
    set: Mapping[str, Any] | Sequence[str] | None = None,  # noqa: A002 - the CLI's --set
    *,
    require_data: bool = True,
) -> SearchSpace:
    """A validated search space from a YAML file or a dict (as the file would hold it).

    ``overrides``: dotted keys to values, as ``optimize``'s flags (``{"study.n_trials": 5}``; ``None``
    values are ignored). ``set``: as ``--set``, either ``{"params.lr": 0.001}`` or ``["params.lr=0.001"]``;
    there ``None`` removes the key. ``require_data``: the space (or an override) must name its data.
    """
    from tuner.search import SearchSpace, parse_assignments, parse_space
    from tuner.search import load_space as load_space_file

    if isinstance(set, str):
        raise TunerError(f"set must be a dict or a list of 'key=value' strings, not the string {set!r}")
    assignments = parse_assignments(list(set)) if isinstance(set, Sequence) else set
    if isinstance(space, SearchSpace):
        if not overrides and not assignments:
            return space
        space = space.model_dump(mode="json")
    if isinstance(space, Mapping):
        return parse_space(dict(space), "<dict>", overrides, assignments, require_source=require_data)
    return load_space_file(space, overrides, assignments, require_source=require_data)


def optimize(
    space: SpaceLike,
    *,
    data: str | Path | None = None,
    study: str | None = None,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    device: str | None = None,
    max_epochs: int | None = None,
    set: Mapping[str, Any] | Sequence[str] | None = None,  # noqa: A002 - the CLI's --set
    cache_dir: str | Path = CACHE_DIR,
    workers: int | None = None,
    gpus: Sequence[int] = (),
    workers_per_gpu: int = 1,
    threads: int | None = None,
    join: bool = False,
    plan: bool = False,
    artifacts: str | Path | None = None,
    heartbeat: int = 60,
    storage_patience: float | None = None,
    warm_start: str | None = None,
    warm_start_storage: str | None = None,
    warm_start_top_k: int = 3,
    progress: bool = True,
) -> optuna.Study:
    """Run (or resume) a study, as ``tuner optimize``: each call adds ``n_trials`` trials (``join``: none,
    help finish the study's remaining ones). Returns the Optuna study, stored in ``storage`` (default
    ``sqlite:///studies/<study>.db``). The arguments are ``optimize``'s flags (``tuner optimize --help``)."""
    from tuner.search import start_worker_server

    if (workers or 1) > 1 or gpus:
        start_worker_server()  # its imports run while this process does its own and decodes the data

    from tuner.progress import StudyProgress
    from tuner.search import DEFAULT_PATIENCE, default_storage, load_existing_study, run_optimize

    overrides = {
        "data.source": None if data is None else str(data),
        "study.name": study,
        "study.n_trials": n_trials,
        "study.timeout": timeout,
        "train.device": device,
        "train.max_epochs": max_epochs,
    }
    search_space = load_space(space, overrides, set)
    storage_url = storage or default_storage(search_space.study.name)
    donor = None if warm_start is None else load_existing_study(warm_start, warm_start_storage or storage)
    total = 0 if join or plan else search_space.study.n_trials
    optuna_quiet = _optuna_quiet()
    with interrupts.handled(), optuna_quiet, StudyProgress(search_space, total=total, quiet=not progress) as display:
        return run_optimize(
            search_space,
            storage_url=storage_url,
            cache_dir=Path(cache_dir),
            on_epoch=display.epoch,
            callbacks=[display.trial_finished],
            artifacts_dir=None if artifacts is None else Path(artifacts),
            workers=workers,
            gpus=list(gpus),
            workers_per_gpu=workers_per_gpu,
            threads=threads,
            join=join,
            heartbeat=heartbeat,
            storage_patience=DEFAULT_PATIENCE if storage_patience is None else storage_patience,
            warm_start_from=donor,
            warm_start_top_k=warm_start_top_k,
            plan=plan,
        )


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's own line per trial would repeat tuner's: only its warnings, for the call's length."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(max(before, optuna.logging.WARNING))
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


def refit(
    study: str | optuna.Study,
    *,
    storage: str | None = None,
    trial: int | None = None,
    pick: str | None = None,
    seeds: int = 1,
    folds: int | None = None,
    tta: str = "none",
    top_k: int | None = None,
    out_dir: str | Path | None = None,
    data: str | Path | None = None,
    device: str | None = None,
    cache_dir: str | Path = CACHE_DIR,
    allow_test_reuse: bool = False,
    force: bool = False,
    bootstrap: int = 1000,
    progress: bool = True,
) -> FinalModel:
    """Retrain a trial (``trial``, else the best) on train+validation and read the locked test split once,
    as ``tuner refit``. ``pick`` (a multi-objective study): the Pareto front's trial with the best first
    objective among those meeting conditions such as ``"latency_ms<=20, val_recall>=0.9"``. Writes ``model.pt``, predictions, plots and the report to ``out_dir`` (default
    ``studies/<study>/refit``) and returns the final model with its report."""
    import optuna

    from tuner.final import run_refit
    from tuner.progress import NetworkProgress
    from tuner.search import STUDIES_DIR, load_existing_study, python_call

    call = _call_line(refit, locals())
    loaded = study if isinstance(study, optuna.Study) else load_existing_study(study, storage)
    if pick is not None:
        trial = _picked(loaded, pick, trial)
    folder = Path(out_dir) if out_dir is not None else STUDIES_DIR / loaded.study_name / "refit"
    with python_call(call), NetworkProgress(what="networks", quiet=not progress) as display:
        report = run_refit(
            loaded,
            trial_number=trial,
            seeds=seeds,
            folds=folds,
            tta=tta,
            out_dir=folder,
            data=None if data is None else str(data),
            cache_dir=Path(cache_dir),
            device=device,
            allow_test_reuse=allow_test_reuse,
            force=force,
            bootstrap=bootstrap,
            on_model=display.done,
            on_epoch=display.epoch,
            top_k=top_k,
        )
    return FinalModel(folder / "model.pt", report=report)


def _picked(study: optuna.Study, pick: str, trial: int | None) -> int:
    from tuner.search import pick as pick_from_front
    from tuner.search import study_objectives

    if trial is not None:
        raise TunerError("give either a trial number or pick conditions, not both")
    objectives = study_objectives(study)
    if len(objectives) < 2:
        raise TunerError(
            f"pick chooses from the Pareto front of a multi-objective study (study.metrics); study "
            f"{study.study_name!r} has one objective: refit its best trial, or name one with trial"
        )
    return pick_from_front(study, objectives, pick).number


def _call_line(fn: Any, arguments: dict[str, Any]) -> str:
    """``tuner.refit('breast', seeds=3)``: the call as typed, with the arguments left at their defaults out."""
    parameters = inspect.signature(fn).parameters
    shown = []
    for name, value in arguments.items():
        if name not in parameters or value is parameters[name].default or value == parameters[name].default:
            continue
        value = getattr(value, "study_name", value)  # a study by its name
        text = repr(str(value) if isinstance(value, Path) else value)
        shown.append(text if parameters[name].kind == inspect.Parameter.POSITIONAL_OR_KEYWORD else f"{name}={text}")
    return f"tuner.{fn.__name__}({', '.join(shown)})"


def load_model(path: str | Path, *, device: str = "cpu") -> FinalModel:
    """A ``model.pt`` written by refit, with its ``report.json`` when it lies beside it."""
    from tuner.final import RefitReport

    path = Path(path)
    report_file = path.with_name("report.json")
    report = None
    if report_file.is_file():
        try:
            report = RefitReport.from_json(json.loads(report_file.read_text()))
        except (TypeError, ValueError):  # an older tuner's report, or another file: the model still loads
            report = None
    return FinalModel(path, report=report, device=device)


class FinalModel:
    """The model refit hands back: one network or an average of several (seeds, folds), each over its
    test-time views, with the normalisation, the classes and the threshold chosen on validation.

    ``predict_proba`` gives exactly the probabilities ``tuner predict`` and ``tuner evaluate`` give."""

    def __init__(self, path: str | Path, *, report: RefitReport | None = None, device: str = "cpu") -> None:
        from tuner.train import load_model as load_saved

        self.path = Path(path)
        self.report = report  # the refit's, when known (returned by refit, or report.json beside the file)
        self.saved: SavedModel = load_saved(self.path, device)

    def __repr__(self) -> str:
        networks = len(self.saved.models)
        return (
            f"FinalModel({str(self.path)!r}: {self.saved.hparams.model}, {networks} network{'s' * (networks > 1)}, "
            f"classes {list(self.classes)}, threshold {self.threshold}, TTA {self.saved.tta})"
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.saved.class_names

    @property
    def threshold(self) -> float | None:
        """The decision threshold on the positive class's probability (binary models), else None."""
        return self.saved.threshold

    @property
    def positive_class(self) -> str | None:
        index = self.saved.positive_index
        return None if index is None else self.classes[index]

    @property
    def image_size(self) -> int:
        return self.saved.image_size

    def predict_proba(self, images: ImagesLike, *, batch_size: int = 256) -> np.ndarray:
        """Class probabilities, one row per image, columns in :attr:`classes` order."""
        pixels = as_model_input(images, self.saved.image_size, self.saved.channels)
        return self.saved.probabilities(pixels, batch_size=batch_size).numpy()

    def decide(self, probabilities: np.ndarray) -> list[str]:
        """The class of each row of ``probabilities``: at the threshold (binary), else the most probable."""
        import torch

        labels = self.saved.decide(torch.as_tensor(probabilities))
        return [self.classes[i] for i in labels.tolist()]

    def predict(self, images: ImagesLike, *, batch_size: int = 256) -> list[str]:
        """The predicted class of each image."""
        return self.decide(self.predict_proba(images, batch_size=batch_size))

    def export(self, path: str | Path, *, format: str = "onnx") -> Path:  # noqa: A002 - the CLI's --format
        """Write the model as one ONNX graph (``format="onnx"``, a ``.onnx`` file): uint8 images N×C×S×S in,
        class probabilities out, with the normalisation, every network and every test-time view inside and
        the classes and threshold in its metadata (needs the onnx extra). ``format="monai-bundle"``: a new
        folder holding a MONAI bundle of the same graph, with the model card as its docs/README.md (needs
        the monai extra)."""
        from tuner.final import export_bundle, export_onnx

        path = Path(path)
        if format == "monai-bundle":
            return export_bundle(self.saved, path, model_file=self.path, report=self.report)
        if format != "onnx":
            raise TunerError(f"format must be onnx or monai-bundle, but got format={format!r}")
        if path.suffix != ".onnx":
            raise TunerError(f"the export's file name must end in .onnx, but got {path}")
        return export_onnx(self.saved, path)

    def explain(
        self, images: ImagesLike, *, target: str | None = None, layer: str | None = None, batch_size: int = 32
    ) -> Explanation:
        """Grad-CAM maps of where the model finds evidence for each image's predicted class (or ``target``),
        averaged over its networks and test-time views as the probabilities are. ``layer`` names the layer
        (``model.saved.models[0].named_modules()``); by default a CNN's last feature map or a vision
        transformer's last block. ``.save(out_dir)`` writes the overlays."""
        from tuner.final import explain_model

        pixels = as_model_input(images, self.saved.image_size, self.saved.channels)
        return explain_model(self.saved, pixels, target=target, layer=layer, batch_size=batch_size)

    def evaluate(
        self,
        data: str | Path,
        *,
        out_dir: str | Path | None = None,
        cache_dir: str | Path = CACHE_DIR,
        force: bool = False,
        bootstrap: int = 1000,
    ) -> EvaluationReport:
        """Metrics with bootstrap CIs on a data source (its test split if it has one, else all of it), at the
        frozen threshold, as ``tuner evaluate``; files in ``out_dir`` (default beside the model)."""
        from tuner.final import evaluate

        return evaluate(
            self.path,
            data=str(data),
            out_dir=None if out_dir is None else Path(out_dir),
            cache_dir=Path(cache_dir),
            force=force,
            bootstrap=bootstrap,
            saved=self.saved,
        )


def as_model_input(images: ImagesLike, size: int, channels: int) -> np.ndarray:
    """Images as the model reads them: uint8 N×C×size×size, decoded and resized as tuner decodes data."""
    from PIL.Image import Image

    from tuner.data import decode_files, decode_image, resize_array

    if isinstance(images, (str, Path, Image, np.ndarray)):
        images = [images]
    parts: list[np.ndarray] = []
    files: list[Path] = []  # consecutive paths, decoded together (in parallel threads)
    for item in [*images, None]:
        if isinstance(item, (str, Path)):
            files.append(Path(item))
            continue
        if files:
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise DataError(f"image file(s) not found: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
            parts.append(decode_files(files, size, channels))
            files = []
        if item is None:
            break
        if isinstance(item, Image):
            parts.append(decode_image(item, size, channels)[None])
        elif isinstance(item, np.ndarray):
            # H×W or H×W×C is one image; N×H×W grey images and N×H×W×C a stack of them.
            one = item.ndim == 2 or (item.ndim == 3 and item.shape[-1] in (1, 3, 4))
            parts.append(resize_array(_pixels(item[None] if one else item), size, channels))
        else:
            raise TunerError(f"an image must be a file path, a PIL image or a uint8 array, not {type(item).__name__}")
    if not parts:
        raise TunerError("no images given")
    return np.concatenate(parts)


def _pixels(stack: np.ndarray) -> np.ndarray:
    """N×H×W or N×H×W×C uint8, alpha dropped."""
    if stack.dtype != np.uint8:
        raise TunerError(f"image arrays must be uint8 (0-255, as decoded from files), not {stack.dtype}")
    if stack.ndim not in (3, 4) or (stack.ndim == 4 and stack.shape[-1] not in (1, 3, 4)):
        raise TunerError(
            f"image arrays must be H×W, H×W×C or N×H×W×C (channels last, C 1, 3 or 4), not shape {stack.shape}"
        )
    if stack.ndim == 4 and stack.shape[-1] == 4:
        stack = stack[..., :3]
    if stack.ndim == 4 and stack.shape[-1] == 1:
        stack = stack[..., 0]
    return stack

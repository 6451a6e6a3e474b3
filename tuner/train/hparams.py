"""The hyperparameters a trial can set, with their defaults and constraints.

Every field name is at once the key in a space file's ``params``, the Optuna
parameter name and the keyword the builders take, so ``FixedTrial(best.params)``
replays a trial exactly. A space file only lists what it fixes or searches;
everything else keeps the default below.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tuner.data import AUGMENT_PRESETS, IMBALANCE_STRATEGIES
from tuner.train.losses import LOSSES
from tuner.train.models import POOLINGS
from tuner.train.optim import OPTIMIZERS, SCHEDULERS

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
ClassValue = Annotated[float, Field(gt=0.0, le=1000.0)]
ClassValues = dict[str, ClassValue]  # keyed by class name, e.g. {benign: 0.5, malignant: 0.85}

# The choices come from the factories that implement them, so the two can never disagree.
AUGMENTATIONS = tuple(AUGMENT_PRESETS)
IMBALANCES = tuple(IMBALANCE_STRATEGIES)


class Hyperparameters(BaseModel):
    """One trial's complete, validated hyperparameters."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    # model
    model: str = "small_cnn"
    # Side of the (square) images the model sees; None: data.image_size. Searched, each size is decoded
    # (or resized) once into the cache, like the data's own size.
    image_size: Annotated[int, Field(ge=8, le=1024)] | None = None
    width: Annotated[int, Field(ge=1, le=1024)] = 32
    depth: Annotated[int, Field(ge=1, le=8)] = 3
    batch_norm: bool = True  # small_cnn: BatchNorm after each conv
    pooling: Literal[POOLINGS] = "avg"  # type: ignore[valid-type]  # small_cnn: avg | max | flatten (feature map)
    hidden_sizes: tuple[Annotated[int, Field(ge=1)], ...] = ()
    dropout: Probability = 0.0  # in the head, in front of each linear layer
    dropout_layers: Annotated[int, Field(ge=0, le=8)] = 0  # only the head's last N linear layers (0 = all)
    drop_path: Probability = 0.0  # stochastic depth (timm models that support it)
    pos_dropout: Probability = 0.0  # vision transformers: dropout after the position embedding
    block_dropout: Probability = 0.0  # vision transformers: dropout inside the last `dropout_blocks` blocks
    dropout_blocks: Annotated[int, Field(ge=0)] = 0  # 0 = every block
    pretrained: Union[bool, str] = False  # true: timm's cached weights; a path: a local weights file
    freeze_backbone: bool = False
    # class imbalance and loss
    imbalance: Literal[IMBALANCES] = "none"  # type: ignore[valid-type]
    ratio: Annotated[float, Field(ge=1.0)] = 1.0
    class_multipliers: ClassValues = {}  # imbalance=multiply: times each class appears per epoch (1 if absent)
    class_weights: Union[Literal["none", "balanced"], ClassValues] = "none"  # loss weights; balanced = sklearn's
    extra_ratio: Annotated[float, Field(ge=0.0, le=100.0)] = 0.0  # data.extra_train images per real one of that class
    drop_hard: tuple[str, ...] = ()  # training items whose data.hard_example_column value is listed are left out
    loss: Literal[tuple(LOSSES)] = "ce"  # type: ignore[valid-type]
    label_smoothing: Probability = 0.0
    focal_gamma: Annotated[float, Field(ge=0.0)] = 2.0
    # optimisation
    optimizer: Literal[tuple(OPTIMIZERS)] = "adam"  # type: ignore[valid-type]
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    # The pretrained backbone learns at lr * backbone_lr_ratio, the new head at lr (discriminative fine-tuning).
    backbone_lr_ratio: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    # Decay norm weights and biases too (off, as in timm; see tuner.train.optim.parameter_groups).
    weight_decay_1d: bool = False
    momentum: Probability = 0.9
    batch_size: Annotated[int, Field(ge=1)] = 64
    accumulate_steps: Annotated[int, Field(ge=1)] = 1
    grad_clip: Annotated[float, Field(ge=0.0)] = 0.0
    # Exponential moving average of the weights (0 = off), e.g. 0.99 or 0.999; validated and kept instead.
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # learning-rate schedule
    scheduler: Literal[tuple(SCHEDULERS)] = "none"  # type: ignore[valid-type]
    step_size: Annotated[int, Field(ge=1)] = 10
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    milestones: tuple[Annotated[int, Field(ge=1)], ...] = (10, 15)
    plateau_patience: Annotated[int, Field(ge=0)] = 3  # epochs without gain before the LR is cut
    plateau_factor: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1  # what the LR is multiplied by then
    warmup_epochs: Annotated[int, Field(ge=0)] = 0  # linear warm-up before an epoch schedule (0 = none)
    # augmentation, applied batched on the training device
    augment: Literal[AUGMENTATIONS] = "none"  # type: ignore[valid-type]
    # Mixup / CutMix: Beta(alpha, alpha) blending of each batch with itself reversed (0 = off), in a
    # share mixup_prob of the batches; both on: half the blended batches each.
    mixup_alpha: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    cutmix_alpha: Annotated[float, Field(ge=0.0, le=10.0)] = 0.0
    mixup_prob: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0


HPARAM_NAMES: tuple[str, ...] = tuple(Hyperparameters.model_fields)

# Spellings an older tuner read. A space file that uses one is refused with what to write instead;
# a study stored with one still replays (refit, evaluate), through `upgrade`.
RENAMED = {
    "patience": ("plateau_patience", "the plateau schedule's patience; early stopping's is train.patience"),
    "factor": ("plateau_factor", "the plateau schedule's factor"),
}
RETIRED_VALUES = {
    ("imbalance", "class_weight"): "imbalance: none with class_weights: balanced (class weights belong to the loss)",
}


def renamed(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters under today's names (a stored trial's ``params`` may use older ones)."""
    return {RENAMED[k][0] if k in RENAMED else k: v for k, v in params.items()}


def upgrade(values: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameter values as an older tuner may have stored them, in today's names and values."""
    values = renamed(values)
    if values.get("imbalance") == "class_weight":
        values["imbalance"] = "none"
        if values.get("class_weights", "none") == "none":
            values["class_weights"] = "balanced"
    return values


# Hyperparameters added later whose default differs from what tuner did before they existed: a trial
# stored without the key trained with this value, and replays with it.
BEFORE_ADDED: dict[str, Any] = {"weight_decay_1d": True}


def upgrade_stored(values: dict[str, Any]) -> dict[str, Any]:
    """A trial's stored hyperparameters (``user_attrs["hparams"]``) as today's names and values, with what
    it trained with for every hyperparameter added since."""
    if not values:
        return {}
    return {**BEFORE_ADDED, **upgrade(values)}


CLASS_VALUE: TypeAdapter[float] = TypeAdapter(ClassValue)


@functools.cache  # building a TypeAdapter costs about a millisecond; every trial's suggest asks for several
def field_adapter(name: str) -> TypeAdapter[Any]:
    """A validator for one hyperparameter alone, with the field's constraints."""
    field = Hyperparameters.model_fields[name]
    annotation: Any = field.annotation
    if not field.metadata:
        return TypeAdapter(annotation)
    return TypeAdapter(Annotated.__class_getitem__((annotation, *field.metadata)))  # type: ignore[attr-defined]


def field_kind(name: str) -> str:
    """'int', 'float', 'bool', 'str', 'tuple' or 'per_class': what kind of distribution a field can take."""
    annotation = Hyperparameters.model_fields[name].annotation
    if ClassValues in (annotation, *getattr(annotation, "__args__", ())):
        return "per_class"
    for kind in (bool, int, float, str):
        if annotation is kind:
            return kind.__name__
    origin = getattr(annotation, "__origin__", None)
    if origin is tuple:
        return "tuple"
    return "str"  # Literal[...] choices

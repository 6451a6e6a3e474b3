"""The CUDA-only branches, driven on the CPU: mixed precision (bf16 autocast, and fp16 with the gradient
scaler), channels_last, and the out-of-memory retry at smaller batch sizes, injected at a chosen size."""

from __future__ import annotations

import math
from functools import partial

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import invoke, tiny_space, write_space
from tuner.data.device import DeviceData
from tuner.search.storage import open_storage
from tuner.train.build import RunSettings, build_components
from tuner.train.hparams import Hyperparameters
from tuner.train.loop import Interrupted, fit
from tuner.train.losses import logits_to_probs
from tuner.train.metrics import classification_metrics
from tuner.train.models import BUILTIN_MODELS, SmallCNN
from tuner.train.run import OutOfMemory, train_model


@pytest.fixture(scope="module")
def data(tiny_device_data) -> DeviceData:
    return tiny_device_data


GPU_LIKE = RunSettings(max_epochs=3, patience=None, monitor="val_auroc", mode="max", amp_on_cpu=True)


def _record_convs(model: torch.nn.Module) -> list[tuple[bool, torch.dtype, bool]]:
    """(training?, output dtype, input in channels_last?) of every conv call."""
    seen: list[tuple[bool, torch.dtype, bool]] = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(
                lambda m, args, out: seen.append(
                    (m.training, out.dtype, args[0].is_contiguous(memory_format=torch.channels_last))
                )
            )
    return seen


def _fit(data: DeviceData, hp: Hyperparameters, settings: RunSettings, **kwargs):
    c = build_components(hp, data, settings, seed=0)
    seen = _record_convs(c.model)
    order = torch.arange(len(data.train))
    from tuner.data.loader import iterate_batches

    batches = partial(iterate_batches, normalize=c.normalize, channels_last=settings.uses_channels_last(order.device))
    result = fit(
        c.model,
        train_batches=lambda epoch: batches(data.train, order[torch.randperm(len(order))], hp.batch_size),
        val_batches=lambda: batches(data.val, torch.arange(len(data.val)), 64),
        loss_fn=c.loss_fn,
        to_probs=partial(logits_to_probs, num_classes=2, positive_index=data.positive_index),
        metrics_fn=partial(classification_metrics, positive_index=data.positive_index),
        optimizer=c.optimizer,
        schedule=c.schedule,
        max_epochs=settings.max_epochs,
        amp=settings.uses_amp(order.device),
        **kwargs,
    )
    return c, result, seen


def test_bf16_autocast_and_channels_last_run_on_cpu(data):
    hp = Hyperparameters(width=8, depth=2, lr=5e-3, batch_size=32)
    c, result, seen = _fit(data, hp, GPU_LIKE)
    conv = next(m for m in c.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert {dtype for _, dtype, _ in seen} == {torch.bfloat16}, "every conv ran in bf16, training and validation"
    assert {training for training, _, _ in seen} == {True, False}
    assert all(channels_last for _, _, channels_last in seen)
    losses = result.history["train_loss"]
    assert losses[-1] < losses[0] and result.history["val_auroc"][-1] > 0.5
    assert result.best_val_probs.dtype == torch.float32  # probabilities leave autocast in full precision
    # By default CPU training runs in fp32 (no autocast) but channels_last (faster convolutions there too);
    # with channels_last off, in the default memory format.
    default = RunSettings(max_epochs=1, patience=None, monitor="val_auroc", mode="max")
    _, _, seen = _fit(data, hp, default)
    assert {dtype for _, dtype, _ in seen} == {torch.float32} and all(cl for _, _, cl in seen)
    _, _, seen = _fit(data, hp, RunSettings(**{**default.__dict__, "channels_last": False}))
    assert not any(cl for _, _, cl in seen)


def test_fp16_with_the_gradient_scaler_trains_on_cpu(data):
    """fp16 (older GPUs) brings torch's GradScaler: scale, unscale before clipping, skip overflowed steps."""
    hp = Hyperparameters(width=8, depth=2, lr=5e-3, batch_size=32, grad_clip=1.0)
    _, result, seen = _fit(data, hp, GPU_LIKE, amp_dtype=torch.float16, grad_clip=1.0)
    assert {dtype for _, dtype, _ in seen} == {torch.float16}
    losses = result.history["train_loss"]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
    # The scaler took every step: stopped before the last epoch, its state (saved for a resume) has a scale
    # (a power of two, at most the initial 2**16) and counts one growth-tracker tick per step since any overflow.
    checks = 0

    def stop() -> bool:
        nonlocal checks
        checks += 1
        return checks > 2 * (steps_per_epoch + 1)  # a check before each batch and one after each epoch

    steps_per_epoch = -(-len(data.train) // 32)
    with pytest.raises(Interrupted) as stopped:
        _fit(data, hp, GPU_LIKE, amp_dtype=torch.float16, grad_clip=1.0, stop=stop)
    state = stopped.value.snapshot.scaler
    assert state is not None and stopped.value.snapshot.progress.epoch == 2
    assert math.log2(state["scale"]) in range(17) and 0 < state["_growth_tracker"] <= 2 * steps_per_epoch, state


class MemoryHungryCNN(SmallCNN):
    """Training batches larger than ``limit`` raise the error CUDA raises when memory runs out."""

    limit = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {x.shape[0]}")
        return super().forward(x)


@pytest.fixture
def memory_hungry(monkeypatch):
    def build(in_chans, image_size, *, width, depth, batch_norm, pooling):
        return MemoryHungryCNN(in_chans, width=width, depth=depth, batch_norm=batch_norm, pooling=pooling)

    monkeypatch.setitem(BUILTIN_MODELS, "memory_hungry", build)
    return MemoryHungryCNN


def test_out_of_memory_retries_at_half_the_batch_size(data, memory_hungry):
    hp = Hyperparameters(model="memory_hungry", width=4, depth=2, batch_size=64, accumulate_steps=1)
    settings = RunSettings(max_epochs=2, patience=None, monitor="val_auroc", mode="max")
    tried: list[Hyperparameters] = []
    _, result = train_model(hp, data, settings, seed=0, on_retry=tried.append)
    assert [(t.batch_size, t.accumulate_steps) for t in tried] == [(32, 2), (16, 4)]  # same images per step
    assert result.epochs_run == 2 and len(result.history["train_loss"]) == 2
    with pytest.raises(OutOfMemory, match="at batch_size=32 .*below train.min_batch_size=32"):
        train_model(hp, data, RunSettings(**{**settings.__dict__, "min_batch_size": 32}), seed=0)


def test_out_of_memory_in_a_study_retries_or_ends_infeasible(workdir, memory_hungry):
    space = tiny_space(
        study={"name": "oom", "n_trials": 3, "artifacts": False},
        train={"max_epochs": 2, "patience": None, "device": "cpu", "min_batch_size": 8},
        params={
            "model": "memory_hungry",
            "width": 4,
            "depth": 2,
            "lr": 1e-3,
            "batch_size": 64,
        },
    )
    memory_hungry.limit = 16  # 64 -> 32 -> 16 trains
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space))
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="oom", storage=open_storage(f"sqlite:///{workdir}/studies/oom.db"))
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == 3
    for t in trials:
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["out_of_memory_at"] == [64, 32] and t.user_attrs["batch_size_run"] == 16
        assert t.user_attrs["accumulate_steps_run"] == 4 and len(t.user_attrs["history"]["train_loss"]) == 2
    # Memory for no batch size at or above the floor: trials end infeasible (pruned, with the reason), the study goes on.
    memory_hungry.limit = 4
    result = invoke("optimize", "--space", write_space(workdir / "s.yaml", space), "--n-trials", "2")
    assert result.exit_code == 0, result.output
    late = study.get_trials(deepcopy=False)[3:]
    assert [t.state for t in late] == [TrialState.PRUNED, TrialState.PRUNED]
    assert all(t.user_attrs["infeasible"] and "out of memory" in t.user_attrs["prune_reason"] for t in late)
    assert "out of memory at batch_size=8" in late[0].user_attrs["prune_reason"]
    assert "below train.min_batch_size=8" in late[0].user_attrs["prune_reason"]

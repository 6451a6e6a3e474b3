"""The names under which tuner stores its facts in an Optuna study: one place for every attribute key.

The dashboard shows them as they are, ``tuner trials`` / ``refit`` read them back, and a study written by
an older tuner uses the same strings, so a value here is never renamed.
"""

from __future__ import annotations

from typing import Final


class TrialKey:
    """A trial's user attributes (``trial.user_attrs``)."""

    SEED: Final = "seed"  # the seed its training ran with
    HPARAMS: Final = "hparams"  # every hyperparameter, defaults included
    WORKER: Final = "worker"  # host:pid
    PROCESS_SPACE: Final = "process_space"  # where that pid names one process (see resources.process_space)
    THREADS: Final = "threads"
    VISIBLE_GPUS: Final = "visible_gpus"
    HISTORY: Final = "history"  # per-epoch metrics
    BEST_EPOCH: Final = "best_epoch"
    EPOCHS_RUN: Final = "epochs_run"
    STOPPED_EARLY: Final = "stopped_early"
    SECONDS_PER_EPOCH: Final = "seconds_per_epoch"
    IMAGES_PER_SECOND: Final = "images_per_second"
    PEAK_MEMORY_MB: Final = "peak_memory_mb"
    TRAIN_COUNTS: Final = "train_counts"
    IMAGES_PER_EPOCH: Final = "images_per_epoch"
    FOLD_VALUES: Final = "fold_values"
    FOLD_BEST_EPOCHS: Final = "fold_best_epochs"
    THRESHOLD: Final = "threshold"  # the operating point chosen on validation
    VAL_AT_THRESHOLD: Final = "val_at_threshold"
    CONSTRAINT_VALUES: Final = "constraint_values"  # study.constraints' metrics (feasibility is Optuna's own)
    PRUNE_REASON: Final = "prune_reason"
    FAIL_REASON: Final = "fail_reason"  # also a system attribute, where another process failed the trial
    INFEASIBLE: Final = "infeasible"  # out of memory at the smallest batch size
    OUT_OF_MEMORY_AT: Final = "out_of_memory_at"
    BATCH_SIZE_RUN: Final = "batch_size_run"
    ACCUMULATE_STEPS_RUN: Final = "accumulate_steps_run"
    RETRY_OF: Final = "retry_of"  # the number of the trial as first run
    PREEMPTED: Final = "preempted"  # {epoch, state}: stopped by SIGTERM / SIGUSR1, its state saved there
    RESUMED_AT: Final = "resumed_at_epoch"  # a preempted trial's retry went on after this epoch
    CRASH_RETRIES: Final = "crash_retries"
    WARM_START_FROM: Final = "warm_start_from"
    COSTS: Final = "costs"  # multi-objective: the network's latency_ms, params_m, ... (tuner.train.costs)
    COSTS_MEASURED_ON: Final = "costs_measured_on"  # the device and threads the latency was measured with


class StudyKey:
    """A study's user attributes (``study.user_attrs``)."""

    SPACE: Final = "space"  # the validated space, as JSON
    SPACE_FINGERPRINT: Final = "space_fingerprint"
    TUNER_VERSION: Final = "tuner_version"
    CREATED: Final = "created"
    DATA: Final = "data"  # the data description and class counts
    TEST_SET_READS: Final = "test_set_reads"  # every refit / evaluation that read the test split
    ARTIFACT_DIR: Final = "artifact_dir"
    STOPPED: Final = "stopped"  # why study.stop ended the search
    RUN_BEGAN_AT: Final = "run_began_at"
    RESCORING: Final = "rescoring"  # refit --top-k's table

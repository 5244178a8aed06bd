"""Training infrastructure: data loading, SGD, schedules, checkpoints and the training loop."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, spec_hash
from .data import (
    Batches,
    DataError,
    Dataset,
    check_labels,
    fit_to_input,
    load_builtin_digits,
    load_cifar10,
    load_data,
    load_idx,
    load_npz,
    split_dataset,
)
from .loop import TrainingDiverged, TrainingInterrupted, evaluate, fit, restore_model
from .optim import SGD
from .schedules import learning_rate

__all__ = [
    "SGD",
    "Batches",
    "CheckpointError",
    "DataError",
    "Dataset",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_labels",
    "evaluate",
    "fit",
    "fit_to_input",
    "learning_rate",
    "load_builtin_digits",
    "load_checkpoint",
    "load_cifar10",
    "load_data",
    "load_idx",
    "load_npz",
    "restore_model",
    "save_checkpoint",
    "spec_hash",
    "split_dataset",
]

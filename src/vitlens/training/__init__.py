"""Training: one loop (:func:`train`) and a task per trainable model or method.

Each training function builds its task and hands it to the loop; ``vitlens train NAME`` finds it through
:data:`vitlens.trainables.TRAINABLES`.
"""

from __future__ import annotations

from .bcos import train_bcos
from .classifier import DEFAULT_ARCH, ClassifierTask, accuracy, build_classifier, train_classifier
from .diffmask import DiffMaskTask, train_diffmask
from .loop import Task, TrainConfig, train
from .pm import PMTask, train_pm

__all__ = [
    "DEFAULT_ARCH",
    "ClassifierTask",
    "DiffMaskTask",
    "PMTask",
    "Task",
    "TrainConfig",
    "accuracy",
    "build_classifier",
    "train",
    "train_bcos",
    "train_classifier",
    "train_diffmask",
    "train_pm",
]

"""What both estimators share: the checks of their inputs and the selection rule on val.

Neutral ground for :mod:`.convex` and :mod:`.adam` (neither imports the other): :func:`validate_inputs`
checks a problem's splits, concepts and sweep block; :func:`select_lr` picks, along the last axis, the
candidate with the best val accuracy, the smaller candidate on ties (the Adam sweep's learning rates,
the convex estimator's L2 strengths).
"""

from __future__ import annotations

import numpy as np

from .datatypes import ConceptSpace, Split, SweepParams


def validate_inputs(
    train: Split, val: Split, test: Split, concepts: ConceptSpace, num_classes: int, config: SweepParams
) -> None:
    config.validate()
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, split in (("train", train), ("val", val), ("test", test)):
        split.validate(num_classes, name)
    dim = train.x.shape[1]
    for name, split in (("val", val), ("test", test)):
        if split.x.shape[1] != dim:
            raise ValueError(
                f"{name}.x feature dimension {split.x.shape[1]} does not match train.x dimension {dim}"
            )
    concepts.validate(dim)


def select_lr(val_acc: np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """Index of the best lr along the last axis of ``val_acc`` (ties -> smaller lr)."""
    best = val_acc.max(-1, keepdims=True)
    cand = np.where(val_acc >= best, lrs, np.inf)
    return cand.argmin(-1)

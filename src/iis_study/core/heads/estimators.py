"""The estimator as a strategy (METHOD §4, "The estimator"): fit every head of one representation.

:func:`fit_heads` is the one entry point the study, the library call and fine-tuning use: it returns
one :class:`~iis_study.core.heads.SweepResult` per concept space, with the selected heads and either
the convex solver's certificate (``sweep.estimator: convex``, :func:`~.convex.convex_many`) or the
Adam sweep's per-epoch history (``adam``, :func:`~.training.sweep_many`).
"""

from __future__ import annotations

from collections.abc import Mapping

from .convex import convex_many
from .datatypes import ConceptSpace, Split, SweepConfig, SweepResult
from .training import sweep_many


def fit_heads(
    train: Split,
    val: Split,
    test: Split,
    concepts: Mapping[str, ConceptSpace],
    num_classes: int,
    config: SweepConfig,
    progress: bool = True,
) -> dict[str, SweepResult]:
    """The probe and every interpretation head of each concept space, by ``config.estimator``."""
    fit = convex_many if config.estimator == "convex" else sweep_many
    return fit(train, val, test, concepts, num_classes, config, progress)

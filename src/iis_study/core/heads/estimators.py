"""The estimator as a strategy (METHOD §4, "The estimator"): fit every head of one representation.

:func:`fit_heads` is the one entry point the study, the library call and fine-tuning use: it returns
one :class:`~iis_study.core.heads.SweepResult` per concept space, with the selected heads and either
the convex solver's certificate (``sweep.estimator: convex``, :func:`~.convex.convex_many`) or the
Adam sweep's per-epoch history (``adam``, :func:`~.training.sweep_many`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .convex import convex_many
from .datatypes import ConceptSpace, Split, SweepParams, SweepResult
from .adam import sweep_many

logger = logging.getLogger(__name__)


def fit_heads(
    train: Split,
    val: Split,
    test: Split,
    concepts: Mapping[str, ConceptSpace],
    num_classes: int,
    config: SweepParams,
    progress: bool = True,
) -> dict[str, SweepResult]:
    """The probe and every interpretation head of each concept space, by ``config.estimator``.

    End-to-end concepts learn their concept matrix with the head, which is not a convex problem: with
    the convex estimator they are fitted by the Adam sweep (a warning says so; their scores carry
    ``estimator: adam``), the other concept types by the convex solver."""
    if config.estimator != "convex":
        return sweep_many(train, val, test, concepts, num_classes, config, progress)
    learned = {name: space for name, space in concepts.items() if space.kind == "end_to_end"}
    fixed = {name: space for name, space in concepts.items() if space.kind != "end_to_end"}
    out: dict[str, SweepResult] = {}
    if fixed:
        out.update(convex_many(train, val, test, fixed, num_classes, config, progress))
    if learned:
        logger.warning(
            "concept types %s (end_to_end) learn their concepts with the head, not a convex problem: "
            "fitted by the adam estimator (sweep.learning_rates, seeds, steps)", sorted(learned)
        )
        out.update(sweep_many(train, val, test, learned, num_classes, config, progress))
    return {name: out[name] for name in concepts}

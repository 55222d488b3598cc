"""The estimator as a strategy (METHOD §4, "The estimator"): fit every head of one representation.

One interface: a :class:`HeadsProblem` (the train / val / test splits, the concept spaces, the number of
classes) and the ``sweep`` block go to the estimator that ``sweep.estimator`` names in :data:`ESTIMATORS`,
which returns one :class:`~iis_study.core.heads.SweepResult` per concept space, with the selected heads
and either the convex solver's certificate (``convex``, :func:`~.convex.convex_many`) or the Adam sweep's
per-epoch history (``adam``, :func:`~.adam.sweep_many`). The two estimators are siblings: what they share
(the input checks, the selection rule on val) is in :mod:`.selection`.

:func:`fit_heads` is the one entry point the study, the library call and fine-tuning use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .adam import sweep_many
from .convex import convex_many
from .datatypes import ESTIMATOR_NAMES, ConceptSpace, Split, SweepParams, SweepResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadsProblem:
    """What an estimator fits: the heads of every concept space on one representation's splits
    (``train`` fits, ``val`` selects, ``test`` is reported), ``num_classes`` classes."""

    train: Split
    val: Split
    test: Split
    concepts: Mapping[str, ConceptSpace]
    num_classes: int


# an estimator: (problem, sweep block, progress) -> one SweepResult per concept space, in the problem's order
Estimator = Callable[[HeadsProblem, SweepParams, bool], dict[str, SweepResult]]


def fit_adam(problem: HeadsProblem, config: SweepParams, progress: bool = True) -> dict[str, SweepResult]:
    """The authors' heads trained by Adam as one batched model (:func:`~.adam.sweep_many`)."""
    p = problem
    return sweep_many(p.train, p.val, p.test, p.concepts, p.num_classes, config, progress)


def fit_convex(problem: HeadsProblem, config: SweepParams, progress: bool = True) -> dict[str, SweepResult]:
    """Every head solved to a certified optimum (:func:`~.convex.convex_many`).

    End-to-end concepts learn their concept matrix with the head, which is not a convex problem: they are
    fitted by the Adam sweep (a warning says so; their scores carry ``estimator: adam``)."""
    p = problem
    learned = {name: space for name, space in p.concepts.items() if space.kind == "end_to_end"}
    fixed = {name: space for name, space in p.concepts.items() if space.kind != "end_to_end"}
    out: dict[str, SweepResult] = {}
    if fixed:
        out.update(convex_many(p.train, p.val, p.test, fixed, p.num_classes, config, progress))
    if learned:
        logger.warning(
            "concept types %s (end_to_end) learn their concepts with the head, not a convex problem: "
            "fitted by the adam estimator (sweep.learning_rates, seeds, steps)", sorted(learned)
        )
        out.update(sweep_many(p.train, p.val, p.test, learned, p.num_classes, config, progress))
    return {name: out[name] for name in p.concepts}


ESTIMATORS: dict[str, Estimator] = {"convex": fit_convex, "adam": fit_adam}
if tuple(ESTIMATORS) != ESTIMATOR_NAMES:  # a check that holds under python -O too
    raise RuntimeError(
        f"sweep.estimator's names {ESTIMATOR_NAMES} (heads/datatypes.py) and the registry {tuple(ESTIMATORS)} differ"
    )


def fit_heads(problem: HeadsProblem, config: SweepParams, progress: bool = True) -> dict[str, SweepResult]:
    """The probe and every interpretation head of each concept space of ``problem``, by ``config.estimator``."""
    config.validate()
    return ESTIMATORS[config.estimator](problem, config, progress)

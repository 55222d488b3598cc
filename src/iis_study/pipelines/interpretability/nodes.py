"""Nodes of the interpretability pipeline: the batched sweep and the scores (METHOD §2-§4, §7)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd
import torch

from iis_study.core.convergence import convergence_report, reference_probe
from iis_study.core.heads import ConceptSpace, Split, SweepConfig, SweepResult, sweep_many
from iis_study.core.params import reject_unknown_keys
from iis_study.core.scores import score_sweep

logger = logging.getLogger(__name__)


def sweep_config(params: dict[str, Any]) -> SweepConfig:
    """A validated :class:`SweepConfig` from the ``sweep`` parameter block."""
    reject_unknown_keys(params, SweepConfig.__dataclass_fields__, "sweep")
    p = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    if p.get("device") == "auto":
        p["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = SweepConfig(**p)
    cfg.validate()
    return cfg


def concept_space(data: dict[str, Any]) -> ConceptSpace:
    """The :class:`ConceptSpace` stored by the concepts pipeline."""
    meta = data.get("__metadata__", {})
    kind = meta.get("kind", "vectors")
    return ConceptSpace(
        kind=kind,
        vectors=data.get("vectors"),
        elements=data.get("elements"),
        n_concepts=int(meta["n_concepts"]) if "n_concepts" in meta else None,
        projection=data.get("projection"),
        mean=data.get("mean"),
        std=data.get("std"),
    )


def train_interpreters(
    features: dict[str, Any], feature_info: dict[str, Any], sweep: dict[str, Any], **concepts: dict[str, Any]
) -> dict[str, SweepResult]:
    """Train the linear probe and, for every concept type given by keyword, every interpretation head
    of the sparsity x learning-rate x seed grid together, as one batched model (the probe once,
    shared by the concept types); select epoch and learning rate on val, report test accuracy.
    Returns one :class:`SweepResult` per concept type."""
    cfg = sweep_config(sweep)
    spaces = {ctype: concept_space(data) for ctype, data in concepts.items()}
    splits = {s: Split(x=features[f"{s}.x"], y=features[f"{s}.y"]) for s in ("train", "val", "test")}
    for space in spaces.values():
        space.validate(splits["train"].x.shape[1])
    num_classes = int(feature_info["num_classes"])
    logger.info(
        "sweep: concepts %s, %d sparsities x %d learning rates x %d seeds",
        ", ".join(f"{ctype} (M = {space.m})" for ctype, space in spaces.items()),
        len(cfg.sparsities),
        len(cfg.learning_rates),
        len(cfg.seeds),
    )
    return sweep_many(splits["train"], splits["val"], splits["test"], spaces, num_classes, cfg)


def fit_reference_probe(features: dict[str, Any], feature_info: dict[str, Any]) -> dict[str, Any]:
    """The converged reference for the probe: full-batch L-BFGS logistic regression on the same
    features, its L2 strength selected on val (METHOD §4, "Budget and convergence")."""
    splits = [(features[f"{s}.x"], features[f"{s}.y"]) for s in ("train", "val", "test")]
    ref = reference_probe(*splits, num_classes=int(feature_info["num_classes"]))
    logger.info(
        "reference probe (L-BFGS, C = %g): val %.4f, test %.4f", ref.c, ref.val_acc, ref.test_acc
    )
    return ref.to_dict()


def _plain(value: Any) -> Any:
    """A JSON-ready scalar: bools and integers stay what they are (steps, counts), numbers become floats."""
    if isinstance(value, bool | int):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy / torch scalars
        value = value.item()
        return value if isinstance(value, bool | int) else float(value)
    return float(value) if hasattr(value, "__float__") else value


def score_interpreters(
    result: SweepResult, probe_reference: dict[str, Any], scoring: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """IIS, chance-corrected IIS, bootstrap interval, and the accuracy curve A(s) / ARR(s), with the
    training budget and the convergence record (probe against its reference, flat val curves)."""
    scores, curve = score_sweep(
        result,
        n_boot=int(scoring.get("n_boot", 1000)),
        seed=int(scoring.get("seed", 0)),
        ci=float(scoring.get("ci", 0.95)),
    )
    if result.budget is not None:
        scores.update(steps=result.budget.steps, batch_size=result.budget.batch_size, epochs=result.budget.epochs)
    scores.update(convergence_report(result.selected, result.history, probe_reference))
    scores = {k: _plain(v) for k, v in scores.items()}
    if not scores["probe_converged"]:
        logger.warning(
            "the linear probe is NOT converged (val %.4f against the L-BFGS reference's %.4f): raise sweep.steps",
            scores["probe_val_acc"],
            scores["reference_val_acc"],
        )
    if not scores["heads_converged"]:
        logger.warning(
            "the selected val accuracy of an interpretation head was still rising at the end of training "
            "(up to +%.1f points in the last fifth, probe included): raise sweep.steps",
            100 * scores["max_gain_selected"],
        )
    logger.info(
        "A_std = %.4f, IIS = %.4f [%.4f, %.4f], chance-corrected IIS = %.4f",
        scores["accuracy_linear_probe"],
        scores["iis"],
        scores["iis_ci_low"],
        scores["iis_ci_high"],
        scores["iis_chance_corrected"],
    )
    return json.loads(json.dumps(scores)), curve

"""Nodes of the interpretability pipeline: the batched sweep and the scores (METHOD §2-§4, §7)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pandas as pd
import torch

from iis_study.core.heads import ConceptSpace, Split, SweepConfig, SweepResult
from iis_study.core.heads import sweep as run_sweep  # the node's `sweep` argument is the parameter block
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
    features: dict[str, Any], concepts: dict[str, Any], feature_info: dict[str, Any], sweep: dict[str, Any]
) -> SweepResult:
    """Train the linear probe and every interpretation head of the sparsity x learning-rate x seed grid
    together, as one batched model; select epoch and learning rate on val, report test accuracy."""
    cfg = sweep_config(sweep)
    space = concept_space(concepts)
    splits = {s: Split(x=features[f"{s}.x"], y=features[f"{s}.y"]) for s in ("train", "val", "test")}
    space.validate(splits["train"].x.shape[1])
    num_classes = int(feature_info["num_classes"])
    logger.info(
        "sweep: %s concepts (M = %d), %d sparsities x %d learning rates x %d seeds, %d epochs",
        concepts.get("__metadata__", {}).get("concept_type", space.kind),
        space.m,
        len(cfg.sparsities),
        len(cfg.learning_rates),
        len(cfg.seeds),
        cfg.epochs,
    )
    return run_sweep(splits["train"], splits["val"], splits["test"], space, num_classes, cfg)


def score_interpreters(result: SweepResult, scoring: dict[str, Any]) -> tuple[dict[str, Any], pd.DataFrame]:
    """IIS, chance-corrected IIS, bootstrap interval, and the accuracy curve A(s) / ARR(s)."""
    scores, curve = score_sweep(
        result,
        n_boot=int(scoring.get("n_boot", 1000)),
        seed=int(scoring.get("seed", 0)),
        ci=float(scoring.get("ci", 0.95)),
    )
    scores = {k: (float(v) if hasattr(v, "__float__") else v) for k, v in scores.items()}
    logger.info(
        "A_std = %.4f, IIS = %.4f [%.4f, %.4f], chance-corrected IIS = %.4f",
        scores["accuracy_linear_probe"],
        scores["iis"],
        scores["iis_ci_low"],
        scores["iis_ci_high"],
        scores["iis_chance_corrected"],
    )
    return json.loads(json.dumps(scores)), curve

"""Nodes of the fine-tuning pipeline (METHOD §6): interpretability maximization and its control."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core import study
from iis_study.core.acquisition import ConceptSet
from iis_study.core.checkpoints import CheckpointStore
from iis_study.core.concepts import Elements
from iis_study.core.config import FineTuningParams, backbone_spec
from iis_study.core.data import ImageSet


def fine_tune_backbone(
    splits: pd.DataFrame,
    concept_elements: Elements,
    concepts_prototype: ConceptSet,
    images: ImageSet,
    fine_tuning_checkpoints: CheckpointStore,
    backbone: dict[str, Any],
    fine_tuning: FineTuningParams,
) -> pd.DataFrame:
    """Fine-tune one representation for every (λ, seed), λ = 0 (cross-entropy only) included;
    checkpoints in the ``fine_tuning_checkpoints`` store under ``<representation key>/``, resumable. One row per
    (λ, seed, epoch)."""
    return study.fine_tune_representation(
        splits, concept_elements, concepts_prototype, images, backbone_spec(backbone), fine_tuning,
        fine_tuning_checkpoints,
    )


def collect_fine_tuning(**histories: pd.DataFrame) -> pd.DataFrame:
    """One table over all fine-tuned representations, (backbone, λ, seed, epoch) rows; ``histories``:
    every ``<backbone>.fine_tuning_history``, by name."""
    parts = []
    for name, h in histories.items():
        h = h.copy()
        h.insert(0, "backbone", name.rsplit(".", 1)[0])
        parts.append(h)
    table = pd.concat(parts, ignore_index=True)
    first = ["backbone", "lam", "seed", "epoch", "accuracy_test", "accuracy_linear_probe", "iis"]
    return table[first + [c for c in table.columns if c not in first]]


def summarise_fine_tuning(fine_tuning_results: pd.DataFrame) -> pd.DataFrame:
    """Before/after table per (backbone, λ): mean ± std over seeds of test accuracy and IIS."""
    df = fine_tuning_results
    last = df["epoch"].max()
    rows = []
    for (bb, lam), g in df.groupby(["backbone", "lam"]):
        row = {"backbone": bb, "lam": lam, "n_seeds": g["seed"].nunique()}
        for when, epoch in (("before", 0), ("after", last)):
            e = g[g["epoch"] == epoch]
            for col in ("accuracy_test", "iis", "accuracy_linear_probe"):
                vals = e[col].astype(float)
                row[f"{col}_{when}_mean"] = vals.mean()
                row[f"{col}_{when}_std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def plot_fine_tuning(fine_tuning_results: pd.DataFrame):
    """Test accuracy and IIS over epochs for both arms, with the seed spread."""
    from iis_study.core import plots

    return plots.fine_tuning_curves(fine_tuning_results)

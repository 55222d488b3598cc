"""Nodes of the fine-tuning pipeline (METHOD §6): interpretability maximization and its control."""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core import finetune
from iis_study.core.concepts.acquisition import ConceptSet
from iis_study.core.concepts.elements import Elements
from iis_study.core.data import ImageSet
from iis_study.core.finetune import CheckpointStore, FineTuningParams


def fine_tune_backbone(
    splits: pd.DataFrame,
    concept_elements: Elements,
    concepts_prototype: ConceptSet,
    images: ImageSet,
    fine_tuning_checkpoints: CheckpointStore,
    backbone: dict[str, Any],
    fine_tuning: FineTuningParams,
) -> pd.DataFrame:
    """Every (λ, seed) arm of one representation: :func:`~iis_study.core.finetune.fine_tune_representation`."""
    return finetune.fine_tune_representation(
        splits, concept_elements, concepts_prototype, images, fine_tuning_checkpoints, backbone, fine_tuning
    )


def collect_fine_tuning(**histories: pd.DataFrame) -> pd.DataFrame:
    """The histories of every representation as one table: :func:`~iis_study.core.finetune.collect_histories`."""
    return finetune.collect_histories(histories)


def summarise_fine_tuning(fine_tuning_results: pd.DataFrame) -> pd.DataFrame:
    """Before/after table per (backbone, λ): :func:`~iis_study.core.finetune.summarise`."""
    return finetune.summarise(fine_tuning_results)


def plot_fine_tuning(fine_tuning_results: pd.DataFrame):
    """Test accuracy and IIS over epochs for both arms: :func:`~iis_study.core.reporting.plots.fine_tuning_curves`."""
    from iis_study.core.reporting import plots

    return plots.fine_tuning_curves(fine_tuning_results)

"""Project pipelines, expanded from the study's parameters."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from .pipelines import concepts, data_processing, feature_extraction, interpretability, reporting
from .study_config import backbone_names, concept_types, study_parameters


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline by name; ``__default__`` is the whole study."""
    params = study_parameters()
    names = backbone_names(params)
    types = concept_types(params)
    pipes = {
        "data_processing": data_processing.create_pipeline(),
        "feature_extraction": feature_extraction.create_pipeline(names),
        "concepts": concepts.create_pipeline(names, types),
        "interpretability": interpretability.create_pipeline(names, types),
        "reporting": reporting.create_pipeline(
            names, types, gallery_type=(params.get("gallery") or {}).get("concept_type")
        ),
    }
    pipes["__default__"] = sum(pipes.values(), Pipeline([]))
    return pipes

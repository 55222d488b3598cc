"""Project pipelines, expanded from the study's parameters."""

from __future__ import annotations

from kedro.pipeline import Pipeline

from .pipelines import (
    concepts,
    data_processing,
    feature_extraction,
    fine_tuning,
    interpretability,
    reporting,
)
from .pipelines.concepts import pipeline as concepts_pipeline
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
    # fine-tuning trains backbones (hours on real data): its own pipeline, not part of the default run
    # (unknown names are reported by the validation hook when this pipeline runs)
    ft = [b for b in (params.get("fine_tuning") or {}).get("backbones") or [] if b in names]
    pipes["fine_tuning"] = (
        data_processing.create_pipeline()
        + concepts_pipeline.elements_pipeline()
        + fine_tuning.create_pipeline(ft)
    )
    return pipes

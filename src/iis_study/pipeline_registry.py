"""Project pipelines, expanded from the parameters of the active environment.

No state: every call reads the parameters of the environment this process runs (the command
line's ``--env``, else ``KEDRO_ENV``; see :mod:`iis_study.study_config`), so ``kedro run --env
cifar10`` and ``kedro viz run --env cifar10`` both see the 24 CIFAR-10 representations.
"""

from __future__ import annotations

from typing import Any

from kedro.pipeline import Pipeline

from .pipelines import (
    concepts,
    data_processing,
    feature_extraction,
    fine_tuning,
    interpretability,
    reporting,
)
from .study_config import backbone_names, concept_types, gallery_type, study_parameters


def register_pipelines() -> dict[str, Pipeline]:
    """Every pipeline by name; ``__default__`` is the whole study."""
    return build_pipelines(study_parameters())


def build_pipelines(params: dict[str, Any]) -> dict[str, Pipeline]:
    """The project's pipelines for a set of parameters (a pure function of them)."""
    names = backbone_names(params)
    types = concept_types(params)
    pipes = {
        "data_processing": data_processing.create_pipeline(),
        "feature_extraction": feature_extraction.create_pipeline(names),
        "concepts": concepts.create_pipeline(names, types),
        "interpretability": interpretability.create_pipeline(names, types),
        "reporting": reporting.create_pipeline(names, types, gallery_type=gallery_type(params)),
    }
    pipes["__default__"] = sum(pipes.values(), Pipeline([]))
    # fine-tuning trains backbones (hours on real data): its own pipeline, not part of the default run
    # (unknown names are reported by the validation hook when this pipeline runs)
    ft = [b for b in (params.get("fine_tuning") or {}).get("backbones") or [] if b in names]
    pipes["fine_tuning"] = (
        data_processing.create_pipeline()
        + concepts.pipeline.elements_pipeline()
        + fine_tuning.create_pipeline(ft)
    )
    return pipes

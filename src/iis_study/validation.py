"""Check the whole study's parameters before any node runs, so a mistake costs seconds, not hours.

Each block is read into its typed class (:mod:`iis_study.core.config`), whose checks raise
``ValueError`` naming the parameter; what spans blocks (representations, the gallery's sparsity on
the sweep grid, fine-tuning's representations) and what touches the filesystem is checked here.
Called by a hook before the pipeline runs; usable alone: ``validate_study(params)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .core.config import (
    ConceptParams,
    CorrelationParams,
    ExtractionParams,
    FineTuningParams,
    GalleryParams,
    ScoringParams,
    SplitParams,
    backbone_spec,
    sweep_config,
)
from .core.backbones import PENULTIMATE
from .core.data import DatasetSpec

logger = logging.getLogger(__name__)


def validate_study(params: dict[str, Any], pipelines: set[str] | None = None) -> None:
    """Validate every parameter block the study uses (``pipelines``: the pipelines about to run)."""
    if "tracking" in params:
        raise ValueError("tracking is not a parameter: MLflow settings live in conf/<env>/mlflow.yml "
                         "(tracking: {enabled, experiment, uri})")
    dataset = DatasetSpec.from_params(params.get("dataset"))
    if dataset.kind == "imagefolder":
        root = Path(dataset.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset.root {str(root)!r} does not exist or is not a folder; expected root/<class>/*.jpg"
            )
        if not any(p.is_dir() for p in root.iterdir()):
            raise ValueError(f"dataset.root {str(root)!r} has no class folders; expected root/<class>/*.jpg")
    SplitParams.from_params(params.get("splits"))
    backbones = _validate_representations(params)
    ExtractionParams.from_params(params.get("extraction"))
    concepts = ConceptParams.from_params(params.get("concepts"))
    if "textual" in concepts.types and (pipelines is None or pipelines & {"__default__", "concepts"}):
        import importlib.util

        if importlib.util.find_spec("open_clip") is None:
            raise ImportError("concepts.types has 'textual', which needs open_clip, an optional extra: "
                              "pip install 'iis_study[textual]'")
    CorrelationParams.from_params(params.get("correlation"))
    ScoringParams.from_params(params.get("scoring"))
    sweep = sweep_config(params.get("sweep"))
    if params.get("gallery"):
        gallery = GalleryParams.from_params(params["gallery"])
        if not any(abs(float(gallery.sparsity) - float(g)) < 1e-9 for g in sweep.sparsities):
            raise ValueError(
                f"gallery.sparsity = {gallery.sparsity} is not on the sweep grid sweep.sparsities = {list(sweep.sparsities)}"
            )
    if params.get("fine_tuning") and (pipelines is None or "fine_tuning" in pipelines):
        _validate_fine_tuning(FineTuningParams.from_params(params["fine_tuning"]), backbones, concepts)
    logger.info("parameters checked: %d backbones, concept types %s", len(backbones), list(concepts.types))


def _validate_fine_tuning(ft: FineTuningParams, backbones: dict[str, Any], concepts: ConceptParams) -> None:
    unknown = [b for b in ft.backbones if b not in backbones]
    if unknown:
        raise ValueError(f"fine_tuning.backbones: {unknown} are not in `backbones` ({sorted(backbones)})")
    staged = [b for b in ft.backbones if backbone_spec(backbones[b]).layer != PENULTIMATE]
    if staged:
        raise ValueError(
            f"fine_tuning.backbones: {staged} are stage-layer representations; fine-tuning trains the "
            "whole backbone and exports it as a checkpoint, so name a `penultimate` representation"
        )
    if "prototype" not in concepts.types:
        raise ValueError(
            f"fine_tuning uses the study's prototype concepts, but concepts.types = {list(concepts.types)} has no "
            "'prototype': add it (the concepts pipeline draws the prototypes fine-tuning re-embeds)"
        )
    for lam, seed in ft.arms():
        ft.run_config(lam, seed)
    ft.scoring_sweep()


def _validate_representations(params: dict[str, Any]) -> dict[str, Any]:
    """Expand ``families`` into representations and check every one (model, weights, layer,
    resolution); returns the expanded ``backbones`` mapping."""
    from .study_config import backbone_names, expand_representations

    for name, spec in (params.get("backbones") or {}).items():
        if spec is not None and not isinstance(spec, dict):
            raise ValueError(f"backbones.{name} must be a mapping like {{model: resnet50, weights: hub}}, got {spec!r}")
    backbones = expand_representations(params)
    if not backbones:
        raise ValueError("backbones: the study needs at least one backbone (or a `families` block)")
    backbone_names(params)
    for spec in backbones.values():
        backbone_spec(spec)
    return backbones


def check_pipeline_matches(params: dict[str, Any], pipeline: Any, env: str | None) -> None:
    """Stop a run whose pipeline was expanded for another environment's representations (the registry
    reads the env from the command line or ``KEDRO_ENV``; a session created in Python with
    ``env=...`` and no ``KEDRO_ENV`` would otherwise run the default env's representations)."""
    from .study_config import backbone_names

    expected = set(backbone_names(params))
    namespaces = {n.namespace.split(".")[0] for n in pipeline.nodes if n.namespace}
    stray = sorted(namespaces - expected)
    if stray:
        raise ValueError(
            f"this run's environment ({env or 'default'}) has the representations {sorted(expected)}, but the "
            f"pipeline was built for others ({stray}): the pipeline registry reads the environment from "
            f"`kedro ... --env` or KEDRO_ENV; set KEDRO_ENV={env} when creating a session in Python"
        )

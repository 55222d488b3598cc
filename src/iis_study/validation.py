"""Check the whole study's parameters before any node runs, so a mistake costs seconds, not hours.

Each block is read into its typed class (``iis_study.core.<stage>.blocks``), whose checks raise
``ValueError`` naming the parameter; what spans blocks (representations, the gallery's sparsity on
the sweep grid, fine-tuning's representations) and what touches the filesystem is checked here.
Called by a hook before the pipeline runs; usable alone: ``validate_study(params)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .core.finetune import FineTuningParams
from .core.concepts.blocks import ConceptParams
from .core.scoring.blocks import CorrelationParams, ScoringParams, SpecificationParams
from .core.representations.blocks import ExtractionParams, backbone_spec
from .core.reporting.blocks import GalleryParams
from .core.data import SplitParams
from .core.heads.datatypes import sweep_config
from .core.representations.backbones import PENULTIMATE
from .core.data import DatasetParams

logger = logging.getLogger(__name__)


def validate_study(params: dict[str, Any], pipelines: set[str] | None = None) -> None:
    """Validate every parameter block the study uses (``pipelines``: the pipelines about to run)."""
    if "tracking" in params:
        raise ValueError("tracking is not a parameter: MLflow settings live in conf/<env>/mlflow.yml "
                         "(tracking: {enabled, experiment, uri})")
    dataset = DatasetParams.from_params(params.get("dataset"))
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
    specification = SpecificationParams.from_params(params.get("specification"))
    if specification.enabled and sweep.estimator == "convex":
        specification.resolve_grids(sweep.l2_grid, sweep.l2_path)  # a written-out grid outside it is refused
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


_FILTERS = ("node_names", "from_nodes", "to_nodes", "from_inputs", "to_outputs", "tags", "namespaces", "only_missing_outputs")


def check_dataset_source(params: dict[str, Any], globals_: dict[str, Any]) -> None:
    """The images are read from ``globals.yml``'s ``dataset`` (the ``images`` catalog entry); a ``dataset``
    block set among the parameters instead (``parameters.yml``, ``--params dataset.root=...``) would be
    validated and logged but not read: an error naming where the block belongs."""
    in_params = DatasetParams.from_params(params.get("dataset"))
    in_globals = DatasetParams.from_params((globals_ or {}).get("dataset"))
    if in_params != in_globals:
        raise ValueError(
            f"dataset: the parameters say {in_params.to_dict()}, but the images are read from the `dataset` block "
            f"of conf/<env>/globals.yml, which says {in_globals.to_dict()}: move the dataset block to globals.yml"
        )


def check_pipeline_matches(params: dict[str, Any], pipeline: Any, env: str | None, run_params: dict[str, Any]) -> None:
    """Stop a run whose pipeline was expanded from other parameters than the run's own.

    The registry reads the parameters of the environment named by ``--env`` or ``KEDRO_ENV`` from the
    conf files; a session created in Python with ``env=...`` and no ``KEDRO_ENV``, or runtime ``--params``
    that change the representations, concept types, gallery or fine-tuned backbones, would otherwise
    run (or miss) other nodes than the run's parameters ask for. Compares node names both ways (only
    one way when the run selects nodes: ``--nodes``, ``--tags``, ...).
    """
    from .pipeline_registry import build_pipelines

    pipes = build_pipelines(params)
    names = run_params.get("pipeline_names") or ["__default__"]
    expected = {n.name for name in names if name in pipes for n in pipes[name].nodes}
    running = {n.name for n in pipeline.nodes}
    filtered = any(run_params.get(k) for k in _FILTERS)
    stray, missing = sorted(running - expected), ([] if filtered else sorted(expected - running))
    if stray or missing:
        def few(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")

        raise ValueError(
            f"this run's parameters (environment {env or 'default'}) do not match the pipeline the registry built"
            + (f"; nodes for other parameters: {few(stray)}" if stray else "")
            + (f"; nodes missing: {few(missing)}" if missing else "")
            + ". The registry reads conf/<env> as named by `--env` or KEDRO_ENV: set KEDRO_ENV="
            + f"{env or '<env>'} when creating a session in Python, and put changes to backbones, families, "
            "concepts.types, gallery or fine_tuning.backbones in conf/<env>/parameters.yml, not --params"
        )


PIPELINE_ORDER = ("data_processing", "feature_extraction", "concepts", "interpretability", "reporting", "fine_tuning")


def check_inputs_exist(pipeline: Any, catalog: Any, env: str | None, registry: Any) -> None:
    """A partial run (``--pipeline``, ``--from-nodes``, ...) whose inputs this environment has not written yet stops
    before any node, naming the pipeline that writes them (``registry``: the project's pipelines by name)."""
    missing = []
    for name in sorted(pipeline.inputs()):
        if name.startswith("params:") or name == "parameters":
            continue
        try:
            there = catalog.exists(name)
        except Exception:  # a dataset that cannot tell: let the run decide
            there = True
        if not there:
            missing.append(name)
    if not missing:
        return
    writers = {
        name: next((p for p in PIPELINE_ORDER if p in registry and name in registry[p].all_outputs()), None)
        for name in missing
    }
    first = next((p for p in PIPELINE_ORDER if p in writers.values()), None)
    flag = f" --env {env}" if env and env != "local" else ""
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = (f"run `kedro run{flag} --pipeline {first}` first (or the whole study: `kedro run{flag}`)" if first
            else f"run the whole study first: `kedro run{flag}`")
    raise ValueError(f"this run needs {shown}, which this environment ({env or 'base'}) has not written yet: {hint}")

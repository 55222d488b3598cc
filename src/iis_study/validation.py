"""Check the whole study's parameters before any node runs, so a mistake costs seconds, not hours.

Every check raises ``ValueError`` (or a subclass) whose message names the parameter and what was
expected. Called by a hook before the pipeline runs; usable alone: ``validate_study(params)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .core.store import check_storage

logger = logging.getLogger(__name__)


def validate_study(params: dict[str, Any], pipelines: set[str] | None = None) -> None:
    """Validate every parameter block the study uses."""
    from .core.data import DatasetSpec

    dataset = DatasetSpec.from_params(dict(params.get("dataset") or {}))
    if dataset.kind == "imagefolder":
        root = Path(dataset.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(
                f"dataset.root {str(root)!r} does not exist or is not a folder; expected root/<class>/*.jpg"
            )
        if not any(p.is_dir() for p in root.iterdir()):
            raise ValueError(f"dataset.root {str(root)!r} has no class folders; expected root/<class>/*.jpg")

    splits = params.get("splits") or {}
    fr = splits.get("fractions", [0.6, 0.2, 0.2])
    if len(fr) != 3 or any(not isinstance(f, (int, float)) or f <= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
        raise ValueError(f"splits.fractions must be three positive numbers (train, val, test) summing to 1, got {fr}")
    mpc = splits.get("max_per_class")
    if mpc is not None and (not isinstance(mpc, int) or isinstance(mpc, bool) or mpc < 3):
        raise ValueError(f"splits.max_per_class must be an integer >= 3 or null, got {mpc!r}")

    backbones = _validate_representations(params)

    extraction = params.get("extraction") or {}
    bs = extraction.get("batch_size", 128)
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"extraction.batch_size must be a positive integer, got {bs!r}")
    _check_device(extraction.get("device", "auto"), "extraction.device")

    concepts = params.get("concepts") or {}
    m = concepts.get("m", 200)
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"concepts.m must be a positive integer, got {m!r}")
    types = concepts.get("types", [])
    known = {"prototype", "cluster", "end_to_end", "textual"}
    if not types or set(types) - known:
        raise ValueError(f"concepts.types must be a non-empty subset of {sorted(known)}, got {types}")
    if "textual" in types and (pipelines is None or pipelines & {"__default__", "concepts"}):
        import importlib.util

        if importlib.util.find_spec("open_clip") is None:
            raise ImportError("concepts.types has 'textual', which needs open_clip, an optional extra: "
                              "pip install 'iis_study[textual]'")
    ipc = concepts.get("images_per_class", 10)
    if not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"concepts.images_per_class must be a positive integer, got {ipc!r}")

    from .pipelines.interpretability.nodes import sweep_config
    from .pipelines.reporting.nodes import correlation_groups

    correlation_groups(dict(params.get("correlation") or {}))

    sweep = dict(params.get("sweep") or {})
    _check_device(sweep.get("device", "auto"), "sweep.device")
    sweep_config(sweep)

    ft = params.get("fine_tuning")
    if ft and (pipelines is None or "fine_tuning" in pipelines):
        from .core.finetune import FinetuneConfig
        from .pipelines.fine_tuning.nodes import arms

        unknown = [b for b in ft.get("backbones") or [] if b not in backbones]
        if unknown:
            raise ValueError(f"fine_tuning.backbones: {unknown} are not in `backbones` ({sorted(backbones)})")
        staged = [b for b in ft.get("backbones") or [] if backbones[b].get("layer", "penultimate") != "penultimate"]
        if staged:
            raise ValueError(
                f"fine_tuning.backbones: {staged} are stage-layer representations; fine-tuning trains the "
                "whole backbone and exports it as a checkpoint, so name a `penultimate` representation"
            )
        if "prototype" not in types:
            raise ValueError(
                f"fine_tuning uses the study's prototype concepts, but concepts.types = {types} has no "
                "'prototype': add it (the concepts pipeline draws the prototypes fine-tuning re-embeds)"
            )
        for lam, seed in arms(ft):
            FinetuneConfig.from_params({**dict(ft.get("train") or {}), "lam": lam, "seed": seed})
        _check_device((ft.get("train") or {}).get("device", "auto"), "fine_tuning.train.device")
        sweep_config(dict(ft.get("sweep") or {}))
    _validate_reporting(params, types)
    logger.info("parameters checked: %d backbones, concept types %s", len(backbones), types)


def _int(value: Any, where: str, lo: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"{where} must be an integer >= {lo}, got {value!r}")


def _fraction(value: Any, where: str, lo: float = 0.0, hi: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo < float(value) < hi:
        raise ValueError(f"{where} must be a number in ({lo}, {hi}), got {value!r}")


def _validate_reporting(params: dict[str, Any], types: list[str]) -> None:
    """Scoring, correlation, gallery, tracking and the remaining extraction settings."""
    extraction = params.get("extraction") or {}
    workers = extraction.get("num_workers")
    if workers is not None:
        _int(workers, "extraction.num_workers", 0)
    if not isinstance(extraction.get("cache_dir", "data/04_feature/cache"), str):
        raise ValueError(f"extraction.cache_dir must be a folder path, got {extraction.get('cache_dir')!r}")
    storage = extraction.get("storage", "memory")
    if storage not in ("memory", "sharded"):
        raise ValueError(f"extraction.storage must be 'memory' or 'sharded', got {storage!r}")
    shard_rows = extraction.get("shard_rows", 16384)
    _int(shard_rows, "extraction.shard_rows", 1)
    check_storage(extraction.get("storage_dtype", "float32"), shard_rows)
    scoring = params.get("scoring") or {}
    _int(scoring.get("n_boot", 1000), "scoring.n_boot", 1)
    _int(scoring.get("seed", 0), "scoring.seed", 0)
    _fraction(scoring.get("ci", 0.95), "scoring.ci")
    correlation = params.get("correlation") or {}
    _int(correlation.get("n_boot", 2000), "correlation.n_boot", 1)
    _int(correlation.get("seed", 0), "correlation.seed", 0)
    _fraction(correlation.get("ci", 0.95), "correlation.ci")
    scores = correlation.get("scores", ["iis", "iis_chance_corrected"])
    if not scores or set(scores) - {"iis", "iis_chance_corrected"}:
        raise ValueError(
            f"correlation.scores must be a non-empty subset of ['iis', 'iis_chance_corrected'], got {scores!r}"
        )
    gallery = params.get("gallery")
    if gallery:
        ctype = gallery.get("concept_type", "prototype")
        if ctype not in ("prototype", "cluster"):
            raise ValueError(f"gallery.concept_type must be 'prototype' or 'cluster', got {ctype!r}")
        s = gallery.get("sparsity", 0.9)
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"gallery.sparsity must be in [0, 1), got {s!r}")
        sweep_grid = (params.get("sweep") or {}).get("sparsities", [])
        if sweep_grid and not any(abs(float(s) - float(g)) < 1e-9 for g in sweep_grid):
            raise ValueError(f"gallery.sparsity = {s} is not on the sweep grid sweep.sparsities = {list(sweep_grid)}")
        _int(gallery.get("n_images", 6), "gallery.n_images", 1)
        _int(gallery.get("top", 5), "gallery.top", 1)
    if "tracking" in params:
        raise ValueError("tracking is not a parameter: MLflow settings live in conf/<env>/mlflow.yml "
                         "(tracking: {enabled, experiment, uri})")


def _validate_representations(params: dict[str, Any]) -> dict[str, Any]:
    """Expand ``families`` into representations and check every one (model, weights, layer,
    resolution); returns the expanded ``backbones`` mapping."""
    from .core.backbones import BackboneSpec
    from .study_config import backbone_names, expand_representations

    for name, spec in (params.get("backbones") or {}).items():
        if not isinstance(spec, dict):
            raise ValueError(f"backbones.{name} must be a mapping like {{model: resnet50, weights: hub}}, got {spec!r}")
    backbones = expand_representations(params)
    if not backbones:
        raise ValueError("backbones: the study needs at least one backbone (or a `families` block)")
    backbone_names(params)
    for name, spec in backbones.items():
        BackboneSpec.from_params(name, {k: v for k, v in spec.items() if k != "name"})
    return backbones


def _check_device(device: str, where: str) -> None:
    import torch

    if device in (None, "auto", "cpu"):
        return
    if str(device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{where} = {device!r}, but this machine has no CUDA GPU; use 'cpu' or 'auto'")
        return
    raise ValueError(f"{where} must be 'auto', 'cpu' or 'cuda', got {device!r}")

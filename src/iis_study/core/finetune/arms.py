"""The fine-tuning study (METHOD §6): every (λ, seed) arm of one representation, and the tables over
representations that the pipeline writes."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..concepts.acquisition import ConceptSet
from ..concepts.elements import Elements
from ..representations.blocks import backbone_spec
from ..data import SPLITS, ImageSet
from . import loop, scoring
from .checkpoints import CheckpointStore
from .blocks import FineTuningParams

logger = logging.getLogger(__name__)


def fine_tune_representation(
    splits: pd.DataFrame,
    concept_elements: Elements,
    concepts_prototype: ConceptSet,
    images: ImageSet,
    checkpoints: CheckpointStore,
    backbone: Mapping[str, Any],
    fine_tuning: FineTuningParams | Mapping[str, Any],
) -> pd.DataFrame:
    """Fine-tune one representation for every (λ, seed), λ = 0 (cross-entropy only) included.

    ``backbone``: the representation's entry of the expanded ``backbones`` block. Checkpoints go to
    ``checkpoints.root/<representation key>/lam<λ>_seed<seed>/`` (keyed by the Kedro namespace, so two
    resolutions of one model never share a folder); an interrupted run resumes from its last saved
    epoch. The concepts are the study's prototypes of this representation (``concepts_prototype``'s
    element ids), re-embedded as the backbone trains. Returns one row per (λ, seed, epoch).
    """
    spec = backbone_spec(backbone)
    fine_tuning = FineTuningParams.from_params(fine_tuning)
    by_split = {s: images.subset(splits.loc[splits["split"] == s, "index"].to_numpy()) for s in SPLITS}
    num_classes = int(np.unique(splits["label"]).size)
    scoring_sweep = fine_tuning.scoring_sweep()
    concept_images = scoring.prototype_images(concept_elements, concepts_prototype.element_ids)
    rows = []
    for lam, seed in fine_tuning.arms():
        cfg = fine_tuning.run_config(lam, seed)
        ckpt = checkpoints.run_dir(spec, lam, seed, key=spec.name)
        logger.info("fine-tuning %s with λ = %g, seed %d -> %s", spec.display_name, lam, seed, ckpt)
        records = loop.finetune(spec, by_split, concept_images, cfg, ckpt, scoring_sweep, num_classes)
        for r in records:
            rows.append({**r.to_dict(), "model": spec.model, "checkpoint": str(ckpt / "backbone.safetensors")})
    return pd.DataFrame(rows)


def collect_histories(histories: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One table over every fine-tuned representation, (backbone, λ, seed, epoch) rows; ``histories``:
    each representation's history by its key (the part of a dataset name before the last dot)."""
    parts = []
    for name, h in histories.items():
        h = h.copy()
        h.insert(0, "backbone", name.rsplit(".", 1)[0])
        parts.append(h)
    table = pd.concat(parts, ignore_index=True)
    first = ["backbone", "lam", "seed", "epoch", "accuracy_test", "accuracy_linear_probe", "iis"]
    return table[first + [c for c in table.columns if c not in first]]


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Before/after table per (backbone, λ): mean ± std over seeds of test accuracy, IIS and probe accuracy."""
    last = results["epoch"].max()
    rows = []
    for (bb, lam), g in results.groupby(["backbone", "lam"]):
        row = {"backbone": bb, "lam": lam, "n_seeds": g["seed"].nunique()}
        for when, epoch in (("before", 0), ("after", last)):
            e = g[g["epoch"] == epoch]
            for col in ("accuracy_test", "iis", "accuracy_linear_probe"):
                vals = e[col].astype(float)
                row[f"{col}_{when}_mean"] = vals.mean()
                row[f"{col}_{when}_std"] = vals.std(ddof=1) if len(vals) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)

"""Nodes of the fine-tuning pipeline (METHOD §6): interpretability maximization and its control."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from iis_study.core.backbones import BackboneSpec
from iis_study.core.data import DatasetSpec, load_dataset
from iis_study.core.finetune import FinetuneConfig, finetune, prototype_images
from iis_study.pipelines.feature_extraction.nodes import _strip_name
from iis_study.pipelines.interpretability.nodes import sweep_config

logger = logging.getLogger(__name__)


def arms(fine_tuning: dict[str, Any]) -> list[tuple[float, int]]:
    """The (λ, seed) runs: every λ of ``fine_tuning.lams`` with the λ = 0 control always included."""
    lams = [float(v) for v in fine_tuning.get("lams", [0.0, 1.0])]
    bad = [v for v in lams if v < 0]
    if bad:
        raise ValueError(f"fine_tuning.lams must be >= 0 (λ weighs the interpretation loss), got {bad}")
    if 0.0 not in lams:
        logger.warning("fine_tuning.lams has no λ = 0 control; adding it (the control always runs)")
        lams = [0.0, *lams]
    seeds = [int(s) for s in fine_tuning.get("seeds", [0, 1, 2])]
    if not seeds:
        raise ValueError("fine_tuning.seeds must list at least one seed")
    return [(lam, seed) for lam in sorted(set(lams)) for seed in seeds]


def fine_tune_backbone(
    splits: pd.DataFrame,
    concept_elements: Any,
    concepts_prototype: dict[str, Any],
    dataset: dict[str, Any],
    backbone: dict[str, Any],
    fine_tuning: dict[str, Any],
) -> pd.DataFrame:
    """Fine-tune one backbone for every (λ, seed), λ = 0 (cross-entropy only) included.

    Checkpoints go to ``fine_tuning.checkpoint_dir/<model>/lam<λ>_seed<seed>/``; an interrupted
    run resumes from its last saved epoch. The concepts are the study's prototypes of this
    representation (``concepts_prototype``'s element ids), re-embedded as the backbone trains.
    Returns one row per (λ, seed, epoch).
    """
    spec = BackboneSpec.from_params(backbone.get("model", "backbone"), _strip_name(backbone))
    images = load_dataset(DatasetSpec.from_params(dataset))
    by_split = {s: images.subset(splits.loc[splits["split"] == s, "index"].to_numpy()) for s in ("train", "val", "test")}
    num_classes = int(np.unique(splits["label"]).size)
    train_params = dict(fine_tuning.get("train", {}))
    scoring_sweep = sweep_config(dict(fine_tuning.get("sweep", {})))
    root = Path(fine_tuning.get("checkpoint_dir", "data/06_models/fine_tuning"))
    concept_images = prototype_images(concept_elements, concepts_prototype["element_ids"])
    rows = []
    for lam, seed in arms(fine_tuning):
        cfg = FinetuneConfig.from_params({**train_params, "lam": lam, "seed": seed})
        tag = f"{spec.model}-{spec.weights if spec.weights in ('offline', 'hub', 'random') else 'ckpt'}"
        ckpt = root / tag / f"lam{lam:g}_seed{seed}"
        logger.info("fine-tuning %s with λ = %g, seed %d -> %s", spec.model, lam, seed, ckpt)
        records = finetune(spec, by_split, concept_images, cfg, ckpt, scoring_sweep, num_classes)
        for r in records:
            rows.append({**r.to_dict(), "model": spec.model, "checkpoint": str(ckpt / "backbone.safetensors")})
    return pd.DataFrame(rows)


def collect_fine_tuning(backbones: list[str], *histories: pd.DataFrame) -> pd.DataFrame:
    """One table over all fine-tuned backbones: (backbone, λ, seed, epoch) rows."""
    parts = []
    for name, h in zip(backbones, histories):
        h = h.copy()
        h.insert(0, "backbone", name)
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

"""Scoring along fine-tuning (:mod:`iis_study.core.finetune`): the study's prototype concepts,
re-embedded with the current backbone, and the IIS of a representation computed with the
study's own code (features via :func:`~iis_study.core.representations.features.extract`, heads via
:func:`~iis_study.core.heads.sweep`, IIS via :func:`~iis_study.core.scoring.scores.score_sweep`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..representations.backbones import Representation
from ..concepts.elements import Elements
from ..data import ImageSet, array_image_set
from ..representations.features import Features, extract
from .blocks import SPLIT_NAMES, EpochRecord, FineTuningTrainParams, check_images, element_images
from ..heads import ConceptSpace, HeadsProblem, Split, SweepParams, fit_heads
from ..scoring.scores import score_sweep

if TYPE_CHECKING:
    from .training import TrainingState

# the messages of a fine-tuning run come from one logger, as before scoring had its own module
logger = logging.getLogger("iis_study.core.finetune")


# --------------------------------------------------------------------------- concepts and evaluation


def prototype_images(elements: np.ndarray | Elements, element_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """The study's M prototype elements (M, S, S, 3): ``elements[element_ids]``, where
    ``element_ids`` are the ids the concepts pipeline stored with its prototype concept space
    (the same seeded draw, over the elements that do not embed to zero)."""
    arr = element_images(elements)
    ids = np.asarray(element_ids.cpu().numpy() if isinstance(element_ids, torch.Tensor) else element_ids)
    if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prototype element_ids must be a non-empty 1-d integer array, got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= len(arr) or len(np.unique(ids)) != len(ids):
        raise ValueError(f"prototype element_ids must be distinct ids in [0, {len(arr)}) (the concept elements); "
                         f"got ids in [{ids.min()}, {ids.max()}]: were the concepts built from other elements?")
    return np.ascontiguousarray(arr[ids])


def concept_vectors(
    rep: Representation, concept_images: np.ndarray, num_workers: int = 0, batch_size: int = 128
) -> torch.Tensor:
    """Prototype concept vectors ``C`` (M, D) of ``rep``: the M element images (from
    :func:`prototype_images`) embedded by the backbone as it is now (eval mode, no gradient),
    L2-normalised. For the pre-trained backbone these are the study's prototype vectors
    (:func:`~iis_study.core.concepts.vectors.prototype_vectors`). The model's train/eval mode is restored.
    """
    was_training = rep.model.training
    rep.model.eval()
    try:
        feats = extract(rep, array_image_set(np.ascontiguousarray(concept_images)), batch_size=batch_size,
                        num_workers=num_workers, progress=False, desc="concepts")
    finally:
        rep.model.train(was_training)
    return F.normalize(feats.x, p=2.0, dim=1, eps=1e-12)


def score_features(
    feats: dict[str, Features],
    concepts: torch.Tensor,
    sweep_config: SweepParams,
    num_classes: int,
    progress: bool = False,
) -> dict[str, Any]:
    """IIS of features: :func:`~iis_study.core.heads.sweep` + :func:`~iis_study.core.scoring.scores.score_sweep`.

    Zero concept vectors (elements the backbone maps to 0) are left out, with a warning.
    """
    splits = {s: Split(x=feats[s].x, y=feats[s].y) for s in SPLIT_NAMES}
    vectors = concepts.float().cpu()
    zero = vectors.norm(dim=1) == 0
    if bool(zero.any()):  # a concept element the backbone maps to 0 (e.g. dead ReLUs on a blank patch)
        logger.warning("scoring: %d of %d concept vectors are zero (their elements embed to 0); scoring with "
                       "the other %d", int(zero.sum()), len(vectors), int((~zero).sum()))
        vectors = vectors[~zero]
        if len(vectors) == 0:
            raise ValueError("every concept element embeds to 0; cannot score this representation")
    space = ConceptSpace(kind="vectors", vectors=vectors)
    problem = HeadsProblem(splits["train"], splits["val"], splits["test"], {"prototype": space}, num_classes)
    result = fit_heads(problem, sweep_config, progress=progress)["prototype"]
    summary, _ = score_sweep(result)
    return summary


def _extract_splits(
    rep: Representation, images: dict[str, ImageSet], names: Sequence[str], num_workers: int, progress: bool
) -> dict[str, Features]:
    was_training = rep.model.training
    rep.model.eval()
    try:
        return {s: extract(rep, images[s], num_workers=num_workers, progress=progress, desc=f"features {s}")
                for s in names}
    finally:
        rep.model.train(was_training)


def evaluate_representation(
    rep: Representation,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    sweep_config: SweepParams,
    num_classes: int,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a representation as the study does: features of train/val/test, the prototype
    elements ``concept_images`` (:func:`prototype_images`) embedded by ``rep``, heads sweep, IIS.

    Returns :func:`~iis_study.core.scoring.scores.score_sweep`'s summary (``accuracy_linear_probe``,
    ``iis``, ``iis_chance_corrected``, their std and interval, ...).
    """
    check_images(images, num_classes)
    concept_images = element_images(concept_images)
    feats = _extract_splits(rep, images, SPLIT_NAMES, num_workers, progress)
    c = concept_vectors(rep, concept_images, num_workers)
    return score_features(feats, c, sweep_config, num_classes, progress)


def _accuracy(h_std: nn.Module, feats: Features, device: torch.device) -> float:
    with torch.no_grad():
        pred = h_std(feats.x.to(device)).argmax(-1).cpu()
    return float((pred == feats.y).float().mean())


# --------------------------------------------------------------------------- scoring an epoch


def evaluate_epoch(
    state: TrainingState,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FineTuningTrainParams,
    sweep_config: SweepParams,
    num_classes: int,
    device: torch.device,
    epoch: int,
    train_loss: float | None,
    progress: bool,
) -> EpochRecord:
    """Accuracy of ``h_std`` on val/test; on scored epochs also the IIS of the current backbone."""
    scored = epoch in cfg.scored_epochs()
    names = SPLIT_NAMES if scored else ("val", "test")
    feats = _extract_splits(state.rep, images, names, cfg.num_workers, progress=False)
    rec = EpochRecord(
        epoch=epoch, lam=float(cfg.lam), seed=int(cfg.seed), train_loss=train_loss,
        accuracy_test=_accuracy(state.h_std, feats["test"], device),
        accuracy_val=_accuracy(state.h_std, feats["val"], device),
    )
    if scored:
        c = concept_vectors(state.rep, concept_images, cfg.num_workers)
        summary = score_features(feats, c, sweep_config, num_classes, progress)
        rec.accuracy_linear_probe = _finite_or_none(summary["accuracy_linear_probe"])
        rec.iis = _finite_or_none(summary["iis"])
        rec.iis_chance_corrected = _finite_or_none(summary["iis_chance_corrected"])
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    loss_txt = fmt(train_loss)
    iis_txt = f", probe {fmt(rec.accuracy_linear_probe)}, IIS {fmt(rec.iis)}" if scored else ""
    logger.info(
        "fine-tune %s lam=%g seed=%d epoch %d/%d: loss %s, val %.3f, test %.3f%s",
        state.rep.spec.name, cfg.lam, cfg.seed, epoch, cfg.epochs, loss_txt,
        rec.accuracy_val, rec.accuracy_test, iis_txt,
    )
    return rec


def _finite_or_none(value: float) -> float | None:
    """A score, or ``None`` where it is undefined (NaN, e.g. chance correction of a chance-level probe)."""
    v = float(value)
    return v if math.isfinite(v) else None

"""Fine-tuning with interpretability maximization (METHOD §6).

The backbone ``f``, a linear probe head ``h_std`` (``D -> K``) and an interpretation head
``h_interp`` (``LayerNorm_M`` with affine, then ``M -> K``) are trained together on

    L = CE(h_std(f(x)), y) + λ · CE(h_interp(sparse_s(LN_M(f(x) · Cᵀ))), y)

where ``C`` holds the M prototype concept vectors **of the study** (the same elements the
concepts pipeline drew for this representation, after the same filtering of elements that embed
to zero: :func:`prototype_images` takes them by the study's element ids), L2-normalised and
**re-embedded with the current backbone** (eval mode, no gradient) at the start of every epoch, so the
interpretation lives in the current representation space; ``sparse_s`` is
:func:`~iis_study.core.heads.sparsify` with ``k = floor(s·M)``. ``λ = 0`` is the control arm
(METHOD §7): the interpretation branch is skipped entirely, concepts are not embedded, and
the run is bit-identical to plain cross-entropy fine-tuning with the same seed.

Design choices (the authors published no code for this part; this is our reference):

* Optimiser: AdamW (fused implementation) with a lower learning rate for the backbone than for
  the heads, weight decay on every trained tensor; a linear warm-up (optional) then a cosine schedule to 0,
  stepped once per optimiser step. Gradient accumulation divides each micro-batch loss by
  ``accumulation_steps``; a trailing incomplete group at the end of an epoch still steps.
* Data: no random augmentation (deterministic runs). Images are decoded and resized to the
  backbone's input size by ``DataLoader`` workers (uint8 CHW), normalised on the device by
  :meth:`Representation.normalise`. The order is a ``torch.randperm`` from a generator seeded
  per (seed, epoch); a final batch of a single image is dropped (BatchNorm cannot train on it).
  Nothing in training reads the global RNG, so evaluation or the interpretation branch cannot
  perturb it.
* Head initialisation: from dedicated generators per (seed, head) (``nn.Linear``'s default
  uniform bounds), LayerNorm affine at (1, 0).
* Checkpoints (:mod:`.checkpoints`): after every epoch, ``epoch_{e:03d}.safetensors``
  (atomic) holds backbone, heads, optimiser, scheduler, grad-scaler and RNG states plus the history;
  the metadata stores a hash of everything that determines the run, so resuming into a folder of
  another configuration is an error rather than a silent mix. A resumed run equals an
  uninterrupted one. :func:`run_checkpoint_dir` gives a run's folder, keyed by the caller's
  ``checkpoint_key`` (the representation's namespace) or, without one, by the model.
* Evaluation: after the epochs in ``eval_epochs`` (0 = the pre-trained start) the current
  backbone is scored with the study's own code: features via
  :func:`~iis_study.core.representations.features.extract`, heads via :func:`~iis_study.core.heads.sweep`,
  IIS via :func:`~iis_study.core.scoring.scores.score_sweep` (:func:`evaluate_representation`).

This module is the training loop (:func:`finetune`); the package :mod:`iis_study.core.finetune` is the
public face. The pieces: :mod:`.config` (settings, records, input checks), :mod:`.training` (heads,
loss, data order, schedule, one epoch), :mod:`.scoring` (prototype concepts, IIS along training),
:mod:`.checkpoints` (checkpoint files, resume, the fine-tuned backbone) and :mod:`.study` (every
(λ, seed) arm of one representation, the tables over representations). The loop calls the pieces
through their modules, so a test patches a name where it is defined (``training.train_epoch``).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..representations.backbones import BackboneParams, Representation, WeightsUnavailableError, build
from ..data import ImageSet
from ..heads import SweepParams, n_dropped
from . import checkpoints, scoring, training
from .blocks import EpochRecord, FineTuningTrainParams, check_images, element_images, resolve_device

logger = logging.getLogger(__name__)


def _build_backbone(spec: BackboneParams, device: torch.device) -> Representation:
    """Build the representation (``build`` validates the spec first), turning weight problems into
    errors that name the parameter."""
    try:
        return build(spec, device=str(device))
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(
            f"fine_tuning: cannot load backbones.{spec.name}.weights = {spec.weights!r} for model "
            f"{spec.model!r}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- training


def finetune(
    spec: BackboneParams,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FineTuningTrainParams,
    checkpoint_dir: str | Path,
    sweep_config: SweepParams,
    num_classes: int,
    progress: bool = True,
) -> list[EpochRecord]:
    """Fine-tune ``spec``'s backbone with interpretability maximization (METHOD §6).

    ``concept_images`` are the M prototype elements of the study (:func:`prototype_images`), so
    the epoch-0 IIS is the study's prototype IIS of this representation at the same sweep settings.

    Trains for ``cfg.epochs`` epochs, checkpointing after each into
    ``checkpoint_dir/epoch_{e:03d}.safetensors`` and resuming from the last checkpoint of
    the same run when present. Writes the final backbone to
    ``checkpoint_dir/backbone.safetensors``. Returns one :class:`EpochRecord` per epoch,
    epoch 0 (the pre-trained start) first.
    """
    cfg.validate()
    sweep_config.validate()
    check_images(images, num_classes)
    concept_images = element_images(concept_images)
    m = len(concept_images)
    device = resolve_device(cfg.device)
    rep = _build_backbone(spec, device)
    run_id = checkpoints.run_hash(
        spec, rep.weights_fingerprint, images, concept_images, cfg, device, sweep_config, num_classes
    )
    ckpt_dir = Path(checkpoint_dir)
    state = training.new_state(rep, cfg, m, num_classes, len(images["train"]), device)
    done, history = checkpoints.resume(ckpt_dir, run_id, state)
    evaluate = functools.partial(
        scoring.evaluate_epoch, state, images, concept_images, cfg, sweep_config, num_classes, device, progress=progress
    )
    if done == 0:
        history = [evaluate(epoch=0, train_loss=None)]
    dataset = training.LabelledImages(images["train"], rep.input_size, rep.interpolation)
    k = n_dropped(cfg.sparsity, m)
    for epoch in range(done + 1, cfg.epochs + 1):
        concepts = None
        if cfg.lam > 0:  # re-embedded with the current backbone; λ = 0 never touches the concepts
            concepts = scoring.concept_vectors(rep, concept_images, cfg.num_workers).to(device)
        loss = training.train_epoch(state, dataset, concepts, k, cfg, device, epoch, progress)
        history.append(evaluate(epoch=epoch, train_loss=loss))
        checkpoints.save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.safetensors", state, epoch, history, run_id, cfg)
    rep.model.eval()
    checkpoints.save_backbone(ckpt_dir / "backbone.safetensors", rep.model, {
        "model": spec.model, "run_hash": run_id, "epochs": str(cfg.epochs),
        "preprocess": json.dumps(rep.preprocess_config()),
    })
    return history

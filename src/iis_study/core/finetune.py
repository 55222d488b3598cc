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
* Checkpoints: after every epoch, ``epoch_{e:03d}.safetensors`` (atomic) holds backbone, heads,
  optimiser, scheduler, grad-scaler and RNG states plus the history; the metadata stores a
  hash of everything that determines the run, so resuming into a folder of another
  configuration is an error rather than a silent mix. A resumed run equals an uninterrupted one.
* Evaluation: after the epochs in ``eval_epochs`` (0 = the pre-trained start) the current
  backbone is scored with the study's own code: features via
  :func:`~iis_study.core.features.extract`, heads via :func:`~iis_study.core.heads.sweep`,
  IIS via :func:`~iis_study.core.scores.score_sweep` (:func:`evaluate_representation`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .backbones import BackboneSpec, Representation, WeightsUnavailableError, build, spec_dict
from .concepts import Elements
from .data import ImageSet, array_image_set
from .features import Features, _Resized, extract, load_tensors, save_tensors
from .heads import ConceptSpace, Split, SweepConfig, derive_seed, n_dropped, sparsify, sweep
from .params import reject_unknown_keys
from .scores import score_sweep

logger = logging.getLogger(__name__)

FORMAT = "iis_study.finetune"
FORMAT_VERSION = "2"  # 2: concepts are the study's prototypes (by element id)
BN_MODES = ("train", "eval", "frozen")
DEVICES = ("auto", "cpu", "cuda")
SPLIT_NAMES = ("train", "val", "test")
_CKPT_RE = re.compile(r"^epoch_(\d{3,})\.safetensors$")


# --------------------------------------------------------------------------- config and records


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of one fine-tuning run (the ``fine_tuning`` parameter block)."""

    lam: float = 1.0
    sparsity: float = 0.1
    epochs: int = 3
    batch_size: int = 64
    accumulation_steps: int = 1
    lr_backbone: float = 1e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    bn_mode: str = "train"
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_epochs: tuple[int, ...] | None = None

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> FinetuneConfig:
        """Build from a parameter mapping; unknown keys are an error."""
        if "m" in params:
            raise ValueError("fine_tuning: m is not a fine-tuning setting: the concepts are the study's M prototypes "
                             "(concepts.m, concepts.seed); remove fine_tuning.train.m")
        reject_unknown_keys(params, cls.__dataclass_fields__, "fine_tuning")
        p = dict(params)
        if p.get("eval_epochs") is not None:
            p["eval_epochs"] = tuple(int(e) for e in p["eval_epochs"])
        cfg = cls(**p)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field; a ``ValueError`` names ``fine_tuning.<field>`` and what was expected."""
        _check_real(self.lam, "lam", lo=0.0)
        _check_real(self.sparsity, "sparsity", lo=0.0)
        if not float(self.sparsity) < 1.0:
            raise ValueError(f"fine_tuning.sparsity must lie in [0, 1), got {self.sparsity!r}")
        minimum = {"epochs": 1, "batch_size": 2, "accumulation_steps": 1, "num_workers": 0}
        for name, lo in minimum.items():
            _check_int(getattr(self, name), name, lo)
        _check_int(self.seed, "seed", None)
        for name in ("lr_backbone", "lr_heads"):
            _check_real(getattr(self, name), name, lo=0.0, strict=True)
        _check_real(self.weight_decay, "weight_decay", lo=0.0)
        _check_real(self.warmup_epochs, "warmup_epochs", lo=0.0)
        if float(self.warmup_epochs) > self.epochs:
            raise ValueError(
                f"fine_tuning.warmup_epochs = {self.warmup_epochs} exceeds fine_tuning.epochs = {self.epochs}"
            )
        if self.bn_mode not in BN_MODES:
            raise ValueError(f"fine_tuning.bn_mode must be one of {list(BN_MODES)}, got {self.bn_mode!r}")
        if self.device not in DEVICES:
            raise ValueError(f"fine_tuning.device must be one of {list(DEVICES)}, got {self.device!r}")
        for name in ("amp", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(  # noqa: TRY004 - configuration errors are ValueErrors throughout
                    f"fine_tuning.{name} must be true or false, got {getattr(self, name)!r}"
                )
        if self.eval_epochs is not None:
            bad = [e for e in self.eval_epochs if isinstance(e, bool) or not isinstance(e, (int, np.integer))
                   or not 0 <= int(e) <= self.epochs]
            if bad:
                raise ValueError(
                    f"fine_tuning.eval_epochs must be epochs in [0, {self.epochs}] (0 = before training), "
                    f"got {tuple(self.eval_epochs)}"
                )

    def scored_epochs(self) -> set[int]:
        """Epochs after which IIS is scored (0 = the pre-trained start)."""
        if self.eval_epochs is None:
            return set(range(self.epochs + 1))
        return {int(e) for e in self.eval_epochs}


def _check_real(value: Any, name: str, lo: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and math.isfinite(float(value)) and (float(value) > lo if strict else float(value) >= lo):
        return
    op = ">" if strict else ">="
    raise ValueError(f"fine_tuning.{name} must be a finite number {op} {lo}, got {value!r}")


def _check_int(value: Any, name: str, lo: int | None) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and (lo is None or int(value) >= lo):
        return
    expected = "an integer" if lo is None else f"an integer >= {lo}"
    raise ValueError(f"fine_tuning.{name} must be {expected}, got {value!r}")


@dataclass
class EpochRecord:
    """State of a run after ``epoch`` epochs (0 = the pre-trained start).

    ``accuracy_test`` / ``accuracy_val``: top-1 accuracy of the jointly trained ``h_std``.
    ``accuracy_linear_probe``, ``iis``, ``iis_chance_corrected``: from a fresh sweep on the
    current representation, only on scored epochs (``None`` otherwise).
    """

    epoch: int
    lam: float
    seed: int
    train_loss: float | None
    accuracy_test: float
    accuracy_val: float
    accuracy_linear_probe: float | None = None
    iis: float | None = None
    iis_chance_corrected: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (NaN kept as ``None``)."""
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- heads and loss


class InterpretationHead(nn.Module):
    """``h_interp``: ``LayerNorm_M`` (affine) over the concept scores, ``sparsify``, linear ``M -> K``."""

    def __init__(self, m: int, num_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(m)
        self.linear = nn.utils.skip_init(nn.Linear, m, num_classes)

    def forward(self, z: torch.Tensor, concepts: torch.Tensor, k: int) -> torch.Tensor:
        """Logits from representations ``z`` (B, D) through concepts ``C`` (M, D), dropping ``k``."""
        return self.linear(sparsify(self.ln(z @ concepts.T), k))


def _fill_linear(linear: nn.Linear, gen: torch.Generator) -> None:
    """``nn.Linear``'s default init (uniform in ±1/sqrt(fan_in)) drawn from ``gen``."""
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        w = torch.rand(linear.weight.shape, generator=gen) * (2 * bound) - bound
        b = torch.rand(linear.bias.shape, generator=gen) * (2 * bound) - bound
        linear.weight.copy_(w)
        linear.bias.copy_(b)


def _head_generator(head: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("finetune", head, int(seed)))


def init_heads(dim: int, m: int, num_classes: int, seed: int) -> tuple[nn.Linear, InterpretationHead]:
    """``h_std`` (D -> K) and ``h_interp`` (M -> K), each initialised from its own generator.

    No global RNG is read, so creating ``h_interp`` cannot change anything else in a run.
    """
    h_std = nn.utils.skip_init(nn.Linear, dim, num_classes)
    _fill_linear(h_std, _head_generator("h_std", seed))
    h_interp = InterpretationHead(m, num_classes)
    _fill_linear(h_interp.linear, _head_generator("h_interp", seed))
    return h_std, h_interp


def finetune_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    h_std: nn.Module,
    h_interp: InterpretationHead,
    concepts: torch.Tensor | None,
    k: int,
    lam: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(h_std(z), y) + λ · CE(h_interp(z; C, k), y)``; at ``λ = 0`` only the first term.

    At ``λ = 0`` the interpretation branch is not evaluated at all (``concepts`` may be
    ``None``): the loss, and hence every gradient, is exactly plain cross-entropy. The
    interpretation branch runs in float32 outside autocast.
    """
    ce_std = F.cross_entropy(h_std(z), y)
    parts = {"ce_std": float(ce_std.detach())}
    if lam == 0:
        return ce_std, parts
    if concepts is None:
        raise ValueError("fine_tuning.lam > 0 needs concept vectors")
    with torch.autocast(z.device.type, enabled=False):
        ce_interp = F.cross_entropy(h_interp(z.float(), concepts.float(), k), y)
    parts["ce_interp"] = float(ce_interp.detach())
    return ce_std + lam * ce_interp, parts


# --------------------------------------------------------------------------- data order and schedule


class _LabelledImages(Dataset):
    """Resized uint8 CHW images with their integer labels (decoded in ``DataLoader`` workers)."""

    def __init__(self, images: ImageSet, size: int, interpolation: str) -> None:
        self.inner = _Resized(images, size, interpolation)
        self.labels = np.asarray(images.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, _ = self.inner[i]
        return img, int(self.labels[i])


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Minibatches per epoch: full batches plus a final one of at least 2 images."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The minibatches (index lists) of ``epoch`` (1-based): a seeded permutation, cut in batches.

    A trailing batch of one image is dropped (BatchNorm cannot train on a single sample).
    """
    gen = torch.Generator().manual_seed(derive_seed("finetune", "data", int(seed), int(epoch)))
    perm = torch.randperm(n, generator=gen).tolist()
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[: batches_per_epoch(n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, accumulation_steps: int) -> int:
    """Optimiser steps per epoch (a trailing incomplete accumulation group also steps)."""
    return math.ceil(batches_per_epoch(n, batch_size) / accumulation_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    model: nn.Module, heads: Sequence[nn.Module], cfg: FinetuneConfig, n_train: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (backbone and heads in two groups) and its warm-up + cosine schedule."""
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr_backbone},
        {"params": [p for h in heads for p in h.parameters() if p.requires_grad], "lr": cfg.lr_heads},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=_use_fused(model))
    per_epoch = steps_per_epoch(n_train, cfg.batch_size, cfg.accumulation_steps)
    total = per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * per_epoch)
    schedule = functools.partial(lr_factor, total_steps=total, warmup_steps=warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return opt, sched


def _use_fused(model: nn.Module) -> bool:
    """Fused AdamW (one kernel per step, several times faster) where torch has it for the device."""
    dev = next(model.parameters()).device.type
    return dev in ("cpu", "cuda")


# --------------------------------------------------------------------------- devices and modes


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "fine_tuning.device = 'cuda' but this machine has no CUDA device; use 'auto' or 'cpu'"
        )
    return torch.device(device)


def _amp_dtype(device: torch.device, cfg: FinetuneConfig) -> torch.dtype | None:
    """Autocast dtype on CUDA (bf16 where supported, else fp16); ``None`` = no autocast."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


def _prepare_backbone(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Make the backbone trainable; ``bn_mode='frozen'`` freezes BatchNorm affine parameters."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.bn_mode == "frozen":
        for bn in _batchnorms(model):
            for p in bn.parameters():
                p.requires_grad_(False)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)


def set_train_mode(model: nn.Module, bn_mode: str) -> None:
    """Training mode; BatchNorm layers keep their running statistics unless ``bn_mode='train'``."""
    model.train()
    if bn_mode != "train":
        for bn in _batchnorms(model):
            bn.eval()


def model_input(
    rep: Representation, batch_uint8: torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """uint8 CHW batch -> normalised float input on ``device``."""
    x = rep.normalise(batch_uint8.to(device, non_blocking=True))
    return x if channels_last else x.contiguous()


# --------------------------------------------------------------------------- concepts and evaluation


def prototype_images(elements: np.ndarray | Elements, element_ids: np.ndarray | torch.Tensor) -> np.ndarray:
    """The study's M prototype elements (M, S, S, 3): ``elements[element_ids]``, where
    ``element_ids`` are the ids the concepts pipeline stored with its prototype concept space
    (the same seeded draw, over the elements that do not embed to zero)."""
    arr = _element_images(elements)
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
    (:func:`~iis_study.core.concepts.prototype_vectors`). The model's train/eval mode is restored.
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
    sweep_config: SweepConfig,
    num_classes: int,
    progress: bool = False,
) -> dict[str, Any]:
    """IIS of features: :func:`~iis_study.core.heads.sweep` + :func:`~iis_study.core.scores.score_sweep`.

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
    result = sweep(
        splits["train"], splits["val"], splits["test"], space, num_classes, sweep_config, progress=progress
    )
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
    sweep_config: SweepConfig,
    num_classes: int,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Score a representation as the study does: features of train/val/test, the prototype
    elements ``concept_images`` (:func:`prototype_images`) embedded by ``rep``, heads sweep, IIS.

    Returns :func:`~iis_study.core.scores.score_sweep`'s summary (``accuracy_linear_probe``,
    ``iis``, ``iis_chance_corrected``, their std and interval, ...).
    """
    _check_images(images, num_classes)
    concept_images = _element_images(concept_images)
    feats = _extract_splits(rep, images, SPLIT_NAMES, num_workers, progress)
    c = concept_vectors(rep, concept_images, num_workers)
    return score_features(feats, c, sweep_config, num_classes, progress)


def _accuracy(h_std: nn.Module, feats: Features, device: torch.device) -> float:
    with torch.no_grad():
        pred = h_std(feats.x.to(device)).argmax(-1).cpu()
    return float((pred == feats.y).float().mean())


# --------------------------------------------------------------------------- input checks


def _element_images(elements: np.ndarray | Elements) -> np.ndarray:
    arr = elements.images if isinstance(elements, Elements) else np.asarray(elements)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"elements must be an (E, S, S, 3) uint8 array, got shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr


def _check_images(images: dict[str, ImageSet], num_classes: int) -> None:
    missing = [s for s in SPLIT_NAMES if s not in images]
    if missing:
        raise ValueError(f"images must have the splits {list(SPLIT_NAMES)}; missing {missing}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for s in SPLIT_NAMES:
        lab = np.asarray(images[s].labels)
        if len(lab) < 1:
            raise ValueError(f"images[{s!r}] is empty")
        if lab.min() < 0 or lab.max() >= num_classes:
            raise ValueError(
                f"images[{s!r}] has labels outside [0, {num_classes}): range [{lab.min()}, {lab.max()}]"
            )
    if len(images["train"]) < 2:
        raise ValueError("images['train'] needs at least 2 images")


def _build_backbone(spec: BackboneSpec, device: torch.device) -> Representation:
    """Build the representation (``build`` validates the spec first), turning weight problems into
    errors that name the parameter."""
    try:
        return build(spec, device=str(device))
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(
            f"fine_tuning: cannot load backbones.{spec.name}.weights = {spec.weights!r} for model "
            f"{spec.model!r}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- run identity and checkpoints


def _array_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def run_hash(
    spec: BackboneSpec,
    initial_fingerprint: str,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FinetuneConfig,
    device: torch.device,
    sweep_config: SweepConfig,
    num_classes: int,
) -> str:
    """Hash of everything that determines a run's results (not ``num_workers``, not progress)."""
    c = {k: v for k, v in asdict(cfg).items() if k != "num_workers"}
    c["device"] = device.type
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": c,
        "backbone": {**spec_dict(spec), "fingerprint": initial_fingerprint},
        "images": {s: images[s].fingerprint() for s in SPLIT_NAMES},
        "concept_images": _array_hash(concept_images),
        "sweep": asdict(sweep_config),
        "num_classes": int(num_classes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class _State:
    """Everything that is trained or stepped."""

    rep: Representation
    h_std: nn.Linear
    h_interp: InterpretationHead
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu()
    return tensors, json.dumps(sd["param_groups"])


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {
        "rng_numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "rng_python": json.dumps(random.getstate()),
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = json.loads(meta["rng_numpy"])
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py = json.loads(meta["rng_python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def save_checkpoint(path: Path, state: _State, epoch: int, history: list[EpochRecord], run_id: str,
                    cfg: FinetuneConfig) -> None:
    """Atomically write every state of the run after ``epoch`` epochs."""
    tensors = {**_prefixed("backbone", state.rep.model), **_prefixed("h_std", state.h_std),
               **_prefixed("h_interp", state.h_interp)}
    opt_tensors, groups = _optimizer_tensors(state.opt)
    rng_tensors, rng_meta = _rng_tensors()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "run_hash": run_id,
        "epoch": str(epoch),
        "config": json.dumps(asdict(cfg)),
        "history": json.dumps([r.to_dict() for r in history]),
        "optim_param_groups": groups,
        "scheduler": json.dumps(state.sched.state_dict()),
        "scaler": json.dumps(state.scaler.state_dict()),
        **rng_meta,
    }
    save_tensors(path, {**tensors, **opt_tensors, **rng_tensors}, meta)


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    groups = json.loads(groups_json)
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})
    _match_memory_format(opt)


def _match_memory_format(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor its parameter's strides (e.g. channels_last).

    Checkpoints store contiguous tensors; the fused AdamW kernel walks parameter and state
    memory in step, so state in another layout than its parameter would be updated wrongly.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, t in st.items():
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)


def load_checkpoint_state(path: Path, state: _State) -> tuple[int, list[EpochRecord]]:
    """Restore a run from ``path``; returns its epoch and history."""
    tensors, meta = load_tensors(path)
    state.rep.model.load_state_dict(_unprefixed("backbone", tensors), strict=True)
    state.h_std.load_state_dict(_unprefixed("h_std", tensors), strict=True)
    state.h_interp.load_state_dict(_unprefixed("h_interp", tensors), strict=True)
    _load_optimizer(state.opt, tensors, meta["optim_param_groups"])
    state.sched.load_state_dict(json.loads(meta["scheduler"]))
    scaler_state = json.loads(meta["scaler"])
    if scaler_state:
        state.scaler.load_state_dict(scaler_state)
    _restore_rng(tensors, meta)
    history = [EpochRecord.from_dict(d) for d in json.loads(meta["history"])]
    return int(meta["epoch"]), history


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Epoch checkpoints in ``checkpoint_dir`` as (epoch, path), by epoch."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def _checkpoint_hash(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        return None
    return meta.get("run_hash")


def _resume(checkpoint_dir: Path, run_id: str, state: _State) -> tuple[int, list[EpochRecord]]:
    """Continue from the last readable checkpoint of this run; (0, []) when there is none."""
    for epoch, path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            found = _checkpoint_hash(path)
        except (OSError, ValueError, SafetensorError) as exc:  # unreadable: an older one may still serve
            logger.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            continue
        if found != run_id:
            raise ValueError(
                f"fine-tuning checkpoint_dir {str(checkpoint_dir)!r} holds checkpoints of another run "
                f"({path.name}: run hash {found}, this run {run_id}): fine_tuning settings, backbone, "
                "data or sweep differ. Use another checkpoint_dir or delete the old checkpoints."
            )
        done, history = load_checkpoint_state(path, state)
        logger.info("resuming fine-tuning from %s (epoch %d)", path, done)
        return done, history
    return 0, []


# --------------------------------------------------------------------------- training


def _train_epoch(
    state: _State,
    dataset: _LabelledImages,
    concepts: torch.Tensor | None,
    k: int,
    cfg: FinetuneConfig,
    device: torch.device,
    epoch: int,
    progress: bool,
) -> float:
    """One epoch over the training images; returns the mean loss per image."""
    from tqdm.auto import tqdm

    batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed("finetune", "loader", cfg.seed, epoch)),
    )
    amp_dtype = _amp_dtype(device, cfg)
    model = state.rep.model
    set_train_mode(model, cfg.bn_mode)
    state.opt.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    bar = tqdm(total=len(batches), desc=f"fine-tune epoch {epoch}", disable=not progress, mininterval=2.0)
    for i, (xb, yb) in enumerate(loader):
        x = model_input(state.rep, xb, device, cfg.channels_last)
        y = yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = model(x)
            loss, _ = finetune_loss(z, y, state.h_std, state.h_interp, concepts, k, cfg.lam)
        state.scaler.scale(loss / cfg.accumulation_steps).backward()
        if (i + 1) % cfg.accumulation_steps == 0 or i + 1 == len(batches):
            state.scaler.step(state.opt)
            state.scaler.update()
            state.opt.zero_grad(set_to_none=True)
            state.sched.step()
        total += float(loss.detach()) * len(yb)
        count += len(yb)
        bar.update(1)
    bar.close()
    return total / max(count, 1)


def _evaluate_epoch(
    state: _State,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FinetuneConfig,
    sweep_config: SweepConfig,
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


def _new_state(rep: Representation, cfg: FinetuneConfig, m: int, num_classes: int, n_train: int,
               device: torch.device) -> _State:
    _prepare_backbone(rep.model, cfg)
    h_std, h_interp = init_heads(rep.dim, m, num_classes, cfg.seed)
    h_std, h_interp = h_std.to(device), h_interp.to(device)
    opt, sched = make_optimizer(rep.model, (h_std, h_interp), cfg, n_train)
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(device, cfg) == torch.float16)
    return _State(rep=rep, h_std=h_std, h_interp=h_interp, opt=opt, sched=sched, scaler=scaler)


def save_backbone(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the backbone's weights (timm names, no head) as safetensors, loadable with
    ``BackboneSpec(weights=path)``."""
    save_tensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, metadata)


def finetune(
    spec: BackboneSpec,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FinetuneConfig,
    checkpoint_dir: str | Path,
    sweep_config: SweepConfig,
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
    _check_images(images, num_classes)
    concept_images = _element_images(concept_images)
    m = len(concept_images)
    device = resolve_device(cfg.device)
    rep = _build_backbone(spec, device)
    run_id = run_hash(spec, rep.weights_fingerprint, images, concept_images, cfg, device, sweep_config, num_classes)
    ckpt_dir = Path(checkpoint_dir)
    state = _new_state(rep, cfg, m, num_classes, len(images["train"]), device)
    done, history = _resume(ckpt_dir, run_id, state)
    evaluate = functools.partial(
        _evaluate_epoch, state, images, concept_images, cfg, sweep_config, num_classes, device, progress=progress
    )
    if done == 0:
        history = [evaluate(epoch=0, train_loss=None)]
    dataset = _LabelledImages(images["train"], rep.input_size, rep.interpolation)
    k = n_dropped(cfg.sparsity, m)
    for epoch in range(done + 1, cfg.epochs + 1):
        concepts = None
        if cfg.lam > 0:  # re-embedded with the current backbone; λ = 0 never touches the concepts
            concepts = concept_vectors(rep, concept_images, cfg.num_workers).to(device)
        loss = _train_epoch(state, dataset, concepts, k, cfg, device, epoch, progress)
        history.append(evaluate(epoch=epoch, train_loss=loss))
        save_checkpoint(ckpt_dir / f"epoch_{epoch:03d}.safetensors", state, epoch, history, run_id, cfg)
    rep.model.eval()
    save_backbone(ckpt_dir / "backbone.safetensors", rep.model, {
        "model": spec.model, "run_hash": run_id, "epochs": str(cfg.epochs),
        "preprocess": json.dumps(rep.preprocess_config()),
    })
    return history


def finetuned_spec(spec: BackboneSpec, checkpoint_dir: str | Path, name: str | None = None) -> BackboneSpec:
    """A spec of the fine-tuned backbone: weights from ``checkpoint_dir/backbone.safetensors`` and
    the preprocessing it was trained with (input size, mean, std stored in the file), which
    matters for ``weights: offline`` (mean = std = 0.5, not timm's defaults)."""
    from safetensors import safe_open

    path = Path(checkpoint_dir) / "backbone.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no fine-tuned backbone at {str(path)!r}; run finetune first")
    with safe_open(str(path), framework="pt") as f:
        pre = json.loads((f.metadata() or {}).get("preprocess", "{}"))
    return dataclasses.replace(
        spec,
        name=name or f"{spec.name}_ft",
        weights=str(path),
        input_size=pre.get("input_size", spec.input_size),
        mean=tuple(pre["mean"]) if "mean" in pre else spec.mean,
        std=tuple(pre["std"]) if "std" in pre else spec.std,
    )


__all__ = [
    "EpochRecord",
    "FinetuneConfig",
    "InterpretationHead",
    "concept_vectors",
    "prototype_images",
    "epoch_batches",
    "evaluate_representation",
    "finetune",
    "finetune_loss",
    "finetuned_spec",
    "init_heads",
    "lr_factor",
    "make_optimizer",
    "save_backbone",
    "score_features",
]

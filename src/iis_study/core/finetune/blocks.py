"""Settings, per-epoch records and input checks of a fine-tuning run (:mod:`iis_study.core.finetune`).

:class:`FineTuningParams` is the ``fine_tuning`` parameter block, :class:`FineTuningTrainParams` its ``train``
block (one run), validated field by field with
errors that name ``fine_tuning.<field>``; :class:`EpochRecord` is one row of a run's history; the
input checks and :func:`resolve_device` run before anything is built or trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ..concepts.elements import Elements
from ..data import ImageSet
from ..params import moved_to_catalog
from ..heads.datatypes import sweep_config
from ..heads import SweepParams
from ..params import Params, block, check_int

BN_MODES = ("train", "eval", "frozen")
DEVICES = ("auto", "cpu", "cuda")
SPLIT_NAMES = ("train", "val", "test")


# --------------------------------------------------------------------------- config and records


@block
class FineTuningTrainParams(Params):
    """Settings of one fine-tuning run: the ``fine_tuning.train`` parameter block, whose ``lam`` and
    ``seed`` each run takes from ``fine_tuning.lams`` x ``fine_tuning.seeds`` (checked when built)."""

    WHERE = "fine_tuning"

    lam: float = 1.0
    sparsity: float = 0.1
    epochs: int = 2
    batch_size: int = 64
    accumulation_steps: int = 1
    lr_backbone: float = 1e-4
    lr_heads: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 0.0
    bn_mode: str = "eval"  # train | eval | frozen (eval: BN statistics kept; better with small batches)
    amp: bool = True
    channels_last: bool = True
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    eval_epochs: tuple[int, ...] | None = None

    def __init__(self, **values: Any) -> None:
        if "m" in values:
            raise ValueError("fine_tuning: m is not a fine-tuning setting: the concepts are the study's M prototypes "
                             "(concepts.m, concepts.seed); remove fine_tuning.train.m")
        if values.get("eval_epochs") is not None:
            values["eval_epochs"] = tuple(int(e) for e in values["eval_epochs"])
        super().__init__(**values)

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


# --------------------------------------------------------------------------- input checks


def element_images(elements: np.ndarray | Elements) -> np.ndarray:
    arr = elements.images if isinstance(elements, Elements) else np.asarray(elements)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(
            f"elements must be an (E, S, S, 3) uint8 array, got shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr


def check_images(images: dict[str, ImageSet], num_classes: int) -> None:
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


# --------------------------------------------------------------------------- devices


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error (:mod:`iis_study.core.device`)."""
    from ..device import resolve_device as resolve

    return torch.device(resolve(device, "fine_tuning.device"))


@block
class FineTuningParams(Params):
    """``fine_tuning``: interpretability maximization and its λ = 0 control (METHOD §6).

    ``train`` is the :class:`~iis_study.core.finetune.FineTuningTrainParams` of every run (its ``lam`` and
    ``seed`` come from ``lams`` x ``seeds``); ``sweep`` the scoring sweep along training. Checkpoints: the
    ``fine_tuning_checkpoints`` catalog entry (:class:`~iis_study.core.finetune.CheckpointStore`).
    """

    WHERE = "fine_tuning"
    backbones: tuple[str, ...] = ()
    lams: tuple[float, ...] = (0.0, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    train: FineTuningTrainParams = FineTuningTrainParams()  # lam and seed: set per run from lams x seeds
    sweep: SweepParams = SweepParams()

    def __init__(self, **values: Any) -> None:
        moved_to_catalog(values, "fine_tuning.checkpoint_dir", "fine_tuning_checkpoints")
        super().__init__(**values)

    def validate(self) -> None:
        bad = [v for v in self.lams if not isinstance(v, int | float) or isinstance(v, bool) or v < 0]
        if bad:
            raise ValueError(f"fine_tuning.lams must be >= 0 (λ weighs the interpretation loss), got {bad}")
        if not self.seeds:
            raise ValueError("fine_tuning.seeds must list at least one seed")
        for s in self.seeds:
            check_int(s, "fine_tuning.seeds")

    def arms(self) -> list[tuple[float, int]]:
        """The (λ, seed) runs: every λ of ``lams`` with the λ = 0 control always included."""
        lams = [float(v) for v in self.lams]
        if 0.0 not in lams:
            import logging

            logging.getLogger(__name__).warning("fine_tuning.lams has no λ = 0 control; adding it (the control always runs)")
            lams = [0.0, *lams]
        return [(lam, int(seed)) for lam in sorted(set(lams)) for seed in self.seeds]

    def run_config(self, lam: float, seed: int) -> FineTuningTrainParams:
        """The :class:`~iis_study.core.finetune.FineTuningTrainParams` of one (λ, seed) run."""
        from dataclasses import replace

        return replace(self.train, lam=lam, seed=seed)

    def scoring_sweep(self) -> SweepParams:
        """The scoring sweep along training, its device resolved."""
        return sweep_config(self.sweep, "fine_tuning.sweep")

"""Configuration and result types of the heads (METHOD §4 defaults).

:class:`SweepParams` (the grid and the optimisation settings) and the :class:`Budget` it
plans for a training set; :class:`Split` (features and labels of one split);
:class:`ConceptSpace` (how concept activations are computed from a representation);
:class:`SweepResult` (what :func:`~iis_study.core.heads.sweep` returns) and
:class:`SingleHeadResult` (what :func:`~iis_study.core.heads.train_single_head` returns).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from ..params import Params, block
from ..solvers.lbfgs import SOLVERS  # the convex estimator's solvers
from ..representations.store import ShardedArray

HeadKind = Literal["probe", "interp"]
ConceptKind = Literal["vectors", "end_to_end", "projection"]
_CONCEPT_KINDS = ("vectors", "end_to_end", "projection")
_NORM_TOL = 1e-3
ESTIMATOR_NAMES = ("convex", "adam")  # sweep.estimator's values; the registry is heads.estimators.ESTIMATORS


@block
class SweepParams(Params):
    """Grid and optimisation settings of one sweep (METHOD §4 defaults): the ``sweep`` parameter block
    (and ``fine_tuning.sweep``), checked when built (:class:`~iis_study.core.params.Params`).

    Two estimators fit the heads (METHOD §4, "The estimator"): ``convex`` (the default) solves every
    head, LayerNorm without affine, as L2-penalised multinomial logistic regression to a certified
    optimum (:mod:`~iis_study.core.heads.convex`); ``adam`` trains the authors' head (learnable
    LayerNorm affine, Adam over the learning-rate grid, epoch selection on val). The convex estimator
    reads ``sparsities``, ``l2_grid``, ``solver``, ``tolerance``, ``max_iter`` and ``device``; the Adam settings
    below (``learning_rates`` to ``gumbel_tau``) are the adam estimator's.

    Attributes:
        sparsities: sparsity ratios ``s`` in ``[0, 1)``, strictly increasing.
        estimator: ``convex`` or ``adam``.
        l2_grid: convex: inverse L2 strengths ``C`` (scikit-learn's convention: ``C · Σ CE + ½‖W‖²``),
            visited from the strongest penalty (smallest C) on, each solution warm-starting the next;
            the strength is selected on val (best val accuracy, ties to the stronger penalty).
        l2_path: convex: a head's path stops at the first strength whose val accuracy is below the
            previous one's (the weaker penalties are not solved; the selection cannot reach them
            unless val accuracy falls and rises again along the path). ``false``: every strength.
        tolerance: convex: a head is solved when the largest entry of the gradient of its per-sample
            objective is at most this (its certificate).
        solver: convex: ``newton`` (truncated Newton, :mod:`~iis_study.core.solvers.newton`: tens of steps;
            a streamed design or one wider than 511 columns falls back to L-BFGS) or ``lbfgs`` (:mod:`~iis_study.core.solvers.lbfgs`).
            Same problem, same certificate.
        max_iter: convex: solver iterations (Newton steps or L-BFGS iterations) per head and L2 strength
            before it is reported uncertified.
        learning_rates: Adam learning rates tried for every head (selection on val).
        seeds: adam: one full set of heads per seed (init, data order, Gumbel noise). The convex
            estimator has one optimum per head and no random choice: it reports one "seed", 0.
        steps: the budget: at least this many Adam steps for every head (METHOD §4 "Budget and
            convergence"); the number of epochs follows from it and the training-set size.
        epochs: at least this many epochs (the authors' 30).
        batch_size: the largest minibatch (the authors' 1024).
        min_batches_per_epoch: the minibatch shrinks to ``ceil(N / min_batches_per_epoch)`` on a
            small training set, so that a small study gets many steps per epoch.
        gamma: the authors' ``ExponentialLR`` factor per epoch over ``epochs`` epochs; when the
            budget needs more epochs, the same total decay (``gamma ** epochs``, 0.74 by default) is
            spread over all of them (:attr:`Budget.gamma` per epoch), so that a long budget does
            not decay the learning rate to nothing.
        probe_centering: the probe reads ``z - mean_train(z)`` (a reparametrisation of its bias,
            ``W z + (b - W·mean)``: the same classifiers, better conditioned for Adam); the state
            stored for the selected probe is converted back to raw features.
        gumbel_tau: the divisor of ``LN(q)`` before the hard Gumbel-softmax (METHOD's ``q / 0.1``;
            ``end_to_end`` only).
        device: torch device for all tensors: ``auto`` (the default; CUDA when present), ``cpu`` or
            ``cuda``, resolved when the sweep runs (:func:`~iis_study.core.device.resolve_device`).
    """

    sparsities: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
    learning_rates: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 4000
    epochs: int = 30
    batch_size: int = 1024
    min_batches_per_epoch: int = 16
    gamma: float = 0.99
    gumbel_tau: float = 0.1
    probe_centering: bool = True
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda: resolved when the sweep runs (core.device)
    estimator: str = "convex"
    l2_grid: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)
    l2_path: bool = False
    solver: str = "newton"
    tolerance: float = 1e-5
    max_iter: int = 6000

    WHERE = "sweep"

    def plan(self, n_train: int) -> "Budget":
        """The minibatch size and number of epochs for ``n_train`` training samples."""
        n = int(n_train)
        if n < 1:
            raise ValueError(f"the training split is empty (n_train = {n_train})")
        batch = max(1, min(int(self.batch_size), -(-n // int(self.min_batches_per_epoch))))
        per_epoch = -(-n // batch)
        epochs = max(int(self.epochs), -(-int(self.steps) // per_epoch))
        # the authors' decay, gamma per epoch over `epochs` epochs, spread over the whole budget
        decay = float(self.gamma) ** (int(self.epochs) / epochs)
        return Budget(batch_size=batch, epochs=epochs, steps_per_epoch=per_epoch, n_train=n, gamma=decay)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending parameter if the config is invalid."""
        sp = [float(s) for s in self.sparsities]
        if len(sp) < 1:
            raise ValueError("sweep.sparsities must contain at least one value")
        if any(not math.isfinite(s) or s < 0.0 or s >= 1.0 for s in sp):
            raise ValueError(f"sweep.sparsities must all lie in [0, 1), got {tuple(sp)}")
        if len(set(sp)) != len(sp):
            raise ValueError(f"sweep.sparsities must not contain duplicates, got {tuple(sp)}")
        if any(b <= a for a, b in itertools.pairwise(sp)):
            raise ValueError(f"sweep.sparsities must be strictly increasing, got {tuple(sp)}")
        lrs = [float(lr) for lr in self.learning_rates]
        if len(lrs) < 1:
            raise ValueError("sweep.learning_rates must contain at least one value")
        if any(not math.isfinite(lr) or lr <= 0.0 for lr in lrs):
            raise ValueError(f"sweep.learning_rates must all be > 0, got {tuple(lrs)}")
        if len(set(lrs)) != len(lrs):
            raise ValueError(f"sweep.learning_rates must not contain duplicates, got {tuple(lrs)}")
        if len(self.seeds) < 1:
            raise ValueError("sweep.seeds must contain at least one seed")
        if len({int(s) for s in self.seeds}) != len(self.seeds):
            raise ValueError(f"sweep.seeds must not contain duplicates, got {tuple(self.seeds)}")
        if int(self.epochs) < 1:
            raise ValueError(f"sweep.epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise ValueError(f"sweep.batch_size must be >= 1, got {self.batch_size}")
        if int(self.steps) < 1:
            raise ValueError(f"sweep.steps must be >= 1, got {self.steps}")
        if int(self.min_batches_per_epoch) < 1:
            raise ValueError(f"sweep.min_batches_per_epoch must be >= 1, got {self.min_batches_per_epoch}")
        if not (0.0 < float(self.gamma) <= 1.0):
            raise ValueError(f"sweep.gamma must lie in (0, 1], got {self.gamma}")
        if not (float(self.gumbel_tau) > 0.0):
            raise ValueError(f"sweep.gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.estimator not in ESTIMATOR_NAMES:
            raise ValueError(f"sweep.estimator must be one of {ESTIMATOR_NAMES}, got {self.estimator!r}")
        grid = [float(c) for c in self.l2_grid]
        if not grid or any(not math.isfinite(c) or c <= 0 for c in grid) or len(set(grid)) != len(grid):
            raise ValueError(f"sweep.l2_grid must hold distinct values > 0, got {tuple(self.l2_grid)}")
        if self.solver not in SOLVERS:
            raise ValueError(f"sweep.solver must be one of {SOLVERS}, got {self.solver!r}")
        if not (math.isfinite(float(self.tolerance)) and float(self.tolerance) > 0):
            raise ValueError(f"sweep.tolerance must be > 0, got {self.tolerance}")
        if int(self.max_iter) < 1:
            raise ValueError(f"sweep.max_iter must be >= 1, got {self.max_iter}")


def sweep_config(params: Mapping[str, Any] | SweepParams | None, where: str = "sweep") -> SweepParams:
    """The :class:`~iis_study.core.heads.SweepParams` of a ``sweep`` block (or ``fine_tuning.sweep``),
    checked, its ``device`` resolved (``auto``: CUDA when present)."""
    from dataclasses import replace

    from ..device import resolve_device

    cfg = SweepParams.from_params(params)
    return replace(cfg, device=resolve_device(cfg.device, f"{where}.device"))


@dataclass(frozen=True)
class Budget:
    """What a :class:`SweepParams` means for one training set (see :meth:`SweepParams.plan`)."""

    batch_size: int
    epochs: int
    steps_per_epoch: int
    n_train: int
    gamma: float

    @property
    def steps(self) -> int:
        """Adam steps every head takes."""
        return self.epochs * self.steps_per_epoch


@dataclass
class Split:
    """Features of one split: ``x`` (N, D) float32 representations, ``y`` (N,) int64 labels.

    ``x`` may be a :class:`~iis_study.core.representations.store.ShardedArray` (features on disk): the sweep
    then streams it shard by shard and never holds more than one shard per seed in memory.
    """

    x: torch.Tensor | ShardedArray
    y: torch.Tensor

    def validate(self, num_classes: int, name: str = "split") -> None:
        """Check shapes, dtypes and label range; raise ``ValueError`` naming ``name``."""
        if self.x.ndim != 2:
            raise ValueError(f"{name}.x must be 2-D (N, D), got shape {tuple(self.x.shape)}")
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"{name}.y must be 1-D with {self.x.shape[0]} labels, got shape {tuple(self.y.shape)}"
            )
        if self.x.shape[0] < 1:
            raise ValueError(f"{name} must contain at least one sample")
        if not isinstance(self.x, ShardedArray) and not torch.is_floating_point(self.x):
            raise ValueError(f"{name}.x must be a floating-point tensor, got {self.x.dtype}")
        if torch.is_floating_point(self.y) or self.y.dtype == torch.bool:
            raise ValueError(f"{name}.y must be an integer tensor, got {self.y.dtype}")
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name}.y labels must lie in [0, {num_classes}), got range [{lo}, {hi}]")
        if isinstance(self.x, ShardedArray):
            for start, rows in self.x.iter_blocks():
                if not bool(torch.isfinite(rows).all()):
                    raise ValueError(f"{name}.x contains non-finite values (shard starting at row {start})")
        elif not bool(torch.isfinite(self.x).all()):
            raise ValueError(f"{name}.x contains non-finite values")


@dataclass
class ConceptSpace:
    """How concept activations are computed from a representation ``z`` (D,).

    * ``"vectors"``: ``C`` (M, D) with L2-normalised rows; ``a = LayerNorm_M(z·Cᵀ)`` with a
      learnable affine per head (prototype and cluster concepts, METHOD §5.1-2).
    * ``"end_to_end"``: element embeddings (E, D) and a per-head learnable ``q`` (E, M),
      ``q ~ N(0, 1)`` at init; assignment = hard Gumbel-softmax of ``LayerNorm_M(q)`` at
      temperature ``tau`` along M (straight-through; ``LayerNorm`` without affine);
      ``C = L2-normalise(assignmentᵀ · elements)`` (M, D), then as ``"vectors"``
      (METHOD §5.3). At evaluation the assignment is the noise-free argmax.
    * ``"projection"``: textual concepts (METHOD §5.4): ``W`` (D, M),
      ``a = (z·W - mean) / std`` with the given ``mean``/``std`` (M,), no LayerNorm.
    """

    kind: ConceptKind
    vectors: torch.Tensor | None = None
    elements: torch.Tensor | None = None
    n_concepts: int | None = None
    projection: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def m(self) -> int:
        """Number of concepts M."""
        if self.kind == "vectors":
            if self.vectors is None:
                raise ValueError("concepts.vectors is required for kind='vectors'")
            return int(self.vectors.shape[0])
        if self.kind == "end_to_end":
            if self.n_concepts is None:
                raise ValueError("concepts.n_concepts is required for kind='end_to_end'")
            return int(self.n_concepts)
        if self.kind == "projection":
            if self.projection is None:
                raise ValueError("concepts.projection is required for kind='projection'")
            return int(self.projection.shape[1])
        raise ValueError(f"concepts.kind must be one of {_CONCEPT_KINDS}, got {self.kind!r}")

    @property
    def has_affine(self) -> bool:
        """Whether the activations go through a LayerNorm with learnable affine."""
        return self.kind in ("vectors", "end_to_end")

    def validate(self, dim: int) -> None:
        """Check the concept space against the feature dimension ``dim``."""
        if self.kind not in _CONCEPT_KINDS:
            raise ValueError(f"concepts.kind must be one of {_CONCEPT_KINDS}, got {self.kind!r}")
        if self.kind == "vectors":
            self._validate_vectors(dim)
        elif self.kind == "end_to_end":
            self._validate_end_to_end(dim)
        else:
            self._validate_projection(dim)

    def _validate_vectors(self, dim: int) -> None:
        c = self.vectors
        if c is None:
            raise ValueError("concepts.vectors is required for kind='vectors'")
        if c.ndim != 2:
            raise ValueError(f"concepts.vectors must be 2-D (M, D), got shape {tuple(c.shape)}")
        if c.shape[0] < 1:
            raise ValueError("concepts.vectors must contain at least one concept (M >= 1)")
        if c.shape[1] != dim:
            raise ValueError(
                f"feature dimension {dim} does not match concept vectors of dimension {c.shape[1]}"
            )
        if not bool(torch.isfinite(c).all()):
            raise ValueError("concepts.vectors contains non-finite values")
        norms = c.double().norm(dim=1)
        if bool(((norms - 1.0).abs() > _NORM_TOL).any()):
            raise ValueError(
                "concepts.vectors rows must be L2-normalised, got norms in "
                f"[{float(norms.min()):.4g}, {float(norms.max()):.4g}]"
            )

    def _validate_end_to_end(self, dim: int) -> None:
        e = self.elements
        if e is None:
            raise ValueError("concepts.elements is required for kind='end_to_end'")
        if e.ndim != 2 or e.shape[0] < 1:
            raise ValueError(f"concepts.elements must be 2-D (E, D) with E >= 1, got shape {tuple(e.shape)}")
        if e.shape[1] != dim:
            raise ValueError(
                f"feature dimension {dim} does not match concept elements of dimension {e.shape[1]}"
            )
        if self.n_concepts is None or int(self.n_concepts) < 1:
            raise ValueError(f"concepts.n_concepts must be >= 1, got {self.n_concepts}")
        if not bool(torch.isfinite(e).all()):
            raise ValueError("concepts.elements contains non-finite values")

    def _validate_projection(self, dim: int) -> None:
        w = self.projection
        if w is None:
            raise ValueError("concepts.projection is required for kind='projection'")
        if w.ndim != 2 or w.shape[1] < 1:
            raise ValueError(
                f"concepts.projection must be 2-D (D, M) with M >= 1, got shape {tuple(w.shape)}"
            )
        if w.shape[0] != dim:
            raise ValueError(
                f"feature dimension {dim} does not match concept projection of dimension {w.shape[0]}"
            )
        m = w.shape[1]
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t is None or tuple(t.shape) != (m,):
                shape = None if t is None else tuple(t.shape)
                raise ValueError(f"concepts.{name} must have shape ({m},), got {shape}")
        assert self.std is not None
        if bool((self.std <= 0).any()):
            raise ValueError("concepts.std must be > 0 everywhere")


@dataclass
class SweepResult:
    """Outcome of :func:`sweep`.

    Attributes:
        config: the sweep configuration.
        num_classes: K.
        m: number of concepts M.
        table: one row per trained head: ``head`` ("probe" | "interp"), ``seed``,
            ``sparsity`` (NaN for the probe), ``lr``, ``best_epoch`` (1-based: number of
            epochs trained when val accuracy peaked, earliest on ties), ``val_acc``,
            ``test_acc`` (both at ``best_epoch``).
        selected: one row per (seed, head, sparsity): the lr with the best val accuracy
            (ties -> smaller lr) and its ``val_acc``, ``test_acc``, ``best_epoch``.
        test_correct: bool (n_seeds, 1 + n_sparsities, N_test): per-sample correctness of
            the selected heads at their best epoch; index 0 is the probe.
        state: best-epoch parameters of the selected heads: ``probe.weight`` (S, K, D),
            ``probe.bias`` (S, K), ``interp.weight`` (S, P, K, M), ``interp.bias`` (S, P, K),
            and, where applicable, ``interp.ln_weight`` / ``interp.ln_bias`` (S, P, M) and
            ``interp.q`` (S, P, E, M).
        history: per-epoch val accuracy of every head (long format).
        budget: the minibatch size, epochs and Adam steps the heads were trained with.
    """

    config: SweepParams
    num_classes: int
    m: int
    table: pd.DataFrame
    selected: pd.DataFrame
    test_correct: np.ndarray
    state: dict[str, torch.Tensor]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    budget: Budget | None = None
    certificate: Any = None  # the convex estimator's record (heads.convex.Certificate); None for adam
    half_budget_correct: np.ndarray | None = None  # adam: test_correct of the heads selected at half the budget

    @property
    def seeds(self) -> tuple[int, ...]:
        """The seeds of the selected heads, in order (the convex estimator: one, 0)."""
        return (0,) if self.certificate is not None else tuple(int(s) for s in self.config.seeds)

    @property
    def estimator(self) -> str:
        """``convex`` (a certificate) or ``adam``."""
        return "convex" if self.certificate is not None else "adam"


@dataclass
class SingleHeadResult:
    """Outcome of :func:`train_single_head` (per-epoch curves and the best epoch by val)."""

    val_curve: np.ndarray
    test_curve: np.ndarray
    best_epoch: int
    val_acc: float
    test_acc: float
    test_correct: np.ndarray

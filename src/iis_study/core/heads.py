"""Linear probe and interpretation heads, trained as one batched model (METHOD §2, §3, §4, §5.3).

Every head of a sweep -- the linear probe (``W z + b``, METHOD §2) for every learning
rate and seed, and the interpretation head (concept activations -> per-image sparse
mask -> linear ``M -> K`` head, METHOD §3) for every sparsity ratio, learning rate and
seed -- is trained *together*: parameters are stacked tensors with leading head
dimensions, and one forward/backward pass per minibatch trains all of them.

Layout of the stacked parameters (``S`` seeds, ``L`` learning rates, ``P`` sparsities):

* probe heads: ``(S, L, ...)``, e.g. ``probe.weight`` is ``(S, L, K, D)``;
* interpretation heads: ``(P, S, L, ...)``, e.g. ``interp.weight`` is ``(P, S, L, K, M)``.

Each seed has its own data order (a ``torch.Generator`` permutation per epoch), so a
minibatch is gathered per seed as ``(S, B, D)``. Adam is implemented over the stacked
tensors with one learning rate per head, reproducing ``torch.optim.Adam`` (default
betas/eps, no weight decay) and ``ExponentialLR`` stepped once per epoch.

:func:`train_single_head` is the plain per-head reference (``nn.Module``,
``torch.optim.Adam``, ``ExponentialLR``) with the same initialisation and data order;
the batched sweep reproduces it up to floating-point rounding.

Sparsification follows METHOD §3 as *intended*: keep exactly ``M - floor(s*M)``
entries of largest ``|a|``. The authors' published code keeps the entries strictly
greater than the k-th smallest ``|a|`` (dropping one entry too many, even at s = 0);
we do not reproduce that.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .store import ShardedArray

logger = logging.getLogger(__name__)

HeadKind = Literal["probe", "interp"]
ConceptKind = Literal["vectors", "end_to_end", "projection"]
_CONCEPT_KINDS = ("vectors", "end_to_end", "projection")
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8
_NORM_TOL = 1e-3
_EVAL_CHUNK = 1024
Q_INIT_STD = 0.02  # end-to-end assignment logits q: truncated normal, std 0.02 (authors' code)


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SweepConfig:
    """Grid and optimisation settings of one sweep (METHOD §4 defaults).

    Attributes:
        sparsities: sparsity ratios ``s`` in ``[0, 1)``, strictly increasing.
        learning_rates: Adam learning rates tried for every head (selection on val).
        seeds: one full set of heads per seed (init, data order, Gumbel noise).
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
        device: torch device for all tensors.
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
    device: str = "cpu"

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


@dataclass(frozen=True)
class Budget:
    """What a :class:`SweepConfig` means for one training set (see :meth:`SweepConfig.plan`)."""

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

    ``x`` may be a :class:`~iis_study.core.store.ShardedArray` (features on disk): the sweep
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

    config: SweepConfig
    num_classes: int
    m: int
    table: pd.DataFrame
    selected: pd.DataFrame
    test_correct: np.ndarray
    state: dict[str, torch.Tensor]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    budget: Budget | None = None


@dataclass
class SingleHeadResult:
    """Outcome of :func:`train_single_head` (per-epoch curves and the best epoch by val)."""

    val_curve: np.ndarray
    test_curve: np.ndarray
    best_epoch: int
    val_acc: float
    test_acc: float
    test_correct: np.ndarray


# --------------------------------------------------------------------------- helpers


def n_dropped(sparsity: float, m: int) -> int:
    """``k = floor(s * M)`` computed exactly on the decimal value of ``s``.

    ``floor(0.7 * 90)`` is 63 here, whereas the float product ``0.7 * 90`` is
    62.99999999999999 (on the default grid, 34 values of M up to 2,000 round the wrong way
    in float). The shortest decimal representation of the float is used
    (``Fraction(repr(float(s)))``), so grid values written in decimal are exact.
    """
    s = float(sparsity)
    if not math.isfinite(s) or s < 0.0 or s > 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    if int(m) < 1:
        raise ValueError(f"m (number of concepts) must be >= 1, got {m}")
    return math.floor(Fraction(repr(s)) * int(m))


def derive_seed(*parts: object) -> int:
    """A 63-bit seed derived deterministically from ``parts`` (e.g. seed and head identity)."""
    text = "|".join(_canonical(p) for p in parts)
    digest = hashlib.sha256(f"iis_study|{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _canonical(part: object) -> str:
    if isinstance(part, (float, np.floating)):
        return repr(float(part))
    if isinstance(part, (int, np.integer)):
        return str(int(part))
    return str(part)


def _head_init_seed(seed: int, head: HeadKind, sparsity: float | None, lr: float) -> int:
    return derive_seed("init", int(seed), head, float("nan") if sparsity is None else sparsity, lr)


def _gumbel_seed(seed: int, sparsity: float, lr: float) -> int:
    return derive_seed("gumbel", int(seed), float(sparsity), float(lr))


def _data_seed(seed: int) -> int:
    return derive_seed("data", int(seed))


def _generator(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def flush_denormals(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` with subnormal entries set to zero (a tensor hook for logits).

    Once a head is confident, the cross-entropy gradient ``softmax - onehot`` holds
    probabilities below the smallest normal float. Matrix products over subnormals run
    tens of times slower on x86 CPUs (measured: 48 ms instead of 1 ms for the probe's
    weight gradient), and ``torch.set_flush_denormal`` reaches only the calling thread,
    not the BLAS/OpenMP workers. Zeroing them changes each gradient by < 1.2e-38.
    """
    if not grad.is_floating_point():
        return grad
    tiny = torch.finfo(grad.dtype).tiny
    return grad.masked_fill(grad.abs() < tiny, 0.0)


def _check_k(k: int, m: int) -> None:
    if k < 0 or k > m:
        raise ValueError(f"k (entries to drop) must lie in [0, {m}], got {k}")


def _threshold_np(v: np.ndarray, k: int) -> tuple[np.ndarray, bool]:
    """Per-row smallest kept value of ``v`` (>= 0) when dropping ``k`` (0 < k < M), and
    whether ties straddle it (a dropped entry equal to the threshold)."""
    part = np.partition(v, k, axis=-1)
    thr = part[..., k : k + 1]
    ties = bool((part[..., :k].max(-1, keepdims=True) == thr).any())
    return np.ascontiguousarray(thr), ties


def _tie_break(v: torch.Tensor, thr: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask when ties straddle the threshold: lowest-indexed ties are kept first."""
    m = v.shape[-1]
    above = v > thr
    need = (m - k) - above.sum(-1, keepdim=True)
    tie = v == thr
    return above | (tie & (tie.cumsum(-1) <= need))


def _keep_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``M - k`` entries of largest ``|a|`` per row (last axis).

    Exactly ``M - k`` entries per row are kept; ties are broken by index (among equal
    ``|a|`` the lower index is kept first). On CPU the threshold comes from
    ``numpy.partition`` (introselect, several times faster than ``torch.kthvalue``);
    elsewhere from ``torch.kthvalue``.
    """
    m = a.shape[-1]
    _check_k(k, m)
    if k == 0 or k == m:
        return torch.full(a.shape, k == 0, dtype=torch.bool, device=a.device)
    a = a.detach()
    if a.device.type == "cpu":
        v = np.abs(a.numpy())
        thr, ties = _threshold_np(v, k)
        if not ties:
            return torch.from_numpy(v >= thr)
        return _tie_break(torch.from_numpy(v), torch.from_numpy(thr), k)
    v_t = a.abs()
    thr_t = torch.kthvalue(v_t, k + 1, dim=-1, keepdim=True).values
    keep = v_t >= thr_t
    if bool((keep.sum(-1) == m - k).all()):
        return keep
    return _tie_break(v_t, thr_t, k)


def _grouped_keep(a: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Keep-mask as 0/1 floats (dtype of ``a``) for ``a`` (G, ..., M), one ``k`` per slice ``a[g]``.

    A float mask is returned because multiplying by it is several times faster on CPU
    than ``masked_fill`` or multiplying by a bool mask; on CPU it is filled with numpy.
    """
    if len(ks) != a.shape[0]:
        raise ValueError(f"need one k per leading slice: {a.shape[0]} slices, got {len(ks)} values of k")
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if a.device.type != "cpu" or not a.is_contiguous():
        for g, kg in enumerate(ks):
            out[g].copy_(_keep_mask(a[g], int(kg)))
        return out
    a_np, out_np = a.detach().numpy(), out.numpy()
    m = a.shape[-1]
    for kg in ks:
        _check_k(int(kg), m)

    def fill(g: int) -> None:
        kg = int(ks[g])
        if kg == 0 or kg == m:
            out_np[g] = float(kg == 0)
            return
        v = np.abs(a_np[g])
        thr, ties = _threshold_np(v, kg)
        keep = _tie_break(torch.from_numpy(v), torch.from_numpy(thr), kg).numpy() if ties else v >= thr
        np.copyto(out_np[g], keep)

    workers = min(torch.get_num_threads(), len(ks))
    if workers <= 1:
        for g in range(len(ks)):
            fill(g)
    else:  # numpy releases the GIL in partition and ufuncs: groups run in parallel
        list(_thread_pool(workers).map(fill, range(len(ks))))
    return out


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A per-process thread pool with ``workers`` threads (created once per process, so
    a forked worker never reuses its parent's dead threads)."""
    key = (os.getpid(), workers)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="iis-mask")
    return _POOLS[key]


def sparsify(a: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """METHOD §3 step 2: per row keep the ``M - k`` entries of largest ``|a|``, zero the rest.

    Exactly ``M - k`` entries are kept per row (ties broken by index, lower first). The
    mask is computed on detached values; gradients flow only through the kept entries
    (unchanged there). ``k`` is an int, or an integer tensor whose shape is a *prefix*
    of ``a.shape[:-1]`` (left-aligned), e.g. one ``k`` per head for ``a`` of shape
    ``(H, B, M)``. Use :func:`n_dropped` for ``k = floor(s * M)``.
    """
    if a.ndim < 1:
        raise ValueError("a must have at least one dimension (the concept axis)")
    if isinstance(k, torch.Tensor) and k.ndim > 0:
        if k.ndim >= a.ndim or tuple(k.shape) != tuple(a.shape[: k.ndim]):
            raise ValueError(
                f"k must have a shape that prefixes a.shape[:-1]={tuple(a.shape[:-1])}, got {tuple(k.shape)}"
            )
        flat = a.reshape((k.numel(),) + tuple(a.shape[k.ndim :]))
        keep = _grouped_keep(flat.detach().contiguous(), [int(x) for x in k.reshape(-1).tolist()])
        return a * keep.reshape(a.shape)
    return a * _keep_mask(a, int(k)).to(a.dtype)


class _InterpHeads(torch.autograd.Function):
    """All interpretation heads in one op: ``[affine] -> sparsify -> linear`` (METHOD §3).

    Inputs broadcast to the activation shape (G, ..., B, M): ``base`` (normalised concept
    scores), ``ln_weight``/``ln_bias`` (per-head LayerNorm affine, or ``None`` for
    activations used as they are) and the linear head ``weight`` (G, ..., K, M) /
    ``bias`` (G, ..., K); ``ks`` holds one ``k`` per leading group. Fusing the steps
    lets the backward pass reuse its buffers in place and skip the gradient into the
    activations when nothing upstream needs it. The mask is constant (computed on
    detached values), so gradients flow through kept entries only.

    On CPU float32 tensors, when numba imports, forward and backward run the fused kernel
    of :mod:`.fused_heads` (one pass per head and row, parallel over heads with torch's
    thread count); ``IIS_FUSED=0`` in the environment, CUDA tensors or other dtypes use the
    torch code below.
    """

    @staticmethod
    def forward(ctx, base, ln_weight, ln_bias, weight, bias, ks, track=True):  # type: ignore[override]
        plan = _InterpHeads._fused_plan(base, ln_weight, ln_bias, weight, bias, ks)
        ctx.fused = plan is not None
        if plan is not None:
            from . import fused_heads

            # ``track``: whether grad mode was on at the call (inside forward it is always off)
            logits, saved = fused_heads.forward(plan, save_state=track and any(ctx.needs_input_grad[:5]))
            ctx.save_for_backward(base, ln_weight, ln_bias, weight, bias, *(saved or (None, None)))
            ctx.plan = plan if track else None  # flattened views of the saved inputs, reused by backward
            return logits
        if ln_weight is not None:
            sparse = torch.addcmul(ln_bias, base, ln_weight)
        else:
            shape = tuple(weight.shape[:-2]) + tuple(base.shape[-2:])
            # always a fresh copy: mul_ below must not touch the input
            sparse = base.expand(shape).clone(memory_format=torch.contiguous_format)
        keep = _grouped_keep(sparse, ks)
        sparse.mul_(keep)
        logits = torch.matmul(sparse, weight.transpose(-1, -2)).add_(bias.unsqueeze(-2))
        ctx.save_for_backward(base, ln_weight, sparse, keep, weight)
        ctx.ln_bias_shape = None if ln_bias is None else ln_bias.shape
        return logits

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.fused:
            return _InterpHeads._fused_backward(ctx, grad)
        base, ln_weight, sparse, keep, weight = ctx.saved_tensors
        need_base, need_lnw, need_lnb, need_w, need_b = ctx.needs_input_grad[:5]
        g_base = g_lnw = g_lnb = g_w = g_b = None
        if need_b:
            g_b = grad.sum(-2)
        if need_w:
            g_w = torch.matmul(grad.transpose(-1, -2), sparse)
        if need_base or need_lnw or need_lnb:
            gs = torch.matmul(grad, weight).mul_(keep)  # d loss / d activations
            if need_lnb:
                g_lnb = gs.sum_to_size(ctx.ln_bias_shape)
            if need_base:
                g_base = (gs if ln_weight is None else gs * ln_weight).sum_to_size(base.shape)
            if need_lnw:
                # in place unless an earlier gradient is a view of gs (sum_to_size returns
                # its input unchanged when nothing is reduced, e.g. a minibatch of one)
                aliased = any(t is not None and t.data_ptr() == gs.data_ptr() for t in (g_lnb, g_base))
                g_lnw = (gs * base if aliased else gs.mul_(base)).sum_to_size(ln_weight.shape)
        return g_base, g_lnw, g_lnb, g_w, g_b, None, None

    @staticmethod
    def _fused_plan(base, ln_weight, ln_bias, weight, bias, ks):
        """Flattened inputs for the fused numba kernel (:mod:`.fused_heads`), or ``None`` to
        use the torch code above: on CUDA, for non-float32 tensors, without numba, or
        with ``IIS_FUSED=0`` (:func:`.fused_heads.plan` decides)."""
        from . import fused_heads

        return fused_heads.plan(base, ln_weight, ln_bias, weight, bias, ks)

    @staticmethod
    def _fused_backward(ctx, grad):
        from . import fused_heads

        # reading saved_tensors also checks that no input was modified in place since forward
        base, ln_weight, ln_bias, weight, bias, state, idx = ctx.saved_tensors
        plan = ctx.plan
        shapes = (
            base.shape,
            None if ln_weight is None else ln_weight.shape,
            None if ln_bias is None else ln_bias.shape,
            weight.shape,
            bias.shape,
        )
        grads = fused_heads.backward(plan, state, idx, grad, tuple(ctx.needs_input_grad[:5]), shapes)
        return (*grads, None, None)


def _apply_heads(
    base: torch.Tensor, params: dict[str, torch.Tensor], prefix: str, affine: bool, ks: Sequence[int]
) -> torch.Tensor:
    """:class:`_InterpHeads` on ``base`` with the parameters ``<prefix>weight``, ``<prefix>bias`` and,
    with an affine, ``<prefix>ln_weight`` / ``<prefix>ln_bias``."""
    return _InterpHeads.apply(
        base,
        params[prefix + "ln_weight"].unsqueeze(-2) if affine else None,
        params[prefix + "ln_bias"].unsqueeze(-2) if affine else None,
        params[prefix + "weight"],
        params[prefix + "bias"],
        tuple(ks),
        torch.is_grad_enabled(),
    )


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine (eps as ``nn.LayerNorm``)."""
    return F.layer_norm(x, (x.shape[-1],))


def _gumbel_noise(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, ``U`` uniform from a seeded generator.

    The same distribution as ``F.gumbel_softmax``'s ``-log(Exp(1))`` (``-log U`` is Exp(1)), but
    drawing uniforms is ~7x faster than ``exponential_`` on CPU (0.14 against 0.92 ms for
    300 x 200 numbers): the noise of the end-to-end heads had been 18 % of their sweep.
    """
    return _uniform_to_gumbel_(torch.empty(shape, device=device).uniform_(generator=gen))


def _uniform_to_gumbel_(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)`` in place; ``u = 0`` (probability 2^-24 per draw) is moved up to the
    smallest normal float first, so the noise stays finite."""
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


def _hard_assignment(
    q: torch.Tensor,
    tau: float,
    noise: torch.Tensor | None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard (straight-through) Gumbel-softmax of ``LayerNorm_M(q) / tau`` along M (METHOD §5.3).

    METHOD applies the Gumbel-softmax to ``q / 0.1``: the logits are divided by ``tau`` and
    the standard (temperature 1) Gumbel noise is added to them, ``softmax(LN(q)/tau + g)``.
    Dividing the noise as well, ``softmax((LN(q) + g)/tau)``, would make the noise (std 1.28)
    larger than the unit-variance ``LN(q)`` it perturbs: every step would re-draw the
    assignment almost at random, and on digits the end-to-end heads stayed near chance (test
    accuracy 0.20 at s = 0 against 0.60 with the logits divided; 60 Adam steps, Lite0).

    The LayerNorm on ``q`` has a learnable affine (``ln_weight``, ``ln_bias``, shape (..., M),
    one per head), as in the authors' code. With ``noise=None`` (evaluation) the noise-free
    one-hot argmax is returned.
    """
    return _hard_assignment_indexed(q, tau, noise, ln_weight, ln_bias)[0]


def _hard_assignment_indexed(
    q: torch.Tensor,
    tau: float,
    noise: torch.Tensor | None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_hard_assignment` and the index of each element's concept (``argmax`` over M)."""
    logits = _layer_norm(q)
    if ln_weight is not None:
        logits = logits * ln_weight.unsqueeze(-2)
    if ln_bias is not None:
        logits = logits + ln_bias.unsqueeze(-2)
    logits = logits / tau
    if noise is None:
        idx = logits.argmax(-1)
        return _one_hot(idx, q), idx
    soft = torch.softmax(logits + noise, dim=-1)
    idx = soft.argmax(-1)
    return _one_hot(idx, q) - soft.detach() + soft, idx


def _one_hot(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float one-hot of ``idx`` over the last axis of ``like`` (no int64 intermediate)."""
    return torch.zeros_like(like).scatter_(-1, idx.unsqueeze(-1), 1.0)


def _concepts_from_assignment(assignment: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """``C = L2-normalise(assignmentᵀ · elements)``: (..., E, M) x (E, D) -> (..., M, D)."""
    return F.normalize(assignment.transpose(-1, -2) @ elements, dim=-1)


def _init_head(
    head: HeadKind,
    seed: int,
    sparsity: float | None,
    lr: float,
    d_in: int,
    num_classes: int,
    n_elements: int | None,
    device: str,
) -> dict[str, torch.Tensor]:
    """Initial parameters of one head (``nn.Linear`` default distribution).

    End-to-end heads: ``q`` from a truncated normal with std 0.02 (``nn.init.trunc_normal_``, as
    the authors' code), and the affine of the LayerNorm on ``q`` (ones, zeros).
    """
    gen = _generator(_head_init_seed(seed, head, sparsity, lr), "cpu")
    bound = 1.0 / math.sqrt(d_in)
    out = {
        "weight": torch.empty(num_classes, d_in).uniform_(-bound, bound, generator=gen),
        "bias": torch.empty(num_classes).uniform_(-bound, bound, generator=gen),
    }
    if head == "interp":
        out["ln_weight"] = torch.ones(d_in)
        out["ln_bias"] = torch.zeros(d_in)
        if n_elements is not None:
            out["q"] = nn.init.trunc_normal_(torch.empty(n_elements, d_in), std=Q_INIT_STD, generator=gen)
            out["q_ln_weight"] = torch.ones(d_in)
            out["q_ln_bias"] = torch.zeros(d_in)
    return {k: v.to(device) for k, v in out.items()}


def _precompute_base(x: torch.Tensor, concepts: ConceptSpace) -> torch.Tensor | None:
    """Per-sample activations shared by all heads: LN(z·Cᵀ) or standardised projection."""
    if concepts.kind == "end_to_end":
        return None
    parts = []
    for chunk in torch.split(x, 4096):
        if concepts.kind == "vectors":
            assert concepts.vectors is not None
            parts.append(_layer_norm(chunk @ concepts.vectors.T))
        else:
            assert concepts.projection is not None and concepts.mean is not None
            assert concepts.std is not None
            parts.append((chunk @ concepts.projection - concepts.mean) / concepts.std)
    return torch.cat(parts)


def _concepts_to(concepts: ConceptSpace, device: str) -> ConceptSpace:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.float32)

    return ConceptSpace(
        kind=concepts.kind,
        vectors=mv(concepts.vectors),
        elements=mv(concepts.elements),
        n_concepts=concepts.n_concepts,
        projection=mv(concepts.projection),
        mean=mv(concepts.mean),
        std=mv(concepts.std),
    )


class _AssignedScores(torch.autograd.Function):
    """End-to-end concept scores through the elements, ``(z·Eᵀ)·A / ‖AᵀE‖`` per head, for a hard
    assignment ``A`` (P, S, L, E, M) that is one-hot in value (straight-through in gradient).

    Forward: ``A`` is one-hot, so ``(z·Eᵀ)·A`` is a sum of each concept's element columns and
    ``‖AᵀE‖² = Σ_{e,e' in m} Gram[e, e']`` a sum of Gram entries (B·E and E² additions per
    head instead of B·E·M and E²·M multiply-adds). Backward: the straight-through gradient of
    ``A`` is dense and needs the full products, ``dA = (z·Eᵀ)ᵀ·(dS / ‖·‖) + 2·(Gram·A)·d‖·‖²``,
    as autograd would compute them; ``Gram·A`` is again a sum over each concept's columns.
    Zero norms are clamped as in ``F.normalize`` (eps 1e-12), with no gradient through the clamp.

    Inputs: ``zp = z·Eᵀ`` (S, B, E) (no gradient), ``gram`` (E, E) symmetric, ``assign``,
    ``idx`` (P, S, L, E) the concept of each element. Returns (P, S, L, B, M).
    """

    @staticmethod
    def forward(ctx, zp, gram, assign, idx):  # type: ignore[override]
        p_, s_, l_, n_el, m = assign.shape
        n_heads, b = p_ * s_ * l_, zp.shape[1]
        idx_h = idx.reshape(n_heads, n_el)
        zp_t = zp.transpose(1, 2).contiguous()  # (S, E, B): rows of one element
        raw_t = zp.new_zeros((n_heads, m, b))  # (H, M, B)
        ga_t = zp.new_zeros((n_heads, m, n_el))  # (Gram·A)ᵀ per head
        for h in range(n_heads):
            seed = (h // l_) % s_
            raw_t[h].index_add_(0, idx_h[h], zp_t[seed])
            ga_t[h].index_add_(0, idx_h[h], gram)  # gram is symmetric: its rows are its columns
        own = ga_t.gather(1, idx_h.unsqueeze(1)).squeeze(1)  # (Gram·A)[e, idx[e]], (H, E)
        norm2 = zp.new_zeros((n_heads, m)).scatter_add_(1, idx_h, own)  # ‖AᵀE‖², (H, M)
        norm = norm2.clamp_min(1e-24).sqrt().clamp_min(1e-12)
        scores = raw_t.div_(norm.unsqueeze(-1)).transpose(1, 2).contiguous()  # (H, B, M)
        ctx.save_for_backward(zp, scores, norm2, norm, ga_t)
        ctx.shape = (p_, s_, l_, n_el, m)
        return scores.view(p_, s_, l_, b, m)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        zp, scores, norm2, norm, ga_t = ctx.saved_tensors
        p_, s_, l_, n_el, m = ctx.shape
        n_heads, b = p_ * s_ * l_, zp.shape[1]
        g = grad.reshape(n_heads, b, m)
        g_raw = g / norm.unsqueeze(1)  # scores = raw / norm
        # d/dnorm of raw/norm is -scores/norm; through the clamps only where norm2 > 1e-24
        g_norm = -(g * scores).sum(1) / norm
        g_norm2 = torch.where(norm2 > 1e-24, g_norm / (2 * norm), torch.zeros_like(norm))
        g_assign = torch.einsum("sbe,pslbm->pslem", zp, g_raw.view(p_, s_, l_, b, m))
        g_assign += (2 * g_norm2).view(p_, s_, l_, 1, m) * ga_t.transpose(1, 2).reshape(p_, s_, l_, n_el, m)
        return None, None, g_assign, None


# --------------------------------------------------------------------------- stacked Adam


class _StackedAdam:
    """Adam over stacked head parameters with one learning rate per head.

    Reproduces ``torch.optim.Adam`` (single-tensor path, default betas/eps, no weight
    decay) operation by operation; the learning rates decay by ``gamma`` per
    :meth:`decay` call exactly like ``ExponentialLR`` (repeated float multiplication).
    ``lr_axis[name]`` is the axis of the learning-rate dimension of each parameter.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        lr_axis: dict[str, int],
        lrs: Sequence[float],
    ) -> None:
        self.params = params
        self.lr_axis = lr_axis
        self.lrs = [float(lr) for lr in lrs]
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    def _lr_view(self, name: str, values: Sequence[float]) -> torch.Tensor:
        p = self.params[name]
        shape = [1] * p.ndim
        shape[self.lr_axis[name]] = len(values)
        return torch.tensor(values, dtype=p.dtype, device=p.device).view(shape)

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = _ADAM_BETAS
        self.step_count += 1
        t = float(self.step_count)
        bc1 = 1 - beta1**t
        bc2_sqrt = (1 - beta2**t) ** 0.5
        neg_steps = [-(lr / bc1) for lr in self.lrs]
        names = [name for name, p in self.params.items() if p.grad is not None]
        if not names:
            return
        # the element-wise operations of torch.optim.Adam's single-tensor path, in the same
        # order, applied to all parameters per call (foreach): identical results, fewer calls
        params = [self.params[n] for n in names]
        grads = [p.grad for p in params]
        ms = [self.exp_avg[n] for n in names]
        vs = [self.exp_avg_sq[n] for n in names]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, _ADAM_EPS)
        update = torch._foreach_mul(ms, [self._lr_view(n, neg_steps) for n in names])
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def decay(self, gamma: float) -> None:
        self.lrs = [lr * gamma for lr in self.lrs]


# --------------------------------------------------------------------------- batched heads


class _BatchedHeads:
    """All heads of a sweep as stacked tensors: probe (S, L, ...), interp (P, S, L, ...)."""

    def __init__(
        self,
        concepts: ConceptSpace,
        config: SweepConfig,
        dim: int,
        num_classes: int,
        probe_shift: torch.Tensor | None = None,
    ) -> None:
        self.concepts = concepts
        self.probe_shift = probe_shift
        self.config = config
        self.device = config.device
        self.m = concepts.m
        self.k = [n_dropped(s, self.m) for s in config.sparsities]
        self.shape_probe = (len(config.seeds), len(config.learning_rates))
        self.shape_interp = (len(config.sparsities),) + self.shape_probe
        self.params = self._init_params(dim, num_classes)
        self.gumbel_gens = self._gumbel_generators()
        if concepts.kind == "end_to_end":
            self.empty_at_init = self.empty_concepts()
            logger.info(
                "end-to-end: %d elements for M = %d; empty concepts at initialisation: %d of %d heads have any "
                "(at most %d empty)",
                concepts.elements.shape[0] if concepts.elements is not None else 0,
                self.m,
                int((self.empty_at_init > 0).sum()),
                self.empty_at_init.numel(),
                int(self.empty_at_init.max()),
            )

    @torch.no_grad()
    def empty_concepts(self) -> torch.Tensor:
        """Per end-to-end head (P, S, L), the number of concepts no element is assigned to (noise-free)."""
        p = self.params
        idx = _hard_assignment_indexed(
            p["interp.q"], self.config.gumbel_tau, None, p["interp.q_ln_weight"], p["interp.q_ln_bias"]
        )[1]
        counts = torch.zeros(idx.shape[:-1] + (self.m,), dtype=torch.long, device=idx.device)
        counts.scatter_add_(-1, idx, torch.ones_like(idx))
        return (counts == 0).sum(-1)

    def _init_params(self, dim: int, num_classes: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        e = None if self.concepts.elements is None else int(self.concepts.elements.shape[0])
        e = e if self.concepts.kind == "end_to_end" else None
        probe = [
            [
                _init_head("probe", s, None, lr, dim, num_classes, None, self.device)
                for lr in cfg.learning_rates
            ]
            for s in cfg.seeds
        ]
        interp = [
            [
                [
                    _init_head("interp", s, sp, lr, self.m, num_classes, e, self.device)
                    for lr in cfg.learning_rates
                ]
                for s in cfg.seeds
            ]
            for sp in cfg.sparsities
        ]
        params = {
            "probe.weight": _stack2(probe, "weight"),
            "probe.bias": _stack2(probe, "bias"),
            "interp.weight": _stack3(interp, "weight"),
            "interp.bias": _stack3(interp, "bias"),
        }
        if self.concepts.has_affine:
            params["interp.ln_weight"] = _stack3(interp, "ln_weight")
            params["interp.ln_bias"] = _stack3(interp, "ln_bias")
        if self.concepts.kind == "end_to_end":
            for name in ("q", "q_ln_weight", "q_ln_bias"):
                params[f"interp.{name}"] = _stack3(interp, name)
        for p in params.values():
            p.requires_grad_(True)
        return params

    def _end_to_end_scores(
        self, x: torch.Tensor, assign: torch.Tensor, idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z · Cᵀ`` with ``C = L2-normalise(Aᵀ·E)`` for every head: (S, B, D), (P, S, L, E, M) -> (P, S, L, B, M).

        ``assign`` is a hard (straight-through) assignment, one-hot in value; ``idx`` (P, S, L, E)
        its concept per element (its argmax when not given).

        Two equal ways to compute it; the cheaper one for these sizes is used:

        * direct: ``C = normalise(AᵀE)`` (E·M·D per head), then ``z·Cᵀ`` (B·M·D per head);
        * through the elements: ``(z·Eᵀ)·A / ‖AᵀE‖`` with ``z·Eᵀ`` shared by all heads of a seed
          (B·E·M per head) and the norms from the Gram matrix ``E·Eᵀ`` (E²·M per head), which is
          much cheaper when E is not much larger than D. Its forward pass sums over each concept's
          elements instead of multiplying by the one-hot ``A`` (:class:`_AssignedScores`).
        """
        elements = self.concepts.elements
        assert elements is not None
        n_el, dim = elements.shape
        b, m = x.shape[1], assign.shape[-1]
        direct = n_el * m * dim + b * m * dim
        via_elements = b * n_el * m + n_el * n_el * m
        if direct <= via_elements:
            c = _concepts_from_assignment(assign, elements)
            return torch.einsum("sbd,pslmd->pslbm", x, c)
        if getattr(self, "_gram", None) is None:
            self._gram = elements @ elements.T
        zp = torch.einsum("sbd,ed->sbe", x, elements)  # (S, B, E), shared across heads
        return _AssignedScores.apply(zp, self._gram, assign, assign.argmax(-1) if idx is None else idx)

    def _gumbel_generators(self) -> list[torch.Generator]:
        if self.concepts.kind != "end_to_end":
            return []
        cfg = self.config
        return [
            _generator(_gumbel_seed(s, sp, lr), self.device)
            for sp in cfg.sparsities
            for s in cfg.seeds
            for lr in cfg.learning_rates
        ]

    def base_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared activations of a batch ``x`` (..., D) -> (..., M); None for end-to-end concepts."""
        if self.concepts.kind == "end_to_end":
            return None
        flat = _precompute_base(x.reshape(-1, x.shape[-1]), self.concepts)
        assert flat is not None
        return flat.reshape(tuple(x.shape[:-1]) + (flat.shape[-1],))

    def lr_axis(self) -> dict[str, int]:
        return {k: (1 if k.startswith("probe.") else 2) for k in self.params}

    def _gumbel(self) -> torch.Tensor:
        q = self.params["interp.q"]
        shape = tuple(q.shape[3:])
        # one buffer, filled head by head from each head's own generator (the same numbers as
        # _gumbel_noise per head), then one in-place transform over all of it
        noise = torch.empty((len(self.gumbel_gens), *shape), device=self.device)
        for i, g in enumerate(self.gumbel_gens):
            noise[i].uniform_(generator=g)
        return _uniform_to_gumbel_(noise).view(q.shape)

    def forward(
        self, x: torch.Tensor, base: torch.Tensor | None, train: bool, probe: bool = True, interp: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits of all heads for per-seed inputs ``x`` (S, B, D) / ``base`` (S, B, M).

        Returns probe logits (S, L, B, K) (None when ``probe`` is false) and interp logits
        (P, S, L, B, K) (None when ``interp`` is false).
        """
        p = self.params
        if probe:
            xp = x if self.probe_shift is None else x - self.probe_shift
            probe_logits = torch.einsum("sbd,slkd->slbk", xp, p["probe.weight"]) + p["probe.bias"][:, :, None, :]
        else:
            probe_logits = None
        if not interp:
            return probe_logits, None
        if self.concepts.kind == "end_to_end":
            assert self.concepts.elements is not None
            noise = self._gumbel() if train else None
            assign, idx = _hard_assignment_indexed(
                p["interp.q"], self.config.gumbel_tau, noise, p["interp.q_ln_weight"], p["interp.q_ln_bias"]
            )
            base5 = _layer_norm(self._end_to_end_scores(x, assign, idx))
        else:
            assert base is not None
            base5 = base[None, :, None]
        return probe_logits, _apply_heads(base5, p, "interp.", self.concepts.has_affine, self.k)

    @torch.no_grad()
    def correct(
        self, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample correctness of every head on one split (no grad, chunked).

        Returns bool tensors probe (S, L, N) and interp (P, S, L, N).
        """
        s = self.shape_probe[0]
        probe_parts, interp_parts = [], []
        for start, rows in _eval_chunks(x):
            sl = slice(start, start + rows.shape[0])
            rows = rows.to(self.device)
            xs = rows.unsqueeze(0).expand(s, -1, -1)
            if base is not None:
                bs = base[sl].unsqueeze(0).expand(s, -1, -1)
            else:
                b1 = self.base_of(rows)
                bs = None if b1 is None else b1.unsqueeze(0).expand(s, -1, -1)
            lp, li = self.forward(xs, bs, train=False)
            probe_parts.append(lp.argmax(-1) == y[sl])
            interp_parts.append(li.argmax(-1) == y[sl])
        return torch.cat(probe_parts, -1), torch.cat(interp_parts, -1)


def _stack2(rows: list[list[dict[str, torch.Tensor]]], key: str) -> torch.Tensor:
    return torch.stack([torch.stack([h[key] for h in row]) for row in rows])


def _stack3(blocks: list[list[list[dict[str, torch.Tensor]]]], key: str) -> torch.Tensor:
    return torch.stack([_stack2(rows, key) for rows in blocks])


# --------------------------------------------------------------------------- best-epoch tracking


class _BestTracker:
    """Keeps, per head, the earliest epoch with the best val accuracy and its parameters there;
    the test outcome is computed once, from those parameters, when training ends
    (:meth:`score_test`): the same numbers as evaluating test after every epoch, at half the
    evaluation cost."""

    def __init__(self, heads: _BatchedHeads) -> None:
        dev = heads.device
        self.shapes = {"probe": heads.shape_probe, "interp": heads.shape_interp}
        f64 = torch.float64
        self.val = {k: torch.full(s, -1.0, dtype=f64, device=dev) for k, s in self.shapes.items()}
        self.test = {k: torch.zeros(s, dtype=f64, device=dev) for k, s in self.shapes.items()}
        self.epoch = {k: torch.zeros(s, dtype=torch.long, device=dev) for k, s in self.shapes.items()}
        self.test_correct: dict[str, torch.Tensor] = {}  # filled by score_test
        self.params = {k: v.detach().clone() for k, v in heads.params.items()}
        self.history: list[dict[str, torch.Tensor]] = []

    def update(self, epoch: int, val_correct: dict[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        record = {}
        for key in self.shapes:
            val_acc = val_correct[key].sum(-1, dtype=torch.float64) / val_correct[key].shape[-1]
            record[f"{key}.val"] = val_acc.cpu()
            better = val_acc > self.val[key]
            self.val[key] = torch.where(better, val_acc, self.val[key])
            self.epoch[key] = torch.where(better, torch.full_like(self.epoch[key], epoch), self.epoch[key])
            for name, p in params.items():
                if name.startswith(key + "."):
                    mask = better.view(better.shape + (1,) * (p.ndim - better.ndim))
                    self.params[name] = torch.where(mask, p.detach(), self.params[name])
        self.history.append(record)

    def score_test(self, heads: _BatchedHeads, test: Split, base: torch.Tensor | None) -> None:
        """Test correctness of every head at its best-val epoch, from the kept parameters."""
        live = heads.params
        heads.params = self.params
        try:
            tp, ti = heads.correct(test.x, test.y, base)
        finally:
            heads.params = live
        for key, correct in (("probe", tp), ("interp", ti)):
            self.test_correct[key] = correct
            self.test[key] = correct.sum(-1, dtype=torch.float64) / correct.shape[-1]


# --------------------------------------------------------------------------- sweep


def _validate_inputs(
    train: Split, val: Split, test: Split, concepts: ConceptSpace, num_classes: int, config: SweepConfig
) -> None:
    config.validate()
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, split in (("train", train), ("val", val), ("test", test)):
        split.validate(num_classes, name)
    dim = train.x.shape[1]
    for name, split in (("val", val), ("test", test)):
        if split.x.shape[1] != dim:
            raise ValueError(
                f"{name}.x feature dimension {split.x.shape[1]} does not match train.x dimension {dim}"
            )
    concepts.validate(dim)


def _to_device(split: Split, device: str) -> Split:
    """Labels (and in-memory features) on ``device``; sharded features stay on disk."""
    y = split.y.to(device=device, dtype=torch.long)
    if isinstance(split.x, ShardedArray):
        return Split(split.x, y)
    return Split(split.x.to(device=device, dtype=torch.float32), y)


def _shard_batches(
    x: ShardedArray, y: torch.Tensor, gen: torch.Generator, batch_size: int, device: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches ``(x, y)`` of a sharded split for one seed.

    The data order: the shards in a random order, and the rows of each shard in a random
    order (rows left over at the end of a shard open the next batch). Only the shard being
    read (plus fewer than ``batch_size`` leftover rows) is in memory. With a single shard this
    is exactly the in-memory order ``randperm(N)``.
    """
    blocks = x.blocks()
    order = torch.randperm(len(blocks), generator=gen).tolist() if len(blocks) > 1 else [0]
    carry: tuple[torch.Tensor, torch.Tensor] | None = None
    for b in order:
        start, stop = blocks[b]
        perm = torch.randperm(stop - start, generator=gen)
        rows = x.read(start, stop).to(device)  # the one shard in memory; batches are gathered from it
        labels = y[start:stop].to(device)
        perm = perm.to(device)
        pos = 0
        if carry is not None:  # rows left over from the previous shard open this shard's first batch
            take = perm[: batch_size - carry[0].shape[0]]
            pos = take.shape[0]
            xb, yb = torch.cat([carry[0], rows[take]]), torch.cat([carry[1], labels[take]])
            if xb.shape[0] < batch_size:
                carry = (xb, yb)
                continue
            carry = None
            yield xb, yb
        while pos + batch_size <= perm.shape[0]:
            take = perm[pos : pos + batch_size]
            pos += batch_size
            yield rows[take], labels[take]
        if pos < perm.shape[0]:
            take = perm[pos:]
            carry = (rows[take], labels[take])
        del rows
    if carry is not None:
        yield carry


def _eval_chunks(x: torch.Tensor | ShardedArray) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, rows)`` chunks of at most ``_EVAL_CHUNK`` rows, in order (shard by shard)."""
    if isinstance(x, ShardedArray):
        for start, rows in x.iter_blocks():
            for i in range(0, rows.shape[0], _EVAL_CHUNK):
                yield start + i, rows[i : i + _EVAL_CHUNK]
    else:
        for i in range(0, x.shape[0], _EVAL_CHUNK):
            yield i, x[i : i + _EVAL_CHUNK]


def sweep(
    train: Split,
    val: Split,
    test: Split,
    concepts: ConceptSpace,
    num_classes: int,
    config: SweepConfig,
    progress: bool = True,
) -> SweepResult:
    """Train all probe and interpretation heads of the sweep together (METHOD §2-§4).

    Every head is evaluated on val after every epoch; per head the epoch with the best val
    accuracy is kept (earliest on ties, with its parameters), and per (seed, head, sparsity)
    the learning rate with the best val accuracy (smaller lr on ties). Test accuracy is
    computed once, from each head's kept parameters: reported, never used for selection.
    """
    return sweep_many(train, val, test, {"concepts": concepts}, num_classes, config, progress)["concepts"]


def sweep_many(
    train: Split,
    val: Split,
    test: Split,
    concepts: Mapping[str, ConceptSpace],
    num_classes: int,
    config: SweepConfig,
    progress: bool = True,
) -> dict[str, SweepResult]:
    """The sweeps of several concept spaces of one representation, trained as one batched model.

    The linear probe does not depend on the concepts: it is trained once and shared, and every
    concept space's interpretation heads train in the same minibatch steps (the data order of a
    seed is the same for every head). Each head's initialisation, data order and updates are
    those of its own :func:`sweep`, so ``sweep_many(..., {"a": A, "b": B})["a"]`` equals
    ``sweep(..., A)`` (the two are checked equal in the tests); what is shared is the per-step
    work that does not depend on the concepts (the probe, gathering the minibatch, the
    optimiser's and the autograd engine's fixed costs).
    """
    if not concepts:
        raise ValueError("sweep_many needs at least one concept space")
    spaces_in = list(concepts.values())
    _validate_inputs(train, val, test, spaces_in[0], num_classes, config)  # the splits: once (a disk scan if sharded)
    for space in spaces_in[1:]:
        space.validate(train.x.shape[1])
    dev = config.device
    train, val, test = (_to_device(s, dev) for s in (train, val, test))
    spaces = {name: _concepts_to(space, dev) for name, space in concepts.items()}
    budget = config.plan(train.x.shape[0])
    shift = _train_mean(train.x, dev) if config.probe_centering else None
    model = _SharedProbe(
        {name: _BatchedHeads(space, config, train.x.shape[1], num_classes, shift) for name, space in spaces.items()}
    )
    # activations shared by all heads of a concept space, once per sample; on the fly per batch for sharded splits
    bases = {
        name: {
            split: None if isinstance(s.x, ShardedArray) else _precompute_base(s.x, space)
            for split, s in (("train", train), ("val", val), ("test", test))
        }
        for name, space in spaces.items()
    }
    opt = _StackedAdam(model.params, model.lr_axis(), config.learning_rates)
    data_gens = [_generator(_data_seed(s), "cpu") for s in config.seeds]
    trackers = {name: _BestTracker(heads) for name, heads in model.parts.items()}
    first = next(iter(model.parts.values()))
    logger.info(
        "sweep: %d probe + %d x %d interp heads (%s; %d stacked), K=%d, N_train=%d: batch %d, %d epochs, %d steps",
        int(np.prod(first.shape_probe)),
        len(model.parts),
        int(np.prod(first.shape_interp)),
        ", ".join(f"{name}: {h.concepts.kind}, M={h.m}" for name, h in model.parts.items()),
        len(model.stacked),
        num_classes,
        train.x.shape[0],
        budget.batch_size,
        budget.epochs,
        budget.steps,
    )
    train_bases = [bases[name]["train"] for name in model.parts]
    for epoch in tqdm(range(1, budget.epochs + 1), desc="sweep epochs", disable=not progress):
        _train_epoch(model, opt, train, train_bases, data_gens, budget.batch_size)
        opt.decay(budget.gamma)
        for name, (vp, vi) in model.correct(val.x, val.y, {n: b["val"] for n, b in bases.items()}).items():
            trackers[name].update(epoch, {"probe": vp, "interp": vi}, model.parts[name].params)
    results = {}
    for name, heads in model.parts.items():
        trackers[name].score_test(heads, test, bases[name]["test"])
        results[name] = _build_result(trackers[name], heads, config, num_classes, budget)
    return results


class _SharedProbe:
    """The heads of one or more concept spaces (:class:`_BatchedHeads` each) with one linear probe.

    The probe's parameter tensors of the first part are given to every part (each part's own,
    identically initialised ones are dropped), so each part still reads as a complete sweep
    (selection, best-epoch tracking, results), while the probe's forward and backward pass run
    once per step.

    Concept spaces given as vectors or a projection with the same M (the common case:
    prototype and cluster concepts) are *stacked*: their interpretation heads' parameters are
    stored in one tensor ``(P, T, S, L, ...)`` (T the stacked spaces), each part's parameters
    are views into it, and all of them run as one call of the fused heads (the kernel
    computes every head on its own, start to end, so the numbers are those of separate
    calls; checked bit for bit on CPU, with and without the numba kernel; on CUDA the batched
    matrix products may be computed by other kernels when the batch grows, so there the numbers
    agree to float rounding). ``params`` holds every trainable tensor once: the probe under
    ``probe.*``, the stacked heads under ``stacked/*``, the others under ``part<i>/*``.
    """

    def __init__(self, parts: dict[str, _BatchedHeads]) -> None:
        self.parts = parts
        first = next(iter(parts.values()))
        self.device = first.device
        for heads in parts.values():
            for key in ("probe.weight", "probe.bias"):
                heads.params[key] = first.params[key]
        self.params = {k: v for k, v in first.params.items() if k.startswith("probe.")}
        self._axes = {k: 1 for k in self.params}
        self.stacked = self._stackable()
        if len(self.stacked) > 1:
            lead = parts[self.stacked[0]]
            for key in [k for k in lead.params if k.startswith("interp.")]:
                joint = torch.stack([parts[n].params[key].detach() for n in self.stacked], dim=1).requires_grad_(True)
                self.params[f"stacked/{key}"] = joint
                self._axes[f"stacked/{key}"] = 3
                for t, name in enumerate(self.stacked):
                    parts[name].params[key] = joint[:, t]  # a view: the part reads the joint tensor
        else:
            self.stacked = []
        for i, (name, heads) in enumerate(parts.items()):
            if name not in self.stacked:  # keyed by position: no part name can collide with another key
                own = [k for k in heads.params if not k.startswith("probe.")]
                self.params.update({f"part{i}/{k}": heads.params[k] for k in own})
                self._axes.update({f"part{i}/{k}": 2 for k in own})

    def _stackable(self) -> list[str]:
        """The largest group of parts whose heads can run as one call: concept vectors or a
        projection (no end-to-end assignment) with the same M and affine (ties: the first group)."""
        groups: dict[tuple[int, bool], list[str]] = {}
        for name, heads in self.parts.items():
            if heads.concepts.kind != "end_to_end":
                groups.setdefault((heads.m, heads.concepts.has_affine), []).append(name)
        return max(groups.values(), key=len, default=[])

    def lr_axis(self) -> dict[str, int]:
        return self._axes

    def _stacked_logits(self, bases: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Interp logits (P, T, S, L, B, K) of the stacked parts from their bases (S, B, M)."""
        base = torch.stack([bases[n] for n in self.stacked])[None, :, :, None]  # (1, T, S, 1, B, M)
        lead = self.parts[self.stacked[0]]
        return _apply_heads(base, self.params, "stacked/interp.", lead.concepts.has_affine, lead.k)

    def forward(
        self, x: torch.Tensor, bases: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Probe logits (S, L, B, K) once, and the interp logits of the stacked parts
        (P, T, S, L, B, K) and of every other part (P, S, L, B, K)."""
        by_name = dict(zip(self.parts, bases, strict=True))
        first = next(iter(self.parts.values()))
        probe, _ = first.forward(x, by_name[next(iter(self.parts))], train=True, interp=False)
        assert probe is not None
        interps = [self._stacked_logits(by_name)] if self.stacked else []
        for name, heads in self.parts.items():
            if name not in self.stacked:
                interps.append(heads.forward(x, by_name[name], train=True, probe=False)[1])
        return probe, interps

    @torch.no_grad()
    def correct(
        self, x: torch.Tensor, y: torch.Tensor, bases: dict[str, torch.Tensor | None]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per part, per-sample correctness of its probe (S, L, N) and interp heads (P, S, L, N);
        the stacked parts' heads in one call per chunk."""
        out = {name: heads.correct(x, y, bases[name]) for name, heads in self.parts.items() if name not in self.stacked}
        if not self.stacked:
            return out
        if any(bases[n] is None for n in self.stacked):  # sharded splits: part by part
            out.update({n: self.parts[n].correct(x, y, bases[n]) for n in self.stacked})
            return out
        first = self.parts[self.stacked[0]]
        s = first.shape_probe[0]
        probe_parts, interp_parts = [], []
        for start, rows in _eval_chunks(x):
            sl = slice(start, start + rows.shape[0])
            xs = rows.to(self.device).unsqueeze(0).expand(s, -1, -1)
            lp, _ = first.forward(xs, None, train=False, interp=False)
            assert lp is not None
            chunk = {n: bases[n][sl].unsqueeze(0).expand(s, -1, -1) for n in self.stacked}
            probe_parts.append(lp.argmax(-1) == y[sl])
            interp_parts.append(self._stacked_logits(chunk).argmax(-1) == y[sl])
        probe = torch.cat(probe_parts, -1)
        interp = torch.cat(interp_parts, -1)  # (P, T, S, L, N)
        out.update({n: (probe, interp[:, t]) for t, n in enumerate(self.stacked)})
        return out


def _train_mean(x: torch.Tensor | ShardedArray, device: str) -> torch.Tensor:
    """Mean of the training features (D,), accumulated in float64 (shard by shard on disk)."""
    if isinstance(x, ShardedArray):
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for _, rows in x.iter_blocks():
            total += torch.as_tensor(rows).to(torch.float64).sum(0)
        return (total / x.shape[0]).to(device=device, dtype=torch.float32)
    return x.to(torch.float64).mean(0).to(torch.float32)


def _train_epoch(
    model: _SharedProbe,
    opt: _StackedAdam,
    train: Split,
    bases: Sequence[torch.Tensor | None],
    data_gens: list[torch.Generator],
    batch_size: int,
) -> None:
    for xb, bbs, yb in _seed_batches(model, train, bases, data_gens, batch_size):
        lp, lis = model.forward(xb, bbs)
        n_seeds, bsz = yb.shape
        # sums of per-sample cross-entropies; probe logits (S, L, B, K), interp (..., S, L, B, K)
        # (minibatch means: scale 1/B, applied inside so that the gradients need no further pass)
        loss = None
        for logits in [lp, *lis]:
            target = yb.view((1,) * (logits.ndim - 4) + (n_seeds, 1, bsz, 1)).expand(logits.shape[:-1] + (1,))
            term = _SumCrossEntropy.apply(logits, target, 1.0 / bsz)
            loss = term if loss is None else loss + term
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()


class _SumCrossEntropy(torch.autograd.Function):
    """``scale * sum(cross_entropy(logits, target))`` over all leading axes, for many heads at once.

    The same value and gradient (``scale * (softmax - onehot)``) as
    ``scale * F.cross_entropy(..., reduction="sum")`` up to float rounding. ``log_softmax`` over a
    (heads x batch, 10) matrix is slow on CPU (2.7 ms for 24 heads x 1024 samples); on CPU float32
    the fused kernel (:func:`.fused_heads.cross_entropy`) does value and gradient in one parallel
    pass (0.5 ms), elsewhere a handful of element-wise torch passes (1.0 ms). The gradient is
    computed in the forward pass with ``scale`` applied (a minibatch mean: ``scale = 1/B``) and
    its subnormal entries zeroed, as :func:`flush_denormals` does for the reference loop; the
    backward pass returns it as it is when the incoming gradient is 1 (``loss.backward()``).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        from . import fused_heads

        fused = fused_heads.cross_entropy(logits, target, scale)
        if fused is not None:
            loss, grad = fused
        else:
            z = logits - logits.amax(-1, keepdim=True)
            e = z.exp()
            total = e.sum(-1, keepdim=True)
            loss = (total.log() - z.gather(-1, target)).sum() * scale
            grad = e.div_(total)
            grad.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=grad.dtype, device=grad.device))
            grad = flush_denormals(grad.mul_(scale))
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if g.device.type == "cpu" and g.numel() == 1 and g.item() == 1.0:
            return grad, None, None
        return flush_denormals(grad * g), None, None


def _seed_batches(
    model: _SharedProbe,
    train: Split,
    bases: Sequence[torch.Tensor | None],
    data_gens: list[torch.Generator],
    batch_size: int,
) -> Iterator[tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]]:
    """Minibatches stacked over seeds: ``x`` (S, B, D), per part ``base`` (S, B, M) or None, ``y`` (S, B)."""
    if not isinstance(train.x, ShardedArray):
        n = train.x.shape[0]
        perms = torch.stack([torch.randperm(n, generator=g) for g in data_gens]).to(train.y.device)
        for start in range(0, n, batch_size):
            idx = perms[:, start : start + batch_size]  # (S, B)
            flat = idx.reshape(-1)  # index_select: a faster gather than x[idx] on CPU
            xb = torch.index_select(train.x, 0, flat).view(*idx.shape, train.x.shape[1])
            bbs = [
                None if base is None else torch.index_select(base, 0, flat).view(*idx.shape, base.shape[1])
                for base in bases
            ]
            yield xb, bbs, train.y[idx]
        return
    streams = [_shard_batches(train.x, train.y, g, batch_size, model.device) for g in data_gens]
    for parts in zip(*streams, strict=True):
        xb = torch.stack([p[0] for p in parts])
        yield xb, [heads.base_of(xb) for heads in model.parts.values()], torch.stack([p[1] for p in parts])


def _select_lr(val_acc: np.ndarray, lrs: np.ndarray) -> np.ndarray:
    """Index of the best lr along the last axis of ``val_acc`` (ties -> smaller lr)."""
    best = val_acc.max(-1, keepdims=True)
    cand = np.where(val_acc >= best, lrs, np.inf)
    return cand.argmin(-1)


def _build_result(
    tracker: _BestTracker, heads: _BatchedHeads, config: SweepConfig, num_classes: int, budget: Budget
) -> SweepResult:
    lrs = np.asarray(config.learning_rates, dtype=float)
    pv, iv = tracker.val["probe"].cpu().numpy(), tracker.val["interp"].cpu().numpy()
    sel_p = _select_lr(pv, lrs)  # (S,)
    sel_i = _select_lr(iv, lrs)  # (P, S)
    table = _head_table(tracker, config)
    selected = _selected_table(tracker, config, sel_p, sel_i)
    tc_p = tracker.test_correct["probe"].cpu().numpy()
    tc_i = tracker.test_correct["interp"].cpu().numpy()
    s_idx = np.arange(len(config.seeds))
    probe_tc = tc_p[s_idx, sel_p]  # (S, N)
    interp_tc = np.stack([tc_i[p, s_idx, sel_i[p]] for p in range(len(config.sparsities))], axis=1)
    test_correct = np.concatenate([probe_tc[:, None], interp_tc], axis=1)
    state = _selected_state(tracker.params, sel_p, sel_i)
    if heads.probe_shift is not None:  # the stored probe reads raw features: b - W·mean
        state["probe.bias"] = state["probe.bias"] - state["probe.weight"] @ heads.probe_shift.cpu()
    return SweepResult(
        config=config,
        num_classes=int(num_classes),
        m=heads.m,
        table=table,
        selected=selected,
        test_correct=test_correct.astype(bool),
        state=state,
        history=_history_table(tracker, config),
        budget=budget,
    )


def _head_index(config: SweepConfig, head: HeadKind) -> pd.DataFrame:
    """Seed/sparsity/lr columns in the flattened order of the stacked head tensors."""
    seeds, lrs = list(config.seeds), list(config.learning_rates)
    if head == "probe":
        grid = [(s, np.nan, lr) for s in seeds for lr in lrs]
    else:
        grid = [(s, sp, lr) for sp in config.sparsities for s in seeds for lr in lrs]
    df = pd.DataFrame(grid, columns=["seed", "sparsity", "lr"])
    df.insert(0, "head", head)
    return df


def _head_table(tracker: _BestTracker, config: SweepConfig) -> pd.DataFrame:
    parts = []
    for head in ("probe", "interp"):
        df = _head_index(config, head)
        df["best_epoch"] = tracker.epoch[head].reshape(-1).cpu().numpy()
        df["val_acc"] = tracker.val[head].reshape(-1).cpu().numpy().astype(float)
        df["test_acc"] = tracker.test[head].reshape(-1).cpu().numpy().astype(float)
        parts.append(df)
    out = pd.concat(parts, ignore_index=True)
    out["seed"] = out["seed"].astype(int)
    return out.sort_values(
        ["head", "seed", "sparsity", "lr"], ascending=[False, True, True, True], kind="stable"
    ).reset_index(drop=True)


def _selected_table(
    tracker: _BestTracker, config: SweepConfig, sel_p: np.ndarray, sel_i: np.ndarray
) -> pd.DataFrame:
    rows = []
    lrs = config.learning_rates
    for si, seed in enumerate(config.seeds):
        li = int(sel_p[si])
        rows.append(_sel_row(tracker, "probe", (si, li), seed, np.nan, lrs[li]))
        for pi, sp in enumerate(config.sparsities):
            li = int(sel_i[pi, si])
            rows.append(_sel_row(tracker, "interp", (pi, si, li), seed, sp, lrs[li]))
    return pd.DataFrame(rows)


def _sel_row(
    tracker: _BestTracker, head: str, index: tuple[int, ...], seed: int, sp: float, lr: float
) -> dict:
    return {
        "seed": int(seed),
        "head": head,
        "sparsity": float(sp),
        "lr": float(lr),
        "val_acc": float(tracker.val[head][index]),
        "test_acc": float(tracker.test[head][index]),
        "best_epoch": int(tracker.epoch[head][index]),
    }


def _selected_state(
    params: dict[str, torch.Tensor], sel_p: np.ndarray, sel_i: np.ndarray
) -> dict[str, torch.Tensor]:
    s_idx = torch.arange(len(sel_p))
    sp = torch.as_tensor(sel_p)
    si = torch.as_tensor(sel_i)  # (P, S)
    p_idx = torch.arange(si.shape[0])[:, None]
    out = {}
    for name, t in params.items():
        t = t.detach().cpu()
        if name.startswith("probe."):
            out[name] = t[s_idx, sp].clone()
        else:
            out[name] = t[p_idx, s_idx[None, :], si].transpose(0, 1).contiguous()  # (S, P, ...)
    return out


def _history_table(tracker: _BestTracker, config: SweepConfig) -> pd.DataFrame:
    parts = []
    for epoch, rec in enumerate(tracker.history, start=1):
        for head in ("probe", "interp"):
            df = _head_index(config, head)
            df["epoch"] = epoch
            df["val_acc"] = rec[f"{head}.val"].reshape(-1).numpy().astype(float)
            parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


# --------------------------------------------------------------------------- explain


def _sparsity_index(config: SweepConfig, sparsity: float) -> int:
    for i, s in enumerate(config.sparsities):
        if math.isclose(float(s), float(sparsity), rel_tol=0.0, abs_tol=1e-12):
            return i
    raise ValueError(f"sparsity must be one of the swept values {config.sparsities}, got {sparsity}")


def explain(
    result: SweepResult,
    concepts: ConceptSpace,
    z: torch.Tensor,
    sparsity: float,
    seed: int | None = None,
    top: int = 5,
) -> pd.DataFrame:
    """Explain predictions of the selected interpretation head at ``sparsity``.

    For each row of ``z`` (N, D): the predicted class and the ``top`` kept (non-masked)
    concepts with the largest contribution ``a_m * W[pred, m]``. ``seed=None`` uses the
    first seed of the sweep. Columns: sample, predicted, rank (1-based), concept,
    activation, contribution. Rows with fewer kept concepts than ``top`` list them all.
    """
    cfg = result.config
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (N, D), got shape {tuple(z.shape)}")
    concepts.validate(z.shape[1])
    seed = cfg.seeds[0] if seed is None else seed
    if seed not in cfg.seeds:
        raise ValueError(f"seed must be one of the swept seeds {cfg.seeds}, got {seed}")
    si, pi = list(cfg.seeds).index(seed), _sparsity_index(cfg, sparsity)
    st = {k: v[si, pi] for k, v in result.state.items() if k.startswith("interp.")}
    concepts = _concepts_to(concepts, "cpu")
    with torch.no_grad():
        a = _single_activations(z.float().cpu(), concepts, st)
        mask = _keep_mask(a, n_dropped(cfg.sparsities[pi], a.shape[-1]))
        logits = (a * mask) @ st["interp.weight"].T + st["interp.bias"]
        pred = logits.argmax(-1)
        contrib = torch.where(mask, a * st["interp.weight"][pred], float("-inf"))
    return _explanation_frame(a, mask, contrib, pred, top)


def _single_activations(z: torch.Tensor, concepts: ConceptSpace, st: dict[str, torch.Tensor]) -> torch.Tensor:
    """Activations of one (selected) interp head in evaluation mode."""
    if concepts.kind == "projection":
        assert concepts.projection is not None
        return (z @ concepts.projection - concepts.mean) / concepts.std
    if concepts.kind == "vectors":
        assert concepts.vectors is not None
        c = concepts.vectors
    else:
        assert concepts.elements is not None
        assign = _hard_assignment(st["interp.q"], 1.0, None, st.get("interp.q_ln_weight"), st.get("interp.q_ln_bias"))
        c = _concepts_from_assignment(assign, concepts.elements)
    return _layer_norm(z @ c.T) * st["interp.ln_weight"] + st["interp.ln_bias"]


def _explanation_frame(
    a: torch.Tensor, mask: torch.Tensor, contrib: torch.Tensor, pred: torch.Tensor, top: int
) -> pd.DataFrame:
    n_take = min(top, a.shape[-1])
    vals, idx = torch.topk(contrib, n_take, dim=-1)
    rows = []
    for i in range(a.shape[0]):
        for r in range(n_take):
            c = int(idx[i, r])
            if not bool(mask[i, c]):
                break
            rows.append(
                {
                    "sample": i,
                    "predicted": int(pred[i]),
                    "rank": r + 1,
                    "concept": c,
                    "activation": float(a[i, c]),
                    "contribution": float(vals[i, r]),
                }
            )
    cols = ["sample", "predicted", "rank", "concept", "activation", "contribution"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------- reference


class _ProbeModule(nn.Module):
    """Plain linear probe ``W z + b`` (METHOD §2), reading ``z - shift`` when centred."""

    def __init__(self, dim: int, num_classes: int, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.register_buffer("shift", shift)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z if self.shift is None else z - self.shift)


class _InterpModule(nn.Module):
    """One interpretation head (METHOD §3), written plainly for reference."""

    def __init__(
        self,
        concepts: ConceptSpace,
        k: int,
        num_classes: int,
        tau: float,
        gen: torch.Generator | None,
        device: str,
    ) -> None:
        super().__init__()
        self.kind = concepts.kind
        self.device_name = device
        self.k = k
        self.tau = tau
        self.gen = gen
        m = concepts.m
        for name in ("vectors", "elements", "projection", "mean", "std"):
            t = getattr(concepts, name)
            self.register_buffer(name, None if t is None else t.clone())
        self.ln = nn.LayerNorm(m) if concepts.has_affine else None
        if self.kind == "end_to_end":
            assert concepts.elements is not None
            self.q = nn.Parameter(torch.empty(concepts.elements.shape[0], m))
            self.q_ln = nn.LayerNorm(m)
        self.linear = nn.Linear(m, num_classes)

    def concept_matrix(self) -> torch.Tensor:
        if self.kind == "vectors":
            return self.vectors
        noise = _gumbel_noise(tuple(self.q.shape), self.gen, self.device_name) if self.training else None
        assign = _hard_assignment(self.q, self.tau, noise, self.q_ln.weight, self.q_ln.bias)
        return _concepts_from_assignment(assign, self.elements)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "projection":
            a = (z @ self.projection - self.mean) / self.std
        else:
            a = self.ln(z @ self.concept_matrix().T)
        return self.linear(sparsify(a, self.k))


def train_single_head(
    train: Split,
    val: Split,
    test: Split,
    concepts: ConceptSpace | None,
    num_classes: int,
    *,
    head: HeadKind,
    seed: int,
    lr: float,
    sparsity: float | None = None,
    config: SweepConfig = SweepConfig(),
) -> SingleHeadResult:
    """Reference: train ONE head alone with a plain PyTorch loop.

    ``nn.Module`` + ``torch.optim.Adam`` + ``ExponentialLR(gamma)`` stepped per epoch, with
    the same initialisation, data order (and Gumbel noise) as the batched :func:`sweep`
    uses for this (seed, head, sparsity, lr). Returns per-epoch val/test accuracy and
    the best epoch by val accuracy (earliest on ties).
    """
    dev = config.device
    dim = train.x.shape[1]
    train, val, test = (_to_device(s, dev) for s in (train, val, test))
    budget = config.plan(train.x.shape[0])
    shift = _train_mean(train.x, dev) if head == "probe" and config.probe_centering else None
    model = _build_reference(head, concepts, num_classes, seed, sparsity, lr, dim, config, shift)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=budget.gamma)
    gen = _generator(_data_seed(seed), "cpu")
    val_curve, test_curve, test_hist = [], [], []
    def batches():
        if isinstance(train.x, ShardedArray):
            yield from _shard_batches(train.x, train.y, gen, budget.batch_size, dev)
            return
        perm = torch.randperm(train.x.shape[0], generator=gen).to(dev)
        for start in range(0, perm.shape[0], budget.batch_size):
            idx = perm[start : start + budget.batch_size]
            yield train.x[idx], train.y[idx]

    def predict(x: torch.Tensor | ShardedArray) -> torch.Tensor:
        if isinstance(x, ShardedArray):
            return torch.cat([model(rows.to(dev)).argmax(-1) for _, rows in _eval_chunks(x)])
        return model(x).argmax(-1)

    for _ in range(budget.epochs):
        model.train()
        for xb, yb in batches():
            opt.zero_grad()
            logits = model(xb)
            logits.register_hook(flush_denormals)
            F.cross_entropy(logits, yb).backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            val_curve.append(float((predict(val.x) == val.y).cpu().numpy().mean()))
            correct = (predict(test.x) == test.y).cpu().numpy()
        test_curve.append(float(correct.mean()))
        test_hist.append(correct)
    best = int(np.argmax(val_curve))
    return SingleHeadResult(
        val_curve=np.asarray(val_curve),
        test_curve=np.asarray(test_curve),
        best_epoch=best + 1,
        val_acc=val_curve[best],
        test_acc=test_curve[best],
        test_correct=test_hist[best],
    )


def _build_reference(
    head: HeadKind,
    concepts: ConceptSpace | None,
    num_classes: int,
    seed: int,
    sparsity: float | None,
    lr: float,
    dim: int,
    config: SweepConfig,
    shift: torch.Tensor | None = None,
) -> nn.Module:
    dev = config.device
    if head == "probe":
        model: nn.Module = _ProbeModule(dim, num_classes, shift)
        init = _init_head("probe", seed, None, lr, dim, num_classes, None, dev)
        lin = model.linear
    elif head == "interp":
        if concepts is None or sparsity is None:
            raise ValueError("head='interp' needs concepts and sparsity")
        concepts.validate(dim)
        concepts = _concepts_to(concepts, dev)
        m = concepts.m
        e2e = concepts.kind == "end_to_end"
        gen = _generator(_gumbel_seed(seed, sparsity, lr), dev) if e2e else None
        model = _InterpModule(concepts, n_dropped(sparsity, m), num_classes, config.gumbel_tau, gen, dev)
        n_el = int(concepts.elements.shape[0]) if e2e and concepts.elements is not None else None
        init = _init_head("interp", seed, sparsity, lr, m, num_classes, n_el, dev)
        lin = model.linear
        with torch.no_grad():
            if model.ln is not None:
                model.ln.weight.copy_(init["ln_weight"])
                model.ln.bias.copy_(init["ln_bias"])
            if e2e:
                model.q.copy_(init["q"])
                model.q_ln.weight.copy_(init["q_ln_weight"])
                model.q_ln.bias.copy_(init["q_ln_bias"])
    else:
        raise ValueError(f"head must be 'probe' or 'interp', got {head!r}")
    with torch.no_grad():
        lin.weight.copy_(init["weight"])
        lin.bias.copy_(init["bias"])
    return model.to(dev)

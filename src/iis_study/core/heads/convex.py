"""The convex estimator (METHOD §4, "The estimator"): every head solved to a certified optimum.

With the LayerNorm over the M concept scores taken *without* affine, the interpretation head at
sparsity ``s`` reads fixed inputs, ``x_s = sparsify_s(LN(z·Cᵀ))`` (the mask keeps the
``M - floor(s·M)`` entries of largest ``|a|``, ties to the lower index, computed once per sample),
and is multinomial logistic regression with an L2 penalty on ``x_s``: a convex problem with one
optimum per L2 strength. The linear probe is the same problem on the centred features. All heads
of a representation (sparsities x L2 grid x concept types) are solved together by the batched
L-BFGS of :mod:`.lbfgs`, the probe in a second batched call (its design has D columns, not M);
each head to a stated tolerance on its gradient, which is its certificate. The L2 strength is
selected on val at the optimum (largest val accuracy; on ties the stronger penalty), and accuracy
is reported on test. Nothing here is random: ``seeds`` play no part.

The result has the same shape as the Adam sweep's (:class:`~iis_study.core.heads.SweepResult`,
one "seed"), with the L2 strength in the ``c`` column and the solver's record in
:class:`Certificate`; the stored state carries the LayerNorm affine at (1, 0) so explanations read
it as they read an Adam head's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from ..device import resolve_device
from ..representations.store import ShardedArray
from .activations import concepts_to, precompute_base
from .datatypes import ConceptSpace, Split, SweepParams, SweepResult
from ..solvers.lbfgs import BLOCK_BYTES, LogisticFit, solve_logistic
from .masks import n_dropped
from .seeds import train_mean
from .selection import select_lr, validate_inputs  # the input checks and selection rule both estimators share

logger = logging.getLogger(__name__)

MATERIALISE_BYTES = 512 * 2**20  # a design up to this size (in float64) is built once, else streamed
_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class Certificate:
    """The convex solver's record for one concept type's heads and the probe.

    Attributes:
        tolerance: the stopping rule: largest absolute entry of a head's gradient (per-sample objective).
        max_grad: the largest final gradient among the *selected* heads (probe and every sparsity).
        max_grad_all: the largest over every head of the grid (every L2 strength).
        iterations: the most solver iterations (Newton steps or L-BFGS iterations) any head of the grid took.
        certified: every head of the grid (probe included) ended within ``tolerance``.
        uncertified: the heads that did not, as ``"probe C=..."`` / ``"s=0.9 C=..."``.
    """

    tolerance: float
    max_grad: float
    max_grad_all: float
    iterations: int
    certified: bool
    uncertified: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["uncertified"] = list(self.uncertified)
        return out


# --------------------------------------------------------------------------- masks and designs


def keep_ranks(a: torch.Tensor) -> torch.Tensor:
    """Per row, the rank of each entry by ``|a|`` (0 = largest; ties: the lower index first), so
    that ``ranks < M - k`` is METHOD §3's mask keeping the ``M - k`` largest ``|a|``."""
    order = torch.argsort(-a.abs(), dim=-1, stable=True)
    dtype = torch.int16 if a.shape[-1] < 2**15 else torch.int32
    ranks = torch.empty(order.shape, dtype=dtype, device=a.device)
    ar = torch.arange(a.shape[-1], device=a.device, dtype=dtype).expand_as(order)
    return ranks.scatter_(-1, order, ar)


class ConceptDesign:
    """The masked activations of one or more concept spaces (of equal M) at every sparsity:
    group ``g = t·P + p`` is concept space ``t`` at sparsity ``p``. Activations are kept in float32
    with their ranks; a block's design matrix is ``a · (rank < keep)``."""

    def __init__(self, bases: list[torch.Tensor], keeps: list[int], y: torch.Tensor) -> None:
        self.a = torch.stack(bases)  # (T, N, M)
        self.ranks = keep_ranks(self.a)
        t, self.n, self.features = self.a.shape
        self.keeps = torch.tensor(keeps * t, device=self.a.device)
        self.type_of = torch.arange(t, device=self.a.device).repeat_interleave(len(keeps))
        self.groups = t * len(keeps)
        self.y = y
        self._cache: dict[torch.dtype, torch.Tensor] = {}
        self._subset: tuple[object, torch.Tensor | None] = (None, None)
        if self.groups * self.n * self.features * 8 <= MATERIALISE_BYTES:
            everyone = torch.arange(self.groups, device=self.a.device)
            self._cache[torch.float64] = self._build(everyone, slice(None), torch.float64)

    @property
    def materialised(self) -> bool:
        """Whether the float64 design is built once and held (else it is streamed in row blocks)."""
        return torch.float64 in self._cache

    def nested_parents(self) -> torch.Tensor:
        """Per group, the group of the same concept space that keeps the next larger number of entries (-1 for the
        one keeping the most): its mask contains this group's (METHOD §3: the ``M - k`` largest ``|a|`` of a row,
        ties to the lower index, so a smaller keep takes a subset), and its solution is the solver's start for
        this group at the strongest penalty (:func:`~iis_study.core.solvers.lbfgs.solve_logistic`)."""
        keeps, type_of = self.keeps.cpu(), self.type_of.cpu()
        parents = torch.full((self.groups,), -1, dtype=torch.long)
        for t in range(int(type_of.max()) + 1):
            members = (type_of == t).nonzero().flatten()
            order = members[torch.argsort(-keeps[members], stable=True)]
            parents[order[1:]] = order[:-1]
        return parents

    def _build(self, groups: torch.Tensor, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        tg = self.type_of[groups]
        a = self.a[:, rows][tg].to(dtype)
        keep = self.ranks[:, rows][tg] < self.keeps[groups].view(-1, 1, 1).to(self.ranks.dtype)
        return a * keep

    def blocks(
        self, groups: torch.Tensor, dtype: torch.dtype, max_rows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if dtype in self._cache:
            x = self._cache[dtype]
            if groups.numel() != self.groups or not bool((groups == torch.arange(self.groups, device=groups.device)).all()):
                key = (dtype, tuple(groups.tolist()))
                if self._subset[0] != key:  # the solver asks for the same live groups many times in a row
                    self._subset = (key, x.index_select(0, groups))
                x = self._subset[1]
            yield x, self.y
            return
        step = int(max_rows or _BLOCK_ROWS)
        for start in range(0, self.n, step):
            rows = slice(start, start + step)
            yield self._build(groups, rows, dtype), self.y[rows]


class FeatureDesign:
    """The probe's design, one group: ``(z - shift) / scale``, the features centred by their train mean
    and divided by one number, the root mean per-feature variance on train, so that the L2 grid means
    the same for every representation (unit-variance inputs, as the LayerNorm gives the heads). It is
    a reparametrisation: the same classifiers ``W z + b``."""

    groups = 1

    def __init__(
        self, x: torch.Tensor | ShardedArray, shift: torch.Tensor, scale: float, y: torch.Tensor, device: str
    ) -> None:
        self.x, self.y, self.device = x, y, device
        self.shift, self.scale = shift.to(torch.float64), float(scale)
        self.n, self.features = int(x.shape[0]), int(x.shape[1])
        self._cache: dict[torch.dtype, torch.Tensor] = {}
        if not isinstance(x, ShardedArray) and self.n * self.features * 8 <= MATERIALISE_BYTES:
            x64 = ((x.to(torch.float64) - self.shift) / self.scale).unsqueeze(0)
            self._cache = {torch.float64: x64}

    def blocks(
        self, groups: torch.Tensor, dtype: torch.dtype, max_rows: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if dtype in self._cache:
            yield self._cache[dtype], self.y
            return
        step = int(max_rows or _BLOCK_ROWS)
        if isinstance(self.x, ShardedArray):
            for start, shard in self.x.iter_blocks():
                shard = torch.as_tensor(shard).to(self.device)
                for i in range(0, shard.shape[0], step):
                    rows = shard[i : i + step]
                    yield self._rows(rows, dtype), self.y[start + i : start + i + rows.shape[0]]
            return
        for start in range(0, self.n, step):
            rows = self.x[start : start + step]
            yield self._rows(rows, dtype), self.y[start : start + rows.shape[0]]

    @property
    def materialised(self) -> bool:
        """Whether the float64 design is built once and held (else it is streamed in row blocks)."""
        return torch.float64 in self._cache

    def _rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return ((rows.to(torch.float64) - self.shift) / self.scale).to(dtype).unsqueeze(0)


def correct_predictions(design, weight: torch.Tensor, bias: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Per head (G', L) and sample, whether its prediction is right; ``weight`` (G', L, K, F) and
    ``bias`` (G', L, K) of design groups ``groups`` (default: all), float64 products. A head with NaN
    weights (not solved) is wrong everywhere."""
    g_, n_c, k, f = weight.shape
    groups = torch.arange(g_, device=weight.device) if groups is None else groups
    wm = torch.nan_to_num(weight, nan=0.0).permute(0, 3, 1, 2).reshape(g_, f, n_c * k)
    b = torch.nan_to_num(bias, nan=0.0).reshape(g_, 1, n_c * k)
    solved = ~torch.isnan(bias).any(-1)  # (G', L)
    parts = []
    max_rows = max(64, BLOCK_BYTES // (8 * 2 * g_ * n_c * k))
    for x, y in design.blocks(groups, torch.float64, max_rows):
        pred = torch.baddbmm(b, x, wm).view(g_, x.shape[1], n_c, k).argmax(-1)  # (G', B, L)
        parts.append((pred == y.view(1, -1, 1)).permute(0, 2, 1))
    return torch.cat(parts, dim=-1) & solved.unsqueeze(-1)  # (G', L, N)


def _path_rule(val_design) -> Callable:
    """The L2 path of a group goes on to the next (weaker) penalty while its val accuracy did not fall:
    ``keep_going`` for :func:`~.lbfgs.solve_logistic`."""
    last: dict[int, float] = {}

    def keep_going(li: int, weight: torch.Tensor, bias: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        acc = correct_predictions(val_design, weight.unsqueeze(1), bias.unsqueeze(1), groups)[:, 0].double().mean(-1)
        go = []
        for g, a in zip(groups.tolist(), acc.tolist(), strict=True):
            go.append(a >= last.get(g, -1.0))
            last[g] = a
        return torch.tensor(go, dtype=torch.bool)

    return keep_going


# --------------------------------------------------------------------------- the estimator


def _select(val_acc: np.ndarray, cs: list[float]) -> np.ndarray:
    """Index of the selected L2 strength along the last axis: the best val accuracy, ties to the
    smaller C (the stronger penalty), as the Adam sweep breaks ties to the smaller learning rate;
    NaN (not solved) is never selected."""
    return select_lr(np.where(np.isnan(val_acc), -np.inf, val_acc), np.asarray(cs, dtype=float))


def _feature_scale(x: torch.Tensor | ShardedArray, shift: torch.Tensor) -> float:
    """The root mean per-feature variance of the training features (float64; shard by shard on disk)."""
    total, n = 0.0, 0
    blocks = x.iter_blocks() if isinstance(x, ShardedArray) else [(0, x)]
    for _, rows in blocks:
        r = torch.as_tensor(rows).to(device=shift.device, dtype=torch.float64) - shift
        total += float((r * r).sum())
        n += r.shape[0]
    scale = math.sqrt(total / (n * x.shape[1]))
    return scale if scale > 0 else 1.0


def concept_activations(split: Split, space: ConceptSpace, dev: str) -> torch.Tensor:
    if isinstance(split.x, ShardedArray):
        return torch.cat([precompute_base(torch.as_tensor(r).to(dev), space) for _, r in split.x.iter_blocks()])
    return precompute_base(split.x, space)


def convex_many(
    train: Split,
    val: Split,
    test: Split,
    concepts: Mapping[str, ConceptSpace],
    num_classes: int,
    config: SweepParams,
    progress: bool = True,
) -> dict[str, SweepResult]:
    """Every head of every concept space of one representation, and the probe, solved to the
    certified optimum (module docstring); one :class:`SweepResult` per concept space."""
    if not concepts:
        raise ValueError("convex_many needs at least one concept space")
    spaces_in = list(concepts.values())
    validate_inputs(train, val, test, spaces_in[0], num_classes, config)
    for name, space in concepts.items():
        space.validate(train.x.shape[1])
        if space.kind == "end_to_end":
            raise ValueError(
                f"concept type {name!r} (end_to_end) learns its concepts jointly with the head: not a convex "
                "problem. Use sweep.estimator: adam for it (docs/method.md)"
            )
    dev = resolve_device(config.device, "sweep.device")
    k = int(num_classes)
    cs = sorted(float(c) for c in config.l2_grid)
    splits = {
        "train": train,
        "val": val,
        "test": test,
    }
    ys = {s: sp.y.to(device=dev, dtype=torch.long) for s, sp in splits.items()}
    xs = {s: sp.x if isinstance(sp.x, ShardedArray) else sp.x.to(device=dev, dtype=torch.float32) for s, sp in splits.items()}
    # the probe: centred features
    shift = train_mean(xs["train"], dev).to(torch.float64)
    scale = _feature_scale(xs["train"], shift)
    probe_designs = {s: FeatureDesign(xs[s], shift, scale, ys[s], dev) for s in splits}
    probe_fit = solve_logistic(
        probe_designs["train"], k, cs, tol=config.tolerance, max_iter=config.max_iter, device=dev,
        keep_going=_path_rule(probe_designs["val"]) if config.l2_path else None, solver=config.solver,
    )
    probe_correct = {s: correct_predictions(probe_designs[s], probe_fit.weight, probe_fit.bias)[0] for s in ("val", "test")}
    # the interpretation heads: concept spaces of equal M solved together
    spaces = {name: concepts_to(space, dev) for name, space in concepts.items()}
    by_m: dict[int, list[str]] = {}
    for name, space in spaces.items():
        by_m.setdefault(space.m, []).append(name)
    results: dict[str, SweepResult] = {}
    for m, names in by_m.items():
        keeps = [m - n_dropped(s, m) for s in config.sparsities]
        designs = {
            s: ConceptDesign([concept_activations(Split(xs[s], ys[s]), spaces[nm], dev) for nm in names], keeps, ys[s])
            for s in splits
        }
        fit = solve_logistic(
            designs["train"], k, cs, tol=config.tolerance, max_iter=config.max_iter, device=dev,
            keep_going=_path_rule(designs["val"]) if config.l2_path else None, solver=config.solver,
        )
        correct = {s: correct_predictions(designs[s], fit.weight, fit.bias) for s in ("val", "test")}  # (T·P, L, N)
        n_p = len(keeps)
        for t, name in enumerate(names):
            part = slice(t * n_p, (t + 1) * n_p)
            results[name] = _build_result(
                config, k, m, cs, (probe_fit, shift, scale), probe_correct, fit, part,
                {s: c[part] for s, c in correct.items()}, spaces[name],
            )
    logger.info(
        "convex heads: %s; probe %d iterations (largest gradient %.2e), tolerance %.0e",
        ", ".join(f"{n}: certified {r.certificate.certified}, {r.certificate.iterations} it." for n, r in results.items()),
        int(probe_fit.iterations.max()),
        float(probe_fit.grad.max()),
        config.tolerance,
    )
    return {name: results[name] for name in concepts}


def _build_result(
    config: SweepParams,
    k: int,
    m: int,
    cs: list[float],
    probe: tuple[LogisticFit, torch.Tensor, float],
    probe_correct: dict[str, torch.Tensor],
    fit: LogisticFit,
    part: slice,
    correct: dict[str, torch.Tensor],
    space: ConceptSpace,
) -> SweepResult:
    probe_fit, shift, scale = probe
    sparsities = [float(s) for s in config.sparsities]
    solved = fit.solved[part].cpu().numpy()
    psolved = probe_fit.solved[0].cpu().numpy()
    acc = {s: np.where(solved, c.double().mean(-1).cpu().numpy(), np.nan) for s, c in correct.items()}  # (P, L)
    pacc = {s: np.where(psolved, c.double().mean(-1).cpu().numpy(), np.nan) for s, c in probe_correct.items()}
    sel_p = int(_select(pacc["val"][None], cs)[0])
    sel_i = _select(acc["val"], cs)  # (P,)
    grads, its = fit.grad[part].cpu().numpy(), fit.iterations[part].cpu().numpy()
    pgrads, pits = probe_fit.grad[0].cpu().numpy(), probe_fit.iterations[0].cpu().numpy()
    rows = [
        {"head": "probe", "seed": 0, "sparsity": math.nan, "c": c, "val_acc": float(pacc["val"][li]),
         "test_acc": float(pacc["test"][li]), "grad": float(pgrads[li]), "iterations": int(pits[li])}
        for li, c in enumerate(cs)
    ]
    for pi, sp in enumerate(sparsities):
        for li, c in enumerate(cs):
            rows.append(
                {"head": "interp", "seed": 0, "sparsity": sp, "c": c, "val_acc": float(acc["val"][pi, li]),
                 "test_acc": float(acc["test"][pi, li]), "grad": float(grads[pi, li]), "iterations": int(its[pi, li])}
            )
    table = pd.DataFrame(rows)
    table["solved"] = np.concatenate([psolved, solved.reshape(-1)])
    table["certified"] = table["solved"] & (table["grad"] <= fit.tol)
    sel_rows = [table.iloc[sel_p]] + [table.iloc[len(cs) * (1 + pi) + int(sel_i[pi])] for pi in range(len(sparsities))]
    selected = pd.DataFrame(sel_rows).reset_index(drop=True)
    test_correct = np.concatenate(
        [probe_correct["test"][sel_p].cpu().numpy()[None], correct["test"][np.arange(len(sparsities)), sel_i].cpu().numpy()]
    )[None].astype(bool)  # (1, 1 + P, N)
    bad = table.loc[table["solved"] & ~table["certified"]]
    uncertified = tuple(
        f"probe C={r.c:g}" if r.head == "probe" else f"s={r.sparsity:g} C={r.c:g}" for r in bad.itertuples()
    )
    cert = Certificate(
        tolerance=float(fit.tol),
        max_grad=float(selected["grad"].max()),
        max_grad_all=float(table["grad"].max()),  # NaN (unsolved heads) is skipped
        iterations=int(table["iterations"].max()),
        certified=not uncertified,
        uncertified=uncertified,
    )
    if uncertified:
        logger.warning(
            "convex heads NOT certified (gradient above %.0e after %d iterations): %s; raise sweep.max_iter",
            fit.tol, config.max_iter, ", ".join(uncertified),
        )
    p_idx = torch.arange(len(sparsities))
    w = fit.weight[part][p_idx, torch.as_tensor(sel_i)].float().cpu()  # (P, K, M)
    b = fit.bias[part][p_idx, torch.as_tensor(sel_i)].float().cpu()
    pw64 = probe_fit.weight[0, sel_p] / scale  # back to raw features: W (z - μ) / σ + b = (W/σ) z + (b - (W/σ)·μ)
    pw = pw64.float().cpu()
    pb = probe_fit.bias[0, sel_p] - pw64 @ shift
    state = {
        "probe.weight": pw[None],
        "probe.bias": pb.float().cpu()[None],
        "interp.weight": w[None],
        "interp.bias": b[None],
    }
    if space.kind == "vectors":  # the LayerNorm's affine held at (1, 0)
        state["interp.ln_weight"] = torch.ones(1, len(sparsities), m)
        state["interp.ln_bias"] = torch.zeros(1, len(sparsities), m)
    return SweepResult(
        config=config,
        num_classes=k,
        m=m,
        table=table,
        selected=selected,
        test_correct=test_correct,
        state=state,
        certificate=cert,
    )

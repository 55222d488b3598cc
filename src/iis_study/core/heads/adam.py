"""The sweep: every head trained together, selection on val, the result tables (METHOD §2-§4)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..representations.store import ShardedArray
from .activations import concepts_to, precompute_base
from .batched import BatchedHeads, SharedProbe, StackedAdam
from .masks import SumCrossEntropy
from .seeds import data_seed, generator, shard_batches, to_device, train_mean
from .selection import select_lr, validate_inputs
from .datatypes import Budget, ConceptSpace, HeadKind, Split, SweepParams, SweepResult
from ..device import resolve_device

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- best-epoch tracking


class _BestTracker:
    """Keeps, per head, the earliest epoch with the best val accuracy and its parameters there;
    the test outcome is computed once, from those parameters, when training ends
    (:meth:`score_test`): the same numbers as evaluating test after every epoch, at half the
    evaluation cost."""

    def __init__(self, heads: BatchedHeads, half_epoch: int = 0) -> None:
        dev = heads.device
        self.half_epoch = int(half_epoch)
        self.half: dict[str, dict[str, torch.Tensor]] | None = None  # val and params of the best heads at half budget
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
        if epoch == self.half_epoch:
            self.half = {"val": {k: v.clone() for k, v in self.val.items()},
                         "params": {k: v.clone() for k, v in self.params.items()}}

    def score_test(self, heads: BatchedHeads, test: Split, base: torch.Tensor | None) -> None:
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
        if self.half is not None:
            heads.params = self.half["params"]
            try:
                hp, hi = heads.correct(test.x, test.y, base)
            finally:
                heads.params = live
            self.half["test_correct"] = {"probe": hp, "interp": hi}


# --------------------------------------------------------------------------- sweep


def sweep(
    train: Split,
    val: Split,
    test: Split,
    concepts: ConceptSpace,
    num_classes: int,
    config: SweepParams,
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
    config: SweepParams,
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
    validate_inputs(train, val, test, spaces_in[0], num_classes, config)  # the splits: once (a disk scan if sharded)
    for space in spaces_in[1:]:
        space.validate(train.x.shape[1])
    dev = resolve_device(config.device, "sweep.device")
    train, val, test = (to_device(s, dev) for s in (train, val, test))
    spaces = {name: concepts_to(space, dev) for name, space in concepts.items()}
    budget = config.plan(train.x.shape[0])
    shift = train_mean(train.x, dev) if config.probe_centering else None
    model = SharedProbe(
        {name: BatchedHeads(space, config, train.x.shape[1], num_classes, shift) for name, space in spaces.items()}
    )
    # activations shared by all heads of a concept space, once per sample; on the fly per batch for sharded splits
    bases = {
        name: {
            split: None if isinstance(s.x, ShardedArray) else precompute_base(s.x, space)
            for split, s in (("train", train), ("val", val), ("test", test))
        }
        for name, space in spaces.items()
    }
    opt = StackedAdam(model.params, model.lr_axis(), config.learning_rates)
    data_gens = [generator(data_seed(s), "cpu") for s in config.seeds]
    trackers = {name: _BestTracker(heads, budget.epochs // 2) for name, heads in model.parts.items()}
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


def _train_epoch(
    model: SharedProbe,
    opt: StackedAdam,
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
            term = SumCrossEntropy.apply(logits, target, 1.0 / bsz)
            loss = term if loss is None else loss + term
        assert loss is not None
        opt.zero_grad()
        loss.backward()
        opt.step()


def _seed_batches(
    model: SharedProbe,
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
    streams = [shard_batches(train.x, train.y, g, batch_size, model.device) for g in data_gens]
    for parts in zip(*streams, strict=True):
        xb = torch.stack([p[0] for p in parts])
        yield xb, [heads.base_of(xb) for heads in model.parts.values()], torch.stack([p[1] for p in parts])


def _build_result(
    tracker: _BestTracker, heads: BatchedHeads, config: SweepParams, num_classes: int, budget: Budget
) -> SweepResult:
    lrs = np.asarray(config.learning_rates, dtype=float)
    pv, iv = tracker.val["probe"].cpu().numpy(), tracker.val["interp"].cpu().numpy()
    sel_p = select_lr(pv, lrs)  # (S,)
    sel_i = select_lr(iv, lrs)  # (P, S)
    table = _head_table(tracker, config)
    selected = _selected_table(tracker, config, sel_p, sel_i)
    tc_p = tracker.test_correct["probe"].cpu().numpy()
    tc_i = tracker.test_correct["interp"].cpu().numpy()
    s_idx = np.arange(len(config.seeds))
    probe_tc = tc_p[s_idx, sel_p]  # (S, N)
    interp_tc = np.stack([tc_i[p, s_idx, sel_i[p]] for p in range(len(config.sparsities))], axis=1)
    test_correct = np.concatenate([probe_tc[:, None], interp_tc], axis=1)
    state = _selected_state(tracker.params, sel_p, sel_i)
    half_correct = None
    if tracker.half is not None and "test_correct" in tracker.half:  # the heads selected at half the budget
        hv = tracker.half["val"]
        hp_sel = select_lr(hv["probe"].cpu().numpy(), lrs)
        hi_sel = select_lr(hv["interp"].cpu().numpy(), lrs)
        htc_p = tracker.half["test_correct"]["probe"].cpu().numpy()
        htc_i = tracker.half["test_correct"]["interp"].cpu().numpy()
        half_correct = np.concatenate(
            [htc_p[s_idx, hp_sel][:, None],
             np.stack([htc_i[p, s_idx, hi_sel[p]] for p in range(len(config.sparsities))], axis=1)],
            axis=1,
        ).astype(bool)
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
        half_budget_correct=half_correct,
    )


def _head_index(config: SweepParams, head: HeadKind) -> pd.DataFrame:
    """Seed/sparsity/lr columns in the flattened order of the stacked head tensors."""
    seeds, lrs = list(config.seeds), list(config.learning_rates)
    if head == "probe":
        grid = [(s, np.nan, lr) for s in seeds for lr in lrs]
    else:
        grid = [(s, sp, lr) for sp in config.sparsities for s in seeds for lr in lrs]
    df = pd.DataFrame(grid, columns=["seed", "sparsity", "lr"])
    df.insert(0, "head", head)
    return df


def _head_table(tracker: _BestTracker, config: SweepParams) -> pd.DataFrame:
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
    tracker: _BestTracker, config: SweepParams, sel_p: np.ndarray, sel_i: np.ndarray
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


def _history_table(tracker: _BestTracker, config: SweepParams) -> pd.DataFrame:
    parts = []
    for epoch, rec in enumerate(tracker.history, start=1):
        for head in ("probe", "interp"):
            df = _head_index(config, head)
            df["epoch"] = epoch
            df["val_acc"] = rec[f"{head}.val"].reshape(-1).numpy().astype(float)
            parts.append(df)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

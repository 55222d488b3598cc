"""Benchmark: the batched sweep against training the same heads one after another.

Synthetic but learnable features (Gaussian class means plus noise), K classes, M random
unit concept vectors. Times

  (a) ``sweep``: probe + every sparsity ratio x every learning rate, trained together;
  (b) the baseline: the same heads trained one after another with ``train_single_head``
      (plain nn.Module + torch.optim.Adam + ExponentialLR), in the same process;

the batched sweep twice: cold (first thing in the process, numba import and kernel load
included) and warm (after tiny runs of both methods, as the baseline), and prints the times, the speed-up and the largest |test accuracy difference| over the
heads (each head at its own best-val epoch). Targets: speed-up >= 10x, difference <= 1
point. ``torch.set_num_threads`` is left at its default.

The float-noise floor (``--floor-runs``, default 2): the baseline is trained again, first
unchanged on one torch thread instead of the default (its BLAS sums run in another order),
then with every initial parameter nudged by one ulp (a seeded random direction per entry, a
change of ~1e-7 relative, the size of a rounding difference). Heads whose selected epoch sits on a flat val
curve move by more than a point under such a nudge in the baseline itself, so no
implementation that is not bit-for-bit the baseline can match those heads to 1 point. The
script prints, per head, the baseline's own spread over the nudged runs, and counts the
heads whose batched result is within 1 point of the baseline or inside the baseline's own
range (widened by 1 point).

Usage::

    PYTHONPATH=src python scripts/bench_sweep.py            # 10k/2k/2k x 1280, M=200, batch 1024 x 30 epochs
    PYTHONPATH=src python scripts/bench_sweep.py --small    # 1.2k/400/400 x 1280, M=200, the default budget
                                                            # (4,000 steps: batch 75 x 250 epochs)
    PYTHONPATH=src python scripts/bench_sweep.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iis_study.core.heads import batched as heads_batched
from iis_study.core.heads import reference as heads_reference
from iis_study.core.heads import ConceptSpace, Split, SweepParams, sweep, train_single_head

logger = logging.getLogger("bench_sweep")


@dataclass(frozen=True)
class Sizes:
    n_train: int
    n_val: int
    n_test: int
    dim: int
    classes: int
    concepts: int
    epochs: int
    budget_rule: bool = False  # True: the default budget rule (steps, min batches per epoch); False: batch 1024 x epochs


FULL = Sizes(n_train=10_000, n_val=2_000, n_test=2_000, dim=1280, classes=10, concepts=200, epochs=30)
SMALL = Sizes(n_train=1_200, n_val=400, n_test=400, dim=1280, classes=10, concepts=200, epochs=30, budget_rule=True)
QUICK = Sizes(n_train=2_000, n_val=500, n_test=500, dim=256, classes=10, concepts=50, epochs=5)


def make_data(sizes: Sizes, seed: int = 0, concepts: str = "random") -> tuple[Split, Split, Split, torch.Tensor]:
    """Gaussian blobs in ``dim`` dimensions (learnable, not separable) and unit concept vectors:
    ``random`` directions, or ``prototype``: embeddings of M held-out samples (as METHOD's
    prototype concepts are embeddings of image parts)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(sizes.classes, sizes.dim, generator=g) * 0.12

    def split(n: int) -> Split:
        y = torch.randint(0, sizes.classes, (n,), generator=g)
        return Split(means[y] + torch.randn(n, sizes.dim, generator=g), y)

    random_dirs = F.normalize(torch.randn(sizes.concepts, sizes.dim, generator=g), dim=1)
    train, val, test = split(sizes.n_train), split(sizes.n_val), split(sizes.n_test)
    if concepts == "prototype":
        return train, val, test, F.normalize(split(sizes.concepts).x, dim=1)
    return train, val, test, random_dirs


HeadKey = tuple  # (head, seed, sparsity or None, lr)
_POINT = 0.01 + 1e-9  # one accuracy point, with room for float rounding of the accuracies


@dataclass
class HeadRun:
    """Per-epoch val accuracy of one head, its best (by val) epoch and the test accuracy there."""

    val_curve: np.ndarray
    best_epoch: int
    test_acc: float


def run_batched(
    data, concepts: ConceptSpace, cfg: SweepParams, classes: int, table_csv: str | None = None
) -> tuple[float, dict[HeadKey, HeadRun]]:
    train, val, test = data
    t0 = time.perf_counter()
    result = sweep(train, val, test, concepts, classes, cfg, progress=False)
    elapsed = time.perf_counter() - t0
    if table_csv:
        result.table.to_csv(table_csv, index=False)
    runs = {}
    hist = result.history
    for row in result.table.itertuples():
        sp = None if np.isnan(row.sparsity) else float(row.sparsity)
        sel = (hist["head"] == row.head) & (hist["seed"] == row.seed) & np.isclose(hist["lr"], row.lr)
        sel &= hist["sparsity"].isna() if sp is None else np.isclose(hist["sparsity"], sp)
        h = hist[sel].sort_values("epoch")
        runs[(row.head, row.seed, sp, float(row.lr))] = HeadRun(
            h["val_acc"].to_numpy(), int(row.best_epoch), float(row.test_acc)
        )
    return elapsed, runs


def run_baseline(
    data, concepts: ConceptSpace, cfg: SweepParams, classes: int
) -> tuple[float, dict[HeadKey, HeadRun]]:
    train, val, test = data
    heads = [("probe", s, None, lr) for s in cfg.seeds for lr in cfg.learning_rates]
    heads += [("interp", s, sp, lr) for s in cfg.seeds for sp in cfg.sparsities for lr in cfg.learning_rates]
    runs = {}
    t0 = time.perf_counter()
    for i, (head, seed, sp, lr) in enumerate(heads, start=1):
        t_head = time.perf_counter()
        res = train_single_head(
            train, val, test, concepts, classes, head=head, seed=seed, lr=lr, sparsity=sp, config=cfg
        )
        runs[(head, seed, sp, float(lr))] = HeadRun(res.val_curve, res.best_epoch, res.test_acc)
        logger.info(
            "baseline head %d/%d (%s, s=%s, lr=%g): %.2f s",
            i,
            len(heads),
            head,
            sp,
            lr,
            time.perf_counter() - t_head,
        )
    return time.perf_counter() - t0, runs


@contextlib.contextmanager
def nudged_init(seed: int) -> Iterator[None]:
    """Within the block, every head's initial parameters are moved by one ulp (``nextafter``
    towards +inf or -inf, a seeded random choice per entry): a perturbation of the size of
    one rounding difference."""
    original = heads_batched.init_head
    # init_head is looked up where it is called: by the batched heads and by the reference
    users = (heads_batched, heads_reference)

    def init(*args, **kwargs):
        out = original(*args, **kwargs)
        gen = torch.Generator().manual_seed(seed)
        nudged = {}
        for name, t in out.items():
            up = torch.randint(0, 2, t.shape, generator=gen).bool()
            nudged[name] = torch.nextafter(t, torch.where(up, torch.inf, -torch.inf).to(t.dtype))
        return nudged

    for module in users:
        module.init_head = init
    try:
        yield
    finally:
        for module in users:
            module.init_head = original


def report_floor(
    batched: dict[HeadKey, HeadRun], base: dict[HeadKey, HeadRun], nudged: list[dict[HeadKey, HeadRun]]
) -> None:
    """Print the baseline's own spread under one-ulp nudges and where the batched heads fall."""
    spread, inside, within = [], 0, 0
    for key, ref in base.items():
        outcomes = [ref.test_acc] + [run[key].test_acc for run in nudged]
        lo, hi = min(outcomes), max(outcomes)
        spread.append(hi - lo)
        b = batched[key].test_acc
        within += abs(b - ref.test_acc) <= _POINT
        inside += lo - _POINT <= b <= hi + _POINT  # the baseline's own outcome is in [lo, hi]
        if hi - lo > 0.01 or abs(b - ref.test_acc) > 0.01:
            logger.info(
                "  %s: baseline %.4f, re-runs %s, batched %.4f",
                key,
                ref.test_acc,
                ", ".join(f"{run[key].test_acc:.4f}" for run in nudged),
                b,
            )
    spread = np.asarray(spread)
    n = len(spread)
    print(f"{'baseline own spread [pt]':<28}{100 * spread.max():>10.3f}   (max over heads, baseline + {len(nudged)} re-runs: 1 thread / one-ulp nudges)")
    print(f"{'heads nudge-sensitive > 1pt':<28}{int((spread > _POINT).sum()):>7d}/{n}")
    print(f"{'batched within 1 pt':<28}{within:>7d}/{n}")
    print(f"{'... or in baseline range':<28}{inside:>7d}/{n}   (within 1 pt of the range of the baseline's own outcomes)")


def report_agreement(batched: dict[HeadKey, HeadRun], base: dict[HeadKey, HeadRun]) -> np.ndarray:
    """Print how far the two runs agree; returns |test acc difference| per head."""
    diffs, first_div = [], []
    for key, ref in base.items():
        b = batched[key]
        diffs.append(abs(b.test_acc - ref.test_acc))
        differ = np.flatnonzero(b.val_curve != ref.val_curve)
        first_div.append(int(differ[0]) + 1 if differ.size else None)
        if differ.size or b.best_epoch != ref.best_epoch:
            logger.info(
                "  differs: %s  curves first differ at epoch %s; best epoch %d vs %d; test acc %.4f vs %.4f",
                key,
                first_div[-1],
                b.best_epoch,
                ref.best_epoch,
                b.test_acc,
                ref.test_acc,
            )
    n_same = sum(f is None for f in first_div)
    print(f"{'identical val curves':<28}{n_same:>7d}/{len(first_div)}")
    return np.asarray(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--small", action="store_true",
                        help="a default-study-sized problem (N_train = 1,200) at the default budget rule")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--skip-baseline", action="store_true", help="time only the batched sweep")
    parser.add_argument(
        "--floor-runs", type=int, default=2,
        help="baseline re-runs for the float-noise floor: 1 thread, then one-ulp nudged initial parameters (0: skip)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for both runs (default cpu)")
    parser.add_argument("--table-csv", default=None, help="write the batched sweep's per-head table here")
    parser.add_argument(
        "--concepts", default="random", choices=["random", "prototype"],
        help="concept vectors: random unit directions (default) or embeddings of held-out samples",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sizes = QUICK if args.quick else SMALL if args.small else FULL
    epochs = args.epochs or sizes.epochs
    # budget_rule: SweepParams's defaults (at least 4,000 steps, >= 16 batches per epoch); otherwise
    # exactly batch 1024 x `epochs` (steps=1 and one batch per epoch are always met)
    rule = {} if sizes.budget_rule else {"steps": 1, "min_batches_per_epoch": 1}
    cfg = SweepParams(seeds=tuple(range(args.seeds)), epochs=epochs, batch_size=1024, device=args.device, **rule)
    budget = cfg.plan(sizes.n_train)
    train, val, test, vectors = make_data(sizes, concepts=args.concepts)
    concepts = ConceptSpace("vectors", vectors=vectors)
    data = (train, val, test)
    n_heads = len(cfg.seeds) * len(cfg.learning_rates) * (1 + len(cfg.sparsities))
    logger.info(
        "N_train=%d N_val=%d N_test=%d D=%d K=%d M=%d epochs=%d batch=%d steps=%d seeds=%d heads=%d "
        "device=%s torch threads=%d",
        sizes.n_train,
        sizes.n_val,
        sizes.n_test,
        sizes.dim,
        sizes.classes,
        sizes.concepts,
        budget.epochs,
        budget.batch_size,
        budget.steps,
        len(cfg.seeds),
        n_heads,
        args.device,
        torch.get_num_threads(),
    )

    # cold: the batched sweep first in this process, so its time includes importing numba and
    # loading the cached fused kernels (what a Kedro run pays once for all its sweeps); then a
    # tiny run of both methods and both timed warm
    t_cold, cold = run_batched(data, concepts, cfg, sizes.classes)
    tiny = make_data(QUICK)
    tiny_cfg = SweepParams(seeds=(0,), epochs=1, batch_size=256, device=args.device, steps=1, min_batches_per_epoch=1)
    sweep(*tiny[:3], ConceptSpace("vectors", vectors=tiny[3]), QUICK.classes, tiny_cfg, progress=False)
    train_single_head(
        *tiny[:3], ConceptSpace("vectors", vectors=tiny[3]), QUICK.classes,
        head="interp", seed=0, lr=1e-2, sparsity=0.5, config=tiny_cfg,
    )
    t_batched, batched = run_batched(data, concepts, cfg, sizes.classes, args.table_csv)
    same = all(
        np.array_equal(cold[k].val_curve, batched[k].val_curve) and cold[k].test_acc == batched[k].test_acc
        for k in batched
    )
    print(f"{'method':<28}{'time [s]':>10}")
    print(f"{'batched sweep, cold':<28}{t_cold:>10.2f}   (first in the process: numba import + kernel load included)")
    print(f"{'batched sweep, warm':<28}{t_batched:>10.2f}   (curves {'identical to' if same else 'DIFFERENT from'} the cold run)")
    if args.skip_baseline:
        return
    t_base, base = run_baseline(data, concepts, cfg, sizes.classes)
    print(f"{'one head at a time':<28}{t_base:>10.2f}")
    print(f"{'speed-up, cold':<28}{t_base / t_cold:>9.1f}x")
    print(f"{'speed-up, warm':<28}{t_base / t_batched:>9.1f}x")
    diffs = report_agreement(batched, base)
    print(f"{'max |test acc diff| [pt]':<28}{100 * diffs.max():>10.3f}")
    print(f"{'mean |test acc diff| [pt]':<28}{100 * diffs.mean():>10.3f}")
    print(f"{'heads with any difference':<28}{int((diffs > 0).sum()):>7d}/{len(diffs)}")
    probe = [r.test_acc for k, r in batched.items() if k[0] == "probe"]
    interp = {k[2]: r.test_acc for k, r in batched.items() if k[0] == "interp" and k[3] == 1e-2}
    print(
        f"(sanity: probe test acc {min(probe):.3f}-{max(probe):.3f}; interp @lr=1e-2 by s: "
        + ", ".join(f"{s:g}:{a:.3f}" for s, a in sorted(interp.items()))
        + ")"
    )
    nudged = []
    for i in range(args.floor_runs):
        with floor_variant(i):
            nudged.append(run_baseline(data, concepts, cfg, sizes.classes)[1])
    if nudged:
        report_floor(batched, base, nudged)


@contextlib.contextmanager
def floor_variant(i: int) -> Iterator[None]:
    """The ``i``-th re-run of the baseline for the noise floor: first the same code on one
    torch thread (BLAS sums in another order), then one-ulp nudges of the initial parameters."""
    if i == 0:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
        return
    with nudged_init(seed=1000 + i):
        yield


if __name__ == "__main__":
    main()

"""Benchmark: the batched sweep against training the same heads one after another.

Synthetic but learnable features (Gaussian class means plus noise), K classes, M random
unit concept vectors. Times

  (a) ``sweep``: probe + every sparsity ratio x every learning rate, trained together;
  (b) the baseline: the same heads trained one after another with ``train_single_head``
      (plain nn.Module + torch.optim.Adam + ExponentialLR), in the same process;

and prints both times, the speed-up and the largest |test accuracy difference| over the
heads (each head at its own best-val epoch). Targets: speed-up >= 10x, difference <= 1
point. ``torch.set_num_threads`` is left at its default.

Usage::

    PYTHONPATH=src python scripts/bench_sweep.py            # 10k/2k/2k x 1280, M=200, 30 epochs
    PYTHONPATH=src python scripts/bench_sweep.py --quick    # small sizes, a few seconds
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from iis_study.core.heads import ConceptSpace, Split, SweepConfig, sweep, train_single_head

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


FULL = Sizes(n_train=10_000, n_val=2_000, n_test=2_000, dim=1280, classes=10, concepts=200, epochs=30)
QUICK = Sizes(n_train=2_000, n_val=500, n_test=500, dim=256, classes=10, concepts=50, epochs=5)


def make_data(sizes: Sizes, seed: int = 0) -> tuple[Split, Split, Split, torch.Tensor]:
    """Gaussian blobs in ``dim`` dimensions (learnable, not separable) and unit concept vectors."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(sizes.classes, sizes.dim, generator=g) * 0.12

    def split(n: int) -> Split:
        y = torch.randint(0, sizes.classes, (n,), generator=g)
        return Split(means[y] + torch.randn(n, sizes.dim, generator=g), y)

    concepts = F.normalize(torch.randn(sizes.concepts, sizes.dim, generator=g), dim=1)
    return split(sizes.n_train), split(sizes.n_val), split(sizes.n_test), concepts


def run_batched(data, concepts: ConceptSpace, cfg: SweepConfig, classes: int) -> tuple[float, dict]:
    train, val, test = data
    t0 = time.perf_counter()
    result = sweep(train, val, test, concepts, classes, cfg, progress=False)
    elapsed = time.perf_counter() - t0
    accs = {}
    for row in result.table.itertuples():
        sp = None if np.isnan(row.sparsity) else float(row.sparsity)
        accs[(row.head, row.seed, sp, float(row.lr))] = float(row.test_acc)
    return elapsed, accs


def run_baseline(data, concepts: ConceptSpace, cfg: SweepConfig, classes: int) -> tuple[float, dict]:
    train, val, test = data
    heads = [("probe", s, None, lr) for s in cfg.seeds for lr in cfg.learning_rates]
    heads += [("interp", s, sp, lr) for s in cfg.seeds for sp in cfg.sparsities for lr in cfg.learning_rates]
    accs = {}
    t0 = time.perf_counter()
    for head, seed, sp, lr in heads:
        res = train_single_head(
            train, val, test, concepts, classes, head=head, seed=seed, lr=lr, sparsity=sp, config=cfg
        )
        accs[(head, seed, sp, float(lr))] = res.test_acc
    return time.perf_counter() - t0, accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast check")
    parser.add_argument("--seeds", type=int, default=1, help="number of seeds (default 1)")
    parser.add_argument("--epochs", type=int, default=None, help="override the number of epochs")
    parser.add_argument("--skip-baseline", action="store_true", help="time only the batched sweep")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sizes = QUICK if args.quick else FULL
    epochs = args.epochs or sizes.epochs
    cfg = SweepConfig(seeds=tuple(range(args.seeds)), epochs=epochs, batch_size=1024)
    train, val, test, vectors = make_data(sizes)
    concepts = ConceptSpace("vectors", vectors=vectors)
    data = (train, val, test)
    n_heads = len(cfg.seeds) * len(cfg.learning_rates) * (1 + len(cfg.sparsities))
    logger.info(
        "N_train=%d N_val=%d N_test=%d D=%d K=%d M=%d epochs=%d batch=%d seeds=%d heads=%d torch threads=%d",
        sizes.n_train, sizes.n_val, sizes.n_test, sizes.dim, sizes.classes, sizes.concepts,
        epochs, cfg.batch_size, len(cfg.seeds), n_heads, torch.get_num_threads(),
    )

    t_batched, acc_batched = run_batched(data, concepts, cfg, sizes.classes)
    print(f"{'method':<28}{'time [s]':>10}")
    print(f"{'batched sweep':<28}{t_batched:>10.2f}")
    if args.skip_baseline:
        return
    t_base, acc_base = run_baseline(data, concepts, cfg, sizes.classes)
    diffs = np.array([abs(acc_batched[k] - acc_base[k]) for k in acc_base])
    print(f"{'one head at a time':<28}{t_base:>10.2f}")
    print(f"{'speed-up':<28}{t_base / t_batched:>9.1f}x")
    print(f"{'max |test acc diff| [pt]':<28}{100 * diffs.max():>10.3f}")
    print(f"{'heads with any difference':<28}{int((diffs > 0).sum()):>7d}/{len(diffs)}")
    probe = [v for k, v in acc_batched.items() if k[0] == "probe"]
    interp = {k[2]: v for k, v in acc_batched.items() if k[0] == "interp" and k[3] == 1e-2}
    print(f"(sanity: probe test acc {min(probe):.3f}-{max(probe):.3f}; interp @lr=1e-2 by s: "
          + ", ".join(f"{s:g}:{a:.3f}" for s, a in sorted(interp.items())) + ")")


if __name__ == "__main__":
    main()

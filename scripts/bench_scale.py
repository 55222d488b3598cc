"""Scale benchmark: sweep time and peak memory against the number of training samples.

For each N (default 10k, 50k, 200k) synthetic 1280-d features of K = 100 classes are written
as a sharded store (``iis_study.core.representations.store``), then a fresh process runs the batched sweep
(probe + 8 sparsities x 3 learning rates, M = 200 concept vectors) streaming the shards, and
reports its wall time and peak resident memory (``ru_maxrss``). With ``--in-memory`` the same
sweep also runs with the features loaded into memory, for contrast.

Val and test stay at a fixed size (2,000 each), so only the training set grows. Expect time to
grow about linearly in N and the streaming run's peak RSS to stay flat.

Usage::

    PYTHONPATH=src python scripts/bench_scale.py                # N = 10k, 50k, 200k; 1 epoch
    PYTHONPATH=src python scripts/bench_scale.py --n 2000 8000 --epochs 1 --in-memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIM, CLASSES, CONCEPTS, N_EVAL = 1280, 100, 200, 2000


def _generate(root: Path, n: int, seed: int, shard_rows: int, dtype: str) -> None:
    """Write ``n`` rows of Gaussian-blob features (and labels) shard by shard."""
    import numpy as np
    import torch

    from iis_study.core.representations.store import ShardWriter

    g = torch.Generator().manual_seed(1234)
    means = torch.randn(CLASSES, DIM, generator=g) * 0.15
    g.manual_seed(seed)
    w = ShardWriter(root, DIM, dtype=dtype, shard_rows=shard_rows, resume=False)
    labels = []
    for start in range(0, n, 8192):
        m = min(8192, n - start)
        y = torch.randint(0, CLASSES, (m,), generator=g)
        w.append(means[y] + torch.randn(m, DIM, generator=g))
        labels.append(y.numpy())
    w.close()
    np.save(root / "labels.npy", np.concatenate(labels))


def _run_sweep(data: Path, epochs: int, in_memory: bool) -> dict:
    import resource

    import numpy as np
    import torch
    import torch.nn.functional as F

    from iis_study.core.heads import ConceptSpace, Split, SweepParams, sweep
    from iis_study.core.representations.store import ShardedArray

    def split(name: str) -> Split:
        x = ShardedArray(data / name)
        y = torch.from_numpy(np.load(data / name / "labels.npy")).long()
        return Split(x.to_tensor() if in_memory else x, y)

    train, val, test = split("train"), split("val"), split("test")
    g = torch.Generator().manual_seed(7)
    # prototype-like concepts: embeddings of random val samples
    vectors = F.normalize(val.x[torch.randperm(len(val.y), generator=g)[:CONCEPTS]], dim=1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = SweepParams(seeds=(0,), epochs=epochs, batch_size=1024)
    t0 = time.perf_counter()
    result = sweep(train, val, test, ConceptSpace("vectors", vectors=vectors), CLASSES, cfg, progress=False)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe = result.table[result.table["head"] == "probe"]["test_acc"].max()
    return {"time_s": elapsed, "peak_rss_mb": peak, "rss_before_mb": rss_before, "probe_test_acc": float(probe)}


def _child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--shard-rows", type=int, default=16_384)
    parser.add_argument("--storage-dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--in-memory", action="store_true", help="also run with the features in memory")
    parser.add_argument("--workdir", default=None, help="where to write the synthetic stores (default: a temp dir)")
    parser.add_argument("--_generate", nargs=3, metavar=("ROOT", "N", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--_sweep", nargs=3, metavar=("DATA", "EPOCHS", "MEM"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._generate:
        root, n, seed = args._generate
        _generate(Path(root), int(n), int(seed), args.shard_rows, args.storage_dtype)
        print(json.dumps({"ok": True}))
        return
    if args._sweep:
        data, epochs, mem = args._sweep
        print(json.dumps(_run_sweep(Path(data), int(epochs), mem == "1")))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="iis-bench-scale-"))
    common = ["--shard-rows", str(args.shard_rows), "--storage-dtype", args.storage_dtype]
    rows = []
    for n in args.n:
        data = work / f"n{n}"
        for name, size, seed in (("train", n, 1), ("val", N_EVAL, 2), ("test", N_EVAL, 3)):
            if not (data / name / "manifest.json").is_file():
                _child([*common, "--_generate", str(data / name), str(size), str(seed)])
        modes = [("streamed", "0")] + ([("in memory", "1")] if args.in_memory else [])
        for label, mem in modes:
            r = _child([*common, "--_sweep", str(data), str(args.epochs), mem])
            rows.append({"n": n, "mode": label, **r})
            print(
                f"N={n:>7d} {label:<10} time {r['time_s']:7.1f} s  peak RSS {r['peak_rss_mb']:7.0f} MB "
                f"(before sweep {r['rss_before_mb']:.0f} MB)  probe test acc {r['probe_test_acc']:.3f}",
                flush=True,
            )
    print()
    print(f"sweep: probe + 8 sparsities x 3 lrs, 1 seed, M={CONCEPTS}, K={CLASSES}, D={DIM}, epochs={args.epochs}, "
          f"batch 1024, shards of {args.shard_rows} rows ({args.storage_dtype}), val/test {N_EVAL} each")
    print(f"{'N':>8} {'mode':<10} {'time [s]':>9} {'peak RSS [MB]':>14}")
    for r in rows:
        print(f"{r['n']:>8d} {r['mode']:<10} {r['time_s']:>9.1f} {r['peak_rss_mb']:>14.0f}")
    for label in dict.fromkeys(r["mode"] for r in rows):
        sub = [r for r in rows if r["mode"] == label]
        if len(sub) > 1:
            lo, hi = sub[0], sub[-1]
            print(
                f"{label}: N x{hi['n'] / lo['n']:.0f} -> time x{hi['time_s'] / lo['time_s']:.2f}, "
                f"peak RSS x{hi['peak_rss_mb'] / lo['peak_rss_mb']:.2f}"
            )
    print(f"(stores kept in {work})" if args.workdir else "")


if __name__ == "__main__":
    main()

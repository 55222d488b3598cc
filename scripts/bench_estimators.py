"""Benchmark: the convex estimator against the Adam sweep on the same features and concepts.

Both estimators fit every head of one representation for both concept types (prototype and
cluster) and the probe, as the interpretability pipeline does (``fit_heads``), one after the other in
the same process, and the script prints each one's time, the ratio, and both IIS per concept type.
Target (issue 22): the convex estimator at least 10x faster on the default study's sweep (N = 1,079).

By default it reads the default study's cached features and concepts (``make run`` first); with
``--synthetic`` (or when they are absent) it uses Gaussian class clusters of the same shape
(1,079 / 359 / 359 x 1,280, K = 10, M = 200).

Usage::

    PYTHONPATH=src python scripts/bench_estimators.py                 # lite0 of the default study
    PYTHONPATH=src python scripts/bench_estimators.py --backbone lite2
    PYTHONPATH=src python scripts/bench_estimators.py --synthetic
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from iis_study.core.heads import ConceptSpace, HeadsProblem, Split, SweepParams, fit_heads
from iis_study.core.scoring.scores import score_sweep

ROOT = Path(__file__).resolve().parents[1]


def study_inputs(backbone: str):
    from iis_study.datasets import TensorDictDataset

    feats = ROOT / "data" / "04_feature" / backbone / "features.safetensors"
    paths = {c: ROOT / "data" / "05_model_input" / backbone / f"concepts_{c}.safetensors" for c in ("prototype", "cluster")}
    if not feats.is_file() or not all(p.is_file() for p in paths.values()):
        return None
    fs = TensorDictDataset(filepath=str(feats), object="iis_study.core.representations.features.FeatureSet").load()
    concepts = {
        c: TensorDictDataset(filepath=str(p), object="iis_study.core.concepts.acquisition.ConceptSet").load().space
        for c, p in paths.items()
    }
    splits = {s: Split(fs.split(s).x.float(), fs.split(s).y.long()) for s in ("train", "val", "test")}
    return splits, concepts, int(max(int(s.y.max()) for s in splits.values())) + 1


def study_sets(backbone: str):
    """``(splits, concepts, draws, k)``: :func:`study_inputs` and the study's concept draws and null sets as
    concept spaces (name -> space); exits asking for ``make run`` when the study's files are absent."""
    from iis_study.datasets import TensorDictDataset

    inputs = study_inputs(backbone)
    path = ROOT / "data" / "05_model_input" / backbone / "concept_draws.safetensors"
    if inputs is None or not path.is_file():
        raise SystemExit("run `make run` first: this benchmark reads the default study's cached features and concepts")
    splits, concepts, k = inputs
    draws = TensorDictDataset(filepath=str(path), object="iis_study.core.concepts.nulls.ConceptDraws").load()
    return splits, concepts, {n: ConceptSpace(kind="vectors", vectors=v) for n, v in draws.vectors.items()}, k


def _synthetic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    k, d, m = 10, 1280, 200
    means = torch.randn(k, d, generator=g) / d**0.25

    def split(n: int) -> Split:
        y = torch.arange(n) % k
        return Split(means[y] + torch.randn(n, d, generator=g) / d**0.5 * 4, y)

    splits = {"train": split(1079), "val": split(359), "test": split(359)}
    concepts = {
        c: ConceptSpace("vectors", vectors=torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1))
        for c in ("prototype", "cluster")
    }
    return splits, concepts, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="lite0")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="also the convex estimator with the grid cut at C = 10 and with the L2 path rule")
    args = ap.parse_args()
    inputs = None if args.synthetic else study_inputs(args.backbone)
    source = f"default study, {args.backbone}" if inputs is not None else "synthetic (same shape)"
    splits, concepts, k = inputs if inputs is not None else _synthetic()
    base = SweepParams()
    import logging

    logging.disable(logging.WARNING)  # the warm-up's heads are uncertified on purpose
    fit_heads(HeadsProblem(*(Split(s.x[:64], s.y[:64]) for s in splits.values()), concepts, k),
              replace(base, max_iter=2), progress=False)  # warm-up: imports, thread pools
    logging.disable(logging.NOTSET)
    times, scores = {}, {}
    runs = {"convex": replace(base, estimator="convex"), "adam": replace(base, estimator="adam")}
    if args.variants:
        runs = {"convex": runs["convex"], "convex, C <= 10": replace(base, l2_grid=(0.1, 1.0, 10.0)),
                "convex, l2_path": replace(base, l2_path=True), "adam": runs["adam"]}
    for estimator, cfg in runs.items():
        start = time.perf_counter()
        results = fit_heads(HeadsProblem(splits["train"], splits["val"], splits["test"], concepts, k), cfg, progress=False)
        times[estimator] = time.perf_counter() - start
        scores[estimator] = {c: score_sweep(r, n_boot=10)[0]["iis"] for c, r in results.items()}
        extra = ""
        if cfg.estimator == "convex":
            certs = {c: r.certificate for c, r in results.items()}
            extra = ", ".join(f"{c}: certified {cert.certified}, {cert.iterations} it." for c, cert in certs.items())
        print(f"{estimator:>16}: {times[estimator]:7.2f} s  IIS " +
              ", ".join(f"{c} {v:.4f}" for c, v in scores[estimator].items()) + (f"  ({extra})" if extra else ""))
    n = splits["train"].x.shape[0]
    print(f"{source}: N = {n}, {len(base.sparsities)} sparsities, 2 concept types; convex grid C = {base.l2_grid}, "
          f"tolerance {base.tolerance:g}; adam {len(base.learning_rates)} lr x {len(base.seeds)} seeds, "
          f"{base.steps} steps")
    for name in times:
        if name != "adam":
            print(f"speed-up (adam / {name}): {times['adam'] / times[name]:.1f}x")


if __name__ == "__main__":
    main()

"""Measure how IIS, the probe and the convergence record move with the sweep budget (docs/convergence.md).

Runs the study's sweep on an existing run's cached features and concepts (run `make run` first), for
each representation and budget, and prints one row per (representation, budget):

    .venv/bin/python scripts/convergence_budget.py --reps lite0,lite0_stage1 --steps 500,1000,2000,4000
"""

from __future__ import annotations

import argparse
import time

from iis_study.core.scoring.convergence import convergence_report, reference_probe
from iis_study.core.heads import Split, SweepParams, sweep
from iis_study.core.scoring.scores import score_sweep
from iis_study.datasets import TensorDictDataset
from iis_study.core.concepts.acquisition import ConceptSet
from iis_study.core.representations.features import FeatureSet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data")
    ap.add_argument("--reps", default="lite0,lite0_stage1,lite0_random")
    ap.add_argument("--steps", default="500,1000,2000,4000")
    ap.add_argument("--concepts", default="prototype")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--min-batches", default="16", help="sweep.min_batches_per_epoch values (fewer: larger batches)")
    args = ap.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    print("| representation | steps | batch | probe acc (test) | probe val | reference val | IIS | "
          "probe converged | heads flat (max gain, pt) | time |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rep in args.reps.split(","):
        f = FeatureSet.from_tensors(TensorDictDataset(f"{args.data}/04_feature/{rep}/features.safetensors").load())
        c = ConceptSet.from_tensors(
            TensorDictDataset(f"{args.data}/05_model_input/{rep}/concepts_{args.concepts}.safetensors").load()
        )
        sp = {s: Split(f.split(s).x, f.split(s).y) for s in ("train", "val", "test")}
        ref = reference_probe(*((sp[s].x, sp[s].y) for s in ("train", "val", "test")), num_classes=int(sp["train"].y.max()) + 1)
        budgets = [(int(s), int(b)) for b in args.min_batches.split(",") for s in args.steps.split(",")]
        for steps, min_batches in budgets:
            t = time.time()
            cfg = SweepParams(steps=steps, seeds=seeds, min_batches_per_epoch=min_batches)
            r = sweep(sp["train"], sp["val"], sp["test"], c.space, int(sp["train"].y.max()) + 1,
                      cfg, progress=False)
            dt = time.time() - t
            sc, _ = score_sweep(r)
            cv = convergence_report(r.selected, r.history, ref.to_dict())
            print(f"| {rep} | {r.budget.steps} | {r.budget.batch_size} | {sc['accuracy_linear_probe']:.3f} | "
                  f"{cv['probe_val_acc']:.3f} | {cv['reference_val_acc']:.3f} | {sc['iis']:.3f} | "
                  f"{'yes' if cv['probe_converged'] else 'no'} | {'yes' if cv['heads_converged'] else 'no'} "
                  f"({100 * cv['max_gain_selected']:+.1f}) | {dt:.0f} s |", flush=True)


if __name__ == "__main__":
    main()

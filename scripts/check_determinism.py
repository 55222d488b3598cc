"""The convex IIS on one and on two threads, per representation of a finished study (issue 22).

Reads each representation's cached features and concepts (``make run`` or ``kedro run --env ENV``
first), fits every head with the study's ``sweep`` settings under ``torch.set_num_threads(1)`` and
``(2)``, and prints both IIS per representation and concept type with their largest difference.
Exit status 1 when any pair differs by more than 1e-6.

Usage::

    PYTHONPATH=src python scripts/check_determinism.py            # the default study
    PYTHONPATH=src python scripts/check_determinism.py --env cifar10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    from iis_study.core.concepts.blocks import ConceptParams
    from iis_study.core.heads.datatypes import sweep_config
    from iis_study.core.heads import Split, HeadsProblem, fit_heads
    from iis_study.core.scoring.scores import score_sweep
    from iis_study.datasets import TensorDictDataset
    from iis_study.study_config import backbone_names, study_parameters  # the env's merged parameters

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default=None)
    args = ap.parse_args()
    params = study_parameters(args.env)
    cfg = sweep_config(params.get("sweep"))
    types = ConceptParams.from_params(params.get("concepts")).types
    worst = 0.0
    for name in backbone_names(params):
        folder = ROOT / "data" / "04_feature" / name
        if not (folder / "features.safetensors").is_file():
            print(f"{name}: no cached features (run the study first)")
            continue
        fs = TensorDictDataset(filepath=str(folder / "features.safetensors"), object="iis_study.core.representations.features.FeatureSet").load()
        concepts = {
            t: TensorDictDataset(filepath=str(ROOT / "data" / "05_model_input" / name / f"concepts_{t}.safetensors"),
                                 object="iis_study.core.concepts.acquisition.ConceptSet").load().space
            for t in types
        }
        splits = [Split(fs.split(s).x, fs.split(s).y) for s in ("train", "val", "test")]
        k = int(max(int(s.y.max()) for s in splits)) + 1
        out = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = fit_heads(HeadsProblem(*splits, concepts, k), cfg, progress=False)
            out[threads] = {t: score_sweep(r, n_boot=1)[0]["iis"] for t, r in res.items()}
        for t in types:
            d = abs(out[1][t] - out[2][t])
            worst = max(worst, d)
            print(f"{name:>32} {t:>10}: IIS {out[1][t]:.6f} (1 thread)  {out[2][t]:.6f} (2 threads)  |diff| {d:.1e}")
    print(f"largest |difference|: {worst:.1e}")
    return int(worst > 1e-6)


if __name__ == "__main__":
    sys.exit(main())

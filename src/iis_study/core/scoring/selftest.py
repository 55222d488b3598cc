"""A self-test of the metric (docs/calibration.md): representations in which the share of class
information lying along the concept directions is a known knob.

Features live in R^D. The M concepts are the first M coordinate axes. Class ``k``'s mean is
``a · (sqrt(share) · e_k + sqrt(1 - share) · f_k)``: ``e_k`` is concept ``k``'s axis, ``f_k`` an axis no concept
sees; the noise is isotropic. Every pair of class means is the same distance apart at every share (the
configurations are rotations of one another), so the linear probe's accuracy does not depend on the share,
and neither does the distribution of anything measured with random directions (isotropic). The IIS with
the concepts must rise with the share; the random-direction null must not. A second control scores
concepts that are themselves random directions: their excess over the random null must be zero within
its interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from .calibration import calibrated_scores
from ..heads import ConceptSpace, HeadsProblem, Split, SweepParams, fit_heads
from ..concepts.nulls import random_directions


def synthetic_splits(
    share: float, classes: int = 10, dim: int = 64, m: int = 16, sizes: Sequence[int] = (600, 300, 600),
    separation: float = 2.2, seed: int = 0,
) -> dict[str, Split]:
    """Train / val / test features with ``share`` of each class mean along concept axes (module docstring)."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1], got {share}")
    if classes > m or m + classes > dim:
        raise ValueError("need classes <= m and m + classes <= dim")
    g = torch.Generator().manual_seed(int(seed))
    means = torch.zeros(classes, dim, dtype=torch.float64)
    idx = torch.arange(classes)
    means[idx, idx] = separation * math.sqrt(share)
    means[idx, m + idx] = separation * math.sqrt(1.0 - share)
    out = {}
    for name, n in zip(("train", "val", "test"), sizes, strict=True):
        y = torch.arange(n) % classes
        x = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
        out[name] = Split(x.float(), y)
    return out


def axis_concepts(m: int, dim: int) -> torch.Tensor:
    """The M concept directions: the first M coordinate axes."""
    return torch.eye(dim)[:m].contiguous()


def score_share(
    share: float, sweep: SweepParams, draws: int = 3, n_boot: int = 300, seed: int = 0, classes: int = 10,
    dim: int = 64, m: int = 16, sizes: Sequence[int] = (600, 300, 600),
) -> dict[str, float]:
    """IIS of the axis concepts and of random-direction concepts at one share, each beside the random null
    (``draws`` draws of the null; the axis concepts are the same at every draw), one batched solve."""
    splits = synthetic_splits(share, classes, dim, m, sizes, seed=seed)
    sets = {"concepts": ConceptSpace(kind="vectors", vectors=axis_concepts(m, dim))}
    for r in range(draws):
        rng = np.random.default_rng([seed, r, 99])
        sets[f"null/{r}"] = ConceptSpace(kind="vectors", vectors=random_directions(m, dim, rng))
        sets[f"random_concepts/{r}"] = ConceptSpace(
            kind="vectors", vectors=random_directions(m, dim, np.random.default_rng([seed, r, 7]))
        )
    res = fit_heads(HeadsProblem(splits["train"], splits["val"], splits["test"], sets, classes), sweep, progress=False)
    null = [res[f"null/{r}"].test_correct for r in range(draws)]
    real = calibrated_scores([res["concepts"].test_correct] * draws, {"random": null}, sweep.sparsities, n_boot, seed, 0.95)
    rand = calibrated_scores(
        [res[f"random_concepts/{r}"].test_correct for r in range(draws)], {"random": null}, sweep.sparsities, n_boot, seed, 0.95
    )
    certified = all(r.certificate is None or r.certificate.certified for r in res.values())
    return {
        "share": float(share),
        "probe_accuracy": float(res["concepts"].test_correct[0, 0].mean()),
        "iis": real["iis"],
        "iis_null_random": real["iis_null_random"],
        "excess": real["iis_excess_random"],
        "excess_ci_low": real["iis_excess_random_ci_low"],
        "excess_ci_high": real["iis_excess_random_ci_high"],
        "random_concepts_iis": rand["iis"],
        "random_concepts_excess": rand["iis_excess_random"],
        "random_concepts_excess_ci_low": rand["iis_excess_random_ci_low"],
        "random_concepts_excess_ci_high": rand["iis_excess_random_ci_high"],
        "certified": certified,
    }


def self_test(shares: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), sweep: SweepParams | None = None, **kwargs) -> pd.DataFrame:
    """One row per share (:func:`score_share`), on the default sweep grid with device ``cpu`` unless given."""
    sweep = sweep or replace(SweepParams(), device="cpu")
    return pd.DataFrame([score_share(s, sweep, **kwargs) for s in shares])

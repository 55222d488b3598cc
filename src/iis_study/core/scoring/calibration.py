"""A score beside its nulls, with every source of its uncertainty (docs/calibration.md).

Per concept type a representation has R concept draws (draw 0: the study's concepts) and, per null kind,
R null draws; each set's selected heads give a (seeds, 1 + P, N_test) array of right / wrong test
predictions (row 0 the probe, shared by all sets). From them:

* ``iis``: the mean over draws of each draw's IIS.
* The **two-level interval.** Level 1, test images: one bootstrap over test images, the same resample
  for every set (the sets are scored on the same images), gives the test-image variance ``V_test`` of the
  draw mean and ``W``, the part of ``S²/R`` that test noise differing between draws explains (``S²``: the
  between-draw variance, ddof 1). Level 2, concept draws: ``S²/R`` carries the draw variance and that
  noise. The variance of the mean is ``(V_test - W) + S²/R`` (the shared test noise plus the between-draw
  part), the interval ``iis ± t_ν · sqrt(...)`` with Welch-Satterthwaite's ``ν = total² / ((S²/R)² / (R - 1))``
  (the shared part taken as known). ``sd_draw`` reports ``σ_draw = sqrt(max(S² - R·W, 0))``, one draw's
  spread from the concept draw alone, and ``share_draw`` its part of the variance of the mean. With one
  draw the interval is the percentile interval of the test-image bootstrap, as before. A plain nested
  bootstrap (resampling the 3 draws with replacement) over-covers when the draws agree and under-covers
  when they differ (it shrinks S² by (R - 1)/R and ignores its 2 degrees of freedom): measured by
  scripts/coverage_sim.py (table in docs/calibration.md); this interval covers at its level
  (tests/core/test_calibration.py, slow suite).
* ``iis_null_<kind>`` and the excess ``iis - iis_null_<kind>`` with the same interval on the per-draw
  differences (draw r of the concepts paired with draw r of the null; one test resample for both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from .scores import BOOT_CHUNK_ELEMS, iis_along_last, iis_per_seed, percentile_interval, validate_boot


@dataclass
class DrawResults:
    """The selected heads' test predictions of a concept type's extra draws and nulls: what
    ``{backbone}.draws_<type>`` stores.

    ``correct``: by set name (:func:`~iis_study.core.concepts.nulls.set_name`), bool (seeds, 1 + P, N_test), row 0
    the probe; ``certified``: by set name, whether every head of that set's grid is within tolerance (None:
    an estimator without a certificate); ``draws``: R; ``nulls``: the null kinds; ``accuracy`` (the convex
    estimator): by set name, float (P, L, 2), the val (``[..., 0]``) and test (``[..., 1]``) accuracy of every
    interpretation head of the sparsity x L2 grid, the L2 strengths ``cs`` in increasing order (what a
    selection over another grid reads: :mod:`~iis_study.core.scoring.specification`)."""

    correct: dict[str, np.ndarray] = field(default_factory=dict)
    certified: dict[str, bool | None] = field(default_factory=dict)
    draws: int = 1
    nulls: tuple[str, ...] = ()
    concept_type: str = ""
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    cs: tuple[float, ...] = ()

    def draw_sets(self) -> list[str]:
        """The concept draws 1.. in order."""
        return sorted((n for n in self.correct if n.startswith(f"draw/{self.concept_type}/")), key=_draw_of)

    def null_sets(self, kind: str) -> list[str]:
        """Null ``kind``'s draws 0.. in order."""
        what = f"rotated.{self.concept_type}" if kind == "rotated" else kind
        return sorted((n for n in self.correct if n.startswith(f"null/{what}/")), key=_draw_of)

    def to_tensors(self) -> dict[str, Any]:
        import json

        import torch

        out: dict[str, Any] = {k: torch.as_tensor(np.ascontiguousarray(v, dtype=np.uint8)) for k, v in self.correct.items()}
        out.update({f"{_ACC}{k}": torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64))
                    for k, v in self.accuracy.items()})
        out["__metadata__"] = {
            "draws": str(self.draws),
            "nulls": ",".join(self.nulls),
            "certified": json.dumps(self.certified),
            "concept_type": self.concept_type,
            "cs": json.dumps([float(c) for c in self.cs]),
        }
        return out

    @classmethod
    def from_tensors(cls, data: dict[str, Any]) -> DrawResults:
        import json

        meta = data.get("__metadata__") or {}
        correct = {k: np.asarray(v, dtype=bool) for k, v in data.items() if k != "__metadata__" and not k.startswith(_ACC)}
        accuracy = {k[len(_ACC):]: np.asarray(v, dtype=np.float64) for k, v in data.items() if k.startswith(_ACC)}
        nulls = tuple(n for n in str(meta.get("nulls", "")).split(",") if n)
        return cls(correct, json.loads(meta.get("certified", "{}")), int(meta.get("draws", 1)), nulls,
                   str(meta.get("concept_type", "")), accuracy, tuple(json.loads(meta.get("cs", "[]"))))


_ACC = "accuracy:"  # the stored key prefix of a set's grid accuracies


def _draw_of(name: str) -> int:
    return int(name.rsplit("/", 1)[1])


def boot_iis_sets(sets: Sequence[np.ndarray], s: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_sets): every set's seed-mean IIS under the same multinomial resamples of the test images."""
    n = sets[0].shape[-1]
    shapes = [c.shape for c in sets]
    flat = np.concatenate([c.reshape(-1, n) for c in sets]).astype(np.float64).T  # (N, Σ S·H)
    chunk = max(1, BOOT_CHUNK_ELEMS // max(n, flat.shape[1], 1))
    out = np.empty((n_boot, len(sets)))
    probs = np.full(n, 1.0 / n)
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        counts = rng.multinomial(n, probs, size=stop - start).astype(np.float64)
        acc = counts @ flat / n
        col = 0
        for j, (n_seeds, n_heads, _) in enumerate(shapes):
            part = acc[:, col : col + n_seeds * n_heads].reshape(stop - start, n_seeds, n_heads)
            col += n_seeds * n_heads
            out[start:stop, j] = iis_per_seed(part, s).mean(-1)
    return out


def set_iis(correct: np.ndarray, s: np.ndarray) -> float:
    """A set's seed-mean IIS from its (seeds, 1 + P, N) predictions."""
    acc = correct.mean(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(iis_along_last(s, acc[:, 1:] / acc[:, :1]).mean())


def set_iis_chance_corrected(correct: np.ndarray, s: np.ndarray, num_classes: int) -> float:
    """A set's seed-mean chance-corrected IIS (METHOD §7); NaN where the probe is not above chance."""
    acc = correct.mean(-1)
    chance = 1.0 / int(num_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        arr = (acc[:, 1:] - chance) / (acc[:, :1] - chance)
    return float(np.where(acc[:, :1] > chance, iis_along_last(s, arr)[:, None], np.nan).mean())


def two_level(point: np.ndarray, boot: np.ndarray, ci: float) -> dict[str, float]:
    """The two-level interval of the mean over draws (module docstring).

    ``point``: (R,) per-draw values; ``boot``: (B, R) the same under test-image resamples. Returns
    ``mean``, ``ci_low``, ``ci_high``, ``sd_test`` (sqrt V_test), ``sd_draw`` (σ_draw, one draw's spread
    from the concept draw), ``share_draw`` (σ²_draw/R over the total variance of the mean), ``df``, ``se`` (the
    standard error of the mean: the square root of its variance) and ``var_fixed`` (σ²_draw/R, the part of that
    variance that more test images would not shrink; 0 with one draw, whose concept-draw spread is unmeasured)."""
    point = np.asarray(point, dtype=float)
    r = point.size
    ok = np.all(np.isfinite(boot), axis=1)
    boot = boot[ok]
    mean = float(point.mean())
    if r == 1:
        lo, hi = percentile_interval(boot[:, 0], ci)
        sd = float(boot.mean(1).std(ddof=1)) if boot.shape[0] > 1 else math.nan
        return {"mean": mean, "ci_low": lo, "ci_high": hi, "sd_test": sd, "sd_draw": math.nan,
                "share_draw": math.nan, "df": math.inf, "se": sd, "var_fixed": 0.0}
    if boot.shape[0] < 2:  # no test-image resamples to speak of: the between-draw part alone
        boot = np.broadcast_to(point, (2, r))
    v_test = float(boot.mean(1).var(ddof=1))  # test-image variance of the draw mean
    s2 = float(point.var(ddof=1))  # between draws: the draw variance plus the test noise that differs between draws
    w = float((boot - boot.mean(1, keepdims=True)).var(0, ddof=1).sum() / (r - 1) / r)  # that noise's part of S²/R
    shared = max(v_test - w, 0.0)  # test noise shared by every draw (the same images)
    total = shared + s2 / r
    var_draw = max(0.0, s2 - r * w)
    df = math.inf if s2 == 0 else total**2 / ((s2 / r) ** 2 / (r - 1))
    q = float(stats.t.ppf(0.5 + ci / 2, df)) if math.isfinite(df) else float(stats.norm.ppf(0.5 + ci / 2))
    half = q * math.sqrt(total)
    parts = v_test + var_draw / r
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "sd_test": math.sqrt(v_test),
            "sd_draw": math.sqrt(var_draw), "share_draw": (var_draw / r) / parts if parts > 0 else 0.0, "df": df,
            "se": math.sqrt(total), "var_fixed": var_draw / r}


def calibrated_scores(
    draws: Sequence[np.ndarray],
    nulls: Mapping[str, Sequence[np.ndarray]],
    sparsities: Sequence[float],
    n_boot: int,
    seed: int,
    ci: float,
    num_classes: int | None = None,
    power: float | None = None,
) -> dict[str, Any]:
    """The IIS over concept draws with its two-level interval, each null's IIS and the excess over it (and,
    given ``num_classes``, the chance-corrected IIS over draws, ``iis_chance_corrected``).

    ``draws``: R arrays (seeds, 1 + P, N) of the concept draws (draw 0 first); ``nulls``: by kind, R arrays
    each (draw r paired with concept draw r). Keys: ``iis``, ``iis_ci_low`` / ``_high``, ``iis_sd_test``,
    ``iis_sd_draw``, ``iis_share_draw``, ``iis_draw<r>``, ``n_draws``; per null kind ``iis_null_<kind>``,
    ``iis_excess_<kind>`` and its ``_ci_low`` / ``_ci_high``.

    What the study's size can tell (:mod:`~iis_study.core.scoring.power`, at level ``ci`` and ``power``, left out: the
    ``scoring`` block's): ``iis_se``, ``iis_detectable_difference`` (the smallest difference between two
    representations' IIS of this spread that the study detects), per null ``iis_excess_<kind>_detectable`` and
    ``iis_excess_<kind>_n_test_needed`` (test images, all classes, at which an excess of the observed size would
    be detected; ``inf``: none would), and ``n_test``, ``power``."""
    from .blocks import ScoringParams
    from ..params import block_values
    from .power import size_record

    (power,) = block_values(ScoringParams, power=power)
    validate_boot(n_boot, ci)
    s = np.asarray(sparsities, dtype=float)
    r = len(draws)
    kinds = [k for k, v in nulls.items() if len(v)]
    for k in kinds:
        if len(nulls[k]) != r:
            raise ValueError(f"null {k!r} has {len(nulls[k])} draws, the concepts {r}: they are paired by draw")
    sets = list(draws) + [c for k in kinds for c in nulls[k]]
    boot = boot_iis_sets(sets, s, int(n_boot), np.random.default_rng(seed))
    point = np.array([set_iis(c, s) for c in sets])
    real, real_b = point[:r], boot[:, :r]
    main = two_level(real, real_b, ci)
    out: dict[str, Any] = {
        "iis": main["mean"],
        "iis_ci_low": main["ci_low"],
        "iis_ci_high": main["ci_high"],
        "iis_sd_test": main["sd_test"],
        "iis_sd_draw": main["sd_draw"],
        "iis_share_draw": main["share_draw"],
        "n_draws": r,
        "iis_se": main["se"],
        "iis_detectable_difference": math.sqrt(2.0) * size_record(main, ci, power, 0)["detectable"],
        "n_test": int(sets[0].shape[-1]),
        "power": float(power),
    }
    if num_classes is not None:
        out["iis_chance_corrected"] = float(np.mean([set_iis_chance_corrected(c, s, num_classes) for c in draws]))
    for i, v in enumerate(real):
        out[f"iis_draw{i}"] = float(v)
    for j, k in enumerate(kinds):
        cols = slice(r * (1 + j), r * (2 + j))
        null, null_b = point[cols], boot[:, cols]
        ex = two_level(real - null, real_b - null_b, ci)
        out[f"iis_null_{k}"] = float(null.mean())
        out[f"iis_excess_{k}"] = ex["mean"]
        out[f"iis_excess_{k}_ci_low"] = ex["ci_low"]
        out[f"iis_excess_{k}_ci_high"] = ex["ci_high"]
        size = size_record(ex, ci, power, int(sets[0].shape[-1]), effect=ex["mean"])
        out[f"iis_excess_{k}_detectable"] = size["detectable"]
        out[f"iis_excess_{k}_n_test_needed"] = size["n_test_needed"]
    return out

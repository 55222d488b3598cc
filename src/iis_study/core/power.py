"""What a study's size can tell (docs/calibration.md, "What a study of this size can tell").

The rule. An excess (or a difference between two IIS) is *detectable* at level ``ci`` with power ``power``
when a true effect of that size gives an interval that excludes zero with probability ``power``: with the
estimate roughly normal with standard error ``se``, the interval's half-width is ``q_ci · se`` and the
estimate falls beyond it with probability ``power`` when the effect is ``(q_ci + q_power) · se``. So

    detectable = (z(0.5 + ci/2) + z(power)) · se        (2.80 · se at ci 0.95, power 0.8)

With several concept draws the standard error is itself estimated with ``ν`` degrees of freedom (Welch-
Satterthwaite, as the interval's): the multiplier is then the noncentrality ``δ`` at which a noncentral
``t_ν(δ)`` exceeds the interval's ``t_ν(0.5 + ci/2)`` with probability ``power`` (the sum of the two t
quantiles, the usual shortcut, detects only about 70 % of the time at ``ν`` of 2 to 4).

``se`` is the run's own: the square root of the two-level variance of the mean over concept draws
(:func:`~iis_study.core.calibration.two_level`; the test-image bootstrap alone with one draw), ``ν`` its degrees
of freedom. Two-sided 5 % and 80 % power are the scoring block's ``ci`` and ``power``: the level is the one the
interval is printed at, so "detectable" means "would, 8 times in 10, have been printed as distinguishable".

How many images. The variance has a part that more test images shrink (``var_test``, as ``1 / N_test``) and a
part they do not (``var_fixed``: the concept draw's own variance over R draws). An effect ``e`` is detectable
with ``N'`` test images when ``q² · (var_test · N / N' + var_fixed) = e²``, so
``N' = N · var_test / ((e / q)² - var_fixed)``, infinite when the concept draw alone is too noisy (more draws,
not more images, would help). Images per class in the whole folder: ``N' / (K · test fraction)``.

The difference between two representations' IIS: with the same spread each and independent test noise,
``detectable · sqrt(2)``; they are scored on the same test images, whose shared noise cancels in a paired
difference, so this is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

READINGS = ("above", "below", "not distinguishable from")


def multiplier(ci: float, power: float, df: float = math.inf) -> float:
    """``q_ci + q_power``: the detectable effect in standard errors (two-sided level ``ci``, power ``power``)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"scoring.ci must lie in (0, 1), got {ci}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"scoring.power must lie in (0, 1), got {power}")
    if not math.isfinite(df) or df > 1e4:
        return float(stats.norm.ppf(0.5 + ci / 2) + stats.norm.ppf(power))
    crit = float(stats.t.ppf(0.5 + ci / 2, df))  # the estimate / its se beyond this: the interval excludes 0
    lo = crit + float(stats.norm.ppf(power)) - 1.0
    return float(optimize.brentq(lambda d: stats.nct.sf(crit, df, d) - power, max(lo, 0.0), 1e3 + 10 * crit))


def detectable(se: float, ci: float, power: float, df: float = math.inf) -> float:
    """The smallest effect that a study with standard error ``se`` detects at level ``ci`` with ``power``."""
    return multiplier(ci, power, df) * float(se)


def test_images_needed(effect: float, var_test: float, var_fixed: float, n_test: int, ci: float, power: float,
                       df: float = math.inf) -> float:
    """Test images (all classes) at which ``effect`` becomes detectable (module docstring); ``inf`` when no
    number of test images would do (the effect is zero, or the part of the variance that images do not shrink is
    already too large), NaN when the run measured no spread."""
    q = multiplier(ci, power, df)
    target = (abs(float(effect)) / q) ** 2 - max(float(var_fixed), 0.0)
    if not math.isfinite(var_test) or var_test <= 0:
        return math.nan
    if target <= 0:
        return math.inf
    return float(n_test) * float(var_test) / target


def images_per_class(n_test: float, num_classes: int, test_fraction: float) -> float:
    """Images per class in the whole image folder whose test split holds ``n_test`` images."""
    if not 0.0 < test_fraction <= 1.0:
        raise ValueError(f"splits.fractions: the test fraction must lie in (0, 1], got {test_fraction}")
    return float(n_test) / int(num_classes) / float(test_fraction)


def reading(ci_low: float, ci_high: float) -> str:
    """``above`` (the interval above zero), ``below`` or ``not distinguishable from`` (it holds zero)."""
    if ci_low > 0:
        return "above"
    if ci_high < 0:
        return "below"
    return "not distinguishable from"


def size_record(two_level_result: dict[str, float], ci: float, power: float, n_test: int,
                effect: float | None = None) -> dict[str, float]:
    """``detectable`` and, given the observed ``effect``, ``n_test_needed`` (test images to detect it), from a
    :func:`~iis_study.core.calibration.two_level` result (``se``, ``var_fixed``, ``df``)."""
    se, var_fixed, df = two_level_result["se"], two_level_result["var_fixed"], two_level_result["df"]
    out = {"detectable": detectable(se, ci, power, df)}
    if effect is not None:
        out["n_test_needed"] = test_images_needed(effect, se**2 - var_fixed, var_fixed, n_test, ci, power, df)
    return out


def _count(n: float) -> str:
    """A needed count, to two significant figures (``12,000``)."""
    if n >= 100:
        n = float(f"{n:.2g}")
    return f"{math.ceil(n):,}"


def size_warning(scores: dict, kind: str, num_classes: int | None, test_fraction: float | None = None) -> str | None:
    """The warning of a score that cannot be told from null ``kind`` (its excess interval holds zero), else None:
    the smallest excess the study detects and how many images per class (in the whole folder with
    ``test_fraction``; test images per class without) an excess of the observed size would need."""
    lo, hi = scores.get(f"iis_excess_{kind}_ci_low"), scores.get(f"iis_excess_{kind}_ci_high")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or reading(lo, hi) != READINGS[2]:
        return None
    excess, mde = scores[f"iis_excess_{kind}"], scores[f"iis_excess_{kind}_detectable"]
    needed = scores.get(f"iis_excess_{kind}_n_test_needed", math.nan)
    level = f"two-sided {1 - scores.get('ci', 0.95):.0%}, power {scores.get('power', 0.8):.0%}"
    what = ("test images" if not num_classes else "images per class" if test_fraction else "test images per class")
    text = (f"too few test images ({scores.get('n_test', '?')}) to tell it from the {kind} null: an excess below "
            f"{mde:.3f} cannot be told from zero ({level})")
    n_now = scores.get("n_test")
    if needed is None or math.isnan(needed):
        return text
    if math.isinf(needed):
        if scores.get(f"iis_excess_{kind}") == 0 or abs(excess) < 1e-12:
            return text + "; the observed excess is zero: no number of images would tell it from zero"
        return text + (f"; no number of images would tell an excess of the observed size ({excess:+.3f}) from zero: "
                       "the concept draw's own spread is larger; more concept draws (concepts.draws) would be needed")
    per_class = needed / int(num_classes or 1)
    if test_fraction:
        per_class = per_class / float(test_fraction)
    if n_now is not None and needed <= n_now:  # the observed excess is detectable in expectation: this draw missed
        return text
    return text + f"; about {_count(per_class)} {what} would be needed to tell an excess of the observed size ({excess:+.3f}) from zero"


# --------------------------------------------------------------------------- a simulated study (tests, scripts)

SIM_PROBE = 0.85
SIM_HEADS = (0.85, 0.85, 0.84, 0.82, 0.78, 0.68, 0.58, 0.45)  # the null's heads along the default grid


def simulated_study(
    rng: np.random.Generator, n_test: int, excess: float, sparsities: Sequence[float], rho: float = 0.5,
    draws: int = 1, draw_sd: float = 0.0, probe: float = SIM_PROBE, heads: Sequence[float] = SIM_HEADS,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Right / wrong test predictions of a study whose concepts beat their null by ``excess`` (in IIS).

    The probe is right on a test image when a uniform falls below ``probe``; the null's head at sparsity j when
    its uniform falls below ``heads[j]``, the concepts' below ``heads[j] + δ`` with ``δ = excess · probe /
    span`` (``span``: the grid's trapezoid weight, so the population excess is exactly ``excess``). Each set's
    uniform is the probe's with probability ``rho`` (correlated test noise), else its own; ``draw_sd``: each
    draw's heads move by ``N(0, draw_sd)`` (the concept draw). Returns (R concept draws, R null draws), each
    (1, 1 + P, N) as :func:`~iis_study.core.calibration.calibrated_scores` reads them."""
    s = np.asarray(sparsities, dtype=float)
    base = np.asarray(heads, dtype=float)
    if base.size != s.size:
        raise ValueError(f"heads: {base.size} accuracies for {s.size} sparsities")
    span = float(np.sum(np.diff(s)))
    delta = float(excess) * probe / span
    shared = rng.random(n_test)
    probe_row = shared < probe

    def one(acc: np.ndarray) -> np.ndarray:
        u = np.where(rng.random(n_test) < rho, shared, rng.random(n_test))
        return np.concatenate([probe_row[None], u[None, :] < acc[:, None]])[None]

    real = [one(np.clip(base + delta + rng.normal(0.0, draw_sd), 0, 1)) for _ in range(draws)]
    null = [one(np.clip(base + rng.normal(0.0, draw_sd), 0, 1)) for _ in range(draws)]
    return real, null

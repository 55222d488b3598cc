"""What a study's size can tell (docs/calibration.md, "What a study of this size can tell").

The rule. An excess (or a difference between two IIS) is *detectable* at level ``ci`` with power ``power``
when a true effect of that size gives an interval that excludes zero with probability ``power``: with the
estimate roughly normal with standard error ``se``, the interval's half-width is ``q_ci · se`` and the
estimate falls beyond it with probability ``power`` when the effect is ``(q_ci + q_power) · se``. So

    detectable = (z(0.5 + ci/2) + z(power)) · se        (2.80 · se at ci 0.95, power 0.8)

With several concept draws the standard error is itself estimated with ``ν`` degrees of freedom (Welch-
Satterthwaite, as the interval's): the multiplier is then the noncentrality ``δ`` at which a noncentral
``t_ν(δ)`` exceeds the interval's ``t_ν(0.5 + ci/2)`` with probability ``power`` (the sum of the two t
quantiles, the usual shortcut, detects 0.73 / 0.77 / 0.78 / 0.79 of the time at ``ν`` = 1 / 2 / 3 / 4 for a
promised 0.80).

``se`` is the run's own: the square root of the two-level variance of the mean over concept draws
(:func:`~iis_study.core.scoring.calibration.two_level`; the test-image bootstrap alone with one draw), ``ν`` its degrees
of freedom. Two-sided 5 % and 80 % power are the scoring block's ``ci`` and ``power``: the level is the one the
interval is printed at, so "detectable" means "would, 8 times in 10, have been printed as distinguishable".

How many images. The variance has a part that more test images shrink (``var_test``, as ``1 / N_test``) and a
part they do not (``var_fixed``: the concept draw's own variance over R draws). An effect ``e`` is detectable
with ``N'`` test images when ``q² · (var_test · N / N' + var_fixed) = e²``, so
``N' = N · var_test / ((e / q)² - var_fixed)``, infinite when the concept draw alone is too noisy (more draws,
not more images, would help). Images per class in the whole folder: ``N' / (K · test fraction)``. ``q`` keeps
today's degrees of freedom (with few draws, ``q`` is too large for the bigger study: ``N'`` errs high) and a
``var_fixed`` estimated as 0 makes ``N'`` ignore the concept draw's variance. Applied to the *observed* excess
it is an order of magnitude only, "if the true excess were the observed one": with one draw
``N' / N = (q / z_obs)²`` carries no information beyond the interval and may be off by a large factor either way.

The difference between two representations' IIS: ``detectable · sqrt(2)`` (3.96 · se at 95 % / 80 %) is for a
test on the difference of two *independent* scores of the same spread. Two printed intervals that do not overlap
need about 1.3 times more, ``(2 · 1.96 + 0.84 · sqrt(2)) · se ≈ 5.1 · se``. Two representations are scored on
the same test images; their test noise, positively correlated, partly cancels in a paired difference, so the
figure is then likely conservative.

When to warn (:data:`WORTH_DETECTING`): an interval that holds the null is read neutrally ("not distinguishable
from it (this study detects excesses ≥ X)"); a precise null result is a result. The study is called too small only
when X exceeds the excess worth detecting, 0.05 IIS units (about 5 % of the default grid's span, and mid-range of
the gaps the default study finds between its concepts and their rotated null, +0.025 to +0.11:
docs/calibration.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

from ..params import check_power

READINGS = ("above", "below", "not distinguishable from")
WORTH_DETECTING = 0.05  # IIS units: a study whose detectable excess is larger is called too small (module docstring)


def multiplier(ci: float, power: float, df: float = math.inf) -> float:
    """``q_ci + q_power``: the detectable effect in standard errors (two-sided level ``ci``, power ``power``)."""
    check_power(ci, power)
    if not math.isfinite(df) or df > 1e4:
        return float(stats.norm.ppf(0.5 + ci / 2) + stats.norm.ppf(power))
    crit = float(stats.t.ppf(0.5 + ci / 2, df))  # the estimate / its se beyond this: the interval excludes 0
    # f(0) = (1 - ci) / 2 - power < 0 (check_power), f grows with δ to 1 - power > 0: the root lies in (0, hi)
    hi = 10.0 + 10 * crit
    while stats.nct.sf(crit, df, hi) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: stats.nct.sf(crit, df, d) - power, 0.0, hi))


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
    :func:`~iis_study.core.scoring.calibration.two_level` result (``se``, ``var_fixed``, ``df``)."""
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


def _finite(v) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def describe(scores: dict, kind: str) -> str | None:
    """The reading against null ``kind``: ``above random``, ``below random``, or, where the interval holds zero,
    ``not distinguishable from random (this study detects excesses >= X)`` (neutral: a precise null result is a
    result); None without an interval."""
    lo, hi = scores.get(f"iis_excess_{kind}_ci_low"), scores.get(f"iis_excess_{kind}_ci_high")
    if not (_finite(lo) and _finite(hi)):
        return None
    text = f"{reading(lo, hi)} {kind}"
    if reading(lo, hi) != READINGS[2]:
        return text
    mde = scores.get(f"iis_excess_{kind}_detectable")
    if not _finite(mde):
        return text
    if mde <= 0:  # identical predictions: the excess and its interval are exactly 0
        return text + " (no spread measured: the concepts' and the null's predictions agree on every test image)"
    return text + f" (this study detects excesses >= {mde:.3f})"


def size_warning(scores: dict, kind: str, num_classes: int | None, test_fraction: float | None = None) -> str | None:
    """A warning where the study is too small for null ``kind``: its excess interval holds zero *and* the smallest
    excess it detects is larger than :data:`WORTH_DETECTING`; else None (the neutral reading, :func:`describe`,
    says what it detects). Starts ``WARNING too few test images`` where more images would help, ``NOTE`` where
    only more concept draws would (the concept draw's own spread exceeds an excess of the observed size). The
    images an excess of the observed size would need are an order of magnitude only, "if the true excess were
    the observed one": per class in the whole folder with ``test_fraction``; test images per class without; all
    test images without ``num_classes``."""
    from .blocks import ScoringParams

    lo, hi = scores.get(f"iis_excess_{kind}_ci_low"), scores.get(f"iis_excess_{kind}_ci_high")
    if not (_finite(lo) and _finite(hi)) or reading(lo, hi) != READINGS[2]:
        return None
    excess, mde = scores[f"iis_excess_{kind}"], scores.get(f"iis_excess_{kind}_detectable")
    if not _finite(mde) or mde <= WORTH_DETECTING:
        return None
    needed = scores.get(f"iis_excess_{kind}_n_test_needed", math.nan)
    defaults = ScoringParams()
    ci, pw = scores.get("ci", defaults.ci), scores.get("power", defaults.power)
    level = f"two-sided {1 - ci:.0%}, power {pw:.0%}"
    n_now = scores.get("n_test")
    if needed is not None and not _finite(needed) and not math.isnan(float(needed)) and abs(excess) > 1e-12:
        return (f"NOTE on the {kind} null: this study detects excesses >= {mde:.3f} only ({level}), and no number "
                f"of test images would tell an excess of the observed size ({excess:+.3f}) from zero: the concept "
                "draw's own spread is larger; more concept draws (concepts.draws), not more images, would be needed")
    text = (f"too few test images ({n_now if n_now is not None else '?'}) for the {kind} null: this study detects "
            f"excesses >= {mde:.3f} only ({level}), more than the {WORTH_DETECTING:.2f} worth detecting")
    if not _finite(needed) or (n_now is not None and needed <= n_now):
        return text  # no count to give (zero excess or spread), or the observed size is detectable already
    what = ("test images" if not num_classes else "images per class" if test_fraction else "test images per class")
    per_class = needed / int(num_classes or 1)
    if test_fraction:
        per_class = per_class / float(test_fraction)
    return text + (f"; if the true excess were the observed one ({excess:+.3f}), about {_count(per_class)} {what} "
                   "would detect it (an order of magnitude only: the observed excess is this uncertain)")


# --------------------------------------------------------------------------- a simulated study (tests, scripts)

SIM_PROBE = 0.85
SIM_HEADS = (0.85, 0.85, 0.84, 0.82, 0.78, 0.68, 0.58, 0.45)  # the null's heads along the default grid


def max_excess(sparsities: Sequence[float], probe: float = SIM_PROBE, heads: Sequence[float] = SIM_HEADS) -> float:
    """The largest excess :func:`simulated_study` holds: the one that lifts its best head to accuracy 1."""
    return (1.0 - float(np.max(heads))) * float(np.sum(np.diff(np.asarray(sparsities, dtype=float)))) / probe


def simulated_study(
    rng: np.random.Generator, n_test: int, excess: float, sparsities: Sequence[float], rho: float = 0.5,
    draws: int = 1, draw_sd: float = 0.0, probe: float = SIM_PROBE, heads: Sequence[float] = SIM_HEADS,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Right / wrong test predictions of a study whose concepts beat their null by ``excess`` (in IIS).

    The probe is right on a test image when a uniform falls below ``probe``; the null's head at sparsity j when
    its uniform falls below ``heads[j]``, the concepts' below ``heads[j] + δ`` with ``δ = excess · probe /
    span`` (``span``: the grid's trapezoid weight, so the population excess is exactly ``excess``; an excess
    that would lift a head past accuracy 1, or below 0, raises: clipping would make the true excess smaller than
    stated, :func:`max_excess`). Each set's
    uniform is the probe's with probability ``rho`` (correlated test noise), else its own; ``draw_sd``: each
    draw's heads move by ``N(0, draw_sd)`` (the concept draw). Returns (R concept draws, R null draws), each
    (1, 1 + P, N) as :func:`~iis_study.core.scoring.calibration.calibrated_scores` reads them."""
    s = np.asarray(sparsities, dtype=float)
    base = np.asarray(heads, dtype=float)
    if base.size != s.size:
        raise ValueError(f"heads: {base.size} accuracies for {s.size} sparsities")
    span = float(np.sum(np.diff(s)))
    delta = float(excess) * probe / span
    if base.max() + delta > 1.0 or base.min() + delta < 0.0:  # clipped heads would make the true excess smaller
        lo, hi = -base.min() * span / probe, max_excess(sparsities, probe, heads)
        raise ValueError(f"simulated_study: an excess of {excess:.3f} would push a head's accuracy past "
                         f"{'1' if delta > 0 else '0'} (heads {base.min():.2f}..{base.max():.2f}, probe {probe:.2f}); "
                         f"this setting holds excesses in [{lo:.3f}, {hi:.3f}] only")
    shared = rng.random(n_test)
    probe_row = shared < probe

    def one(acc: np.ndarray) -> np.ndarray:
        u = np.where(rng.random(n_test) < rho, shared, rng.random(n_test))
        return np.concatenate([probe_row[None], u[None, :] < acc[:, None]])[None]

    # the concept draw's noise alone may be clipped (rare at a small draw_sd); the excess itself never is
    real = [one(np.clip(base + delta + rng.normal(0.0, draw_sd), 0, 1)) for _ in range(draws)]
    null = [one(np.clip(base + rng.normal(0.0, draw_sd), 0, 1)) for _ in range(draws)]
    return real, null

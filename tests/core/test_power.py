"""What a study's size can tell (core/power.py, docs/calibration.md): the detectable excess is detected at the
stated power, the images-needed rule reaches it, the warning appears on a study too small to tell and not on one
where the excess is real."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iis_study.core import calibration as cal
from iis_study.core import power

GRID = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98]


def _runs(n: int, excess: float, reps: int, seed: int, draws: int = 1, draw_sd: float = 0.0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(reps):
        real, null = power.simulated_study(rng, n, excess, GRID, rho=0.5, draws=draws, draw_sd=draw_sd)
        out.append(cal.calibrated_scores(real, {"random": null}, GRID, 200, seed * 1000 + i, 0.95, power=0.8))
    return out


def _detected(runs: list[dict]) -> float:
    return float(np.mean([r["iis_excess_random_ci_low"] > 0 for r in runs]))


def _rule_size(n: int, draws: int, draw_sd: float) -> float:
    """The rule's detectable excess of a study whose true excess is that size (a fixed point: the spread of the
    excess depends on the accuracies), the rule applied to the runs' mean variance (root mean square)."""
    e = 0.0
    for it in range(3):
        mdes = [r["iis_excess_random_detectable"] for r in _runs(n, e, 50, 10 + it, draws, draw_sd)]
        e = float(np.sqrt(np.mean(np.square(mdes))))
    return e


@pytest.mark.parametrize("draws, draw_sd", [(1, 0.0), (3, 0.02)])
def test_an_excess_of_the_detectable_size_is_detected_at_the_stated_power(draws, draw_sd):
    size = _rule_size(150, draws, draw_sd)
    assert 0.05 < size < 0.3
    detected = _detected(_runs(150, size, 400, 1, draws, draw_sd))
    assert 0.70 <= detected <= 0.90, f"an excess of the detectable size {size:.3f} detected {detected:.2f}, not ~0.80"
    assert _detected(_runs(150, 0.0, 200, 2, draws, draw_sd)) <= 0.08  # no excess: the interval holds 0 (2.5 % a side)
    # half that size is missed most of the time
    assert _detected(_runs(150, size / 2, 200, 3, draws, draw_sd)) < 0.5


def test_the_images_needed_make_a_small_excess_detectable():
    excess, n = 0.06, 90
    pilot = _runs(n, excess, 60, 4)
    assert all(r["iis_excess_random_detectable"] > excess for r in pilot)  # too small a study for it
    se2 = float(np.mean([(r["iis_excess_random_detectable"] / power.multiplier(0.95, 0.8)) ** 2 for r in pilot]))
    needed = power.test_images_needed(excess, se2, 0.0, n, 0.95, 0.8)
    assert 3 * n < needed < 20 * n
    detected = _detected(_runs(int(round(needed)), excess, 400, 5))
    assert 0.70 <= detected <= 0.90, f"{needed:.0f} test images detect an excess of {excess} {detected:.2f} of the time"


def test_no_number_of_images_beats_the_concept_draws_own_spread():
    assert math.isinf(power.test_images_needed(0.05, 1e-4, (0.05 / 2.8) ** 2, 100, 0.95, 0.8))
    assert math.isinf(power.test_images_needed(0.0, 1e-4, 0.0, 100, 0.95, 0.8))
    assert power.test_images_needed(0.05, 1e-4, 0.0, 100, 0.95, 0.8) == pytest.approx(100 * 1e-4 / (0.05 / 2.8016) ** 2, rel=1e-3)


def test_the_multiplier_is_the_normal_one_at_many_degrees_of_freedom_and_grows_with_few():
    assert power.multiplier(0.95, 0.8) == pytest.approx(1.95996 + 0.84162, abs=1e-4)
    assert power.multiplier(0.95, 0.8, 1e6) == pytest.approx(power.multiplier(0.95, 0.8), abs=1e-3)
    assert power.multiplier(0.95, 0.8, 3) > power.multiplier(0.95, 0.8, 10) > power.multiplier(0.95, 0.8)
    with pytest.raises(ValueError, match="scoring.power"):
        power.multiplier(0.95, 1.0)


def _scores_csv(tmp_path, n: int, excess: float, seed: int) -> tuple[object, dict]:
    real, null = power.simulated_study(np.random.default_rng(seed), n, excess, GRID, rho=0.5)
    out = cal.calibrated_scores(real, {"random": null}, GRID, 300, seed, 0.95, power=0.8)
    row = {"backbone": "b", "representation": "b", "concept_type": "prototype", "accuracy_linear_probe": 0.85,
           "certified": True, "ci": 0.95, **out}
    path = tmp_path / f"scores{n}.csv"
    pd.DataFrame([row]).to_csv(path, index=False)
    return path, row


def test_the_summary_warns_on_a_study_too_small_to_tell_and_not_on_one_where_the_excess_is_real(tmp_path):
    from iis_study.new_study import summary

    splits = tmp_path / "splits.csv"  # 3 classes, 60 images each, 20 % test: 36 test images
    pd.DataFrame({"label": np.repeat([0, 1, 2], 60),
                  "split": np.tile(["train"] * 36 + ["val"] * 12 + ["test"] * 12, 3)}).to_csv(splits, index=False)
    small, row = _scores_csv(tmp_path, 36, 0.05, 0)
    text = summary(small, splits_csv=splits)
    assert "not a ceiling" in text and "above 0.98" in text  # the range, stated
    assert "reading: not distinguishable from random" in text
    assert f"detectable {row['iis_excess_random_detectable']:.3f}" in text
    assert "WARNING too few test images (36)" in text and "images per class would be needed" in text
    needed = row["iis_excess_random_n_test_needed"] / 3 / 0.2
    assert f"about {power._count(needed)} images per class" in text
    big, row = _scores_csv(tmp_path, 3000, 0.1, 1)
    text = summary(big, splits_csv=splits)
    assert row["iis_excess_random_ci_low"] > 0
    assert "reading: above random" in text and "WARNING" not in text


def test_the_summary_gives_a_correlation_verdict_only_from_5_representations(tmp_path):
    from iis_study.new_study import _correlation_lines

    rec = {"spearman": {"r": 0.9, "p_perm": 0.08, "ci_low": math.nan, "ci_high": math.nan}, "n_backbones": 4,
           "interval": "too few representations", "scope": "all"}
    few = _correlation_lines({"prototype": {"iis": rec}})
    assert len(few) == 1 and "no verdict" in few[0]
    one = _correlation_lines({"prototype": {"iis": {**rec, "n_backbones": 1, "spearman": {"r": math.nan}}}})
    assert "no verdict: fewer than 5" in one[0]
    many = _correlation_lines({"prototype": {"iis": {**rec, "n_backbones": 6, "interval": "bootstrap over representations",
                                                      "spearman": {"r": 0.9, "p_perm": 0.01, "ci_low": 0.3, "ci_high": 1.0}}}})
    assert "iis rises with accuracy" in many[0]

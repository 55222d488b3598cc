"""What a study's size can tell (core/scoring/power.py, docs/calibration.md): the detectable excess is detected at the
stated power, the images-needed rule reaches it, the warning appears on a study too small to tell and not on one
where the excess is real."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from iis_study.core.scoring import calibration as cal
from iis_study.core.scoring import power

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


@pytest.mark.parametrize("ci, pw, df", [(0.95, 0.2, 2), (0.95, 0.05, 1), (0.9, 0.3, 3), (0.99, 0.4, 2)])
def test_the_multiplier_finds_a_low_power_with_few_draws(ci, pw, df):
    """Powers below ~0.5 put the root below the old bracket's lower end (scipy's opaque brentq error)."""
    m = power.multiplier(ci, pw, df)
    assert m > 0
    from scipy import stats

    assert stats.nct.sf(stats.t.ppf(0.5 + ci / 2, df), df, m) == pytest.approx(pw, abs=1e-6)


def test_a_power_no_effect_at_all_reaches_is_refused_by_the_scoring_block():
    from iis_study.core.scoring.blocks import ScoringParams

    ScoringParams(ci=0.95, power=0.2).validate()
    for ci, pw in ((0.95, 0.025), (0.95, 0.01), (0.8, 0.09), (0.95, 1.0)):
        with pytest.raises(ValueError, match="scoring.power"):
            ScoringParams(ci=ci, power=pw).validate()


def test_the_simulated_study_refuses_an_excess_it_would_clip():
    """Heads clipped at accuracy 1 would make the true excess smaller than stated (the old table's K = 3 row of
    20 images per class stated 0.524 for a true ~0.24)."""
    room = power.max_excess(GRID)
    assert room == pytest.approx((1 - max(power.SIM_HEADS)) * 0.98 / power.SIM_PROBE)
    power.simulated_study(np.random.default_rng(0), 10, room - 1e-9, GRID)
    with pytest.raises(ValueError, match="past 1.*holds excesses in"):
        power.simulated_study(np.random.default_rng(0), 10, room + 0.01, GRID)
    with pytest.raises(ValueError, match="past 0"):
        power.simulated_study(np.random.default_rng(0), 10, -0.6, GRID)


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
    assert "not a ceiling" in text and "above the span" in text  # the range, stated
    assert "probe_converged" in text and "0.98 on the default grid" in text  # the causes, the span
    mde = row["iis_excess_random_detectable"]
    assert mde > power.WORTH_DETECTING
    assert f"reading: not distinguishable from random (this study detects excesses >= {mde:.3f})" in text
    assert f"detectable {mde:.3f}" in text
    assert "WARNING too few test images (36)" in text and "if the true excess were the observed one" in text
    assert "a floor" not in text
    needed = row["iis_excess_random_n_test_needed"] / 3 / 0.2
    assert f"about {power._count(needed)} images per class would detect it" in text
    alone = summary(small)  # no split table beside it: the total of test images, never "per class"
    assert f"about {power._count(row['iis_excess_random_n_test_needed'])} test images would detect it" in alone
    assert "per class" not in alone
    big, row = _scores_csv(tmp_path, 3000, 0.1, 1)
    text = summary(big, splits_csv=splits)
    assert row["iis_excess_random_ci_low"] > 0
    assert "reading: above random" in text and "WARNING" not in text


def test_a_precise_null_result_is_read_neutrally_without_a_warning(tmp_path):
    """A study large enough to detect 0.05 whose interval holds 0: no 'too few test images'."""
    from iis_study.new_study import summary

    big, row = _scores_csv(tmp_path, 3000, 0.0, 4)
    assert row["iis_excess_random_ci_low"] <= 0 <= row["iis_excess_random_ci_high"]
    assert row["iis_excess_random_detectable"] <= power.WORTH_DETECTING
    text = summary(big)
    assert "reading: not distinguishable from random (this study detects excesses >=" in text
    assert "WARNING" not in text and "NOTE" not in text


def _row(**kw) -> dict:
    row = {"iis_excess_random": 0.01, "iis_excess_random_ci_low": -0.2, "iis_excess_random_ci_high": 0.22,
           "iis_excess_random_detectable": 0.3, "iis_excess_random_n_test_needed": 9000.0, "n_test": 36,
           "ci": 0.95, "power": 0.8}
    return {**row, **kw}


def test_the_warning_names_concept_draws_not_images_where_images_cannot_help_and_test_images_without_classes():
    note = power.size_warning(_row(iis_excess_random_n_test_needed=math.inf), "random", 3, 0.2)
    assert note.startswith("NOTE") and "more concept draws" in note and "not more images" in note
    assert "too few test images" not in note
    total = power.size_warning(_row(), "random", None)  # no split table: a total, not "per class"
    assert "about 9,000 test images would detect it" in total and "per class" not in total
    assert "about 15,000 images per class" in power.size_warning(_row(), "random", 3, 0.2)
    assert power.size_warning(_row(iis_excess_random_detectable=0.04), "random", 3, 0.2) is None  # well powered


def test_a_run_with_no_spread_is_read_as_such():
    row = _row(iis_excess_random=0.0, iis_excess_random_ci_low=0.0, iis_excess_random_ci_high=0.0,
               iis_excess_random_detectable=0.0, iis_excess_random_n_test_needed=math.nan)
    assert "no spread measured" in power.describe(row, "random")
    assert power.size_warning(row, "random", 3, 0.2) is None


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
    null = _correlation_lines({"prototype": {"iis": {**rec, "n_backbones": 6, "interval": "bootstrap over representations",
                                                      "spearman": {"r": 0.9, "p_perm": 0.01, "ci_low": None, "ci_high": None}}}})
    assert "no verdict: no interval" in null[0]

"""The specification curve (core/scoring/specification.py): the sign of the accuracy-score correlation under every
reasonable analysis choice, and its verdict. Synthetic studies whose answer is known: one where every
specification agrees (verdict "robust"), one where the heads' L2 grid alone flips the sign (verdict "not
identified", that knob named)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iis_study.core.scoring import specification as spec
from iis_study.core.scoring.calibration import DrawResults
from iis_study.core.scoring.blocks import SpecificationParams
from iis_study.core.heads.datatypes import SweepParams
from iis_study.core.reporting.report import specification_curve

SPARSITIES = (0.0, 0.5, 0.9)
CS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _inputs(acc: float, keep_narrow: float, keep_wide: float, k: int = 10, name: str = "r0",
            null_keep: float = 0.9) -> pd.DataFrame:
    """One representation's accuracies: the probe (every input scaling the same, test ``acc`` at every C, best val
    at C = 10), and the heads of two concept draws and a random null: at C = 10 they keep ``keep_narrow`` of the
    probe's accuracy at every sparsity, at C = 1000 (the best val of all, reachable only from the full grid)
    ``keep_wide``; the null keeps ``null_keep`` of it everywhere."""
    rows = []
    for inputs in ("rms", "centred", "standardised"):
        for c in CS:
            rows.append({"concept_set": "probe", "draw": 0, "inputs": inputs, "sparsity": np.nan, "c": c,
                         "val_acc": 0.9 if c == 10.0 else 0.5, "test_acc": acc})
    rows.append({"concept_set": "reference", "draw": 0, "inputs": "", "sparsity": np.nan, "c": np.nan,
                 "val_acc": acc, "test_acc": acc})
    for cset, draws in (("concepts", (0, 1)), ("null_random", (0, 1))):
        for d in draws:
            for s in SPARSITIES:
                for c in CS:
                    if cset == "null_random":
                        val, keep = 0.5, null_keep
                    elif c == 1000.0:
                        val, keep = 0.95, keep_wide
                    elif c == 10.0:
                        val, keep = 0.9, keep_narrow
                    else:
                        val, keep = 0.1, 0.5
                    rows.append({"concept_set": cset, "draw": d, "inputs": "", "sparsity": s, "c": c,
                                 "val_acc": val, "test_acc": acc * keep * (1 - 0.1 * s)})
    out = pd.DataFrame(rows)
    out["num_classes"] = k
    out["backbone"], out["concept_type"], out["certified"] = name, "prototype", None
    return out[spec.INPUT_COLUMNS]


def _study(keep_wide_slope: float, null_slope: float = 0.0):
    """Six pretrained representations, probe accuracy 0.5 ... 0.9; the narrow grid's retention rises with
    accuracy; the full grid's retention moves with ``keep_wide_slope``, the random null's with ``null_slope``."""
    accs = np.linspace(0.5, 0.9, 6)
    names = [f"r{i}" for i in range(6)]
    tables = [_inputs(a, 0.6 + 0.4 * (a - 0.5), 0.8 + keep_wide_slope * (a - 0.5), name=n,
                      null_keep=0.9 + null_slope * (a - 0.5)) for a, n in zip(accs, names)]
    iis_scores = pd.DataFrame({"backbone": names, "representation": names, "concept_type": "prototype",
                               "weights": "offline", "accuracy_linear_probe": accs})
    return iis_scores, tables


PARAMS = SpecificationParams(scores=("iis", "iis_chance_corrected"), n_perm=200)
SWEEP = SweepParams(sparsities=SPARSITIES, l2_grid=CS)


def _verdict(record, scope="pretrained", ctype="prototype"):
    return next(r for r in record["verdicts"] if r["scope"] == scope and r["concept_type"] == ctype)


def test_a_sign_every_specification_agrees_on_is_robust():
    iis_scores, tables = _study(keep_wide_slope=+0.3)
    curve, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    v = _verdict(record)
    # 2 head grids x 2 probe grids x 3 probe inputs x 2 x axes x 2 scores
    assert v["n_specifications"] == 48 and v["n_positive"] == 48 and v["robust"]
    assert v["verdict"].startswith("sign robust (48 of 48 specifications agree")
    assert record["headline_scope"] == "pretrained" and record["headline_verdict"]["prototype"] == v["verdict"]
    assert len(curve) == 48 * len(PARAMS.scopes) and curve["headline"].sum() == len(PARAMS.scopes)
    assert v["r_min"] > 0.9
    # knobs that do nothing here have no effect
    assert v["main_effects"]["probe_inputs"]["effect"] == pytest.approx(0.0, abs=1e-12)
    assert not any(e["sets_the_sign"] for e in v["main_effects"].values())
    assert {lv["representation"] for lv in v["leverage"]} == set(iis_scores["representation"])


def test_one_knob_that_flips_the_sign_is_named_and_the_sign_not_identified():
    iis_scores, tables = _study(keep_wide_slope=-0.6)  # the full grid's heads lose more on accurate representations
    curve, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    v = _verdict(record)
    assert not v["robust"] and v["n_positive"] == 24 and v["n_negative"] == 24
    assert v["verdict"].startswith(spec.NOT_IDENTIFIED) and "set by head_grid" in v["verdict"]
    effects = v["main_effects"]
    assert effects["head_grid"]["sets_the_sign"] and effects["head_grid"]["level_means_of_both_signs"]
    assert effects["head_grid"]["mean_r"]["narrow"] > 0 > effects["head_grid"]["mean_r"]["full"]
    assert [k for k, e in effects.items() if e["sets_the_sign"]] == ["head_grid"]
    # the headline (the study's full grid) is negative
    assert v["headline"]["pearson_r"] < 0
    lines = spec.verdict_lines(record)
    assert len(lines) == 1 and "not identified" in lines[0] and "head_grid" in lines[0]


def test_the_sign_within_each_score_is_counted_over_the_other_knobs():
    # the raw IIS rises with accuracy; the random null's IIS rises faster, so the excess over it falls
    iis_scores, tables = _study(keep_wide_slope=+0.3, null_slope=+1.0)
    params = SpecificationParams(scores=("iis", "iis_excess_random"), n_perm=200)
    curve, record = specification_curve(iis_scores, params, SWEEP, ["prototype"], tables)
    v = _verdict(record)
    assert not v["robust"] and v["n_positive"] == 24 and v["n_negative"] == 24 and "set by score" in v["verdict"]
    by = v["by_score"]
    assert list(by) == ["iis", "iis_excess_random"]
    assert (by["iis"]["n_positive"], by["iis"]["n_negative"], by["iis"]["n"], by["iis"]["signs_agree"]) == (24, 0, 24, True)
    assert (by["iis_excess_random"]["n_positive"], by["iis_excess_random"]["n_negative"]) == (0, 24)
    assert by["iis_excess_random"]["signs_agree"] and by["iis_excess_random"]["r_max"] < 0 < by["iis"]["r_min"]
    part = curve[(curve["scope"] == "pretrained") & (curve["score"] == "iis")]
    assert by["iis"]["r_min"] == pytest.approx(part["pearson_r"].min(), abs=0)
    assert "within each score: iis 24+/0- " in spec.verdict_lines(record)[0]
    # a knob other than the score that flips the sign leaves no score robust
    flip_scores, flip_tables = _study(keep_wide_slope=-0.6)
    _, flipped = specification_curve(flip_scores, PARAMS, SWEEP, ["prototype"], flip_tables)
    assert all(not b["signs_agree"] and b["n_positive"] == b["n_negative"] == 12 for b in _verdict(flipped)["by_score"].values())


def test_the_headline_specification_reproduces_the_study_and_near_chance_scope_drops():
    iis_scores, tables = _study(keep_wide_slope=+0.3)
    # the study's own numbers under its analysis: full grids, RMS probe, own accuracy, raw IIS
    s = np.asarray(SPARSITIES)
    keep = 0.8 + 0.3 * (iis_scores["accuracy_linear_probe"] - 0.5)
    arr = keep.to_numpy()[:, None] * (1 - 0.1 * s)[None]
    iis_scores["iis"] = (np.diff(s) * (arr[:, 1:] + arr[:, :-1]) / 2).sum(1)
    _, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    assert record["reproduces_study"] < 1e-12
    iis_scores.loc[0, "accuracy_linear_probe"] = 0.15  # below 2/K: near chance
    _, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    assert _verdict(record, "above_chance")["n_representations"] == 5
    assert _verdict(record, "all")["n_representations"] == 6


def test_a_grid_outside_the_solved_strengths_is_refused_by_name():
    params = SpecificationParams(head_grids={"wide": [0.01, 1.0]})
    with pytest.raises(ValueError, match=r"specification.head_grids.wide.*not in sweep.l2_grid"):
        params.resolve_grids(CS)
    with pytest.raises(ValueError, match="specification.probe_inputs"):
        SpecificationParams(probe_inputs=["whitened"])


@pytest.mark.parametrize("l2_grid, narrow", [
    (CS, [1.0, 10.0, 100.0]),            # the default sweep: narrow and full
    ([1.0, 10.0, 1000.0], [1.0, 10.0]),  # narrow within the sweep's grid
    ([1.0, 100.0], None),                # narrow within it is the full grid: left out
    ([0.5, 2.0], None),                  # no strength in common: left out
])
def test_the_default_grids_follow_the_sweeps_grid(l2_grid, narrow, caplog):
    heads, probes, notes = SpecificationParams().resolve_grids(l2_grid)
    full = sorted(float(c) for c in l2_grid)
    expected = {"narrow": narrow, "full": full} if narrow else {"full": full}
    assert heads == expected and probes == expected
    assert len(notes) == (0 if narrow else 2) and all("narrow" in n for n in notes)
    # written out: 'sweep' is the sweep's own grid; a value outside it is refused
    heads, _, _ = SpecificationParams(head_grids={"mine": [full[0]], "all": "sweep"}).resolve_grids(l2_grid)
    assert heads == {"mine": [full[0]], "all": full}
    # the curve runs on such a sweep, its headline the study's own grid, the notes logged and recorded
    iis_scores, tables = _study(keep_wide_slope=+0.3)
    if set(full) <= set(CS):
        with caplog.at_level("WARNING", logger="iis_study.core.reporting.report"):
            _, record = specification_curve(iis_scores, PARAMS, SweepParams(sparsities=SPARSITIES, l2_grid=l2_grid),
                                            ["prototype"], tables)
        assert record["headline_specification"]["head_grid"] == "full" and record["grid_notes"] == notes
        assert all(n in caplog.text for n in notes)


def test_validation_takes_a_custom_sweep_grid_and_refuses_a_written_grid_outside_it():
    import copy

    from iis_study.validation import validate_study
    from tests.kedro_project import TINY

    def params(**spec_block):
        p = copy.deepcopy(TINY)
        p["sweep"] = {**p.get("sweep", {}), "l2_grid": [1.0, 100.0], "estimator": "convex"}
        p["specification"] = spec_block
        return p
    validate_study(params())  # the default grids follow the sweep's
    with pytest.raises(ValueError, match=r"specification.probe_grids.narrow: C = \[10.0\] not in sweep.l2_grid"):
        validate_study(params(probe_grids={"narrow": [1.0, 10.0]}))
    # only the convex estimator re-selects: an adam study's grids are not checked (as validation does not)
    iis_scores, tables = _study(keep_wide_slope=+0.3)
    _, record = specification_curve(iis_scores, SpecificationParams(head_grids={"x": [0.01]}),
                                    SweepParams(sparsities=SPARSITIES, estimator="adam"), ["prototype"], tables)
    assert record["verdicts"] == [] and "adam" in record["note"]


def test_with_the_l2_path_rule_only_the_sweeps_own_grid_is_kept(caplog):
    iis_scores, tables = _study(keep_wide_slope=-0.6)
    sweep = SweepParams(sparsities=SPARSITIES, l2_grid=CS, l2_path=True)
    with caplog.at_level("WARNING", logger="iis_study.core.reporting.report"):
        curve, record = specification_curve(iis_scores, PARAMS, sweep, ["prototype"], tables)
    assert set(curve["head_grid"]) == {"full"} and set(curve["probe_grid"]) == {"full"}
    assert record["knobs"]["head_grid"] == {"full": list(CS)} and len(record["grid_notes"]) == 2
    assert "sweep.l2_path is on" in caplog.text
    assert "head_grid" not in _verdict(record)["main_effects"]


def test_a_selection_over_a_narrower_grid_equals_a_run_on_it_with_ties():
    """The full grid's stored heads and probe, re-selected on the narrow grid, give what a sweep over the narrow
    grid selects -- on a problem whose val accuracies tie at several strengths with different test accuracies
    (the tie rule decides: the smaller C)."""
    import torch

    from iis_study.core.heads import convex_many
    from tests.core.test_convex import _problem

    narrow = (1.0, 10.0, 100.0)
    train, val, test, space, k = _problem(n=60, d=16, m=20, seed=3)
    run = {name: convex_many(train, val, test, {"p": space}, k, SweepParams(sparsities=SPARSITIES, l2_grid=grid),
                             progress=False)["p"] for name, grid in (("full", CS), ("narrow", narrow))}
    acc = spec.grid_accuracy(run["full"].table, SPARSITIES)
    allowed = np.isin(np.asarray(CS), narrow)
    v, t = acc[:, allowed, 0], acc[:, allowed, 1]
    ties = [len(set(t[i][v[i] == v[i].max()])) > 1 for i in range(len(SPARSITIES))]
    assert any(ties), "the problem must tie on val at strengths of different test accuracy"
    inputs = spec.specification_inputs(run["full"].table, SPARSITIES, k, None, None, (0.5, 0.5), "a", "prototype")
    got = spec.representation_values(inputs, SPARSITIES, {"narrow": list(narrow)}, {"narrow": list(narrow)}, ["rms"])
    selected = run["narrow"].selected
    probe = float(selected.loc[selected["head"] == "probe", "test_acc"].iloc[0])
    heads = selected[selected["head"] == "interp"].sort_values("sparsity")["test_acc"].to_numpy(float)
    s = np.asarray(SPARSITIES)
    assert got["probe"].iloc[0] == pytest.approx(probe, abs=1e-12)
    assert got["iis"].iloc[0] == pytest.approx(float(spec._trapezoid(s, heads / probe)), abs=1e-12)
    assert torch.get_num_threads() >= 1


def test_too_few_representations_undefined_specifications_and_a_sign_resting_on_one(caplog):
    import json

    iis_scores, tables = _study(keep_wide_slope=+0.3)
    # three representations: every specification agrees, but below 5 that is no verdict on the sign
    _, record = specification_curve(iis_scores.iloc[:3].reset_index(drop=True), PARAMS, SWEEP, ["prototype"],
                                    tables[:3])
    v = _verdict(record)
    assert v["verdict"].startswith("too few representations (3 < 5") and not v["robust"]
    # two: every r undefined; the record says so and is strict JSON (no NaN)
    _, record = specification_curve(iis_scores.iloc[:2].reset_index(drop=True), PARAMS, SWEEP, ["prototype"],
                                    tables[:2])
    v = _verdict(record)
    assert v["n_undefined"] == 48 and v["n_min"] == 2
    json.dumps(record, allow_nan=False)
    # six, one far off the line that carries the sign alone: robust across specifications, but resting on it
    iis_scores, tables = _study(keep_wide_slope=+0.3)
    for i in range(5):  # five flat, slightly falling; the sixth far above
        tables[i] = _inputs(0.5 + 0.01 * i, 0.7 - 0.01 * i, 0.8 - 0.01 * i, name=f"r{i}")
        iis_scores.loc[i, "accuracy_linear_probe"] = 0.5 + 0.01 * i
    tables[5] = _inputs(0.9, 1.0, 1.0, name="r5")
    _, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    v = _verdict(record)
    assert v["robust"] and v["rests_on"] == ["r5"] and "but it rests on r5" in v["verdict"]
    assert v["n_undefined"] == 0 and v["n_min"] == 6


def test_tables_are_joined_on_their_names_not_their_order():
    iis_scores, tables = _study(keep_wide_slope=-0.6)
    _, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    _, shuffled = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables[::-1])
    assert shuffled["verdicts"] == record["verdicts"]
    with pytest.raises(ValueError, match="older code"):
        specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], [t.drop(columns="backbone") for t in tables])
    # no grid equal to the sweep's: no headline specification (not a silent fallback)
    _, record = specification_curve(iis_scores, SpecificationParams(head_grids={"narrow": [1.0, 10.0, 100.0]},
                                                                    scores=("iis",), n_perm=50),
                                    SWEEP, ["prototype"], tables)
    assert record["headline_specification"] is None and record["reproduces_study"] is None
    assert _verdict(record)["headline"] is None and _verdict(record)["leverage"] == []


def test_an_old_draws_file_without_grid_accuracies_is_refused():
    table = pd.DataFrame({"head": ["probe", "interp"], "c": [1.0, 1.0], "sparsity": [np.nan, 0.0],
                          "val_acc": [0.9, 0.8], "test_acc": [0.9, 0.8]})
    old = DrawResults(correct={"draw/prototype/1": np.ones((1, 2, 3), bool)}, draws=2, concept_type="prototype")
    with pytest.raises(ValueError, match="no stored grid accuracies.*older code"):
        spec.specification_inputs(table, (0.0,), 3, old, None, (0.9, 0.9), "a", "prototype")
    one = DrawResults(correct={}, draws=1, concept_type="prototype")  # one draw, no nulls: nothing else to read
    assert len(spec.specification_inputs(table, (0.0,), 3, one, None, (0.9, 0.9), "a", "prototype")) == 3


def test_an_uncertified_variant_probe_is_flagged_and_warned(caplog):
    import torch

    from iis_study.core.heads import Split

    g = torch.Generator().manual_seed(0)
    splits = {s: Split(x=torch.randn(30, 6, generator=g), y=torch.arange(30) % 3) for s in ("train", "val", "test")}
    with caplog.at_level("WARNING", logger="iis_study.core.scoring.specification"):
        out = spec.probe_variants(splits, 3, [1.0, 1000.0], ["centred"], tolerance=1e-12, max_iter=1, solver="lbfgs")
    assert not out["certified"].all() and "not certified" in caplog.text
    inputs = spec.specification_inputs(pd.DataFrame({"head": ["probe"], "c": [1.0], "sparsity": [np.nan],
                                                     "val_acc": [0.5], "test_acc": [0.5]}), (0.0,), 3, None, out,
                                       (0.5, 0.5), "a", "prototype")
    assert list(inputs.loc[inputs["inputs"] == "centred", "certified"]) == list(out["certified"])


def test_draw_results_keep_their_grid_accuracies():
    acc = np.random.default_rng(0).random((3, 5, 2))
    d = DrawResults(correct={"draw/prototype/1": np.ones((1, 4, 7), bool)}, draws=2, concept_type="prototype",
                    accuracy={"draw/prototype/1": acc}, cs=CS)
    back = DrawResults.from_tensors({k: v for k, v in d.to_tensors().items()})
    assert back.cs == CS and np.array_equal(back.accuracy["draw/prototype/1"], acc)
    assert set(back.correct) == {"draw/prototype/1"}


def test_the_verdict_is_printed_beside_the_headline_and_plotted(tmp_path):
    from matplotlib.figure import Figure

    from iis_study.core.reporting.report import specification_figure
    from iis_study.new_study import summary

    iis_scores, tables = _study(keep_wide_slope=-0.6)
    curve, record = specification_curve(iis_scores, PARAMS, SWEEP, ["prototype"], tables)
    fig = specification_figure(curve, record)
    assert isinstance(fig, Figure) and len([ax for ax in fig.axes if ax.get_title()]) == len(PARAMS.scopes)
    table = iis_scores.assign(iis=0.8, iis_ci_low=0.7, iis_ci_high=0.9, certified=True)
    table.to_csv(tmp_path / "iis_scores.csv", index=False)
    import json

    (tmp_path / "specification_curve.json").write_text(json.dumps(record))
    text = summary(tmp_path / "iis_scores.csv")
    assert "prototype (pretrained, 6 representations): sign not identified" in text and "head_grid" in text

"""The specification curve (core/specification.py): the sign of the accuracy-score correlation under every
reasonable analysis choice, and its verdict. Synthetic studies whose answer is known: one where every
specification agrees (verdict "robust"), one where the heads' L2 grid alone flips the sign (verdict "not
identified", that knob named)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iis_study.core import specification as spec
from iis_study.core.calibration import DrawResults
from iis_study.core.config import SpecificationParams
from iis_study.core.heads.datatypes import SweepParams
from iis_study.core.reporting import specification_curve

SPARSITIES = (0.0, 0.5, 0.9)
CS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _inputs(acc: float, keep_narrow: float, keep_wide: float, k: int = 10) -> pd.DataFrame:
    """One representation's accuracies: the probe (every input scaling the same, test ``acc`` at every C, best val
    at C = 10), and the heads of two concept draws and a random null: at C = 10 they keep ``keep_narrow`` of the
    probe's accuracy at every sparsity, at C = 1000 (the best val of all, reachable only from the full grid)
    ``keep_wide``; the null keeps 0.9 of it everywhere."""
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
                        val, keep = 0.5, 0.9
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
    return out[spec.INPUT_COLUMNS]


def _study(keep_wide_slope: float):
    """Six pretrained representations, probe accuracy 0.5 ... 0.9; the narrow grid's retention rises with
    accuracy; the full grid's retention moves with ``keep_wide_slope``."""
    accs = np.linspace(0.5, 0.9, 6)
    names = [f"r{i}" for i in range(6)]
    tables = [_inputs(a, 0.6 + 0.4 * (a - 0.5), 0.8 + keep_wide_slope * (a - 0.5)) for a in accs]
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
        params.check_grids(CS)
    with pytest.raises(ValueError, match="specification.probe_inputs"):
        SpecificationParams(probe_inputs=["whitened"])


def test_draw_results_keep_their_grid_accuracies():
    acc = np.random.default_rng(0).random((3, 5, 2))
    d = DrawResults(correct={"draw/prototype/1": np.ones((1, 4, 7), bool)}, draws=2, concept_type="prototype",
                    accuracy={"draw/prototype/1": acc}, cs=CS)
    back = DrawResults.from_tensors({k: v for k, v in d.to_tensors().items()})
    assert back.cs == CS and np.array_equal(back.accuracy["draw/prototype/1"], acc)
    assert set(back.correct) == {"draw/prototype/1"}


def test_the_verdict_is_printed_beside_the_headline_and_plotted(tmp_path):
    from matplotlib.figure import Figure

    from iis_study.core.reporting import specification_figure
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

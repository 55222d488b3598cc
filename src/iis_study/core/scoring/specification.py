"""A specification curve for the correlation of accuracy with the score across representations, and its
verdict on the sign (docs/calibration.md, "Is the sign robust?").

One signed number (Pearson r of probe accuracy with IIS over the pretrained representations) hangs on analysis
choices nobody would defend as the one right one: the heads' L2 grid, the probe's grid and input scaling, which
probe's accuracy is the x axis, the raw score or one corrected for chance or for a null. This module computes the
correlation under every combination of those *knobs* and says whether the sign survives them.

Most of it needs no new solve. The convex estimator solves every head of the sparsity x L2 grid; the study keeps
each head's val and test accuracy (draw 0 in its sweep table, the other draws and the nulls in
:class:`~iis_study.core.scoring.calibration.DrawResults`), so a narrower grid is a re-selection on val (largest val
accuracy, ties to the stronger penalty, as the study selects), identical to a run on that grid up to solver
tolerance (that run warm-starts a shorter path) -- not with ``sweep.l2_path``, whose paths stop early: there only
the sweep's own grid is used (:meth:`~iis_study.core.scoring.blocks.SpecificationParams.resolve_grids`). The probe on other inputs (centred only, or each
feature standardised) is one extra batched solve per representation (:func:`probe_variants`).

* :func:`grid_accuracy` -- a sweep table's interpretation heads as a (P, L, 2) val / test array.
* :func:`probe_variants` -- the probe on the other inputs, every L2 strength: val and test accuracy.
* :func:`specification_inputs` -- one representation and concept type's accuracies of every head, set and probe.
* :func:`representation_values` -- each representation's accuracy and scores under every (grid, grid, inputs).
* :func:`specification_curve` -- the correlation under every specification, and per concept type and scope the
  verdict: how many specifications agree on the sign, the range of r, each knob's main effect and the knob that
  sets the sign, the sign within each score over the other knobs, and the leave-one-out leverage of each
  representation.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .blocks import SpecificationParams
from .inference import MIN_INTERVAL, TOO_FEW, permutation_p

logger = logging.getLogger(__name__)

INPUT_COLUMNS = ["backbone", "concept_type", "concept_set", "draw", "inputs", "sparsity", "c", "val_acc", "test_acc",
                 "num_classes", "certified"]
KNOBS = ("head_grid", "probe_grid", "probe_inputs", "accuracy", "score")
CURVE_COLUMNS = ["concept_type", "scope", *KNOBS, "n", "pearson_r", "pearson_p_perm", "spearman_r", "spearman_p_perm",
                 "headline"]
ROBUST = "sign robust"
NOT_IDENTIFIED = "sign not identified across reasonable formulations"


# --------------------------------------------------------------------------- the stored accuracies


def grid_accuracy(table: pd.DataFrame, sparsities: Sequence[float]) -> np.ndarray:
    """The interpretation heads of a convex sweep table as a float (P, L, 2) array: val (``[..., 0]``) and test
    (``[..., 1]``) accuracy per sparsity (in the grid's order) and L2 strength (increasing); NaN: not solved."""
    part = table[table["head"] == "interp"]
    cs = np.sort(pd.unique(part["c"].astype(float)))
    out = np.full((len(sparsities), cs.size, 2), np.nan)
    sp = part["sparsity"].to_numpy(dtype=float)
    ci = np.searchsorted(cs, part["c"].to_numpy(dtype=float))
    for pi, s in enumerate(sparsities):
        rows = np.isclose(sp, float(s))
        out[pi, ci[rows], 0] = part["val_acc"].to_numpy(dtype=float)[rows]
        out[pi, ci[rows], 1] = part["test_acc"].to_numpy(dtype=float)[rows]
    return out


def probe_variants(
    splits: Mapping[str, Any], num_classes: int, cs: Sequence[float], inputs: Sequence[str], tolerance: float,
    max_iter: int, solver: str = "newton", device: str = "cpu",
) -> pd.DataFrame:
    """The linear probe on other inputs than the study's (``centred``: the train mean removed, nothing else;
    ``standardised``: each feature also divided by its train standard deviation), solved to ``tolerance`` at every
    L2 strength of ``cs``: one row per (inputs, c) with ``val_acc``, ``test_acc``, ``grad``, ``certified``,
    ``iterations``. ``rms`` (the study's probe) is not solved again: the sweep table holds it. Features stored out
    of core are not standardised here (a warning; no rows)."""
    from ..heads.convex import FeatureDesign, correct_predictions
    from ..solvers.lbfgs import solve_logistic
    from ..representations.store import ShardedArray

    wanted = [i for i in inputs if i != "rms"]
    rows: list[dict[str, Any]] = []
    if not wanted:
        return pd.DataFrame(rows, columns=["inputs", "c", "val_acc", "test_acc", "grad", "certified", "iterations"])
    if any(isinstance(splits[s].x, ShardedArray) for s in ("train", "val", "test")):
        logger.warning("specification: probe inputs %s need the features in memory; left out", wanted)
        return pd.DataFrame(rows, columns=["inputs", "c", "val_acc", "test_acc", "grad", "certified", "iterations"])
    cs = sorted(float(c) for c in cs)
    xs = {s: splits[s].x.to(device=device, dtype=torch.float32) for s in ("train", "val", "test")}
    ys = {s: splits[s].y.to(device=device, dtype=torch.long) for s in ("train", "val", "test")}
    mean = xs["train"].to(torch.float64).mean(0)
    for kind in wanted:
        if kind == "centred":
            shift, div = mean, torch.ones_like(mean)
        elif kind == "standardised":
            sd = xs["train"].to(torch.float64).std(0, unbiased=False)
            shift, div = mean, torch.where(sd > 0, sd, torch.ones_like(sd))
        else:
            raise ValueError(f"specification.probe_inputs: unknown inputs {kind!r}")
        designs = {s: FeatureDesign((xs[s].to(torch.float64) / div).to(torch.float32), shift / div, 1.0, ys[s], device)
                   for s in xs}
        fit = solve_logistic(designs["train"], int(num_classes), cs, tol=tolerance, max_iter=max_iter, device=device,
                             solver=solver)
        acc = {s: correct_predictions(designs[s], fit.weight, fit.bias)[0].double().mean(-1).cpu().numpy() for s in ("val", "test")}
        solved = fit.solved[0].cpu().numpy()
        for li, c in enumerate(cs):
            grad = float(fit.grad[0, li])
            rows.append({"inputs": kind, "c": c, "val_acc": float(acc["val"][li]) if solved[li] else math.nan,
                         "test_acc": float(acc["test"][li]) if solved[li] else math.nan, "grad": grad,
                         "certified": bool(solved[li] and grad <= tolerance), "iterations": int(fit.iterations[0, li])})
        logger.info("specification probe (%s inputs): val %s, test %s over C = %s", kind,
                    ", ".join(f"{a:.3f}" for a in acc["val"]), ", ".join(f"{a:.3f}" for a in acc["test"]), cs)
        uncertified = [r["c"] for r in rows if r["inputs"] == kind and not r["certified"]]
        if uncertified:
            logger.warning("specification probe (%s inputs): not certified (gradient above %.1e after %d "
                           "iterations) at C = %s: its accuracies there are not the optimum's", kind, tolerance,
                           max_iter, uncertified)
    return pd.DataFrame(rows)


def specification_inputs(
    table: pd.DataFrame, sparsities: Sequence[float], num_classes: int, draws: Any, probes: pd.DataFrame,
    reference: tuple[float, float], backbone: str = "", concept_type: str = "",
) -> pd.DataFrame:
    """One representation and concept type's accuracies, long (:data:`INPUT_COLUMNS`): every interpretation head
    of draw 0 (``table``, the sweep's), of the other draws and of each null's draws (``draws``, a
    :class:`~iis_study.core.scoring.calibration.DrawResults` with its ``accuracy``), the probe on each of its inputs and
    strengths (``rms`` from ``table``, the others from ``probes``), and the reference probe (``reference``: its val
    and test accuracy; ``concept_set`` ``reference``); every row marked by ``backbone`` and ``concept_type`` (the
    study's tables are joined on them). A ``draws`` with other draws or nulls but without their stored grid
    accuracies (a draws file from older code) is refused: the curve would silently read draw 0 only."""
    if draws is not None and (int(draws.draws) > 1 or draws.nulls):
        expected = list(draws.draw_sets()) + [n for k in draws.nulls for n in draws.null_sets(k)]
        missing = [n for n in expected if n not in (getattr(draws, "accuracy", None) or {})]
        if missing:
            raise ValueError(
                f"specification inputs ({backbone or '?'}, {concept_type or draws.concept_type or '?'}): the draws "
                f"file has {int(draws.draws)} concept draws and nulls {list(draws.nulls)} but no stored grid "
                f"accuracies for {len(missing)} of its sets (e.g. {missing[0]}): written by older code; rerun the "
                "interpretability pipeline (or set specification.enabled: false)")
    parts = []
    probe = table[table["head"] == "probe"]
    parts.append(pd.DataFrame({"concept_set": "probe", "draw": 0, "inputs": "rms", "sparsity": math.nan,
                               "c": probe["c"].to_numpy(dtype=float), "val_acc": probe["val_acc"].to_numpy(dtype=float),
                               "test_acc": probe["test_acc"].to_numpy(dtype=float)}))
    if probes is not None and len(probes):
        parts.append(pd.DataFrame({"concept_set": "probe", "draw": 0, "inputs": probes["inputs"].astype(str).to_numpy(),
                                   "sparsity": math.nan, "c": probes["c"].to_numpy(dtype=float),
                                   "val_acc": probes["val_acc"].to_numpy(dtype=float),
                                   "test_acc": probes["test_acc"].to_numpy(dtype=float),
                                   "certified": probes["certified"].astype(object).to_numpy()
                                   if "certified" in probes else None}))
    parts.append(pd.DataFrame({"concept_set": ["reference"], "draw": [0], "inputs": [""], "sparsity": [math.nan],
                               "c": [math.nan], "val_acc": [float(reference[0])], "test_acc": [float(reference[1])]}))
    cs = np.sort(pd.unique(table.loc[table["head"] == "interp", "c"].astype(float)))
    sets = [("concepts", 0, grid_accuracy(table, sparsities))]
    if draws is not None and getattr(draws, "accuracy", None):
        sets += [("concepts", int(n.rsplit("/", 1)[1]), draws.accuracy[n]) for n in draws.draw_sets()
                 if n in draws.accuracy]
        sets += [(f"null_{k}", int(n.rsplit("/", 1)[1]), draws.accuracy[n]) for k in draws.nulls
                 for n in draws.null_sets(k) if n in draws.accuracy]
    s = np.asarray(sparsities, dtype=float)
    for concept_set, draw, acc in sets:
        grid_c = np.asarray(draws.cs, dtype=float) if concept_set != "concepts" or draw else cs
        parts.append(pd.DataFrame({"concept_set": concept_set, "draw": draw, "inputs": "",
                                   "sparsity": np.repeat(s, grid_c.size), "c": np.tile(grid_c, s.size),
                                   "val_acc": acc[..., 0].reshape(-1), "test_acc": acc[..., 1].reshape(-1)}))
    out = pd.concat(parts, ignore_index=True)
    out["num_classes"] = int(num_classes)
    if "certified" not in out:
        out["certified"] = None
    out["certified"] = out["certified"].astype(object)  # the variant probes' flag; empty for the sweep's rows
    out["backbone"] = str(backbone)
    out["concept_type"] = str(concept_type or getattr(draws, "concept_type", "") or "")
    return out[INPUT_COLUMNS]


# --------------------------------------------------------------------------- re-selection and scores


def _select(val: np.ndarray, test: np.ndarray, cs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Test accuracy of the strength selected on val among ``allowed`` along the last axis (largest val
    accuracy, ties to the smaller C, never an unsolved head): the study's rule (heads.convex._select)."""
    v = np.where(allowed & np.isfinite(val), val, -np.inf)
    best = v.max(-1, keepdims=True)
    cand = np.where((v >= best) & np.isfinite(v), cs, np.inf)
    idx = cand.argmin(-1)
    out = np.take_along_axis(test, idx[..., None], -1)[..., 0]
    return np.where(np.isfinite(best[..., 0]), out, np.nan)


def _trapezoid(s: np.ndarray, arr: np.ndarray) -> np.ndarray:
    return (np.diff(s) * (arr[..., 1:] + arr[..., :-1]) / 2.0).sum(-1)


def representation_values(
    inputs: pd.DataFrame, sparsities: Sequence[float], head_grids: Mapping[str, Sequence[float]],
    probe_grids: Mapping[str, Sequence[float]], probe_inputs: Sequence[str],
) -> pd.DataFrame:
    """One representation and concept type under every (head grid, probe grid, probe inputs): a row with
    ``probe`` (the probe's test accuracy), ``reference``, ``iis`` (the mean over concept draws of each draw's area
    under A(s) / A_std), ``iis_chance_corrected`` (NaN at a probe not above chance) and ``iis_excess_<kind>`` (the
    mean over draws of draw r's IIS less null draw r's)."""
    s = np.asarray(sparsities, dtype=float)
    k = int(inputs["num_classes"].iloc[0])
    chance = 1.0 / k
    ref = float(inputs.loc[inputs["concept_set"] == "reference", "test_acc"].iloc[0])
    probe = inputs[inputs["concept_set"] == "probe"]
    heads = inputs[~inputs["concept_set"].isin(["probe", "reference"])]
    # every set's (P, L) val / test arrays, by (concept_set, draw)
    sets: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for (cset, draw), part in heads.groupby(["concept_set", "draw"], sort=False):
        cs = np.sort(pd.unique(part["c"].astype(float)))
        part = part.sort_values(["sparsity", "c"])
        if len(part) != s.size * cs.size:
            raise ValueError(f"specification inputs: {cset} draw {draw} holds {len(part)} heads, not "
                             f"{s.size} sparsities x {cs.size} strengths")
        sets[cset, int(draw)] = (cs, part["val_acc"].to_numpy(float).reshape(s.size, cs.size),
                                 part["test_acc"].to_numpy(float).reshape(s.size, cs.size))
    rows = []
    for (pname, pgrid), pin in itertools.product(probe_grids.items(), probe_inputs):
        prows = probe[probe["inputs"] == pin].sort_values("c")
        if prows.empty:
            continue
        pcs = prows["c"].to_numpy(float)
        a_std = float(_select(prows["val_acc"].to_numpy(float), prows["test_acc"].to_numpy(float), pcs,
                              np.isin(pcs, np.asarray(pgrid, dtype=float))))
        for hname, hgrid in head_grids.items():
            per_set = {}
            for key, (cs, val, test) in sets.items():
                a = _select(val, test, cs, np.isin(cs, np.asarray(hgrid, dtype=float)))
                with np.errstate(divide="ignore", invalid="ignore"):
                    cc = _trapezoid(s, (a - chance) / (a_std - chance)) if a_std > chance else math.nan
                    per_set[key] = (float(_trapezoid(s, a / a_std)), float(cc))
            draws = sorted(d for c, d in per_set if c == "concepts")
            row = {"head_grid": hname, "probe_grid": pname, "probe_inputs": pin, "probe": a_std, "reference": ref,
                   "iis": float(np.mean([per_set["concepts", d][0] for d in draws])),
                   "iis_chance_corrected": float(np.mean([per_set["concepts", d][1] for d in draws]))}
            for cset in sorted({c for c, _ in per_set if c != "concepts"}):
                paired = [d for d in draws if (cset, d) in per_set]
                row[f"iis_excess_{cset[len('null_'):]}"] = float(np.mean(
                    [per_set["concepts", d][0] - per_set[cset, d][0] for d in paired]))
            rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the curve and its verdict


def _scope_rows(values: pd.DataFrame, scope: str, near_chance: float) -> pd.Series:
    pretrained = values["weights"].astype(str) != "random"
    above = values["study_accuracy"] >= near_chance / values["num_classes"]
    return {"all": pd.Series(True, index=values.index), "pretrained": pretrained, "above_chance": above,
            "pretrained_above_chance": pretrained & above}[scope]


def _r(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman r (NaN with fewer than 3 points or a constant)."""
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(np.corrcoef(x, y)[0, 1]), float(stats.spearmanr(x, y)[0])


def _sign_counts(r: pd.Series) -> tuple[int, int, int]:
    r = r.dropna()
    return int((r > 0).sum()), int((r < 0).sum()), int(r.size)


def _main_effects(curve: pd.DataFrame, knobs: Sequence[str]) -> dict[str, Any]:
    """Per knob with more than one level: the mean r at each level, the effect (largest less smallest level
    mean), whether the level means have both signs, and whether the knob *sets* the sign (every specification of
    a level has the same sign, and the levels differ)."""
    out = {}
    for knob in knobs:
        levels = list(pd.unique(curve[knob]))
        if len(levels) < 2:
            continue
        means = {str(lv): float(curve.loc[curve[knob] == lv, "pearson_r"].mean()) for lv in levels}
        signs = []
        for lv in levels:
            pos, neg, n = _sign_counts(curve.loc[curve[knob] == lv, "pearson_r"])
            signs.append(1 if pos == n and n else (-1 if neg == n and n else 0))
        vals = [v for v in means.values() if math.isfinite(v)]
        out[knob] = {
            "mean_r": {lv: json_safe(m) for lv, m in means.items()},  # None: no defined r at that level (strict JSON)
            "effect": float(max(vals) - min(vals)) if vals else None,
            "level_means_of_both_signs": bool(vals and min(vals) < 0 < max(vals)),
            "sets_the_sign": bool(0 not in signs and len(set(signs)) > 1),
        }
    return out


def _verdict_text(pos: int, neg: int, n: int, effects: Mapping[str, Any]) -> str:
    if n == 0:
        return "no specification defined (too few representations)"
    if pos == n or neg == n:
        return f"{ROBUST} ({n} of {n} specifications agree, r {'> 0' if pos == n else '< 0'})"
    setters = [k for k, e in effects.items() if e["sets_the_sign"]]
    big = max(effects, key=lambda k: effects[k]["effect"] if effects[k]["effect"] is not None else -1) \
        if effects else None
    why = (f"; the sign is set by {', '.join(setters)}" if setters
           else f"; largest main effect: {big}" if big else "")
    return f"{NOT_IDENTIFIED} ({pos} positive, {neg} negative of {n}){why}"


def specification_curve(
    values: pd.DataFrame, params: SpecificationParams, headline: Mapping[str, str] | None,
    head_grids: Mapping[str, Sequence[float]] | None = None, probe_grids: Mapping[str, Sequence[float]] | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The correlation of accuracy with the score under every specification, and its verdict.

    ``values``: :func:`representation_values` rows of every representation and concept type, with columns
    ``backbone``, ``representation``, ``concept_type``, ``weights``, ``num_classes``, ``study_accuracy`` (the
    study's probe test accuracy, for the near-chance rule). ``headline``: the headline specification's level of
    each knob (the study's own analysis; None: none on the curve, no headline r and no leverage);
    ``head_grids`` / ``probe_grids``: the grids of ``values`` (for the record; ``params``' when None). Returns the curve (one row per concept type, scope and specification:
    ``n``, ``pearson_r``, ``pearson_p_perm``, ``spearman_r``, ``spearman_p_perm``, ``headline``) and the record:
    per concept type and scope the verdict, the range of r, each knob's main effect, the leave-one-out leverage
    of each representation at the headline specification (flagged beyond ``params.leverage``)."""
    scores = [sc for sc in params.scores if sc in values and values[sc].notna().any()]
    long = values.melt(
        id_vars=["backbone", "representation", "concept_type", "weights", "num_classes", "study_accuracy",
                 "head_grid", "probe_grid", "probe_inputs", "probe", "reference"],
        value_vars=scores, var_name="score", value_name="y")
    long = long.melt(
        id_vars=[c for c in long if c not in ("probe", "reference")], value_vars=list(params.accuracy),
        var_name="accuracy", value_name="x")
    rows, records = [], []
    for ctype in pd.unique(values["concept_type"]):
        typed = long[long["concept_type"] == ctype]
        for scope in params.scopes:
            reps = values[(values["concept_type"] == ctype)].drop_duplicates("backbone")
            keep = set(reps.loc[_scope_rows(reps, scope, params.near_chance), "backbone"])
            part = typed[typed["backbone"].isin(keep)]
            spec_rows = []
            for spec, g in part.groupby(list(KNOBS), sort=False):
                ok = np.isfinite(g["x"].to_numpy(float)) & np.isfinite(g["y"].to_numpy(float))
                x, y = g["x"].to_numpy(float)[ok], g["y"].to_numpy(float)[ok]
                pr, sr = _r(x, y)
                pp = (permutation_p(x, y, n_perm=params.n_perm, seed=params.seed) if math.isfinite(pr)
                      else {"pearson": math.nan, "spearman": math.nan})
                spec_rows.append({"concept_type": ctype, "scope": scope, **dict(zip(KNOBS, spec)), "n": int(ok.sum()),
                                  "pearson_r": pr, "pearson_p_perm": pp["pearson"], "spearman_r": sr,
                                  "spearman_p_perm": pp["spearman"],
                                  "headline": bool(headline) and all(dict(zip(KNOBS, spec))[k] == headline[k]
                                                                     for k in KNOBS)})
            curve = pd.DataFrame(spec_rows)
            rows.extend(spec_rows)
            records.append(_record(ctype, scope, sorted(keep), curve, part, headline, params))
    table = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    knobs = _levels(values, params, scores, head_grids, probe_grids)
    return table, {"statistic": "pearson", "knobs": knobs, "headline_specification":
                   dict(headline) if headline else None, "near_chance_rule": f"study probe test accuracy < {params.near_chance:g}/K",
                   "verdicts": records}


def _levels(values: pd.DataFrame, params: SpecificationParams, scores: list[str], head_grids: Any = None,
            probe_grids: Any = None) -> dict[str, Any]:
    head_grids = head_grids if head_grids is not None else params.head_grids or {}
    probe_grids = probe_grids if probe_grids is not None else params.probe_grids or {}
    return {"head_grid": {k: list(v) for k, v in head_grids.items()},
            "probe_grid": {k: list(v) for k, v in probe_grids.items()},
            "probe_inputs": [str(v) for v in pd.unique(values["probe_inputs"])],
            "accuracy": list(params.accuracy), "score": scores}


def _record(ctype: str, scope: str, keep: list[str], curve: pd.DataFrame, part: pd.DataFrame,
            headline: Mapping[str, str] | None, params: SpecificationParams) -> dict[str, Any]:
    """One (concept type, scope)'s verdict. Below ``MIN_INTERVAL`` (5) representations -- the correlation block's
    rule -- the verdict is "too few representations" whatever the signs; a robust sign that a single
    representation's removal (at the headline specification) reverses is qualified: "..., but it rests on <rep>"
    (``rests_on``). ``n_undefined``: specifications whose r is undefined (fewer than 3 points, or a constant);
    ``n_min``: the fewest representations any specification has (a score undefined for some drops them)."""
    rec: dict[str, Any] = {"concept_type": str(ctype), "scope": scope, "representations": keep,
                           "n_representations": len(keep)}
    if curve.empty:
        rec.update(n_specifications=0, verdict=_verdict_text(0, 0, 0, {}), robust=False)
        return rec
    pos, neg, n = _sign_counts(curve["pearson_r"])
    spos, sneg, sn = _sign_counts(curve["spearman_r"])
    effects = _main_effects(curve, KNOBS)
    head = curve[curve["headline"]]
    leverage = _leverage(part, headline, params.leverage) if headline else []
    robust = bool(n and (pos == n or neg == n))
    verdict = _verdict_text(pos, neg, n, effects)
    rests_on: list[str] = []
    if len(keep) < MIN_INTERVAL:
        robust, verdict = False, f"{TOO_FEW} ({len(keep)} < {MIN_INTERVAL}; {pos} positive, {neg} negative of {n})"
    elif robust:
        sign = 1.0 if pos == n else -1.0
        rests_on = [lv["representation"] for lv in leverage
                    if lv["r_without"] is not None and sign * lv["r_without"] <= 0]
        if rests_on:
            verdict = (f"{ROBUST} across specifications ({n} of {n} agree, r {'> 0' if sign > 0 else '< 0'}), but "
                       f"it rests on {', '.join(rests_on)} (without it the headline r changes sign)")
    rec.update(
        n_specifications=n, n_positive=pos, n_negative=neg, robust=robust,
        n_undefined=int(curve["pearson_r"].isna().sum()), n_min=int(curve["n"].min()), rests_on=rests_on,
        verdict=verdict,
        r_min=json_safe(curve["pearson_r"].min()), r_max=json_safe(curve["pearson_r"].max()),
        spearman={"n_positive": spos, "n_negative": sneg, "n": sn, "r_min": json_safe(curve["spearman_r"].min()),
                  "r_max": json_safe(curve["spearman_r"].max())},
        main_effects=effects,
        by_score=_by_score(curve),
        headline=({k: json_safe(head.iloc[0][k]) for k in ("pearson_r", "pearson_p_perm", "spearman_r", "spearman_p_perm")}
                  if len(head) else None),
        leverage=leverage,
    )
    return rec


def _by_score(curve: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The sign of Pearson r within each score over the other knobs (the formulation of heads and probe and the x
    axis): the raw IIS and its excess over a null are different quantities, so a sign that differs between scores
    is a finding about the scores, not an unidentified formulation. Per score: ``n_positive``, ``n_negative``,
    ``n``, ``signs_agree`` (every specification of the score has one sign: a count, not a verdict -- the record's
    own rules, too few representations and a sign resting on one, are not applied here), ``r_min``, ``r_max``."""
    out = {}
    for score, g in curve.groupby("score", sort=False):
        pos, neg, n = _sign_counts(g["pearson_r"])
        out[str(score)] = {"n_positive": pos, "n_negative": neg, "n": n,
                           "signs_agree": bool(n and (pos == n or neg == n)),
                           "r_min": json_safe(g["pearson_r"].min()), "r_max": json_safe(g["pearson_r"].max())}
    return out


def by_score_text(by_score: Mapping[str, Mapping[str, Any]]) -> str:
    """``iis 0+/24- (-0.59 to -0.32), ...``: each score's sign counts and r range over the other knobs."""
    return ", ".join(f"{k} {v['n_positive']}+/{v['n_negative']}- ({_fmt(v['r_min'])} to {_fmt(v['r_max'])})"
                     for k, v in by_score.items())


def _leverage(part: pd.DataFrame, headline: Mapping[str, str], threshold: float) -> list[dict[str, Any]]:
    """Pearson r at the headline specification without each representation in turn: ``r_without``, ``delta``
    (r_without - r) and ``flagged`` (|delta| > threshold)."""
    g = part
    for k in KNOBS:
        g = g[g[k] == headline[k]]
    g = g[np.isfinite(g["x"].astype(float)) & np.isfinite(g["y"].astype(float))]
    x, y = g["x"].to_numpy(float), g["y"].to_numpy(float)
    r, _ = _r(x, y)
    out = []
    for i, name in enumerate(g["representation"].astype(str)):
        mask = np.arange(len(g)) != i
        rw, _ = _r(x[mask], y[mask])
        delta = rw - r
        out.append({"representation": name, "r_without": json_safe(rw), "delta": json_safe(delta),
                    "flagged": bool(math.isfinite(delta) and abs(delta) > threshold)})
    return out


def json_safe(v: Any) -> Any:
    """A number as JSON can hold it: NaN becomes null (anything not a number passes through)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f


def verdict_lines(record: Mapping[str, Any], scope: str | None = None) -> list[str]:
    """One line per concept type for ``scope`` (the record's headline scope when None): the verdict, the range of
    r, the knobs' main effects and the flagged representations -- what is printed beside the headline."""
    scope = scope or record.get("headline_scope")
    lines = []
    for rec in record.get("verdicts", []):
        if rec["scope"] != scope:
            continue
        if not rec.get("n_specifications"):
            lines.append(f"{rec['concept_type']} ({scope}, {rec['n_representations']} representations): {rec['verdict']}")
            continue
        effects = ", ".join(f"{k} {_fmt(e['effect'], '.2f')}" for k, e in sorted(
            rec["main_effects"].items(), key=lambda kv: -(kv[1]["effect"] if kv[1]["effect"] is not None else 0)))
        flagged = [f"{lv['representation']} ({lv['delta']:+.2f})" for lv in rec["leverage"] if lv["flagged"]]
        h = rec.get("headline") or {}
        lines.append(
            f"{rec['concept_type']} ({scope}, {rec['n_representations']} representations): {rec['verdict']}; "
            f"Pearson r {_fmt(rec['r_min'])} to {_fmt(rec['r_max'])} (headline {_fmt(h.get('pearson_r'))}); "
            f"main effects on r: {effects or 'none'}; within each score: {by_score_text(rec.get('by_score', {})) or 'n/a'}; "
            f"leverage > {record.get('leverage', 0.2):g}: {', '.join(flagged) or 'none'}")
    return lines


def _fmt(v: Any, spec: str = "+.2f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(float(v), spec)

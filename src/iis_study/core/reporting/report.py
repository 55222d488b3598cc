"""The study's tables and correlations over representations (METHOD §6): gather every
representation's scores and curves, correlate accuracy with IIS per scope (all, pretrained, family)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..scoring import specification as spec
from ..concepts.acquisition import ConceptSet
from ..concepts.elements import Elements
from ..concepts.blocks import ConceptParams
from ..scoring.blocks import CorrelationParams, SpecificationParams
from .blocks import GalleryParams
from ..representations.blocks import backbone_fields
from ..data import ImageSet
from ..representations.features import FeatureSet
from ..heads import SweepResult
from ..heads.datatypes import SweepParams
from ..scoring.inference import correlate_across, ranking_stability
from ..concepts.nulls import NULL_KINDS
from ..scoring.results import Scores

logger = logging.getLogger(__name__)

SCORE_COLUMNS = [
    "backbone",
    "representation",
    "concept_type",
    "model",
    "weights",
    "family",
    "layer",
    "input_size",
    "accuracy_linear_probe",
    "accuracy_linear_probe_std",
    "iis",
    "iis_std",
    "iis_ci_low",
    "iis_ci_high",
    "iis_chance_corrected",
    "n_draws",
    "iis_sd_test",
    "iis_sd_draw",
    "iis_share_draw",
    *(f"{c}_{k}{e}" for k in NULL_KINDS for c, e in (("iis_null", ""), ("iis_excess", ""), ("iis_excess", "_ci_low"),
                                                        ("iis_excess", "_ci_high"), ("iis_excess", "_detectable"),
                                                        ("iis_excess", "_n_test_needed"))),
    "iis_se",  # the size check (core/scoring/power.py): the smallest IIS difference between two representations it detects
    "iis_detectable_difference",
    "n_test",
    "power",
    "n_seeds",
    "estimator",
    "certified",
    "max_grad",
    "iterations",
    "steps",
    "batch_size",
    "probe_converged",
    "heads_converged",
    "probe_val_acc",
    "reference_val_acc",
]


INTEGER_COLUMNS = ["n_draws", "n_seeds", "n_test", "n_boot", "iterations", "steps", "batch_size", "epochs", "n_rising", "n_heads"]


def collect_scores(
    backbones: dict[str, Any], concepts: ConceptParams, results: Sequence[Scores | pd.DataFrame]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table of scores and one long table of curves over all representations and concept types.

    ``results``: for each representation of ``backbones`` and, within it, each type of ``concepts.types``
    (rows in that order), its :class:`~iis_study.core.scoring.results.Scores` and its curve table, one after the other.
    """
    concepts = ConceptParams.from_params(concepts)
    pairs = [(name, ctype) for name in backbones for ctype in concepts.types]
    if len(results) != 2 * len(pairs):
        raise ValueError(
            f"collect_scores: {len(results)} inputs for {len(pairs)} (representation, concept type) pairs; "
            "each needs its scores and its curve"
        )
    by_pair = {pair: (results[2 * i], results[2 * i + 1]) for i, pair in enumerate(pairs)}
    rows, curves = [], []
    for name, entry in backbones.items():
        rep = backbone_fields(entry)
        for ctype in concepts.types:
            scores, curve = by_pair[name, ctype]
            scores = scores.to_dict() if isinstance(scores, Scores) else dict(scores)
            rows.append(
                {
                    "backbone": name,
                    "representation": rep["label"] or name,
                    "concept_type": ctype,
                    "model": rep["model"],
                    "weights": rep["weights"],
                    "family": rep["family"],
                    "layer": rep["layer"],
                    "input_size": rep["input_size"],
                    **scores,
                }
            )
            c = curve.copy()
            c.insert(0, "concept_type", ctype)
            c.insert(0, "backbone", name)
            curves.append(c)
    table = pd.DataFrame(rows)
    for col in INTEGER_COLUMNS:  # counts stay integers when some rows lack them (estimators differ per row)
        if col in table:
            table[col] = table[col].astype("Int64")
    table = table[[c for c in SCORE_COLUMNS if c in table] + [c for c in table if c not in SCORE_COLUMNS]]
    for flag, what in (("probe_converged", "linear probe"), ("heads_converged", "interpretation heads")):
        if flag in table and not table[flag].astype(bool).all():
            bad = table.loc[~table[flag].astype(bool), ["representation", "concept_type"]]
            logger.warning(
                "NOT converged (%s): %s; their scores are marked in the plots -- raise sweep.max_iter (convex) "
                "or sweep.steps (adam)",
                what,
                ", ".join(f"{r}/{c}" for r, c in bad.itertuples(index=False)),
            )
    return table, pd.concat(curves, ignore_index=True)


def _correlate_table(table: pd.DataFrame, correlation: CorrelationParams, scope: str, group: str) -> dict[str, Any]:
    """``{concept_type: {score: coefficients}}`` over the rows of ``table`` (scores the table lacks, e.g. a
    null that was not run, are skipped)."""
    out: dict[str, Any] = {}
    for ctype, rows in table.groupby("concept_type", sort=False):
        out[ctype] = {}
        for score in correlation.scores:
            if score not in rows or rows[score].isna().all():
                continue
            finite = rows[score].notna() & rows["accuracy_linear_probe"].notna()
            if not finite.all():
                left_out = rows.loc[~finite, "representation" if "representation" in rows else "backbone"]
                logger.warning(
                    "[%s %s] %s / %s: left out of the correlation (score undefined, e.g. A_std <= 1/K): %s",
                    scope, group, ctype, score, ", ".join(map(str, left_out)),
                )
            # whole families are resampled across families; within one family its representations are the units
            families = rows.loc[finite, "family"].tolist() if "family" in rows and scope != "family" else None
            res = correlate_across(
                rows.loc[finite, "accuracy_linear_probe"].to_numpy(),
                rows.loc[finite, score].to_numpy(),
                families=families,
                n_boot=correlation.n_boot,
                seed=correlation.seed,
                ci=correlation.ci,
            )
            n = int(res.pop("n", len(rows)))
            entry: dict[str, Any] = {k: ({kk: spec.json_safe(vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
                                     for k, v in res.items()}
            entry["n_backbones"] = n
            entry["scope"] = scope
            entry["left_out"] = [str(v) for v in rows.loc[~finite, "backbone"]]
            out[ctype][score] = entry
            logger.info(
                "[%s %s] %s / %s over %d representations: Pearson %s (permutation p %s), Spearman %s, Kendall %s; %s",
                scope,
                group,
                ctype,
                score,
                n,
                _fmt(entry["pearson"]["r"]),
                _fmt(entry["pearson"]["p_perm"]),
                *(_fmt(entry[m]["r"]) for m in ("spearman", "kendall")),
                entry["interval"],
            )
    return out


def _ranking_stability(table: pd.DataFrame) -> dict[str, Any]:
    """Per concept type, Kendall tau between the representations' IIS rankings under each pair of concept draws."""
    draw_cols = sorted((c for c in table if c.startswith("iis_draw") and c[8:].isdigit()), key=lambda c: int(c[8:]))
    if len(draw_cols) < 2:
        return {}
    return {
        str(ctype): {k: v if isinstance(v, int) else spec.json_safe(v)
                     for k, v in ranking_stability(rows[draw_cols].to_numpy(dtype=float)).items()}
        for ctype, rows in table.groupby("concept_type", sort=False)
    }


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):.3f}"


def _scope_tables(iis_scores: pd.DataFrame, groups: list[str]) -> list[tuple[str, str, pd.DataFrame]]:
    """(scope, group, rows) for every requested scope."""
    out = []
    for scope in groups:
        if scope == "all":
            out.append(("all", "all", iis_scores))
        elif scope == "pretrained":
            out.append(("pretrained", "pretrained", iis_scores[iis_scores["weights"].astype(str) != "random"]))
        elif scope == "family" and "family" in iis_scores:
            fam = iis_scores["family"]
            for name in pd.unique(fam[fam.notna()]):
                out.append(("family", str(name), iis_scores[fam == name]))
    return out


def correlate_scores(iis_scores: pd.DataFrame, correlation: CorrelationParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS (and the
    chance-corrected IIS), per concept type, with p-values and bootstrap intervals over representations.

    Returns:
        Each coefficient carries its parametric ``p``, its permutation ``p_perm`` (exact up to 8
        representations) and a bootstrap interval that resamples whole families, or none with fewer than 5
        units (``interval``: "too few representations"); each scope record carries ``ranking_stability``
        (Kendall tau between the IIS rankings of the concept draws).

        ``correlation``: the headline, over the pretrained representations (METHOD §6 correlates
        across pretrained backbones; over all of them when the study has no pretrained one or the
        scope is not requested), ``{concept_type: {score: {"pearson": {"r", "p", "p_perm", "ci_low",
        "ci_high"}, "spearman": ..., "kendall": ..., "n_backbones": n, "n_clusters": ..., "interval": ...,
        "scope": ..., "left_out": [...]}}}``; a representation whose score is undefined (NaN) is left out with a warning;
        ``correlation_scopes``: ``{"groups": [{"scope", "group", "representations", "n_representations",
        "correlation": {concept_type: {score: ...}}}, ...]}``, one record per scope of
        ``correlation.groups`` (``all``; ``pretrained``; ``family``: one record per family).
    """
    correlation = CorrelationParams.from_params(correlation)
    groups = list(correlation.groups)
    records = []
    for scope, group, rows in _scope_tables(iis_scores, groups):
        names = list(pd.unique(rows["representation"] if "representation" in rows else rows["backbone"]))
        records.append(
            {
                "scope": scope,
                "group": group,
                "representations": [str(n) for n in names],
                "n_representations": len(names),
                "correlation": _correlate_table(rows, correlation, scope, group),
                "ranking_stability": _ranking_stability(rows),
            }
        )
    # the headline: across pretrained representations (METHOD §6), else over all of them
    headline = next((r["correlation"] for r in records if r["scope"] == "pretrained" and r["n_representations"]), None)
    if headline is None:
        headline = next((r["correlation"] for r in records if r["scope"] == "all"), None)
    if headline is None:
        headline = _correlate_table(iis_scores, correlation, "all", "all")
    return headline, {"groups": records}


def _headline_level(grids: Mapping[str, Sequence[float]], l2_grid: Sequence[float], knob: str) -> str | None:
    """The grid equal to the study's own (the sweep's L2 grid); None (a warning: no headline specification,
    nothing to reproduce) when no grid is."""
    study = sorted(float(c) for c in l2_grid)
    found = next((name for name, g in grids.items() if sorted(float(c) for c in g) == study), None)
    if found is None:
        logger.warning("specification curve: no %s equals sweep.l2_grid %s: no headline specification (the "
                       "study's own analysis is not on the curve)", knob, study)
    return found


def specification_curve(
    iis_scores: pd.DataFrame, params: SpecificationParams, sweep: SweepParams,
    concept_types: Sequence[str] | ConceptParams, inputs: Sequence[pd.DataFrame],
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The specification curve of the study and its verdict (:mod:`~iis_study.core.scoring.specification`).

    ``inputs``: the :func:`~iis_study.core.scoring.specification.specification_inputs` tables of the representations and
    concept types, each marked by its ``backbone`` and ``concept_type`` columns and joined to ``iis_scores`` on
    them (an empty table: no curve for it, e.g. the adam estimator; ``concept_types``, or the ``concepts`` block's
    types, are the types the curve covers). The grids are :meth:`SpecificationParams.resolve_grids` of the sweep's
    (the notes in ``grid_notes``). The headline specification is the study's own analysis (the sweep's L2 grid for
    heads and probe, RMS-scaled probe inputs, the own probe's accuracy, the raw IIS); under it every
    representation's values must be those of ``iis_scores`` (``reproduces_study``: the largest difference; a
    warning beyond 1e-9)."""
    params = SpecificationParams.from_params(params)
    sweep = SweepParams.from_params(sweep)
    if not isinstance(concept_types, (list, tuple)):
        concept_types = ConceptParams.from_params(concept_types).types
    if not params.enabled:
        return pd.DataFrame(columns=spec.CURVE_COLUMNS), {"enabled": False, "verdicts": []}
    if sweep.estimator != "convex":
        logger.info("specification curve: sweep.estimator %s has no L2 grid to re-select; none made", sweep.estimator)
        return pd.DataFrame(columns=spec.CURVE_COLUMNS), {"enabled": True, "verdicts": [],
                                                          "note": f"sweep.estimator {sweep.estimator}: no L2 grid"}
    head_grids, probe_grids, notes = params.resolve_grids(sweep.l2_grid, sweep.l2_path)
    for note in notes:
        logger.warning("specification curve: %s", note)
    rows = iis_scores.set_index(["backbone", "concept_type"])
    values, seen = [], set()
    for table in inputs:
        if table is None or len(table) == 0:
            continue
        if not {"backbone", "concept_type"} <= set(table):
            raise ValueError("specification_curve: an input table without backbone / concept_type columns (from "
                             "older code): rerun the interpretability pipeline")
        backbone, ctype = str(table["backbone"].iloc[0]), str(table["concept_type"].iloc[0])
        if ctype not in concept_types:
            continue
        if (backbone, ctype) in seen:
            raise ValueError(f"specification_curve: two input tables for ({backbone}, {ctype})")
        seen.add((backbone, ctype))
        if (backbone, ctype) not in rows.index:
            raise ValueError(f"specification_curve: inputs for ({backbone}, {ctype}), which iis_scores lacks")
        v = spec.representation_values(table, sweep.sparsities, head_grids, probe_grids, params.probe_inputs)
        row = rows.loc[(backbone, ctype)]
        ids = {"backbone": backbone, "representation": str(row.get("representation", backbone)), "concept_type": ctype,
               "weights": str(row.get("weights")), "num_classes": int(table["num_classes"].iloc[0]),
               "study_accuracy": float(row["accuracy_linear_probe"])}
        values.append(v.assign(**ids))
    if not values:
        logger.warning("specification curve: no representation has the convex estimator's stored grid; none made")
        return pd.DataFrame(columns=spec.CURVE_COLUMNS), {"enabled": True, "verdicts": [],
                                                          "note": "no convex sweep tables"}
    order = {b: i for i, b in enumerate(pd.unique(iis_scores["backbone"]))}  # the study's order, whatever the inputs'
    values = pd.concat(values, ignore_index=True).sort_values("backbone", key=lambda b: b.map(order), kind="stable")
    values = values.reset_index(drop=True)
    headline = {"head_grid": _headline_level(head_grids, sweep.l2_grid, "head grid"),
                "probe_grid": _headline_level(probe_grids, sweep.l2_grid, "probe grid"),
                "probe_inputs": "rms" if "rms" in params.probe_inputs else params.probe_inputs[0],
                "accuracy": "probe" if "probe" in params.accuracy else params.accuracy[0],
                "score": "iis" if "iis" in params.scores else params.scores[0]}
    if headline["head_grid"] is None or headline["probe_grid"] is None:
        headline = None
    curve, record = spec.specification_curve(values, params, headline, head_grids, probe_grids)
    record["enabled"] = True
    record["leverage"] = params.leverage
    record["grid_notes"] = notes
    pretrained = (values["weights"] != "random").any() and "pretrained" in params.scopes
    record["headline_scope"] = "pretrained" if pretrained else params.scopes[0]
    record["reproduces_study"] = _reproduces(values, iis_scores, headline) if headline else None
    if record["reproduces_study"] is not None and record["reproduces_study"] > 1e-9:
        logger.warning("specification curve: the headline specification differs from iis_scores by %.2e",
                       record["reproduces_study"])
    record["headline_verdict"] = {rec["concept_type"]: rec["verdict"] for rec in record["verdicts"]
                                  if rec["scope"] == record["headline_scope"]}
    for line in spec.verdict_lines(record):
        logger.info("specification curve: %s", line)
    return curve, record


def _reproduces(values: pd.DataFrame, iis_scores: pd.DataFrame, headline: dict[str, str]) -> float | None:
    """The largest |difference| between the headline specification's scores and ``iis_scores``' (None: none to
    compare)."""
    head = values[(values["head_grid"] == headline["head_grid"]) & (values["probe_grid"] == headline["probe_grid"])
                  & (values["probe_inputs"] == headline["probe_inputs"])]
    merged = head.merge(iis_scores, on=["backbone", "concept_type"], suffixes=("", "_study"))
    diffs = [(merged["probe"] - merged["accuracy_linear_probe"]).abs()]
    for col in ("iis", "iis_chance_corrected", "iis_excess_random", "iis_excess_rotated", "iis_excess_gaussian"):
        if col in head and f"{col}_study" in merged:
            diffs.append((merged[col] - merged[f"{col}_study"]).abs())
    d = pd.concat(diffs).dropna()
    return float(d.max()) if len(d) else None


def specification_figure(curve: pd.DataFrame, record: dict[str, Any]):
    """The specification curve: r of every specification, sorted, per concept type and scope."""
    from . import plots

    if curve is None or len(curve) == 0:
        return _placeholder("no specification curve in this study")
    return plots.specification_curve(curve, record)


def correlation_table(correlation_scopes: dict[str, Any]) -> pd.DataFrame:
    """The scoped correlations as one long table: scope, group, concept_type, score, method, r, p, p_perm,
    ci_low, ci_high, n, interval (for notebooks and reports)."""
    rows = []
    for rec in correlation_scopes.get("groups", []):
        for ctype, by_score in rec["correlation"].items():
            for score, entry in by_score.items():
                for method in ("pearson", "spearman", "kendall"):
                    rows.append(
                        {
                            "scope": rec["scope"],
                            "group": rec["group"],
                            "concept_type": ctype,
                            "score": score,
                            "method": method,
                            **entry[method],
                            "n": entry["n_backbones"],
                            "interval": entry.get("interval"),
                        }
                    )
    return pd.DataFrame(rows)


def concept_gallery(
    features: FeatureSet,
    sweep_result: SweepResult,
    concepts: ConceptSet,
    concept_elements: Elements,
    splits: pd.DataFrame,
    images: ImageSet,
    gallery: GalleryParams,
):
    """For a few test images: the prediction and the concepts that drove it, shown as their
    source patches or segments (the interpretation a person reads)."""
    from . import plots
    from ..heads import explain

    gallery = GalleryParams.from_params(gallery)
    test_rows = splits[splits["split"] == "test"].reset_index(drop=True)
    # keep only the images that have features (skipped files left out)
    test_rows = test_rows.set_index("index").loc[features.test.index.numpy()].reset_index()
    n = min(gallery.n_images, len(test_rows))
    rng = np.random.default_rng(gallery.seed)
    pick = np.sort(rng.choice(len(test_rows), size=n, replace=False))
    z = features.test.x[pick]
    explanation = explain(sweep_result, concepts.space, z, sparsity=float(gallery.sparsity), top=gallery.top)
    imgs = np.stack([images.load(int(i)) for i in test_rows.loc[pick, "index"]])
    return plots.concept_gallery(
        imgs,
        test_rows.loc[pick, "label"].to_numpy(),
        list(images.classes),
        explanation,
        concept_elements.images,
        concepts.element_ids.numpy(),
        title=f"{concepts.concept_type} concepts, sparsity {gallery.sparsity}",
        masks=concept_elements.masks,
    )


def _labelled(iis_scores: pd.DataFrame) -> pd.DataFrame:
    """The table with each point named by its representation's readable name (``lite0@96/stage3``)."""
    if "representation" in iis_scores:
        return iis_scores.assign(backbone=iis_scores["representation"].fillna(iis_scores["backbone"]))
    return iis_scores


def iis_vs_accuracy_figure(iis_scores: pd.DataFrame, correlation: dict[str, Any]):
    """IIS against linear-probe accuracy, one point per representation, per concept type."""
    from . import plots

    return plots.iis_vs_accuracy(_labelled(iis_scores), correlation, score="iis")


def _placeholder(text: str):
    """A small figure that says why there is nothing to plot (a versioned save needs a file)."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(4, 1))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return fig


def scope_figures(iis_scores: pd.DataFrame, correlation_scopes: dict[str, Any]) -> dict[str, Any]:
    """One IIS-vs-accuracy figure per correlation scope, keyed by its file name (``<scope>.png``)."""
    from . import plots

    figures = plots.iis_vs_accuracy_by_scope(_labelled(iis_scores), correlation_scopes, score="iis")
    if not figures:  # e.g. correlation.groups: [family] without families; a versioned save needs a file
        figures = {"none": _placeholder("no correlation scope with representations")}
    return {f"{name}.png": fig for name, fig in figures.items()}


def nulls_figure(iis_scores: pd.DataFrame):
    """Each representation's IIS beside the IIS of its null concept sets, per concept type."""
    from . import plots

    return plots.iis_with_nulls(_labelled(iis_scores))


def anec_nulls_figure(iis_scores: pd.DataFrame):
    """Each representation's weight-sparsity accuracy (ANEC-avg) beside its nulls', per concept type; a placeholder
    when the study ran no weight-sparsity path."""
    from . import plots

    if "anec_avg" not in iis_scores or iis_scores["anec_avg"].isna().all():
        return _placeholder("no weight-sparsity path in this study")
    return plots.iis_with_nulls(_labelled(iis_scores), score="anec_avg", label="ANEC-avg (test accuracy)")


def sparsity_figure(sparsity_curves: pd.DataFrame):
    """ARR against sparsity for every representation, per concept type (the concept draws' curves: the band is
    their spread; the nulls' curves are in the table, not in this figure)."""
    from . import plots

    if "concept_set" in sparsity_curves:
        sparsity_curves = sparsity_curves[sparsity_curves["concept_set"] == "concepts"]
    return plots.sparsity_curves(sparsity_curves, value="arr")


def integrated_curves(sparsity_curves: pd.DataFrame) -> pd.DataFrame:
    """Each (backbone, concept type, concept set)'s curves integrated (trapezoid rule over the sparsities, not
    divided by the grid's span), averaged over seeds within a draw, then over draws: column ``iis``. The
    ``concepts`` rows must equal ``iis_scores``' ``iis`` and the ``null_<kind>`` rows its ``iis_null_<kind>``."""
    curves = sparsity_curves
    if "concept_set" not in curves:
        curves = curves.assign(concept_set="concepts", draw=0)
    keys = ["backbone", "concept_type", "concept_set"]
    rows = []
    for key, part in curves.groupby([*keys, "draw", "seed"], sort=False):
        part = part.sort_values("sparsity")
        s, a = part["sparsity"].to_numpy(dtype=float), part["arr"].to_numpy(dtype=float)
        rows.append((*key, float((np.diff(s) * (a[1:] + a[:-1]) / 2.0).sum())))
    per = pd.DataFrame(rows, columns=[*keys, "draw", "seed", "iis"])
    by_draw = per.groupby([*keys, "draw"], sort=False)["iis"].mean().reset_index()
    return by_draw.groupby(keys, sort=False)["iis"].mean().reset_index()

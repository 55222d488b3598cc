"""Nodes of the reporting pipeline: gather every backbone's scores, correlate, plot."""

from __future__ import annotations

import logging
import math
from typing import Any

import pandas as pd

from iis_study.core.scores import correlate

logger = logging.getLogger(__name__)

SCORE_COLUMNS = [
    "backbone",
    "concept_type",
    "model",
    "weights",
    "accuracy_linear_probe",
    "accuracy_linear_probe_std",
    "iis",
    "iis_std",
    "iis_ci_low",
    "iis_ci_high",
    "iis_chance_corrected",
    "n_seeds",
]


def collect_scores(
    backbones: dict[str, Any], concepts: dict[str, Any], *scores_and_curves: Any
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One table of scores and one long table of curves over all backbones and concept types.

    ``scores_and_curves`` holds, for each backbone (in ``backbones`` order) and each concept type
    (in ``concepts.types`` order), its scores dict followed by its curve table.
    """
    types = list(concepts["types"])
    expected = 2 * len(backbones) * len(types)
    if len(scores_and_curves) != expected:
        raise ValueError(f"collect_scores: expected {expected} inputs, got {len(scores_and_curves)}")
    rows, curves = [], []
    it = iter(scores_and_curves)
    for name, spec in backbones.items():
        for ctype in types:
            scores, curve = next(it), next(it)
            rows.append(
                {
                    "backbone": name,
                    "concept_type": ctype,
                    "model": spec.get("model"),
                    "weights": spec.get("weights", "offline"),
                    **scores,
                }
            )
            c = curve.copy()
            c.insert(0, "concept_type", ctype)
            c.insert(0, "backbone", name)
            curves.append(c)
    table = pd.DataFrame(rows)
    table = table[[c for c in SCORE_COLUMNS if c in table] + [c for c in table if c not in SCORE_COLUMNS]]
    return table, pd.concat(curves, ignore_index=True)


def correlate_scores(iis_scores: pd.DataFrame, correlation: dict[str, Any]) -> dict[str, Any]:
    """Pearson, Spearman and Kendall coefficients between linear-probe accuracy and IIS (and the
    chance-corrected IIS), per concept type, with p-values and bootstrap intervals over backbones."""
    out: dict[str, Any] = {}
    for ctype, group in iis_scores.groupby("concept_type", sort=False):
        out[ctype] = {}
        for score in correlation.get("scores", ["iis", "iis_chance_corrected"]):
            res = correlate(
                group["accuracy_linear_probe"].to_numpy(),
                group[score].to_numpy(),
                n_boot=int(correlation.get("n_boot", 2000)),
                seed=int(correlation.get("seed", 0)),
                ci=float(correlation.get("ci", 0.95)),
            )
            n = int(res.pop("n", len(group)))
            entry = {k: {kk: _clean(vv) for kk, vv in v.items()} for k, v in res.items()}
            entry["n_backbones"] = n
            out[ctype][score] = entry
            logger.info(
                "%s / %s over %d backbones: Pearson %.3f, Spearman %.3f, Kendall %.3f",
                ctype,
                score,
                n,
                entry["pearson"]["r"],
                entry["spearman"]["r"],
                entry["kendall"]["r"],
            )
    return out


def _clean(v: Any) -> Any:
    """JSON has no NaN: write null."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return None if math.isnan(f) else f

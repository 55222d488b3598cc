"""One representation's interpreters, as the interpretability pipeline runs them (METHOD §2-§4, §7).

The reference probe (L-BFGS), the batched sweep of every concept type (one shared linear probe),
and the scores with their convergence record. Features are the
:class:`~iis_study.core.representations.features.FeatureSet` of :func:`~iis_study.core.representations.extraction.extract_split_features`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..concepts.acquisition import ConceptSet
from .calibration import DrawResults, calibrated_scores
from .blocks import ScoringParams, SpecificationParams, WeightSparsityParams
from ..heads.datatypes import sweep_config
from .convergence import ReferenceProbe, budget_check, convergence_report, reference_probe
from ..data import SPLITS
from ..representations.features import FeatureSet
from ..heads import ConceptSpace, Split, SweepParams, SweepResult, HeadsProblem, fit_heads
from ..concepts.nulls import ConceptDraws, set_name
from .power import describe, detectable, size_warning
from .results import Scores
from .weight_sparsity import PATH_COLUMNS, elastic_net_paths, weight_sparsity_scores
from .scores import curve_table, plain_scores, score_sweep
from .specification import INPUT_COLUMNS, grid_accuracy, probe_variants, specification_inputs

logger = logging.getLogger(__name__)


def feature_splits(features: FeatureSet) -> dict[str, Split]:
    """The train / val / test :class:`~iis_study.core.heads.Split` of a representation's features."""
    return {s: Split(x=features.split(s).x, y=features.split(s).y) for s in SPLITS}


def train_representation(
    features: FeatureSet, feature_info: dict[str, Any], sweep: Mapping[str, Any] | SweepParams,
    concepts: Mapping[str, ConceptSet], draws: ConceptDraws | None = None,
) -> tuple[SweepResult | DrawResults, ...]:
    """:func:`train_splits` on a representation's features and its concept sets (the pipeline's
    ``train_interpreters``): the :class:`SweepResult` of each concept type of ``concepts``, the types in sorted
    order (whatever order the keywords came in), then the :class:`DrawResults` of each, in the same order."""
    spaces = {ctype: concept_set.space for ctype, concept_set in concepts.items()}
    num_classes = int(feature_info["num_classes"])
    sweeps, draw_results = train_splits(feature_splits(features), num_classes, sweep, spaces, draws)
    return (*(sweeps[t] for t in sorted(spaces)), *(draw_results[t] for t in sorted(spaces)))


def train_splits(
    splits: Mapping[str, Split], num_classes: int, sweep: Mapping[str, Any] | SweepParams | None,
    spaces: Mapping[str, ConceptSpace], draws: ConceptDraws | None = None, progress: bool = True,
) -> tuple[dict[str, SweepResult], dict[str, DrawResults]]:
    """Fit the linear probe and, for every concept space given by name, every interpretation head
    of the grid together, as one batched computation (the probe once, shared by the concept types),
    by ``sweep.estimator`` (:func:`~iis_study.core.heads.fit_heads`): ``convex``, every head solved to
    a certified optimum, the L2 strength selected on val; or ``adam``, the sparsity x learning-rate x
    seed grid trained together, epoch and learning rate selected on val. Test accuracy is reported.
    ``draws``: the other concept draws and the null concept sets (:mod:`~iis_study.core.concepts.nulls`), solved in
    the same batch. Returns one :class:`SweepResult` per concept space and the :class:`DrawResults` of each
    space's draws and nulls. The one path to the heads of the pipeline and of :mod:`~iis_study.core.api`."""
    cfg = sweep_config(sweep)
    extra = {name: ConceptSpace(kind="vectors", vectors=v) for name, v in (draws.vectors if draws else {}).items()}
    for space in spaces.values():
        space.validate(splits["train"].x.shape[1])
    grid = (f"{len(cfg.l2_grid)} L2 strengths" if cfg.estimator == "convex"
            else f"{len(cfg.learning_rates)} learning rates x {len(cfg.seeds)} seeds")
    logger.info(
        "heads (%s estimator): concepts %s, and %d concept draws / null sets; %d sparsities x %s",
        cfg.estimator,
        ", ".join(f"{ctype} (M = {space.m})" for ctype, space in spaces.items()),
        len(extra),
        len(cfg.sparsities),
        grid,
    )
    problem = HeadsProblem(splits["train"], splits["val"], splits["test"], {**spaces, **extra}, num_classes)
    results = fit_heads(problem, cfg, progress=progress)
    draw_results = {}
    for ctype in spaces:
        names = draws.names(ctype) if draws else []
        convex = [n for n in names if results[n].certificate is not None]
        draw_results[ctype] = DrawResults(
            correct={n: results[n].test_correct for n in names},
            certified={n: None if results[n].certificate is None else bool(results[n].certificate.certified) for n in names},
            draws=draws.draws if names else 1,
            nulls=draws.nulls if names else (),
            concept_type=ctype,
            accuracy={n: grid_accuracy(results[n].table, cfg.sparsities) for n in convex},
            cs=tuple(sorted(float(c) for c in cfg.l2_grid)) if convex else (),
        )
    return {ctype: results[ctype] for ctype in spaces}, draw_results


def fit_reference(features: FeatureSet, feature_info: dict[str, Any]) -> ReferenceProbe:
    """:func:`reference_for_splits` on a representation's features (the pipeline's ``fit_reference_probe``)."""
    return reference_for_splits(feature_splits(features), int(feature_info["num_classes"]))


def reference_for_splits(splits: Mapping[str, Split], num_classes: int) -> ReferenceProbe:
    """The converged reference for the probe: full-batch L-BFGS logistic regression on the same
    features, its L2 strength selected on val (METHOD §4, "Budget and convergence")."""
    ref = reference_probe(*((splits[s].x, splits[s].y) for s in SPLITS), num_classes=num_classes)
    logger.info(
        "reference probe (L-BFGS, C = %g): val %.4f, test %.4f", ref.c, ref.val_acc, ref.test_acc
    )
    return ref


def weight_sparsity_path(
    features: FeatureSet, feature_info: dict[str, Any], draws: ConceptDraws,
    params: WeightSparsityParams | Mapping[str, Any] | None, concepts: Mapping[str, ConceptSet],
) -> pd.DataFrame:
    """The elastic-net path of the final layer on every concept set of one representation, its draws and nulls
    (:func:`~iis_study.core.scoring.weight_sparsity.elastic_net_paths`): the study's set of each concept type is
    ``draw/<type>/0``. Concept types that are not vectors (end-to-end, textual) have no path. Empty when
    ``weight_sparsity.enabled`` is false."""
    params = WeightSparsityParams.from_params(params or {})
    if not params.enabled:
        return pd.DataFrame(columns=PATH_COLUMNS)
    sets = {set_name("draw", t, 0): c.space.vectors for t, c in concepts.items()
            if c.space.kind == "vectors" and c.space.vectors is not None}
    sets.update(draws.vectors if draws else {})
    splits = feature_splits(features)
    logger.info("weight-sparsity path: %d concept sets x %d strengths", len(sets), params.path_length)
    return elastic_net_paths(splits["train"], splits["val"], splits["test"], sets, int(feature_info["num_classes"]),
                             params)


def score_representation(
    result: SweepResult, probe_reference: ReferenceProbe, scoring: ScoringParams | Mapping[str, Any] | None = None,
    draws: DrawResults | None = None, weight_sparsity: pd.DataFrame | None = None,
    weight_sparsity_params: WeightSparsityParams | Mapping[str, Any] | None = None,
) -> tuple[Scores, pd.DataFrame]:
    """IIS, chance-corrected IIS, bootstrap interval, and the accuracy curve A(s) / ARR(s), with the
    training budget and the convergence record (probe against its reference, flat val curves).

    With ``draws`` (the type's other concept draws and its nulls), ``iis`` and ``iis_chance_corrected`` are
    the means over the concept draws, ``iis`` with the two-level interval (test images and concept draws), and
    each null's IIS and the excess over it stand beside it
    (:func:`~iis_study.core.scoring.calibration.calibrated_scores`); ``certified`` then covers every head of every draw
    and null (a set that missed is named in ``uncertified``). The curve, ``max_grad`` and ``iterations`` are
    draw 0's. With ``weight_sparsity`` (the representation's path, :func:`weight_sparsity_path`) the type's
    NEC-matched accuracies beside their nulls' (:func:`~iis_study.core.scoring.weight_sparsity.weight_sparsity_scores`)."""
    scoring = ScoringParams.from_params(scoring or {})
    scores, curve = score_sweep(result, n_boot=scoring.n_boot, seed=scoring.seed, ci=scoring.ci)
    scores["estimator"] = result.estimator
    curve = set_curves(result, curve, draws)
    if draws is not None and draws.correct:
        scores.update(calibration_record(result, draws, scoring))
    else:  # no draws or nulls: the difference two representations must differ by, from the test images alone
        scores["iis_detectable_difference"] = math.sqrt(2.0) * detectable(scores["iis_se"], scoring.ci, scoring.power)
        scores["power"] = float(scoring.power)
    scores.update(convergence_record(result, probe_reference, scoring))
    if draws is not None and draws.correct and "certified" in scores:
        missed = [name for name, ok in draws.certified.items() if ok is False]
        scores["draws_certified"] = not missed
        scores["certified"] = bool(scores["certified"] and not missed)
        if missed:  # a draw or null set with a head beyond the tolerance, named beside draw 0's heads
            scores["uncertified"] = "; ".join([s for s in [scores.get("uncertified", "")] if s] + missed)
            logger.warning("concept draws / null sets NOT certified: %s; raise sweep.max_iter", ", ".join(missed))
    if draws is not None and weight_sparsity is not None and len(weight_sparsity):
        scores.update(weight_sparsity_scores(weight_sparsity, draws.concept_type, draws.draws, draws.nulls,
                                             weight_sparsity_params))
    scores = plain_scores(scores)
    if result.certificate is None:
        if not scores["probe_converged"]:
            logger.warning(
                "the linear probe is NOT converged (val %.4f against the L-BFGS reference's %.4f): raise sweep.steps",
                scores["probe_val_acc"],
                scores["reference_val_acc"],
            )
        if not scores["heads_converged"] and "budget_delta" in scores:
            logger.warning(
                "the IIS still moved between half and the full budget (%+.3f, interval [%+.3f, %+.3f] beyond "
                "±0.01): raise sweep.steps",
                scores["budget_delta"], scores["budget_delta_ci_low"], scores["budget_delta_ci_high"],
            )
    logger.info(
        "A_std = %.4f, IIS = %.4f [%.4f, %.4f], chance-corrected IIS = %.4f",
        scores["accuracy_linear_probe"],
        scores["iis"],
        scores["iis_ci_low"],
        scores["iis_ci_high"],
        scores["iis_chance_corrected"],
    )
    return Scores.from_dict(json.loads(json.dumps(scores))), curve


def set_curves(result: SweepResult, curve: pd.DataFrame, draws: DrawResults | None = None) -> pd.DataFrame:
    """The curve of every concept set of one concept type: draw 0 (``curve``, :func:`score_sweep`'s), the other
    concept draws and each null's draws, marked by ``concept_set`` (``concepts`` or ``null_<kind>``) and ``draw``.

    Integrating ``arr`` of the ``concepts`` rows over the sparsities (trapezoid rule), averaging over seeds and
    then over draws gives the score's ``iis``; the same over ``null_<kind>`` rows gives ``iis_null_<kind>``."""
    s = np.asarray(result.config.sparsities, dtype=float)
    seeds = list(result.seeds)
    parts = [curve.assign(concept_set="concepts", draw=0)]
    if draws is not None and draws.correct:
        named = [("concepts", name) for name in draws.draw_sets()]
        named += [(f"null_{kind}", name) for kind in draws.nulls for name in draws.null_sets(kind)]
        for concept_set, name in named:
            acc = np.asarray(draws.correct[name], dtype=bool).mean(-1)
            draw = int(name.rsplit("/", 1)[1])
            parts.append(curve_table(acc, s, seeds, result.num_classes).assign(concept_set=concept_set, draw=draw))
    out = pd.concat(parts, ignore_index=True)
    return out[["concept_set", "draw", *curve.columns]]


def calibration_record(result: SweepResult, draws: DrawResults, scoring: ScoringParams) -> dict[str, Any]:
    """The score over concept draws beside its nulls (:func:`~iis_study.core.scoring.calibration.calibrated_scores`),
    draw 0 being ``result``; the draws' spread by source; the draw-0 IIS as ``iis_draw0``."""
    real = [result.test_correct] + [draws.correct[n] for n in draws.draw_sets()]
    nulls = {k: [draws.correct[n] for n in draws.null_sets(k)] for k in draws.nulls}
    out = calibrated_scores(real, nulls, result.config.sparsities, scoring.n_boot, scoring.seed, scoring.ci,
                            num_classes=result.num_classes, power=scoring.power)
    logger.info(
        "IIS over %d concept draws %.4f [%.4f, %.4f] (share of the variance from the concept draw %.2f)%s",
        out["n_draws"], out["iis"], out["iis_ci_low"], out["iis_ci_high"], out["iis_share_draw"],
        "".join(f"; null {k} {out[f'iis_null_{k}']:.4f}, excess {out[f'iis_excess_{k}']:+.4f} "
                f"[{out[f'iis_excess_{k}_ci_low']:+.4f}, {out[f'iis_excess_{k}_ci_high']:+.4f}]" for k in nulls),
    )
    for k in nulls:
        said = describe(out, k)
        if said:
            logger.info("%s: %s", draws.concept_type, said)
        warning = size_warning({**out, "ci": scoring.ci}, k, result.num_classes)
        if warning:
            logger.warning("%s: %s", draws.concept_type, warning)
    return out


def _certified(table: pd.DataFrame, head: str) -> bool:
    """Every solved head of kind ``head`` within the tolerance (heads the L2 path rule did not reach do not count)."""
    part = table[table["head"] == head]
    solved = part["solved"].astype(bool) if "solved" in part else True
    return bool((~solved | part["certified"].astype(bool)).all())


def convergence_record(
    result: SweepResult, probe_reference: ReferenceProbe, scoring: ScoringParams
) -> dict[str, Any]:
    """What says that a score came from converged heads (METHOD §4), by estimator.

    ``convex``: the certificate (``certified``, the largest final gradient of the selected heads
    ``max_grad`` and of every head ``max_grad_all``, ``iterations``, ``tolerance``, the ``uncertified``
    heads); ``probe_converged`` / ``heads_converged`` are the probe's and the heads' certificates.
    ``adam``: the probe against its L-BFGS reference and the flat-end record
    (:func:`~iis_study.core.scoring.convergence.convergence_report`), the budget (``steps``, ``batch_size``,
    ``epochs``) and the half-budget test (:func:`~iis_study.core.scoring.convergence.budget_check`), which
    sets ``heads_converged``. Both: the reference probe's val and test accuracy.
    """
    ref = probe_reference
    out: dict[str, Any] = {
        "reference_val_acc": float(ref.val_acc),
        "reference_test_acc": float(ref.test_acc),
        "reference_c": float(ref.c),
    }
    probe_sel = result.selected[result.selected["head"] == "probe"]
    out["probe_val_acc"] = float(probe_sel["val_acc"].mean())
    cert = result.certificate
    if cert is not None:
        table = result.table
        out.update(
            certified=bool(cert.certified),
            max_grad=float(cert.max_grad),
            max_grad_all=float(cert.max_grad_all),
            iterations=int(cert.iterations),
            tolerance=float(cert.tolerance),
            uncertified="; ".join(cert.uncertified),
            probe_converged=bool(_certified(table, "probe")),
            heads_converged=bool(_certified(table, "interp")),
        )
        return out
    if result.budget is not None:
        out.update(steps=result.budget.steps, batch_size=result.budget.batch_size, epochs=result.budget.epochs)
    record = convergence_report(result.selected, result.history, probe_reference)
    out.update({k: v for k, v in record.items() if k not in ("heads_converged",)})
    out["flat_end"] = bool(record["heads_converged"])
    if result.half_budget_correct is not None:
        check = budget_check(result.test_correct, result.half_budget_correct, result.config.sparsities,
                             n_boot=scoring.n_boot, seed=scoring.seed, ci=scoring.ci)
        out.update(check)
        out["heads_converged"] = bool(check["budget_converged"])
    else:
        out["heads_converged"] = bool(record["heads_converged"])
    return out


def fit_probe_variants(
    features: FeatureSet, feature_info: dict[str, Any], sweep: Mapping[str, Any] | SweepParams,
    specification: SpecificationParams | Mapping[str, Any] | None,
) -> pd.DataFrame:
    """The probe on the other inputs of ``specification.probe_inputs`` (centred only, standardised per feature),
    every strength of ``sweep.l2_grid`` (:func:`~iis_study.core.scoring.specification.probe_variants`): the only new solves
    of the specification curve. Empty when the curve is off or the estimator is not convex."""
    cfg = sweep_config(sweep)
    params = SpecificationParams.from_params(specification)
    if not params.enabled or cfg.estimator != "convex":
        return pd.DataFrame(columns=["inputs", "c", "val_acc", "test_acc", "grad", "certified", "iterations"])
    from ..device import resolve_device

    return probe_variants(feature_splits(features), int(feature_info["num_classes"]), cfg.l2_grid,
                          params.probe_inputs, cfg.tolerance, cfg.max_iter, cfg.solver,
                          resolve_device(cfg.device, "sweep.device"))


def specification_table(
    result: SweepResult, draws: DrawResults | None, probes: pd.DataFrame, reference: ReferenceProbe,
    backbone: str = "", concept_type: str = "",
) -> pd.DataFrame:
    """One concept type's accuracies of every head, concept draw, null draw and probe, marked by ``backbone`` and
    ``concept_type`` (:func:`~iis_study.core.scoring.specification.specification_inputs`); empty for a sweep without the
    convex estimator's grid (adam: no L2 grid to re-select on)."""
    if result.certificate is None:
        return pd.DataFrame(columns=INPUT_COLUMNS)
    return specification_inputs(result.table, result.config.sparsities, result.num_classes, draws, probes,
                                (reference.val_acc, reference.test_acc), backbone, concept_type)

"""The interpretability pipeline: per backbone and concept type, the sweep and its scores."""

import functools
from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from ..namespaces import per_backbone
from .nodes import (
    collect_specification_inputs,
    fit_probe_variants,
    fit_reference_probe,
    fit_weight_sparsity,
    score_interpreters,
    train_interpreters,
)


def _marked(backbone: str, concept_type: str):
    """:func:`collect_specification_inputs` with the table's ``backbone`` / ``concept_type`` bound (the reporting
    node joins the tables on them, not on their order)."""
    func = functools.partial(collect_specification_inputs, backbone=backbone, concept_type=concept_type)
    return functools.update_wrapper(func, collect_specification_inputs)


def base_pipeline(concept_types: Iterable[str], backbone: str = "") -> Pipeline:
    """The per-backbone template (``backbone``: the name its specification inputs are marked with)."""
    types = list(concept_types)
    nodes = [
        node(fit_reference_probe, ["features", "feature_info"], "probe_reference", name="fit_reference_probe"),
        node(
            train_interpreters,
            {
                "features": "features",
                "feature_info": "feature_info",
                "sweep": "params:sweep",
                "concept_draws": "concept_draws",
                **{ctype: f"concepts_{ctype}" for ctype in types},
            },
            [*(f"sweep_{t}" for t in sorted(types)), *(f"draws_{t}" for t in sorted(types))],  # as it returns them
            name="train_interpreters",
        ),
        node(
            fit_weight_sparsity,
            {
                "features": "features",
                "feature_info": "feature_info",
                "concept_draws": "concept_draws",
                "weight_sparsity": "params:weight_sparsity",
                **{ctype: f"concepts_{ctype}" for ctype in types},
            },
            "weight_sparsity_path",
            name="fit_weight_sparsity",
        ),
        node(
            fit_probe_variants,
            ["features", "feature_info", "params:sweep", "params:specification"],
            "probe_variants",
            name="fit_probe_variants",
        ),
    ]
    for ctype in types:
        nodes.append(
            node(
                _marked(backbone, ctype),
                [f"sweep_{ctype}", f"draws_{ctype}", "probe_variants", "probe_reference"],
                f"specification_inputs_{ctype}",
                name=f"collect_specification_inputs_{ctype}",
            )
        )
        nodes.append(
            node(
                score_interpreters,
                [f"sweep_{ctype}", f"draws_{ctype}", "probe_reference", "params:scoring", "weight_sparsity_path",
                 "params:weight_sparsity"],
                [f"scores_{ctype}", f"curve_{ctype}"],
                name=f"score_interpreters_{ctype}",
            )
        )
    return Pipeline(nodes)


def create_pipeline(backbones: Iterable[str] = (), concept_types: Iterable[str] = (), **kwargs) -> Pipeline:
    """For every backbone and concept type: ``sweep_<type>``, ``draws_<type>``, ``scores_<type>``, ``curve_<type>``,
    ``specification_inputs_<type>``; per backbone ``probe_variants`` (the specification curve's extra probes)."""
    types = list(concept_types)
    return sum((per_backbone(base_pipeline(types, name), [name],
                             shared_params=("sweep", "scoring", "weight_sparsity", "specification"))
                for name in backbones), Pipeline([]))

"""The reporting pipeline: tables over all backbones, correlation analysis, plots."""

from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from .nodes import collect_scores, correlate_scores


def create_pipeline(backbones: Iterable[str] = (), concept_types: Iterable[str] = (), **kwargs) -> Pipeline:
    """Gather ``<backbone>.scores_<type>`` and ``<backbone>.curve_<type>`` into the study's tables."""
    inputs = []
    for name in backbones:
        for ctype in concept_types:
            inputs += [f"{name}.scores_{ctype}", f"{name}.curve_{ctype}"]
    return Pipeline(
        [
            node(
                collect_scores,
                ["params:backbones", "params:concepts", *inputs],
                ["iis_scores", "sparsity_curves"],
                name="collect_scores",
            ),
            node(correlate_scores, ["iis_scores", "params:correlation"], "correlation", name="correlate_scores"),
        ]
    )

"""The reporting pipeline: tables over all representations, correlation analysis (over all
representations, the pretrained ones, and within each family), plots."""

from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from ..namespaces import per_backbone
from .nodes import (
    collect_scores,
    correlate_scores,
    plot_concept_gallery,
    plot_iis_vs_accuracy,
    plot_iis_vs_accuracy_scopes,
    plot_anec_with_nulls,
    plot_iis_with_nulls,
    plot_sparsity_curves,
    plot_specification_curve,
    specification_curve,
)


def gallery_pipeline(concept_type: str) -> Pipeline:
    """The per-backbone concept gallery template."""
    return Pipeline(
        [
            node(
                plot_concept_gallery,
                [
                    "features",
                    f"sweep_{concept_type}",
                    f"concepts_{concept_type}",
                    "concept_elements",
                    "splits",
                    "images",
                    "params:gallery",
                ],
                "concept_gallery",
                name="plot_concept_gallery",
            )
        ]
    )


def create_pipeline(
    backbones: Iterable[str] = (), concept_types: Iterable[str] = (), gallery_type: str | None = None, **kwargs
) -> Pipeline:
    """Gather ``<backbone>.scores_<type>`` / ``curve_<type>`` into the study's tables, correlate, plot."""
    backbones, concept_types = list(backbones), list(concept_types)
    results = [  # in the order collect_scores reads them: representation, concept type, scores then curve
        f"{name}.{what}_{ctype}" for name in backbones for ctype in concept_types for what in ("scores", "curve")
    ]
    study = Pipeline(
        [
            node(
                collect_scores,
                ["params:backbones", "params:concepts", *results],
                ["iis_scores", "sparsity_curves"],
                name="collect_scores",
            ),
            node(
                correlate_scores,
                ["iis_scores", "params:correlation"],
                ["correlation", "correlation_scopes"],
                name="correlate_scores",
            ),
            node(
                specification_curve,
                ["iis_scores", "params:specification", "params:sweep", "params:concepts",
                 *(f"{name}.specification_inputs_{ctype}" for name in backbones for ctype in concept_types)],
                ["specification_curve", "specification_verdict"],
                name="specification_curve",
            ),
            node(
                plot_specification_curve,
                ["specification_curve", "specification_verdict"],
                "specification_curve_plot",
                name="plot_specification_curve",
            ),
            node(plot_iis_vs_accuracy, ["iis_scores", "correlation"], "iis_vs_accuracy_plot", name="plot_iis_vs_accuracy"),
            node(
                plot_iis_vs_accuracy_scopes,
                ["iis_scores", "correlation_scopes"],
                "iis_vs_accuracy_scopes_plot",
                name="plot_iis_vs_accuracy_scopes",
            ),
            node(plot_sparsity_curves, "sparsity_curves", "sparsity_curves_plot", name="plot_sparsity_curves"),
            node(plot_iis_with_nulls, "iis_scores", "iis_nulls_plot", name="plot_iis_with_nulls"),
            node(plot_anec_with_nulls, "iis_scores", "anec_nulls_plot", name="plot_anec_with_nulls"),
        ]
    )
    if gallery_type and gallery_type in concept_types:
        study += per_backbone(
            gallery_pipeline(gallery_type),
            backbones,
            inputs={"concept_elements", "splits", "images"},
            shared_params=("gallery",),
        )
    return study

"""The fine-tuning pipeline: per listed backbone, λ > 0 and the λ = 0 control over seeds."""

from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from ..namespaces import per_backbone
from .nodes import collect_fine_tuning, fine_tune_backbone, plot_fine_tuning, summarise_fine_tuning


def base_pipeline() -> Pipeline:
    """The per-backbone template."""
    return Pipeline(
        [
            node(
                fine_tune_backbone,
                ["splits", "concept_elements", "concepts_prototype", "images", "fine_tuning_checkpoints",
                 "params:backbone", "params:fine_tuning"],
                "fine_tuning_history",
                name="fine_tune_backbone",
            )
        ]
    )


def create_pipeline(backbones: Iterable[str] = (), **kwargs) -> Pipeline:
    """``kedro run --pipeline fine_tuning``: fine-tune, collect, summarise, plot."""
    backbones = list(backbones)
    fine_tuned = per_backbone(
        base_pipeline(),
        backbones,
        inputs={"splits", "concept_elements", "images", "fine_tuning_checkpoints"},
        shared_params=("fine_tuning",),
    )
    return fine_tuned + Pipeline(
        [
            node(
                collect_fine_tuning,
                {f"{b}.fine_tuning_history": f"{b}.fine_tuning_history" for b in backbones},
                "fine_tuning_results",
                name="collect_fine_tuning",
            ),
            node(summarise_fine_tuning, "fine_tuning_results", "fine_tuning_summary", name="summarise_fine_tuning"),
            node(plot_fine_tuning, "fine_tuning_results", "fine_tuning_plot", name="plot_fine_tuning"),
        ]
    )

"""The feature extraction pipeline: one namespaced copy per backbone."""

from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from ..namespaces import per_backbone
from .nodes import extract_features


def base_pipeline() -> Pipeline:
    """The per-backbone template (before namespacing)."""
    return Pipeline(
        [
            node(
                extract_features,
                ["splits", "images", "feature_cache", "params:backbone", "params:extraction"],
                ["features", "feature_info"],
                name="extract_features",
            )
        ]
    )


def create_pipeline(backbones: Iterable[str] = (), **kwargs) -> Pipeline:
    """``splits``, ``images`` -> ``<backbone>.features`` for every backbone."""
    return per_backbone(base_pipeline(), backbones, inputs={"splits", "images", "feature_cache"}, shared_params=("extraction",))

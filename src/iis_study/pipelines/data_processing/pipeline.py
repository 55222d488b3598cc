"""The data processing pipeline: one split table shared by every backbone."""

from kedro.pipeline import Pipeline, node

from .nodes import make_splits


def create_pipeline(**kwargs) -> Pipeline:
    """``images`` -> ``splits``."""
    return Pipeline(
        [node(make_splits, ["images", "params:splits"], "splits", name="make_splits")]
    )

"""The concept acquisition pipeline: elements once per dataset, concept spaces per backbone."""

from collections.abc import Iterable

from kedro.pipeline import Pipeline, node

from iis_study.core.concepts.nulls import DRAWN_TYPES

from ..namespaces import per_backbone
from .nodes import (
    build_concept_elements,
    cluster_concepts,
    draw_concepts,
    embed_concept_elements,
    end_to_end_concepts,
    prototype_concepts,
    select_concept_sources,
    textual_concepts,
)

CONCEPT_BUILDERS = {
    "prototype": (prototype_concepts, ["element_embeddings", "params:concepts"]),
    "cluster": (cluster_concepts, ["element_embeddings", "params:concepts"]),
    "end_to_end": (end_to_end_concepts, ["element_embeddings", "params:concepts"]),
    "textual": (textual_concepts, ["features", "splits", "images", "params:concepts"]),
}


def elements_pipeline() -> Pipeline:
    """``splits`` -> ``concept_sources`` -> ``concept_elements`` (dataset level)."""
    return Pipeline(
        [
            node(select_concept_sources, ["splits", "params:concepts"], "concept_sources", name="select_concept_sources"),
            node(
                build_concept_elements,
                ["concept_sources", "images", "params:concepts"],
                "concept_elements",
                name="build_concept_elements",
            ),
        ]
    )


def base_pipeline(concept_types: Iterable[str]) -> Pipeline:
    """The per-backbone template: embed elements, then one concept space per type, then the extra concept
    draws and the null concept sets."""
    concept_types = list(concept_types)
    nodes = [
        node(
            embed_concept_elements,
            ["concept_elements", "feature_cache", "params:backbone", "params:extraction"],
            "element_embeddings",
            name="embed_concept_elements",
        )
    ]
    for ctype in concept_types:
        if ctype not in CONCEPT_BUILDERS:
            raise ValueError(f"concepts.types: unknown concept type {ctype!r}; expected some of {list(CONCEPT_BUILDERS)}")
        func, inputs = CONCEPT_BUILDERS[ctype]
        nodes.append(node(func, inputs, f"concepts_{ctype}", name=func.__name__))
    nodes.append(
        node(
            draw_concepts,
            {
                "element_embeddings": "element_embeddings",
                "concepts": "params:concepts",
                **{ctype: f"concepts_{ctype}" for ctype in concept_types if ctype in DRAWN_TYPES},
            },
            "concept_draws",
            name="draw_concepts",
        )
    )
    return Pipeline(nodes)


def create_pipeline(backbones: Iterable[str] = (), concept_types: Iterable[str] = (), **kwargs) -> Pipeline:
    """Concept elements, then for every backbone its concept spaces, concept draws and null concept sets."""
    concept_types = list(concept_types)
    textual = "textual" in concept_types
    return elements_pipeline() + per_backbone(
        base_pipeline(concept_types),
        backbones,
        inputs={"concept_elements", "feature_cache", "splits", "images"} if textual else {"concept_elements", "feature_cache"},
        shared_params=("extraction", "concepts"),
    )

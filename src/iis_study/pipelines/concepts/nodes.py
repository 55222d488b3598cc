"""Nodes of the concept acquisition pipeline (METHOD §5).

Dataset level: pick source images and cut them into concept elements (patches, segments).
Representation level: embed the elements (the feature extraction code and cache), then turn the
embeddings into a concept space for each concept type. The science: :mod:`iis_study.core.concepts.acquisition`.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from iis_study.core.concepts import acquisition
from iis_study.core.concepts.acquisition import ConceptSet
from iis_study.core.concepts.elements import Elements
from iis_study.core.concepts.blocks import ConceptParams
from iis_study.core.representations.blocks import ExtractionParams
from iis_study.core.data import ImageSet
from iis_study.core.representations.extraction import embed_elements
from iis_study.core.concepts.nulls import ConceptDraws
from iis_study.core.representations.features import Embeddings, FeatureCache, FeatureSet


def select_concept_sources(splits: pd.DataFrame, concepts: ConceptParams) -> pd.DataFrame:
    """A seeded sample of ``concepts.images_per_class`` train images per class, the concept sources."""
    return acquisition.select_sources(splits, concepts)


def build_concept_elements(sources: pd.DataFrame, images: ImageSet, concepts: ConceptParams) -> Elements:
    """Patches and/or SLIC segments of every source image, with provenance for display."""
    return acquisition.build_elements(sources, images, concepts)


def embed_concept_elements(
    elements: Elements, feature_cache: FeatureCache, backbone: dict[str, Any], extraction: ExtractionParams
) -> Embeddings:
    """The concept elements embedded by the representation: :func:`~iis_study.core.representations.extraction.embed_elements`."""
    return embed_elements(backbone, elements, feature_cache, extraction)


def prototype_concepts(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.1: M element embeddings (a seeded random sample), L2-normalised."""
    return acquisition.prototype_space(element_embeddings, concepts)


def cluster_concepts(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.2: KMeans centroids of up to ``cluster_max_elements`` element embeddings."""
    return acquisition.cluster_space(element_embeddings, concepts)


def end_to_end_concepts(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.3: the element embeddings over which the assignment is learned with the head."""
    return acquisition.end_to_end_space(element_embeddings, concepts)


def draw_concepts(element_embeddings: Embeddings, concepts: ConceptParams, **concept_sets: ConceptSet) -> ConceptDraws:
    """The extra concept draws and the null concept sets of one representation (``acquisition.concept_draws``)."""
    return acquisition.concept_draws(element_embeddings, concepts, concept_sets)


def textual_concepts(
    features: FeatureSet, splits: pd.DataFrame, images: ImageSet, concepts: ConceptParams
) -> ConceptSet:
    """METHOD §5.4: CLIP-scored concept words and the learned projection onto them."""
    return acquisition.textual_space(features, splits, images, concepts)

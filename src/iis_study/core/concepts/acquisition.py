"""Concept acquisition (METHOD §5): source images, their elements, and concept spaces.

Source images are a seeded sample of train images per class, cut into elements (patches, SLIC
segments). Each concept type turns the embeddings of the concept elements (or, for ``textual``, CLIP
and the features) into a :class:`ConceptSet`: the :class:`~iis_study.core.heads.ConceptSpace` the
sweep trains on, with the element ids behind each concept. Parameters come from
:class:`~iis_study.core.concepts.blocks.ConceptParams`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from . import elements as E
from . import vectors as V
from .blocks import ConceptParams
from ..data import BadImageError, ImageSet
from ..representations.features import Embeddings, FeatureSet
from ..heads import ConceptSpace
from .nulls import DRAWN_TYPES, ConceptDraws, build_draws

logger = logging.getLogger(__name__)


def select_sources(splits: pd.DataFrame, concepts: ConceptParams) -> pd.DataFrame:
    """A seeded sample of ``concepts.images_per_class`` train images per class (rows of the split table)."""
    concepts = ConceptParams.from_params(concepts)
    per_class = concepts.images_per_class
    rng = np.random.default_rng(concepts.seed)
    train = splits[splits["split"] == "train"]
    picked = []
    for _, group in train.groupby("label", sort=True):
        n = min(per_class, len(group))
        picked.append(group.iloc[np.sort(rng.choice(len(group), size=n, replace=False))])
    out = pd.concat(picked).reset_index(drop=True)
    logger.info("%d concept source images (%d per class)", len(out), per_class)
    return out


def build_elements(sources: pd.DataFrame, images: ImageSet, concepts: ConceptParams) -> E.Elements:
    """Patches and/or SLIC segments of every source image, with provenance for display. An unreadable
    source is skipped (and counted) when the images say ``on_bad_image: skip``, else an error."""
    concepts = ConceptParams.from_params(concepts)
    arrays, ids, skipped = [], [], 0
    for i in sources["index"]:
        try:
            arrays.append(images.load(int(i)))
            ids.append(int(i))
        except BadImageError:
            if images.on_bad_image != "skip":
                raise
            skipped += 1
    if skipped:
        logger.warning("%d unreadable concept source image(s) skipped (dataset.on_bad_image = skip)", skipped)
    parts = []
    if "patches" in concepts.element_kinds:
        parts.append(E.patch_elements(arrays, ids, grid=concepts.patches.grid, size=concepts.element_size))
    if "segments" in concepts.element_kinds:
        parts.append(
            E.segment_elements(arrays, ids, size=concepts.element_size, seed=concepts.seed, **concepts.segments.kwargs())
        )
    elements = E.Elements.concat(parts)
    logger.info("%d concept elements (%s)", len(elements), elements.meta["kind"].value_counts().to_dict())
    return elements


def usable_embeddings(element_embeddings: Embeddings) -> tuple[torch.Tensor, np.ndarray]:
    """Element embeddings with a direction (a blank patch can embed to the zero vector, which no
    L2 normalisation can turn into a concept), and their element ids."""
    emb = element_embeddings.x
    ids = np.flatnonzero((emb.norm(dim=1) > 1e-6).numpy())
    if len(ids) < len(emb):
        logger.info("%d of %d concept elements embed to the zero vector and are left out", len(emb) - len(ids), len(emb))
    return emb[torch.as_tensor(ids)], ids


def _prepare(
    element_embeddings: Embeddings, concepts: ConceptParams | dict[str, Any], concept_type: str
) -> tuple[ConceptParams, torch.Tensor, np.ndarray]:
    """The checked parameters, the usable embeddings and their element ids; ``concepts.m`` checked
    against the number of usable elements (an error naming ``concepts.m``)."""
    concepts = ConceptParams.from_params(concepts)
    emb, ids = usable_embeddings(element_embeddings)
    V.check_m(concepts.m, len(emb), concept_type)
    return concepts, emb, ids


def prototype_space(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.1: M element embeddings (a seeded random sample), L2-normalised."""
    concepts, emb, ids = _prepare(element_embeddings, concepts, "prototype")
    m, seed = concepts.m, concepts.seed
    idx = V.prototype_indices(len(emb), m, seed)
    vectors = V.prototype_vectors(emb, m, seed)
    return stored_space("vectors", "prototype", vectors=vectors, element_ids=torch.as_tensor(ids[idx], dtype=torch.int64))


def cluster_space(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.2: KMeans centroids of up to ``cluster_max_elements`` element embeddings."""
    concepts, emb, ids = _prepare(element_embeddings, concepts, "cluster")
    vectors, representatives = V.cluster_vectors(
        emb, concepts.m, seed=concepts.seed, max_elements=concepts.cluster_max_elements
    )
    return stored_space(
        "vectors", "cluster", vectors=vectors, element_ids=torch.as_tensor(ids[np.asarray(representatives)], dtype=torch.int64)
    )


def concept_draws(
    element_embeddings: Embeddings, concepts: ConceptParams, concept_sets: Mapping[str, ConceptSet]
) -> ConceptDraws:
    """Draws 1..``concepts.draws``-1 of the prototype and cluster concepts (seeds ``concepts.seed + r``) and the
    null concept sets of ``concepts.nulls`` at every draw (:mod:`~iis_study.core.concepts.nulls`); ``concept_sets``: the
    study's draw 0 of each type (types other than prototype and cluster have neither draws nor nulls)."""
    concepts = ConceptParams.from_params(concepts)
    drawn = {t: cs.space.vectors for t, cs in concept_sets.items() if t in DRAWN_TYPES}
    if not drawn:
        return ConceptDraws({}, 1, ())
    _, emb, _ = _prepare(element_embeddings, concepts, "prototype")
    builders = {
        "prototype": lambda seed: V.prototype_vectors(emb, concepts.m, seed),
        "cluster": lambda seed: V.cluster_vectors(emb, concepts.m, seed=seed, max_elements=concepts.cluster_max_elements)[0],
    }
    out = build_draws(emb, drawn, concepts.m, concepts.seed, concepts.draws, concepts.nulls, builders)
    logger.info(
        "%d concept draws of %s and nulls %s: %d extra concept sets of M = %d",
        concepts.draws, ", ".join(drawn), list(concepts.nulls) or "none", len(out.vectors), concepts.m,
    )
    return out


def end_to_end_space(element_embeddings: Embeddings, concepts: ConceptParams) -> ConceptSet:
    """METHOD §5.3: the element embeddings over which the assignment is learned with the head."""
    concepts, emb, usable = _prepare(element_embeddings, concepts, "end_to_end")
    elements, picked = V.end_to_end_elements(
        emb, max_elements=concepts.end_to_end_max_elements, seed=concepts.seed
    )
    return stored_space(
        "end_to_end",
        "end_to_end",
        elements=elements,
        element_ids=torch.as_tensor(usable[np.asarray(picked)], dtype=torch.int64),
        n_concepts=concepts.m,
    )


def textual_space(
    features: FeatureSet, splits: pd.DataFrame, images: ImageSet, concepts: ConceptParams
) -> ConceptSet:
    """METHOD §5.4: CLIP-scored concept words and the learned projection onto them."""
    from . import textual as T

    concepts = ConceptParams.from_params(concepts)

    cfg = concepts.textual
    if cfg.tiny_random_clip:
        bundle = T.tiny_clip(seed=concepts.seed)
        logger.warning("textual concepts use a tiny RANDOM CLIP (concepts.textual.tiny_random_clip): a test setting")
    else:
        bundle = T.load_clip(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint)
    max_images = cfg.max_images
    rng = np.random.default_rng(concepts.seed)
    parts = {}
    for split in ("train", "val"):
        index = features.split(split).index.numpy()  # dataset indices of the feature rows (skipped images left out)
        pick = np.sort(rng.choice(len(index), size=min(max_images, len(index)), replace=False))
        parts[split] = (index[pick], pick)
    words = T.read_words(cfg.words)
    result = T.textual_concepts(
        bundle,
        [images.load(int(i)) for i in parts["train"][0]],
        [images.load(int(i)) for i in parts["val"][0]],
        features.train.x[torch.as_tensor(parts["train"][1])],
        features.val.x[torch.as_tensor(parts["val"][1])],
        words,
        top5_threshold=float(cfg.top5_threshold),
        sim_threshold=float(cfg.similarity_threshold),
    )
    return stored_space(
        "projection",
        "textual",
        projection=result.projection,
        mean=result.mean,
        std=result.std,
        words=list(result.words),
    )


@dataclass
class ConceptSet:
    """A representation's concepts of one type: the :class:`~iis_study.core.heads.ConceptSpace` the sweep
    trains on, the ids of the concept elements it came from (for display), and the words of textual
    concepts; what the ``{backbone}.concepts_<type>`` catalog entry stores."""

    concept_type: str
    space: ConceptSpace
    element_ids: torch.Tensor | None = None
    words: tuple[str, ...] | None = None

    def to_tensors(self) -> dict[str, Any]:
        """The stored form: the space's tensors and ``element_ids``; kind, type, M and words as metadata."""
        meta = {"kind": self.space.kind, "concept_type": self.concept_type}
        if self.space.n_concepts is not None:
            meta["n_concepts"] = str(self.space.n_concepts)
        if self.words is not None:
            meta["words"] = json.dumps(list(self.words))
        out: dict[str, Any] = {}
        for k in ("vectors", "elements", "projection", "mean", "std"):
            v = getattr(self.space, k)
            if v is not None:
                out[k] = v.detach().float().contiguous()
        if self.element_ids is not None:
            out["element_ids"] = self.element_ids.contiguous()
        out["__metadata__"] = meta
        return out

    @classmethod
    def from_tensors(cls, data: dict[str, Any]) -> ConceptSet:
        """Back from :meth:`to_tensors`."""
        meta = data.get("__metadata__") or {}
        space = ConceptSpace(
            kind=meta.get("kind", "vectors"),
            vectors=data.get("vectors"),
            elements=data.get("elements"),
            n_concepts=int(meta["n_concepts"]) if "n_concepts" in meta else None,
            projection=data.get("projection"),
            mean=data.get("mean"),
            std=data.get("std"),
        )
        words = tuple(json.loads(meta["words"])) if "words" in meta else None
        return cls(str(meta.get("concept_type", "")), space, data.get("element_ids"), words)


def stored_space(kind: str, concept_type: str, **tensors: Any) -> ConceptSet:
    """A :class:`ConceptSet` from the space's fields (tensors as float32; ``element_ids``, ``words`` kept)."""
    element_ids = tensors.pop("element_ids", None)
    words = tensors.pop("words", None)
    fields = {k: v.detach().float().contiguous() if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
    return ConceptSet(concept_type, ConceptSpace(kind=kind, **fields), element_ids, tuple(words) if words else None)

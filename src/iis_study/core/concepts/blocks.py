"""The concepts stage's parameter blocks, typed, with their defaults (written here and nowhere else):
``concepts`` (:class:`ConceptParams`) and its nested ``patches``, ``segments`` and ``textual`` blocks."""

from __future__ import annotations

from typing import Any

from ..params import Params, block, check_int, check_subset
from .nulls import NULL_KINDS

CONCEPT_TYPES = ("prototype", "cluster", "end_to_end", "textual")
ELEMENT_KINDS = ("patches", "segments")


@block
class PatchParams(Params):
    """``concepts.patches``: a ``grid x grid`` of crops per source image."""

    WHERE = "concepts.patches"
    grid: int = 4

    def validate(self) -> None:
        check_int(self.grid, "concepts.patches.grid", 1)


@block
class SegmentParams(Params):
    """``concepts.segments``: SLIC segments at several granularities, deduplicated by IoU."""

    WHERE = "concepts.segments"
    n_segments: tuple[int, ...] = (10, 20, 30)
    compactness: float = 10.0
    sigma: float = 1.0
    max_per_setting: int = 5
    iou_threshold: float = 0.5
    min_area: float = 0.001
    fill: int = 117
    n_jobs: int = 2

    def validate(self) -> None:
        if not self.n_segments or any(not isinstance(n, int) or n < 1 for n in self.n_segments):
            raise ValueError(f"concepts.segments.n_segments must be positive integers, got {self.n_segments!r}")
        check_int(self.max_per_setting, "concepts.segments.max_per_setting", 1)
        check_int(self.n_jobs, "concepts.segments.n_jobs", 1)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~iis_study.core.concepts.elements.segment_elements`."""
        return self.to_dict() | {"n_segments": tuple(self.n_segments)}


@block
class TextualParams(Params):
    """``concepts.textual``: CLIP-scored words (METHOD §5.4)."""

    WHERE = "concepts.textual"
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"  # an open_clip tag (hub) ...
    checkpoint: str | None = None  # ... or a local checkpoint file
    words: str = "digits"  # digits | cifar10 | /path/to/words.txt
    top5_threshold: float = 0.25
    similarity_threshold: float = 0.45
    max_images: int = 2000
    tiny_random_clip: bool = False  # tests only

    def validate(self) -> None:
        check_int(self.max_images, "concepts.textual.max_images", 1)


@block
class ConceptParams(Params):
    """``concepts``: concept acquisition (METHOD §5)."""

    WHERE = "concepts"
    types: tuple[str, ...] = ("prototype", "cluster")
    m: int = 200
    seed: int = 0
    images_per_class: int = 10
    element_size: int = 64
    element_kinds: tuple[str, ...] = ELEMENT_KINDS
    patches: PatchParams = PatchParams()
    segments: SegmentParams = SegmentParams()
    cluster_max_elements: int = 20000
    # E >> M so that no concept starts empty (M = 200: none empty in 72 heads at 2,500; 300 left ~44)
    end_to_end_max_elements: int = 2500
    textual: TextualParams = TextualParams()
    draws: int = 3  # the prototype sample and the KMeans seed drawn this many times (seeds seed, seed + 1, ...)
    nulls: tuple[str, ...] = NULL_KINDS  # null concept sets beside every score (core/concepts/nulls.py)

    def validate(self) -> None:
        check_int(self.draws, "concepts.draws", 1)
        if isinstance(self.nulls, str) or not isinstance(self.nulls, tuple | list) or set(self.nulls) - set(NULL_KINDS):
            raise ValueError(f"concepts.nulls must be a list drawn from {list(NULL_KINDS)} (empty: no nulls), got {self.nulls!r}")
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"concepts.m must be a positive integer, got {self.m!r}")
        check_subset(self.types, CONCEPT_TYPES, "concepts.types")
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"concepts.types has duplicates: {list(self.types)}")
        if not isinstance(self.images_per_class, int) or isinstance(self.images_per_class, bool) or self.images_per_class < 1:
            raise ValueError(f"concepts.images_per_class must be a positive integer, got {self.images_per_class!r}")
        check_int(self.seed, "concepts.seed")
        check_int(self.element_size, "concepts.element_size", 8)
        check_subset(self.element_kinds, ELEMENT_KINDS, "concepts.element_kinds")
        check_int(self.cluster_max_elements, "concepts.cluster_max_elements", 1)
        check_int(self.end_to_end_max_elements, "concepts.end_to_end_max_elements", 1)

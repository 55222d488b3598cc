"""Concept vectors from element embeddings (METHOD §5.2-§5.3).

* :func:`prototype_vectors` – M element embeddings taken as concept vectors.
* :func:`cluster_vectors` – KMeans centroids over element embeddings.
* :func:`end_to_end_elements` – the element embeddings the end-to-end
  assignment ``q`` is learned over (the assignment itself lives in the heads).

The elements themselves (patches, segments, their provenance): :mod:`.elements`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .blocks import ConceptParams  # the defaults: the `concepts` block's, written once

logger = logging.getLogger(__name__)


def check_m(m: int, n_elements: int, concept_type: str) -> None:
    """Raise a ``ValueError`` naming ``concepts.m`` when ``m`` is not in ``1..n_elements``."""
    if m < 1:
        raise ValueError(f"concepts.m = {m} must be a positive number of concepts for '{concept_type}'")
    if m > n_elements:
        raise ValueError(
            f"concepts.m = {m} exceeds the {n_elements} concept elements available for '{concept_type}'; "
            "lower concepts.m or raise concepts.images_per_class"
        )


def _to_numpy(embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
    """Embeddings as a float32 ``(E, D)`` numpy array."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    arr = np.asarray(embeddings, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (E, D) array, got shape {arr.shape}")
    return arr


def _l2_normalise(x: np.ndarray, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise L2 normalisation, returned as a float32 tensor."""
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    return torch.nn.functional.normalize(t, p=2.0, dim=1, eps=eps)


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted seeded sample of ``min(n, k)`` indices out of ``n`` without replacement."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def prototype_indices(n: int, m: int, seed: int = 0) -> np.ndarray:
    """Element ids of the ``m`` prototypes: a seeded sample of ``0..n-1`` without replacement, sorted.

    The authors take the *first* M elements; since elements are stored class by
    class, that would cover only the first classes. We sample uniformly instead
    so the concepts cover all classes.
    """
    check_m(m, n, "prototype")
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def prototype_vectors(embeddings: np.ndarray | torch.Tensor, m: int, seed: int = 0) -> torch.Tensor:
    """Prototype concept vectors ``C`` (M, D) float32.

    The L2-normalised embeddings of the elements :func:`prototype_indices` picks
    (a seeded sample, not the authors' first M).
    """
    emb = _to_numpy(embeddings)
    idx = prototype_indices(emb.shape[0], m, seed)
    logger.info("Prototype concepts: %d of %d elements (seed %d)", m, emb.shape[0], seed)
    return _l2_normalise(emb[idx])


def cluster_vectors(
    embeddings: np.ndarray | torch.Tensor, m: int, seed: int = 0,
    max_elements: int = ConceptParams.cluster_max_elements,
) -> tuple[torch.Tensor, np.ndarray]:
    """Cluster concept vectors: KMeans centroids over element embeddings, L2-normalised.

    KMeans (``n_clusters=m``, ``random_state=seed``, ``n_init=1``, k-means++) runs
    on the **L2-normalised** embeddings of at most ``max_elements`` elements (a seeded
    sample when there are more), as the authors' code does: clusters of directions, not
    of magnitudes (a few large-norm elements would otherwise pull centroids).

    Returns:
        ``(C, representatives)``: ``C`` (M, D) float32 unit rows; for each concept
        the element id (row of ``embeddings``) of the clustered member closest
        to its centroid, for display.
    """
    from sklearn.cluster import KMeans

    emb = _to_numpy(embeddings)
    idx = _subsample(emb.shape[0], max_elements, seed)
    check_m(m, len(idx), "cluster")
    data = _l2_normalise(emb[idx]).numpy()
    km = KMeans(n_clusters=m, random_state=seed, n_init=1).fit(data)
    centroids = km.cluster_centers_.astype(np.float32)
    dist = _sq_dist(data, centroids)
    member = km.labels_[:, None] == np.arange(m)[None, :]
    dist = np.where(member, dist, np.inf)
    # empty cluster (should not happen with sklearn): fall back to the nearest element overall
    empty = ~member.any(axis=0)
    reps = dist.argmin(axis=0)
    if empty.any():
        reps[empty] = _sq_dist(data, centroids[empty]).argmin(axis=0)
    logger.info("Cluster concepts: KMeans with %d clusters over %d elements (seed %d)", m, len(idx), seed)
    return _l2_normalise(centroids), idx[reps]


def _sq_dist(data: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``(N, M)`` between rows, without materialising ``(N, M, D)``."""
    d2 = (data**2).sum(1)[:, None] - 2.0 * data @ centroids.T + (centroids**2).sum(1)[None, :]
    return np.maximum(d2, 0.0)


def end_to_end_elements(
    embeddings: np.ndarray | torch.Tensor, max_elements: int, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """Element embeddings for the end-to-end assignment (METHOD §5.3).

    The embeddings are returned **L2-normalised**, float32, as in the authors' code:
    ``C = normalise(qᵀ · elements)`` is then the normalised mean *direction* of a
    concept's elements, not dominated by its largest-norm elements.
    At most ``max_elements`` are kept (a sorted seeded sample when there are more).

    Returns:
        ``(elements (E', D) float32 tensor, their element ids (E',))``.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements must be >= 1, got {max_elements}")
    emb = _to_numpy(embeddings)
    idx = _subsample(emb.shape[0], max_elements, seed)
    logger.info("End-to-end concepts: %d of %d elements (seed %d)", len(idx), emb.shape[0], seed)
    return _l2_normalise(emb[idx]), idx

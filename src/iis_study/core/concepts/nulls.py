"""Concept draws and null concept sets (docs/calibration.md): what a score is compared with.

A representation's IIS is measured with one sample of concepts. Two things say how to read it:

* **Concept draws.** The prototype sample and the KMeans seed are random choices; the study draws them
  ``concepts.draws`` times (draw ``r`` uses seed ``concepts.seed + r``; draw 0 is the study's concept
  set), so that every interval carries the concept draw beside the test images.
* **Null concepts** of the same number M, solved by the same estimator on the same features:
  ``random``: M directions uniform on the unit sphere (they stand for nothing); ``rotated``: the concept
  set mixed by a random orthogonal M x M matrix (the same span, no single concept kept);
  ``gaussian``: M samples of a Gaussian with the mean and covariance of the representation's
  concept-element embeddings (shaped like image parts, standing for none). Each null is drawn once per
  concept draw (draw ``r`` of ``rotated`` mixes draw ``r`` of the concepts).

Everything here is seeded: the same parameters give the same vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

NULL_KINDS = ("random", "rotated", "gaussian")
DRAWN_TYPES = ("prototype", "cluster")  # concept types built from a random draw of elements (and nulls of M vectors)
_KIND_STREAM = {kind: i + 1 for i, kind in enumerate(NULL_KINDS)}


def _unit_rows(x: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float64)
    return torch.nn.functional.normalize(t, dim=1).float()


def null_rng(seed: int, draw: int, kind: str) -> np.random.Generator:
    """The generator of null ``kind`` at concept draw ``draw`` (independent streams per kind and draw)."""
    return np.random.default_rng([int(seed), int(draw), _KIND_STREAM[kind]])


def random_directions(m: int, dim: int, rng: np.random.Generator) -> torch.Tensor:
    """``m`` directions uniform on the unit sphere of R^dim (normalised standard Gaussians), (m, dim) float32."""
    return _unit_rows(rng.standard_normal((int(m), int(dim))))


def haar_orthogonal(m: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal ``m x m`` matrix, uniform (Haar) over the orthogonal group (QR of a Gaussian with
    the signs of R's diagonal moved into Q)."""
    q, r = np.linalg.qr(rng.standard_normal((int(m), int(m))))
    return q * np.sign(np.diag(r))[None, :]


def rotated_within_span(vectors: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The concept set mixed by a random orthogonal matrix, rows re-normalised: ``normalise(Q·C)``.

    Q is invertible, so the rows span the same subspace as C's; each new row is a mixture of all M
    concepts, so none of them is kept (the study's test checks both)."""
    c = vectors.detach().to(torch.float64).cpu().numpy()
    return _unit_rows(haar_orthogonal(c.shape[0], rng) @ c)


def gaussian_samples(embeddings: torch.Tensor, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` samples (float64) of N(mean, covariance) of the rows of ``embeddings`` (E, D).

    Drawn exactly without forming the D x D covariance: ``mean + g·(E - mean) / sqrt(E - 1)`` with
    ``g ~ N(0, I_E)`` has the rows' sample mean and sample covariance."""
    e = embeddings.detach().to(torch.float64).cpu().numpy()
    if e.shape[0] < 2:
        raise ValueError("gaussian null concepts need at least 2 concept elements")
    mean = e.mean(0, keepdims=True)
    g = rng.standard_normal((int(m), e.shape[0]))
    return mean + g @ (e - mean) / np.sqrt(e.shape[0] - 1)


def gaussian_like(embeddings: torch.Tensor, m: int, rng: np.random.Generator) -> torch.Tensor:
    """:func:`gaussian_samples` L2-normalised, as concepts are: (m, D) float32."""
    return _unit_rows(gaussian_samples(embeddings, m, rng))


def set_name(role: str, what: str, draw: int) -> str:
    """The key of one concept set: ``draw/<type>/<r>`` (a concept draw), ``null/<kind>/<r>`` (random,
    gaussian) or ``null/rotated.<type>/<r>``."""
    return f"{role}/{what}/{int(draw)}"


def null_set_name(kind: str, concept_type: str, draw: int) -> str:
    """The key of null ``kind``'s set at ``draw`` for ``concept_type``'s score (the rotated null is per type)."""
    return set_name("null", f"rotated.{concept_type}" if kind == "rotated" else kind, draw)


@dataclass
class ConceptDraws:
    """A representation's extra concept draws and null concept sets, by :func:`set_name`: (M, D) unit rows each.

    Draw 0 of each type is the study's concept set (``concepts_<type>``) and is not repeated here;
    ``draws`` is the number of draws in all (draw 0 included). What ``{backbone}.concept_draws`` stores."""

    vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    draws: int = 1
    nulls: tuple[str, ...] = ()

    def names(self, concept_type: str) -> list[str]:
        """The sets that belong to ``concept_type``'s score: its draws 1.. and every null of every draw (none for
        a type that is not drawn: its score has no nulls)."""
        if concept_type not in DRAWN_TYPES:
            return []
        out = [n for n in self.vectors if n.startswith(f"draw/{concept_type}/")]
        for kind in self.nulls:
            what = f"rotated.{concept_type}" if kind == "rotated" else kind
            out += [n for n in self.vectors if n.startswith(f"null/{what}/")]
        return out

    def to_tensors(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: v.detach().float().contiguous() for k, v in self.vectors.items()}
        out["__metadata__"] = {"draws": str(self.draws), "nulls": ",".join(self.nulls)}
        return out

    @classmethod
    def from_tensors(cls, data: dict[str, Any]) -> ConceptDraws:
        meta = data.get("__metadata__") or {}
        vectors = {k: v for k, v in data.items() if k != "__metadata__"}
        nulls = tuple(n for n in str(meta.get("nulls", "")).split(",") if n)
        return cls(vectors, int(meta.get("draws", 1)), nulls)


def build_draws(
    embeddings: torch.Tensor,
    concept_sets: Mapping[str, torch.Tensor],
    m: int,
    seed: int,
    draws: int,
    nulls: Iterable[str],
    draw_type: Mapping[str, Any],
) -> ConceptDraws:
    """Draws ``1..draws-1`` of every concept type in ``concept_sets`` (``draw_type[type](seed + r)`` returns
    the vectors) and every null of ``nulls`` at each draw ``0..draws-1``.

    ``embeddings``: the usable element embeddings (E, D); ``concept_sets``: draw 0 of each type, (M, D)."""
    nulls = tuple(nulls)
    unknown = set(nulls) - set(NULL_KINDS)
    if unknown:
        raise ValueError(f"concepts.nulls: unknown null {sorted(unknown)}; expected some of {list(NULL_KINDS)}")
    vectors: dict[str, torch.Tensor] = {}
    per_draw: dict[str, list[torch.Tensor]] = {t: [v] for t, v in concept_sets.items()}
    for r in range(1, int(draws)):
        for ctype in concept_sets:
            v = draw_type[ctype](int(seed) + r)
            per_draw[ctype].append(v)
            vectors[set_name("draw", ctype, r)] = v
    dim = int(embeddings.shape[1])
    for r in range(int(draws)):
        if "random" in nulls:
            vectors[set_name("null", "random", r)] = random_directions(m, dim, null_rng(seed, r, "random"))
        if "rotated" in nulls:
            for ctype in concept_sets:  # the same rotation for every type at a draw: one stream per draw
                vectors[set_name("null", f"rotated.{ctype}", r)] = rotated_within_span(
                    per_draw[ctype][r], null_rng(seed, r, "rotated")
                )
        if "gaussian" in nulls:
            vectors[set_name("null", "gaussian", r)] = gaussian_like(embeddings, m, null_rng(seed, r, "gaussian"))
    return ConceptDraws(vectors, int(draws), nulls)

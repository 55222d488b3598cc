"""The typed results that travel between nodes: one concept type's :class:`Scores` of one representation.

(The reference probe travels as :class:`~iis_study.core.scoring.convergence.ReferenceProbe`.) Both convert
themselves to and from a JSON object (``to_dict`` / ``from_dict``), so the catalog stores them as JSON
files and nodes see the objects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Scores:
    """One concept type's scores of one representation (:func:`~iis_study.core.scoring.steps.score_representation`).

    Attributes:
        iis: the Inherent Interpretability Score (the mean over concept draws when there are several).
        iis_ci_low, iis_ci_high: its interval (test images and concept draws, docs/calibration.md).
        iis_chance_corrected: the same with chance-corrected retention (NaN at chance).
        accuracy_linear_probe: ``A_std``, the selected probe's test accuracy.
        estimator: ``convex`` or ``adam``, the heads' estimator.
        probe_converged, heads_converged: the probe's and the heads' convergence (certificate or tests).
        details: every other number of the record by its column name in ``iis_scores.csv`` (nulls and
            excess, spread by source, the certificate or the budget test, the reference probe, ...),
            in the order of the table.
    """

    iis: float
    iis_ci_low: float
    iis_ci_high: float
    iis_chance_corrected: float
    accuracy_linear_probe: float
    estimator: str
    probe_converged: bool
    heads_converged: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def iis_ci(self) -> tuple[float, float]:
        return self.iis_ci_low, self.iis_ci_high

    @property
    def converged(self) -> bool:
        """Probe and heads converged (convex: every head certified)."""
        return bool(self.probe_converged and self.heads_converged)

    def to_dict(self) -> dict[str, Any]:
        """The record as one JSON object: the fields first, then ``details``."""
        head = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "details"}
        return {**head, **self.details}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Scores:
        """From a record of :meth:`to_dict` (or any mapping holding the fields)."""
        names = [f.name for f in fields(cls) if f.name != "details"]
        missing = [n for n in names if n not in record]
        if missing:
            raise ValueError(f"a scores record needs {missing}; it holds {sorted(record)}")
        return cls(**{n: record[n] for n in names}, details={k: v for k, v in record.items() if k not in names})

    def __getitem__(self, name: str) -> Any:
        """Any number of the record by its column name (``scores["iis_null_random"]``)."""
        if name in self.details:
            return self.details[name]
        if name != "details" and name in {f.name for f in fields(self)}:
            return getattr(self, name)
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return name in self.to_dict()

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

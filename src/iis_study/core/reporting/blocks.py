"""The reporting stage's parameter blocks: ``gallery`` (:class:`GalleryParams`), and ``tracking`` in
``conf/<env>/mlflow.yml`` (:class:`TrackingParams`, what the run logs to MLflow)."""

from __future__ import annotations

from typing import Any

from ..params import Params, block, check_int

GALLERY_TYPES = ("prototype", "cluster")


@block
class GalleryParams(Params):
    """``gallery``: for a few test images, the prediction and the concepts that drove it."""

    WHERE = "gallery"
    concept_type: str = "prototype"
    sparsity: float = 0.9  # the interpretation head shown (keeps M - floor(s*M) concepts per image)
    n_images: int = 6
    top: int = 5
    seed: int = 0

    def validate(self) -> None:
        if self.concept_type not in GALLERY_TYPES:
            raise ValueError(f"gallery.concept_type must be 'prototype' or 'cluster', got {self.concept_type!r}")
        s = self.sparsity
        if not isinstance(s, int | float) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"gallery.sparsity must be in [0, 1), got {s!r}")
        check_int(self.n_images, "gallery.n_images", 1)
        check_int(self.top, "gallery.top", 1)
        check_int(self.seed, "gallery.seed")


@block
class TrackingParams(Params):
    """``tracking`` in ``conf/<env>/mlflow.yml`` (not a parameter of the study). The store:
    ``MLFLOW_TRACKING_URI`` when set, else ``uri``, else SQLite at ``<project>/mlflow.db``."""

    WHERE = "mlflow.yml: tracking"
    enabled: bool = True
    experiment: str = "iis_study"
    uri: str | None = None

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - {"enabled", "experiment", "uri"}
        if unknown:
            raise ValueError(
                f"mlflow.yml: unknown key(s) {sorted(unknown)} under tracking; expected enabled, experiment, uri"
            )
        super().__init__(**values)

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"mlflow.yml: tracking.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.experiment, str):
            raise ValueError(f"mlflow.yml: tracking.experiment must be a name, got {self.experiment!r}")
        if not isinstance(self.uri or "", str):
            raise ValueError(f"mlflow.yml: tracking.uri must be a tracking URI or null, got {self.uri!r}")

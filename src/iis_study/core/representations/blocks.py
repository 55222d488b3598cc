"""The representations stage's parameter blocks: ``extraction`` (:class:`ExtractionParams`), and the one
way an entry of the expanded ``backbones`` block becomes a
:class:`~iis_study.core.representations.backbones.BackboneParams` (:func:`backbone_spec`, :func:`backbone_fields`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..device import check_device
from ..params import Params, block, check_int, moved_to_catalog

if TYPE_CHECKING:
    from .backbones import BackboneParams


@block
class ExtractionParams(Params):
    """``extraction``: how features are computed and stored (where they are cached: the ``feature_cache``
    catalog entry, :class:`~iis_study.core.representations.features.FeatureCache`)."""

    WHERE = "extraction"
    device: str = "auto"
    batch_size: int = 128
    num_workers: int | None = None  # None: min(4, cores - 1)
    progress: bool = True
    storage: str = "memory"  # memory | sharded
    storage_dtype: str = "float32"
    shard_rows: int = 16384

    def __init__(self, **values: Any) -> None:
        moved_to_catalog(values, "extraction.cache_dir", "feature_cache")
        super().__init__(**values)

    def validate(self) -> None:
        from ..representations.store import check_storage

        check_int(self.batch_size, "extraction.batch_size", 1)
        if self.num_workers is not None:
            check_int(self.num_workers, "extraction.num_workers", 0)
        if self.storage not in ("memory", "sharded"):
            raise ValueError(f"extraction.storage must be 'memory' or 'sharded', got {self.storage!r}")
        check_int(self.shard_rows, "extraction.shard_rows", 1)
        check_storage(self.storage_dtype, self.shard_rows)
        check_device(self.device, "extraction.device")

    @property
    def sharded(self) -> bool:
        """Features stored as ``.npy`` shards on disk (streamed by the sweep)."""
        return self.storage == "sharded"


def backbone_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of a ``backbones`` entry, the spec's defaults filled in, without checking it (no model
    is built, no file opened): for tables and MLflow after the run's validation has checked the entry."""
    import dataclasses

    from .backbones import BackboneParams

    def default(f: dataclasses.Field) -> Any:
        return None if f.default is dataclasses.MISSING else f.default

    return {f.name: entry[f.name] if f.name in entry else default(f) for f in dataclasses.fields(BackboneParams)}


def backbone_spec(entry: Mapping[str, Any]) -> BackboneParams:
    """The :class:`~iis_study.core.representations.backbones.BackboneParams` of one entry of the expanded ``backbones``
    block (the one way an entry becomes a spec; its name is ``name``, else the model)."""
    from .backbones import BackboneParams

    return BackboneParams.from_params(entry.get("name") or entry.get("model") or "backbone", entry)

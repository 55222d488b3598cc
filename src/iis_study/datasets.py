"""Kedro datasets of this project: tensors, concept elements, sweep results, tables.

Every ``save`` writes to a temporary name in the target folder and renames it into place, so
an interrupted run never leaves a half-written file that a later run would trust (``kedro run
--only-missing-outputs`` skips a node whose outputs exist: existing must mean complete).
:class:`AtomicCSVDataset` and :class:`AtomicJSONDataset` are kedro-datasets' ``pandas.CSVDataset``
and ``json.JSONDataset`` with that write-then-rename on the local filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset

from .core.finetune import CheckpointStore
from .core.data import DatasetParams, ImageSet, load_dataset
from .core.representations.features import FeatureCache, load_tensors, save_tensors
from .core.representations.store import ShardedArray, link_or_copy, open_store

_SHARDED_KEYS = "__sharded_keys__"


def _import_object(path: str) -> type:
    """The class at a dotted ``path`` (a catalog entry's ``object:``)."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise DatasetError(f"object: {path!r} is not an importable class ({exc})") from exc


def _atomic_dir(target: Path):
    """A fresh temporary folder next to ``target``; call ``commit`` to move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))

    def commit() -> None:
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort() -> None:
        shutil.rmtree(tmp, ignore_errors=True)

    return tmp, commit, abort


class ImageSetDataset(AbstractDataset[None, ImageSet]):
    """The study's raw images (read-only): an :class:`~iis_study.core.data.ImageSet` opened from the
    ``dataset`` block of ``conf/<env>/globals.yml`` (digits, an ImageFolder, CIFAR). Opening is cheap
    (images are decoded when a node reads them) and done once per run; a bad block or a missing
    folder is an error naming ``dataset.<key>``."""

    def __init__(self, dataset: dict[str, Any] | None = None, metadata: dict[str, Any] | None = None):
        self._spec = DatasetParams.from_params(dataset or {})
        self._images: ImageSet | None = None
        self.metadata = metadata

    def load(self) -> ImageSet:
        if self._images is None:
            self._images = load_dataset(self._spec)
        return self._images

    def save(self, data: Any) -> None:
        raise DatasetError("the images are raw data: the pipeline reads them, never writes them")

    def _exists(self) -> bool:
        return self._spec.kind == "digits" or bool(self._spec.root and Path(self._spec.root).expanduser().exists())

    def _describe(self) -> dict[str, Any]:
        return self._spec.to_dict()


class _FolderHandleDataset(AbstractDataset[None, Any]):
    """A folder that a node fills and reads itself (a cache, a checkpoint store): ``load`` gives the node a
    typed handle on it (``HANDLE(path)``); it is never saved as a node output."""

    HANDLE: type = object
    WHAT = "this folder"

    def __init__(self, path: str, metadata: dict[str, Any] | None = None):
        self._handle = self.HANDLE(Path(path))
        self.metadata = metadata

    def load(self) -> Any:
        return self._handle

    def save(self, data: Any) -> None:
        raise DatasetError(f"{self.WHAT} is filled by the node that uses it, not saved as a node output")

    def _exists(self) -> bool:
        return True

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._handle.root)}


class FeatureCacheDataset(_FolderHandleDataset):
    """The feature cache (:class:`~iis_study.core.representations.features.FeatureCache`): a folder of content-addressed
    entries that extraction nodes read and fill."""

    HANDLE = FeatureCache
    WHAT = "the feature cache"


class CheckpointStoreDataset(_FolderHandleDataset):
    """Fine-tuning's checkpoint folder (:class:`~iis_study.core.finetune.CheckpointStore`), filled and
    resumed from by the fine-tuning node."""

    HANDLE = CheckpointStore
    WHAT = "the checkpoint store"


class TensorDictDataset(AbstractDataset[Any, Any]):
    """Tensors stored as one safetensors file; with ``object:`` (a class path, e.g.
    ``iis_study.core.representations.features.FeatureSet``) a typed object that converts itself to and from that form
    (``to_tensors()`` / ``from_tensors()``), so nodes see the object, never the storage keys.

    The stored form is a ``dict[str, torch.Tensor]`` whose string metadata rides along under the
    reserved key ``"__metadata__"`` (a ``dict[str, str]``). Out-of-core entries
    (:class:`~iis_study.core.representations.store.ShardedArray`) are kept as shard files in ``<filepath>.shards/<key>/``
    (hard links to the extraction cache, so no second copy) and come back as ``ShardedArray``.
    """

    def __init__(self, filepath: str, object: str | None = None, metadata: dict[str, Any] | None = None):
        self._filepath = Path(filepath)
        self._object = _import_object(object) if object else None
        self.metadata = metadata

    def load(self) -> Any:
        data = self._load_tensors()
        return self._object.from_tensors(data) if self._object is not None else data

    def _load_tensors(self) -> dict[str, Any]:
        if not self._filepath.is_file():
            raise DatasetError(f"{self._filepath} does not exist; run the pipeline that produces it first")
        try:
            tensors, meta = load_tensors(self._filepath)
        except Exception as exc:  # not a file this project wrote completely
            raise DatasetError(
                f"{self._filepath} is not a readable safetensors file ({exc}); delete it and re-run"
            ) from exc
        out: dict[str, Any] = dict(tensors)
        for key in json.loads(meta.pop(_SHARDED_KEYS, "[]")):
            try:
                out[key] = open_store(self._shards_dir / key)
            except Exception as exc:
                raise DatasetError(
                    f"{self._filepath}: entry {key!r} lives in {self._shards_dir / key}, which is missing or "
                    f"damaged ({exc}); re-run the pipeline that produces it"
                ) from exc
        out["__metadata__"] = meta
        return out

    @property
    def _shards_dir(self) -> Path:
        return self._filepath.with_name(self._filepath.name + ".shards")

    def save(self, data: Any) -> None:
        if self._object is not None:
            if not isinstance(data, self._object):
                raise DatasetError(f"{self._filepath}: expected a {self._object.__name__}, got {type(data).__name__}")
            data = data.to_tensors()
        meta = {k: str(v) for k, v in (data.get("__metadata__") or {}).items()}
        tensors = {k: v for k, v in data.items() if k != "__metadata__" and not isinstance(v, ShardedArray)}
        sharded = {k: v for k, v in data.items() if isinstance(v, ShardedArray)}
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise DatasetError(f"{self._filepath}: entry {k!r} is a {type(v).__name__}, not a tensor")
        if sharded:
            # out-of-core entries: the shard files are hard-linked (no copy) into <file>.shards/<key>/
            tmp, commit, abort = _atomic_dir(self._shards_dir)
            try:
                for k, v in sharded.items():
                    link_or_copy(v, tmp / k)
                commit()
            except BaseException:
                abort()
                raise
            meta[_SHARDED_KEYS] = json.dumps(sorted(sharded))
        save_tensors(self._filepath, tensors, meta)

    def _exists(self) -> bool:
        return self._filepath.is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}


class ElementsDataset(AbstractDataset):
    """Concept elements: a folder with ``images.npy``, ``masks.npy`` and ``meta.csv``."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._path = Path(filepath)
        self.metadata = metadata

    def load(self):
        from .core.concepts.elements import Elements

        if not (self._path / "meta.csv").is_file():
            raise DatasetError(f"{self._path} holds no concept elements; run the concepts pipeline first")
        masks_file = self._path / "masks.npy"
        return Elements(
            images=np.load(self._path / "images.npy", allow_pickle=False),
            meta=pd.read_csv(self._path / "meta.csv"),
            masks=np.load(masks_file, allow_pickle=False) if masks_file.is_file() else None,
        )

    def save(self, data) -> None:
        tmp, commit, abort = _atomic_dir(self._path)
        try:
            np.save(tmp / "images.npy", np.asarray(data.images), allow_pickle=False)
            if data.masks is not None:
                np.save(tmp / "masks.npy", np.asarray(data.masks), allow_pickle=False)
            data.meta.to_csv(tmp / "meta.csv", index=False)
            commit()
        except BaseException:
            abort()
            raise

    def _exists(self) -> bool:
        return (self._path / "meta.csv").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}


class SweepResultDataset(AbstractDataset):
    """A :class:`~iis_study.core.heads.SweepResult` as a folder of CSV, NumPy and safetensors files."""

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None):
        self._path = Path(filepath)
        self.metadata = metadata

    def load(self):
        from .core.heads import Budget, Certificate, SweepParams, SweepResult

        meta_file = self._path / "meta.json"
        if not meta_file.is_file():
            raise DatasetError(f"{self._path} holds no sweep result; run the interpretability pipeline first")
        meta = json.loads(meta_file.read_text())
        cfg = meta["config"]
        for k, v in cfg.items():
            if isinstance(v, list):
                cfg[k] = tuple(v)
        state, _ = load_tensors(self._path / "state.safetensors")
        history = self._path / "history.csv"
        half = self._path / "half_budget_correct.npy"
        cert = meta.get("certificate")
        if cert is not None:
            cert = Certificate(**{**cert, "uncertified": tuple(cert.get("uncertified", ()))})
        return SweepResult(
            config=SweepParams(**cfg),
            num_classes=int(meta["num_classes"]),
            m=int(meta["m"]),
            table=pd.read_csv(self._path / "table.csv"),
            selected=pd.read_csv(self._path / "selected.csv"),
            test_correct=np.load(self._path / "test_correct.npy", allow_pickle=False),
            state=state,
            history=pd.read_csv(history) if history.is_file() else pd.DataFrame(),
            budget=Budget(**meta["budget"]) if meta.get("budget") else None,
            certificate=cert,
            half_budget_correct=np.load(half, allow_pickle=False) if half.is_file() else None,
        )

    def save(self, data) -> None:
        from dataclasses import asdict

        tmp, commit, abort = _atomic_dir(self._path)
        try:
            data.table.to_csv(tmp / "table.csv", index=False)
            data.selected.to_csv(tmp / "selected.csv", index=False)
            np.save(tmp / "test_correct.npy", np.asarray(data.test_correct), allow_pickle=False)
            save_tensors(tmp / "state.safetensors", {k: v.detach().cpu() for k, v in data.state.items()})
            if not data.history.empty:  # the convex estimator has no per-epoch history
                data.history.to_csv(tmp / "history.csv", index=False)
            meta = {"config": asdict(data.config), "num_classes": data.num_classes, "m": data.m}
            if data.budget is not None:
                meta["budget"] = asdict(data.budget)
            if data.certificate is not None:
                meta["certificate"] = data.certificate.to_dict()
            if data.half_budget_correct is not None:
                np.save(tmp / "half_budget_correct.npy", np.asarray(data.half_budget_correct), allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            commit()
        except BaseException:
            abort()
            raise

    def _exists(self) -> bool:
        return (self._path / "meta.json").is_file()

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._path)}


class _AtomicLocalSave:
    """Mixin for fsspec-based kedro-datasets: on the local filesystem, write a temporary file in
    the target folder and rename it into place (other protocols save as the base class does)."""

    _protocol: str

    def _write(self, data: Any, stream: Any) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def save(self, data: Any) -> None:
        if self._protocol != "file":
            super().save(data)  # type: ignore[misc]
            return
        target = Path(get_filepath_str(self._get_save_path(), self._protocol))  # type: ignore[attr-defined]
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            with self._fs.open(tmp, **self._fs_open_args_save) as stream:  # type: ignore[attr-defined]
                self._write(data, stream)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._invalidate_cache()  # type: ignore[attr-defined]


class AtomicCSVDataset(_AtomicLocalSave, CSVDataset):
    """``pandas.CSVDataset`` whose local saves are write-then-rename (same arguments)."""

    def _write(self, data: pd.DataFrame, stream: Any) -> None:
        data.to_csv(path_or_buf=stream, **self._save_args)


class AtomicJSONDataset(_AtomicLocalSave, JSONDataset):
    """``json.JSONDataset`` whose local saves are write-then-rename (same arguments). With ``object:`` (a class
    path, e.g. ``iis_study.core.scoring.results.Scores``) a typed object that converts itself to and from a JSON object
    (``to_dict()`` / ``from_dict()``), so nodes see the object."""

    def __init__(self, *, object: str | None = None, **kwargs: Any) -> None:  # noqa: A002 - the catalog's key
        super().__init__(**kwargs)
        self._object = _import_object(object) if object else None

    def load(self) -> Any:
        data = super().load()
        return self._object.from_dict(data) if self._object is not None else data

    def _write(self, data: Any, stream: Any) -> None:
        if self._object is not None:
            if not isinstance(data, self._object):
                raise DatasetError(f"{self._filepath}: expected a {self._object.__name__}, got {type(data).__name__}")
            data = data.to_dict()
        json.dump(data, stream, **self._save_args)

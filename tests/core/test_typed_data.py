"""Features and concepts travel between nodes as typed objects (FeatureSet, Embeddings, ConceptSet): the
catalog's TensorDictDataset stores them in their tensor form and gives the same object back."""

from __future__ import annotations

import pytest
import torch

from iis_study.core.concepts.acquisition import ConceptSet, stored_space
from iis_study.core.representations.features import Embeddings, FeatureSet, SplitFeatures
from iis_study.core.heads import ConceptSpace
from iis_study.datasets import TensorDictDataset


def _features() -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    parts = {
        s: SplitFeatures(torch.randn(n, 5, generator=g), torch.arange(n) % 3, torch.arange(n) * 10 + i)
        for i, (s, n) in enumerate((("train", 6), ("val", 4), ("test", 3)))
    }
    return FeatureSet(**parts, cache_key="abc", model="m")


def test_feature_set_round_trips_through_the_catalog_dataset(tmp_path):
    ds = TensorDictDataset(str(tmp_path / "f.safetensors"), object="iis_study.core.representations.features.FeatureSet")
    feats = _features()
    ds.save(feats)
    back = ds.load()
    assert isinstance(back, FeatureSet) and (back.cache_key, back.model) == ("abc", "m")
    for s in ("train", "val", "test"):
        for field in ("x", "y", "index"):
            assert torch.equal(getattr(back.split(s), field), getattr(feats.split(s), field)), (s, field)
    with pytest.raises(KeyError, match="no split 'dev'"):
        back.split("dev")


def test_a_dataset_with_an_object_refuses_another_type(tmp_path):
    from kedro.io import DatasetError

    ds = TensorDictDataset(str(tmp_path / "f.safetensors"), object="iis_study.core.representations.features.FeatureSet")
    with pytest.raises(DatasetError, match="expected a FeatureSet"):
        ds.save({"train.x": torch.zeros(1)})
    with pytest.raises(DatasetError, match="not an importable class"):
        TensorDictDataset(str(tmp_path / "g.safetensors"), object="iis_study.core.representations.features.Nope")


@pytest.mark.parametrize("kind", ["vectors", "end_to_end", "projection"])
def test_concept_set_round_trips_every_kind(tmp_path, kind):
    g = torch.Generator().manual_seed(1)
    if kind == "vectors":
        space = ConceptSpace(kind="vectors", vectors=torch.nn.functional.normalize(torch.randn(4, 5, generator=g), dim=1))
    elif kind == "end_to_end":
        space = ConceptSpace(kind="end_to_end", elements=torch.randn(9, 5, generator=g), n_concepts=3)
    else:
        space = ConceptSpace(kind="projection", projection=torch.randn(5, 2, generator=g), mean=torch.zeros(2), std=torch.ones(2))
    words = ("cat", "dog") if kind == "projection" else None
    ids = torch.arange(4, dtype=torch.int64) if kind != "projection" else None
    original = ConceptSet("t", space, ids, words)
    ds = TensorDictDataset(str(tmp_path / "c.safetensors"), object="iis_study.core.concepts.acquisition.ConceptSet")
    ds.save(original)
    back = ds.load()
    assert (back.concept_type, back.words, back.space.kind, back.space.n_concepts) == ("t", words, kind, space.n_concepts)
    assert back.space.m == space.m
    for field in ("vectors", "elements", "projection", "mean", "std"):
        a, b = getattr(space, field), getattr(back.space, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert (ids is None and back.element_ids is None) or torch.equal(back.element_ids, ids)


def test_stored_space_keeps_ids_as_integers_and_tensors_as_float32():
    c = stored_space("vectors", "prototype", vectors=torch.ones(2, 3, dtype=torch.float64),
                     element_ids=torch.tensor([3, 7]))
    assert c.space.vectors.dtype == torch.float32 and c.element_ids.dtype == torch.int64
    assert Embeddings.from_tensors(Embeddings(torch.ones(2, 2), "k", "m").to_tensors()).cache_key == "k"

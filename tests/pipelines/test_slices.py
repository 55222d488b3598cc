"""One slice test per pipeline (the Kedro starters' pattern): the pipeline as the registry builds it, run
with the SequentialRunner on an in-memory catalog of tiny inputs, without a project, files or hooks.

Each checks that the pipeline's wiring (inputs by name, namespaces, typed parameters) carries the right
objects from node to node: a node given the wrong input, or a pipeline that lost an output, fails here
in seconds, before the whole-run tests.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from iis_study.core.concepts.nulls import build_draws
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from iis_study.core.concepts.acquisition import ConceptSet, stored_space
from iis_study.core.concepts.blocks import ConceptParams
from iis_study.core.scoring.blocks import CorrelationParams, ScoringParams, SpecificationParams, WeightSparsityParams
from iis_study.core.representations.blocks import ExtractionParams
from iis_study.core.reporting.blocks import GalleryParams
from iis_study.core.data import SplitParams
from iis_study.core.data import load_dataset
from iis_study.core.representations.features import FeatureCache, FeatureSet, SplitFeatures
from iis_study.core.heads import SweepParams
from iis_study.pipelines import concepts, data_processing, feature_extraction, interpretability, reporting

TINY_SWEEP = SweepParams(sparsities=(0.0, 0.5), learning_rates=(0.1,), seeds=(0,), steps=1, epochs=2,
                         min_batches_per_epoch=1, batch_size=64, device="cpu")
BACKBONE = {"model": "tf_efficientnet_lite0", "weights": "random", "input_size": 32, "seed": 0, "name": "a"}


class _Kept(MemoryDataset):
    """A memory dataset the runner cannot release, so that a test reads intermediate outputs too."""

    def _release(self) -> None:
        pass


def _run(pipeline, **datasets) -> dict:
    """Every output of the pipeline, intermediate ones included."""
    catalog = DataCatalog({name: MemoryDataset(value) for name, value in datasets.items()}
                          | {name: _Kept() for name in pipeline.all_outputs()})
    SequentialRunner().run(pipeline, catalog)
    return {name: catalog.load(name) for name in pipeline.all_outputs()}


@pytest.fixture(scope="module")
def images():
    return load_dataset({"kind": "digits", "image_size": 32})


@pytest.fixture(scope="module")
def splits(images):
    out = _run(data_processing.create_pipeline(), images=images,
               **{"params:splits": SplitParams(max_per_class=6)})
    return out["splits"]


def test_data_processing_slice(splits):
    assert list(splits.columns) == ["index", "label", "class_name", "item", "split"]
    # 6 images per class of 10: 4 / 1 / 1 (at least one per split and class)
    assert splits.groupby("split").size().to_dict() == {"test": 10, "train": 40, "val": 10}


def test_feature_extraction_slice(images, splits, tmp_path):
    out = _run(
        feature_extraction.create_pipeline(["a"]),
        splits=splits, images=images, feature_cache=FeatureCache(tmp_path),
        **{"params:backbones.a": BACKBONE, "params:extraction": ExtractionParams(device="cpu", num_workers=0, progress=False)},
    )
    feats, info = out["a.features"], out["a.feature_info"]
    assert isinstance(feats, FeatureSet) and feats.train.x.shape == (int((splits["split"] == "train").sum()), info["dim"])
    assert feats.test.index.tolist() == splits.loc[splits["split"] == "test", "index"].tolist()
    assert any(tmp_path.iterdir())  # the feature cache was filled


def test_concepts_slice(images, splits, tmp_path):
    params = ConceptParams(types=("prototype", "cluster"), m=6, images_per_class=1, element_size=32,
                           element_kinds=("patches",))
    out = _run(
        concepts.create_pipeline(["a"], ["prototype", "cluster"]),
        splits=splits, images=images, feature_cache=FeatureCache(tmp_path),
        **{"params:backbones.a": BACKBONE, "params:concepts": params,
           "params:extraction": ExtractionParams(device="cpu", num_workers=0, progress=False)},
    )
    assert len(out["concept_sources"]) == 10 and len(out["concept_elements"]) == 10 * 16
    for ctype in ("prototype", "cluster"):
        c = out[f"a.concepts_{ctype}"]
        assert isinstance(c, ConceptSet) and c.concept_type == ctype and c.space.m == 6 and len(c.element_ids) == 6
        assert int(c.element_ids.max()) < 10 * 16  # ids into the 10 sources x 16 patches


def _synthetic_features(seed: int = 0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    parts = {}
    for i, (s, n) in enumerate((("train", 60), ("val", 30), ("test", 30))):
        y = torch.arange(n) % 3
        x = torch.randn(n, 8, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 8).float()
        parts[s] = SplitFeatures(x, y, torch.arange(n) + 1000 * i)
    return FeatureSet(**parts)


def test_interpretability_slice():
    g = torch.Generator().manual_seed(1)
    space = stored_space("vectors", "prototype", vectors=torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1),
                         element_ids=torch.arange(5))
    emb = torch.randn(40, 8, generator=g)
    draws = build_draws(emb, {"prototype": space.space.vectors}, 5, seed=0, draws=3, nulls=("random", "rotated"),
                        draw_type={"prototype": lambda seed: torch.nn.functional.normalize(emb[seed : seed + 5], dim=1)})
    out = _run(
        interpretability.create_pipeline(["a"], ["prototype"]),
        **{"a.features": _synthetic_features(), "a.feature_info": {"num_classes": 3}, "a.concepts_prototype": space,
           "a.concept_draws": draws, "params:sweep": TINY_SWEEP, "params:scoring": ScoringParams(n_boot=20),
           "params:weight_sparsity": WeightSparsityParams(path_length=8), "params:specification": SpecificationParams()},
    )
    scores, curve = out["a.scores_prototype"], out["a.curve_prototype"]
    assert 0 <= scores["accuracy_linear_probe"] <= 1 and "iis" in scores and "probe_converged" in scores
    assert scores["n_draws"] == 3 and scores["iis"] == pytest.approx(sum(scores[f"iis_draw{r}"] for r in range(3)) / 3)
    for kind in ("random", "rotated"):
        assert scores[f"iis_excess_{kind}"] == pytest.approx(scores["iis"] - scores[f"iis_null_{kind}"])
        assert scores[f"iis_excess_{kind}_ci_low"] <= scores[f"iis_excess_{kind}"] <= scores[f"iis_excess_{kind}_ci_high"]
    assert "iis_null_gaussian" not in scores
    # weight sparsity on the same concept sets: NEC-matched accuracy beside each null's
    for kind in ("random", "rotated"):
        assert 0 <= scores[f"anec_5_null_{kind}"] <= 1
        assert scores[f"anec_avg_excess_{kind}"] == pytest.approx(scores["anec_avg"] - scores[f"anec_avg_null_{kind}"])
    path = out["a.weight_sparsity_path"]
    assert set(path["set"]) == {"draw/prototype/0", *draws.vectors} and (path[path["step"] == 0]["nec"] == 0).all()
    assert set(out["a.draws_prototype"].correct) == set(draws.names("prototype"))
    # each draw and null carries its own heads' predictions, not draw 0's
    own = out["a.sweep_prototype"].test_correct
    assert any(not np.array_equal(c, own) for c in out["a.draws_prototype"].correct.values())
    assert sorted(curve["sparsity"].unique()) == [0.0, 0.5]
    assert out["a.probe_reference"].val_acc > 0.5  # the reference probe sees the planted classes
    # the curves of every draw and null, marked, integrate to the scores (docs: sparsity_curves.csv)
    assert set(curve["concept_set"]) == {"concepts", "null_random", "null_rotated"} and set(curve["draw"]) == {0, 1, 2}
    from iis_study.core.reporting.report import integrated_curves
    areas = integrated_curves(curve.assign(backbone="a", concept_type="prototype")).set_index("concept_set")["iis"]
    assert abs(areas["concepts"] - scores["iis"]) < 1e-9
    for kind in ("random", "rotated"):
        assert abs(areas[f"null_{kind}"] - scores[f"iis_null_{kind}"]) < 1e-9
    # the specification curve's inputs: the probe on three inputs, the reference, every head of every set
    spec = out["a.specification_inputs_prototype"]
    assert set(spec.loc[spec["concept_set"] == "probe", "inputs"]) == {"rms", "centred", "standardised"}
    assert len(spec[spec["concept_set"] == "concepts"]) == 3 * 2 * len(TINY_SWEEP.l2_grid)


def test_the_library_call_and_the_pipeline_give_the_same_record():
    """One path to the score: ``api.interpretability_score`` on a representation's features returns the record
    the pipeline's nodes write for it (same fields, same numbers; scoring at the block's defaults)."""
    from iis_study.core.api import interpretability_score
    from iis_study.core.scoring.results import Scores

    g = torch.Generator().manual_seed(1)
    vectors = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    feats = _synthetic_features()
    out = _run(
        interpretability.create_pipeline(["a"], ["prototype"]),
        **{"a.features": feats, "a.feature_info": {"num_classes": 3},
           "a.concepts_prototype": stored_space("vectors", "prototype", vectors=vectors, element_ids=torch.arange(5)),
           "a.concept_draws": build_draws(torch.randn(40, 8, generator=g), {"prototype": vectors}, 5, seed=0, draws=1,
                                          nulls=(), draw_type={}),
           "params:sweep": TINY_SWEEP, "params:scoring": ScoringParams(),
           "params:weight_sparsity": WeightSparsityParams(path_length=8), "params:specification": SpecificationParams()},
    )
    split = {s: (feats.split(s).x.numpy(), feats.split(s).y.numpy()) for s in ("train", "val", "test")}
    report = interpretability_score(split["train"], split["val"], split["test"], vectors.numpy(), num_classes=3,
                                    sweep_config=TINY_SWEEP, weight_sparsity={"path_length": 8})
    pipeline = out["a.scores_prototype"]
    assert isinstance(pipeline, Scores) and isinstance(report.scores, Scores)
    assert list(report.scores.to_dict()) == list(pipeline.to_dict())
    mine, theirs = pd.Series(report.scores.to_dict()), pd.Series(pipeline.to_dict())
    pd.testing.assert_series_equal(mine, theirs)
    pd.testing.assert_frame_equal(report.curve, out["a.curve_prototype"])


def test_reporting_slice():
    backbones = {n: {"model": "tf_efficientnet_lite0", "weights": w, "input_size": 32, "name": n}
                 for n, w in (("a", "offline"), ("b", "offline"), ("c", "offline"), ("r", "random"))}
    inputs = {}
    for i, name in enumerate(backbones):
        acc = 0.5 + 0.1 * i
        inputs[f"{name}.scores_prototype"] = {"accuracy_linear_probe": acc, "iis": 0.3 + 0.05 * i,
                                              "iis_chance_corrected": 0.2 + 0.05 * i}
        inputs[f"{name}.curve_prototype"] = pd.DataFrame({"sparsity": [0.0, 0.5], "seed": [0, 0],
                                                          "accuracy": [acc, acc - 0.1], "arr": [1.0, 0.8]})
        inputs[f"{name}.specification_inputs_prototype"] = pd.DataFrame()  # no convex grid: no curve
    out = _run(
        reporting.create_pipeline(list(backbones), ["prototype"]),
        **inputs, **{"params:backbones": backbones, "params:concepts": ConceptParams(types=("prototype",)),
                     "params:correlation": CorrelationParams(n_boot=20), "params:sweep": TINY_SWEEP,
                     "params:specification": SpecificationParams()},
    )
    assert out["specification_verdict"]["verdicts"] == [] and len(out["specification_curve"]) == 0
    assert "pearson_r" in out["specification_curve"]  # an empty curve keeps its columns (a CSV with a header)
    table = out["iis_scores"]
    assert list(table["backbone"]) == list(backbones) and len(out["sparsity_curves"]) == 8
    assert out["correlation"]["prototype"]["iis"]["n_backbones"] == 3  # the headline: pretrained only
    assert out["correlation"]["prototype"]["iis"]["spearman"]["r"] == pytest.approx(1.0)
    assert {g["scope"] for g in out["correlation_scopes"]["groups"]} == {"all", "pretrained"}
    assert {"iis_vs_accuracy_plot", "iis_vs_accuracy_scopes_plot", "sparsity_curves_plot"} <= set(out)


def test_typed_parameters_reach_the_nodes_as_objects():
    """The registry's pipelines declare typed params: inputs; Kedro builds them before any node runs."""
    from kedro.validation.type_extractor import TypeExtractor

    pipes = {"x": interpretability.create_pipeline(["a"], ["prototype"]) + reporting.create_pipeline(["a"], ["prototype"],
                                                                                                    gallery_type="prototype")}
    types = TypeExtractor(pipes).extract_types_from_pipelines()
    assert types["sweep"] is SweepParams and types["scoring"] is ScoringParams
    assert types["correlation"] is CorrelationParams and types["gallery"] is GalleryParams
    assert types["concepts"] is ConceptParams
    assert np.all([t.__module__.startswith("iis_study.core") for t in types.values()])

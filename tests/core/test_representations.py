"""Representations beyond one layer: stages, resolutions, families, scoped correlations."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from iis_study.core.representations import backbones as B
from iis_study.core.data import array_image_set
from iis_study.core.representations.features import cache_key
from iis_study.core.reporting.report import collect_scores, correlate_scores, correlation_table
from iis_study.study_config import backbone_names, expand_representations, expanded_parameters

LITE0 = {"model": "tf_efficientnet_lite0", "weights": "offline"}
FAMILY_PARAMS = {
    "backbones": {
        "lite0": {**LITE0, "input_size": 64},
        "lite1": {"model": "tf_efficientnet_lite1", "weights": "offline", "input_size": 64},
    },
    "families": {
        "lite0": {"layers": ["stage3", "penultimate"], "resolutions": [32, 64, 96]},
        "lite0_random": {"base": "lite0", "weights": "random", "seed": 3, "layers": ["stage2"], "resolutions": [64]},
    },
}


@pytest.fixture(scope="module")
def images_fp() -> str:
    return array_image_set(np.zeros((2, 8, 8, 3), np.uint8)).fingerprint()


@pytest.mark.parametrize("model", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_stage_width_is_timm_feature_info_channels(model):
    channels = timm.create_model(model, features_only=True).feature_info.channels()
    names = B.layer_names(model)
    assert names == [f"stage{k + 1}" for k in range(len(channels))] + ["penultimate"]
    x = torch.zeros(3, 3, 64, 64, dtype=torch.uint8)
    for k, c in enumerate(channels):
        rep = B.build({"model": model, "weights": "random", "input_size": 64, "layer": f"stage{k + 1}"}, name="s")
        assert rep.dim == c
        assert rep.forward_uint8(x).shape == (3, c)


def test_stage_feature_is_the_pooled_intermediate_of_a_truncated_network():
    rep = B.build({**LITE0, "input_size": 64, "layer": "stage3"}, name="s3")
    trunk = rep.model.trunk
    assert len(trunk.blocks) == 3  # blocks after stage3 (blocks.2) never run
    assert isinstance(trunk.conv_head, torch.nn.Identity)
    full = B.create_model(B.BackboneParams(name="full", **LITE0)).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        fmap = full.forward_intermediates(rep.normalise(x), indices=[2], intermediates_only=True)[0]
    torch.testing.assert_close(rep.forward_uint8(x), fmap.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
    rep_max = B.build({**LITE0, "input_size": 64, "layer": "stage3", "pooling": "max"}, name="s3max")
    torch.testing.assert_close(rep_max.forward_uint8(x), fmap.amax(dim=(2, 3)), rtol=1e-4, atol=1e-5)


def test_layer_and_resolution_change_cache_key_fingerprint_and_namespace(images_fp):
    pen64 = B.build({**LITE0, "input_size": 64}, name="a")
    pen96 = B.build({**LITE0, "input_size": 96}, name="b")
    s3_64 = B.build({**LITE0, "input_size": 64, "layer": "stage3"}, name="c")
    s4_64 = B.build({**LITE0, "input_size": 64, "layer": "stage4"}, name="d")
    s3_max = B.build({**LITE0, "input_size": 64, "layer": "stage3", "pooling": "max"}, name="e")
    reps = [pen64, pen96, s3_64, s4_64, s3_max]
    assert len({cache_key(r, images_fp) for r in reps}) == len(reps)
    assert len({s3_64.weights_fingerprint, s4_64.weights_fingerprint, s3_max.weights_fingerprint, pen64.weights_fingerprint}) == 4
    # the penultimate layer keeps the plain weights fingerprint (and so its historical cache entries)
    assert pen64.weights_fingerprint == pen96.weights_fingerprint == B.weights_fingerprint(B.create_model(pen64.spec))
    assert cache_key(B.build({**LITE0, "input_size": 64, "layer": "stage3"}, name="again"), images_fp) == cache_key(s3_64, images_fp)
    names = backbone_names(FAMILY_PARAMS)
    assert {"lite0_r32_stage3", "lite0_r64_stage3", "lite0_r64_penultimate", "lite0_r96_penultimate"} <= set(names)
    from iis_study.pipelines import feature_extraction

    pipe = feature_extraction.create_pipeline(names)
    outputs = pipe.all_outputs()
    assert {"lite0_r64_stage3.features", "lite0_r96_stage3.features", "lite0_r64_penultimate.features"} <= outputs
    assert pipe.inputs() >= {"params:backbones.lite0_r64_stage3", "params:backbones.lite0_r96_stage3"}


def test_family_block_expands_to_the_right_names():
    reps = expand_representations(FAMILY_PARAMS)
    lite0 = [f"lite0_r{r}_{layer}" for r in (32, 64, 96) for layer in ("stage3", "penultimate")]
    assert list(reps) == ["lite1", *lite0, "lite0_random_r64_stage2"]  # backbones.lite0 is replaced by its family
    assert reps["lite0_r96_stage3"] == {
        **LITE0, "input_size": 96, "layer": "stage3", "label": "lite0@96/stage3", "family": "lite0",
        "family_layers": ["stage3", "penultimate"], "name": "lite0_r96_stage3",  # each entry knows its key
    }
    ctrl = reps["lite0_random_r64_stage2"]
    assert (ctrl["model"], ctrl["weights"], ctrl["seed"], ctrl["label"]) == (LITE0["model"], "random", 3, "lite0_random@64/stage2")
    expanded = expanded_parameters(FAMILY_PARAMS)
    assert expand_representations(expanded) == reps  # idempotent
    assert FAMILY_PARAMS["backbones"].keys() == {"lite0", "lite1"}  # input not mutated
    assert expand_representations({"backbones": {"x": LITE0}}) == {"x": {**LITE0, "name": "x"}}  # no families: named
    # an environment removes a base entry with `null` (soft-merged parameters)
    assert list(expand_representations({"backbones": {"x": LITE0, "y": None}})) == ["x"]


@pytest.mark.parametrize(
    "families,message",
    [
        ({"lite0": {"layers": ["stage3"]}}, r"families.lite0: missing \['resolutions'\]"),
        ({"lite0": {"layers": ["stage3"], "resolutions": [64], "input_size": 64}}, "unknown key"),
        ({"lite0": {"layers": [], "resolutions": [64]}}, "families.lite0.layers must be a non-empty list"),
        ({"lite0": {"layers": ["stage3"], "resolutions": [64, 64]}}, "duplicates"),
        ({"x": {"base": "nope", "layers": ["stage3"], "resolutions": [64]}}, "families.x.base"),
        ({"x": {"layers": ["stage3"], "resolutions": [64]}}, "families.x: no model"),
        ({"lite0@": {"layers": ["stage3"], "resolutions": [64]}}, "letters, digits"),
        ({"lite1": {"weights": "random", "layers": ["stage3"], "resolutions": [64]}}, "also defined"),
    ],
)
def test_bad_family_blocks_name_the_parameter(families, message):
    backbones = {**copy.deepcopy(FAMILY_PARAMS["backbones"]), "lite1_r64_stage3": {**LITE0, "input_size": 64}}
    with pytest.raises(ValueError, match=message):
        expand_representations({"backbones": backbones, "families": families})


def test_unknown_layer_lists_the_layers_the_backbone_has():
    with pytest.raises(ValueError, match=r"backbones.x.layer = 'stage6'.*\['stage1', 'stage2', 'stage3', 'stage4', 'stage5', 'penultimate'\]"):
        B.BackboneParams.from_params("x", {**LITE0, "layer": "stage6"})
    with pytest.raises(ValueError, match=r"families.f.layers \(f@64/blocks\).*has the layers"):
        B.BackboneParams.from_params("f_r64_blocks", {**LITE0, "layer": "blocks", "label": "f@64/blocks", "family": "f"})


def test_resolution_below_the_backbone_minimum_is_rejected():
    assert B.min_input_size("tf_efficientnet_lite0") == 32
    with pytest.raises(ValueError, match=r"backbones.x.input_size = 24 .* 32 px"):
        B.BackboneParams.from_params("x", {**LITE0, "input_size": 24})
    with pytest.raises(ValueError, match=r"families.f.resolutions \(f@16/stage2\) = 16"):
        B.BackboneParams.from_params("f_r16_stage2", {**LITE0, "input_size": 16, "layer": "stage2", "label": "f@16/stage2", "family": "f"})
    B.BackboneParams.from_params("ok", {**LITE0, "input_size": 32, "layer": "stage1"})


def _scores(families: dict[str, list[tuple[str, float, float, str]]]) -> pd.DataFrame:
    rows = []
    for fam, members in families.items():
        for label, acc, iis, weights in members:
            for ctype in ("prototype", "cluster"):
                rows.append({"backbone": label.replace("@", "_"), "representation": label, "concept_type": ctype,
                             "weights": weights, "family": fam, "accuracy_linear_probe": acc, "iis": iis,
                             "iis_chance_corrected": iis - 0.1})
    return pd.DataFrame(rows)


def test_correlation_over_all_pretrained_and_within_families(tmp_path):
    table = _scores({
        "a": [("a@32", 0.5, 0.6, "offline"), ("a@64", 0.6, 0.7, "offline"), ("a@96", 0.7, 0.8, "offline")],
        "b": [("b@32", 0.55, 0.9, "offline"), ("b@64", 0.65, 0.7, "offline"), ("b@96", 0.75, 0.5, "offline")],
        "r": [("r@32", 0.2, 0.95, "random"), ("r@64", 0.25, 0.9, "random")],
    })
    path = tmp_path / "scores.csv"  # the pipeline reads the table back from CSV (family NaN-safe)
    table.to_csv(path, index=False)
    table = pd.read_csv(path)
    config = {"scores": ["iis", "iis_chance_corrected"], "n_boot": 50, "seed": 0, "ci": 0.95}
    corr, scopes = correlate_scores(table, {**config, "groups": ["all", "pretrained", "family"]})
    # the headline is the pretrained scope (METHOD §6 correlates across pretrained backbones)
    assert set(corr) == {"prototype", "cluster"} and corr["prototype"]["iis"]["n_backbones"] == 6
    assert corr["prototype"]["iis"]["scope"] == "pretrained"
    by = {(g["scope"], g["group"]): g for g in scopes["groups"]}
    assert set(by) == {("all", "all"), ("pretrained", "pretrained"), ("family", "a"), ("family", "b"), ("family", "r")}
    assert by[("pretrained", "pretrained")]["n_representations"] == 6
    assert by[("family", "a")]["correlation"]["prototype"]["iis"]["pearson"]["r"] == pytest.approx(1.0)
    assert by[("family", "b")]["correlation"]["cluster"]["iis"]["pearson"]["r"] == pytest.approx(-1.0)
    assert by[("family", "r")]["correlation"]["prototype"]["iis"]["pearson"]["r"] is None  # 2 members: undefined
    assert by[("pretrained", "pretrained")]["correlation"] == corr
    assert by[("all", "all")]["correlation"]["prototype"]["iis"]["n_backbones"] == 8
    json.dumps(scopes, allow_nan=False)  # valid JSON, no NaN
    flat = correlation_table(scopes)
    assert set(flat["scope"]) == {"all", "pretrained", "family"} and len(flat) == 5 * 2 * 2 * 3
    only_all, scopes_all = correlate_scores(table, {**config, "groups": ["all"]})
    assert only_all == by[("all", "all")]["correlation"] and [g["scope"] for g in scopes_all["groups"]] == ["all"]
    with pytest.raises(ValueError, match="correlation.groups"):
        correlate_scores(table, {**config, "groups": ["everything"]})


def test_collect_scores_carries_label_family_layer_and_resolution():
    reps = expand_representations(FAMILY_PARAMS)
    names = ["lite1", "lite0_r96_stage3"]
    curve = pd.DataFrame({"sparsity": [0.0], "seed": [0], "accuracy": [0.5], "arr": [1.0]})
    scores = {"accuracy_linear_probe": 0.5, "iis": 0.7, "iis_chance_corrected": 0.6}
    results = [v for n in names for v in (scores, curve)]  # per representation: its scores, then its curve
    table, _ = collect_scores({n: reps[n] for n in names}, {"types": ["prototype"]}, results)
    row = table.set_index("backbone").loc["lite0_r96_stage3"]
    assert (row["representation"], row["family"], row["layer"], row["input_size"]) == ("lite0@96/stage3", "lite0", "stage3", 96)
    assert table.set_index("backbone").loc["lite1", "representation"] == "lite1"


def test_family_members_run_in_their_own_namespaces_and_mlflow_runs(tmp_path, monkeypatch):
    """A Kedro run sees the expanded representations: features per member, one nested run per label."""
    from tests.kedro_project import TINY, make_project, run_in_process

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = copy.deepcopy(TINY)
    params["splits"]["max_per_class"] = 6
    params["backbones"] = {"lite0": TINY["backbones"]["lite0"]}
    params["families"] = {"lite0": {"layers": ["stage2", "penultimate"], "resolutions": [32, 64]}}
    params["fine_tuning"]["backbones"] = []
    project = make_project(tmp_path, params)
    run_in_process(project, pipeline="data_processing")
    run_in_process(project, pipeline="feature_extraction")
    widths = {}
    for key in ("lite0_r32_stage2", "lite0_r64_stage2", "lite0_r32_penultimate", "lite0_r64_penultimate"):
        info = json.loads((project / "data" / "04_feature" / key / "feature_info.json").read_text())
        widths[key] = (info["dim"], info["input_size"], info["cache_key"])
    assert widths["lite0_r32_stage2"][:2] == (24, 32) and widths["lite0_r64_penultimate"][:2] == (1280, 64)
    assert len({w[2] for w in widths.values()}) == 4
    assert not (project / "data" / "04_feature" / "lite0").exists()  # replaced by its family

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iis_study")
    runs = client.search_runs([exp.experiment_id], "tags.`iis_study.level` = 'backbone'")
    assert {r.info.run_name for r in runs} >= {"lite0@32/stage2", "lite0@64/penultimate"}
    run = next(r for r in runs if r.info.run_name == "lite0@32/stage2")
    assert run.data.params["layer"] == "stage2" and run.data.params["family"] == "lite0"


FAMILY_SPEC = {**LITE0, "input_size": 64, "layer": "stage4", "label": "lite0@64/stage4", "family": "lite0",
               "family_layers": ["stage2", "stage4", "penultimate"]}


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_one_pass_for_all_layers_gives_each_layer_bit_for_bit(pooling):
    """build_layers: one forward pass, pooled at every layer of the family; each layer's part,
    fingerprint and preprocessing equal what build() gives for that layer alone."""
    spec = B.BackboneParams.from_params("lite0_r64_stage4", {**FAMILY_SPEC, "pooling": pooling})
    combined, reps = B.build_layers(spec, spec.family_layers)
    assert list(reps) == ["stage2", "stage4", "penultimate"]
    assert combined.model.widths == [24, 112, 1280] and combined.dim == 24 + 112 + 1280
    x = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    both = combined.forward_uint8(x)
    start = 0
    for layer, rep in reps.items():
        alone = B.build(spec.sibling(layer))
        assert rep.spec.label == f"lite0@64/{layer}" and rep.layer == layer
        assert rep.weights_fingerprint == alone.weights_fingerprint
        assert rep.preprocess_config() == alone.preprocess_config() and rep.dim == alone.dim
        expected = alone.forward_uint8(x)
        assert torch.equal(both[:, start : start + rep.dim], expected), layer
        assert torch.equal(rep.forward_uint8(x), expected), layer
        start += rep.dim


def test_family_layers_are_extracted_in_one_pass_and_cached_per_layer(tmp_path):
    """extract_cached_layers writes each layer under the key extract_cached uses for it alone
    (a later single-layer extraction is a cache hit with the same values), runs the backbone once
    per batch for all layers, and recomputes only what is missing from the cache."""
    from iis_study.core.representations import features as F

    spec = B.BackboneParams.from_params("lite0_r64_stage4", FAMILY_SPEC)
    images = array_image_set(
        np.random.default_rng(0).integers(0, 256, (10, 40, 40, 3), dtype=np.uint8), labels=np.arange(10) % 3
    )
    combined, reps = B.build_layers(spec, spec.family_layers)
    before = F.FORWARD_PASSES["count"]
    got = F.extract_cached_layers(combined, reps, images, cache_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] - before == 3  # 10 images, batches of 4: one pass for all three layers
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    for layer, (feats, key) in got.items():
        alone = B.build(spec.sibling(layer))
        mid = F.FORWARD_PASSES["count"]
        single, single_key = F.extract_cached(alone, images, cache_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
        assert F.FORWARD_PASSES["count"] == mid and single_key == key  # cache hit
        assert torch.equal(single.x, feats.x) and feats.x.shape == (10, alone.dim)
    # one layer's entry lost: one pass recomputes it, the others are read
    lost = tmp_path / f"{got['stage2'][1]}.safetensors"
    lost.unlink()
    mid = F.FORWARD_PASSES["count"]
    again = F.extract_cached_layers(combined, reps, images, cache_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] - mid == 3 and lost.is_file()
    assert all(torch.equal(again[k][0].x, got[k][0].x) for k in got)
    mid = F.FORWARD_PASSES["count"]
    F.extract_cached_layers(combined, reps, images, cache_dir=tmp_path, batch_size=4, num_workers=0, progress=False)
    assert F.FORWARD_PASSES["count"] == mid  # everything cached: no pass at all


def test_undefined_chance_corrected_score_is_left_out_of_the_correlation(tmp_path, caplog):
    """A representation whose probe is at or below chance has a NaN chance-corrected IIS: it is left out of
    that correlation, named in a warning, and the rest is computed (this used to crash the reporting)."""
    table = _scores({
        "a": [("a@32", 0.5, 0.6, "offline"), ("a@64", 0.6, 0.7, "offline"), ("a@96", 0.7, 0.8, "offline"),
              ("a@128", 0.8, 0.85, "offline")],
    })
    table.loc[table["representation"] == "a@32", "iis_chance_corrected"] = np.nan
    path = tmp_path / "scores.csv"
    table.to_csv(path, index=False)
    table = pd.read_csv(path)
    config = {"scores": ["iis", "iis_chance_corrected"], "n_boot": 50, "seed": 0, "ci": 0.95, "groups": ["all"]}
    with caplog.at_level("WARNING"):
        corr, _ = correlate_scores(table, config)
    assert corr["prototype"]["iis"]["n_backbones"] == 4 and corr["prototype"]["iis"]["left_out"] == []
    cc = corr["prototype"]["iis_chance_corrected"]
    assert cc["n_backbones"] == 3 and cc["left_out"] == ["a_32"]
    x, y = [0.6, 0.7, 0.8], [0.6, 0.7, 0.75]
    assert cc["pearson"]["r"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
    assert "a@32" in caplog.text and "left out" in caplog.text

"""The backbone registry: offline weights, checkpoints, random controls, errors."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage import data as skdata

from iis_study.core.representations import backbones as B
from iis_study.core.data import array_image_set
from iis_study.core.representations.features import cache_key


@pytest.fixture(scope="module")
def lite0():
    return B.build({"model": "tf_efficientnet_lite0", "weights": "offline"}, name="lite0")


def test_offline_lite0_predicts_egyptian_cat():
    """The packaged Lite0 weights, loaded in order into timm, classify chelsea as class 285."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = B.offline_checkpoint_path("tf_efficientnet_lite0")
    B.load_in_order(model, B.load_state_dict_file(path), str(path))
    model.eval()
    img = np.asarray(Image.fromarray(skdata.chelsea()).resize((224, 224), Image.BICUBIC))
    x = (torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        pred = model(x).argmax(-1).item()
    assert pred == 285  # "Egyptian cat"


def test_representation_is_penultimate_pooled(lite0):
    assert lite0.dim == 1280 and lite0.input_size == 224
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    out = lite0.forward_uint8(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    assert out.shape == (2, 1280)


def test_all_offline_lites_load():
    for i in (1, 2):
        rep = B.build({"model": f"tf_efficientnet_lite{i}", "weights": "offline"}, name=f"l{i}")
        assert rep.dim == 1280


def test_random_init_is_seeded_and_differs_from_pretrained(lite0):
    a = B.build({"model": "tf_efficientnet_lite0", "weights": "random", "seed": 1}, name="r")
    b = B.build({"model": "tf_efficientnet_lite0", "weights": "random", "seed": 1}, name="r")
    c = B.build({"model": "tf_efficientnet_lite0", "weights": "random", "seed": 2}, name="r")
    assert a.weights_fingerprint == b.weights_fingerprint != c.weights_fingerprint
    assert a.weights_fingerprint != lite0.weights_fingerprint


def test_local_checkpoint_roundtrip(tmp_path, lite0):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    rep = B.build({"model": "tf_efficientnet_lite0", "weights": str(path)}, name="ckpt")
    assert rep.weights_fingerprint == lite0.weights_fingerprint
    pth = tmp_path / "lite0.pth"
    torch.save(lite0.model.state_dict(), pth)
    assert B.build({"model": "tf_efficientnet_lite0", "weights": str(pth)}, name="p").weights_fingerprint == (
        lite0.weights_fingerprint
    )


def test_checkpoint_of_wrong_architecture_is_rejected(tmp_path, lite0):
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in lite0.model.state_dict().items()}, str(path))
    with pytest.raises(B.WeightsUnavailableError, match="wrong architecture|does not match"):
        B.build({"model": "resnet18", "weights": str(path)}, name="bad")


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        B.BackboneParams.from_params("x", {"model": "tf_efficientnet_lite", "weights": "random"})


def test_unavailable_weights_say_how_to_pass_a_checkpoint():
    with pytest.raises(B.WeightsUnavailableError, match="checkpoint"):
        B.BackboneParams.from_params("x", {"model": "resnet18", "weights": "offline"})
    with pytest.raises(B.WeightsUnavailableError, match="does not exist"):
        B.BackboneParams.from_params("x", {"model": "resnet18", "weights": "/nope/r18.safetensors"})


def test_hub_failure_is_explained(monkeypatch):
    def boom(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(timm, "create_model", boom)
    with pytest.raises(B.WeightsUnavailableError, match="weights: /path/to"):
        B.create_model(B.BackboneParams(name="x", model="resnet18", weights="hub"))


def test_cache_key_changes_with_weights_and_preprocessing(lite0):
    imgs = array_image_set(np.zeros((2, 8, 8, 3), np.uint8)).fingerprint()
    base = cache_key(lite0, imgs)
    rand = B.build({"model": "tf_efficientnet_lite0", "weights": "random"}, name="r")
    small = B.build({"model": "tf_efficientnet_lite0", "weights": "offline", "input_size": 96}, name="s")
    other_mean = B.build(
        {"model": "tf_efficientnet_lite0", "weights": "offline", "mean": [0.4, 0.5, 0.5]}, name="m"
    )
    other_imgs = array_image_set(np.ones((2, 8, 8, 3), np.uint8)).fingerprint()
    keys = {base, cache_key(rand, imgs), cache_key(small, imgs), cache_key(other_mean, imgs), cache_key(lite0, other_imgs)}
    assert len(keys) == 5
    assert cache_key(lite0, imgs) == base

"""Tests for CLIP textual concepts (iis_study.core.concepts.textual); offline, with a tiny random CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iis_study.core.concepts.textual import (
    ClipBundle,
    TextualConcepts,
    clip_scores,
    cos_cubed_similarity,
    filter_by_top5,
    fit_projection,
    load_clip,
    read_words,
    textual_concepts,
    tiny_clip,
)

CLASS_NAMES = {"airplane", "automobile", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}


@pytest.fixture(scope="module")
def bundle() -> ClipBundle:
    return tiny_clip(seed=0)


def images(n: int, seed: int = 0, side: int = 32) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))


def linear_case(n: int = 300, d: int = 16, m: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Representations z and CLIP scores that are an exact linear function of z."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    return z, z @ torch.randn(d, m, generator=g)


# --------------------------------------------------------------------------- words
def test_shipped_word_lists() -> None:
    cifar = read_words("cifar10")
    digits = read_words("digits")
    assert 80 <= len(cifar) <= 150 and 40 <= len(digits) <= 60
    assert len(set(cifar)) == len(cifar) and len(set(digits)) == len(digits)
    assert not any(w.startswith("#") for w in cifar + digits)
    tokens = {t for w in cifar for t in w.lower().split()}
    assert not tokens & CLASS_NAMES, "CIFAR-10 words must avoid the class names"


def test_read_words_file(tmp_path: Path) -> None:
    f = tmp_path / "w.txt"
    f.write_text("# header\nstripes\n\n  wheels  # inline comment\nstripes\n", encoding="utf-8")
    assert read_words(str(f)) == ["stripes", "wheels"]
    with pytest.raises(ValueError, match="shipped word list"):
        read_words(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_words(str(tmp_path / "empty.txt"))


# --------------------------------------------------------------------------- CLIP
def test_tiny_clip_is_seeded_and_leaves_rng(bundle: ClipBundle) -> None:
    state = torch.random.get_rng_state()
    other = tiny_clip(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    for (k, a), (_, b) in zip(bundle.model.state_dict().items(), other.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert not torch.equal(tiny_clip(seed=1).model.visual.conv1.weight, bundle.model.visual.conv1.weight)


def test_clip_scores_shape_and_range(bundle: ClipBundle) -> None:
    imgs = images(7) + [np.zeros((20, 24, 3), np.uint8)]  # other sizes are resized by preprocess
    words = ["red stripe", "wheel", "soft fur"]
    s = clip_scores(bundle, imgs, words, batch_size=3)
    assert s.shape == (8, 3) and s.dtype == np.float32
    assert np.all(s >= -1) and np.all(s <= 1)
    np.testing.assert_allclose(s, clip_scores(bundle, imgs, words, batch_size=64), atol=1e-5)
    t = clip_scores(bundle, imgs, words, template="a photo of {}")
    assert not np.allclose(s, t)
    # the scores are cosines of unit vectors: recompute by hand for one pair
    with torch.inference_mode():
        x = bundle.preprocess(Image.fromarray(imgs[0]))[None]
        u = torch.nn.functional.normalize(bundle.model.encode_image(x), dim=1)
        v = torch.nn.functional.normalize(bundle.model.encode_text(bundle.tokenizer(["wheel"])), dim=1)
    assert s[0, 1] == pytest.approx(float(u @ v.T), abs=1e-5)
    with pytest.raises(ValueError, match="template"):
        clip_scores(bundle, imgs, words, template="no slot")


def test_load_clip_local_checkpoint(tmp_path: Path, bundle: ClipBundle) -> None:
    import open_clip

    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "iis-tiny-test.json").write_text(json.dumps(cfg), encoding="utf-8")
    open_clip.add_model_config(tmp_path / "iis-tiny-test.json")
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in bundle.model.state_dict().items()}}, ckpt)
    loaded = load_clip("iis-tiny-test", pretrained=None, checkpoint=str(ckpt))
    imgs, words = images(3), ["wheel", "fur"]
    np.testing.assert_allclose(clip_scores(loaded, imgs, words), clip_scores(bundle, imgs, words), atol=1e-5)
    from safetensors.torch import save_file

    save_file(bundle.model.state_dict(), str(tmp_path / "tiny.safetensors"))
    loaded2 = load_clip("iis-tiny-test", checkpoint=str(tmp_path / "tiny.safetensors"))
    np.testing.assert_allclose(clip_scores(loaded2, imgs, words), clip_scores(bundle, imgs, words), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_clip("iis-tiny-test", checkpoint=str(tmp_path / "absent.pt"))
    with pytest.raises(RuntimeError, match="checkpoint="):  # no 'openai' weights exist for this config
        load_clip("iis-tiny-test", pretrained="openai")


# --------------------------------------------------------------------------- filters
def test_filter_by_top5_by_hand() -> None:
    scores = np.array(
        [
            [0.30, 0.10, 0.90, 0.25],
            [0.30, 0.10, 0.00, 0.25],
            [0.30, 0.10, 0.00, 0.25],
            [0.30, 0.10, 0.00, 0.25],
            [0.20, 0.60, 0.00, 0.25],
            [0.00, 0.60, 0.00, 0.25],
        ]
    )
    names = ["a", "b", "c", "d"]
    # top-5 means: a (.3*4+.2)/5 = 0.28; b (.6+.6+.1*3)/5 = 0.30; c 0.9/5 = 0.18; d exactly 0.25 (dropped: not >)
    words, idx = filter_by_top5(scores, names, threshold=0.25)
    assert words == ["a", "b"] and idx.tolist() == [0, 1]
    words, idx = filter_by_top5(scores, names, threshold=0.29)
    assert words == ["b"] and idx.tolist() == [1]
    words, idx = filter_by_top5(scores, names, threshold=0.0)
    assert words == names
    with pytest.raises(ValueError, match=r"top5_threshold=0\.31 \(tried 4 words"):
        filter_by_top5(scores, names, threshold=0.31)
    with pytest.raises(ValueError, match="scores must be"):
        filter_by_top5(scores, names[:3])


def test_cos_cubed_similarity() -> None:
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cos_cubed_similarity(x, x), torch.ones(4))
    torch.testing.assert_close(cos_cubed_similarity(x, 3 * x + 2), torch.ones(4))  # affine-invariant (a > 0)
    torch.testing.assert_close(cos_cubed_similarity(x, -x), -torch.ones(4))
    # by hand: p = [0, 1, 2] -> centred [-1, 0, 1] -> cubed [-1, 0, 1] -> unit [-1, 0, 1]/sqrt2
    #          t = [0, 0, 3] -> centred [-1, -1, 2] -> cubed [-1, -1, 8] -> unit [-1, -1, 8]/sqrt66
    p = torch.tensor([[0.0], [1.0], [2.0]])
    t = torch.tensor([[0.0], [0.0], [3.0]])
    expected = (1 + 0 + 8) / (np.sqrt(2) * np.sqrt(66))
    assert cos_cubed_similarity(p, t).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        cos_cubed_similarity(p, torch.zeros(3, 2))


def test_fit_projection_recovers_linear_scores() -> None:
    z, c = linear_case()
    one_step = fit_projection(z[:200], c[:200], z[200:], c[200:], max_steps=1, sim_threshold=-1.0)
    fitted = fit_projection(z[:200], c[:200], z[200:], c[200:], sim_threshold=0.45, words=list("abcdef"))
    assert isinstance(fitted, TextualConcepts)
    assert fitted.words == list("abcdef")  # all kept
    assert fitted.projection.shape == (16, 6)
    assert (fitted.similarity > 0.9).all()
    assert fitted.similarity.mean() > one_step.similarity.mean() + 0.05
    acts = fitted.activations(z[:200])
    torch.testing.assert_close(acts.mean(0), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(acts.std(0), torch.ones(6), atol=1e-4, rtol=0)
    again = fit_projection(z[:200], c[:200], z[200:], c[200:], sim_threshold=0.45, words=list("abcdef"))
    torch.testing.assert_close(again.projection, fitted.projection)


def test_fit_projection_drops_unpredictable_concepts() -> None:
    z, c = linear_case(m=3)
    noise = torch.randn(300, 2, generator=torch.Generator().manual_seed(5))
    scores = torch.cat([c, noise], dim=1)
    out = fit_projection(z[:200], scores[:200], z[200:], scores[200:], words=["a", "b", "c", "n1", "n2"])
    assert out.words == ["a", "b", "c"]
    assert out.projection.shape == (16, 3) and out.mean.shape == (3,) and out.std.shape == (3,)
    with pytest.raises(ValueError, match=r"sim_threshold=1\.0 \(tried 5 words"):
        fit_projection(z[:200], scores[:200], z[200:], scores[200:], sim_threshold=1.0, max_steps=20)


def test_textual_concepts_end_to_end(bundle: ClipBundle) -> None:
    train, val = images(40, seed=1), images(20, seed=2)
    z_train = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    z_val = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    words = ["wheels", "fur", "feathers", "water", "sky"]
    out = textual_concepts(bundle, train, val, z_train, z_val, words, top5_threshold=-1.0,
                           sim_threshold=-1.0, max_steps=30)
    assert out.words == words
    assert out.projection.shape == (12, 5) and out.similarity.shape == (5,)
    assert out.activations(z_val).shape == (20, 5)
    with pytest.raises(ValueError, match="top5_threshold"):
        textual_concepts(bundle, train, val, z_train, z_val, words, top5_threshold=1.0)
    with pytest.raises(ValueError, match="one representation per image"):
        textual_concepts(bundle, train, val, z_train[:5], z_val, words)

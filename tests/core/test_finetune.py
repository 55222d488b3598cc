"""Fine-tuning with interpretability maximization (the core/finetune/ package). Tests patch a name in the
module that defines it (``training.train_epoch``, ``checkpoints.save_backbone``).

One small fine-tuning run (digits at 32 px, Lite0 offline, λ = 1, 3 epochs) is shared by the
checkpoint, reload, resume and scoring tests; a 1-epoch λ = 0 run is compared bit for bit
with a plain cross-entropy loop written here from torch primitives.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iis_study.core import finetune as ft
from iis_study.core.finetune import checkpoints, blocks, scoring, training
from iis_study.core.representations.backbones import BackboneParams, WeightsUnavailableError, build, weights_fingerprint
from iis_study.core.concepts.elements import patch_elements
from iis_study.core.concepts.vectors import prototype_indices
from iis_study.core.data import load_dataset, stratified_split
from iis_study.core.representations.features import extract, load_tensors, save_tensors
from iis_study.core.heads import SweepParams, n_dropped

NUM_CLASSES = 10
SPEC = BackboneParams(name="lite0", model="tf_efficientnet_lite0", weights="offline", input_size=32)
SWEEP = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-1,), seeds=(0,), epochs=10, batch_size=64)
M = 16  # prototypes drawn from the 40 elements
BASE = {
    "batch_size": 16, "lr_backbone": 1e-4, "lr_heads": 1e-2,
    "amp": False, "channels_last": False, "device": "cpu",
    "bn_mode": "train",  # BN trained: the plain cross-entropy reference below trains it too
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one intra-op thread is as fast, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    ds = load_dataset({"kind": "digits", "image_size": 32})
    split = stratified_split(ds.labels, seed=0, max_per_class=9)  # 50 train, 20 val, 20 test
    images = {s: ds.subset(split.loc[split.split == s, "index"].to_numpy()) for s in ("train", "val", "test")}
    src = [images["train"].load(i) for i in range(10)]
    all_elements = patch_elements(src, list(range(10)), grid=2, size=32).images  # 40 elements
    elements = ft.prototype_images(all_elements, prototype_indices(len(all_elements), M, 0))  # the study's draw
    return images, elements


class _Spy:
    """Wraps a function of ``ft``, counting calls and keeping the last arguments."""

    def __init__(self, fn):
        self.fn, self.calls, self.args = fn, 0, None

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.args = args
        return self.fn(*args, **kwargs)


@pytest.fixture(scope="module")
def run_lam1(data, tmp_path_factory):
    """λ = 1, 3 epochs, IIS scored at epochs 0 and 3; keeps the in-memory model at the end."""
    images, elements = data
    # channels_last: the resume test then also covers optimiser state stored contiguous
    cfg = ft.FineTuningTrainParams(lam=1.0, epochs=3, eval_epochs=(0, 3), **{**BASE, "channels_last": True})
    out = tmp_path_factory.mktemp("ft_lam1")
    spy = _Spy(checkpoints.save_backbone)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoints, "save_backbone", spy)
        history = ft.finetune(SPEC, images, elements, cfg, out, SWEEP, NUM_CLASSES, progress=False)
    return cfg, out, history, spy.args[1]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("lam", -0.1),
        ("lam", float("nan")),
        ("sparsity", 1.0),
        ("sparsity", -0.01),
        ("epochs", 0),
        ("batch_size", 1),
        ("accumulation_steps", 0),
        ("lr_backbone", 0.0),
        ("weight_decay", -1.0),
        ("bn_mode", "sometimes"),
        ("device", "tpu"),
        ("eval_epochs", (0, 9)),
        ("warmup_epochs", 5.0),
        ("amp", "yes"),
    ],
)
def test_bad_config_names_the_parameter(field, value):
    """Checked when built (a typed parameter block), naming ``fine_tuning.<field>``."""
    with pytest.raises(ValueError, match=rf"fine_tuning\.{field}"):
        ft.FineTuningTrainParams(**{field: value})


def test_from_params_rejects_unknown_keys_and_accepts_lists():
    assert ft.FineTuningTrainParams.from_params({"epochs": 3, "eval_epochs": [0, 3]}).eval_epochs == (0, 3)
    with pytest.raises(ValueError, match="unknown key"):
        ft.FineTuningTrainParams.from_params({"lambda": 1.0})


def test_bad_lambda_is_rejected_by_finetune(data, tmp_path):
    images, elements = data
    with pytest.raises(ValueError, match=r"fine_tuning\.lam"):
        ft.finetune(SPEC, images, elements, ft.FineTuningTrainParams(lam=-1.0, **BASE), tmp_path, SWEEP, NUM_CLASSES)


def test_unknown_backbone_is_an_error(data, tmp_path):
    images, elements = data
    spec = BackboneParams(name="mystery", model="resnet_does_not_exist", weights="random")
    with pytest.raises(ValueError, match=r"backbones\.mystery\.model"):
        ft.finetune(spec, images, elements, ft.FineTuningTrainParams(**BASE), tmp_path, SWEEP, NUM_CLASSES,
                    progress=False)


def test_wrong_architecture_checkpoint_is_an_error(data, tmp_path):
    import timm

    images, elements = data
    other = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    path = tmp_path / "resnet10t.safetensors"
    save_tensors(path, other.state_dict())
    spec = BackboneParams(name="lite0", model="tf_efficientnet_lite0", weights=str(path), input_size=32)
    with pytest.raises(WeightsUnavailableError, match=r"backbones\.lite0\.weights.*architecture"):
        ft.finetune(spec, images, elements, ft.FineTuningTrainParams(**BASE), tmp_path / "ck", SWEEP, NUM_CLASSES,
                    progress=False)
    assert not (tmp_path / "ck").exists()  # nothing written


def test_m_is_not_a_fine_tuning_setting():
    """M and the draw are the study's (concepts.m, concepts.seed): a second default would drift."""
    with pytest.raises(ValueError, match=r"fine_tuning.*\bm\b"):
        ft.FineTuningTrainParams.from_params({**BASE, "m": 16})


@pytest.mark.parametrize(
    "ids, match",
    [([], "non-empty"), ([[0, 1]], "1-d"), ([0.0, 1.0], "integer"), ([0, 40], r"\[0, 40\)"), ([-1, 2], r"\[0, 40\)"),
     ([3, 3], "distinct")],
)
def test_prototype_ids_are_checked(ids, match):
    elements = np.zeros((40, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=match):
        ft.prototype_images(elements, np.asarray(ids))


def test_prototype_images_are_the_study_elements_by_id():
    elements = np.arange(40 * 2 * 2 * 3, dtype=np.uint8).reshape(40, 2, 2, 3)
    ids = torch.tensor([5, 0, 39])
    np.testing.assert_array_equal(ft.prototype_images(elements, ids), elements[[5, 0, 39]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match=r"fine_tuning\.device"):
        blocks.resolve_device("cuda")


# --------------------------------------------------------------------------- pieces


def test_data_order_is_seeded_per_epoch_and_covers_the_images():
    a = training.epoch_batches(50, 16, seed=0, epoch=1)
    assert a == training.epoch_batches(50, 16, seed=0, epoch=1)
    assert a != training.epoch_batches(50, 16, seed=0, epoch=2)
    assert a != training.epoch_batches(50, 16, seed=1, epoch=1)
    assert [len(b) for b in a] == [16, 16, 16, 2]
    assert sorted(i for b in a for i in b) == list(range(50))
    assert [len(b) for b in training.epoch_batches(49, 16, 0, 1)] == [16, 16, 16]  # a lone image is dropped


def test_schedule_warms_up_then_decays_to_zero():
    f = [training.lr_factor(s, 10, 2) for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(b < a for a, b in itertools.pairwise(f[2:]))
    assert training.lr_factor(10, 10, 2) == pytest.approx(0.0, abs=1e-12)


def test_heads_come_from_their_own_generators():
    state = torch.get_rng_state()
    h1, i1 = training.init_heads(12, 5, 3, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG consumed
    h2, i2 = training.init_heads(12, 5, 3, seed=0)
    h3, _ = training.init_heads(12, 5, 3, seed=1)
    assert torch.equal(h1.weight, h2.weight) and torch.equal(i1.linear.weight, i2.linear.weight)
    assert not torch.equal(h1.weight, h3.weight)
    assert float(h1.weight.detach().abs().max()) <= 1 / math.sqrt(12)


def test_bn_modes():
    rep = build(SPEC)
    bns = training._batchnorms(rep.model)
    assert bns
    training._prepare_backbone(rep.model, ft.FineTuningTrainParams(bn_mode="frozen"))
    training.set_train_mode(rep.model, "frozen")
    assert all(not p.requires_grad for bn in bns for p in bn.parameters())
    assert all(not bn.training for bn in bns) and rep.model.conv_stem.training
    training._prepare_backbone(rep.model, ft.FineTuningTrainParams(bn_mode="eval"))
    training.set_train_mode(rep.model, "eval")
    assert all(p.requires_grad for p in rep.model.parameters()) and not any(bn.training for bn in bns)
    training.set_train_mode(rep.model, "train")
    assert all(bn.training for bn in bns)


def test_interpretation_loss_reaches_the_backbone_and_vanishes_at_lambda_0(data):
    images, elements = data
    rep = build(SPEC)
    training._prepare_backbone(rep.model, ft.FineTuningTrainParams(channels_last=False))
    training.set_train_mode(rep.model, "eval")  # BN statistics fixed: repeated forwards are identical
    c = scoring.concept_vectors(rep, elements)
    h_std, h_interp = training.init_heads(rep.dim, 16, NUM_CLASSES, seed=0)
    x = torch.stack([torch.from_numpy(images["train"].load(i).copy()).permute(2, 0, 1) for i in range(8)])
    y = torch.as_tensor(images["train"].labels[:8])
    params = [p for p in rep.model.parameters() if p.requires_grad]
    k = n_dropped(0.1, 16)

    def grads(lam: float, concepts):
        z = rep.model(training.model_input(rep, x, torch.device("cpu"), channels_last=False))
        loss, parts = training.finetune_loss(z, y, h_std, h_interp, concepts, k, lam)
        return loss, parts, torch.autograd.grad(loss, params + list(h_interp.parameters()), allow_unused=True)

    loss1, parts1, g1 = grads(1.0, c)
    loss0, parts0, g0 = grads(0.0, None)
    z = rep.model(training.model_input(rep, x, torch.device("cpu"), channels_last=False))
    ce = F.cross_entropy(h_std(z), y)
    g_ce = torch.autograd.grad(ce, params)
    # λ = 1: the interpretation term adds gradient to (nearly) every backbone tensor
    g_interp = [a - b for a, b in zip(g1[: len(params)], g_ce)]
    nonzero = sum(bool(g.abs().sum() > 0) for g in g_interp)
    assert nonzero >= 0.9 * len(params)
    assert loss1.item() == pytest.approx(parts1["ce_std"] + parts1["ce_interp"], rel=1e-5)
    assert all(g is not None for g in g1[len(params):])
    # λ = 0: exactly cross-entropy, same gradients, nothing reaches the interpretation head
    assert torch.equal(loss0, ce) and "ce_interp" not in parts0
    assert all(torch.equal(a, b) for a, b in zip(g0[: len(params)], g_ce))
    assert all(g is None for g in g0[len(params):])


# --------------------------------------------------------------------------- λ = 0 control


def _plain_ce_reference(images, cfg: ft.FineTuningTrainParams):
    """Plain cross-entropy fine-tuning of backbone + h_std, from torch primitives."""
    from PIL import Image

    rep = build(SPEC)
    model = rep.model.to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(True)
    h_std, _ = training.init_heads(rep.dim, M, NUM_CLASSES, cfg.seed)
    opt = torch.optim.AdamW(
        [
            {"params": list(model.parameters()), "lr": cfg.lr_backbone},
            {"params": list(h_std.parameters()), "lr": cfg.lr_heads},
        ],
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    train = images["train"]
    per_epoch = len(training.epoch_batches(len(train), cfg.batch_size, cfg.seed, 1))
    total = per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * (s / total))))

    def load(i):
        arr = train.load(i)
        if arr.shape[0] != rep.input_size:
            arr = np.asarray(Image.fromarray(arr).resize((rep.input_size,) * 2, Image.BICUBIC))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    for epoch in range(1, cfg.epochs + 1):
        model.train()
        for idx in training.epoch_batches(len(train), cfg.batch_size, cfg.seed, epoch):
            x = rep.normalise(torch.stack([load(i) for i in idx])).contiguous()
            y = torch.as_tensor(train.labels[idx])
            loss = F.cross_entropy(h_std(model(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = {s: float((h_std(extract(rep, images[s], num_workers=0, progress=False).x).argmax(-1)
                         == torch.as_tensor(images[s].labels)).float().mean()) for s in ("val", "test")}
    return model, h_std, acc


def test_lambda_0_is_bit_identical_to_plain_cross_entropy(data, tmp_path):
    images, elements = data
    cfg = ft.FineTuningTrainParams(lam=0.0, epochs=1, eval_epochs=(), **BASE)
    history = ft.finetune(SPEC, images, elements, cfg, tmp_path, SWEEP, NUM_CLASSES, progress=False)
    ref_model, ref_head, ref_acc = _plain_ce_reference(images, cfg)
    got, _ = load_tensors(tmp_path / "backbone.safetensors")
    ref = ref_model.state_dict()
    assert set(got) == set(ref)
    differ = [k for k in ref if not torch.equal(got[k], ref[k])]
    assert not differ, differ[:5]
    ck, _ = load_tensors(tmp_path / "epoch_001.safetensors")
    assert torch.equal(ck["h_std.weight"], ref_head.weight) and torch.equal(ck["h_std.bias"], ref_head.bias)
    assert history[-1].accuracy_val == ref_acc["val"] and history[-1].accuracy_test == ref_acc["test"]
    assert all(r.iis is None for r in history)  # eval_epochs=() scores nothing


# --------------------------------------------------------------------------- the λ = 1 run


def test_history_records_every_epoch_and_scores_the_chosen_ones(run_lam1):
    _, out, history, _ = run_lam1
    assert [r.epoch for r in history] == [0, 1, 2, 3]
    assert all(r.lam == 1.0 and r.seed == 0 for r in history)
    assert history[0].train_loss is None and all(math.isfinite(r.train_loss) for r in history[1:])
    for r in history:
        scored = r.epoch in (0, 3)
        assert (r.iis is not None) == scored and (r.accuracy_linear_probe is not None) == scored
        assert 0.0 <= r.accuracy_test <= 1.0 and 0.0 <= r.accuracy_val <= 1.0
    assert all(0.0 < history[e].iis < 1.0 for e in (0, 3))
    # the jointly trained probe head learns: the loss falls and accuracy leaves chance
    assert history[3].train_loss < history[1].train_loss
    assert history[3].accuracy_test > history[0].accuracy_test
    names = sorted(p.name for p in out.iterdir())
    assert names == ["backbone.safetensors"] + [f"epoch_{e:03d}.safetensors" for e in (1, 2, 3)]


def test_backbone_file_reloads_through_build_with_the_same_features(run_lam1, data):
    _, out, _, model = run_lam1
    images, _ = data
    path = out / "backbone.safetensors"
    rep_mem = build(SPEC)
    rep_mem.model.load_state_dict(model.state_dict())  # the in-memory trained weights, frozen copy
    reloaded = build(BackboneParams(name="ft", model=SPEC.model, weights=str(path), input_size=32,
                                  mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
    via_helper = build(ft.finetuned_spec(SPEC, out))
    model.eval()
    x = torch.stack([torch.from_numpy(images["test"].load(i).copy()).permute(2, 0, 1) for i in range(6)])
    with torch.no_grad():
        direct = model(reloaded.normalise(x).contiguous())
    for rep in (reloaded, via_helper):
        torch.testing.assert_close(rep.forward_uint8(x), direct, rtol=1e-4, atol=1e-4)
    assert reloaded.weights_fingerprint == weights_fingerprint(rep_mem.model)
    assert reloaded.weights_fingerprint != build(SPEC).weights_fingerprint  # training changed the weights


def test_evaluate_representation_is_the_scoring_used_at_epoch_0(run_lam1, data):
    cfg, _, history, _ = run_lam1
    images, elements = data
    summary = ft.evaluate_representation(build(SPEC), images, elements, SWEEP, NUM_CLASSES)
    assert summary["iis"] == pytest.approx(history[0].iis, abs=1e-12)
    assert summary["accuracy_linear_probe"] == pytest.approx(history[0].accuracy_linear_probe, abs=1e-12)


def test_resume_after_interruption_equals_an_uninterrupted_run(run_lam1, data, tmp_path, monkeypatch):
    cfg, out, history, _ = run_lam1
    images, elements = data
    for e in (1, 2):  # the run was interrupted during epoch 3
        shutil.copy(out / f"epoch_{e:03d}.safetensors", tmp_path)
    spy = _Spy(training.train_epoch)
    monkeypatch.setattr(training, "train_epoch", spy)
    resumed = ft.finetune(SPEC, images, elements, cfg, tmp_path, SWEEP, NUM_CLASSES, progress=False)
    assert spy.calls == 1  # only epoch 3 was trained
    a, _ = load_tensors(out / "backbone.safetensors")
    b, _ = load_tensors(tmp_path / "backbone.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    full, _ = load_tensors(out / "epoch_003.safetensors")
    again, _ = load_tensors(tmp_path / "epoch_003.safetensors")
    diff = [k for k in full if not k.startswith("rng.") and not torch.equal(full[k], again[k])]
    assert not diff  # heads and optimiser state too
    assert [r.to_dict() for r in resumed] == [r.to_dict() for r in history]


def test_finished_run_is_not_trained_again(run_lam1, data, tmp_path, monkeypatch):
    cfg, out, history, _ = run_lam1
    images, elements = data
    shutil.copy(out / "epoch_003.safetensors", tmp_path)
    spy = _Spy(training.train_epoch)
    monkeypatch.setattr(training, "train_epoch", spy)
    again = ft.finetune(SPEC, images, elements, cfg, tmp_path, SWEEP, NUM_CLASSES, progress=False)
    assert spy.calls == 0 and [r.to_dict() for r in again] == [r.to_dict() for r in history]
    assert (tmp_path / "backbone.safetensors").is_file()


def test_resume_into_a_folder_of_another_config_is_an_error(run_lam1, data, tmp_path):
    cfg, out, _, _ = run_lam1
    images, elements = data
    shutil.copy(out / "epoch_001.safetensors", tmp_path)
    other = ft.FineTuningTrainParams(**{**cfg.__dict__, "lam": 0.5})
    with pytest.raises(ValueError, match="another run"):
        ft.finetune(SPEC, images, elements, other, tmp_path, SWEEP, NUM_CLASSES, progress=False)


def test_checkpoint_key_gives_each_representation_its_own_folder_and_resume_works(run_lam1, data, tmp_path,
                                                                                   monkeypatch):
    """Two representations of one model (here two resolutions) share the model's folder without a
    key (the run hash then refuses the second), and get one folder each with their namespaces."""
    cfg, out, history, _ = run_lam1
    images, elements = data
    r48 = dataclasses.replace(SPEC, input_size=48)
    shared = ft.run_checkpoint_dir(tmp_path, SPEC, cfg.lam, cfg.seed)
    assert shared == ft.run_checkpoint_dir(tmp_path, r48, cfg.lam, cfg.seed)
    assert shared == tmp_path / "tf_efficientnet_lite0-offline" / "lam1_seed0"  # the layout without a key
    a = ft.run_checkpoint_dir(tmp_path, SPEC, cfg.lam, cfg.seed, checkpoint_key="lite0_r32_penultimate")
    b = ft.run_checkpoint_dir(tmp_path, r48, cfg.lam, cfg.seed, checkpoint_key="lite0_r48_penultimate")
    assert a == tmp_path / "lite0_r32_penultimate" / "lam1_seed0"
    assert b == tmp_path / "lite0_r48_penultimate" / "lam1_seed0" and a != b
    for bad in ("", "..", "a/b", "../x"):
        with pytest.raises(ValueError, match="checkpoint_key"):
            ft.run_checkpoint_dir(tmp_path, SPEC, cfg.lam, cfg.seed, checkpoint_key=bad)
    # the 32 px run's checkpoints in its keyed folder: the run resumes from them (nothing left to train)
    a.mkdir(parents=True)
    shutil.copy(out / "epoch_003.safetensors", a)
    spy = _Spy(training.train_epoch)
    monkeypatch.setattr(training, "train_epoch", spy)
    again = ft.finetune(SPEC, images, elements, cfg, a, SWEEP, NUM_CLASSES, progress=False)
    assert spy.calls == 0 and [r.to_dict() for r in again] == [r.to_dict() for r in history]
    assert (a / "backbone.safetensors").is_file() and not b.exists()
    # a shared folder would hand the 48 px representation the 32 px run's checkpoints: refused
    with pytest.raises(ValueError, match="another run"):
        ft.finetune(r48, images, elements, cfg, a, SWEEP, NUM_CLASSES, progress=False)

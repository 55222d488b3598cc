"""Tests for iis_study.core.heads: sparsify, stacked Adam, the batched sweep vs the
per-head reference, selection on val, config validation and explanations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iis_study.core.heads import (
    ESTIMATORS,
    ConceptSpace,
    HeadsProblem,
    Split,
    SweepParams,
    explain,
    fit_heads,
    n_dropped,
    sparsify,
    sweep,
    sweep_many,
    train_single_head,
)
from iis_study.core.heads.batched import BatchedHeads, StackedAdam
from iis_study.core.heads.datatypes import ESTIMATOR_NAMES
from iis_study.core.heads.selection import select_lr
from tests.core.reference import ranked_keep

GRID = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
GRID_PERCENT = (0, 10, 30, 50, 70, 90, 95, 98)  # the same grid as exact integers


# --------------------------------------------------------------------------- data


def _blobs(n: int, seed: int, centers: torch.Tensor, noise: float = 1.5) -> Split:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, centers.shape[0], (n,), generator=g)
    return Split(centers[y] + noise * torch.randn(n, centers.shape[1], generator=g), y)


@pytest.fixture(scope="module")
def toy():
    """Small learnable problem: K=4 classes in D=24, M=12 concept vectors."""
    g = torch.Generator().manual_seed(123)
    centers = 1.2 * torch.randn(4, 24, generator=g)
    vectors = F.normalize(torch.randn(12, 24, generator=g), dim=1)
    elements = torch.randn(30, 24, generator=g)
    return {
        "train": _blobs(400, 1, centers),
        "val": _blobs(150, 2, centers),
        "test": _blobs(150, 3, centers),
        "vectors": vectors,
        "elements": elements,
    }


# --------------------------------------------------------------------------- n_dropped / sparsify


@pytest.mark.parametrize("m", [1, 7, 10, 37, 200, 1000])
def test_n_dropped_exact_on_default_grid(m):
    for s, pct in zip(GRID, GRID_PERCENT):
        assert n_dropped(s, m) == (pct * m) // 100  # exact integer arithmetic
    assert n_dropped(0.7, 90) == 63  # the float product 0.7 * 90 is 62.99999999999999
    assert n_dropped(0.95, 200) == 190
    assert n_dropped(np.float64(0.7), 10) == 7


@pytest.mark.parametrize("m", [10, 37, 200])
def test_sparsify_keeps_exactly_m_minus_k_with_ties(m):
    g = torch.Generator().manual_seed(m)
    cont = torch.randn(6, m, generator=g)
    tied = torch.randint(-2, 3, (6, m), generator=g).float()  # many exact ties, zeros, +/- equal |a|
    a = torch.cat([cont, tied])
    for s in GRID:
        k = n_dropped(s, m)
        out = sparsify(a, k)
        expected = ranked_keep(a, k)
        torch.testing.assert_close(out, a * expected, rtol=0, atol=0)
        # count kept positions through the gradient, which also sees kept zeros
        a_req = a.clone().requires_grad_(True)
        sparsify(a_req, k).sum().backward()
        assert torch.equal((a_req.grad != 0).sum(-1), torch.full((a.shape[0],), m - k))


def test_sparsify_gradient_only_through_kept_entries():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 200, generator=g, requires_grad=True)
    up = torch.randn(5, 200, generator=g)
    k = n_dropped(0.95, 200)
    sparsify(a, k).backward(up)
    keep = ranked_keep(a.detach(), k)
    torch.testing.assert_close(a.grad, up * keep, rtol=0, atol=0)
    assert bool((a.grad[~keep] == 0).all()) and bool((a.grad[keep] == up[keep]).all())


def test_sparsify_per_head_k_broadcasts_over_leading_dim():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 10, generator=g)
    k = torch.tensor([0, 3, 9])
    out = sparsify(a, k)
    for h in range(3):
        torch.testing.assert_close(out[h], sparsify(a[h], int(k[h])), rtol=0, atol=0)
        assert bool(((out[h] != 0).sum(-1) == 10 - int(k[h])).all())
    with pytest.raises(ValueError, match="prefix"):
        sparsify(a, torch.tensor([1, 2]))


def test_sparsify_s0_keeps_everything():
    a = torch.randn(4, 10)
    torch.testing.assert_close(sparsify(a, 0), a)


# --------------------------------------------------------------------------- Adam


def test_stacked_adam_matches_torch_adam_with_exponential_lr():
    g = torch.Generator().manual_seed(0)
    lrs = (1e-3, 1e-1)
    init = torch.randn(3, 2, 5, 4, generator=g)  # (S=3, L=2, 5, 4): lr axis is 1
    stacked = init.clone().requires_grad_(True)
    opt = StackedAdam({"w": stacked}, {"w": 1}, lrs)
    refs = [[init[s, li].clone().requires_grad_(True) for li in range(2)] for s in range(3)]
    ropts = [[torch.optim.Adam([refs[s][li]], lr=lrs[li]) for li in range(2)] for s in range(3)]
    scheds = [[torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9) for o in row] for row in ropts]
    for epoch in range(3):
        for _ in range(4):
            grad = torch.randn(3, 2, 5, 4, generator=g)
            opt.zero_grad()
            stacked.grad = grad.clone()
            opt.step()
            for s in range(3):
                for li in range(2):
                    ropts[s][li].zero_grad()
                    refs[s][li].grad = grad[s, li].clone()
                    ropts[s][li].step()
        opt.decay(0.9)
        for row in scheds:
            for sch in row:
                sch.step()
    for s in range(3):
        for li in range(2):
            torch.testing.assert_close(stacked.detach()[s, li], refs[s][li].detach(), rtol=1e-6, atol=1e-7)
    assert opt.lrs == [ropts[0][li].param_groups[0]["lr"] for li in range(2)]


# --------------------------------------------------------------------------- batched == reference


def _history_curve(result, head, seed, lr, sparsity=None):
    h = result.history
    sel = (h["head"] == head) & (h["seed"] == seed) & np.isclose(h["lr"], lr)
    sel &= h["sparsity"].isna() if sparsity is None else np.isclose(h["sparsity"], sparsity)
    return h[sel].sort_values("epoch")["val_acc"].to_numpy()


def _table_row(result, head, seed, lr, sparsity=None):
    t = result.table
    sel = (t["head"] == head) & (t["seed"] == seed) & np.isclose(t["lr"], lr)
    sel &= t["sparsity"].isna() if sparsity is None else np.isclose(t["sparsity"], sparsity)
    assert int(sel.sum()) == 1
    return t[sel].iloc[0]


def _assert_matches_reference(result, toy, concepts, cfg, head, seed, lr, sparsity=None):
    ref = train_single_head(
        toy["train"],
        toy["val"],
        toy["test"],
        concepts,
        4,
        head=head,
        seed=seed,
        lr=lr,
        sparsity=sparsity,
        config=cfg,
    )
    val = _history_curve(result, head, seed, lr, sparsity)
    tol = 1.0 / 150 + 1e-9  # at most one sample may flip through float rounding
    np.testing.assert_allclose(val, ref.val_curve, rtol=0, atol=tol)
    row = _table_row(result, head, seed, lr, sparsity)
    assert int(row["best_epoch"]) == ref.best_epoch
    assert row["val_acc"] == pytest.approx(ref.val_acc, abs=tol)
    assert row["test_acc"] == pytest.approx(ref.test_acc, abs=tol)


@pytest.fixture(scope="module")
def vector_sweep(toy):
    cfg = SweepParams(
        steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5, 0.9), learning_rates=(1e-3, 1e-2), seeds=(0, 1), epochs=4, batch_size=64
    )
    concepts = ConceptSpace("vectors", vectors=toy["vectors"])
    return cfg, concepts, sweep(toy["train"], toy["val"], toy["test"], concepts, 4, cfg, progress=False)


def test_batched_probe_matches_reference(toy, vector_sweep):
    cfg, concepts, result = vector_sweep
    _assert_matches_reference(result, toy, concepts, cfg, "probe", seed=1, lr=1e-2)


@pytest.mark.parametrize("sparsity, seed, lr", [(0.5, 0, 1e-2), (0.9, 1, 1e-3)])
def test_batched_interp_matches_reference(toy, vector_sweep, sparsity, seed, lr):
    cfg, concepts, result = vector_sweep
    _assert_matches_reference(result, toy, concepts, cfg, "interp", seed=seed, lr=lr, sparsity=sparsity)


def test_batched_end_to_end_matches_reference(toy):
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.5,), learning_rates=(1e-2,), seeds=(3,), epochs=3, batch_size=64)
    concepts = ConceptSpace("end_to_end", elements=toy["elements"], n_concepts=6)
    result = sweep(toy["train"], toy["val"], toy["test"], concepts, 4, cfg, progress=False)
    _assert_matches_reference(result, toy, concepts, cfg, "interp", seed=3, lr=1e-2, sparsity=0.5)
    assert result.state["interp.q"].shape == (1, 1, 30, 6)


def test_batched_projection_matches_reference(toy):
    g = torch.Generator().manual_seed(9)
    concepts = ConceptSpace(
        "projection",
        projection=torch.randn(24, 8, generator=g),
        mean=torch.randn(8, generator=g),
        std=torch.rand(8, generator=g) + 0.5,
    )
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-2,), seeds=(0,), epochs=3, batch_size=64)
    result = sweep(toy["train"], toy["val"], toy["test"], concepts, 4, cfg, progress=False)
    _assert_matches_reference(result, toy, concepts, cfg, "interp", seed=0, lr=1e-2, sparsity=0.5)
    assert "interp.ln_weight" not in result.state


def _assert_same_result(a, b) -> None:
    """Two sweep results are identical: tables, curves, correctness and stored parameters, bit for bit."""
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(a.table, b.table, check_exact=True)
    pd_testing.assert_frame_equal(a.selected, b.selected, check_exact=True)
    pd_testing.assert_frame_equal(a.history, b.history, check_exact=True)
    assert np.array_equal(a.test_correct, b.test_correct)
    assert a.state.keys() == b.state.keys()
    for key in a.state:
        assert torch.equal(a.state[key], b.state[key]), key
    assert a.budget == b.budget and a.m == b.m


@pytest.mark.parametrize("fused", ["1", "0"])
def test_sweep_many_equals_one_sweep_per_concept_space(toy, monkeypatch, fused):
    """Concept spaces trained together (the probe once, shared; spaces of equal M stacked into one
    call of the heads) give each space's own sweep, bit for bit, with the numba kernel and without."""
    from iis_study.core.heads import batched

    monkeypatch.setenv("IIS_FUSED", fused)
    g = torch.Generator().manual_seed(9)
    spaces = {
        # first, so that the stacked group is not simply the first space's
        "projection": ConceptSpace(
            "projection",
            projection=torch.randn(24, 8, generator=g),
            mean=torch.randn(8, generator=g),
            std=torch.rand(8, generator=g) + 0.5,
        ),
        "vectors": ConceptSpace("vectors", vectors=toy["vectors"]),
        "end_to_end": ConceptSpace("end_to_end", elements=toy["elements"], n_concepts=6),
        # the same M as "vectors": both run stacked, as one call of the fused heads
        "vectors_2": ConceptSpace("vectors", vectors=F.normalize(torch.randn(12, 24, generator=g), dim=1)),
    }
    stacked_calls = []
    original = batched.SharedProbe._stacked_logits

    def spy(self, bases):
        stacked_calls.append(tuple(self.stacked))
        return original(self, bases)

    monkeypatch.setattr(batched.SharedProbe, "_stacked_logits", spy)
    cfg = SweepParams(
        steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5, 0.9), learning_rates=(1e-3, 1e-1), seeds=(0, 2), epochs=4, batch_size=64
    )
    data = (toy["train"], toy["val"], toy["test"])
    together = sweep_many(*data, spaces, 4, cfg, progress=False)
    assert list(together) == list(spaces)
    assert stacked_calls and set(stacked_calls) == {("vectors", "vectors_2")}  # the stacked path did run
    for name, space in spaces.items():
        _assert_same_result(together[name], sweep(*data, space, 4, cfg, progress=False))
    # the probe is one model: the same stored probe in every result
    for key in ("probe.weight", "probe.bias"):
        assert torch.equal(together["vectors"].state[key], together["projection"].state[key])
    with pytest.raises(ValueError, match="at least one concept space"):
        sweep_many(*data, {}, 4, cfg, progress=False)


def test_fit_heads_with_adam_is_the_adam_sweep(toy):
    """``fit_heads`` with ``estimator: adam`` gives what the Adam sweep (``sweep_many``) gives, bit for bit: the
    registry adds nothing to the estimator it calls."""
    cfg = SweepParams(
        estimator="adam", steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-2,), seeds=(0,),
        epochs=2, batch_size=64,
    )
    spaces = {
        "vectors": ConceptSpace("vectors", vectors=toy["vectors"]),
        "end_to_end": ConceptSpace("end_to_end", elements=toy["elements"], n_concepts=6),
    }
    data = (toy["train"], toy["val"], toy["test"])
    via_registry = fit_heads(HeadsProblem(*data, spaces, 4), cfg, progress=False)
    direct = sweep_many(*data, spaces, 4, cfg, progress=False)
    assert list(via_registry) == list(direct) == list(spaces)
    for name in spaces:
        assert via_registry[name].certificate is None  # the Adam sweep's result, not the convex one
        _assert_same_result(via_registry[name], direct[name])


def test_the_estimator_registry_has_the_names_sweep_estimator_accepts():
    assert tuple(ESTIMATORS) == ESTIMATOR_NAMES
    with pytest.raises(ValueError, match="sweep.estimator must be one of"):
        SweepParams(estimator="sgd").validate()


def test_minibatch_of_one_matches_reference(toy):
    # 129 = 2 * 64 + 1: the last minibatch of every epoch holds a single sample
    train = Split(toy["train"].x[:129], toy["train"].y[:129])
    data = {**toy, "train": train}
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.3,), learning_rates=(1e-2,), seeds=(0,), epochs=3, batch_size=64)
    concepts = ConceptSpace("vectors", vectors=toy["vectors"])
    result = sweep(train, toy["val"], toy["test"], concepts, 4, cfg, progress=False)
    _assert_matches_reference(result, data, concepts, cfg, "interp", seed=0, lr=1e-2, sparsity=0.3)


def test_result_shapes_and_selected_consistency(vector_sweep):
    cfg, _, result = vector_sweep
    assert result.test_correct.shape == (2, 4, 150) and result.test_correct.dtype == bool
    assert len(result.table) == 2 * 2 + 3 * 2 * 2
    assert len(result.selected) == 2 * (1 + 3)
    assert result.state["probe.weight"].shape == (2, 4, 24)
    assert result.state["interp.weight"].shape == (2, 3, 4, 12)
    assert result.state["interp.ln_weight"].shape == (2, 3, 12)
    # per-sample correctness of the selected heads reproduces their reported test accuracy
    sel = result.selected
    for si, seed in enumerate(cfg.seeds):
        rows = sel[sel["seed"] == seed]
        accs = [rows[rows["head"] == "probe"]["test_acc"].item()]
        accs += [rows[np.isclose(rows["sparsity"], s)]["test_acc"].item() for s in cfg.sparsities]
        np.testing.assert_allclose(result.test_correct[si].mean(-1), accs)


def test_init_does_not_depend_on_other_heads(toy):
    concepts = ConceptSpace("vectors", vectors=toy["vectors"])
    small = BatchedHeads(concepts, SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.5,), learning_rates=(1e-2,), seeds=(1,)), 24, 4)
    big = BatchedHeads(
        concepts, SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-3, 1e-2), seeds=(0, 1)), 24, 4
    )
    torch.testing.assert_close(small.params["interp.weight"][0, 0, 0], big.params["interp.weight"][1, 1, 1])
    torch.testing.assert_close(small.params["probe.weight"][0, 0], big.params["probe.weight"][1, 1])
    assert not torch.equal(big.params["probe.weight"][0, 1], big.params["probe.weight"][1, 1])
    bound = 1 / math.sqrt(24)
    assert float(big.params["probe.weight"].detach().abs().max()) <= bound
    assert torch.equal(big.params["interp.ln_weight"], torch.ones_like(big.params["interp.ln_weight"]))


# --------------------------------------------------------------------------- selection


def test_select_lr_ties_go_to_smaller_lr():
    assert select_lr(np.array([0.5, 0.5, 0.4]), np.array([1e-3, 1e-2, 1e-1])) == 0
    assert select_lr(np.array([0.5, 0.5, 0.4]), np.array([1e-1, 1e-2, 1e-3])) == 1
    assert select_lr(np.array([0.3, 0.6, 0.6]), np.array([1e-3, 1e-2, 1e-1])) == 1


def test_selection_uses_val_not_test(toy):
    # Test labels are rotated (y + 1 mod K): the better a head is on val, the worse on test.
    test = Split(toy["val"].x.clone(), (toy["val"].y + 1) % 4)
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.5,), learning_rates=(1e-3, 1e-1), seeds=(0,), epochs=4, batch_size=64)
    concepts = ConceptSpace("vectors", vectors=toy["vectors"])
    result = sweep(toy["train"], toy["val"], test, concepts, 4, cfg, progress=False)
    t = result.table
    for head in ("probe", "interp"):
        rows = t[t["head"] == head]
        best_val_lr = rows.loc[rows["val_acc"].idxmax(), "lr"]
        best_test_lr = rows.loc[rows["test_acc"].idxmax(), "lr"]
        assert best_val_lr != best_test_lr  # precondition: val and test disagree
        chosen = result.selected[result.selected["head"] == head]["lr"].item()
        assert chosen == best_val_lr
    # best epoch is the val argmax (earliest), not the test argmax
    h = result.history
    for _, row in t.iterrows():
        sel = (h["head"] == row["head"]) & np.isclose(h["lr"], row["lr"])
        curve = h[sel].sort_values("epoch")
        assert row["best_epoch"] == int(np.argmax(curve["val_acc"].to_numpy())) + 1


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsities": (0.0, 0.5, 0.3)}, "sweep.sparsities must be strictly increasing"),
        ({"sparsities": (0.0, 0.5, 0.5)}, "sweep.sparsities must not contain duplicates"),
        ({"sparsities": (0.0, 1.0)}, r"sweep.sparsities must all lie in \[0, 1\)"),
        ({"learning_rates": (1e-2, -1e-3)}, "sweep.learning_rates must all be > 0"),
        ({"epochs": 0}, "sweep.epochs"),
        ({"batch_size": 0}, "sweep.batch_size"),
        ({"seeds": ()}, "sweep.seeds"),
    ],
)
def test_config_validation_names_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SweepParams(**kwargs).validate()


def test_concept_space_dimension_mismatch_message():
    c = ConceptSpace("vectors", vectors=F.normalize(torch.randn(5, 1280), dim=1))
    with pytest.raises(
        ValueError, match="feature dimension 512 does not match concept vectors of dimension 1280"
    ):
        c.validate(512)
    with pytest.raises(ValueError, match="L2-normalised"):
        ConceptSpace("vectors", vectors=torch.ones(3, 4)).validate(4)
    with pytest.raises(ValueError, match="n_concepts"):
        ConceptSpace("end_to_end", elements=torch.randn(3, 4), n_concepts=0).validate(4)


def test_sweep_rejects_bad_labels(toy):
    bad = Split(toy["val"].x, toy["val"].y + 10)
    with pytest.raises(ValueError, match=r"val.y labels must lie in \[0, 4\)"):
        sweep(
            toy["train"],
            bad,
            toy["test"],
            ConceptSpace("vectors", vectors=toy["vectors"]),
            4,
            SweepParams(steps=1, min_batches_per_epoch=1, epochs=1),
            progress=False,
        )


# --------------------------------------------------------------------------- explain


def test_explain_lists_kept_concepts_by_contribution(toy, vector_sweep):
    _cfg, concepts, result = vector_sweep
    z = toy["test"].x[:6]
    df = explain(result, concepts, z, sparsity=0.5, seed=1, top=3)
    assert list(df.columns) == ["sample", "predicted", "rank", "concept", "activation", "contribution"]
    assert len(df) == 6 * 3
    st = {k: v[1, 1] for k, v in result.state.items() if k.startswith("interp.")}  # seed 1, s = 0.5
    a = F.layer_norm(z @ toy["vectors"].T, (12,)) * st["interp.ln_weight"] + st["interp.ln_bias"]
    kept = sparsify(a, n_dropped(0.5, 12))
    pred = (kept @ st["interp.weight"].T + st["interp.bias"]).argmax(-1)
    for i in range(6):
        rows = df[df["sample"] == i]
        assert (rows["predicted"] == int(pred[i])).all()
        assert rows["contribution"].is_monotonic_decreasing
        assert list(rows["rank"]) == [1, 2, 3]
        for _, r in rows.iterrows():
            c = int(r["concept"])
            assert kept[i, c] != 0  # only kept concepts explain
            assert r["contribution"] == pytest.approx(
                float(kept[i, c] * st["interp.weight"][pred[i], c]), rel=1e-5
            )
        contrib_all = torch.where(
            kept[i] != 0, kept[i] * st["interp.weight"][pred[i]], torch.tensor(-math.inf)
        )
        assert rows["contribution"].iloc[0] == pytest.approx(float(contrib_all.max()), rel=1e-5)
    with pytest.raises(ValueError, match="sparsity must be one of"):
        explain(result, concepts, z, sparsity=0.3)


def test_end_to_end_through_elements_matches_reference(toy):
    """Few elements (E < D): the batched sweep takes the (z·Eᵀ)·A / ‖AᵀE‖ path; it must still
    reproduce the plain single-head reference, which forms C = normalise(AᵀE) explicitly."""
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.5,), learning_rates=(1e-2,), seeds=(3,), epochs=3, batch_size=64)
    concepts = ConceptSpace("end_to_end", elements=toy["elements"][:8], n_concepts=6)
    result = sweep(toy["train"], toy["val"], toy["test"], concepts, 4, cfg, progress=False)
    _assert_matches_reference(result, toy, concepts, cfg, "interp", seed=3, lr=1e-2, sparsity=0.5)


def test_end_to_end_score_paths_agree():
    from iis_study.core.heads.batched import BatchedHeads
    from iis_study.core.heads.activations import concepts_from_assignment, hard_assignment

    g = torch.Generator().manual_seed(0)
    elements = torch.randn(10, 32, generator=g)
    cfg = SweepParams(steps=1, min_batches_per_epoch=1, sparsities=(0.0, 0.5), learning_rates=(1e-2,), seeds=(0, 1), epochs=1, batch_size=8)
    heads = BatchedHeads(ConceptSpace("end_to_end", elements=elements, n_concepts=4), cfg, 4, 3)
    assign = hard_assignment(heads.params["interp.q"], 0.1, heads._gumbel())
    x = torch.randn(2, 8, 32, generator=g)
    via = heads._end_to_end_scores(x, assign)
    direct = torch.einsum("sbd,pslmd->pslbm", x, concepts_from_assignment(assign, elements))
    torch.testing.assert_close(via, direct, rtol=1e-4, atol=1e-5)
    gv = torch.autograd.grad(via.square().sum(), heads.params["interp.q"], retain_graph=True)[0]
    gd = torch.autograd.grad(direct.square().sum(), heads.params["interp.q"])[0]
    torch.testing.assert_close(gv, gd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("train", [True, False])
def test_assigned_scores_match_the_dense_products(train):
    """The one-hot shortcut of the through-elements scores (forward by summing each concept's
    elements) gives the values and the straight-through gradients of the plain dense
    formula ``(z·Eᵀ)·A / ‖AᵀE‖``, including a concept no element is assigned to (norm clamped)."""
    from iis_study.core.heads.activations import AssignedScores, hard_assignment_indexed

    g = torch.Generator().manual_seed(4)
    p_, s_, l_, n_el, m, b, d = 2, 2, 3, 9, 5, 7, 6
    elements = torch.randn(n_el, d, generator=g)
    gram = elements @ elements.T
    zp = torch.randn(s_, b, d, generator=g) @ elements.T
    q = torch.randn(p_, s_, l_, n_el, m, generator=g)
    q[..., 4] -= 100.0  # concept 4 never wins: an empty concept in every head
    q.requires_grad_(True)
    noise = -torch.log(-torch.log(torch.rand(q.shape, generator=g))) if train else None
    assign, idx = hard_assignment_indexed(q, 0.1, noise)
    assert not (idx == 4).any()
    up = torch.randn(p_, s_, l_, b, m, generator=g)

    fast = AssignedScores.apply(zp, gram, assign, idx)
    raw = torch.einsum("sbe,pslem->pslbm", zp, assign)
    norm2 = (torch.matmul(gram, assign) * assign).sum(-2)
    dense = raw / norm2.clamp_min(1e-24).sqrt().clamp_min(1e-12).unsqueeze(-2)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    assert (fast[..., 4] == 0).all()
    if train:
        (g_fast,) = torch.autograd.grad((fast * up).sum(), q, retain_graph=True)
        (g_dense,) = torch.autograd.grad((dense * up).sum(), q)
        torch.testing.assert_close(g_fast, g_dense, rtol=1e-4, atol=1e-5)
        assert g_fast.abs().sum() > 0


def test_flush_denormals_zeroes_only_subnormal_entries():
    from iis_study.core.heads import flush_denormals

    g = torch.tensor([1e-40, -1e-39, 1.2e-38, -3.0, 0.0, 1e-45])
    out = flush_denormals(g)
    assert out.tolist() == [0.0, 0.0, pytest.approx(1.2e-38), -3.0, 0.0, 0.0]
    assert g[0].item() != 0.0  # input left unchanged


def test_gumbel_assignment_divides_logits_not_noise():
    """METHOD §5.3: hard Gumbel-softmax of LN(q)/0.1, i.e. argmax(LN(q)/0.1 + g)."""
    from iis_study.core.heads.activations import hard_assignment

    q = torch.tensor([[3.0, 1.0]], requires_grad=True)  # LN over M=2 -> [1, -1] (up to eps)
    noise = torch.tensor([[0.0, 2.5]])
    hard = hard_assignment(q, 0.1, noise)
    # logits/0.1 + noise = [10, -7.5] -> concept 0 (dividing the noise too would pick concept 1)
    assert hard.detach().tolist() == [[1.0, 0.0]]
    assert hard_assignment(q, 0.1, None).tolist() == [[1.0, 0.0]]
    hard[0, 0].backward()  # straight-through: gradients reach q
    assert q.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("fused", ["1", "0"])
@pytest.mark.parametrize("scale", [1.0, 1 / 7])
def test_sum_cross_entropy_matches_torch(monkeypatch, fused, scale):
    """Value and gradient of ``scale * sum of cross-entropies`` (fused kernel and torch path)
    against ``F.cross_entropy``; an incoming gradient other than 1 is applied as well."""
    from iis_study.core.heads import fused as fused_heads
    from iis_study.core.heads.masks import SumCrossEntropy

    monkeypatch.setenv("IIS_FUSED", fused)
    calls = []
    orig = fused_heads.cross_entropy_kernel
    monkeypatch.setattr(fused_heads, "cross_entropy_kernel", lambda *a: (calls.append(1), orig(*a))[1])
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 2, 7, 4, generator=g)).requires_grad_(True)
    y = torch.randint(0, 4, (7,), generator=g)
    target = y[None, None, :, None].expand(3, 2, 7, 1)
    loss = SumCrossEntropy.apply(logits, target, scale)
    assert bool(calls) == (fused == "1" and fused_heads.numba is not None)
    ref = scale * F.cross_entropy(logits.reshape(-1, 4), y.repeat(6), reduction="sum")
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for up in (1.0, 0.5):
        (g1,) = torch.autograd.grad(loss * up if up != 1.0 else loss, logits, retain_graph=True)
        (g2,) = torch.autograd.grad(ref * up, logits, retain_graph=True)
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", ["1", "0"])
def test_sum_cross_entropy_zeroes_subnormal_gradients(monkeypatch, fused):
    """A confident row's softmax holds probabilities below the smallest normal float: they
    must come back as exact zeros (subnormals slow the BLAS calls down tens of times)."""
    from iis_study.core.heads.masks import SumCrossEntropy

    monkeypatch.setenv("IIS_FUSED", fused)
    logits = torch.tensor([[0.0, -100.0, -87.5, 3.0]], requires_grad=True)
    loss = SumCrossEntropy.apply(logits, torch.tensor([[0]]), 0.25)
    (grad,) = torch.autograd.grad(loss, logits)
    tiny = torch.finfo(torch.float32).tiny
    assert not ((grad != 0) & (grad.abs() < tiny)).any()
    assert grad[0, 1] == 0.0 and grad[0, 2] == 0.0  # exp(-103) and exp(-90.5): subnormal or zero
    p = torch.softmax(logits.detach().double(), -1)[0]
    assert grad[0, 3].item() == pytest.approx(0.25 * p[3].item(), rel=1e-5)
    assert grad[0, 0].item() == pytest.approx(0.25 * (p[0].item() - 1), rel=1e-5)


def test_torch_path_leaves_a_full_size_base_untouched(monkeypatch):
    """No affine (projection concepts) and a full-size contiguous base: the in-place mask
    multiplication must work on a copy, not on the caller's tensor."""
    from iis_study.core.heads.masks import InterpHeads

    monkeypatch.setenv("IIS_FUSED", "0")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 1, 1, 8, 6, generator=g)
    before = base.clone()
    weight, bias = torch.randn(2, 1, 1, 3, 6, generator=g), torch.zeros(2, 1, 1, 3)
    InterpHeads.apply(base, None, None, weight, bias, (3, 5))
    assert torch.equal(base, before)

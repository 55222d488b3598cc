"""The fused numba kernel of the interpretation heads (``core.heads.fused``) against the
torch code path of ``heads.InterpHeads`` (``IIS_FUSED=0``): logits, every gradient and
the keep-mask (exactly ``M - k`` entries per row, ties broken by index)."""

from __future__ import annotations

import itertools
import multiprocessing
import os

import pytest
import torch

import numba  # noqa: F401  (a hard dependency: a failed import must fail these tests, not skip them)

from iis_study.core.heads import fused as fused_heads
from iis_study.core.heads.masks import InterpHeads
from tests.core.reference import ranked_keep

NAMES = ("base", "ln_weight", "ln_bias", "weight", "bias")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the fused forward and backward (to be sure which path ran)."""
    counter = {"forward": 0, "backward": 0}
    for name in counter:
        orig = getattr(fused_heads, name)

        def wrapped(*args, _orig=orig, _name=name, **kwargs):
            counter[_name] += 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(fused_heads, name, wrapped)
    return counter


def _run(monkeypatch, fused: bool, inputs: dict, ks: tuple[int, ...], up: torch.Tensor):
    """Logits and the gradients of ``(logits * up).sum()`` for the inputs that require grad."""
    monkeypatch.setenv("IIS_FUSED", "1" if fused else "0")
    leaves = {n: (None if t is None else _leaf(t)) for n, t in inputs.items()}
    out = InterpHeads.apply(*(leaves[n] for n in NAMES), ks)
    wrt = [n for n in NAMES if leaves[n] is not None and leaves[n].requires_grad]
    grads = torch.autograd.grad(out, [leaves[n] for n in wrt], up) if wrt else ()
    return out.detach(), dict(zip(wrt, grads, strict=True))


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``t`` with the same requires_grad, non-contiguous if ``t`` is."""
    c = t.detach().clone()
    if not t.is_contiguous():
        c = torch.stack([c, c], dim=-1)[..., 0]
    return c.detach().requires_grad_(t.requires_grad)


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=what)


def _inputs(shape, affine: bool, shared_base: bool, needs: set[str], ties: bool, seed: int) -> dict:
    p, s, l, b, m, k = shape
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct dyadic magnitudes, both signs: |a| has many exact ties
        levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0])

        def draw(*sz):
            idx = torch.randint(0, len(levels), sz, generator=g)
            sign = torch.randint(0, 2, sz, generator=g) * 2.0 - 1.0
            return levels[idx] * sign

        base = draw(*((1, s, 1, b, m) if shared_base else (p, s, l, b, m)))
        lnw = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (p, s, l, 1, m), generator=g)]
        lnb = torch.zeros(p, s, l, 1, m)
    else:
        base = torch.randn(*((1, s, 1, b, m) if shared_base else (p, s, l, b, m)), generator=g)
        lnw = 1.0 + 0.3 * torch.randn(p, s, l, 1, m, generator=g)
        lnb = 0.2 * torch.randn(p, s, l, 1, m, generator=g)
    if not affine and not shared_base:
        # non-contiguous: the torch path's `base.expand(shape).contiguous()` would return a
        # full-size contiguous base itself and multiply it in place
        base = torch.stack([base, base], dim=-1)[..., 0]
    inputs = {
        "base": base,
        "ln_weight": lnw if affine else None,
        "ln_bias": lnb if affine else None,
        "weight": 0.3 * torch.randn(p, s, l, k, m, generator=g),
        "bias": torch.randn(p, s, l, k, generator=g),
    }
    for n, t in inputs.items():
        if t is not None:
            t.requires_grad_(n in needs)
    return inputs


def _ks(p: int, m: int, seed: int) -> tuple[int, ...]:
    """One k per group: 0 and M, a k for the kernel's sparse path (few kept entries) and
    one for its dense path, the rest spread over (0, M)."""
    g = torch.Generator().manual_seed(seed)
    n_sparse = max(1, fused_heads._n_sparse(m, 1))
    ks = [0, m, m - n_sparse, max(1, m // 3)] + torch.randint(1, m, (max(p - 4, 0),), generator=g).tolist()
    return tuple(ks[:p])


SHAPES = [  # (P, S, L, B, M, K)
    (4, 2, 2, 37, 12, 4),
    (5, 1, 3, 64, 50, 10),
    (5, 1, 1, 5, 7, 3),
    (4, 1, 1, 40, 33, 17),  # K > 16: no sparse path
    (2, 2, 1, 1, 9, 2),  # a minibatch of one
]
NEEDS = [
    {"ln_weight", "ln_bias", "weight", "bias"},  # fixed concepts
    {"base", "ln_weight", "ln_bias", "weight", "bias"},  # end-to-end concepts
    {"weight"},
    {"ln_bias", "bias"},
    {"base"},
    set(),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shared_base", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_matches_torch_path(monkeypatch, calls, shape, affine, shared_base, ties):
    seed = hash((shape, affine, shared_base, ties)) % 2**31
    p, s, l, b, m, k = shape
    ks = _ks(p, m, seed)
    up = torch.randn(p, s, l, b, k, generator=torch.Generator().manual_seed(seed + 1))
    for needs in NEEDS:
        if not affine:
            needs = needs - {"ln_weight", "ln_bias"}
        inputs = _inputs(shape, affine, shared_base, needs, ties, seed)
        ref_out, ref_grads = _run(monkeypatch, False, inputs, ks, up)
        n_fwd = calls["forward"]
        out, grads = _run(monkeypatch, True, inputs, ks, up)
        assert calls["forward"] == n_fwd + 1, "the fused kernel did not run"
        _close(out, ref_out, f"logits, needs={sorted(needs)}")
        assert grads.keys() == ref_grads.keys()
        for n in grads:
            _close(grads[n], ref_grads[n], f"grad of {n}, needs={sorted(needs)}")


def _fused_keep(monkeypatch, base: torch.Tensor, ks: tuple[int, ...], n_cls: int = 3) -> torch.Tensor:
    """The kernel's keep-mask, read off the gradient into ``base`` (no affine, unit weights:
    ``d sum(logits) / d base = n_cls * keep``)."""
    monkeypatch.setenv("IIS_FUSED", "1")
    lead = base.shape[:-2]
    base = base.detach().clone().requires_grad_(True)
    weight = torch.ones(lead + (n_cls, base.shape[-1]))
    bias = torch.zeros(lead + (n_cls,))
    out = InterpHeads.apply(base, None, None, weight, bias, ks)
    (g,) = torch.autograd.grad(out.sum(), [base])
    assert set(torch.unique(g).tolist()) <= {0.0, float(n_cls)}
    return g > 0


@pytest.mark.parametrize(
    "kind", ["gaussian", "ties", "all_equal", "zeros", "wide_range", "tiny_and_huge", "subnormal"]
)
def test_fused_keep_mask_exact(monkeypatch, calls, kind):
    g = torch.Generator().manual_seed(7)
    p, b, m = 6, 40, 30
    if kind == "gaussian":
        base = torch.randn(p, b, m, generator=g)
    elif kind == "ties":
        base = torch.randint(-3, 4, (p, b, m), generator=g).float()
    elif kind == "all_equal":
        base = torch.full((p, b, m), -1.5)
    elif kind == "zeros":
        base = torch.randn(p, b, m, generator=g) * (torch.rand(p, b, m, generator=g) < 0.3)
    elif kind == "wide_range":
        base = torch.randn(p, b, m, generator=g) * torch.exp(8 * torch.randn(p, b, m, generator=g))
    elif kind == "tiny_and_huge":
        base = torch.where(torch.rand(p, b, m, generator=g) < 0.5, 1e-30, 1e30) * torch.randn(
            p, b, m, generator=g
        )
    else:
        base = torch.randn(p, b, m, generator=g) * 1e-39
    ks = (0, 1, 13, 28, 29, 30)
    keep = _fused_keep(monkeypatch, base, ks)
    assert calls["forward"] == 1 and calls["backward"] == 1
    for i, k in enumerate(ks):
        assert bool((keep[i].sum(-1) == m - k).all()), f"k={k}: kept counts {keep[i].sum(-1).tolist()}"
        assert torch.equal(keep[i], ranked_keep(base[i], k)), f"k={k}"


def test_fused_rows_follow_each_other(monkeypatch):
    """The search starts from the previous row's threshold: rows whose scale changes
    abruptly (and alternating) must still get exact masks."""
    g = torch.Generator().manual_seed(3)
    b, m = 64, 200
    scale = torch.tensor([1e-20, 1.0, 1e20, 3.0])[torch.arange(b) % 4]
    base = (torch.randn(2, b, m, generator=g) * scale[:, None]).contiguous()
    ks = (100, 196)
    keep = _fused_keep(monkeypatch, base, ks)
    for i, k in enumerate(ks):
        assert torch.equal(keep[i], ranked_keep(base[i], k))


@pytest.mark.parametrize("shared_base", [True, False])
def test_fused_matches_torch_path_on_default_grid(monkeypatch, calls, shared_base):
    """METHOD §4 sizes: M = 200 concepts, K = 10 classes, the default sparsity grid."""
    from iis_study.core.heads import n_dropped

    grid = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
    shape = (len(grid), 1, 3, 96, 200, 10)
    ks = tuple(n_dropped(s, 200) for s in grid)
    needs = {"ln_weight", "ln_bias", "weight", "bias"} | (set() if shared_base else {"base"})
    inputs = _inputs(shape, True, shared_base, needs, False, 5)
    up = torch.randn(len(grid), 1, 3, 96, 10, generator=torch.Generator().manual_seed(6))
    ref_out, ref_grads = _run(monkeypatch, False, inputs, ks, up)
    out, grads = _run(monkeypatch, True, inputs, ks, up)
    assert calls["forward"] == 1 and calls["backward"] == 1
    _close(out, ref_out, "logits")
    for n in ref_grads:
        _close(grads[n], ref_grads[n], f"grad of {n}")


def test_fused_survives_nan_rows(monkeypatch):
    """Rows with NaN activations must not break the kernel (the other rows are unaffected)."""
    shape = (4, 1, 1, 16, 30, 5)
    inputs = _inputs(shape, True, True, {"base", "weight"}, False, 9)
    with torch.no_grad():
        inputs["base"][0, 0, 0, 3, 7] = float("nan")
        inputs["base"][0, 0, 0, 5, :] = float("nan")
    ks = (0, 30, 28, 10)
    up = torch.ones(4, 1, 1, 16, 5)
    ref_out, ref_grads = _run(monkeypatch, False, inputs, ks, up)
    out, grads = _run(monkeypatch, True, inputs, ks, up)
    clean = [b for b in range(16) if b not in (3, 5)]
    _close(out[..., clean, :], ref_out[..., clean, :], "logits of rows without NaN")
    # per-row gradients of the clean rows are untouched by the NaN rows (the weight gradient sums
    # over rows, so NaN reaches it in both paths)
    assert torch.isfinite(grads["base"][..., clean, :]).all()
    _close(grads["base"][..., clean, :], ref_grads["base"][..., clean, :], "base gradient of rows without NaN")
    assert grads["weight"].shape == inputs["weight"].shape


def test_fused_is_deterministic_across_thread_counts(monkeypatch):
    shape = (4, 1, 3, 64, 50, 10)
    inputs = _inputs(shape, True, True, {"ln_weight", "ln_bias", "weight", "bias"}, False, 11)
    ks = (0, 10, 25, 50)
    up = torch.randn(4, 1, 3, 64, 10, generator=torch.Generator().manual_seed(12))
    n = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_run(monkeypatch, True, inputs, ks, up))
    finally:
        torch.set_num_threads(n)
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("n_heads", [1, 5, 24])
def test_head_order_is_a_permutation(threads, n_heads):
    order = fused_heads._order(n_heads, threads)
    assert sorted(order.tolist()) == list(range(n_heads))
    if threads == 2 and n_heads == 24:  # neighbouring heads (same sparsity) go to different threads
        assert order[:12].tolist() == list(range(0, 24, 2))


def test_fused_inference_saves_no_state(monkeypatch, calls):
    """Under ``torch.no_grad`` (evaluation) the forward pass keeps no mask state; same logits."""
    shape = (4, 1, 3, 64, 50, 10)
    inputs = _inputs(shape, True, True, {"ln_weight", "ln_bias", "weight", "bias"}, False, 11)
    ks = (0, 10, 25, 46)
    monkeypatch.setenv("IIS_FUSED", "1")
    saved = []
    orig = fused_heads.forward
    monkeypatch.setattr(fused_heads, "forward", lambda p, save_state: (saved.append(save_state), orig(p, save_state))[1])
    args = [inputs[n] for n in NAMES]
    with_grad = InterpHeads.apply(*args, ks, True)
    with torch.no_grad():
        without = InterpHeads.apply(*args, ks, False)
    assert saved == [True, False]
    assert torch.equal(with_grad.detach(), without)


def _forked_child_check(inputs: dict, ks: tuple[int, ...], expected: torch.Tensor) -> None:
    # as torch's DataLoader workers do: torch's own OpenMP pool is unusable after a fork
    torch.set_num_threads(1)
    out = InterpHeads.apply(*(inputs[n] for n in NAMES), ks)
    os._exit(0 if torch.allclose(out, expected, rtol=1e-5, atol=1e-5) else 3)


def test_fused_in_forked_child(monkeypatch):
    """A child forked after the kernel ran (numba's threads started) still gets correct
    logits (numba terminates such children if they launch its GNU OpenMP pool)."""
    monkeypatch.setenv("IIS_FUSED", "1")
    inputs = _inputs((3, 1, 2, 32, 20, 4), True, True, set(), False, 4)
    ks = (0, 17, 5)
    expected = InterpHeads.apply(*(inputs[n] for n in NAMES), ks)
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_forked_child_check, args=(inputs, ks, expected))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0


def test_fused_disabled_by_env(monkeypatch, calls):
    inputs = _inputs((2, 1, 1, 8, 6, 3), True, True, {"weight"}, False, 0)
    up = torch.ones(2, 1, 1, 8, 3)
    _run(monkeypatch, False, inputs, (0, 3), up)
    assert calls["forward"] == 0 and calls["backward"] == 0
    _run(monkeypatch, True, inputs, (0, 3), up)
    assert calls["forward"] == 1 and calls["backward"] == 1


def test_fused_not_used_for_float64(monkeypatch, calls):
    inputs = _inputs((2, 1, 1, 8, 6, 3), True, True, {"weight"}, False, 0)
    inputs = {n: None if t is None else t.double() for n, t in inputs.items()}
    monkeypatch.setenv("IIS_FUSED", "1")
    out = InterpHeads.apply(*(inputs[n] for n in NAMES), (0, 3))
    assert out.dtype == torch.float64 and calls["forward"] == 0


def test_fused_rejects_bad_k(monkeypatch):
    inputs = _inputs((2, 1, 1, 8, 6, 3), True, True, set(), False, 0)
    monkeypatch.setenv("IIS_FUSED", "1")
    with pytest.raises(ValueError, match="k"):
        InterpHeads.apply(*(inputs[n] for n in NAMES), (0, 7))


@pytest.mark.parametrize("shared_base", [True, False])
def test_fused_every_needs_input_grad_combination(monkeypatch, calls, shared_base):
    shape = (3, 1, 2, 24, 20, 5)
    ks = (0, 20 - fused_heads._n_sparse(20, 5), 7)  # dense, sparse and k = 0 heads
    up = torch.randn(3, 1, 2, 24, 5, generator=torch.Generator().manual_seed(2))
    for flags in itertools.product([False, True], repeat=5):
        needs = {n for n, f in zip(NAMES, flags, strict=True) if f}
        inputs = _inputs(shape, True, shared_base, needs, False, 8)
        ref_out, ref_grads = _run(monkeypatch, False, inputs, ks, up)
        out, grads = _run(monkeypatch, True, inputs, ks, up)
        _close(out, ref_out, f"logits, needs={sorted(needs)}")
        assert grads.keys() == ref_grads.keys() == needs
        for n in grads:
            _close(grads[n], ref_grads[n], f"grad of {n}, needs={sorted(needs)}")
    assert calls["forward"] == 32

"""The interpretation heads' hand-written backward against plain autograd, in float64.

``heads.InterpHeads`` computes ``logits = (ln_bias + base * ln_weight) * keep @ weightᵀ + bias``
with a hand-written backward (torch path) or a fused numba kernel (CPU float32). The reference
here is written differently: a per-row Python keep-mask (rank by ``(-|a|, index)``), ``einsum``
and ``torch.autograd`` over float64 leaves, so neither the mask nor a gradient formula is shared.
Inputs have exact ties in ``|a|`` and whole zero rows (every entry tied), where a wrong
tie-break or a gradient leaking through a dropped entry shows.
"""

from __future__ import annotations

import pytest
import torch

from iis_study.core.heads.masks import InterpHeads
from tests.core.reference import ranked_keep

NAMES = ("base", "ln_weight", "ln_bias", "weight", "bias")


def _inputs(p: int, b: int, m: int, n_cls: int, affine: bool, seed: int) -> dict[str, torch.Tensor | None]:
    """float64 inputs of shape (P, 1, 1, B, M): dyadic values with many ties, and zero rows."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 0.25, 0.5, 1.0, 2.0], dtype=torch.float64)
    idx = torch.randint(0, len(levels), (1, 1, 1, b, m), generator=g)
    sign = torch.randint(0, 2, (1, 1, 1, b, m), generator=g).double() * 2 - 1
    base = levels[idx] * sign
    base[..., ::5, :] = 0.0  # every fifth row is all zeros: M tied entries
    inputs: dict[str, torch.Tensor | None] = {
        "base": base,
        "ln_weight": torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[torch.randint(0, 3, (p, 1, 1, 1, m), generator=g)]
        if affine
        else None,
        "ln_bias": torch.zeros(p, 1, 1, 1, m, dtype=torch.float64) if affine else None,
        "weight": torch.randn(p, 1, 1, n_cls, m, generator=g, dtype=torch.float64),
        "bias": torch.randn(p, 1, 1, n_cls, generator=g, dtype=torch.float64),
    }
    return inputs


def _reference(inputs: dict, ks: tuple[int, ...], up: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and autograd gradients of ``(logits * up).sum()``, head by head, in float64."""
    leaves = {n: (None if t is None else t.detach().clone().requires_grad_(True)) for n, t in inputs.items()}
    outs = []
    for h, k in enumerate(ks):
        base = leaves["base"][0, 0, 0]
        act = base if leaves["ln_weight"] is None else leaves["ln_bias"][h, 0, 0] + base * leaves["ln_weight"][h, 0, 0]
        keep = ranked_keep(act.detach(), k).to(torch.float64)  # a constant mask
        outs.append(torch.einsum("bm,cm->bc", act * keep, leaves["weight"][h, 0, 0]) + leaves["bias"][h, 0, 0])
    logits = torch.stack(outs)[:, None, None]
    wrt = [n for n in NAMES if leaves[n] is not None]
    grads = torch.autograd.grad((logits * up).sum(), [leaves[n] for n in wrt])
    return logits.detach(), dict(zip(wrt, grads, strict=True))


def _under_test(inputs: dict, ks: tuple[int, ...], up: torch.Tensor, dtype: torch.dtype):
    leaves = {n: (None if t is None else t.detach().to(dtype).clone().requires_grad_(True)) for n, t in inputs.items()}
    out = InterpHeads.apply(*(leaves[n] for n in NAMES), ks)
    wrt = [n for n in NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in wrt], up.to(dtype))
    return out.detach(), dict(zip(wrt, grads, strict=True))


KS = (0, 3, 7, 11, 12)  # M = 12: nothing dropped, ..., everything dropped


@pytest.mark.parametrize("affine", [True, False])
def test_torch_backward_equals_autograd_in_float64(monkeypatch, affine):
    monkeypatch.setenv("IIS_FUSED", "0")
    inputs = _inputs(len(KS), 23, 12, 4, affine, seed=1)
    up = torch.randn(len(KS), 1, 1, 23, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref_out, ref_grads = _reference(inputs, KS, up)
    out, grads = _under_test(inputs, KS, up, torch.float64)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("affine", [True, False])
def test_fused_backward_equals_float64_autograd(monkeypatch, affine):
    """The fused float32 kernel against the float64 autograd reference (float32 tolerance):
    the inputs are dyadic, so the mask is exact in float32 too."""
    from iis_study.core.heads import fused as fused_heads

    monkeypatch.setenv("IIS_FUSED", "1")
    calls = {"n": 0}
    orig = fused_heads.backward

    def counted(*args, **kwargs):
        calls["n"] += 1
        return orig(*args, **kwargs)

    monkeypatch.setattr(fused_heads, "backward", counted)
    inputs = _inputs(len(KS), 23, 12, 4, affine, seed=3)
    up = torch.randn(len(KS), 1, 1, 23, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref_out, ref_grads = _reference(inputs, KS, up)
    out, grads = _under_test(inputs, KS, up, torch.float32)
    assert calls["n"] == 1, "the fused kernel did not run"
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)

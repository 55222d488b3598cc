"""Concept activations of the interpretation heads (METHOD §3 step 1, §5).

LayerNorm over the concept axis; the end-to-end assignment (hard Gumbel-softmax of
``LayerNorm(q)``, METHOD §5.3) and the concept matrix it selects; the activations shared by
all heads of a concept space (:func:`precompute_base`); the end-to-end concept scores through
the elements (:class:`AssignedScores`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .datatypes import ConceptSpace


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis without affine (eps as ``nn.LayerNorm``)."""
    return F.layer_norm(x, (x.shape[-1],))


def gumbel_noise(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    """Standard Gumbel noise ``-log(-log U)``, ``U`` uniform from a seeded generator.

    The same distribution as ``F.gumbel_softmax``'s ``-log(Exp(1))`` (``-log U`` is Exp(1)), but
    drawing uniforms is ~7x faster than ``exponential_`` on CPU (0.14 against 0.92 ms for
    300 x 200 numbers): the noise of the end-to-end heads had been 18 % of their sweep.
    """
    return uniform_to_gumbel_(torch.empty(shape, device=device).uniform_(generator=gen))


def uniform_to_gumbel_(u: torch.Tensor) -> torch.Tensor:
    """``-log(-log u)`` in place; ``u = 0`` (probability 2^-24 per draw) is moved up to the
    smallest normal float first, so the noise stays finite."""
    return u.clamp_(min=torch.finfo(u.dtype).tiny).log_().neg_().log_().neg_()


def hard_assignment(
    q: torch.Tensor,
    tau: float,
    noise: torch.Tensor | None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hard (straight-through) Gumbel-softmax of ``LayerNorm_M(q) / tau`` along M (METHOD §5.3).

    METHOD applies the Gumbel-softmax to ``q / 0.1``: the logits are divided by ``tau`` and
    the standard (temperature 1) Gumbel noise is added to them, ``softmax(LN(q)/tau + g)``.
    Dividing the noise as well, ``softmax((LN(q) + g)/tau)``, would make the noise (std 1.28)
    larger than the unit-variance ``LN(q)`` it perturbs: every step would re-draw the
    assignment almost at random, and on digits the end-to-end heads stayed near chance (test
    accuracy 0.20 at s = 0 against 0.60 with the logits divided; 60 Adam steps, Lite0).

    The LayerNorm on ``q`` has a learnable affine (``ln_weight``, ``ln_bias``, shape (..., M),
    one per head), as in the authors' code. With ``noise=None`` (evaluation) the noise-free
    one-hot argmax is returned.
    """
    return hard_assignment_indexed(q, tau, noise, ln_weight, ln_bias)[0]


def hard_assignment_indexed(
    q: torch.Tensor,
    tau: float,
    noise: torch.Tensor | None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hard_assignment` and the index of each element's concept (``argmax`` over M)."""
    logits = layer_norm(q)
    if ln_weight is not None:
        logits = logits * ln_weight.unsqueeze(-2)
    if ln_bias is not None:
        logits = logits + ln_bias.unsqueeze(-2)
    logits = logits / tau
    if noise is None:
        idx = logits.argmax(-1)
        return _one_hot(idx, q), idx
    soft = torch.softmax(logits + noise, dim=-1)
    idx = soft.argmax(-1)
    return _one_hot(idx, q) - soft.detach() + soft, idx


def _one_hot(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Float one-hot of ``idx`` over the last axis of ``like`` (no int64 intermediate)."""
    return torch.zeros_like(like).scatter_(-1, idx.unsqueeze(-1), 1.0)


def concepts_from_assignment(assignment: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """``C = L2-normalise(assignmentᵀ · elements)``: (..., E, M) x (E, D) -> (..., M, D)."""
    return F.normalize(assignment.transpose(-1, -2) @ elements, dim=-1)


def precompute_base(x: torch.Tensor, concepts: ConceptSpace) -> torch.Tensor | None:
    """Per-sample activations shared by all heads: LN(z·Cᵀ) or standardised projection."""
    if concepts.kind == "end_to_end":
        return None
    parts = []
    for chunk in torch.split(x, 4096):
        if concepts.kind == "vectors":
            assert concepts.vectors is not None
            parts.append(layer_norm(chunk @ concepts.vectors.T))
        else:
            assert concepts.projection is not None and concepts.mean is not None
            assert concepts.std is not None
            parts.append((chunk @ concepts.projection - concepts.mean) / concepts.std)
    return torch.cat(parts)


def concepts_to(concepts: ConceptSpace, device: str) -> ConceptSpace:
    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=torch.float32)

    return ConceptSpace(
        kind=concepts.kind,
        vectors=mv(concepts.vectors),
        elements=mv(concepts.elements),
        n_concepts=concepts.n_concepts,
        projection=mv(concepts.projection),
        mean=mv(concepts.mean),
        std=mv(concepts.std),
    )


class AssignedScores(torch.autograd.Function):
    """End-to-end concept scores through the elements, ``(z·Eᵀ)·A / ‖AᵀE‖`` per head, for a hard
    assignment ``A`` (P, S, L, E, M) that is one-hot in value (straight-through in gradient).

    Forward: ``A`` is one-hot, so ``(z·Eᵀ)·A`` is a sum of each concept's element columns and
    ``‖AᵀE‖² = Σ_{e,e' in m} Gram[e, e']`` a sum of Gram entries (B·E and E² additions per
    head instead of B·E·M and E²·M multiply-adds). Backward: the straight-through gradient of
    ``A`` is dense and needs the full products, ``dA = (z·Eᵀ)ᵀ·(dS / ‖·‖) + 2·(Gram·A)·d‖·‖²``,
    as autograd would compute them; ``Gram·A`` is again a sum over each concept's columns.
    Zero norms are clamped as in ``F.normalize`` (eps 1e-12), with no gradient through the clamp.

    Inputs: ``zp = z·Eᵀ`` (S, B, E) (no gradient), ``gram`` (E, E) symmetric, ``assign``,
    ``idx`` (P, S, L, E) the concept of each element. Returns (P, S, L, B, M).
    """

    @staticmethod
    def forward(ctx, zp, gram, assign, idx):  # type: ignore[override]
        p_, s_, l_, n_el, m = assign.shape
        n_heads, b = p_ * s_ * l_, zp.shape[1]
        idx_h = idx.reshape(n_heads, n_el)
        zp_t = zp.transpose(1, 2).contiguous()  # (S, E, B): rows of one element
        raw_t = zp.new_zeros((n_heads, m, b))  # (H, M, B)
        ga_t = zp.new_zeros((n_heads, m, n_el))  # (Gram·A)ᵀ per head
        for h in range(n_heads):
            seed = (h // l_) % s_
            raw_t[h].index_add_(0, idx_h[h], zp_t[seed])
            ga_t[h].index_add_(0, idx_h[h], gram)  # gram is symmetric: its rows are its columns
        own = ga_t.gather(1, idx_h.unsqueeze(1)).squeeze(1)  # (Gram·A)[e, idx[e]], (H, E)
        norm2 = zp.new_zeros((n_heads, m)).scatter_add_(1, idx_h, own)  # ‖AᵀE‖², (H, M)
        norm = norm2.clamp_min(1e-24).sqrt().clamp_min(1e-12)
        scores = raw_t.div_(norm.unsqueeze(-1)).transpose(1, 2).contiguous()  # (H, B, M)
        ctx.save_for_backward(zp, scores, norm2, norm, ga_t)
        ctx.shape = (p_, s_, l_, n_el, m)
        return scores.view(p_, s_, l_, b, m)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        zp, scores, norm2, norm, ga_t = ctx.saved_tensors
        p_, s_, l_, n_el, m = ctx.shape
        n_heads, b = p_ * s_ * l_, zp.shape[1]
        g = grad.reshape(n_heads, b, m)
        g_raw = g / norm.unsqueeze(1)  # scores = raw / norm
        # d/dnorm of raw/norm is -scores/norm; through the clamps only where norm2 > 1e-24
        g_norm = -(g * scores).sum(1) / norm
        g_norm2 = torch.where(norm2 > 1e-24, g_norm / (2 * norm), torch.zeros_like(norm))
        g_assign = torch.einsum("sbe,pslbm->pslem", zp, g_raw.view(p_, s_, l_, b, m))
        g_assign += (2 * g_norm2).view(p_, s_, l_, 1, m) * ga_t.transpose(1, 2).reshape(p_, s_, l_, n_el, m)
        return None, None, g_assign, None

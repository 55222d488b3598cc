"""All heads of a sweep as stacked tensors, and Adam over them (METHOD §2, §3, §4).

:class:`BatchedHeads` holds the probe heads ``(S, L, ...)`` and the interpretation heads
``(P, S, L, ...)`` of one concept space; :class:`SharedProbe` joins the heads of several
concept spaces with one shared probe (and stacks spaces of equal M into one call of the
fused heads); :class:`StackedAdam` is ``torch.optim.Adam`` over the stacked tensors with
one learning rate per head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from ..representations.store import ShardedArray
from .activations import (
    AssignedScores,
    concepts_from_assignment,
    hard_assignment_indexed,
    layer_norm,
    precompute_base,
    uniform_to_gumbel_,
)
from .masks import apply_heads, n_dropped
from .seeds import eval_chunks, generator, gumbel_seed, init_head
from .datatypes import ConceptSpace, SweepParams
from ..device import resolve_device

logger = logging.getLogger(__name__)

_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# --------------------------------------------------------------------------- stacked Adam


class StackedAdam:
    """Adam over stacked head parameters with one learning rate per head.

    Reproduces ``torch.optim.Adam`` (single-tensor path, default betas/eps, no weight
    decay) operation by operation; the learning rates decay by ``gamma`` per
    :meth:`decay` call exactly like ``ExponentialLR`` (repeated float multiplication).
    ``lr_axis[name]`` is the axis of the learning-rate dimension of each parameter.
    """

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        lr_axis: dict[str, int],
        lrs: Sequence[float],
    ) -> None:
        self.params = params
        self.lr_axis = lr_axis
        self.lrs = [float(lr) for lr in lrs]
        self.step_count = 0
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}

    def _lr_view(self, name: str, values: Sequence[float]) -> torch.Tensor:
        p = self.params[name]
        shape = [1] * p.ndim
        shape[self.lr_axis[name]] = len(values)
        return torch.tensor(values, dtype=p.dtype, device=p.device).view(shape)

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = _ADAM_BETAS
        self.step_count += 1
        t = float(self.step_count)
        bc1 = 1 - beta1**t
        bc2_sqrt = (1 - beta2**t) ** 0.5
        neg_steps = [-(lr / bc1) for lr in self.lrs]
        names = [name for name, p in self.params.items() if p.grad is not None]
        if not names:
            return
        # the element-wise operations of torch.optim.Adam's single-tensor path, in the same
        # order, applied to all parameters per call (foreach): identical results, fewer calls
        params = [self.params[n] for n in names]
        grads = [p.grad for p in params]
        ms = [self.exp_avg[n] for n in names]
        vs = [self.exp_avg_sq[n] for n in names]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, _ADAM_EPS)
        update = torch._foreach_mul(ms, [self._lr_view(n, neg_steps) for n in names])
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def decay(self, gamma: float) -> None:
        self.lrs = [lr * gamma for lr in self.lrs]


# --------------------------------------------------------------------------- batched heads


class BatchedHeads:
    """All heads of a sweep as stacked tensors: probe (S, L, ...), interp (P, S, L, ...)."""

    def __init__(
        self,
        concepts: ConceptSpace,
        config: SweepParams,
        dim: int,
        num_classes: int,
        probe_shift: torch.Tensor | None = None,
    ) -> None:
        self.concepts = concepts
        self.probe_shift = probe_shift
        self.config = config
        self.device = resolve_device(config.device, "sweep.device")
        self.m = concepts.m
        self.k = [n_dropped(s, self.m) for s in config.sparsities]
        self.shape_probe = (len(config.seeds), len(config.learning_rates))
        self.shape_interp = (len(config.sparsities),) + self.shape_probe
        self.params = self._init_params(dim, num_classes)
        self.gumbel_gens = self._gumbel_generators()
        if concepts.kind == "end_to_end":
            self.empty_at_init = self.empty_concepts()
            logger.info(
                "end-to-end: %d elements for M = %d; empty concepts at initialisation: %d of %d heads have any "
                "(at most %d empty)",
                concepts.elements.shape[0] if concepts.elements is not None else 0,
                self.m,
                int((self.empty_at_init > 0).sum()),
                self.empty_at_init.numel(),
                int(self.empty_at_init.max()),
            )

    @torch.no_grad()
    def empty_concepts(self) -> torch.Tensor:
        """Per end-to-end head (P, S, L), the number of concepts no element is assigned to (noise-free)."""
        p = self.params
        idx = hard_assignment_indexed(
            p["interp.q"], self.config.gumbel_tau, None, p["interp.q_ln_weight"], p["interp.q_ln_bias"]
        )[1]
        counts = torch.zeros(idx.shape[:-1] + (self.m,), dtype=torch.long, device=idx.device)
        counts.scatter_add_(-1, idx, torch.ones_like(idx))
        return (counts == 0).sum(-1)

    def _init_params(self, dim: int, num_classes: int) -> dict[str, torch.Tensor]:
        cfg = self.config
        e = None if self.concepts.elements is None else int(self.concepts.elements.shape[0])
        e = e if self.concepts.kind == "end_to_end" else None
        probe = [
            [
                init_head("probe", s, None, lr, dim, num_classes, None, self.device)
                for lr in cfg.learning_rates
            ]
            for s in cfg.seeds
        ]
        interp = [
            [
                [
                    init_head("interp", s, sp, lr, self.m, num_classes, e, self.device)
                    for lr in cfg.learning_rates
                ]
                for s in cfg.seeds
            ]
            for sp in cfg.sparsities
        ]
        params = {
            "probe.weight": _stack2(probe, "weight"),
            "probe.bias": _stack2(probe, "bias"),
            "interp.weight": _stack3(interp, "weight"),
            "interp.bias": _stack3(interp, "bias"),
        }
        if self.concepts.has_affine:
            params["interp.ln_weight"] = _stack3(interp, "ln_weight")
            params["interp.ln_bias"] = _stack3(interp, "ln_bias")
        if self.concepts.kind == "end_to_end":
            for name in ("q", "q_ln_weight", "q_ln_bias"):
                params[f"interp.{name}"] = _stack3(interp, name)
        for p in params.values():
            p.requires_grad_(True)
        return params

    def _end_to_end_scores(
        self, x: torch.Tensor, assign: torch.Tensor, idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z · Cᵀ`` with ``C = L2-normalise(Aᵀ·E)`` for every head: (S, B, D), (P, S, L, E, M) -> (P, S, L, B, M).

        ``assign`` is a hard (straight-through) assignment, one-hot in value; ``idx`` (P, S, L, E)
        its concept per element (its argmax when not given).

        Two equal ways to compute it; the cheaper one for these sizes is used:

        * direct: ``C = normalise(AᵀE)`` (E·M·D per head), then ``z·Cᵀ`` (B·M·D per head);
        * through the elements: ``(z·Eᵀ)·A / ‖AᵀE‖`` with ``z·Eᵀ`` shared by all heads of a seed
          (B·E·M per head) and the norms from the Gram matrix ``E·Eᵀ`` (E²·M per head), which is
          much cheaper when E is not much larger than D. Its forward pass sums over each concept's
          elements instead of multiplying by the one-hot ``A`` (:class:`AssignedScores`).
        """
        elements = self.concepts.elements
        assert elements is not None
        n_el, dim = elements.shape
        b, m = x.shape[1], assign.shape[-1]
        direct = n_el * m * dim + b * m * dim
        via_elements = b * n_el * m + n_el * n_el * m
        if direct <= via_elements:
            c = concepts_from_assignment(assign, elements)
            return torch.einsum("sbd,pslmd->pslbm", x, c)
        if getattr(self, "_gram", None) is None:
            self._gram = elements @ elements.T
        zp = torch.einsum("sbd,ed->sbe", x, elements)  # (S, B, E), shared across heads
        return AssignedScores.apply(zp, self._gram, assign, assign.argmax(-1) if idx is None else idx)

    def _gumbel_generators(self) -> list[torch.Generator]:
        if self.concepts.kind != "end_to_end":
            return []
        cfg = self.config
        return [
            generator(gumbel_seed(s, sp, lr), self.device)
            for sp in cfg.sparsities
            for s in cfg.seeds
            for lr in cfg.learning_rates
        ]

    def base_of(self, x: torch.Tensor) -> torch.Tensor | None:
        """Shared activations of a batch ``x`` (..., D) -> (..., M); None for end-to-end concepts."""
        if self.concepts.kind == "end_to_end":
            return None
        flat = precompute_base(x.reshape(-1, x.shape[-1]), self.concepts)
        assert flat is not None
        return flat.reshape(tuple(x.shape[:-1]) + (flat.shape[-1],))

    def lr_axis(self) -> dict[str, int]:
        return {k: (1 if k.startswith("probe.") else 2) for k in self.params}

    def _gumbel(self) -> torch.Tensor:
        q = self.params["interp.q"]
        shape = tuple(q.shape[3:])
        # one buffer, filled head by head from each head's own generator (the same numbers as
        # _gumbel_noise per head), then one in-place transform over all of it
        noise = torch.empty((len(self.gumbel_gens), *shape), device=self.device)
        for i, g in enumerate(self.gumbel_gens):
            noise[i].uniform_(generator=g)
        return uniform_to_gumbel_(noise).view(q.shape)

    def forward(
        self, x: torch.Tensor, base: torch.Tensor | None, train: bool, probe: bool = True, interp: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits of all heads for per-seed inputs ``x`` (S, B, D) / ``base`` (S, B, M).

        Returns probe logits (S, L, B, K) (None when ``probe`` is false) and interp logits
        (P, S, L, B, K) (None when ``interp`` is false).
        """
        p = self.params
        if probe:
            xp = x if self.probe_shift is None else x - self.probe_shift
            probe_logits = torch.einsum("sbd,slkd->slbk", xp, p["probe.weight"]) + p["probe.bias"][:, :, None, :]
        else:
            probe_logits = None
        if not interp:
            return probe_logits, None
        if self.concepts.kind == "end_to_end":
            assert self.concepts.elements is not None
            noise = self._gumbel() if train else None
            assign, idx = hard_assignment_indexed(
                p["interp.q"], self.config.gumbel_tau, noise, p["interp.q_ln_weight"], p["interp.q_ln_bias"]
            )
            base5 = layer_norm(self._end_to_end_scores(x, assign, idx))
        else:
            assert base is not None
            base5 = base[None, :, None]
        return probe_logits, apply_heads(base5, p, "interp.", self.concepts.has_affine, self.k)

    @torch.no_grad()
    def correct(
        self, x: torch.Tensor, y: torch.Tensor, base: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample correctness of every head on one split (no grad, chunked).

        Returns bool tensors probe (S, L, N) and interp (P, S, L, N).
        """
        s = self.shape_probe[0]

        def logits(sl: slice, rows: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if base is not None:
                bs = base[sl].unsqueeze(0).expand(s, -1, -1)
            else:
                b1 = self.base_of(rows)
                bs = None if b1 is None else b1.unsqueeze(0).expand(s, -1, -1)
            lp, li = self.forward(xs, bs, train=False)
            assert lp is not None and li is not None
            return lp, li

        return _chunked_correct(x, y, self.device, s, logits)


def _chunked_correct(
    x: torch.Tensor | ShardedArray,
    y: torch.Tensor,
    device: str,
    n_seeds: int,
    logits: Callable[[slice, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness (probe, interp) of the heads on a split, chunk by chunk
    (:func:`eval_chunks`): ``logits(rows slice, rows (B, D), rows per seed (S, B, D))``
    gives a chunk's probe and interp logits; the correctness is concatenated over the chunks."""
    probe_parts, interp_parts = [], []
    for start, rows in eval_chunks(x):
        sl = slice(start, start + rows.shape[0])
        rows = rows.to(device)
        lp, li = logits(sl, rows, rows.unsqueeze(0).expand(n_seeds, -1, -1))
        probe_parts.append(lp.argmax(-1) == y[sl])
        interp_parts.append(li.argmax(-1) == y[sl])
    return torch.cat(probe_parts, -1), torch.cat(interp_parts, -1)


def _stack2(rows: list[list[dict[str, torch.Tensor]]], key: str) -> torch.Tensor:
    return torch.stack([torch.stack([h[key] for h in row]) for row in rows])


def _stack3(blocks: list[list[list[dict[str, torch.Tensor]]]], key: str) -> torch.Tensor:
    return torch.stack([_stack2(rows, key) for rows in blocks])


class SharedProbe:
    """The heads of one or more concept spaces (:class:`BatchedHeads` each) with one linear probe.

    The probe's parameter tensors of the first part are given to every part (each part's own,
    identically initialised ones are dropped), so each part still reads as a complete sweep
    (selection, best-epoch tracking, results), while the probe's forward and backward pass run
    once per step.

    Concept spaces given as vectors or a projection with the same M (the common case:
    prototype and cluster concepts) are *stacked*: their interpretation heads' parameters are
    stored in one tensor ``(P, T, S, L, ...)`` (T the stacked spaces), each part's parameters
    are views into it, and all of them run as one call of the fused heads (the kernel
    computes every head on its own, start to end, so the numbers are those of separate
    calls; checked bit for bit on CPU, with and without the numba kernel; on CUDA the batched
    matrix products may be computed by other kernels when the batch grows, so there the numbers
    agree to float rounding). ``params`` holds every trainable tensor once: the probe under
    ``probe.*``, the stacked heads under ``stacked/*``, the others under ``part<i>/*``.
    """

    def __init__(self, parts: dict[str, BatchedHeads]) -> None:
        self.parts = parts
        first = next(iter(parts.values()))
        self.device = first.device
        for heads in parts.values():
            for key in ("probe.weight", "probe.bias"):
                heads.params[key] = first.params[key]
        self.params = {k: v for k, v in first.params.items() if k.startswith("probe.")}
        self._axes = {k: 1 for k in self.params}
        self.stacked = self._stackable()
        if len(self.stacked) > 1:
            lead = parts[self.stacked[0]]
            for key in [k for k in lead.params if k.startswith("interp.")]:
                joint = torch.stack([parts[n].params[key].detach() for n in self.stacked], dim=1).requires_grad_(True)
                self.params[f"stacked/{key}"] = joint
                self._axes[f"stacked/{key}"] = 3
                for t, name in enumerate(self.stacked):
                    parts[name].params[key] = joint[:, t]  # a view: the part reads the joint tensor
        else:
            self.stacked = []
        for i, (name, heads) in enumerate(parts.items()):
            if name not in self.stacked:  # keyed by position: no part name can collide with another key
                own = [k for k in heads.params if not k.startswith("probe.")]
                self.params.update({f"part{i}/{k}": heads.params[k] for k in own})
                self._axes.update({f"part{i}/{k}": 2 for k in own})

    def _stackable(self) -> list[str]:
        """The largest group of parts whose heads can run as one call: concept vectors or a
        projection (no end-to-end assignment) with the same M and affine (ties: the first group)."""
        groups: dict[tuple[int, bool], list[str]] = {}
        for name, heads in self.parts.items():
            if heads.concepts.kind != "end_to_end":
                groups.setdefault((heads.m, heads.concepts.has_affine), []).append(name)
        return max(groups.values(), key=len, default=[])

    def lr_axis(self) -> dict[str, int]:
        return self._axes

    def _stacked_logits(self, bases: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """Interp logits (P, T, S, L, B, K) of the stacked parts from their bases (S, B, M)."""
        base = torch.stack([bases[n] for n in self.stacked])[None, :, :, None]  # (1, T, S, 1, B, M)
        lead = self.parts[self.stacked[0]]
        return apply_heads(base, self.params, "stacked/interp.", lead.concepts.has_affine, lead.k)

    def forward(
        self, x: torch.Tensor, bases: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Probe logits (S, L, B, K) once, and the interp logits of the stacked parts
        (P, T, S, L, B, K) and of every other part (P, S, L, B, K)."""
        by_name = dict(zip(self.parts, bases, strict=True))
        first = next(iter(self.parts.values()))
        probe, _ = first.forward(x, by_name[next(iter(self.parts))], train=True, interp=False)
        assert probe is not None
        interps = [self._stacked_logits(by_name)] if self.stacked else []
        for name, heads in self.parts.items():
            if name not in self.stacked:
                interps.append(heads.forward(x, by_name[name], train=True, probe=False)[1])
        return probe, interps

    @torch.no_grad()
    def correct(
        self, x: torch.Tensor, y: torch.Tensor, bases: dict[str, torch.Tensor | None]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per part, per-sample correctness of its probe (S, L, N) and interp heads (P, S, L, N);
        the stacked parts' heads in one call per chunk."""
        out = {name: heads.correct(x, y, bases[name]) for name, heads in self.parts.items() if name not in self.stacked}
        if not self.stacked:
            return out
        if any(bases[n] is None for n in self.stacked):  # sharded splits: part by part
            out.update({n: self.parts[n].correct(x, y, bases[n]) for n in self.stacked})
            return out
        first = self.parts[self.stacked[0]]
        s = first.shape_probe[0]

        def logits(sl: slice, rows: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            lp, _ = first.forward(xs, None, train=False, interp=False)
            assert lp is not None
            chunk = {n: bases[n][sl].unsqueeze(0).expand(s, -1, -1) for n in self.stacked}
            return lp, self._stacked_logits(chunk)

        probe, interp = _chunked_correct(x, y, self.device, s, logits)  # interp: (P, T, S, L, N)
        out.update({n: (probe, interp[:, t]) for t, n in enumerate(self.stacked)})
        return out

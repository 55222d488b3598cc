"""The single-head reference (:func:`train_single_head`): one head trained alone with a plain
PyTorch loop (``nn.Module``, ``torch.optim.Adam``, ``ExponentialLR``), with the same
initialisation, data order and Gumbel noise as the batched sweep uses for that head; the
batched sweep reproduces it up to floating-point rounding."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..representations.store import ShardedArray
from .activations import concepts_from_assignment, concepts_to, gumbel_noise, hard_assignment
from .masks import flush_denormals, n_dropped, sparsify
from .seeds import (
    data_seed,
    eval_chunks,
    generator,
    gumbel_seed,
    init_head,
    shard_batches,
    to_device,
    train_mean,
)
from .datatypes import ConceptSpace, HeadKind, SingleHeadResult, Split, SweepParams
from ..device import resolve_device


class _ProbeModule(nn.Module):
    """Plain linear probe ``W z + b`` (METHOD §2), reading ``z - shift`` when centred."""

    def __init__(self, dim: int, num_classes: int, shift: torch.Tensor | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.register_buffer("shift", shift)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z if self.shift is None else z - self.shift)


class _InterpModule(nn.Module):
    """One interpretation head (METHOD §3), written plainly for reference."""

    def __init__(
        self,
        concepts: ConceptSpace,
        k: int,
        num_classes: int,
        tau: float,
        gen: torch.Generator | None,
        device: str,
    ) -> None:
        super().__init__()
        self.kind = concepts.kind
        self.device_name = device
        self.k = k
        self.tau = tau
        self.gen = gen
        m = concepts.m
        for name in ("vectors", "elements", "projection", "mean", "std"):
            t = getattr(concepts, name)
            self.register_buffer(name, None if t is None else t.clone())
        self.ln = nn.LayerNorm(m) if concepts.has_affine else None
        if self.kind == "end_to_end":
            assert concepts.elements is not None
            self.q = nn.Parameter(torch.empty(concepts.elements.shape[0], m))
            self.q_ln = nn.LayerNorm(m)
        self.linear = nn.Linear(m, num_classes)

    def concept_matrix(self) -> torch.Tensor:
        if self.kind == "vectors":
            return self.vectors
        noise = gumbel_noise(tuple(self.q.shape), self.gen, self.device_name) if self.training else None
        assign = hard_assignment(self.q, self.tau, noise, self.q_ln.weight, self.q_ln.bias)
        return concepts_from_assignment(assign, self.elements)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "projection":
            a = (z @ self.projection - self.mean) / self.std
        else:
            a = self.ln(z @ self.concept_matrix().T)
        return self.linear(sparsify(a, self.k))


def train_single_head(
    train: Split,
    val: Split,
    test: Split,
    concepts: ConceptSpace | None,
    num_classes: int,
    *,
    head: HeadKind,
    seed: int,
    lr: float,
    sparsity: float | None = None,
    config: SweepParams = SweepParams(),
) -> SingleHeadResult:
    """Reference: train ONE head alone with a plain PyTorch loop.

    ``nn.Module`` + ``torch.optim.Adam`` + ``ExponentialLR(gamma)`` stepped per epoch, with
    the same initialisation, data order (and Gumbel noise) as the batched :func:`sweep`
    uses for this (seed, head, sparsity, lr). Returns per-epoch val/test accuracy and
    the best epoch by val accuracy (earliest on ties).
    """
    dev = resolve_device(config.device, "sweep.device")
    dim = train.x.shape[1]
    train, val, test = (to_device(s, dev) for s in (train, val, test))
    budget = config.plan(train.x.shape[0])
    shift = train_mean(train.x, dev) if head == "probe" and config.probe_centering else None
    model = _build_reference(head, concepts, num_classes, seed, sparsity, lr, dim, config, shift)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=budget.gamma)
    gen = generator(data_seed(seed), "cpu")
    val_curve, test_curve, test_hist = [], [], []
    def batches():
        if isinstance(train.x, ShardedArray):
            yield from shard_batches(train.x, train.y, gen, budget.batch_size, dev)
            return
        perm = torch.randperm(train.x.shape[0], generator=gen).to(dev)
        for start in range(0, perm.shape[0], budget.batch_size):
            idx = perm[start : start + budget.batch_size]
            yield train.x[idx], train.y[idx]

    def predict(x: torch.Tensor | ShardedArray) -> torch.Tensor:
        if isinstance(x, ShardedArray):
            return torch.cat([model(rows.to(dev)).argmax(-1) for _, rows in eval_chunks(x)])
        return model(x).argmax(-1)

    for _ in range(budget.epochs):
        model.train()
        for xb, yb in batches():
            opt.zero_grad()
            logits = model(xb)
            logits.register_hook(flush_denormals)
            F.cross_entropy(logits, yb).backward()
            opt.step()
        sched.step()
        model.eval()
        with torch.no_grad():
            val_curve.append(float((predict(val.x) == val.y).cpu().numpy().mean()))
            correct = (predict(test.x) == test.y).cpu().numpy()
        test_curve.append(float(correct.mean()))
        test_hist.append(correct)
    best = int(np.argmax(val_curve))
    return SingleHeadResult(
        val_curve=np.asarray(val_curve),
        test_curve=np.asarray(test_curve),
        best_epoch=best + 1,
        val_acc=val_curve[best],
        test_acc=test_curve[best],
        test_correct=test_hist[best],
    )


def _build_reference(
    head: HeadKind,
    concepts: ConceptSpace | None,
    num_classes: int,
    seed: int,
    sparsity: float | None,
    lr: float,
    dim: int,
    config: SweepParams,
    shift: torch.Tensor | None = None,
) -> nn.Module:
    dev = resolve_device(config.device, "sweep.device")
    if head == "probe":
        model: nn.Module = _ProbeModule(dim, num_classes, shift)
        init = init_head("probe", seed, None, lr, dim, num_classes, None, dev)
        lin = model.linear
    elif head == "interp":
        if concepts is None or sparsity is None:
            raise ValueError("head='interp' needs concepts and sparsity")
        concepts.validate(dim)
        concepts = concepts_to(concepts, dev)
        m = concepts.m
        e2e = concepts.kind == "end_to_end"
        gen = generator(gumbel_seed(seed, sparsity, lr), dev) if e2e else None
        model = _InterpModule(concepts, n_dropped(sparsity, m), num_classes, config.gumbel_tau, gen, dev)
        n_el = int(concepts.elements.shape[0]) if e2e and concepts.elements is not None else None
        init = init_head("interp", seed, sparsity, lr, m, num_classes, n_el, dev)
        lin = model.linear
        with torch.no_grad():
            if model.ln is not None:
                model.ln.weight.copy_(init["ln_weight"])
                model.ln.bias.copy_(init["ln_bias"])
            if e2e:
                model.q.copy_(init["q"])
                model.q_ln.weight.copy_(init["q_ln_weight"])
                model.q_ln.bias.copy_(init["q_ln_bias"])
    else:
        raise ValueError(f"head must be 'probe' or 'interp', got {head!r}")
    with torch.no_grad():
        lin.weight.copy_(init["weight"])
        lin.bias.copy_(init["bias"])
    return model.to(dev)

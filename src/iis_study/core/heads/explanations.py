"""Explanations of the selected interpretation heads' predictions: the kept concepts with the
largest contribution to the predicted class."""

from __future__ import annotations

import math

import pandas as pd
import torch

from .activations import concepts_from_assignment, concepts_to, hard_assignment, layer_norm
from .masks import keep_mask, n_dropped
from .datatypes import ConceptSpace, SweepParams, SweepResult


def _sparsity_index(config: SweepParams, sparsity: float) -> int:
    for i, s in enumerate(config.sparsities):
        if math.isclose(float(s), float(sparsity), rel_tol=0.0, abs_tol=1e-12):
            return i
    raise ValueError(f"sparsity must be one of the swept values {config.sparsities}, got {sparsity}")


def explain(
    result: SweepResult,
    concepts: ConceptSpace,
    z: torch.Tensor,
    sparsity: float,
    seed: int | None = None,
    top: int = 5,
) -> pd.DataFrame:
    """Explain predictions of the selected interpretation head at ``sparsity``.

    For each row of ``z`` (N, D): the predicted class and the ``top`` kept (non-masked)
    concepts with the largest contribution ``a_m * W[pred, m]``. ``seed=None`` uses the
    first seed of the sweep. Columns: sample, predicted, rank (1-based), concept,
    activation, contribution. Rows with fewer kept concepts than ``top`` list them all.
    """
    cfg = result.config
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if z.ndim != 2:
        raise ValueError(f"z must be 2-D (N, D), got shape {tuple(z.shape)}")
    concepts.validate(z.shape[1])
    seeds = result.seeds  # the convex estimator has one, 0
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"seed must be one of the swept seeds {seeds}, got {seed}")
    si, pi = list(seeds).index(seed), _sparsity_index(cfg, sparsity)
    st = {k: v[si, pi] for k, v in result.state.items() if k.startswith("interp.")}
    concepts = concepts_to(concepts, "cpu")
    with torch.no_grad():
        a = _single_activations(z.float().cpu(), concepts, st)
        mask = keep_mask(a, n_dropped(cfg.sparsities[pi], a.shape[-1]))
        logits = (a * mask) @ st["interp.weight"].T + st["interp.bias"]
        pred = logits.argmax(-1)
        contrib = torch.where(mask, a * st["interp.weight"][pred], float("-inf"))
    return _explanation_frame(a, mask, contrib, pred, top)


def _single_activations(z: torch.Tensor, concepts: ConceptSpace, st: dict[str, torch.Tensor]) -> torch.Tensor:
    """Activations of one (selected) interp head in evaluation mode."""
    if concepts.kind == "projection":
        assert concepts.projection is not None
        return (z @ concepts.projection - concepts.mean) / concepts.std
    if concepts.kind == "vectors":
        assert concepts.vectors is not None
        c = concepts.vectors
    else:
        assert concepts.elements is not None
        assign = hard_assignment(st["interp.q"], 1.0, None, st.get("interp.q_ln_weight"), st.get("interp.q_ln_bias"))
        c = concepts_from_assignment(assign, concepts.elements)
    return layer_norm(z @ c.T) * st["interp.ln_weight"] + st["interp.ln_bias"]


def _explanation_frame(
    a: torch.Tensor, mask: torch.Tensor, contrib: torch.Tensor, pred: torch.Tensor, top: int
) -> pd.DataFrame:
    n_take = min(top, a.shape[-1])
    vals, idx = torch.topk(contrib, n_take, dim=-1)
    rows = []
    for i in range(a.shape[0]):
        for r in range(n_take):
            c = int(idx[i, r])
            if not bool(mask[i, c]):
                break
            rows.append(
                {
                    "sample": i,
                    "predicted": int(pred[i]),
                    "rank": r + 1,
                    "concept": c,
                    "activation": float(a[i, c]),
                    "contribution": float(vals[i, r]),
                }
            )
    cols = ["sample", "predicted", "rank", "concept", "activation", "contribution"]
    return pd.DataFrame(rows, columns=cols)

"""Is a sweep converged? (METHOD §4, "Budget and convergence").

A score is only a result if the optimiser that produced it has converged. Two checks, both
reported beside every score:

* **The probe against a converged reference** (:func:`reference_probe`): a multinomial logistic
  regression on the same features, fitted full-batch with L-BFGS (float64, strong-Wolfe line
  search) for each L2 strength of a small grid, the strength selected on val exactly as the
  sweep selects its learning rate and epoch. The sweep's probe (Adam, minibatches) is
  *converged* when its selected val accuracy (mean over seeds) is at least the reference's
  minus ``tol`` (0.5 point). Being better than the reference is not a failure: early stopping
  on val is a regulariser of its own.
* **Flat val curves** (:func:`curve_gains`): a head is still rising when the best val accuracy
  in the last fifth of its epochs beats the best before it by more than ``tol``. Every
  *selected* head (the probe and every sparsity, each seed) must be flat.

The reference is written independently of the sweep (no shared code path): a plain
``torch.optim.LBFGS`` on the full batch, which is what makes it a check.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

TOLERANCE = 0.005  # half a point of accuracy
REFERENCE_C = (0.1, 1.0, 10.0, 100.0, 1000.0)  # inverse L2 strengths, as scikit-learn's C
TAIL = 0.2  # the last fifth of training


@dataclass(frozen=True)
class ReferenceProbe:
    """The L-BFGS reference probe of one representation.

    Attributes:
        val_acc: val accuracy at the selected L2 strength (the best on val; smaller C on ties).
        test_acc: its test accuracy.
        c: the selected inverse L2 strength.
        iterations: L-BFGS iterations at the selected strength.
        converged: whether L-BFGS met its gradient tolerance there (else it stopped at max_iter).
    """

    val_acc: float
    test_acc: float
    c: float
    iterations: int
    converged: bool

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tensor(x) -> torch.Tensor:
    if hasattr(x, "iter_blocks"):  # a ShardedArray: the reference needs it in memory
        return torch.cat([torch.as_tensor(r) for _, r in x.iter_blocks()]).to(torch.float64)
    return torch.as_tensor(x).to(torch.float64)


def reference_probe(
    train: tuple,
    val: tuple,
    test: tuple,
    num_classes: int,
    cs: Sequence[float] = REFERENCE_C,
    max_iter: int = 500,
) -> ReferenceProbe:
    """Fit the converged reference probe; ``train``/``val``/``test`` are ``(x, y)`` pairs.

    The objective at strength ``C`` is scikit-learn's: ``C · Σ_i CE_i + ½‖W‖²`` (bias not
    penalised), divided by ``C·N``. Features are centred by the train mean (an exact
    reparametrisation of the bias, which is not penalised). Strengths are visited from the
    strongest to the weakest, each warm-started from the previous solution.
    """
    if len(cs) < 1 or any(not (c > 0 and math.isfinite(c)) for c in cs):
        raise ValueError(f"reference strengths must be finite and > 0, got {tuple(cs)}")
    xs = {name: _as_tensor(s[0]) for name, s in (("train", train), ("val", val), ("test", test))}
    ys = {name: torch.as_tensor(s[1]).long() for name, s in (("train", train), ("val", val), ("test", test))}
    mu = xs["train"].mean(0)
    xs = {k: v - mu for k, v in xs.items()}
    n, d = xs["train"].shape
    w = torch.zeros(num_classes, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    best: ReferenceProbe | None = None
    for c in sorted(float(c) for c in cs):
        opt = torch.optim.LBFGS(
            [w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, tolerance_change=1e-12,
            history_size=20, line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xs["train"] @ w.T + b, ys["train"]) + (w * w).sum() / (2.0 * c * n)
            loss.backward()
            return loss

        opt.step(closure)
        iters = int(opt.state[opt._params[0]].get("n_iter", 0))
        with torch.no_grad():
            acc = {k: float(((xs[k] @ w.T + b).argmax(1) == ys[k]).double().mean()) for k in ("val", "test")}
            grad = max(float(w.grad.abs().max()), float(b.grad.abs().max()))
        fit = ReferenceProbe(acc["val"], acc["test"], c, iters, grad <= 1e-7 or iters < max_iter)
        if best is None or fit.val_acc > best.val_acc:
            best = fit
    assert best is not None
    return best


def curve_gains(history: pd.DataFrame, tail: float = TAIL) -> pd.DataFrame:
    """Per head, how much its val accuracy still rose in the last ``tail`` of its epochs.

    ``history`` is a sweep's long table (head, seed, sparsity, lr, epoch, val_acc, ...). Returns
    one row per head with ``gain = max(val in the last part) - max(val before it)``; positive
    gains mean the curve was still rising when training stopped.
    """
    if history.empty:
        raise ValueError("the sweep has no per-epoch history: convergence cannot be checked")
    epochs = int(history["epoch"].max())
    cut = epochs - max(1, int(round(tail * epochs)))
    keys = ["head", "seed", "sparsity", "lr"]
    h = history.assign(sparsity=history["sparsity"].fillna(-1.0))
    early = h[h["epoch"] <= cut].groupby(keys)["val_acc"].max()
    late = h[h["epoch"] > cut].groupby(keys)["val_acc"].max()
    out = (late - early.reindex(late.index).fillna(-np.inf)).rename("gain").reset_index()
    out["sparsity"] = out["sparsity"].where(out["sparsity"] >= 0, np.nan)
    return out


def convergence_report(
    selected: pd.DataFrame,
    history: pd.DataFrame,
    reference: ReferenceProbe | dict,
    tol: float = TOLERANCE,
) -> dict:
    """The convergence record of one sweep, against its representation's reference probe.

    ``selected`` is the sweep's selected-head table (seed, head, sparsity, lr, val_acc, ...).
    Returns ``probe_val_acc`` (mean over seeds), ``reference_val_acc``, ``reference_test_acc``,
    ``probe_gap`` (reference minus probe, val), ``probe_converged`` (gap <= tol and the selected
    probes' curves flat), ``heads_converged`` (every selected interpretation head flat),
    ``max_gain_selected`` and ``n_rising`` / ``n_heads`` (over every head of the sweep).
    """
    ref = reference if isinstance(reference, dict) else reference.to_dict()
    gains = curve_gains(history)
    keys = ["head", "seed", "sparsity", "lr"]
    sel = selected[keys].assign(sparsity=selected["sparsity"].fillna(-1.0))
    g = gains.assign(sparsity=gains["sparsity"].fillna(-1.0))
    sel_gains = sel.merge(g, on=keys, how="left")
    if sel_gains["gain"].isna().any():
        raise ValueError("selected heads missing from the sweep history")
    probe_sel = selected[selected["head"] == "probe"]
    probe_val = float(probe_sel["val_acc"].mean())
    gap = float(ref["val_acc"]) - probe_val
    probe_flat = bool((sel_gains.loc[sel_gains["head"] == "probe", "gain"] <= tol).all())
    heads_flat = bool((sel_gains.loc[sel_gains["head"] == "interp", "gain"] <= tol).all())
    return {
        "probe_val_acc": probe_val,
        "reference_val_acc": float(ref["val_acc"]),
        "reference_test_acc": float(ref["test_acc"]),
        "reference_c": float(ref["c"]),
        "probe_gap": gap,
        "probe_converged": bool(gap <= tol and probe_flat),
        "heads_converged": heads_flat,
        "max_gain_selected": float(sel_gains["gain"].max()),
        "n_rising": int((gains["gain"] > tol).sum()),
        "n_heads": int(len(gains)),
    }

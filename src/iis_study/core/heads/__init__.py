"""Linear probe and interpretation heads, fitted as one batched computation (METHOD §2, §3, §4, §5.3).

Two estimators (:func:`fit_heads`): ``convex`` (:mod:`.convex`, the default), every head solved to a
certified optimum by the solvers of :mod:`iis_study.core.solvers`; and ``adam`` (:mod:`.adam`), the
authors' heads trained as one batched model, described below.

Every head of a sweep -- the linear probe (``W z + b``, METHOD §2) for every learning
rate and seed, and the interpretation head (concept activations -> per-image sparse
mask -> linear ``M -> K`` head, METHOD §3) for every sparsity ratio, learning rate and
seed -- is trained *together*: parameters are stacked tensors with leading head
dimensions, and one forward/backward pass per minibatch trains all of them.

Layout of the stacked parameters (``S`` seeds, ``L`` learning rates, ``P`` sparsities):

* probe heads: ``(S, L, ...)``, e.g. ``probe.weight`` is ``(S, L, K, D)``;
* interpretation heads: ``(P, S, L, ...)``, e.g. ``interp.weight`` is ``(P, S, L, K, M)``.

Each seed has its own data order (a ``torch.Generator`` permutation per epoch), so a
minibatch is gathered per seed as ``(S, B, D)``. Adam is implemented over the stacked
tensors with one learning rate per head, reproducing ``torch.optim.Adam`` (default
betas/eps, no weight decay) and ``ExponentialLR`` stepped once per epoch.

:func:`train_single_head` is the plain per-head reference (``nn.Module``,
``torch.optim.Adam``, ``ExponentialLR``) with the same initialisation and data order;
the batched sweep reproduces it up to floating-point rounding.

Sparsification follows METHOD §3 as *intended*: keep exactly ``M - floor(s*M)``
entries of largest ``|a|``. The authors' published code keeps the entries strictly
greater than the k-th smallest ``|a|`` (dropping one entry too many, even at s = 0);
we do not reproduce that.

Modules: :mod:`.datatypes` (configuration and result types), :mod:`.seeds` (seeds,
initialisation, data order), :mod:`.masks` (sparsification and the custom autograd
functions), :mod:`.activations` (concept activations, end-to-end assignment),
:mod:`.batched` (the stacked heads and Adam), :mod:`.adam` (the Adam sweep: training loop,
selection, result tables), :mod:`.selection` (the input checks and selection rule both estimators share),
:mod:`.estimators` (the problem, the registry of estimators, :func:`fit_heads`), :mod:`.explanations`, :mod:`.reference` (the single-head
reference), and :mod:`.fused` with :mod:`.fused_kernels` / :mod:`.fused_intrinsics` (the
numba CPU kernel, imported on first use).
"""

from __future__ import annotations

from .adam import sweep, sweep_many
from .convex import Certificate, convex_many
from .datatypes import Budget, ConceptKind, ConceptSpace, HeadKind, SingleHeadResult, Split, SweepParams, SweepResult
from .estimators import ESTIMATORS, HeadsProblem, fit_heads
from .explanations import explain
from .masks import flush_denormals, n_dropped, sparsify
from .reference import train_single_head
from .seeds import Q_INIT_STD, derive_seed

__all__ = [
    "Budget",
    "Certificate",
    "ConceptKind",
    "ConceptSpace",
    "ESTIMATORS",
    "HeadsProblem",
    "HeadKind",
    "Q_INIT_STD",
    "SingleHeadResult",
    "Split",
    "SweepParams",
    "SweepResult",
    "convex_many",
    "derive_seed",
    "explain",
    "fit_heads",
    "flush_denormals",
    "n_dropped",
    "sparsify",
    "sweep",
    "sweep_many",
    "train_single_head",
]

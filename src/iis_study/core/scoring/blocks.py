"""The scoring stage's parameter blocks, typed, with their defaults (written here and nowhere else):
``scoring`` (:class:`ScoringParams`), ``weight_sparsity`` (:class:`WeightSparsityParams`), ``correlation``
(:class:`CorrelationParams`) and ``specification`` (:class:`SpecificationParams`).

Each stage package owns its blocks (``core/<stage>/blocks.py``); a key left out of the YAML takes the
default below. Nodes receive these objects (Kedro builds typed ``params:`` inputs before any node
runs, so a bad value stops the run in seconds, naming the parameter).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..params import Params, block, check_int, check_open_fraction, check_power, check_subset

CORRELATION_SCORES = (
    "iis", "iis_chance_corrected", "iis_excess_random", "iis_excess_rotated", "iis_excess_gaussian"
)
CORRELATION_GROUPS = ("all", "pretrained", "family")


@block
class ScoringParams(Params):
    """``scoring``: the IIS and its bootstrap interval over test images."""

    WHERE = "scoring"
    n_boot: int = 1000
    seed: int = 0
    ci: float = 0.95
    power: float = 0.8  # the detectable excess / difference is detected (interval excludes 0) this often

    def validate(self) -> None:
        check_int(self.n_boot, "scoring.n_boot", 1)
        check_int(self.seed, "scoring.seed", 0)
        check_open_fraction(self.ci, "scoring.ci")
        check_open_fraction(self.power, "scoring.power")
        check_power(float(self.ci), float(self.power))  # above (1 - ci) / 2: no effect at all reaches that


PATH_SOLVERS = ("newton", "fista")


@block
class WeightSparsityParams(Params):
    """``weight_sparsity``: the elastic-net path of the final layer on the IIS's concept activations, and NEC /
    ANEC, the concept-bottleneck papers' weight sparsity (:mod:`~iis_study.core.scoring.weight_sparsity`)."""

    WHERE = "weight_sparsity"
    enabled: bool = True
    nec_levels: tuple[float, ...] = (5, 10, 15, 20, 25, 30)  # ANEC-avg over these; ANEC-<first> reported too
    alpha: float = 0.99  # the L1 share of the elastic net
    path_length: int = 40  # strengths on the path (it stops once every set is past the largest NEC level)
    min_ratio: float = 1e-4  # the path's smallest strength, relative to lambda_max
    tolerance: float = 1e-4  # on the optimality residual (mean cross-entropy units)
    max_iter: int = 5000  # FISTA iterations per point where Newton stalls (or with solver: fista)
    solver: str = "newton"  # newton: proximal Newton on the free weights | fista: first-order (the baseline)

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"weight_sparsity.enabled must be true or false, got {self.enabled!r}")
        bad = [v for v in self.nec_levels if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0]
        if not self.nec_levels or bad:
            raise ValueError(f"weight_sparsity.nec_levels must list positive NEC levels, got {self.nec_levels!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 < self.alpha <= 1:
            raise ValueError(f"weight_sparsity.alpha (the L1 share) must be in (0, 1], got {self.alpha!r}")
        check_int(self.path_length, "weight_sparsity.path_length", 2)
        check_open_fraction(self.min_ratio, "weight_sparsity.min_ratio")
        if not isinstance(self.tolerance, int | float) or self.tolerance <= 0:
            raise ValueError(f"weight_sparsity.tolerance must be > 0, got {self.tolerance!r}")
        check_int(self.max_iter, "weight_sparsity.max_iter", 1)
        if self.solver not in PATH_SOLVERS:
            raise ValueError(f"weight_sparsity.solver must be one of {PATH_SOLVERS}, got {self.solver!r}")


@block
class CorrelationParams(Params):
    """``correlation``: accuracy vs IIS across representations, per scope (METHOD §6).

    Scopes (``groups``): ``all`` representations; the ``pretrained`` ones (weights not ``random``);
    within each ``family`` (representations without a family take part in none).
    """

    WHERE = "correlation"
    scores: tuple[str, ...] = CORRELATION_SCORES
    groups: tuple[str, ...] = CORRELATION_GROUPS
    n_boot: int = 2000
    seed: int = 0
    ci: float = 0.95

    def __init__(self, **values: Any) -> None:
        if isinstance(values.get("groups"), str):
            values["groups"] = [values["groups"]]
        super().__init__(**values)

    def validate(self) -> None:
        check_subset(self.groups, CORRELATION_GROUPS, "correlation.groups")
        object.__setattr__(self, "groups", tuple(dict.fromkeys(self.groups)))
        if not self.scores or set(self.scores) - set(CORRELATION_SCORES):
            raise ValueError(
                f"correlation.scores must be a non-empty subset of {list(CORRELATION_SCORES)}, got {self.scores!r}"
            )
        check_int(self.n_boot, "correlation.n_boot", 1)
        check_int(self.seed, "correlation.seed", 0)
        check_open_fraction(self.ci, "correlation.ci")


SPECIFICATION_INPUTS = ("rms", "centred", "standardised")  # the probe's inputs (core/scoring/specification.py)
SPECIFICATION_ACCURACIES = ("probe", "reference")  # the x axis: the specification's own probe | the L-BFGS reference
SPECIFICATION_SCOPES = ("all", "pretrained", "above_chance", "pretrained_above_chance")
NARROW_GRID = (1.0, 10.0, 100.0)  # the default narrow grid, intersected with sweep.l2_grid
SWEEP_GRID = "sweep"  # a grid written as this string: the sweep's own l2_grid (the default full grid)


@block
class SpecificationParams(Params):
    """``specification``: the correlation of accuracy with the score under every combination of reasonable
    analysis choices (a specification curve, :mod:`~iis_study.core.scoring.specification`) and its verdict on the sign.

    ``head_grids`` / ``probe_grids``: named L2 grids the heads' / the probe's strength is re-selected on val from
    (:meth:`resolve_grids`); ``None`` (the default): ``full``, the sweep's own ``l2_grid``, and ``narrow``,
    :data:`NARROW_GRID` intersected with it (left out, with a warning, when that is empty or the full grid);
    written out: C values each in ``sweep.l2_grid`` (or the string ``sweep``: its whole grid); ``probe_inputs``:
    ``rms`` (the study's probe: centred, divided by one RMS number), ``centred`` (centred only), ``standardised``
    (each feature to unit variance on train), the last two one extra probe solve per representation;
    ``accuracy``: the x axis, the specification's ``probe`` or the independent L-BFGS ``reference`` probe;
    ``scores``: the score on the y axis (those a study lacks are skipped); ``scopes``: ``all``, ``pretrained``,
    and each without the near-chance representations (``above_chance``: the study's probe test accuracy at least
    ``near_chance / K``); ``leverage``: a representation whose removal moves the headline specification's r by
    more than this is flagged; ``n_perm``: permutations above 8 representations (exact below)."""

    WHERE = "specification"
    enabled: bool = True
    head_grids: Mapping[str, Any] | None = None
    probe_grids: Mapping[str, Any] | None = None
    probe_inputs: tuple[str, ...] = SPECIFICATION_INPUTS
    accuracy: tuple[str, ...] = SPECIFICATION_ACCURACIES
    scores: tuple[str, ...] = CORRELATION_SCORES
    scopes: tuple[str, ...] = SPECIFICATION_SCOPES
    near_chance: float = 2.0
    leverage: float = 0.2
    n_perm: int = 2000
    seed: int = 0

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"specification.enabled must be true or false, got {self.enabled!r}")
        for name in ("head_grids", "probe_grids"):
            grids = getattr(self, name)
            if grids is None:
                continue
            if not isinstance(grids, Mapping) or not grids:
                raise ValueError(f"specification.{name} must map a name to a list of L2 strengths C (or to "
                                 f"'{SWEEP_GRID}'), or be null (the default grids); got {grids!r}")
            for key, grid in grids.items():
                ok = grid == SWEEP_GRID or (isinstance(grid, (list, tuple)) and grid and all(
                    isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in grid))
                if not ok:
                    raise ValueError(f"specification.{name}.{key} must be a non-empty list of positive C values "
                                     f"or '{SWEEP_GRID}', got {grid!r}")
        for name, allowed in (("probe_inputs", SPECIFICATION_INPUTS), ("accuracy", SPECIFICATION_ACCURACIES),
                              ("scores", CORRELATION_SCORES), ("scopes", SPECIFICATION_SCOPES)):
            values = getattr(self, name)
            if isinstance(values, str) or not values:
                raise ValueError(f"specification.{name} must be a non-empty list, some of {list(allowed)}; "
                                 f"got {values!r}")
            check_subset(values, allowed, f"specification.{name}")
        if not isinstance(self.near_chance, (int, float)) or isinstance(self.near_chance, bool) or self.near_chance < 1:
            raise ValueError(f"specification.near_chance must be a number >= 1 (times 1/K), got {self.near_chance!r}")
        if not isinstance(self.leverage, (int, float)) or isinstance(self.leverage, bool) or not 0 < self.leverage <= 2:
            raise ValueError(f"specification.leverage must be in (0, 2], got {self.leverage!r}")
        check_int(self.n_perm, "specification.n_perm", 1)
        check_int(self.seed, "specification.seed", 0)

    def resolve_grids(
        self, l2_grid: Any, l2_path: bool = False,
    ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[str]]:
        """The head grids and probe grids (name -> sorted C values) for a sweep over ``l2_grid``, and the notes
        (one line per grid left out, for a log warning and the record).

        Default grids (``None``): ``narrow`` (:data:`NARROW_GRID` ∩ ``l2_grid``, left out when empty or equal to
        the full grid) and ``full`` (``l2_grid``). Written-out grids: every C must be in ``l2_grid`` (a
        ``ValueError`` naming the grid otherwise: a grid re-selects among the solved strengths). With ``l2_path``
        a head's path (and the probe's: the sweep solves it under the same rule) stops at the first strength
        whose val accuracy falls, so a narrower grid's re-selection is not what a run on it would select: only
        the grid equal to the sweep's is kept (the head_grid and probe_grid knobs are skipped)."""
        solved = sorted({float(c) for c in l2_grid})
        out, notes = [], []
        for name in ("head_grids", "probe_grids"):
            given = getattr(self, name)
            if given is None:
                narrow = [c for c in NARROW_GRID if c in solved]
                grids = {"narrow": narrow, "full": list(solved)}
                if not narrow:
                    notes.append(f"specification.{name}: the default narrow grid {list(NARROW_GRID)} has no "
                                 f"strength in sweep.l2_grid {solved}; left out")
                    del grids["narrow"]
                elif narrow == solved:
                    notes.append(f"specification.{name}: the default narrow grid {list(NARROW_GRID)} within "
                                 f"sweep.l2_grid is {narrow}, the full grid; left out")
                    del grids["narrow"]
            else:
                grids = {}
                for key, grid in given.items():
                    if grid == SWEEP_GRID:
                        grids[str(key)] = list(solved)
                        continue
                    missing = sorted({float(c) for c in grid} - set(solved))
                    if missing:
                        raise ValueError(f"specification.{name}.{key}: C = {missing} not in sweep.l2_grid {solved} "
                                         "(a grid re-selects among the solved strengths)")
                    grids[str(key)] = sorted({float(c) for c in grid})
            if l2_path:
                own = next((k for k, g in grids.items() if g == solved), "full")
                skipped = [k for k in grids if k != own]
                grids = {own: list(solved)}
                if skipped:
                    notes.append(f"specification.{name}: sweep.l2_path is on (paths stop early, a narrower grid's "
                                 f"re-selection would not be exact): only the sweep's own grid ({own}) is kept, "
                                 f"{skipped} left out")
            out.append(grids)
        return out[0], out[1], notes

"""The study's parameter blocks, typed, with their defaults (written here and nowhere else).

One class per block of ``conf/<env>/parameters_*.yml``; a key left out of the YAML takes the
default below. Nodes receive these objects (Kedro builds typed ``params:`` inputs before any node
runs, so a bad value stops the run in seconds, naming the parameter). Blocks defined next to the
code they configure: :class:`~iis_study.core.data.DatasetParams` (``dataset``),
:class:`~iis_study.core.heads.SweepParams` (``sweep``, ``fine_tuning.sweep``),
:class:`~iis_study.core.finetune.FineTuningParams` (``fine_tuning``) and
:class:`~iis_study.core.finetune.FineTuningTrainParams` (``fine_tuning.train``),
:class:`~iis_study.core.backbones.BackboneParams` (one entry of ``backbones``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .device import check_device
from .params import Params, block, check_int, check_open_fraction, check_power, check_subset

from .heads.datatypes import SweepParams
from .nulls import NULL_KINDS

if TYPE_CHECKING:
    from .backbones import BackboneParams

CONCEPT_TYPES = ("prototype", "cluster", "end_to_end", "textual")
ELEMENT_KINDS = ("patches", "segments")
CORRELATION_SCORES = (
    "iis", "iis_chance_corrected", "iis_excess_random", "iis_excess_rotated", "iis_excess_gaussian"
)
CORRELATION_GROUPS = ("all", "pretrained", "family")
GALLERY_TYPES = ("prototype", "cluster")


def moved_to_catalog(values: Mapping[str, Any], parameter: str, entry: str) -> None:
    """A parameter that became a catalog entry: an error saying where it went (not a bare unknown key)."""
    if parameter.rsplit(".", 1)[1] in values:
        raise ValueError(
            f"{parameter} is no longer a parameter: the folder is the `{entry}` catalog entry "
            "(conf/<env>/catalog.yml, `path:`)"
        )


@block
class SplitParams(Params):
    """``splits``: the stratified train / val (selection) / test (reported) split."""

    WHERE = "splits"
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2)
    seed: int = 0
    max_per_class: int | None = None

    def validate(self) -> None:
        fr = self.fractions
        if (
            not isinstance(fr, tuple)
            or len(fr) != 3
            or any(not isinstance(f, int | float) or isinstance(f, bool) or f <= 0 for f in fr)
            or abs(sum(fr) - 1) > 1e-6
        ):
            raise ValueError(f"splits.fractions must be three positive numbers (train, val, test) summing to 1, got {fr}")
        check_int(self.seed, "splits.seed")
        if self.max_per_class is not None:
            check_int(self.max_per_class, "splits.max_per_class", 3)


@block
class ExtractionParams(Params):
    """``extraction``: how features are computed and stored (where they are cached: the ``feature_cache``
    catalog entry, :class:`~iis_study.core.features.FeatureCache`)."""

    WHERE = "extraction"
    device: str = "auto"
    batch_size: int = 128
    num_workers: int | None = None  # None: min(4, cores - 1)
    progress: bool = True
    storage: str = "memory"  # memory | sharded
    storage_dtype: str = "float32"
    shard_rows: int = 16384

    def __init__(self, **values: Any) -> None:
        moved_to_catalog(values, "extraction.cache_dir", "feature_cache")
        super().__init__(**values)

    def validate(self) -> None:
        from .store import check_storage

        check_int(self.batch_size, "extraction.batch_size", 1)
        if self.num_workers is not None:
            check_int(self.num_workers, "extraction.num_workers", 0)
        if self.storage not in ("memory", "sharded"):
            raise ValueError(f"extraction.storage must be 'memory' or 'sharded', got {self.storage!r}")
        check_int(self.shard_rows, "extraction.shard_rows", 1)
        check_storage(self.storage_dtype, self.shard_rows)
        check_device(self.device, "extraction.device")

    @property
    def sharded(self) -> bool:
        """Features stored as ``.npy`` shards on disk (streamed by the sweep)."""
        return self.storage == "sharded"


@block
class PatchParams(Params):
    """``concepts.patches``: a ``grid x grid`` of crops per source image."""

    WHERE = "concepts.patches"
    grid: int = 4

    def validate(self) -> None:
        check_int(self.grid, "concepts.patches.grid", 1)


@block
class SegmentParams(Params):
    """``concepts.segments``: SLIC segments at several granularities, deduplicated by IoU."""

    WHERE = "concepts.segments"
    n_segments: tuple[int, ...] = (10, 20, 30)
    compactness: float = 10.0
    sigma: float = 1.0
    max_per_setting: int = 5
    iou_threshold: float = 0.5
    min_area: float = 0.001
    fill: int = 117
    n_jobs: int = 2

    def validate(self) -> None:
        if not self.n_segments or any(not isinstance(n, int) or n < 1 for n in self.n_segments):
            raise ValueError(f"concepts.segments.n_segments must be positive integers, got {self.n_segments!r}")
        check_int(self.max_per_setting, "concepts.segments.max_per_setting", 1)
        check_int(self.n_jobs, "concepts.segments.n_jobs", 1)

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~iis_study.core.concepts.segment_elements`."""
        return self.to_dict() | {"n_segments": tuple(self.n_segments)}


@block
class TextualParams(Params):
    """``concepts.textual``: CLIP-scored words (METHOD §5.4)."""

    WHERE = "concepts.textual"
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"  # an open_clip tag (hub) ...
    checkpoint: str | None = None  # ... or a local checkpoint file
    words: str = "digits"  # digits | cifar10 | /path/to/words.txt
    top5_threshold: float = 0.25
    similarity_threshold: float = 0.45
    max_images: int = 2000
    tiny_random_clip: bool = False  # tests only

    def validate(self) -> None:
        check_int(self.max_images, "concepts.textual.max_images", 1)


@block
class ConceptParams(Params):
    """``concepts``: concept acquisition (METHOD §5)."""

    WHERE = "concepts"
    types: tuple[str, ...] = ("prototype", "cluster")
    m: int = 200
    seed: int = 0
    images_per_class: int = 10
    element_size: int = 64
    element_kinds: tuple[str, ...] = ELEMENT_KINDS
    patches: PatchParams = PatchParams()
    segments: SegmentParams = SegmentParams()
    cluster_max_elements: int = 20000
    # E >> M so that no concept starts empty (M = 200: none empty in 72 heads at 2,500; 300 left ~44)
    end_to_end_max_elements: int = 2500
    textual: TextualParams = TextualParams()
    draws: int = 3  # the prototype sample and the KMeans seed drawn this many times (seeds seed, seed + 1, ...)
    nulls: tuple[str, ...] = NULL_KINDS  # null concept sets beside every score (core/nulls.py)

    def validate(self) -> None:
        check_int(self.draws, "concepts.draws", 1)
        if isinstance(self.nulls, str) or not isinstance(self.nulls, tuple | list) or set(self.nulls) - set(NULL_KINDS):
            raise ValueError(f"concepts.nulls must be a list drawn from {list(NULL_KINDS)} (empty: no nulls), got {self.nulls!r}")
        if not isinstance(self.m, int) or isinstance(self.m, bool) or self.m < 1:
            raise ValueError(f"concepts.m must be a positive integer, got {self.m!r}")
        check_subset(self.types, CONCEPT_TYPES, "concepts.types")
        if len(set(self.types)) != len(self.types):
            raise ValueError(f"concepts.types has duplicates: {list(self.types)}")
        if not isinstance(self.images_per_class, int) or isinstance(self.images_per_class, bool) or self.images_per_class < 1:
            raise ValueError(f"concepts.images_per_class must be a positive integer, got {self.images_per_class!r}")
        check_int(self.seed, "concepts.seed")
        check_int(self.element_size, "concepts.element_size", 8)
        check_subset(self.element_kinds, ELEMENT_KINDS, "concepts.element_kinds")
        check_int(self.cluster_max_elements, "concepts.cluster_max_elements", 1)
        check_int(self.end_to_end_max_elements, "concepts.end_to_end_max_elements", 1)


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
    ANEC, the concept-bottleneck papers' weight sparsity (:mod:`~iis_study.core.weight_sparsity`)."""

    WHERE = "weight_sparsity"
    enabled: bool = True
    nec_levels: tuple[float, ...] = (5, 10, 15, 20, 25, 30)  # ANEC-avg over these; ANEC-<first> reported too
    alpha: float = 0.99  # the L1 share of the elastic net
    path_length: int = 40  # strengths on the path (it stops once every set is past the largest NEC level)
    min_ratio: float = 1e-4  # the path's smallest strength, relative to lambda_max
    tolerance: float = 1e-4  # on the optimality residual (mean cross-entropy units)
    max_iter: int = 5000  # FISTA iterations per point where Newton stalls (or with solver: fista)
    solver: str = "newton"  # newton: orthant-wise Newton on the free weights | fista: first-order (the baseline)

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


SPECIFICATION_INPUTS = ("rms", "centred", "standardised")  # the probe's inputs (core/specification.py)
SPECIFICATION_ACCURACIES = ("probe", "reference")  # the x axis: the specification's own probe | the L-BFGS reference
SPECIFICATION_SCOPES = ("all", "pretrained", "above_chance", "pretrained_above_chance")
NARROW_GRID = (1.0, 10.0, 100.0)  # the default narrow grid, intersected with sweep.l2_grid
SWEEP_GRID = "sweep"  # a grid written as this string: the sweep's own l2_grid (the default full grid)


@block
class SpecificationParams(Params):
    """``specification``: the correlation of accuracy with the score under every combination of reasonable
    analysis choices (a specification curve, :mod:`~iis_study.core.specification`) and its verdict on the sign.

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


@block
class GalleryParams(Params):
    """``gallery``: for a few test images, the prediction and the concepts that drove it."""

    WHERE = "gallery"
    concept_type: str = "prototype"
    sparsity: float = 0.9  # the interpretation head shown (keeps M - floor(s*M) concepts per image)
    n_images: int = 6
    top: int = 5
    seed: int = 0

    def validate(self) -> None:
        if self.concept_type not in GALLERY_TYPES:
            raise ValueError(f"gallery.concept_type must be 'prototype' or 'cluster', got {self.concept_type!r}")
        s = self.sparsity
        if not isinstance(s, int | float) or isinstance(s, bool) or not 0.0 <= float(s) < 1.0:
            raise ValueError(f"gallery.sparsity must be in [0, 1), got {s!r}")
        check_int(self.n_images, "gallery.n_images", 1)
        check_int(self.top, "gallery.top", 1)
        check_int(self.seed, "gallery.seed")


@block
class TrackingParams(Params):
    """``tracking`` in ``conf/<env>/mlflow.yml`` (not a parameter of the study). The store:
    ``MLFLOW_TRACKING_URI`` when set, else ``uri``, else SQLite at ``<project>/mlflow.db``."""

    WHERE = "mlflow.yml: tracking"
    enabled: bool = True
    experiment: str = "iis_study"
    uri: str | None = None

    def __init__(self, **values: Any) -> None:
        unknown = set(values) - {"enabled", "experiment", "uri"}
        if unknown:
            raise ValueError(
                f"mlflow.yml: unknown key(s) {sorted(unknown)} under tracking; expected enabled, experiment, uri"
            )
        super().__init__(**values)

    def validate(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ValueError(f"mlflow.yml: tracking.enabled must be true or false, got {self.enabled!r}")
        if not isinstance(self.experiment, str):
            raise ValueError(f"mlflow.yml: tracking.experiment must be a name, got {self.experiment!r}")
        if not isinstance(self.uri or "", str):
            raise ValueError(f"mlflow.yml: tracking.uri must be a tracking URI or null, got {self.uri!r}")


def backbone_fields(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of a ``backbones`` entry, the spec's defaults filled in, without checking it (no model
    is built, no file opened): for tables and MLflow after the run's validation has checked the entry."""
    import dataclasses

    from .backbones import BackboneParams

    def default(f: dataclasses.Field) -> Any:
        return None if f.default is dataclasses.MISSING else f.default

    return {f.name: entry[f.name] if f.name in entry else default(f) for f in dataclasses.fields(BackboneParams)}


def backbone_spec(entry: Mapping[str, Any]) -> BackboneParams:
    """The :class:`~iis_study.core.backbones.BackboneParams` of one entry of the expanded ``backbones``
    block (the one way an entry becomes a spec; its name is ``name``, else the model)."""
    from .backbones import BackboneParams

    return BackboneParams.from_params(entry.get("name") or entry.get("model") or "backbone", entry)


def sweep_config(params: Mapping[str, Any] | SweepParams | None, where: str = "sweep") -> SweepParams:
    """The :class:`~iis_study.core.heads.SweepParams` of a ``sweep`` block (or ``fine_tuning.sweep``),
    checked, its ``device`` resolved (``auto``: CUDA when present)."""
    from dataclasses import replace

    from .device import resolve_device

    cfg = SweepParams.from_params(params)
    return replace(cfg, device=resolve_device(cfg.device, f"{where}.device"))

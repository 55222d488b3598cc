"""The study's parameters as the pipeline registry sees them.

Pipelines are expanded from parameters (one namespace per representation, one branch per concept
type), so the registry reads the parameters of the environment being run itself, every time it is
asked, with no state kept between calls: the environment named on the ``kedro`` command line
(``kedro run --env cifar10``, ``kedro viz run --env cifar10``: Kedro-Viz runs no project hooks, and
its server process keeps the parent's ``sys.argv``), else ``KEDRO_ENV``, else the default run env.
A session created in Python (``KedroSession.create(env=...)``) cannot tell the registry its env:
set ``KEDRO_ENV`` as ``kedro jupyter`` does; the validation hook stops a run whose pipeline was
expanded for another environment's representations, naming both.

Representations: the ``backbones`` block lists explicit entries (one representation each); the
optional ``families`` block expands a backbone into layers x resolutions::

    families:
      lite0: {layers: [stage3, penultimate], resolutions: [64, 96]}   # expands backbones.lite0
      lite0_random: {base: lite0, weights: random, seed: 0, layers: [stage3], resolutions: [64]}

A family ``F`` gives one entry per (resolution ``R``, layer ``L``), keyed ``F_rR_L`` (a valid
Kedro namespace) with ``label: F@R/L`` (the readable name shown in tables and MLflow) and
``family: F``. Its fields come from ``backbones[base]`` (``base`` defaults to the family's own
name), overridden by the family's own spec keys (``model``, ``weights``, ``seed``, ``mean``,
``std``, ``pooling``). A family named like a ``backbones`` entry replaces that entry by its
expansion; ``base: X`` copies entry ``X`` and leaves it in place. :func:`expand_representations`
is the single place this happens: the pipeline registry, the validation hook, MLflow tracking
and the catalog's ``params:backbones.<name>`` entries all use it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[2]


_COMMANDS = ("kedro", "iis-study")  # the Kedro CLI and the project's own entry point (pyproject.toml)


def _cli_args(argv: list[str] | None = None) -> list[str] | None:
    """The arguments of a ``kedro ...``, ``iis-study ...`` or ``python -m iis_study ...`` command line, else None."""
    argv = sys.argv if argv is None else argv
    if not argv:
        return None
    first = Path(argv[0])
    if first.name in _COMMANDS or (first.name == "__main__.py" and first.parent.name == "iis_study"):
        return list(argv[1:])
    return None


def _cli_option(names: tuple[str, ...], argv: list[str] | None = None) -> str | None:
    args = _cli_args(argv)
    if args is None:
        return None
    for i, arg in enumerate(args):
        if arg in names and i + 1 < len(args):
            return args[i + 1]
        for name in names:
            if name.startswith("--") and arg.startswith(name + "="):
                return arg.split("=", 1)[1]
    return None


def cli_env(argv: list[str] | None = None) -> str | None:
    """The environment a command line names (``--env X``, ``--env=X``, ``-e X``), or None.

    Kedro-Viz runs no project hooks, so for ``kedro viz run --env cifar10`` this is how the registry
    learns the environment (its server process is spawned with the parent's ``sys.argv``). Read from a
    ``kedro``, ``iis-study`` or ``python -m iis_study`` command line; a flag beats ``KEDRO_ENV``, as in Kedro.
    """
    return _cli_option(("--env", "-e"), argv)


def cli_conf_source(argv: list[str] | None = None) -> str | None:
    """The ``--conf-source`` a command line names, or None."""
    return _cli_option(("--conf-source",), argv)


def active_env(argv: list[str] | None = None) -> str | None:
    """The environment of this process: the command line's ``--env``, else ``KEDRO_ENV``, else None (default)."""
    return cli_env(argv) or os.environ.get("KEDRO_ENV") or None


def study_parameters(env: str | None = None, conf_source: str | Path | None = None) -> dict[str, Any]:
    """The merged parameters of ``env`` (default: :func:`active_env`), read from ``conf/`` (or the command
    line's ``--conf-source``) with the project's config loader settings (``config_loader.CONFIG_LOADER_ARGS``:
    soft merge of environments).

    Kedro's config loader registers its ``${globals:...}`` resolver for the whole process; the resolvers
    in place before the call are put back, so reading parameters here never changes how the running
    session resolves its own catalog and parameters.
    """
    from kedro.config import OmegaConfigLoader
    from omegaconf.basecontainer import BaseContainer

    from .config_loader import CONFIG_LOADER_ARGS

    source = Path(conf_source or cli_conf_source() or Path.cwd() / "conf")
    if not source.is_dir():
        source = PROJECT_ROOT / "conf"
    resolvers = dict(BaseContainer._resolvers)
    try:
        loader = OmegaConfigLoader(conf_source=str(source), env=env or active_env(), **CONFIG_LOADER_ARGS)
        return loader["parameters"]
    finally:
        BaseContainer._resolvers.clear()
        BaseContainer._resolvers.update(resolvers)


FAMILY_KEYS = ("layers", "resolutions", "base")
_SPEC_KEYS = ("model", "weights", "seed", "mean", "std", "pooling")


def representation_key(family: str, resolution: int, layer: str) -> str:
    """The namespace-safe key of a family member, e.g. ``lite0_r96_stage3``."""
    return f"{family}_r{int(resolution)}_{layer}"


def representation_label(family: str, resolution: int, layer: str) -> str:
    """The readable name of a family member, e.g. ``lite0@96/stage3``."""
    return f"{family}@{int(resolution)}/{layer}"


def _check_namespace(name: Any, where: str) -> None:
    if not isinstance(name, str) or not name or not name.replace("_", "").isalnum() or not name.isascii():
        raise ValueError(f"{where}: name {name!r} must contain only letters, digits and '_' (it becomes a namespace)")


def _as_list(value: Any, where: str, kind: type) -> list:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{where} must be a non-empty list, got {value!r}")
    bad = [v for v in value if not isinstance(v, kind) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"{where} must hold {kind.__name__} values, got {bad}")
    if len(set(value)) != len(value):
        raise ValueError(f"{where} has duplicates: {list(value)}")
    return list(value)


def expand_family(name: str, block: Any, backbones: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The entries of one family block (see the module docstring), in resolution-major order."""
    where = f"families.{name}"
    _check_namespace(name, "families")
    if not isinstance(block, dict):
        raise ValueError(f"{where} must be a mapping like {{layers: [stage3, penultimate], resolutions: [64, 96]}}")
    unknown = set(block) - set(FAMILY_KEYS) - set(_SPEC_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {sorted(unknown)}; expected layers, resolutions, and optionally "
            f"base and {list(_SPEC_KEYS)} (the resolution is set by `resolutions`, the layer by `layers`)"
        )
    missing = [k for k in ("layers", "resolutions") if k not in block]
    if missing:
        raise ValueError(f"{where}: missing {missing}; e.g. {{layers: [stage3, penultimate], resolutions: [64, 96]}}")
    base_name = block.get("base", name)
    if "base" in block and base_name not in backbones:
        raise ValueError(f"{where}.base = {base_name!r} is not a key of `backbones` ({sorted(backbones)})")
    base = backbones.get(base_name) or {}
    if not isinstance(base, dict):
        raise ValueError(f"backbones.{base_name} must be a mapping like {{model: resnet50, weights: hub}}, got {base!r}")
    fields = {
        k: v for k, v in base.items() if k not in ("input_size", "layer", "label", "family", "family_layers", "name")
    }
    fields.update({k: block[k] for k in _SPEC_KEYS if k in block})
    if not fields.get("model"):
        raise ValueError(f"{where}: no model; give `model:` or name a `backbones` entry with `base:`")
    layers = _as_list(block["layers"], f"{where}.layers", str)
    sizes = _as_list(block["resolutions"], f"{where}.resolutions", int)
    out = {}
    for size in sizes:
        for layer in layers:
            _check_namespace(layer, f"{where}.layers")
            out[representation_key(name, size, layer)] = {
                **fields,
                "input_size": size,
                "layer": layer,
                "label": representation_label(name, size, layer),
                "family": name,
                "family_layers": list(layers),
            }
    return out


def expand_representations(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every representation of the study: explicit ``backbones`` entries, then each family's members.

    Idempotent: expanding parameters whose ``backbones`` already hold the expansion (and an empty
    ``families``) returns the same mapping. Raises ``ValueError`` naming the parameter on a bad block
    or on two different representations with the same key.
    """
    # an environment removes a base entry with `name: null` (the parameters merge softly)
    backbones = {k: v for k, v in (params.get("backbones") or {}).items() if v is not None}
    families = params.get("families") or {}
    if not isinstance(families, dict):
        raise ValueError(f"families must be a mapping family -> {{layers, resolutions}}, got {families!r}")
    replaced = {f for f, block in families.items() if isinstance(block, dict) and "base" not in block}
    out = {k: {**v, "name": k} if isinstance(v, dict) else v for k, v in backbones.items() if k not in replaced}
    for fam, block in families.items():
        for key, entry in expand_family(fam, block, backbones).items():
            if key in out and out[key] != {**entry, "name": key}:
                raise ValueError(
                    f"families.{fam}: representation {key!r} ({entry['label']}) is also defined elsewhere; "
                    "rename the family or the `backbones` entry"
                )
            out[key] = {**entry, "name": key}
    return out


def expanded_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with ``backbones`` replaced by :func:`expand_representations` and ``families`` emptied."""
    return {**params, "backbones": expand_representations(params), "families": {}}


def backbone_names(params: dict[str, Any]) -> list[str]:
    """Names (namespaces) of the study's representations: the keys of the expanded ``backbones``."""
    names = list(expand_representations(params))
    for n in names:
        _check_namespace(n, "backbones")
    return names


def concept_types(params: dict[str, Any]) -> list[str]:
    """The concept types to score (``concepts.types``; default :attr:`ConceptParams.types`)."""
    from .core.concepts.blocks import ConceptParams

    return list((params.get("concepts") or {}).get("types", ConceptParams.types))


def gallery_type(params: dict[str, Any]) -> str | None:
    """The concept type of the gallery plots (``gallery.concept_type``), None without a ``gallery`` block."""
    from .core.reporting.blocks import GalleryParams

    gallery = params.get("gallery")
    return gallery.get("concept_type", GalleryParams.concept_type) if gallery else None

"""The study's parameters as the pipeline registry sees them.

Pipelines are expanded from parameters (one namespace per backbone, one branch per concept
type), so the registry needs the parameters of the environment being run. A hook records the
context's config loader (``kedro run --env cifar10`` included); outside a session (tests,
notebooks) the configuration is read from ``conf/`` with ``KEDRO_ENV`` or the default env.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_STATE: dict[str, Any] = {"params": None}
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def remember(params: dict[str, Any]) -> None:
    """Record the parameters of the running context (called by a hook)."""
    _STATE["params"] = params


def forget() -> None:
    """Drop recorded parameters (tests)."""
    _STATE["params"] = None


def study_parameters(env: str | None = None, conf_source: str | Path | None = None) -> dict[str, Any]:
    """The merged parameters of ``env`` (recorded by the hook when a session is running)."""
    if _STATE["params"] is not None and env is None and conf_source is None:
        return _STATE["params"]
    from kedro.config import OmegaConfigLoader

    source = Path(conf_source or Path.cwd() / "conf")
    if not source.is_dir():
        source = PROJECT_ROOT / "conf"
    loader = OmegaConfigLoader(
        conf_source=str(source),
        env=env or os.environ.get("KEDRO_ENV"),
        base_env="base",
        default_run_env="local",
    )
    return loader["parameters"]


def backbone_names(params: dict[str, Any]) -> list[str]:
    """Names of the study's backbones (keys of the ``backbones`` block), validated as namespaces."""
    names = list((params.get("backbones") or {}).keys())
    for n in names:
        if not n.replace("_", "").isalnum():
            raise ValueError(f"backbones: name {n!r} must contain only letters, digits and '_' (it becomes a namespace)")
    return names


def concept_types(params: dict[str, Any]) -> list[str]:
    """The concept types to score (``concepts.types``)."""
    return list((params.get("concepts") or {}).get("types", ["prototype"]))

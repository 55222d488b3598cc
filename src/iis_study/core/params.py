"""Shared handling of parameter mappings."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def reject_unknown_keys(params: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """``ValueError`` naming ``where`` and the unknown keys, e.g. a misspelt ``rooot``."""
    allowed = set(allowed)
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(allowed)}")

"""Typed parameter blocks: the base class every block of ``conf/*/parameters*.yml`` is read into.

A block is a frozen dataclass declared with :func:`block` whose fields hold the defaults (the one
place a default is written). Built from a mapping -- by Kedro, which instantiates typed ``params:``
inputs of nodes before any node runs, or by :meth:`Params.from_params` -- it

- rejects unknown keys with an error naming the block (``sweep: unknown key(s) ['stepz']``),
- turns nested mappings into their typed blocks and YAML lists into tuples,
- runs :meth:`Params.validate`, whose ``ValueError`` names the parameter (``concepts.m must be ...``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T", bound="Params")


def reject_unknown_keys(params: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """``ValueError`` naming ``where`` and the unknown keys, e.g. a misspelt ``rooot``."""
    allowed = set(allowed)
    unknown = set(params) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(allowed)}")


def block(cls: type[T]) -> type[T]:
    """Declare a parameter block: a frozen dataclass that keeps :class:`Params`' constructor."""
    return dataclasses.dataclass(frozen=True, init=False)(cls)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any) -> Any:
    """A nested mapping into its block, a list into a tuple, where the field's type says so."""
    target = hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        target = args[0] if len(args) == 1 else hint
    if isinstance(target, type) and issubclass(target, Params) and isinstance(value, Mapping):
        return target(**value)
    if typing.get_origin(target) is tuple and isinstance(value, list):
        return tuple(value)
    return value


class Params:
    """Base of the typed parameter blocks (see the module docstring)."""

    #: the parameter path used in error messages, e.g. ``"sweep"`` or ``"concepts.segments"``
    WHERE = "parameters"

    def __init__(self, **values: Any) -> None:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        reject_unknown_keys(values, [f.name for f in fields], self.WHERE)
        hints = _hints(type(self))
        for f in fields:
            if f.name in values:
                value = _coerce(values[f.name], hints[f.name])
            elif f.default is not dataclasses.MISSING:
                value = f.default
            elif f.default_factory is not dataclasses.MISSING:
                value = f.default_factory()
            else:
                raise ValueError(f"{self.WHERE}.{f.name} is required")
            object.__setattr__(self, f.name, value)
        self.validate()

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any] | T | None) -> T:
        """The block from a parameter mapping (``None``: every default); an instance is returned as is."""
        if isinstance(params, cls):
            return params
        return cls(**dict(params or {}))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the parameter when a value is out of range (blocks override)."""

    def to_dict(self) -> dict[str, Any]:
        """The block as plain data (nested blocks as mappings, tuples as lists)."""

        def plain(v: Any) -> Any:
            if isinstance(v, Params):
                return v.to_dict()
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            return v

        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# -- checks shared by the blocks -----------------------------------------------------------------


def block_values(cls: type[Params], **values: Any) -> tuple[Any, ...]:
    """The given fields of block ``cls``, each left out (``None``) taking the block's default, in the
    order given: the one place a core function's optional settings get their defaults."""
    default = cls()
    return tuple(getattr(default, name) if value is None else value for name, value in values.items())


def check_int(value: Any, where: str, lo: int | None = None) -> None:
    """An integer (not a bool), at least ``lo``."""
    if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{where} must be an integer{bound}, got {value!r}")


def check_open_fraction(value: Any, where: str, lo: float = 0.0, hi: float = 1.0) -> None:
    """A number strictly between ``lo`` and ``hi``."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not lo < float(value) < hi:
        raise ValueError(f"{where} must be a number in ({lo}, {hi}), got {value!r}")


def check_power(ci: float, power: float) -> None:
    """``scoring.power`` above the level's one-sided tail ``(1 - ci) / 2`` (no effect at all reaches that) and
    below 1; ``scoring.ci`` in (0, 1)."""
    if not 0.0 < ci < 1.0:
        raise ValueError(f"scoring.ci must lie in (0, 1), got {ci}")
    if not (1.0 - ci) / 2 < power < 1.0:
        raise ValueError(f"scoring.power must lie in ({(1.0 - ci) / 2:g}, 1) at scoring.ci {ci:g} (a power at or "
                         f"below (1 - ci) / 2 is reached with no effect at all), got {power}")


def check_subset(values: Any, allowed: Iterable[str], where: str) -> None:
    """A non-empty list drawn from ``allowed``."""
    allowed = list(allowed)
    if isinstance(values, str) or not isinstance(values, tuple | list) or not values or set(values) - set(allowed):
        raise ValueError(f"{where} must be a non-empty subset of {allowed}, got {values!r}")


def moved_to_catalog(values: Mapping[str, Any], parameter: str, entry: str) -> None:
    """A parameter that became a catalog entry: an error saying where it went (not a bare unknown key)."""
    if parameter.rsplit(".", 1)[1] in values:
        raise ValueError(
            f"{parameter} is no longer a parameter: the folder is the `{entry}` catalog entry "
            "(conf/<env>/catalog.yml, `path:`)"
        )

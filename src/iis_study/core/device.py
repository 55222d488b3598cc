"""The one place a ``device`` parameter (``auto`` | ``cpu`` | ``cuda`` | ``cuda:<n>``) is checked and resolved."""

from __future__ import annotations

import torch


def check_device(requested: object, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``requested`` is ``auto``, ``cpu`` or ``cuda[:n]`` (CUDA present)."""
    if requested in (None, "auto", "cpu"):
        return
    if isinstance(requested, str) and (requested == "cuda" or requested.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ValueError(f"{where} = {requested!r}, but this machine has no CUDA GPU; use 'cpu' or 'auto'")
        return
    raise ValueError(f"{where} must be 'auto', 'cpu' or 'cuda', got {requested!r}")


def resolve_device(requested: object = "auto", where: str = "device") -> str:
    """``auto`` (or None) -> ``cuda`` when a GPU is present, else ``cpu``; anything else checked and returned."""
    check_device(requested, where)
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(requested)

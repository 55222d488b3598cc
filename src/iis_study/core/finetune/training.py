"""The training side of fine-tuning (:mod:`iis_study.core.finetune`): heads, loss, data order,
learning-rate schedule, backbone modes and one training epoch.

Nothing here reads the global RNG: heads are initialised from generators seeded per (seed, head)
and the data order from a generator seeded per (seed, epoch) (:func:`epoch_batches`), so a run's
training is determined by its settings alone.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..representations.backbones import Representation
from ..data import ImageSet
from ..representations.features import Resized
from .blocks import FineTuningTrainParams
from ..heads import derive_seed, sparsify


# --------------------------------------------------------------------------- heads and loss


class InterpretationHead(nn.Module):
    """``h_interp``: ``LayerNorm_M`` (affine) over the concept scores, ``sparsify``, linear ``M -> K``."""

    def __init__(self, m: int, num_classes: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(m)
        self.linear = nn.utils.skip_init(nn.Linear, m, num_classes)

    def forward(self, z: torch.Tensor, concepts: torch.Tensor, k: int) -> torch.Tensor:
        """Logits from representations ``z`` (B, D) through concepts ``C`` (M, D), dropping ``k``."""
        return self.linear(sparsify(self.ln(z @ concepts.T), k))


def _fill_linear(linear: nn.Linear, gen: torch.Generator) -> None:
    """``nn.Linear``'s default init (uniform in ±1/sqrt(fan_in)) drawn from ``gen``."""
    bound = 1.0 / math.sqrt(linear.in_features)
    with torch.no_grad():
        w = torch.rand(linear.weight.shape, generator=gen) * (2 * bound) - bound
        b = torch.rand(linear.bias.shape, generator=gen) * (2 * bound) - bound
        linear.weight.copy_(w)
        linear.bias.copy_(b)


def _head_generator(head: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("finetune", head, int(seed)))


def init_heads(dim: int, m: int, num_classes: int, seed: int) -> tuple[nn.Linear, InterpretationHead]:
    """``h_std`` (D -> K) and ``h_interp`` (M -> K), each initialised from its own generator.

    No global RNG is read, so creating ``h_interp`` cannot change anything else in a run.
    """
    h_std = nn.utils.skip_init(nn.Linear, dim, num_classes)
    _fill_linear(h_std, _head_generator("h_std", seed))
    h_interp = InterpretationHead(m, num_classes)
    _fill_linear(h_interp.linear, _head_generator("h_interp", seed))
    return h_std, h_interp


def finetune_loss(
    z: torch.Tensor,
    y: torch.Tensor,
    h_std: nn.Module,
    h_interp: InterpretationHead,
    concepts: torch.Tensor | None,
    k: int,
    lam: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """``CE(h_std(z), y) + λ · CE(h_interp(z; C, k), y)``; at ``λ = 0`` only the first term.

    At ``λ = 0`` the interpretation branch is not evaluated at all (``concepts`` may be
    ``None``): the loss, and hence every gradient, is exactly plain cross-entropy. The
    interpretation branch runs in float32 outside autocast.
    """
    ce_std = F.cross_entropy(h_std(z), y)
    parts = {"ce_std": float(ce_std.detach())}
    if lam == 0:
        return ce_std, parts
    if concepts is None:
        raise ValueError("fine_tuning.lam > 0 needs concept vectors")
    with torch.autocast(z.device.type, enabled=False):
        ce_interp = F.cross_entropy(h_interp(z.float(), concepts.float(), k), y)
    parts["ce_interp"] = float(ce_interp.detach())
    return ce_std + lam * ce_interp, parts


# --------------------------------------------------------------------------- data order and schedule


class LabelledImages(Dataset):
    """Resized uint8 CHW images with their integer labels (decoded in ``DataLoader`` workers)."""

    def __init__(self, images: ImageSet, size: int, interpolation: str) -> None:
        self.inner = Resized(images, size, interpolation)
        self.labels = np.asarray(images.labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, _ = self.inner[i]
        return img, int(self.labels[i])


def batches_per_epoch(n: int, batch_size: int) -> int:
    """Minibatches per epoch: full batches plus a final one of at least 2 images."""
    return n // batch_size + (1 if n % batch_size >= 2 else 0)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The minibatches (index lists) of ``epoch`` (1-based): a seeded permutation, cut in batches.

    A trailing batch of one image is dropped (BatchNorm cannot train on a single sample).
    """
    gen = torch.Generator().manual_seed(derive_seed("finetune", "data", int(seed), int(epoch)))
    perm = torch.randperm(n, generator=gen).tolist()
    out = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    return out[: batches_per_epoch(n, batch_size)]


def steps_per_epoch(n: int, batch_size: int, accumulation_steps: int) -> int:
    """Optimiser steps per epoch (a trailing incomplete accumulation group also steps)."""
    return math.ceil(batches_per_epoch(n, batch_size) / accumulation_steps)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    model: nn.Module, heads: Sequence[nn.Module], cfg: FineTuningTrainParams, n_train: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (backbone and heads in two groups) and its warm-up + cosine schedule."""
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr_backbone},
        {"params": [p for h in heads for p in h.parameters() if p.requires_grad], "lr": cfg.lr_heads},
    ]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=_use_fused(model))
    per_epoch = steps_per_epoch(n_train, cfg.batch_size, cfg.accumulation_steps)
    total = per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * per_epoch)
    schedule = functools.partial(lr_factor, total_steps=total, warmup_steps=warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return opt, sched


def _use_fused(model: nn.Module) -> bool:
    """Fused AdamW (one kernel per step, several times faster) where torch has it for the device."""
    dev = next(model.parameters()).device.type
    return dev in ("cpu", "cuda")


# --------------------------------------------------------------------------- devices and modes


def _amp_dtype(device: torch.device, cfg: FineTuningTrainParams) -> torch.dtype | None:
    """Autocast dtype on CUDA (bf16 where supported, else fp16); ``None`` = no autocast."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]


def _prepare_backbone(model: nn.Module, cfg: FineTuningTrainParams) -> None:
    """Make the backbone trainable; ``bn_mode='frozen'`` freezes BatchNorm affine parameters."""
    for p in model.parameters():
        p.requires_grad_(True)
    if cfg.bn_mode == "frozen":
        for bn in _batchnorms(model):
            for p in bn.parameters():
                p.requires_grad_(False)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)


def set_train_mode(model: nn.Module, bn_mode: str) -> None:
    """Training mode; BatchNorm layers keep their running statistics unless ``bn_mode='train'``."""
    model.train()
    if bn_mode != "train":
        for bn in _batchnorms(model):
            bn.eval()


def model_input(
    rep: Representation, batch_uint8: torch.Tensor, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """uint8 CHW batch -> normalised float input on ``device``."""
    x = rep.normalise(batch_uint8.to(device, non_blocking=True))
    return x if channels_last else x.contiguous()


# --------------------------------------------------------------------------- training state and one epoch


@dataclass
class TrainingState:
    """Everything that is trained or stepped."""

    rep: Representation
    h_std: nn.Linear
    h_interp: InterpretationHead
    opt: torch.optim.AdamW
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler


def new_state(rep: Representation, cfg: FineTuningTrainParams, m: int, num_classes: int, n_train: int,
               device: torch.device) -> TrainingState:
    _prepare_backbone(rep.model, cfg)
    h_std, h_interp = init_heads(rep.dim, m, num_classes, cfg.seed)
    h_std, h_interp = h_std.to(device), h_interp.to(device)
    opt, sched = make_optimizer(rep.model, (h_std, h_interp), cfg, n_train)
    scaler = torch.amp.GradScaler(device.type, enabled=_amp_dtype(device, cfg) == torch.float16)
    return TrainingState(rep=rep, h_std=h_std, h_interp=h_interp, opt=opt, sched=sched, scaler=scaler)


def train_epoch(
    state: TrainingState,
    dataset: LabelledImages,
    concepts: torch.Tensor | None,
    k: int,
    cfg: FineTuningTrainParams,
    device: torch.device,
    epoch: int,
    progress: bool,
) -> float:
    """One epoch over the training images; returns the mean loss per image."""
    from tqdm.auto import tqdm

    batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(derive_seed("finetune", "loader", cfg.seed, epoch)),
    )
    amp_dtype = _amp_dtype(device, cfg)
    model = state.rep.model
    set_train_mode(model, cfg.bn_mode)
    state.opt.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    bar = tqdm(total=len(batches), desc=f"fine-tune epoch {epoch}", disable=not progress, mininterval=2.0)
    for i, (xb, yb) in enumerate(loader):
        x = model_input(state.rep, xb, device, cfg.channels_last)
        y = yb.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = model(x)
            loss, _ = finetune_loss(z, y, state.h_std, state.h_interp, concepts, k, cfg.lam)
        state.scaler.scale(loss / cfg.accumulation_steps).backward()
        if (i + 1) % cfg.accumulation_steps == 0 or i + 1 == len(batches):
            state.scaler.step(state.opt)
            state.scaler.update()
            state.opt.zero_grad(set_to_none=True)
            state.sched.step()
        total += float(loss.detach()) * len(yb)
        count += len(yb)
        bar.update(1)
    bar.close()
    return total / max(count, 1)

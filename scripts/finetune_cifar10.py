"""CPU-sized study of fine-tuning with interpretability maximization on CIFAR-10 (METHOD §6).

EfficientNet-Lite0 (offline ImageNet weights) at a small input size is fine-tuned on a stratified
subset of the CIFAR-10 training JPEGs with λ ∈ {0, 1} (λ = 0 is the cross-entropy-only control)
over several seeds; the representation is scored (linear probe accuracy, IIS, chance-corrected
IIS) before fine-tuning (epoch 0) and after the last epoch with prototype concepts (4 × 4 patches
of 10 training images per class, M of them) re-embedded by the current backbone. Prints a
markdown table (mean ± std over seeds) and writes per-epoch records as CSV.

Usage:
    python scripts/finetune_cifar10.py [--per-class 400] [--epochs 3] [--seeds 0 1 2] [--lams 0 1]
    python scripts/finetune_cifar10.py --quick     # a tiny run (minutes) to check the setup
Checkpoints go to --out/<run>/ (runs resume when restarted); by default only the last epoch's
checkpoint and backbone.safetensors of each run are kept.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from iis_study.core.representations.backbones import BackboneParams
from iis_study.core.concepts.elements import patch_elements
from iis_study.core.concepts.vectors import prototype_indices
from iis_study.core.data import ImageSet, load_dataset, stratified_split
from iis_study.core.finetune import FineTuningTrainParams, finetune, list_checkpoints, prototype_images
from iis_study.core.heads import SweepParams

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
logger = logging.getLogger("finetune_cifar10")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(CIFAR), help="ImageFolder root of the CIFAR-10 JPEGs")
    ap.add_argument("--out", default=str(ROOT / "data" / "07_model_output" / "finetune_cifar10"))
    ap.add_argument("--per-class", type=int, default=400, help="images per class before the 60/20/20 split")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lams", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--m", type=int, default=200)
    ap.add_argument("--sparsity", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr-backbone", type=float, default=1e-4)
    ap.add_argument("--lr-heads", type=float, default=1e-3)
    ap.add_argument("--bn-mode", default="eval", choices=["train", "eval", "frozen"])
    ap.add_argument("--sweep-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sweep-epochs", type=int, default=30)
    ap.add_argument("--sources-per-class", type=int, default=10,
                    help="images per class cut into concept patches")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--keep-all", action="store_true", help="keep every epoch checkpoint")
    ap.add_argument("--quick", action="store_true", help="tiny run: 12 images/class, 1 epoch, 1 seed, M=40")
    args = ap.parse_args()
    if args.quick:
        args.per_class, args.epochs, args.seeds, args.m = 12, 1, [0], 40
        args.sources_per_class, args.sweep_epochs, args.input_size = 3, 10, 32
    return args


def load_splits(root: str, per_class: int) -> tuple[dict[str, ImageSet], int]:
    """Stratified 60/20/20 train/val/test subsets of ``per_class`` images per class."""
    ds = load_dataset({"kind": "imagefolder", "root": root})
    split = stratified_split(ds.labels, (0.6, 0.2, 0.2), seed=0, max_per_class=per_class)
    images = {s: ds.subset(split.loc[split.split == s, "index"].to_numpy()) for s in ("train", "val", "test")}
    return images, len(ds.classes)


def concept_elements(train: ImageSet, per_class: int, size: int) -> np.ndarray:
    """4 x 4 patches of the first ``per_class`` training images of every class."""
    labels = np.asarray(train.labels)
    ids = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return patch_elements([train.load(int(i)) for i in ids], ids.tolist(), grid=4, size=size).images


def prune_checkpoints(run_dir: Path) -> None:
    """Keep only the last epoch checkpoint of a finished run (they are ~40 MB each)."""
    found = list_checkpoints(run_dir)
    for _, path in found[:-1]:
        path.unlink()


def fmt(values: pd.Series) -> str:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


def table(records: pd.DataFrame, last: int) -> str:
    """Markdown table: one row per λ, before (epoch 0) and after (last epoch), mean ± std over seeds."""
    cols = [
        ("probe acc (test)", "accuracy_linear_probe"),
        ("IIS", "iis"),
        ("IIS chance-corr.", "iis_chance_corrected"),
    ]
    head = ["λ", "n seeds"]
    for name, _ in cols:
        head += [f"{name} before", f"{name} after"]
    head += ["h_std acc (test) after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lam, grp in records.groupby("lam"):
        before, after = grp[grp.epoch == 0], grp[grp.epoch == last]
        row = [f"{lam:g}", str(grp.seed.nunique())]
        for _, key in cols:
            row += [fmt(before[key]), fmt(after[key])]
        row += [fmt(after["accuracy_test"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("iis_study.core.heads", "iis_study.core.concepts", "iis_study.core.scoring.scores"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    images, num_classes = load_splits(args.root, args.per_class)
    elements = concept_elements(images["train"], args.sources_per_class, args.input_size)
    elements = prototype_images(elements, prototype_indices(len(elements), args.m, 0))  # M prototypes, seed 0
    logger.info("splits %s, %d prototype elements, %d classes",
                {k: len(v) for k, v in images.items()}, len(elements), num_classes)
    spec = BackboneParams(
        name="lite0", model="tf_efficientnet_lite0", weights="offline", input_size=args.input_size
    )
    sweep_cfg = SweepParams(seeds=tuple(args.sweep_seeds), epochs=args.sweep_epochs, batch_size=1024)
    out = Path(args.out)
    rows = []
    for lam in args.lams:
        for seed in args.seeds:
            cfg = FineTuningTrainParams(
                lam=lam, sparsity=args.sparsity, epochs=args.epochs, batch_size=args.batch_size,
                lr_backbone=args.lr_backbone, lr_heads=args.lr_heads, bn_mode=args.bn_mode, seed=seed,
                num_workers=args.workers, eval_epochs=(0, args.epochs),
            )
            run_dir = out / f"lam{lam:g}_seed{seed}_pc{args.per_class}_px{args.input_size}_e{args.epochs}"
            t = time.perf_counter()
            history = finetune(spec, images, elements, cfg, run_dir, sweep_cfg, num_classes, progress=False)
            logger.info("run λ=%g seed=%d done in %.0f s", lam, seed, time.perf_counter() - t)
            if not args.keep_all:
                prune_checkpoints(run_dir)
            rows.extend(r.to_dict() for r in history)
    records = pd.DataFrame(rows)
    out.mkdir(parents=True, exist_ok=True)
    records.to_csv(out / "records.csv", index=False)
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nCIFAR-10, Lite0 offline @ {args.input_size}px, {args.per_class} img/class "
          f"({len(images['train'])}/{len(images['val'])}/{len(images['test'])} train/val/test), "
          f"{args.epochs} epochs, M={args.m}, s={args.sparsity}, bn_mode={args.bn_mode}, "
          f"seeds {args.seeds}; {minutes:.1f} min\n")
    print(table(records, args.epochs))
    print(f"\nper-epoch records: {out / 'records.csv'}")


if __name__ == "__main__":
    main()

"""Benchmark: raw backbone forward throughput vs the pipeline's extraction throughput.

Both are measured in one run over the same images: the raw number times only
``model(normalise(batch))`` on pre-decoded, pre-resized uint8 batches held in memory; the
pipeline number times :func:`iis_study.core.representations.features.extract` end to end (file decoding and
resizing in DataLoader workers, normalisation, forward, copies). The ratio says how much of the
model's speed the pipeline keeps (target >= 0.85).

Usage: python scripts/bench_extraction.py [--images N] [--size PX] [--model NAME] [--workers W]
Uses ../shared/datasets/cifar10/train (JPEG files) when present, else the digits (in memory).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from iis_study.core.representations.backbones import build
from iis_study.core.data import load_dataset
from iis_study.core.representations.features import extract

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    if CIFAR.is_dir():
        ds = load_dataset({"kind": "imagefolder", "root": str(CIFAR)})
        source = f"CIFAR-10 JPEGs ({CIFAR})"
    else:
        ds = load_dataset({"kind": "digits"})
        source = "digits (in memory)"
    rng = np.random.default_rng(0)
    ds = ds.subset(np.sort(rng.choice(len(ds), size=min(args.images, len(ds)), replace=False)))
    rep = build({"model": args.model, "weights": "offline", "input_size": args.size}, name="bench", device=args.device)

    # pre-decoded batches for the raw forward measurement (decode cost excluded)
    arrays = np.stack(
        [np.asarray(Image.fromarray(ds.load(i)).resize((args.size, args.size), Image.BICUBIC)) for i in range(len(ds))]
    )
    batches = [torch.from_numpy(arrays[i : i + args.batch]).permute(0, 3, 1, 2).contiguous() for i in range(0, len(ds), args.batch)]
    dev = torch.device(args.device)

    def raw() -> float:
        t0 = time.perf_counter()
        for b in batches:
            b = b.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                rep.forward_uint8(b).float().cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return len(ds) / (time.perf_counter() - t0)

    def pipeline() -> float:
        t0 = time.perf_counter()
        extract(rep, ds, batch_size=args.batch, num_workers=args.workers, progress=False)
        return len(ds) / (time.perf_counter() - t0)

    raw()  # warm-up (allocator, oneDNN/cuDNN kernel selection)
    pipeline()
    r, p = [], []
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        r.append(raw())
        p.append(pipeline())
    r_best, p_best = max(r), max(p)
    print(f"source: {source}; {len(ds)} images at {args.size}px; {args.model}; batch {args.batch}; device {args.device}; "
          f"torch threads {torch.get_num_threads()}")
    print("| measurement | images/s |")
    print("|---|---|")
    print(f"| raw forward (pre-decoded batches) | {r_best:.1f} |")
    print(f"| pipeline extraction (decode + resize + forward) | {p_best:.1f} |")
    print(f"| ratio pipeline / raw | {p_best / r_best:.3f} |")


if __name__ == "__main__":
    main()

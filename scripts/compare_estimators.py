"""The convex estimator beside the Adam heads: a side-by-side table and the Spearman correlation.

Reads the current run's ``data/08_reporting/iis_scores.csv`` (the convex estimator) and the
representation table that ``scripts/study_tables.py`` wrote for an Adam run, taken from a docs file
at a git revision (by default docs/cifar10_study.md at 5d8afc7, the last version with Adam heads),
and prints one row per representation (probe accuracy and IIS of each concept type under both) and
the Spearman correlation between the two estimators' IIS, over all representations and over the
pretrained ones (the convex column is draw 0's IIS, the concept set the Adam run scored). ``--update FILE`` writes the table and the correlations between the
``<!-- study_tables:PREFIX-estimators -->`` markers of FILE; ``--check FILE`` exits 1 when they differ.

Usage::

    python scripts/compare_estimators.py [PROJECT_DIR] --update docs/cifar10_study.md --prefix cifar10
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd

DATA_DIR = "data"  # the study's data folder inside the project (--data-dir: data/<env> for an environment)
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from study_tables import replace_marked  # noqa: E402


def adam_table(revision: str, doc: str, prefix: str) -> dict[str, tuple[float, float, float]]:
    """``representation -> (A_std, IIS prototype, IIS cluster)`` from the marked table of ``doc`` at ``revision``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{doc}"], capture_output=True, text=True,
                          check=True).stdout
    block = text.split(f"<!-- study_tables:{prefix}-representations -->")[1].split("<!--")[0]
    out = {}
    for line in block.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        out[cells[0]] = (float(cells[2].split()[0]), float(cells[5].split()[0]), float(cells[7].split()[0]))
    return out


def compare(project: Path, adam: dict[str, tuple[float, float, float]]) -> str:
    scores = pd.read_csv(project / DATA_DIR / "08_reporting" / "iis_scores.csv")
    # draw 0's IIS: the concepts the Adam run scored (the mean over concept draws is in iis_scores.csv's `iis`)
    value = "iis_draw0" if "iis_draw0" in scores else "iis"
    wide = scores.pivot_table(index="representation", columns="concept_type", values=value, sort=False)
    first = scores.drop_duplicates("representation").set_index("representation")
    lines = ["| representation | A_std convex | A_std adam | IIS prototype convex | adam | IIS cluster convex | adam |",
             "|---|---|---|---|---|---|---|"]
    for rep in wide.index:
        a = adam[rep]
        lines.append(f"| {rep} | {first.loc[rep, 'accuracy_linear_probe']:.3f} | {a[0]:.3f} | "
                     f"{wide.loc[rep, 'prototype']:.3f} | {a[1]:.3f} | {wide.loc[rep, 'cluster']:.3f} | {a[2]:.3f} |")
    lines.append("")
    pretrained = first["weights"] != "random"
    for ctype, col in (("prototype", 1), ("cluster", 2)):
        ours = wide[ctype]
        theirs = pd.Series({rep: adam[rep][col] for rep in wide.index})
        r_all = stats.spearmanr(ours, theirs)[0]
        keep = pretrained.reindex(wide.index)
        r_pre = stats.spearmanr(ours[keep], theirs[keep])[0]
        diff = (ours - theirs).mean()
        lines.append(f"Spearman convex vs adam, {ctype}: {r_all:.2f} over {len(ours)} representations, {r_pre:.2f} "
                     f"over the {int(keep.sum())} pretrained; mean difference (convex − adam) {diff:+.3f}.")
        lines.append("")
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("project", nargs="?", default=str(ROOT))
    ap.add_argument("--revision", default="5d8afc7")
    ap.add_argument("--doc", default="docs/cifar10_study.md")
    ap.add_argument("--prefix", default="cifar10")
    ap.add_argument("--data-dir", default="data/cifar10", help="the study's data folder inside the project")
    ap.add_argument("--update", metavar="FILE")
    ap.add_argument("--check", metavar="FILE")
    args = ap.parse_args()
    global DATA_DIR
    DATA_DIR = args.data_dir
    table = compare(Path(args.project), adam_table(args.revision, args.doc, args.prefix))
    target = args.update or args.check
    if not target:
        print(table)
        return
    path = Path(target)
    text = path.read_text()
    fresh = replace_marked(text, f"{args.prefix}-estimators", table)
    if args.update:
        path.write_text(fresh)
        print(f"{path}: comparison updated" if fresh != text else f"{path}: comparison already current")
    elif fresh != text:
        print(f"{path}: the comparison differs from the run in {args.project}")
        sys.exit(1)
    else:
        print(f"{path}: the comparison matches the run in {args.project}")


if __name__ == "__main__":
    main()

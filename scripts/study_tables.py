"""Markdown tables of a finished study, from its output files (for docs and issue notes).

Reads ``data/08_reporting/iis_scores.csv``, ``data/08_reporting/correlation_scopes.json`` and the
``data/04_feature/<backbone>/feature_info.json`` files of a project and prints

  * one row per representation: feature dimension, probe accuracy (mean ± std over seeds), and per
    concept type the IIS with its bootstrap interval and the chance-corrected IIS;
  * one row per (scope, group, score, method): the correlation of each concept type's score with
    probe accuracy, with its bootstrap interval over representations.

Usage::

    python scripts/study_tables.py [PROJECT_DIR]     # default: this project
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd


def _f(x: float) -> str:
    return f"{x:.3f}"


def representation_table(project: Path) -> str:
    scores = pd.read_csv(project / "data" / "08_reporting" / "iis_scores.csv")
    label = "representation" if "representation" in scores else "backbone"
    types = list(pd.unique(scores["concept_type"]))
    head = ["representation", "D", "A_std (test)", "steps", "probe: val / L-BFGS ref., converged"]
    for t in types:
        head += [f"IIS {t} [95% CI]", f"IIS_cc {t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in scores.groupby(label, sort=False):
        first = rows.iloc[0]
        info = project / "data" / "04_feature" / str(first["backbone"]) / "feature_info.json"
        dim = json.loads(info.read_text())["dim"] if info.is_file() else "?"
        cells = [str(name), str(dim), f"{_f(first['accuracy_linear_probe'])} ± {_f(first['accuracy_linear_probe_std'])}"]
        if "probe_converged" in rows:
            conv = "yes" if rows["probe_converged"].astype(bool).all() else "**no**"
            cells += [str(int(first["steps"])), f"{_f(first['probe_val_acc'])} / {_f(first['reference_val_acc'])}, {conv}"]
        else:
            cells += ["", ""]
        by_type = rows.set_index("concept_type")
        for t in types:
            if t in by_type.index:
                r = by_type.loc[t]
                flat = "" if "heads_converged" not in r or bool(r["heads_converged"]) else " †"
                cells += [f"{_f(r['iis'])} [{_f(r['iis_ci_low'])}, {_f(r['iis_ci_high'])}]{flat}", _f(r["iis_chance_corrected"])]
            else:
                cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def correlation_table(project: Path, methods: tuple[str, ...] = ("pearson", "spearman")) -> str:
    scopes = json.loads((project / "data" / "08_reporting" / "correlation_scopes.json").read_text())
    groups = scopes["groups"]
    types = list(groups[0]["correlation"])
    head = ["scope", "group", "n", "score", "method", *types]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        scores = list(g["correlation"][types[0]])
        for score in scores:
            for method in methods:
                cells = [g["scope"], g["group"], str(g["n_representations"]), score, method]
                for t in types:
                    c = g["correlation"][t][score][method]
                    cells.append(f"{c['r']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]")
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args()
    project = Path(args.project)
    print(representation_table(project))
    print()
    print(correlation_table(project))


if __name__ == "__main__":
    main()

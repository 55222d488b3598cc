"""Markdown tables of a finished study, from its output files (for docs and issue notes).

Reads ``data/08_reporting/iis_scores.csv``, ``data/08_reporting/correlation_scopes.json`` and the
``data/04_feature/<backbone>/feature_info.json`` files of a project and prints

  * one row per representation: feature dimension, probe accuracy (mean ± std over seeds), and per
    concept type the IIS with its bootstrap interval and the chance-corrected IIS;
  * one row per (scope, group, score, method): the correlation of each concept type's score with
    probe accuracy, its bootstrap interval over representations (whole families; none with fewer than
    5: "too few representations") and its permutation p-value; the ranking stability over concept draws;
  * one row per (representation, concept type): the IIS over concept draws, its spread by source, and
    each null's IIS with the excess over it (``-nulls`` block, where the page has one);
  * one row per (representation, concept type): the IIS beside NEC / ANEC, the weight sparsity of the same
    concepts, with each null's ANEC-avg (``-anec`` block);
  * one row per (concept type, scope) of the specification curve: is the sign of r robust to the analysis
    choices, r's range, each choice's main effect, the representations with leverage (``-specification`` block).

Usage::

    python scripts/study_tables.py [PROJECT_DIR]     # default: this project
    python scripts/study_tables.py --update docs/results.md --prefix default
    python scripts/study_tables.py --check docs/results.md --prefix default

``--update FILE`` rewrites the text between ``<!-- study_tables:PREFIX-representations -->`` and
``<!-- /study_tables:PREFIX-representations -->`` (and the same for ``-correlations``) with the
tables of the project's finished run; ``--check FILE`` exits 1 when the file differs from them
(run it after ``make run``: the default study's tables in docs/results.md must be those numbers).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd

DATA_DIR = "data"  # the study's data folder inside the project (--data-dir: data/<env> for an environment)


def _f(x: float) -> str:
    return f"{x:.3f}"


def representation_table(project: Path) -> str:
    scores = pd.read_csv(project / DATA_DIR / "08_reporting" / "iis_scores.csv")
    label = "representation" if "representation" in scores else "backbone"
    types = list(pd.unique(scores["concept_type"]))
    convex = "estimator" in scores and (scores["estimator"] == "convex").all()
    head = ["representation", "D", "A_std (test)"]
    head += (["certified (largest gradient, iterations)"] if convex
             else ["steps", "probe: val / L-BFGS ref., converged"])
    for t in types:
        head += [f"IIS {t} [95% CI]", f"IIS_cc {t}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in scores.groupby(label, sort=False):
        first = rows.iloc[0]
        info = project / DATA_DIR / "04_feature" / str(first["backbone"]) / "feature_info.json"
        dim = json.loads(info.read_text())["dim"] if info.is_file() else "?"
        std = first["accuracy_linear_probe_std"]
        cells = [str(name), str(dim), _f(first["accuracy_linear_probe"]) + ("" if pd.isna(std) else f" ± {_f(std)}")]
        if convex:
            ok = "yes" if rows["certified"].astype(bool).all() else "**no**"
            cells += [f"{ok} ({rows['max_grad'].max():.1e}, {int(rows['iterations'].max())})"]
        elif "probe_converged" in rows:
            conv = "yes" if rows["probe_converged"].astype(bool).all() else "**no**"
            steps = rows["steps"].dropna() if "steps" in rows else pd.Series(dtype=float)  # adam rows only
            cells += [str(int(steps.iloc[0])) if len(steps) else "",
                      f"{_f(first['probe_val_acc'])} / {_f(first['reference_val_acc'])}, {conv}"]
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


def _coef(entry: dict) -> str:
    """``r [interval] (p_perm)``; no interval where the study has too few representations (or families)."""
    def num(v: object, fmt: str) -> str:
        return "n/a" if v is None else format(float(v), fmt)

    ci = (f" [{num(entry['ci_low'], '+.2f')}, {num(entry['ci_high'], '+.2f')}]"
          if entry.get("ci_low") is not None else "")
    p = f", p_perm {num(entry['p_perm'], '.3f')}" if "p_perm" in entry else ""
    return f"{num(entry['r'], '+.2f')}{ci}{p}"


def correlation_table(project: Path, methods: tuple[str, ...] = ("pearson", "spearman")) -> str:
    """One row per (scope, group, score, method): each concept type's ``r [interval], p_perm``; the interval
    column says how it was made ("too few representations": none)."""
    scopes = json.loads((project / DATA_DIR / "08_reporting" / "correlation_scopes.json").read_text())
    groups = scopes["groups"]
    types = list(groups[0]["correlation"])
    head = ["scope", "group", "n", "score", "method", *types, "interval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        scores = list(dict.fromkeys(sc for t in types for sc in g["correlation"].get(t, {})))
        for score in scores:
            entries = [g["correlation"].get(t, {}).get(score) for t in types]
            intervals = sorted({str(e.get("interval", "bootstrap over representations")) for e in entries if e})
            for method in methods:
                cells = [g["scope"], g["group"], str(g["n_representations"]), score, method]
                cells += [_coef(e[method]) if e else "" for e in entries]
                cells.append(" / ".join(intervals))
                lines.append("| " + " | ".join(cells) + " |")
    for g in groups:
        for t, stab in (g.get("ranking_stability") or {}).items():
            if stab.get("kendall_tau_mean") is not None and g["scope"] == "all":
                lines.append("")
                lines.append(
                    f"Ranking stability ({t}, {g['group']}): Kendall τ between the IIS rankings of the "
                    f"{stab['n_pairs']} pairs of concept draws: mean {stab['kendall_tau_mean']:.2f} "
                    f"(range {stab['kendall_tau_min']:.2f} to {stab['kendall_tau_max']:.2f}), {stab['n']} representations."
                )
    return "\n".join(lines)


def nulls_table(project: Path) -> str:
    """One row per (representation, concept type): the IIS over concept draws with its two-level interval,
    the spread by source, and each null's IIS with the excess over it and the excess's interval."""
    scores = pd.read_csv(project / DATA_DIR / "08_reporting" / "iis_scores.csv")
    label = "representation" if "representation" in scores else "backbone"
    kinds = [k for k in ("random", "rotated", "gaussian") if f"iis_null_{k}" in scores]
    level = f"{100 * float(scores['ci'].iloc[0]):g}%" if "ci" in scores else "95%"
    head = ["representation", "concepts", "A_std", f"IIS (mean of draws) [{level} CI]",
            "sd: test images (of the mean) / one concept draw", "draw share of the variance"]
    head += [f"null {k}: IIS, excess [{level} CI]" for k in kinds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in scores.itertuples(index=False):
        d = r._asdict()
        if "n_draws" not in d or pd.isna(d.get("n_draws")):
            continue
        cells = [str(d[label]), str(d["concept_type"]), _f(d["accuracy_linear_probe"]),
                 f"{_f(d['iis'])} [{_f(d['iis_ci_low'])}, {_f(d['iis_ci_high'])}]",
                 f"{_f(d['iis_sd_test'])} / {_f(d['iis_sd_draw'])}", f"{d['iis_share_draw']:.2f}"]
        for k in kinds:
            if pd.isna(d.get(f"iis_null_{k}")):
                cells.append("")
                continue
            ex, lo, hi = d[f"iis_excess_{k}"], d[f"iis_excess_{k}_ci_low"], d[f"iis_excess_{k}_ci_high"]
            mark = "**" if lo > 0 or hi < 0 else ""
            cells.append(f"{_f(d[f'iis_null_{k}'])}, {mark}{ex:+.3f}{mark} [{lo:+.3f}, {hi:+.3f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def anec_table(project: Path) -> str:
    """One row per (representation, concept type) with a weight-sparsity path: the IIS (activation sparsity) and
    its excess over random directions beside ANEC-k at the first NEC level and ANEC-avg (weight sparsity, the
    concept-bottleneck papers' measure), each null's ANEC-avg with the excess over it, and whether every path
    point was certified."""
    scores = pd.read_csv(project / DATA_DIR / "08_reporting" / "iis_scores.csv")
    if "anec_avg" not in scores:
        return "| no weight-sparsity numbers in this run (weight_sparsity.enabled: false) |\n|---|"
    label = "representation" if "representation" in scores else "backbone"
    first = next(c for c in scores if re.fullmatch(r"anec_[0-9.]+", c))
    kinds = [k for k in ("random", "rotated", "gaussian") if f"anec_avg_null_{k}" in scores]
    excess = "iis_excess_random" in scores
    head = ["representation", "concepts", "A_std", "IIS"] + (["IIS excess over random"] if excess else [])
    head += [f"ANEC-{first[5:]}", "ANEC-avg"] + [f"null {k}: ANEC-avg, excess" for k in kinds] + ["path certified"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in scores.itertuples(index=False):
        d = r._asdict()
        if pd.isna(d.get("anec_avg")):
            continue
        cells = [str(d[label]), str(d["concept_type"]), _f(d["accuracy_linear_probe"]), _f(d["iis"])]
        if excess:
            cells.append(f"{d['iis_excess_random']:+.3f}")
        sd = d.get("anec_avg_sd_draw")
        cells += [_f(d[first]), _f(d["anec_avg"]) + ("" if pd.isna(sd) else f" ± {_f(sd)}")]
        for k in kinds:
            null = d.get(f"anec_avg_null_{k}")
            cells.append("" if pd.isna(null) else f"{_f(null)}, {d[f'anec_avg_excess_{k}']:+.3f}")
        cells.append("yes" if str(d.get("anec_certified")).lower() == "true" else "**no**")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def specification_table(project: Path) -> str:
    """The specification curve's verdict (``specification_curve.json``): per concept type and scope, whether the
    sign of Pearson r (accuracy, score) survives every specification, r's range and the headline's r, each knob's
    main effect (the mean r at each of its levels) and the representations whose removal moves r by more than the
    leverage threshold."""
    path = project / DATA_DIR / "08_reporting" / "specification_curve.json"
    if not path.is_file():
        return "No specification curve in this run (specification_curve.json is missing)."
    record = json.loads(path.read_text())
    if not record.get("verdicts"):
        return "No specification curve in this run (" + str(record.get("note", "specification.enabled: false")) + ")."
    knobs = record["knobs"]
    lines = [
        f"Specifications: heads' L2 grid {' / '.join(f'{k} {v}' for k, v in knobs['head_grid'].items())}; probe's "
        f"grid {' / '.join(knobs['probe_grid'])}; probe inputs {', '.join(knobs['probe_inputs'])}; x axis "
        f"{', '.join(knobs['accuracy'])} accuracy; score {', '.join(knobs['score'])}. Headline specification: "
        + (", ".join(f"{k} {v}" for k, v in record["headline_specification"].items())
           if record.get("headline_specification") else "none (no grid equals sweep.l2_grid)")
        + f". Near chance: {record['near_chance_rule']}.",
        "",
        "| concepts | scope | n | verdict (Pearson r) | r range | headline r, p_perm | Spearman: + / − of n |"
        " main effects on r (mean r per level) | within each score: + / − (r range) | leverage > "
        + f"{record.get('leverage', 0.2):g} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in record["verdicts"]:
        if not v.get("n_specifications"):
            lines.append(f"| {v['concept_type']} | {v['scope']} | {v['n_representations']} | {v['verdict']} | | | | | | |")
            continue
        h = v.get("headline") or {}
        head = (f"{h['pearson_r']:+.2f}, {h['pearson_p_perm']:.3f}" if h.get("pearson_r") is not None else "n/a")
        effects = "; ".join(
            f"{k} {_num(e['effect'], '.2f')} (" + ", ".join(f"{lv} {_num(m)}" for lv, m in e["mean_r"].items()) + ")"
            for k, e in sorted(v["main_effects"].items(), key=lambda kv: -(kv[1]["effect"] or 0.0)))
        flagged = ", ".join(f"{x['representation']} {x['delta']:+.2f}" for x in v["leverage"] if x["flagged"]) or "none"
        sp = v["spearman"]
        lines.append(f"| {v['concept_type']} | {v['scope']} | {v['n_representations']} | {v['verdict']} | "
                     f"{_num(v['r_min'])} to {_num(v['r_max'])} | {head} | {sp['n_positive']} / {sp['n_negative']} of "
                     f"{sp['n']} | {effects} | {_signs_by_score(v)} | {flagged} |")
    lines += ["", f"Headline scope ({record['headline_scope']}): " + "; ".join(
        f"{t}: {text}" for t, text in record["headline_verdict"].items()) + "."]
    return "\n".join(lines)


def _signs_by_score(verdict: dict) -> str:
    """Each score's sign counts over the other knobs and its r range (``by_score``; n/a in a record without it)."""
    parts = [f"{score} {b['n_positive']}+/{b['n_negative']}− ({_num(b['r_min'])} to {_num(b['r_max'])})"
             for score, b in verdict.get("by_score", {}).items()]
    return ", ".join(parts) or "n/a"


def _num(v, spec: str = "+.2f") -> str:
    """A number of the specification record (None where undefined: strict JSON) formatted, or ``n/a``."""
    return "n/a" if v is None else format(float(v), spec)


def verdict_text(project: Path) -> str:
    """The verdict beside the headline, one line per concept type (the README's and the docs' headline sentence):
    the headline scope's verdict, r's range over the specifications and the headline's r."""
    path = project / DATA_DIR / "08_reporting" / "specification_curve.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    lines = []
    for v in record.get("verdicts", []):
        if v["scope"] != record.get("headline_scope"):
            continue
        if not v.get("n_specifications"):
            lines.append(f"- {v['concept_type']} ({v['scope']}, {v['n_representations']} representations): {v['verdict']}")
            continue
        h = (v.get("headline") or {}).get("pearson_r")
        lines.append(f"- {v['concept_type']} ({v['scope']}, {v['n_representations']} representations): **{v['verdict']}**; "
                     f"Pearson r from {_num(v['r_min'])} to {_num(v['r_max'])} over the specifications "
                     f"(the study's own analysis: {_num(h)}); within each score, over the other knobs: "
                     f"{_signs_by_score(v)}.")
    return "\n".join(lines) or "No specification curve in this run."


def replace_marked(text: str, name: str, table: str) -> str:
    """``text`` with the block between the ``study_tables:<name>`` markers replaced by ``table``."""
    pattern = re.compile(rf"(<!-- study_tables:{re.escape(name)} -->\n)(?:.*?\n)?(<!-- /study_tables:{re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no <!-- study_tables:{name} --> ... <!-- /study_tables:{name} --> block in the file")
    return pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), text)


def sync_block(path: Path, marker: str, text: str, update: bool) -> None:
    """Rewrite (``update``) or check the text between ``<!-- marker -->`` and ``<!-- /marker -->`` of ``path``;
    a check that differs exits 1."""
    old = path.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(marker)} -->\n)(?:.*?\n)?(<!-- /{re.escape(marker)} -->)", re.S)
    if not pattern.search(old):
        raise SystemExit(f"{path}: no <!-- {marker} --> block")
    new = pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), old)
    if update:
        path.write_text(new)
        print(f"{path}: {marker} block {'updated' if new != old else 'already current'}")
    elif new != old:
        print(f"{path}: the {marker} block differs from a fresh run (rerun with --update)")
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", nargs="?", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--update", metavar="FILE", help="rewrite the marked table blocks of FILE")
    parser.add_argument("--check", metavar="FILE", help="exit 1 if the marked table blocks of FILE differ")
    parser.add_argument("--prefix", default="default", help="marker prefix (default: default)")
    parser.add_argument("--data-dir", default="data", help="the study's data folder (data/<env> for an environment)")
    args = parser.parse_args()
    global DATA_DIR
    DATA_DIR = args.data_dir
    project = Path(args.project)
    tables = {"representations": representation_table(project), "correlations": correlation_table(project),
              "nulls": nulls_table(project), "anec": anec_table(project),
              "specification": specification_table(project), "verdict": verdict_text(project)}
    target = args.update or args.check
    if not target:
        print(tables["representations"])
        print()
        print(tables["correlations"])
        print()
        print(tables["nulls"])
        print()
        print(tables["anec"])
        print()
        print(tables["specification"])
        return
    path = Path(target)
    text = path.read_text()
    fresh = text
    present = [kind for kind in tables if f"<!-- study_tables:{args.prefix}-{kind} -->" in text]
    if not present:
        raise SystemExit(f"{path}: no <!-- study_tables:{args.prefix}-... --> block")
    for kind in present:  # a page holds some of the blocks
        fresh = replace_marked(fresh, f"{args.prefix}-{kind}", tables[kind])
    if args.update:
        path.write_text(fresh)
        print(f"{path}: tables updated" if fresh != text else f"{path}: tables already current")
    elif fresh != text:
        print(f"{path}: tables differ from the run in {project} (rerun with --update)")
        sys.exit(1)
    else:
        print(f"{path}: tables match the run in {project}")


if __name__ == "__main__":
    main()

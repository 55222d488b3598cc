"""The self-test of the metric (docs/calibration.md): synthetic representations in which the share of class
information lying along the concept directions is a known knob (``iis_study.core.scoring.selftest``).

Prints one row per share: the probe's test accuracy, the IIS of the concepts, the random-direction null
and the excess over it with its interval, and the same for concepts that are themselves random directions;
writes the curve to ``docs/img/self_test.png``; ``--update`` / ``--check`` rewrite or check the table
between the ``<!-- self_test -->`` markers of docs/calibration.md.

Usage::

    PYTHONPATH=src python scripts/self_test.py
    PYTHONPATH=src python scripts/self_test.py --update docs/calibration.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from study_tables import sync_block  # scripts/ is on sys.path when a script runs

import numpy as np
from scipy import stats

from iis_study.core.scoring.selftest import self_test

ROOT = Path(__file__).resolve().parents[1]
SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)


def table(rows) -> str:
    head = ["share along concepts", "probe acc.", "IIS", "null (random)", "excess [95% CI]",
            "random concepts: IIS", "their excess [95% CI]", "certified"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows.itertuples(index=False):
        lines.append(
            f"| {r.share:.2f} | {r.probe_accuracy:.3f} | {r.iis:.3f} | {r.iis_null_random:.3f} | "
            f"{r.excess:+.3f} [{r.excess_ci_low:+.3f}, {r.excess_ci_high:+.3f}] | {r.random_concepts_iis:.3f} | "
            f"{r.random_concepts_excess:+.3f} [{r.random_concepts_excess_ci_low:+.3f}, {r.random_concepts_excess_ci_high:+.3f}] | "
            f"{'yes' if r.certified else 'no'} |"
        )
    rho = stats.spearmanr(rows["share"], rows["iis"])[0]
    lines.append("")
    lines.append(
        f"Spearman(share, IIS) = {rho:+.2f}; the random null's spread over shares: "
        f"{rows['iis_null_random'].max() - rows['iis_null_random'].min():.3f} (IIS range "
        f"{rows['iis'].max() - rows['iis'].min():.3f}); probe accuracy {rows['probe_accuracy'].min():.3f}-"
        f"{rows['probe_accuracy'].max():.3f}."
    )
    return "\n".join(lines)


def figure(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    long = rows.melt(id_vars="share", value_vars=["iis", "iis_null_random", "random_concepts_iis"],
                     var_name="what", value_name="IIS")
    long["what"] = long["what"].map({"iis": "concepts (axes)", "iis_null_random": "null: random directions",
                                     "random_concepts_iis": "concepts that are random directions"})
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    sns.lineplot(data=long, x="share", y="IIS", hue="what", marker="o", ax=ax)
    ax.set_xlabel("share of class information along the concept directions")
    ax.set_title("Self-test: the IIS follows the knob, the null does not", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", metavar="FILE")
    parser.add_argument("--check", metavar="FILE")
    args = parser.parse_args()
    rows = self_test(SHARES)
    text = table(rows)
    print(text)
    if not np.all(np.diff(rows["iis"]) > 0):
        print("the IIS does not rise monotonically with the share")
        sys.exit(1)
    target = args.update or args.check
    if not target:
        figure(rows, ROOT / "docs" / "img" / "self_test.png")
        return
    sync_block(Path(target), "self_test", text, update=bool(args.update))
    if args.update:
        figure(rows, ROOT / "docs" / "img" / "self_test.png")


if __name__ == "__main__":
    main()

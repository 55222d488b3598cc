"""Check that a refactoring left the default study's results byte-identical.

Runs the default study (``kedro run``, the digits study of ``conf/base``) twice on this machine, with the
same seeds: once on a git revision (``--before``, checked out in a temporary worktree) and once on the
working tree as it is now (tracked and untracked, not ignored, files copied to a temporary folder), each
with its own empty feature cache and MLflow store. Then compares the study's results byte for byte:

    data/08_reporting/iis_scores.csv, data/08_reporting/sparsity_curves.csv, data/08_reporting/correlation.json

Exit status 0 when all three are identical, 1 otherwise (the differing files are named). About twice the
time of ``make run`` (~10 min on a 2-core CPU). Usage::

    .venv/bin/python scripts/check_identical.py --before 9012e7b          # a revision against the working tree
    .venv/bin/python scripts/check_identical.py --before v1 --after v2     # two revisions
    .venv/bin/python scripts/check_identical.py --before 9012e7b --after-dir .   # against this tree's last run
    .venv/bin/python scripts/check_identical.py --before-dir /tmp/kept/before --after-dir .   # two finished runs

``--quick`` runs both with 2 concept draws, the random and rotated nulls and 4 of the 6 representations
(``conf/local``): the same code paths in about a fifth of the time. ``--keep`` leaves the temporary folders (their ``data/`` and logs) for inspection.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = (
    "data/08_reporting/iis_scores.csv",
    "data/08_reporting/sparsity_curves.csv",
    "data/08_reporting/correlation.json",
)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def _checkout(rev: str, dest: Path) -> None:
    """``rev`` in a detached worktree at ``dest``."""
    _git("worktree", "add", "--detach", "--force", str(dest), rev)


def _copy_tree(dest: Path) -> None:
    """The working tree as it is (tracked and untracked files that git does not ignore)."""
    files = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)


QUICK = (
    "# written by scripts/check_identical.py --quick\nconcepts:\n  draws: 2\n  nulls: [random, rotated]\n"
    "backbones:\n  lite1: null\n  lite2_random: null\n"
)


def _run_study(tree: Path, label: str, quick: bool = False) -> None:
    """``kedro run`` in ``tree`` with that tree's sources first on the path and its own MLflow store;
    ``quick``: 2 concept draws and two nulls instead of base's 3 and three (``conf/local``, which
    ``kedro run`` reads by default), 8 concept sets per representation instead of 18, and 4 of the 6
    representations (lite0, lite2, lite0_random, lite0_stage1)."""
    if quick:
        (tree / "conf" / "local").mkdir(parents=True, exist_ok=True)
        (tree / "conf" / "local" / "parameters.yml").write_text(QUICK)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "KEDRO_DISABLE_TELEMETRY": "true",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tree / 'mlflow.db'}",
    }
    env.pop("KEDRO_ENV", None)
    kedro = Path(sys.executable).with_name("kedro")
    log = tree / "check_identical.log"
    print(f"[{label}] kedro run in {tree} (log: {log})", flush=True)
    with log.open("w") as fh:
        proc = subprocess.run([str(kedro), "run"], cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"[{label}] kedro run failed (exit {proc.returncode}):\n{tail}")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def compare(before: Path, after: Path) -> list[str]:
    """The result files that differ (or are missing) between two project folders; prints a table."""
    differ = []
    for rel in RESULTS:
        a, b = before / rel, after / rel
        if not a.is_file() or not b.is_file():
            print(f"  MISSING    {rel}: before {a.is_file()}, after {b.is_file()}")
            differ.append(rel)
            continue
        same = a.read_bytes() == b.read_bytes()
        print(f"  {'identical' if same else 'DIFFERENT':10} {rel}  {_digest(a)}  {_digest(b)}")
        if not same:
            differ.append(rel)
    return differ


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="git revision run as the reference")
    ap.add_argument("--before-dir", default=None, help="use this project folder's existing data/ as the reference")
    ap.add_argument("--after", default=None, help="git revision to compare (default: the working tree)")
    ap.add_argument("--after-dir", default=None, help="compare against this project folder's existing data/ instead")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders")
    ap.add_argument("--quick", action="store_true",
                    help="2 concept draws and the random and rotated nulls (a third of the time; the same code paths)")
    args = ap.parse_args(argv)
    if not (args.before or args.before_dir):
        ap.error("give --before REV or --before-dir FOLDER")

    tmp = Path(tempfile.mkdtemp(prefix="iis-identical-"))
    before, after = tmp / "before", tmp / "after"
    try:
        if args.before_dir:
            before = Path(args.before_dir).resolve()
        else:
            _checkout(args.before, before)
            _run_study(before, f"before {args.before}", args.quick)
        if args.after_dir:
            after = Path(args.after_dir).resolve()
        else:
            if args.after:
                _checkout(args.after, after)
            else:
                _copy_tree(after)
            _run_study(after, f"after {args.after or 'working tree'}", args.quick)
        print(f"results of {args.before or args.before_dir} (before) and {args.after or args.after_dir or 'the working tree'} (after):")
        differ = compare(before, after)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            for tree in (before, tmp / "after"):
                if (tree / ".git").exists():
                    _git("worktree", "remove", "--force", str(tree))
            shutil.rmtree(tmp, ignore_errors=True)
            _git("worktree", "prune")
    if differ:
        print(f"NOT byte-identical: {', '.join(differ)}")
        return 1
    print("byte-identical: " + ", ".join(Path(r).name for r in RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())

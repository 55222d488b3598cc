"""Break the code's promises on purpose, one at a time, and report which tests catch each breakage.

Each breakage is applied to a scratch copy of the repository (``src/``, ``tests/``, ``conf/``,
``pyproject.toml``); the tests that defend it run against the copy (its ``src`` first on
``PYTHONPATH``). A breakage that no test catches is a promise without a defence. Not part of
``make test``: it takes a few minutes.

    .venv/bin/python scripts/break_promises.py            # every breakage
    .venv/bin/python scripts/break_promises.py --only naive_n_dropped
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Breakage:
    name: str
    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


BREAKAGES = (
    Breakage(
        "non_atomic_save_tensors",
        "save_tensors writes straight to the final file name (no write-then-rename)",
        "src/iis_study/core/representations/features.py",
        "    with atomic_path(path) as tmp:\n        save_file(",
        "    for tmp in (path,):\n        save_file(",
        ("tests/core/test_features.py",),
    ),
    Breakage(
        "non_atomic_save_npy",
        "atomic_save_npy writes the shard straight to its final name",
        "src/iis_study/core/representations/store.py",
        'with atomic_path(path) as tmp, open(tmp, "wb") as fh:',
        'with open(path, "wb") as fh:',
        ("tests/core/test_features.py", "tests/core/test_store.py"),
    ),
    Breakage(
        "naive_n_dropped",
        "n_dropped as the float product floor(s * M)",
        "src/iis_study/core/heads/masks.py",
        "return math.floor(Fraction(repr(s)) * int(m))",
        "return math.floor(s * int(m))",
        ("tests/core/test_heads.py", "tests/core/test_convergence.py"),
    ),
    Breakage(
        "val_test_swapped",
        "the interpretability pipeline passes test as val and val as test to the sweep",
        "src/iis_study/core/scoring/steps.py",
        'HeadsProblem(splits["train"], splits["val"], splits["test"],',
        'HeadsProblem(splits["train"], splits["test"], splits["val"],',
        ("tests/pipelines/test_study_run.py::test_val_and_test_are_wired_to_their_own_splits",),
    ),
    Breakage(
        "bootstrap_alpha_not_halved",
        "the percentile interval uses alpha = 1 - ci instead of (1 - ci) / 2",
        "src/iis_study/core/scoring/scores.py",
        "alpha = (1.0 - ci) / 2.0",
        "alpha = 1.0 - ci",
        ("tests/core/test_scores.py",),
    ),
    Breakage(
        "rotation_leaves_the_span",
        "the rotated null mixes random directions instead of the concepts (another span)",
        "src/iis_study/core/concepts/nulls.py",
        "return _unit_rows(haar_orthogonal(c.shape[0], rng) @ c)",
        "return _unit_rows(haar_orthogonal(c.shape[0], rng) @ rng.standard_normal(c.shape))",
        ("tests/core/test_calibration.py::test_rotated_concepts_span_the_same_subspace_and_keep_no_concept",),
    ),
    Breakage(
        "draw_variance_dropped",
        "the two-level interval leaves out the between-draw variance",
        "src/iis_study/core/scoring/calibration.py",
        "    df = math.inf if s2 == 0 else total**2 / ((s2 / r) ** 2 / (r - 1))",
        "    df, total = math.inf, v_test",
        ("tests/core/test_calibration.py::test_naive_nested_bootstrap_undercovers_where_the_two_level_interval_does_not",),
    ),
    Breakage(
        "permutation_one_sided",
        "the permutation p-value counts only permutations with a larger signed coefficient",
        "src/iis_study/core/scoring/inference.py",
        "hits = np.abs(coef[m]) >= np.abs(obs[m][0]) - 1e-12",
        "hits = coef[m] >= obs[m][0] - 1e-12",
        ("tests/core/test_calibration.py::test_permutation_p_equals_exact_enumeration_n6",),
    ),
    Breakage(
        "family_split",
        "the family bootstrap resamples representations, not families",
        "src/iis_study/core/scoring/inference.py",
        "return np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), size=len(clusters))])",
        "return np.concatenate(clusters)[rng.integers(0, sum(map(len, clusters)), size=sum(map(len, clusters)))]",
        ("tests/core/test_calibration.py::test_family_bootstrap_never_splits_a_family",),
    ),
)


def scratch_copy(dest: Path) -> None:
    for name in ("src", "tests", "conf", "scripts"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml",):
        shutil.copy(ROOT / name, dest / name)
    (dest / "data").mkdir()


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, list[str], float]:
    env = {**os.environ, "PYTHONPATH": str(copy / "src"), "KEDRO_DISABLE_TELEMETRY": "true"}
    t = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=copy, env=env, capture_output=True, text=True,
    )
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out.stdout, flags=re.M)
    return out.returncode, failed, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated breakage names")
    args = ap.parse_args()
    names = {b.name for b in BREAKAGES}
    wanted = set(args.only.split(",")) if args.only else names
    if wanted - names:
        raise SystemExit(f"unknown breakage(s) {sorted(wanted - names)}; known: {sorted(names)}")
    chosen = [b for b in BREAKAGES if b.name in wanted]
    rows = []
    with tempfile.TemporaryDirectory(prefix="iis-break-") as tmp:
        copy = Path(tmp) / "repo"
        scratch_copy(copy)
        # the defending tests must pass on the unbroken copy, or a "caught" below would mean nothing
        tests = tuple(sorted({t for b in chosen for t in b.tests}))
        rc, failed, dt = run_tests(copy, tests)
        print(f"baseline (nothing broken): {'pass' if rc == 0 else 'FAIL ' + ', '.join(failed)} ({dt:.0f} s)", flush=True)
        if rc != 0:
            raise SystemExit("the tests fail without any breakage: fix them first")
        for b in chosen:
            target = copy / b.file
            original = target.read_text()
            if original.count(b.old) != 1:
                raise SystemExit(f"{b.name}: the code to break was not found exactly once in {b.file}")
            target.write_text(original.replace(b.old, b.new))
            try:
                rc, failed, dt = run_tests(copy, b.tests)
            finally:
                target.write_text(original)
            # caught: tests ran and failed (exit 1), not a collection or usage error
            caught = rc == 1 and bool(failed)
            rows.append((b, caught, failed, dt))
            print(f"{b.name:<28} {'caught' if caught else 'NOT CAUGHT':<11} {dt:5.0f} s  {', '.join(failed) or '-'}",
                  flush=True)
    print()
    print("| breakage | what | caught by |")
    print("|---|---|---|")
    for b, caught, failed, _ in rows:
        print(f"| `{b.name}` | {b.what} | {', '.join(f'`{f}`' for f in failed) if caught else '**nothing**'} |")
    if not all(c for _, c, _, _ in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Where a `kedro run`'s time went, from Kedro's log file (`info.log`, written by conf/logging.yml).

    python scripts/node_times.py info.log             # the last run in the file: time per node kind, slowest nodes
    python scripts/node_times.py info.log --top 20

A node's time is from its "Running node" line to its "Completed node" line (the sequential runner logs both);
a node kind is the node's function name (``lite0.train_interpreters`` -> ``train_interpreters``). The times are
wall-clock: read them on a machine with nothing else running.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from datetime import datetime
from pathlib import Path

_STAMP = r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3})"
_RUNNING = re.compile(_STAMP + r" - \S+ - INFO - Running node: (\w+):")
_COMPLETED = re.compile(_STAMP + r" - \S+ - INFO - Completed node: (\S+)")
_START = re.compile(_STAMP + r" - \S+ - INFO - Kedro project ")


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def node_times(lines: list[str]) -> tuple[list[tuple[str, str, float]], float]:
    """``[(node, kind, seconds)]`` of the last run in ``lines`` and that run's wall time from its first log line
    to its last completed node (seconds)."""
    starts = [i for i, line in enumerate(lines) if _START.match(line)]
    lines = lines[starts[-1]:] if starts else lines
    nodes, begun, first, last = [], None, None, None
    for line in lines:
        if first is None and (m := re.match(_STAMP, line)):
            first = _time(m.group(1))
        if m := _RUNNING.match(line):
            begun = (_time(m.group(1)), m.group(2))
        elif (m := _COMPLETED.match(line)) and begun is not None:
            end = _time(m.group(1))
            nodes.append((m.group(2), begun[1], (end - begun[0]).total_seconds()))
            begun, last = None, end
    wall = (last - first).total_seconds() if first and last else 0.0
    return nodes, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="Kedro's log file (info.log)")
    ap.add_argument("--top", type=int, default=10, help="how many of the slowest nodes to list")
    args = ap.parse_args()
    if not args.log.is_file():
        raise SystemExit(f"no log file at {args.log}")
    nodes, wall = node_times(args.log.read_text(encoding="utf8", errors="replace").splitlines())
    if not nodes:
        raise SystemExit(f"{args.log}: no completed node found")
    by_kind: dict[str, list[float]] = defaultdict(list)
    for _, kind, s in nodes:
        by_kind[kind].append(s)
    total = sum(s for _, _, s in nodes)
    print(f"{len(nodes)} nodes, {total:.0f} s in nodes, {wall:.0f} s wall ({wall / 60:.1f} min) from the run's first log line\n")
    print("| node kind | nodes | total | share | slowest |")
    print("|---|---|---|---|---|")
    for kind, ss in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {kind} | {len(ss)} | {sum(ss):.0f} s | {sum(ss) / total:.0%} | {max(ss):.1f} s |")
    print(f"\nslowest {args.top} nodes:")
    for name, _, s in sorted(nodes, key=lambda t: -t[2])[: args.top]:
        print(f"  {s:7.1f} s  {name}")


if __name__ == "__main__":
    main()

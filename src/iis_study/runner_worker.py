"""The worker side of :class:`~iis_study.runners.DaskRunner`: what a Dask worker runs for one node,
and how its log records reach the main process.

A node travels to its worker as one pickled :class:`Job` (the node, its parameter values, the
dataset objects to load from and save to, the logging set-up); :func:`run_on_worker` loads the
inputs, runs the node and saves its persisted outputs there, keeping every output in the worker's
memory. While tasks run, records of the ``kedro`` and ``iis_study`` loggers are sent to the main
process as Dask events (:class:`_ToClient`), where :func:`log_forwarded_record` hands each to the
logger of the same name. Imports nothing from ``dask``/``distributed`` until a worker runs a task.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

FORWARDED_LOGGERS = ("kedro", "iis_study")


@dataclass
class Job:
    """Everything a worker needs to run one node (pickled as one object, so Dask does not look
    inside parameter values for tasks or futures)."""

    node: Any
    values: dict[str, Any] = field(default_factory=dict)  # parameters and values from hooks
    load_from: dict[str, Any] = field(default_factory=dict)  # input name -> dataset object
    upstream: dict[str, int] = field(default_factory=dict)  # input name -> index of its future
    save_to: dict[str, Any] = field(default_factory=dict)  # output name -> dataset object
    log_levels: dict[str, int] = field(default_factory=dict)  # forwarded logger -> level
    log_topic: str = ""  # the Dask event topic the run's client listens to
    torch_threads: int | None = None
    cwd: str = ""


_CWD_WARNED: set[str] = set()


class _ToClient(logging.Handler):
    """Sends a worker's log records to the main process as Dask events (as distributed's
    ``Client.forward_logging`` does; our own, because Kedro's logging set-up, run when a worker first
    imports Kedro, would remove that handler again)."""

    def __init__(self, topic: str, address: str):
        super().__init__(logging.NOTSET)
        self.topic, self.address = topic, address

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from distributed import get_worker

            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            attrs = {
                k: (v if v is None or isinstance(v, (str, int, float, bool)) else str(v))
                for k, v in record.__dict__.items()
                if k not in ("msg", "args", "exc_info", "message")
            }
            attrs.update(msg=record.getMessage(), args=None, worker=self.address)
            get_worker().log_event(self.topic, attrs)
        except Exception:  # noqa: BLE001 (logging must not break the node)
            self.handleError(record)


_FORWARDING = {"lock": threading.Lock(), "tasks": 0, "handler": None, "saved": {}}


@contextmanager
def _forward_logs(job: Job, address: str) -> Iterator[None]:
    """While tasks run on this worker, records of the forwarded loggers go to the main process
    (and only there: not also to the worker's own console and log file)."""
    state = _FORWARDING
    with state["lock"]:
        if state["tasks"] == 0 and job.log_topic:
            handler = state["handler"] = _ToClient(job.log_topic, address)
            for name, level in job.log_levels.items():
                logger = logging.getLogger(name)
                state["saved"][name] = (logger.level, logger.propagate)
                logger.setLevel(level)
                logger.propagate = False
                logger.addHandler(handler)
        state["tasks"] += 1
    try:
        yield
    finally:
        with state["lock"]:
            state["tasks"] -= 1
            if state["tasks"] == 0 and state["handler"] is not None:
                for name, (level, propagate) in state["saved"].items():
                    logger = logging.getLogger(name)
                    logger.removeHandler(state["handler"])
                    logger.setLevel(level)
                    logger.propagate = propagate
                state["handler"], state["saved"] = None, {}


def run_on_worker(job: Job, *upstream: Any) -> dict[str, Any]:
    """Load the node's inputs, run it, save its persisted outputs; keep every output in memory."""
    try:
        from distributed import get_worker

        address = get_worker().address
    except ValueError:  # not on a worker (called directly)
        address = "local"
    with _forward_logs(job, address):
        return _run_node(job, upstream, address)


def _run_node(job: Job, upstream: tuple, address: str) -> dict[str, Any]:
    start = time.perf_counter()
    if job.cwd and os.path.realpath(os.getcwd()) != os.path.realpath(job.cwd) and address not in _CWD_WARNED:
        _CWD_WARNED.add(address)
        logging.getLogger("iis_study.runners").warning(  # the runner's logger, as before this module
            "Dask worker %s runs in %s, not in the project folder %s: relative paths in parameters "
            "(dataset.root) resolve against the worker's folder",
            address, os.getcwd(), job.cwd,
        )
    if job.torch_threads:
        import torch

        if torch.get_num_threads() != job.torch_threads:
            torch.set_num_threads(job.torch_threads)
    node = job.node
    try:
        inputs = {}
        for name in node.inputs:
            if name in job.values:
                inputs[name] = job.values[name]
            elif name in job.load_from:
                inputs[name] = job.load_from[name].load()
            else:
                inputs[name] = upstream[job.upstream[name]]
        outputs = node.run(inputs)
        for name, dataset in job.save_to.items():
            dataset.save(outputs[name])
    except Exception as exc:
        exc.add_note(f"(in Kedro node {node.name!r}, run by the DaskRunner on worker {address})")
        raise
    return {"outputs": outputs, "worker": address, "seconds": time.perf_counter() - start}


def task_output(result: dict[str, Any], name: str) -> Any:
    return result["outputs"][name]


def log_forwarded_record(event: tuple[float, dict[str, Any]]) -> None:
    """In the main process: handle a worker's record with the logger of the same name."""
    _, attrs = event
    record = logging.makeLogRecord(attrs)
    logging.getLogger(record.name).handle(record)

"""A Kedro runner that runs nodes on a Dask distributed cluster.

``kedro run --runner=iis_study.runners.DaskRunner`` starts a small local cluster (``DASK_N_WORKERS``
worker processes, default 2, one thread each) and closes it at the end; with ``DASK_SCHEDULER_ADDRESS``
(or ``--runner-params scheduler_address=tcp://host:8786``) it uses an existing cluster instead.
This follows the pattern of Kedro's Dask deployment guide (a custom ``AbstractRunner`` that submits
nodes as Dask futures), with these choices:

* **Scheduling.** A node is submitted as soon as every node it depends on has finished (and its hooks
  have run), so the independent per-backbone namespaces run concurrently on different workers.
* **Data.** A node's worker loads its inputs and saves its outputs through the run's own dataset
  objects (pickled from the main process's catalog, so versioned datasets share the run's save
  version). Every dataset of the study is persisted, so workers must share the project's
  filesystem. Datasets that only live in memory (``MemoryDataset`` or no catalog entry) are never
  written by a worker: such an output stays on the worker that made it, as a Dask future, and is
  passed to the nodes that read it (Dask moves it between workers); a free output of the pipeline is
  saved into the main process's catalog, as Kedro's own runners leave it.
* **Hooks, MLflow included.** Node hooks run in the main process, in an order consistent with the
  pipeline's dependencies: ``before_node_run`` when a node is submitted, ``after_node_run`` /
  ``on_node_error`` when it has finished, before any node that depends on it is submitted. Each
  node's outputs are fetched from its worker for ``after_node_run`` (read from the worker's memory,
  not recomputed), so the MLflow hook logs the same runs, parameters, metrics and artifacts as with
  the ``SequentialRunner``. The hooks' ``inputs`` is a read-only mapping that loads a value (from the
  catalog or a worker) only when a hook reads it. A ``before_node_run`` that returns new input values
  is honoured (they are sent to the worker). Dataset load/save hooks are not called: the data are
  loaded and saved on the workers.
* **Logging.** While a task runs, records of the ``kedro`` and ``iis_study`` loggers on its worker
  are sent to the main process as Dask events and handled there by the logger of the same name
  (``Running node: ...``, the project's messages); the main process logs
  ``Completed node: <name> on <worker> in <t> s`` for each node. Dask's own INFO lines are muted.
* **Errors** are raised in the main process as the node's own exception, with a note naming the node
  and the worker; the nodes still queued are cancelled and Kedro's resume hint is logged.
* **Threads.** The number of threads changes float rounding (oneDNN convolutions, scikit-learn's
  k-means, BLAS), and the sweep's hard top-k masks amplify such differences: on the default study,
  workers with 1 thread instead of 2 moved IIS by up to 0.009 (an interval bound by 0.017). So by
  default the local cluster's workers compute with the main process's thread settings: each task uses as many torch
  threads as a sequential run, and the workers inherit ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` /
  ``OPENBLAS_NUM_THREADS`` from the main process (Dask would set them to 1). The results then equal a
  sequential run's, at the cost of oversubscribing the cores when ``n_workers`` x threads exceeds them.
  ``torch_threads=N`` sets all of these to N instead (e.g. 1 for speed on a small machine; the results
  then differ from a sequential run in the last digits). On an existing cluster the workers keep their
  own settings (Dask's default: 1 thread) unless ``torch_threads`` is given, which then sets torch's
  count per task.
* **Worker processes** of the local cluster are not daemonic, so nodes may start processes of their
  own (``DataLoader`` workers, joblib); start the workers of an existing cluster with
  ``DASK_DISTRIBUTED__WORKER__DAEMON=False`` for the same reason.

Runner parameters (``--runner-params key=value,...``): ``scheduler_address``, ``n_workers``,
``threads_per_worker``, ``torch_threads``, ``resources`` (e.g. ``resources.GPU=1``: every namespaced,
i.e. per-backbone, node asks for one unit of the worker resource ``GPU``; local workers get that much
of it each), ``dashboard_address`` (local cluster only, off by default; needs ``bokeh``). Environment
variables: ``DASK_SCHEDULER_ADDRESS``, ``DASK_N_WORKERS``, ``DASK_TORCH_THREADS``.

What a worker runs for one node, and the forwarding of its log records, is in
:mod:`iis_study.runner_worker`; this module holds the runner and its scheduling in the main process.
"""

from __future__ import annotations

import inspect
import logging
import os
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from itertools import chain
from typing import TYPE_CHECKING, Any

from kedro.framework.hooks.manager import _NullPluginManager
from kedro.io import MemoryDataset
from kedro.runner import AbstractRunner

from .runner_worker import FORWARDED_LOGGERS as FORWARDED_LOGGERS
from .runner_worker import Job, log_forwarded_record, task_output, run_on_worker


def _require_distributed() -> None:
    """A clear message, before any node runs, when the optional cluster dependencies are missing."""
    import importlib.util

    if importlib.util.find_spec("distributed") is None or importlib.util.find_spec("dask") is None:
        raise ImportError(
            "DaskRunner needs dask and distributed, which are an optional extra: pip install 'iis_study[cluster]'"
        )


if TYPE_CHECKING:
    from distributed import Client, Future
    from kedro.io import CatalogProtocol
    from kedro.pipeline import Pipeline
    from kedro.pipeline.node import Node
    from pluggy import PluginManager

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _restore_environ(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _positive(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DaskRunner: {name} must be a positive integer, got {value!r}")
    return value


# -- what hooks see -------------------------------------------------------------------------------


class _LazyValues(Mapping):
    """A read-only mapping whose values are fetched on first access (from a worker or the catalog)."""

    def __init__(self, getters: dict[str, Any]):
        self._getters = getters
        self._cache: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._cache:
            self._cache[key] = self._getters[key]()
        return self._cache[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._getters)

    def __len__(self) -> int:
        return len(self._getters)

    def copy(self) -> dict[str, Any]:
        return dict(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self._getters)})"


# -- the runner -----------------------------------------------------------------------------------


class DaskRunner(AbstractRunner):
    """Run a Kedro pipeline's nodes as Dask futures, each as soon as its inputs exist (see the module
    docstring)."""

    def __init__(
        self,
        is_async: bool = False,
        scheduler_address: str | None = None,
        n_workers: int | None = None,
        threads_per_worker: int = 1,
        torch_threads: int | None = None,
        resources: dict[str, float] | None = None,
        dashboard_address: str | None = None,
    ):
        super().__init__(is_async=is_async)
        _require_distributed()
        self.scheduler_address = scheduler_address or os.environ.get("DASK_SCHEDULER_ADDRESS") or None
        self.n_workers = _positive(n_workers if n_workers is not None else _env_int("DASK_N_WORKERS"),
                                   "n_workers") or 2
        self.threads_per_worker = _positive(threads_per_worker, "threads_per_worker") or 1
        self.torch_threads = _positive(
            torch_threads if torch_threads is not None else _env_int("DASK_TORCH_THREADS"), "torch_threads"
        )
        if resources is not None and not (
            isinstance(resources, dict)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in resources.values())
        ):
            raise ValueError(f"DaskRunner: resources must map names to positive amounts, e.g. {{'GPU': 1}}, "
                             f"got {resources!r}")
        self.resources = dict(resources) if resources else None
        self.dashboard_address = dashboard_address
        #: node name -> address of the worker that ran it (filled during a run)
        self.node_workers: dict[str, str] = {}

    # AbstractRunner's executor-based loop is not used
    def _get_executor(self, max_workers: int) -> None:
        return None

    # -- cluster ---------------------------------------------------------------------------------

    @contextmanager
    def _client(self) -> Iterator[Client]:
        import dask
        from distributed import Client, LocalCluster

        with ExitStack() as stack:
            # starting local workers leaves OMP/MKL/OpenBLAS_NUM_THREADS=1 in this process's environment (Dask's
            # pre-spawn settings); put the environment back afterwards, or later subprocesses (another `kedro run`
            # from the same Python session, DataLoader workers) would compute with 1 thread and round differently
            saved_env = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
            stack.callback(_restore_environ, saved_env)
            # the scheduler's and workers' own INFO lines would drown the run's log
            quiet = logging.getLogger("distributed")
            stack.callback(quiet.setLevel, quiet.level)
            quiet.setLevel(max(quiet.getEffectiveLevel(), logging.WARNING))
            if self.scheduler_address:
                self._logger.info("DaskRunner: connecting to the Dask scheduler at %s", self.scheduler_address)
                client = stack.enter_context(Client(self.scheduler_address))
            else:
                # Dask starts workers with OMP/MKL/OpenBLAS at 1 thread; ours get the main process's thread
                # settings (or ``torch_threads``), so torch, scikit-learn and BLAS compute as in a sequential run
                environ = {k: v for k, v in (dask.config.get("distributed.nanny.pre-spawn-environ") or {}).items()
                           if k not in _THREAD_VARIABLES}
                if self.torch_threads:
                    environ.update(dict.fromkeys(_THREAD_VARIABLES, str(self.torch_threads)))
                environ["DASK_LOGGING__DISTRIBUTED"] = "warning"
                stack.enter_context(dask.config.set({
                    "distributed.nanny.pre-spawn-environ": environ,
                    # worker processes may start processes of their own (DataLoader workers, joblib)
                    "distributed.worker.daemon": False,
                }))
                cluster = stack.enter_context(
                    LocalCluster(
                        n_workers=self.n_workers,
                        threads_per_worker=self.threads_per_worker,
                        processes=True,
                        dashboard_address=self.dashboard_address,
                        resources=self.resources,
                    )
                )
                client = stack.enter_context(Client(cluster))
                self._logger.info(
                    "DaskRunner: started a local Dask cluster, %d worker process(es) x %d thread(s)%s",
                    self.n_workers, self.threads_per_worker,
                    f", dashboard {cluster.dashboard_link}" if self.dashboard_address else "",
                )
            yield client
            if not self.scheduler_address:
                self._logger.info("DaskRunner: closing the local Dask cluster")

    def _check_resources(self, client: Client) -> None:
        if not self.resources:
            return
        workers = client.scheduler_info(n_workers=-1).get("workers", {})
        if not any(
            all((w.get("resources") or {}).get(k, 0) >= v for k, v in self.resources.items()) for w in workers.values()
        ):
            raise RuntimeError(
                f"DaskRunner: no Dask worker offers the resources {self.resources} that per-backbone nodes ask for "
                f"(workers: {[(a, w.get('resources') or {}) for a, w in workers.items()]}); start workers with "
                f"e.g. `dask worker <scheduler> --resources GPU=1`, or run without `resources`"
            )

    # -- planning (in the main process, before any worker starts) --------------------------------

    @staticmethod
    def _is_memory(catalog: CatalogProtocol, name: str) -> bool:
        if name.startswith("params:") or name == "parameters":
            return True
        dataset = catalog.get(name, fallback_to_runtime_pattern=True)
        return dataset is None or isinstance(dataset, MemoryDataset) or bool(getattr(dataset, "_EPHEMERAL", False))

    def _validate_nodes(self, nodes: Any) -> None:
        import cloudpickle

        generators = [n.name for n in nodes if inspect.isgeneratorfunction(n.func)]
        if generators:
            raise ValueError(f"DaskRunner does not run generator nodes (chunked outputs): {sorted(generators)}")
        bad = []
        for node in nodes:
            try:
                cloudpickle.dumps(node)
            except Exception as exc:  # noqa: BLE001 (reported below)
                bad.append(f"{node.name}: {exc}")
        if bad:
            raise ValueError("DaskRunner: these nodes cannot be sent to Dask workers:\n  " + "\n  ".join(bad))

    def _datasets_to_ship(self, pipeline: Pipeline, catalog: CatalogProtocol) -> dict[str, Any]:
        """The dataset objects workers load from and save to, checked to be picklable."""
        import cloudpickle

        shipped, bad = {}, []
        for name in sorted(pipeline.datasets()):
            if self._is_memory(catalog, name):
                continue
            dataset = catalog.get(name, fallback_to_runtime_pattern=True)
            try:
                cloudpickle.dumps(dataset)
            except Exception as exc:  # noqa: BLE001 (reported below)
                bad.append(f"{name} ({type(dataset).__name__}): {exc}")
            shipped[name] = dataset
        if bad:
            raise ValueError("DaskRunner: these datasets cannot be sent to Dask workers:\n  " + "\n  ".join(bad))
        return shipped

    # -- the run ---------------------------------------------------------------------------------

    def _run(
        self,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager | None = None,
        run_id: str | None = None,
    ) -> None:
        hook_manager = hook_manager or _NullPluginManager()
        self._validate_nodes(pipeline.nodes)
        if self._is_async:
            self._logger.info("DaskRunner: --async is ignored (workers load and save synchronously)")
        shipped = self._datasets_to_ship(pipeline, catalog)
        torch_threads = self.torch_threads
        if torch_threads is None and not self.scheduler_address:
            import torch

            # as many as a sequential run uses: thread counts change float rounding (see the module docstring)
            torch_threads = torch.get_num_threads()
        self.node_workers = {}
        with self._client() as client:
            self._check_resources(client)
            topic = f"iis-study-logs-{uuid.uuid4().hex}"
            client.subscribe_topic(topic, log_forwarded_record)
            try:
                self._logger.info(
                    "DaskRunner: %d node(s)%s", len(pipeline.nodes),
                    f"; torch threads per task: {torch_threads}" if torch_threads else "",
                )
                _Schedule(self, client, pipeline, catalog, hook_manager, run_id, shipped, torch_threads, topic).run()
            finally:
                try:
                    client.unsubscribe_topic(topic)
                except Exception as exc:  # noqa: BLE001 (the cluster may be going away)
                    self._logger.debug("DaskRunner: could not unsubscribe from the worker logs: %s", exc)


class _Schedule:
    """One run's bookkeeping: which nodes wait, run and are done; where memory data live."""

    def __init__(
        self,
        runner: DaskRunner,
        client: Client,
        pipeline: Pipeline,
        catalog: CatalogProtocol,
        hook_manager: PluginManager,
        run_id: str | None,
        shipped: dict[str, Any],
        torch_threads: int | None,
        log_topic: str,
    ):
        from distributed import as_completed

        self.runner, self.client, self.pipeline, self.catalog = runner, client, pipeline, catalog
        self.hooks, self.run_id, self.shipped, self.torch_threads = hook_manager, run_id, shipped, torch_threads
        self.log_topic = log_topic
        self.log = runner._logger
        self.nodes = pipeline.nodes
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.produced = {out for n in self.nodes for out in n.outputs}
        self.dependencies = pipeline.node_dependencies
        self.load_counts = Counter(chain.from_iterable(n.inputs for n in self.nodes))
        self.free_memory_outputs = {o for o in pipeline.outputs() if o not in shipped}
        self.log_levels = {name: logging.getLogger(name).getEffectiveLevel() for name in FORWARDED_LOGGERS}
        self.memory: dict[str, Future] = {}  # memory dataset -> future of its value on a worker
        self.running: dict[Future, tuple[Node, Mapping]] = {}
        self.todo: set[Node] = set(self.nodes)
        self.done: set[Node] = set()
        self.completed = as_completed()

    def run(self) -> None:
        self._submit_ready()
        for future in self.completed:
            if future not in self.running:  # cancelled after a failure
                continue
            node, inputs = self.running.pop(future)
            if future.status != "finished":
                self._fail(node, inputs, future)
            self._finish(node, inputs, future)
            self._submit_ready()
        if self.todo:
            self.runner._raise_runtime_error(self.todo, self.done, set(), None)

    # -- submitting ------------------------------------------------------------------------------

    def _inputs(self, node: Node, values: dict[str, Any]) -> _LazyValues:
        getters = {}
        for name in node.inputs:
            if name in values:
                getters[name] = lambda v=values[name]: v
            elif name in self.memory:
                getters[name] = self.memory[name].result
            else:
                getters[name] = lambda n=name: self.catalog.load(n)
        return _LazyValues(getters)

    def _submit_ready(self) -> None:
        ready = sorted((n for n in self.todo if self.dependencies[n] <= self.done), key=self.order.__getitem__)
        for node in ready:
            self.todo.discard(node)
            self._submit(node)

    def _submit(self, node: Node) -> None:
        shipped = self.shipped
        # parameters (and memory inputs given to the run) are sent by value
        values = {n: self.catalog.load(n) for n in node.inputs if n not in shipped and n not in self.produced}
        for response in self.hooks.hook.before_node_run(
            node=node, catalog=self.catalog, inputs=self._inputs(node, values), is_async=False, run_id=self.run_id
        ) or []:
            if response is not None and not isinstance(response, dict):
                raise TypeError(
                    f"'before_node_run' must return either None or a dictionary mapping dataset names to "
                    f"updated values, got '{type(response).__name__}' instead."
                )
            values.update(response or {})
        futures, upstream = [], {}
        for name in node.inputs:
            if name not in values and name in self.memory:
                upstream[name] = len(futures)
                futures.append(self.memory[name])
        job = Job(
            node=node,
            values=values,
            load_from={n: shipped[n] for n in node.inputs if n in shipped and n not in values},
            upstream=upstream,
            save_to={n: shipped[n] for n in node.outputs if n in shipped},
            log_levels=self.log_levels,
            log_topic=self.log_topic,
            torch_threads=self.torch_threads,
            cwd=os.getcwd(),
        )
        resources = self.runner.resources
        future = self.client.submit(
            run_on_worker, job, *futures,
            key=f"{node.name}-{uuid.uuid4().hex[:8]}", pure=False,
            resources=resources if (resources and node.namespace) else None,
            priority=-self.order[node],
        )
        self.running[future] = (node, self._inputs(node, values))
        self.completed.add(future)
        self.log.debug("DaskRunner: submitted node %s", node.name)

    # -- finishing -------------------------------------------------------------------------------

    def _finish(self, node: Node, inputs: Mapping, future: Future) -> None:
        # gathering reads the result from the worker's memory without running a task there, so it
        # does not wait behind the node the worker runs next
        result = future.result()
        outputs, worker, seconds = result["outputs"], result["worker"], result["seconds"]
        for name in node.outputs:
            if name in self.shipped:
                continue
            if self.load_counts[name] > 0:  # read by later nodes: stays on the worker until nobody reads it
                self.memory[name] = self.client.submit(
                    task_output, future, name, pure=False, key=f"{name}-{uuid.uuid4().hex[:8]}"
                )
            if name in self.free_memory_outputs:  # the run's result, as Kedro's runners leave it
                self.catalog.save(name, outputs[name])
        self.hooks.hook.after_node_run(
            node=node, catalog=self.catalog, inputs=inputs, outputs=outputs, is_async=False, run_id=self.run_id
        )
        for name in node.confirms:
            self.catalog.confirm(name)
        self.done.add(node)
        self.runner.node_workers[node.name] = worker
        self.log.info("Completed node: %s on %s in %.1f s", node.name, worker, seconds)
        self.log.info("Completed %d out of %d tasks", len(self.done), len(self.nodes))
        for name in node.inputs:
            self.load_counts[name] -= 1
            if self.load_counts[name] < 1:
                self.memory.pop(name, None)

    def _fail(self, node: Node, inputs: Mapping, future: Future) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 (any error of the node)
            error = exc
        else:  # pragma: no cover - a finished future does not come here
            error = RuntimeError(f"the Dask task of node {node.name!r} ended as {future.status!r}")
        if not any(node.name in str(note) for note in getattr(error, "__notes__", [])):
            error.add_note(f"(in Kedro node {node.name!r}, run by the DaskRunner)")
        self.log.error("Node %s failed on a Dask worker: %s: %s", node.name, type(error).__name__, error)
        self.client.cancel(list(self.running))
        self.running.clear()
        self.hooks.hook.on_node_error(
            error=error, node=node, catalog=self.catalog, inputs=inputs, is_async=False, run_id=self.run_id
        )
        self.runner._suggest_resume_scenario(self.pipeline, self.done, self.catalog)
        raise error

"""Project hooks: the run's parameters for the pipeline registry, and MLflow tracking."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from . import study_config

logger = logging.getLogger(__name__)


def mlflow_settings(config_loader: Any) -> dict[str, Any]:
    """The ``tracking`` block of ``conf/<env>/mlflow.yml`` (``enabled``, ``experiment``, ``uri``),
    checked (:class:`~iis_study.core.reporting.blocks.TrackingParams`): a misspelt key or a wrong type is an
    error naming the file; a missing file or key takes the defaults."""
    from kedro.config import MissingConfigException

    from .core.reporting.blocks import TrackingParams

    try:
        conf = config_loader["mlflow"]
    except MissingConfigException:  # no mlflow.yml: the defaults apply (a YAML error is raised)
        conf = {}
    return TrackingParams.from_params((conf or {}).get("tracking")).to_dict()


def parent_run_name(env: str | None, pipelines: list[str] | None, run_id: str | None) -> str:
    """The study's MLflow parent run name: the environment (``base`` for conf/base's study, run as ``local``) and
    the pipelines (``study`` for the default), then the session id: ``cifar10 · study · 2026-12-02T17.36.10``."""
    where = "base" if env in (None, "", "local") else env
    what = "+".join("study" if p == "__default__" else p for p in (pipelines or ["__default__"]))
    return " · ".join(part for part in (where, what, run_id or "") if part)


class StudyConfigHook:
    """Make the catalog's representations the expanded ones (the registry reads its own parameters)."""

    @hook_impl
    def after_catalog_created(self, catalog: Any, parameters: dict[str, Any]) -> None:
        """Make the catalog's ``params:backbones`` (and ``params:backbones.<name>``) the expanded
        representations: family members included, entries an environment removed (``null``) left
        out (see :func:`study_config.expand_representations`)."""
        params = parameters.get("parameters") or {}
        try:
            expanded = study_config.expanded_parameters(params)
        except ValueError:  # reported, naming the parameter, by the validation hook before any node runs
            return
        values = {"parameters": expanded, "params:backbones": expanded["backbones"], "params:families": {}}
        for name, entry in expanded["backbones"].items():  # each entry knows its key (`name`)
            values[f"params:backbones.{name}"] = entry
        quiet = logging.getLogger("kedro.io.data_catalog")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "Replacing dataset 'params:...'": by design, not news
        try:
            for key, value in values.items():
                catalog[key] = value
        finally:
            quiet.setLevel(level)


class ValidationHook:
    """Check every parameter before the first node runs (see :mod:`iis_study.validation`), and that
    the pipeline was expanded for this environment's representations."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}
        self._globals: dict[str, Any] = {}
        self._env: str | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        from kedro.config import MissingConfigException

        self._params = context.config_loader["parameters"]
        try:
            self._globals = context.config_loader["globals"]
        except MissingConfigException:
            self._globals = {}
        self._env = context.env

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from .validation import check_dataset_source, check_inputs_exist, check_pipeline_matches, validate_study

        check_dataset_source(self._params, self._globals)
        validate_study(self._params, set(run_params.get("pipeline_names") or ["__default__"]))
        check_pipeline_matches(self._params, pipeline, self._env, run_params)
        from kedro.framework.project import pipelines as registry

        check_inputs_exist(pipeline, catalog, self._env, registry)


class MlflowTrackingHook:
    """Track every ``kedro run`` in MLflow (see :mod:`iis_study.tracking`)."""

    def __init__(self) -> None:
        self.tracker = None
        self._params: dict[str, Any] = {}
        self._settings: dict[str, Any] = {}
        self._project_path: Path | None = None
        self._env: str | None = None
        self._catalog: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._params = context.config_loader["parameters"]
        try:  # family members get their own nested run (an invalid block is reported by validation)
            self._params = study_config.expanded_parameters(self._params)
        except ValueError:
            pass
        self._project_path = Path(context.project_path)
        self._env = context.env
        self._settings = mlflow_settings(context.config_loader)

    @hook_impl
    def after_catalog_created(self, catalog: Any) -> None:
        self._catalog = catalog

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._catalog = catalog
        if not self._settings["enabled"]:
            return
        from .tracking import StudyTracker

        run_name = parent_run_name(self._env, run_params.get("pipeline_names"), run_params.get("run_id"))
        try:
            self.tracker = StudyTracker(self._params, self._project_path or Path.cwd(), run_name, self._env,
                                        settings=self._settings)
        except Exception as exc:  # tracking must never cost the user the computation
            logger.warning("MLflow tracking disabled for this run: %s", exc)
            self.tracker = None

    @hook_impl
    def after_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        if self.tracker is None:
            return
        try:
            self._track_node(node, inputs, outputs)
        except Exception as exc:
            logger.warning("MLflow: could not log node %s: %s", node.name, exc)

    def _track_node(self, node: Any, inputs: dict[str, Any], outputs: dict[str, Any]) -> None:
        """Log every output whose catalog entry asks for it (``metadata: {mlflow: {log: ...}}`` in
        catalog.yml; see :meth:`iis_study.tracking.StudyTracker.log_output`)."""
        if "images" in inputs and "splits" in inputs:  # the image set a node read: fine-tuning's dataset input
            self.tracker.note_images(inputs["images"], inputs["splits"])
        for name, value in outputs.items():
            what = self._mlflow_metadata(name)
            if what:
                self.tracker.log_output(what, node.namespace, value)

    def _mlflow_metadata(self, dataset_name: str) -> dict[str, Any] | None:
        if self._catalog is None:
            return None
        try:
            dataset = self._catalog.get(dataset_name)
        except Exception:  # not a catalog entry (a memory dataset): nothing to log
            return None
        return ((getattr(dataset, "metadata", None) or {}).get("mlflow")) or None

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], run_result: Any, pipeline: Any, catalog: Any) -> None:
        if self.tracker is not None:
            self.tracker.finish("FINISHED")
            self.tracker = None

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self.tracker is not None:
            self.tracker.finish("FAILED")
            self.tracker = None

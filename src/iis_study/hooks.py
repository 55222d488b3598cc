"""Project hooks: the run's parameters for the pipeline registry, and MLflow tracking."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from . import study_config

logger = logging.getLogger(__name__)

_SCORE_NODE = re.compile(r"^score_(?P<ctype>\w+)_interpreters$")


def mlflow_settings(config_loader: Any) -> dict[str, Any]:
    """The ``tracking`` block of ``conf/<env>/mlflow.yml`` (``enabled``, ``experiment``, ``uri``),
    checked: a misspelt key or a wrong type is an error naming the file."""
    from kedro.config import MissingConfigException

    try:
        conf = config_loader["mlflow"]
    except MissingConfigException:  # no mlflow.yml: the defaults apply (a YAML error is raised)
        conf = {}
    tracking = dict((conf or {}).get("tracking") or {})
    unknown = set(tracking) - {"enabled", "experiment", "uri"}
    if unknown:
        raise ValueError(f"mlflow.yml: unknown key(s) {sorted(unknown)} under tracking; expected enabled, experiment, uri")
    if not isinstance(tracking.get("enabled", True), bool):
        raise ValueError(f"mlflow.yml: tracking.enabled must be true or false, got {tracking.get('enabled')!r}")
    if not isinstance(tracking.get("experiment", "iis_study"), str):
        raise ValueError(f"mlflow.yml: tracking.experiment must be a name, got {tracking.get('experiment')!r}")
    if not isinstance(tracking.get("uri") or "", str):
        raise ValueError(f"mlflow.yml: tracking.uri must be a tracking URI or null, got {tracking.get('uri')!r}")
    return tracking


class StudyConfigHook:
    """Give the pipeline registry the parameters of the environment being run."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        study_config.remember(context.config_loader["parameters"])

    @hook_impl
    def after_catalog_created(self, catalog: Any, parameters: dict[str, Any]) -> None:
        """Make the catalog's ``params:backbones`` (and ``params:backbones.<name>``) the expanded
        representations, family members included (see :func:`study_config.expand_representations`)."""
        params = parameters.get("parameters") or {}
        if not params.get("families"):
            return
        expanded = study_config.expanded_parameters(params)
        catalog["parameters"] = expanded
        catalog["params:backbones"] = expanded["backbones"]
        catalog["params:families"] = {}
        for name, entry in expanded["backbones"].items():
            if f"params:backbones.{name}" not in parameters:
                catalog[f"params:backbones.{name}"] = entry


class ValidationHook:
    """Check every parameter before the first node runs (see :mod:`iis_study.validation`)."""

    def __init__(self) -> None:
        self._params: dict[str, Any] = {}

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._params = context.config_loader["parameters"]

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from .validation import validate_study

        validate_study(self._params, set(run_params.get("pipeline_names") or ["__default__"]))


class MlflowTrackingHook:
    """Track every ``kedro run`` in MLflow (see :mod:`iis_study.tracking`)."""

    def __init__(self) -> None:
        self.tracker = None
        self._params: dict[str, Any] = {}
        self._settings: dict[str, Any] = {}
        self._project_path: Path | None = None
        self._env: str | None = None

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
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if not self._settings.get("enabled", True):
            return
        from .tracking import StudyTracker

        names = run_params.get("pipeline_names") or ["__default__"]
        run_name = f"{'+'.join(names)} {run_params.get('run_id', '')}".strip()
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
        ns = node.namespace
        base = node.name.split(".")[-1]
        if ns and base == "extract_features":
            self.tracker.log_feature_info(ns, outputs[f"{ns}.feature_info"])
        elif ns and (m := _SCORE_NODE.match(base)):
            ctype = m.group("ctype")
            self.tracker.log_scores(ns, ctype, outputs[f"{ns}.scores_{ctype}"], outputs[f"{ns}.curve_{ctype}"])
        elif ns and base == "plot_concept_gallery":
            self.tracker.log_figure(self.tracker.child(ns), outputs[f"{ns}.concept_gallery"], "plots/concept_gallery.png")
        elif base == "collect_scores":
            scores, curves = outputs["iis_scores"], outputs["sparsity_curves"]
            for bb in scores["backbone"].unique():
                rid = self.tracker.child(bb)
                self.tracker.log_table(rid, scores[scores["backbone"] == bb], "tables/iis_scores.csv")
                self.tracker.log_table(rid, curves[curves["backbone"] == bb], "tables/sparsity_curves.csv")
            self.tracker.log_table(self.tracker.parent, scores, "tables/iis_scores.csv")
            self.tracker.log_table(self.tracker.parent, curves, "tables/sparsity_curves.csv")
        elif base == "correlate_scores":
            self.tracker.log_dict(self.tracker.parent, outputs["correlation"], "correlation.json")
            if "correlation_scopes" in outputs:
                self.tracker.log_dict(self.tracker.parent, outputs["correlation_scopes"], "correlation_scopes.json")
        elif base == "plot_iis_vs_accuracy":
            self.tracker.log_figure(self.tracker.parent, outputs["iis_vs_accuracy_plot"], "plots/iis_vs_accuracy.png")
        elif base == "plot_iis_vs_accuracy_scopes":
            for name, fig in outputs["iis_vs_accuracy_scopes_plot"].items():
                self.tracker.log_figure(self.tracker.parent, fig, f"plots/iis_vs_accuracy_{name}")
        elif base == "plot_sparsity_curves":
            fig = outputs["sparsity_curves_plot"]
            self.tracker.log_figure(self.tracker.parent, fig, "plots/sparsity_curves.png")
            for bb in self.tracker.children:
                self.tracker.log_figure(self.tracker.child(bb), fig, "plots/sparsity_curves.png")
        elif base == "collect_fine_tuning":
            self.tracker.log_fine_tuning(outputs["fine_tuning_results"])
        elif base == "plot_fine_tuning":
            self.tracker.log_figure(self.tracker.parent, outputs["fine_tuning_plot"], "plots/fine_tuning.png")

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

"""MLflow tracking of a study run, in one place (a Kedro hook).

One parent run per ``kedro run``; one nested run per backbone. Every run carries its lineage: the
git commit (``mlflow.source.git.commit``) and whether the work tree was dirty, the source and user
tags of MLflow's context providers, the full resolved parameters as ``params.yml`` (and flattened
as ``params.*``), and the image set as an MLflow dataset input keyed by its fingerprint. A nested
run holds its parameters (backbone,
weights source, dataset, concept types, M, grids, seeds, feature cache key), its metrics
(``<concept_type>.accuracy_linear_probe``, ``<concept_type>.iis``, ``<concept_type>.iis_chance_corrected``
and ``<concept_type>.accuracy`` with the sparsity in percent as the step) and artifacts (its
curve and gallery plots, its rows of the result tables, as CSV and as MLflow tables). The parent
run holds the correlation JSON, the study-level plots and the whole tables.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else SQLite at ``<project>/mlflow.db``
(MLflow 3 no longer accepts the old ``./mlruns`` file store). Logging goes through
``MlflowClient`` with explicit run ids, so nested runs stay correct whatever order nodes finish in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .core.concepts.blocks import ConceptParams
from .core.representations.blocks import backbone_fields
from .core.data import DatasetParams
from .core.heads import SweepParams
from .core.concepts.nulls import NULL_KINDS
from .core.scoring.results import Scores

logger = logging.getLogger(__name__)


def tracking_uri(project_path: str | Path | None = None, configured: str | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``tracking.uri`` of ``mlflow.yml``, else SQLite in the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if uri:
        return uri
    root = Path(project_path or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _flat(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flat(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return {prefix: text[:6000]}


def git_state(path: str | Path) -> dict[str, str]:
    """The commit of the git work tree at ``path`` and whether it has uncommitted changes to
    tracked files (``{}`` outside a repository or without git)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "dirty": "true" if dirty else "false", "branch": branch}


def lineage_tags(project_path: str | Path) -> dict[str, str]:
    """Tags every run gets: MLflow's context tags (user, source), the command line, the git state."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = {k: str(v) for k, v in resolve_tags().items()}
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    command = " ".join(["kedro", *sys.argv[1:]]) if argv0 == "kedro" else " ".join(sys.argv) or "python"
    tags["mlflow.source.name"] = command
    tags["mlflow.source.type"] = "LOCAL"
    # the project's repository, else the one the running code comes from (an editable install)
    git = git_state(project_path) or git_state(Path(__file__).resolve().parent)
    if git:
        tags["mlflow.source.git.commit"] = git["commit"]
        tags["mlflow.source.git.branch"] = git["branch"]
        tags["iis_study.git.dirty"] = git["dirty"]
    return tags


def sparsity_step(s: float) -> int:
    """MLflow steps are integers: the sparsity in percent (0.95 -> 95)."""
    return int(round(float(s) * 100))


class StudyTracker:
    """The state of one tracked run: a client, the parent run and one nested run per backbone."""

    def __init__(self, params: dict[str, Any], project_path: str | Path, run_name: str, env: str | None,
                 settings: dict[str, Any] | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.params = params
        from .core.reporting.blocks import TrackingParams

        cfg = TrackingParams.from_params(settings)
        self.uri = tracking_uri(project_path, cfg.uri)
        mlflow.set_tracking_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        name = cfg.experiment
        exp = self.client.get_experiment_by_name(name)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(name)
        self.lineage = {**lineage_tags(project_path), "kedro.env": str(env)}
        self.parent = self.client.create_run(
            self.experiment_id, run_name=run_name, tags={**self.lineage, "iis_study.level": "study"}
        ).info.run_id
        self.children: dict[str, str] = {}
        self._datasets: set[tuple[str, str]] = set()
        self.images: tuple[str, str] | None = None  # (name, fingerprint) of the image set the run read
        self._log_resolved_params(self.parent, params)
        study = {
            "dataset": params.get("dataset"),
            "splits": params.get("splits"),
            "backbones": sorted((params.get("backbones") or {}).keys()),
            **self._study_summary(),
        }
        self._log_params(self.parent, _flat("", study))
        logger.info("MLflow: run %s in experiment %r at %s", self.parent, name, self.uri)

    def _log_resolved_params(self, run_id: str, params: dict[str, Any]) -> None:
        """The full resolved parameters: ``params.yml`` and flattened ``params.<path>``."""
        self.client.log_dict(run_id, json.loads(json.dumps(params, default=str)), "params.yml")
        self._log_params(run_id, _flat("params", params))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def child(self, backbone: str) -> str:
        """The nested run of ``backbone`` (created with its parameters on first use)."""
        if backbone not in self.children:
            spec = (self.params.get("backbones") or {}).get(backbone, {})
            label = str(spec.get("label") or backbone)
            run = self.client.create_run(
                self.experiment_id,
                run_name=label,
                tags={**self.lineage, "mlflow.parentRunId": self.parent, "iis_study.level": "backbone",
                      "backbone": backbone, "representation": label},
            )
            rid = run.info.run_id
            self.children[backbone] = rid
            others = {k: v for k, v in self.params.items() if k not in ("backbones", "families")}
            self._log_resolved_params(rid, {**others, "backbones": {backbone: spec}})
            rep = backbone_fields(spec)
            dataset = DatasetParams.from_params(self.params.get("dataset"))
            self._log_params(
                rid,
                _flat(
                    "",
                    {
                        "backbone": backbone,
                        "model": rep["model"],
                        "weights": rep["weights"],
                        "input_size": rep["input_size"],
                        "representation": label,
                        "layer": rep["layer"],
                        "pooling": rep["pooling"],
                        "family": rep["family"],
                        "dataset": dataset.kind,
                        "dataset_root": dataset.root,
                        **self._study_summary(),
                    },
                ),
            )
        return self.children[backbone]

    def _study_summary(self) -> dict[str, Any]:
        """The concept and sweep settings every run shows as parameters (their typed blocks' values)."""
        concepts = ConceptParams.from_params(self.params.get("concepts"))
        sweep = SweepParams.from_params(self.params.get("sweep"))
        return {
            "concept_types": list(concepts.types),
            "m": concepts.m,
            "concept_draws": concepts.draws,
            "nulls": list(concepts.nulls),
            "sparsities": list(sweep.sparsities),
            "estimator": sweep.estimator,
            "l2_grid": list(sweep.l2_grid),
            "tolerance": sweep.tolerance,
            "learning_rates": list(sweep.learning_rates),
            "seeds": list(sweep.seeds),
            "epochs": sweep.epochs,
        }

    def log_feature_info(self, backbone: str, info: dict[str, Any]) -> None:
        keep = ("cache_key", "weights_fingerprint", "dim", "n_train", "n_val", "n_test", "n_skipped")
        self._log_params(self.child(backbone), {f"features.{k}": str(info[k]) for k in keep if k in info})
        if info.get("n_skipped"):
            self.client.log_metric(self.child(backbone), "images_skipped", float(info["n_skipped"]))
        if info.get("dataset_fingerprint"):
            self.log_dataset(self.child(backbone), info["dataset_name"], info["dataset_fingerprint"])
            self.log_dataset(self.parent, info["dataset_name"], info["dataset_fingerprint"])

    def note_images(self, images: Any, splits: Any) -> None:
        """Remember the image set of the split table (the same fingerprint the features' runs log), once."""
        if self.images is None:
            self.images = (images.name, images.subset(splits["index"].to_numpy()).fingerprint())

    def log_dataset(self, run_id: str, name: str, fingerprint: str) -> None:
        """The image set (train + val + test of the split table) as an MLflow dataset input, its
        digest the image set's fingerprint (paths, sizes, times and labels, or pixel contents)."""
        if (run_id, fingerprint) in self._datasets:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = self.params.get("dataset") or {}
        source = json.dumps({"dataset.kind": str(ds.get("kind")), "dataset.root": str(ds.get("root"))})
        entity = Dataset(name=name, digest=fingerprint[:36], source_type="local", source=source)
        self.client.log_inputs(run_id, [DatasetInput(entity, [InputTag("mlflow.data.context", "train+val+test")])])
        self._datasets.add((run_id, fingerprint))

    def log_output(self, what: dict[str, Any], namespace: str | None, value: Any) -> None:
        """Log one node output as its catalog entry's ``metadata.mlflow`` says:

        ``log``: ``feature_info`` (parameters and the image set of the representation's run),
        ``scores`` / ``curve`` (metrics ``<concept_type>.*`` of the representation's run), ``figure``
        (``artifact`` in the representation's run, or ``run: study`` / ``run: all`` for the parent /
        the parent and every representation), ``figures`` (a dict of figures, ``artifact`` a prefix),
        ``table`` (the parent and each representation's rows), ``dict`` (the parent), ``verdict`` (the specification
        curve's record: the parent, with a tag per concept type), ``fine_tuning``.
        """
        kind, artifact, run = what.get("log"), what.get("artifact", ""), what.get("run", "representation")
        if kind == "feature_info":
            self.log_feature_info(namespace, value)
        elif kind == "scores":
            self.log_score_metrics(namespace, what["concept_type"], value)
        elif kind == "curve":
            self.log_curve_metrics(namespace, what["concept_type"], value)
        elif kind == "figure":
            runs = {"representation": [self.child(namespace)] if namespace else [], "study": [self.parent],
                    "all": [self.parent, *(self.child(bb) for bb in self.children)]}[run]
            for rid in runs:
                self.log_figure(rid, value, artifact)
        elif kind == "figures":
            for name, fig in value.items():
                self.log_figure(self.parent, fig, f"{artifact}{name}")
        elif kind == "table":
            for bb in (value["backbone"].unique() if "backbone" in value else []):  # a study-level table: the parent
                self.log_table(self.child(bb), value[value["backbone"] == bb], artifact)
            self.log_table(self.parent, value, artifact)
        elif kind == "dict":
            self.log_dict(self.parent, value, artifact)
        elif kind == "verdict":
            self.log_verdict(value, artifact)
        elif kind == "fine_tuning":
            self.log_fine_tuning(value)
        else:
            raise ValueError(f"catalog metadata mlflow.log = {kind!r} is not a kind the tracker knows")

    def log_score_metrics(self, backbone: str, concept_type: str, scores: Scores) -> None:
        """``<concept_type>.iis`` and the other headline numbers of one representation's run, the nulls'
        ``<concept_type>.iis_null_<kind>`` and ``.iis_excess_<kind>`` with its interval among them, and the size
        check: ``.iis_detectable_difference``, ``.iis_excess_<kind>_detectable`` and ``_n_test_needed``."""
        import time

        from mlflow.entities import Metric

        scores = scores.to_dict()

        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{concept_type}.{k}", float(scores[k]), now, 0)
            for k in ("accuracy_linear_probe", "iis", "iis_std", "iis_ci_low", "iis_ci_high", "iis_chance_corrected",
                      "certified", "max_grad", "iterations", "budget_delta", "n_draws", "iis_sd_test", "iis_sd_draw",
                      "iis_share_draw", "iis_se", "iis_detectable_difference", "n_test", "power",
                      *(f"iis_{w}_{k}{e}" for k in NULL_KINDS for w, e in
                        (("null", ""), ("excess", ""), ("excess", "_ci_low"), ("excess", "_ci_high"),
                         ("excess", "_detectable"), ("excess", "_n_test_needed"))),
                      *(k for k in scores if k.startswith("anec_") and k != "anec_certified"))
            if scores.get(k) is not None and not (isinstance(scores[k], float) and math.isinf(scores[k]))
        ]  # an infinite images-needed (no number of images would do) is left out: the table keeps it
        self.client.log_batch(self.child(backbone), metrics=metrics)
        if scores.get("uncertified"):  # the heads that missed the tolerance, by name
            self.client.set_tag(self.child(backbone), f"{concept_type}.uncertified", str(scores["uncertified"])[:5000])

    def log_curve_metrics(self, backbone: str, concept_type: str, curve) -> None:
        """The mean A(s) and ARR(s) over seeds and concept draws, the sparsity in percent as the step."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        if "concept_set" in curve:  # the concept draws' curves (their mean integrates to the IIS), not the nulls'
            curve = curve[curve["concept_set"] == "concepts"]
        mean_curve = curve.groupby("sparsity", as_index=False)[["accuracy", "arr"]].mean()
        for row in mean_curve.itertuples():
            step = sparsity_step(row.sparsity)
            metrics.append(Metric(f"{concept_type}.accuracy", float(row.accuracy), now, step))
            metrics.append(Metric(f"{concept_type}.arr", float(row.arr), now, step))
        self.client.log_batch(self.child(backbone), metrics=metrics)

    def log_figure(self, run_id: str, figure, path: str) -> None:
        self.client.log_figure(run_id, figure, path)

    def log_table(self, run_id: str, frame, path: str) -> None:
        """``path`` (a ``.csv``) as a CSV artifact and as an MLflow table (``.json``, shown by the UI)."""
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / Path(path).name
            frame.to_csv(p, index=False)
            self.client.log_artifact(run_id, str(p), str(Path(path).parent) if Path(path).parent != Path(".") else None)
        self.client.log_table(run_id, frame.astype(object).where(frame.notna(), None), str(Path(path).with_suffix(".json")))

    def log_verdict(self, record: dict, path: str) -> None:
        """The specification curve's record as an artifact of the parent run, and beside the headline there a tag
        ``specification.<concept_type>`` per concept type: the verdict on the sign, r's range, the main effects."""
        from .core.scoring.specification import verdict_lines

        self.log_dict(self.parent, record, path)
        for rec, line in zip([r for r in record.get("verdicts", []) if r["scope"] == record.get("headline_scope")],
                             verdict_lines(record)):
            self.client.set_tag(self.parent, f"specification.{rec['concept_type']}", line[:5000])

    def log_dict(self, run_id: str, data: dict, path: str) -> None:
        self.client.log_dict(run_id, data, path)

    def log_fine_tuning(self, results) -> None:
        """One nested run per (backbone, λ, seed): metrics per epoch (step = epoch), the checkpoint."""
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for (bb, lam, seed), g in results.groupby(["backbone", "lam", "seed"]):
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{bb} fine-tuning λ={lam:g} seed={seed}",
                tags={**self.lineage, "mlflow.parentRunId": self.parent, "iis_study.level": "fine_tuning",
                      "backbone": bb},
            )
            rid = run.info.run_id
            self._log_resolved_params(rid, self.params)
            self.children[f"fine_tuning:{bb}:{lam:g}:{seed}"] = rid
            if self.images is not None:  # the images it was fine-tuned and scored on, as the study's runs show them
                self.log_dataset(rid, *self.images)
                self.log_dataset(self.parent, *self.images)
            ft = self.params.get("fine_tuning") or {}
            self._log_params(rid, _flat("", {"backbone": bb, "lam": lam, "seed": seed, "train": ft.get("train", {})}))
            metrics = []
            for row in g.itertuples():
                for col in ("accuracy_test", "accuracy_val", "train_loss", "accuracy_linear_probe", "iis",
                            "iis_chance_corrected"):
                    v = getattr(row, col, None)
                    if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v)):
                        metrics.append(Metric(col, float(v), now, int(row.epoch)))
            for i in range(0, len(metrics), 500):
                self.client.log_batch(rid, metrics=metrics[i : i + 500])
            ckpt = Path(str(g["checkpoint"].iloc[-1])) if "checkpoint" in g else None
            if ckpt is not None and ckpt.is_file():
                self.client.log_artifact(rid, str(ckpt), "checkpoint")

    def finish(self, status: str = "FINISHED") -> None:
        for rid in self.children.values():
            self.client.set_terminated(rid, status)
        self.client.set_terminated(self.parent, status)

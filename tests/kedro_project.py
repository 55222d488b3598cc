"""Make an isolated copy of this Kedro project (conf + pyproject) in a temporary folder and run it.

The copy shares the installed ``iis_study`` package; its ``data/`` is empty; a ``test`` env
overrides parameters with tiny settings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "dataset": {"kind": "digits", "image_size": 32},
    "splits": {"fractions": [0.6, 0.2, 0.2], "seed": 0, "max_per_class": 30},
    "backbones": {
        "lite0": {"model": "tf_efficientnet_lite0", "weights": "offline", "input_size": 32},
        "lite0_random": {"model": "tf_efficientnet_lite0", "weights": "random", "input_size": 32},
        "lite1": {"model": "tf_efficientnet_lite1", "weights": "offline", "input_size": 32},
    },
    "extraction": {"device": "cpu", "batch_size": 64, "num_workers": 0, "progress": False},
    "concepts": {
        "types": ["prototype", "cluster", "end_to_end"],
        "m": 12,
        "seed": 0,
        "images_per_class": 2,
        "element_size": 32,
        "element_kinds": ["patches", "segments"],
        "patches": {"grid": 4},
        "segments": {"n_segments": [10, 20], "compactness": 10.0, "sigma": 1.0, "max_per_setting": 3,
                     "iou_threshold": 0.5, "min_area": 0.001, "fill": 117, "n_jobs": 1},
        "cluster_max_elements": 20000,
        "end_to_end_max_elements": 100,
        "textual": {"model": "ViT-B-16", "pretrained": None, "checkpoint": None, "words": "digits",
                    "top5_threshold": -1.0, "similarity_threshold": -1.0, "max_images": 200, "tiny_random_clip": True},
    },
    # a smaller L2 grid than the study's (0.1 ... 1000): the weak penalties cost the most solver work; every C of
    # the study's grid is tested against scikit-learn in tests/core/test_newton.py and test_convex.py
    "sweep": {"sparsities": [0.0, 0.5, 0.9], "l2_grid": [0.1, 1.0, 10.0], "learning_rates": [0.01, 0.1], "seeds": [0, 1], "epochs": 3, "steps": 1, "min_batches_per_epoch": 1,
              "batch_size": 64, "gamma": 0.99, "gumbel_tau": 0.1, "device": "cpu"},
    # the weight-sparsity path: 10 strengths instead of 40 (M = 12 never passes the NEC levels: every strength is solved)
    "weight_sparsity": {"path_length": 10},
    "scoring": {"n_boot": 50, "seed": 0, "ci": 0.95},
    "correlation": {"scores": ["iis", "iis_chance_corrected"], "n_boot": 50, "seed": 0, "ci": 0.95},
    "fine_tuning": {
        "backbones": ["lite0"],
        "lams": [0.0, 1.0],
        "seeds": [0],
        "train": {"sparsity": 0.1, "epochs": 1, "batch_size": 32, "lr_backbone": 1e-4, "lr_heads": 1e-3, "bn_mode": "train",
                  "device": "cpu", "num_workers": 0, "eval_epochs": [0, 1]},
        # the study's sweep: epoch 0 of fine-tuning must then score the study's prototype IIS
        "sweep": {"sparsities": [0.0, 0.5, 0.9], "l2_grid": [0.1, 1.0, 10.0], "learning_rates": [0.01, 0.1], "seeds": [0, 1], "epochs": 3, "steps": 1, "min_batches_per_epoch": 1,
                  "batch_size": 64, "gamma": 0.99, "gumbel_tau": 0.1, "device": "cpu"},
    },
}


def make_project(dest: Path, overrides: dict[str, Any] | None = None, env: str = "test") -> Path:
    """Copy ``conf/`` and ``pyproject.toml`` into ``dest`` and write the ``env`` parameters."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "conf", dest / "conf", dirs_exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy(ROOT / ".telemetry", dest / ".telemetry")  # the project's telemetry opt-out, as a clone has it
    (dest / "conf" / "local").mkdir(exist_ok=True)
    (dest / "src").mkdir(exist_ok=True)  # the package itself is installed (pip install -e .)
    for sub in ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models",
                "07_model_output", "08_reporting"):
        (dest / "data" / sub).mkdir(parents=True, exist_ok=True)
    if overrides is not None:
        overrides = dict(overrides)
        (dest / "conf" / env).mkdir(exist_ok=True)
        if "tracking" in overrides:  # MLflow settings are not parameters: conf/<env>/mlflow.yml
            tracking = overrides.pop("tracking")
            (dest / "conf" / env / "mlflow.yml").write_text(yaml.safe_dump({"tracking": tracking}))
        if "dataset" in overrides:  # the images: conf/<env>/globals.yml (the `images` catalog entry reads it)
            (dest / "conf" / env / "globals.yml").write_text(yaml.safe_dump({"dataset": overrides.pop("dataset")}))
        if "backbones" in overrides:  # environments merge softly: the base study's other entries are removed
            base = yaml.safe_load((ROOT / "conf" / "base" / "parameters_feature_extraction.yml").read_text())
            overrides["backbones"] = {**{k: None for k in base["backbones"]}, **(overrides["backbones"] or {})}
        (dest / "conf" / env / "parameters.yml").write_text(yaml.safe_dump(overrides, sort_keys=False))
    return dest


@contextmanager
def chdir(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run_in_process(project: Path, env: str = "test", pipeline: str | None = None, **kwargs: Any) -> dict:
    """Run the project's pipeline with a Kedro session in this process."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    with chdir(project), kedro_env(env):  # the pipeline registry reads the env from KEDRO_ENV (as `kedro jupyter`)
        bootstrap_project(project)
        with KedroSession.create(project_path=project, env=env) as session:
            return session.run(pipeline_names=[pipeline] if pipeline else None, **kwargs)


@contextmanager
def kedro_env(env: str | None):
    """``KEDRO_ENV`` set to ``env`` (None: unset) for the duration."""
    old = os.environ.pop("KEDRO_ENV", None)
    if env:
        os.environ["KEDRO_ENV"] = env
    try:
        yield
    finally:
        os.environ.pop("KEDRO_ENV", None)
        if old is not None:
            os.environ["KEDRO_ENV"] = old


def kedro_cli(project: Path, *args: str, env: str | None = "test", timeout: float = 1800,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``kedro <args>`` in ``project`` as a subprocess (the real CLI)."""
    cmd = [str(Path(sys.executable).with_name("kedro")), *args]
    if env:
        cmd += ["--env", env]
    e = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", **(extra_env or {})}
    e.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    return subprocess.run(cmd, cwd=project, env=e, capture_output=True, text=True, timeout=timeout)

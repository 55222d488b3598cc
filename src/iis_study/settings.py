"""Project settings (Kedro)."""

import warnings

from kedro.config import OmegaConfigLoader

from iis_study.hooks import MlflowTrackingHook, StudyConfigHook, ValidationHook

# The reporting pipeline gathers namespaced outputs ("lite0.scores_prototype") on purpose.
warnings.filterwarnings("ignore", message=r".*dataset names contain '\.' characters.*")

# pluggy calls the last registered hook first: validation runs before tracking opens a run
HOOKS = (StudyConfigHook(), MlflowTrackingHook(), ValidationHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # MLflow tracking settings (conf/<env>/mlflow.yml): not parameters of the study
    "config_patterns": {"mlflow": ["mlflow*", "mlflow*/**"]},
    # an environment holds only its differences: its keys merge into base's, key by key
    # (a list replaces the base list; `null` removes a `backbones` entry)
    "merge_strategy": {"parameters": "soft", "globals": "soft"},
}

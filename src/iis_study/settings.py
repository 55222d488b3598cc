"""Project settings (Kedro)."""

import warnings

from kedro.config import OmegaConfigLoader

from iis_study.hooks import MlflowTrackingHook, StudyConfigHook

# The reporting pipeline gathers namespaced outputs ("lite0.scores_prototype") on purpose.
warnings.filterwarnings("ignore", message=r".*dataset names contain '\.' characters.*")

HOOKS = (StudyConfigHook(), MlflowTrackingHook())

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}

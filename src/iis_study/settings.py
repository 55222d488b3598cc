"""Project settings (Kedro)."""

from kedro.config import OmegaConfigLoader

from iis_study.hooks import StudyConfigHook

HOOKS = (StudyConfigHook(),)

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}

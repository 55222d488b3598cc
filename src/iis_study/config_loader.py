"""The project's config-loader settings, read by Kedro (through :mod:`iis_study.settings`) and by
:func:`iis_study.study_config.study_parameters`.

A module of its own, importing nothing of the project: ``study_config`` reads these settings without
importing ``settings`` (whose hooks import, in the end, ``study_config``: an import cycle).
"""

from kedro.config import OmegaConfigLoader

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

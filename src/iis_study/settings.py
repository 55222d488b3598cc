"""Project settings (Kedro)."""

import warnings

from iis_study.config_loader import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS
from iis_study.hooks import MlflowTrackingHook, StudyConfigHook, ValidationHook

# The reporting pipeline gathers namespaced outputs ("lite0.scores_prototype") on purpose.
warnings.filterwarnings("ignore", message=r".*dataset names contain '\.' characters.*")

# pluggy calls the last registered hook first: validation runs before tracking opens a run
HOOKS = (StudyConfigHook(), MlflowTrackingHook(), ValidationHook())

# the config loader and its arguments live in iis_study.config_loader (read there by study_config too)
__all__ = ["CONFIG_LOADER_ARGS", "CONFIG_LOADER_CLASS", "HOOKS"]

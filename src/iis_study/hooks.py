"""Project hooks: record the run's parameters for the pipeline registry, validate them early."""

from __future__ import annotations

import logging
from typing import Any

from kedro.framework.hooks import hook_impl

from . import study_config

logger = logging.getLogger(__name__)


class StudyConfigHook:
    """Give the pipeline registry the parameters of the environment being run."""

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        study_config.remember(context.config_loader["parameters"])

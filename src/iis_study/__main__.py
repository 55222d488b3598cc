"""Run the project as ``python -m iis_study`` / ``iis-study`` (the same as ``kedro run``); ``iis-study new``
writes and runs a study of your own images and backbones (:mod:`iis_study.new_study`)."""

import sys
from pathlib import Path
from typing import Any

from kedro.framework.cli.utils import find_run_command
from kedro.framework.project import configure_project


def main(*args: Any, **kwargs: Any) -> Any:
    """Entry point: ``new`` -> :func:`iis_study.new_study.main`; else configure the project and call its ``run``."""
    if not args and len(sys.argv) > 1 and sys.argv[1] == "new":
        from .new_study import main as new_study

        sys.exit(new_study(sys.argv[2:]))
    package_name = Path(__file__).parent.name
    configure_project(package_name)
    kwargs["standalone_mode"] = not hasattr(sys, "ps1")
    run = find_run_command(package_name)
    return run(*args, **kwargs)


if __name__ == "__main__":
    main()

"""How to spell a command of this Python environment so that it runs when pasted into a shell."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# MLflow 3's UI opens in its GenAI view unless the hash route asks for the training view
# (its router reads the parameter from the part after `#`, falling back to the last choice made).
UI_VIEW = "workflowType=machine_learning"


def command(name: str) -> str:
    """``name`` when the shell finds this environment's script by that name, else the script's path.

    A venv that is not activated is not on ``PATH``: a bare ``mlflow ui`` would then run another
    installation's MLflow, or nothing. The path is relative when it is under the current folder
    (``.venv/bin/mlflow``).
    """
    script = Path(sys.executable).parent / name
    if not script.is_file():
        return name  # not installed as a script here (e.g. an unusual layout): the plain name
    found = shutil.which(name)
    if found is not None and os.path.samefile(found, script):
        return name
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def ui_page(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI at ``base``, in the view for training runs."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{UI_VIEW}"

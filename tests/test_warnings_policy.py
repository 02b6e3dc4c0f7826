"""The suite's warning filters: the package's deprecations are errors, MLflow's own warnings are not ours."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("module", ["mlflow_best", "mlflow_best._tracker", "mlflow_best.lightning"])
@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_from_the_package_fails_the_test(module: str, category: type[Warning]) -> None:
    # pyproject's filterwarnings makes these errors; conftest's filter for MLflow must not undo that
    # (a bare module="mlflow" matches "mlflow_best" too).
    with pytest.raises(category, match="an old spelling"):
        warnings.warn_explicit("mlflow_best: an old spelling", category, "x.py", 1, module=module)


@pytest.mark.parametrize("module", ["mlflow", "mlflow.store.tracking.sqlalchemy_store"])
def test_mlflows_own_warnings_are_ignored(module: str) -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("stages are deprecated", FutureWarning, "x.py", 1, module=module)
    assert seen == []

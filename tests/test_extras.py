"""The framework adapters are optional extras: ``import mlflow_best`` never imports a framework."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

FRAMEWORKS = ("lightning", "pytorch_lightning", "lightning_fabric", "transformers", "accelerate")


def test_import_mlflow_best_imports_no_framework() -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import mlflow_best, mlflow_best.cli
        print(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r}))
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"



def test_each_adapter_is_its_own_submodule() -> None:
    code = textwrap.dedent(
        """
        import sys
        import mlflow_best.lightning
        # (Lightning itself may import transformers when installed; the adapters import only their own.)
        assert "mlflow_best.transformers" not in sys.modules
        import mlflow_best.transformers
        print(mlflow_best.lightning.TrackCallback.__mro__[1].__module__)
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().startswith("lightning.pytorch")

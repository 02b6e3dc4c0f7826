"""The model of examples/quickstart.py, in a module of its own as in a project.

``track`` records the class by its import path (``models:Net``) with ``model_args``, so ``restore``
can rebuild it in any program that imports this module. A class defined in the script being run
would be recorded as ``__main__:Net``, which another program cannot import (``track`` warns).
"""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """A small MLP for 8x8 digit images (64 inputs, 10 classes)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out

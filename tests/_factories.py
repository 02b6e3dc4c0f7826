"""Model builders the way torchvision and timm write them: module-level functions, annotated."""

from __future__ import annotations

from torch import nn


def mlp(width: int = 8, depth: int = 2, classes: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(4, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class SmallConv(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.head(self.conv(x).mean(dim=(2, 3)))


def unannotated(width=8):  # type: ignore[no-untyped-def]
    """A builder without a return annotation: restore calls it only when the user says so."""
    return mlp(width=width)

"""The run's picture: the monitored metric per epoch, improvements marked, saved as a small PNG.

Drawn with Pillow's ``ImageDraw`` (2x supersampled, then downscaled, for smooth lines): about
0.05 s at the end of a block, against about 0.4-0.8 s for importing matplotlib alone. No global
state, no GUI backend, safe from any thread or a headless server.

Layout (pure arithmetic, kept apart from drawing): ``_Frame`` maps epochs and values to pixels;
``nice_ticks`` picks round tick values the way plotting libraries do (1, 2, 2.5, 5 x 10^k).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlflow_best._files import write_atomically

WIDTH, HEIGHT = 640, 360
_SCALE = 2  # drawn at twice the size, downscaled with a smoothing filter
_LINE = (74, 111, 165)
_IMPROVED = (46, 139, 87)
_BEST = (212, 160, 23)
_GRID = (225, 225, 225)
_TEXT = (40, 40, 40)


class EpochPoint(NamedTuple):
    """One epoch as the plot sees it: the monitored value and whether it was a new best."""

    epoch: int
    value: float
    improved: bool


def plot_filename(monitor: str) -> str:
    """``val_loss.png``; a metric name such as ``val/loss`` becomes ``val_loss.png``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", monitor).strip("._")
    return f"{stem or 'metric'}.png"


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """About ``target`` round values covering ``[low, high]`` (steps of 1, 2, 2.5 or 5 x 10^k)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(1, target - 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    k = 0
    while (v := first + k * step) <= high + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        k += 1
    return ticks


def _label(v: float) -> str:
    return f"{v:.4g}"


@dataclass(frozen=True)
class _Frame:
    """The plotting area in (unscaled) pixels and the data range it shows."""

    left: float
    top: float
    right: float
    bottom: float
    x0: float
    x1: float
    y0: float
    y1: float

    def x(self, epoch: float) -> float:
        span = self.x1 - self.x0
        if not span:
            return (self.left + self.right) / 2
        return self.left + (epoch - self.x0) / span * (self.right - self.left)

    def y(self, value: float) -> float:
        span = self.y1 - self.y0
        return self.bottom - (value - self.y0) / span * (self.bottom - self.top)


def _value_range(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.06 or (abs(lo) * 0.05 or 0.5)
    return lo - pad, hi + pad


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size * _SCALE)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for i in range(10):
        radius = r if i % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + i * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    return points


def render_metric_plot(
    path: str | os.PathLike[str],
    points: Sequence[EpochPoint],
    monitor: str,
    mode: str,
    *,
    title: str | None = None,
) -> Path:
    """Write a 640x360 PNG of ``monitor`` per epoch with every improvement marked and the best starred.

    Args:
        path: the PNG file to write (its folder is created); written atomically.
        points: the epochs in order; non-finite values leave a gap instead of breaking the axis.
        monitor: the metric name, for the axis label and the legend.
        mode: "min" or "max", for the title ("lower is better").
        title: the figure title (default: the metric name and the direction).

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    s = _SCALE
    image = Image.new("RGB", (WIDTH * s, HEIGHT * s), "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(9), _font(11)

    epochs = [p.epoch for p in points]
    x0, x1 = (min(epochs), max(epochs)) if epochs else (0, 1)
    y0, y1 = _value_range([p.value for p in points])
    xpad = 0.5 if x0 == x1 else (x1 - x0) * 0.03
    frame = _Frame(70, 30, WIDTH - 16, HEIGHT - 44, x0 - xpad, x1 + xpad, y0, y1)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return frame.x(epoch) * s, frame.y(value) * s

    # Grid, ticks and their labels.
    xticks = (list(range(x0, x1 + 1)) if x1 - x0 < 12
              else [t for t in nice_ticks(x0, x1) if float(t).is_integer()])
    for t in nice_ticks(y0, y1):
        if not frame.top <= frame.y(t) <= frame.bottom:
            continue
        _, py = xy(x0, t)
        draw.line([(frame.left * s, py), (frame.right * s, py)], fill=_GRID, width=s)
        draw.text((frame.left * s - 6 * s, py), _label(t), fill=_TEXT, font=small, anchor="rm")
    for t in xticks:
        px, _ = xy(t, y0)
        draw.line([(px, frame.top * s), (px, frame.bottom * s)], fill=_GRID, width=s)
        draw.text((px, frame.bottom * s + 5 * s), str(int(t)), fill=_TEXT, font=small, anchor="mt")
    draw.rectangle([frame.left * s, frame.top * s, frame.right * s, frame.bottom * s], outline=_TEXT, width=s)

    # The metric: a line through consecutive finite values (a non-finite one leaves a gap), dots.
    segment: list[tuple[float, float]] = []
    for p in [*points, EpochPoint(0, math.nan, False)]:
        if math.isfinite(p.value):
            segment.append(xy(p.epoch, p.value))
            continue
        if len(segment) > 1:
            draw.line(segment, fill=_LINE, width=2 * s, joint="curve")
        for cx, cy in segment if len(points) <= 60 else ():  # dots only where they can be told apart
            r = 2.5 * s
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_LINE)
        segment = []
    better = [p for p in points if p.improved and math.isfinite(p.value)]
    for p in better:
        cx, cy = xy(p.epoch, p.value)
        r = 6 * s
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=_IMPROVED, width=2 * s)
    legend = [("line", _LINE, monitor)]
    if better:
        best = better[-1]
        draw.polygon(_star(*xy(best.epoch, best.value), 9 * s), fill=_BEST)
        legend += [("ring", _IMPROVED, "improved (checkpoint)"),
                   ("star", _BEST, f"best: {best.value:.4g} at epoch {best.epoch}")]

    # Legend on a white box, in the corner that hides the fewest points.
    row = 15 * s
    width = max(draw.textlength(text, font=small) for _, _, text in legend) + 34 * s
    height = row * len(legend) + 6 * s
    pixels = [xy(p.epoch, p.value) for p in points if math.isfinite(p.value)]
    corners = [(frame.right * s - width - 6 * s, frame.top * s + 6 * s),
               (frame.right * s - width - 6 * s, frame.bottom * s - height - 6 * s),
               (frame.left * s + 6 * s, frame.top * s + 6 * s),
               (frame.left * s + 6 * s, frame.bottom * s - height - 6 * s)]
    lx, ly = min(corners, key=lambda c: sum(c[0] - 8 * s <= px <= c[0] + width + 8 * s
                                            and c[1] - 8 * s <= py <= c[1] + height + 8 * s
                                            for px, py in pixels))
    draw.rectangle([lx, ly, lx + width, ly + height], fill="white", outline=_GRID, width=s)
    for i, (kind, color, text) in enumerate(legend):
        cx, cy = lx + 14 * s, ly + 3 * s + row * i + row / 2
        if kind == "line":
            draw.line([(cx - 9 * s, cy), (cx + 9 * s, cy)], fill=color, width=2 * s)
        elif kind == "ring":
            draw.ellipse([cx - 5 * s, cy - 5 * s, cx + 5 * s, cy + 5 * s], outline=color, width=2 * s)
        else:
            draw.polygon(_star(cx, cy, 7 * s), fill=color)
        draw.text((cx + 14 * s, cy), text, fill=_TEXT, font=small, anchor="lm")

    # Title, axis labels (the y label drawn on its own strip and turned).
    direction = "lower" if mode == "min" else "higher"
    draw.text((WIDTH * s / 2, 14 * s), title or f"{monitor} per epoch ({direction} is better)",
              fill=_TEXT, font=normal, anchor="mm")
    draw.text(((frame.left + frame.right) * s / 2, (HEIGHT - 12) * s), "epoch", fill=_TEXT, font=normal,
              anchor="mm")
    label_w = int(draw.textlength(monitor, font=normal)) + 4 * s
    strip = Image.new("RGB", (max(1, label_w), 16 * s), "white")
    ImageDraw.Draw(strip).text((label_w / 2, 8 * s), monitor, fill=_TEXT, font=normal, anchor="mm")
    turned = strip.rotate(90, expand=True)
    image.paste(turned, (4 * s, int((frame.top + frame.bottom) * s / 2 - turned.height / 2)))

    out = image.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    # Written next to the target and renamed: a reader (the uploader, a sync) never sees half a PNG.
    return write_atomically(target, lambda tmp: out.save(tmp, format="PNG", optimize=False))

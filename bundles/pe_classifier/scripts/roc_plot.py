"""Draw a ROC curve PNG with Pillow (matplotlib is not a dependency of xray2ct)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from common.atomic import atomic_path


def save_roc_png(
    fpr: Sequence[float],
    tpr: Sequence[float],
    path: str | os.PathLike,
    title: str = "ROC",
    operating_point: tuple[float, float] | None = None,
    size: int = 420,
) -> str:
    """ROC curve (1 - specificity on x, sensitivity on y), the chance diagonal and an optional operating
    point (fpr, tpr) marked with a circle; written atomically."""
    margin = 50
    side = size - 2 * margin
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)

    def xy(f: float, t: float) -> tuple[float, float]:
        return margin + f * side, size - margin - t * side

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in np.linspace(0, 1, 6):
        x, y = xy(tick, 0)
        draw.line([x, y, x, y + 4], fill="black")
        draw.text((x - 8, y + 6), f"{tick:.1f}", fill="black")
        x, y = xy(0, tick)
        draw.line([x - 4, y, x, y], fill="black")
        draw.text((x - 28, y - 5), f"{tick:.1f}", fill="black")
    for k in range(0, 20, 2):  # dashed chance line
        draw.line([xy(k / 20, k / 20), xy((k + 1) / 20, (k + 1) / 20)], fill="gray")
    draw.line([xy(float(f), float(t)) for f, t in zip(fpr, tpr)], fill=(200, 30, 30), width=3)
    if operating_point is not None:
        x, y = xy(*operating_point)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=(20, 60, 200), width=2)
    draw.text((margin, 15), title, fill="black")
    draw.text((size // 2 - 60, size - 22), "1 - specificity (FPR)", fill="black")
    draw.text((5, margin - 30), "sensitivity (TPR)", fill="black")
    path = os.fspath(path)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path

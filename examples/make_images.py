"""Regenerate the example images (64x64 PNGs, a few hundred bytes each). Run from anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent


def main() -> None:
    out = HERE / "images"
    out.mkdir(exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    shapes = {
        "sunrise": np.stack([200 + 0 * xx, 80 + 2 * yy, 40 + 0 * xx], -1),
        "checker": np.stack([((xx // 8 + yy // 8) % 2) * 255] * 3, -1),
        "disc": np.stack([((xx - 32) ** 2 + (yy - 32) ** 2 < 400) * 220, 60 + 0 * xx, 120 + yy], -1),
    }
    for name, pixels in shapes.items():
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out / f"{name}.png", optimize=True)


if __name__ == "__main__":
    main()

"""Write the example manifest: every image in examples/images x seeds 0 and 1.

Usage: python examples/make_manifest.py [OUT]   (default: examples/manifest.parquet)
Image paths are stored relative to OUT's folder, so the manifest works from any directory.
Same as: vcut manifest examples/images -o OUT --seeds 0,1
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.manifest import build_manifest

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    out = argv[0] if argv else str(HERE / "manifest.parquet")
    n = build_manifest(str(HERE / "images"), out, seeds=[0, 1])
    print(f"wrote {n} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``python -m benchmarks.gpu``: see :mod:`benchmarks.gpu`."""

import sys

from benchmarks.gpu.cli import main

sys.exit(main())

"""``python -m jobs.cli``: the ``vcut`` command."""

import sys

from jobs.cli import main

sys.exit(main())

"""``python -m collector ...``: the collector's commands, as ``rmmhunt collector ...``."""

import sys

from collector.cli import main

sys.exit(main())

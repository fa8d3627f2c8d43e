"""``python -m calm``: the same as the ``calm`` command."""

import sys

from calm.cli import main

sys.exit(main())

"""``python -m devicemap.cli``: the ``devicemap`` command."""

import sys

from .command import main

sys.exit(main())

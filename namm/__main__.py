"""``python -m namm``: the ``namm`` command, for environments where its script is not on PATH."""

import sys

from namm.cli import main

sys.exit(main())

"""``python -m avgctl.server.cli``: the ``avgctl`` command (how ``avgctl demo`` starts its server)."""

import sys

from avgctl.server.cli.main import main

sys.exit(main())

"""``python -m unif2ace <subcommand>``: the ``unif2ace`` command (:mod:`unif2ace.cli`)."""

import sys

from unif2ace.cli import main

sys.exit(main())

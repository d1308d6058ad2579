"""``python -m unif2ace.cli``: the same command as ``python -m unif2ace``."""

import sys

from unif2ace.cli import main

sys.exit(main())

"""``python -m mmke.tables``: see ``mmke.tables.cli``."""

import sys

from mmke.tables.cli import main

if __name__ == "__main__":
    sys.exit(main())

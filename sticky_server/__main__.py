"""``python -m sticky_server``: the ``sticky-server`` command (see ``cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

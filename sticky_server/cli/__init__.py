"""The ``sticky-server`` command (also ``python -m sticky_server``).

``options`` reads the settings (command line, config file, environment), ``target``
imports the app and makes its worker, ``run`` serves, ``status`` asks a running
master for its stats, ``reload`` is ``--reload``'s file watcher.
"""

from .options import build_parser
from .run import main
from .settings import parse_settings

__all__ = ["build_parser", "main", "parse_settings"]

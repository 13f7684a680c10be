"""One report of a failed start, not one per worker.

Every worker imports TARGET, so a mistake in it fails them all the same way. The
master names a file in the environment before the workers start; the first worker
to fail creates it (``O_EXCL``) and prints, the others stay quiet.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

__all__ = ["BOOT_REPORT_VARIABLE", "boot_report_file", "first_to_report"]

BOOT_REPORT_VARIABLE = "STICKY_SERVER_BOOT_REPORT"


@contextlib.contextmanager
def boot_report_file() -> Iterator[str]:
    """In the master, while it serves: the workers it starts share one report file (removed afterwards)."""
    folder = tempfile.mkdtemp(prefix="sticky-server-boot-")
    path = os.path.join(folder, "reported")
    os.environ[BOOT_REPORT_VARIABLE] = path
    try:
        yield path
    finally:
        os.environ.pop(BOOT_REPORT_VARIABLE, None)
        with contextlib.suppress(OSError):
            os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def first_to_report() -> bool:
    """True in the first worker to fail (and wherever there is no shared file); False in the others."""
    path = os.environ.get(BOOT_REPORT_VARIABLE)
    if not path:
        return True
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or not ours (a worker running as another user): say it anyway
        return True
    return True

"""The entry script: the master runs the `is_master` branch, every worker the other one.

python example/server.py [PORT]      (default 3000; 0 picks a free port)
curl http://127.0.0.1:3000/          -> worker 2 pid 12345
"""

from __future__ import annotations

import logging
import sys

from worker import HttpWorker

from sticky_server import StickyServer

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
sticky = StickyServer(workers=4)
if sticky.is_master:
    sticky.listen(port)  # blocks until SIGTERM or Ctrl-C
else:
    sticky.work(HttpWorker(sticky.worker_id))  # blocks; add_connection(sock) per connection

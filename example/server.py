"""The entry script: the master runs the `is_master` branch, every worker the other one.

python example/server.py [PORT]      (default 3000; 0 picks a free port)
curl http://127.0.0.1:3000/          -> worker 2 pid 12345
                                        connections per worker: {"0": 3, "1": 5, "2": 4, "3": 1}
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import Any

from worker import HttpWorker

from sticky_server import StickyServer

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
sticky = StickyServer(workers=4)
if sticky.is_master:
    totals: Counter[str] = Counter()

    @sticky.on_message
    def count(worker_id: int, message: Any) -> None:  # runs in the master's loop
        totals[str(worker_id)] += message["connections"]
        sticky.broadcast({"totals": totals})

    sticky.listen(port)  # blocks until SIGTERM or Ctrl-C
else:
    sticky.work(HttpWorker(sticky))  # blocks; add_connection(sock) per connection

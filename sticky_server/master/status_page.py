"""The master's status as a small HTML page, on the ``--metrics`` address (``GET /``).

Workers, connections per worker, accept and hand-off rates, restarts, and the
master's recent warnings and errors, in a page that reloads itself every few
seconds (no script: a ``<meta http-equiv="refresh">``). Rates are the change since
the page was last rendered (since the start, the first time).
"""

from __future__ import annotations

import collections
import html
import logging
import threading
import time
from typing import Any

__all__ = ["REFRESH_SECONDS", "RecentProblems", "StatusPage"]

REFRESH_SECONDS = 2
RECENT = 20  # warnings and errors kept for the page

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}
.summary{color:#555;margin-bottom:1em}
table{border-collapse:collapse;background:#fff;margin-bottom:1.5em}
th,td{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f0f0f0}
td.left,th.left{text-align:left}
.down{color:#b00;font-weight:bold}
.bar{display:inline-block;height:.8em;background:#4a8;vertical-align:middle}
.problems td{text-align:left;font-family:monospace;font-size:12px}
.WARNING{color:#a60}.ERROR,.CRITICAL{color:#b00}
"""


class RecentProblems(logging.Handler):
    """Keeps the last ``RECENT`` warnings and errors of the ``sticky_server`` loggers in this process."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=RECENT)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.created, record.levelname, record.getMessage()))
        except Exception:  # a message that does not format must not break the logging of the master
            self.handleError(record)


class StatusPage:
    """Renders the stats as HTML; remembers the last figures to tell rates."""

    def __init__(self, problems: RecentProblems | None = None) -> None:
        self.problems = problems
        self._lock = threading.Lock()
        self._last: tuple[float, int, int] | None = None  # (uptime, accepted, handed off)

    def _rates(self, stats: dict[str, Any]) -> tuple[float, float]:
        now = (float(stats["uptime"]), int(stats["accepted"]), int(stats["handed_off"]))
        with self._lock:
            before, self._last = self._last, now
        if before is None or now[0] <= before[0]:
            before = (0.0, 0, 0)
        elapsed = max(now[0] - before[0], 1e-3)
        return (now[1] - before[1]) / elapsed, (now[2] - before[2]) / elapsed

    def render(self, stats: dict[str, Any]) -> str:
        accept_rate, handoff_rate = self._rates(stats)
        workers = stats["workers"]
        busiest = max([worker["live"] for worker in workers] + [1])
        rows = []
        for worker in workers:
            state = "ready" if worker["ready"] else '<span class="down">not ready</span>'
            width = round(120 * worker["live"] / busiest)
            rows.append(
                f"<tr><td>{worker['slot']}</td><td>{worker['pid'] or '-'}</td><td class=left>{state}</td>"
                f"<td>{_duration(worker['uptime'])}</td><td>{worker['live']}</td>"
                f'<td class=left><span class=bar style="width:{width}px"></span></td>'
                f"<td>{worker['handed_off']}</td><td>{worker['restarts']}</td><td>{worker['lost_no_room']}</td></tr>"
            )
        problems = list(self.problems.records) if self.problems is not None else []
        problem_rows = "".join(
            f"<tr><td>{time.strftime('%H:%M:%S', time.localtime(created))}</td>"
            f"<td class={level}>{level}</td><td>{html.escape(message)}</td></tr>"
            for created, level, message in reversed(problems)
        )
        ready = sum(1 for worker in workers if worker["ready"])
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>sticky-server status</title><style>{_STYLE}</style></head>
<body>
<h1>sticky-server</h1>
<div class="summary" id="summary">master pid {stats["pid"]}, up {_duration(stats["uptime"])},
{ready} of {len(workers)} workers ready, steering: {html.escape(str(stats.get("steering", "")))}<br>
<b id="live">{stats["live"]}</b> live connections &middot;
<b>{stats["accepted"]}</b> accepted (<span id="accept-rate">{accept_rate:.1f}</span>/s) &middot;
<b>{stats["handed_off"]}</b> handed off (<span id="handoff-rate">{handoff_rate:.1f}</span>/s) &middot;
<b>{stats["restarts"]}</b> restarts</div>
<table id="workers"><tr><th>slot</th><th>pid</th><th class=left>state</th><th>up</th><th>live</th><th></th>
<th>taken</th><th>restarts</th><th>lost at fd limit</th></tr>
{"".join(rows)}
</table>
<h2 style="font-size:1.1em">Recent warnings and errors</h2>
<table class="problems" id="problems">{problem_rows or "<tr><td>none</td></tr>"}</table>
<div class="summary">Refreshes every {REFRESH_SECONDS} s &middot; <a href="/stats">/stats</a> (JSON) &middot;
<a href="/metrics">/metrics</a> (Prometheus)</div>
</body></html>
"""


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"

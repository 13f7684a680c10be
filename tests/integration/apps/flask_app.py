"""A Flask app as its documentation writes one, run by the sticky-server command.

sticky-server apps.flask_app:app --wsgi -w 4
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from sticky_server import current_server

app = Flask(__name__)


@app.route("/")
def index() -> dict[str, Any]:
    return {"worker": current_server().worker_id, "client": request.remote_addr, "scheme": request.scheme}

"""A FastAPI app for the command-line habit tests, written as uvicorn users write one.

Every process that imports it leaves a file named by its pid in APP_IMPORT_DIR, so
a test can tell whether the master imported it. ``create_app`` is the factory form
(``--factory apps.habits_app:create_app``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from sticky_server import current_server

VERSION = "1"

if os.environ.get("APP_IMPORT_DIR"):
    Path(os.environ["APP_IMPORT_DIR"], str(os.getpid())).touch()


def create_app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    def index(request: Request) -> dict[str, Any]:
        logging.getLogger("habits").info("served worker %s", current_server().worker_id)
        return {
            "worker": current_server().worker_id,
            "pid": os.getpid(),
            "root_path": request.scope.get("root_path"),
            "greeting": os.environ.get("GREETING"),
            "version": VERSION,
        }

    return app


app = create_app()

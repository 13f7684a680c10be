from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import HERE, LINE_APP, ServerProcess, line_app_command

if not sys.platform.startswith("linux"):
    pytest.skip("integration tests use 127.0.0.x source addresses and /proc (Linux)", allow_module_level=True)

StartApp = Callable[..., ServerProcess]


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[StartApp]:
    """Start line-app servers; afterwards stop them and fail if any of their processes is left."""
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None,
        module: bool = False,
        python: str = sys.executable,
        pid_dir: Path | None = None,
        script: Path = LINE_APP,
        command: list[str] | None = None,
        **kwargs: Any,
    ) -> ServerProcess:
        if pid_dir is None:
            pid_dir = tmp_path / f"pids{len(started)}"
            pid_dir.mkdir()
        cwd = HERE if module else kwargs.pop("cwd", HERE.parent.parent)
        if command is None:
            command = line_app_command(module, python) if script == LINE_APP else [python, str(script)]
        server = ServerProcess(command, pid_dir=pid_dir, env=env, cwd=cwd, marker=script.stem, **kwargs)
        started.append(server)
        return server

    yield start

    problems = []
    for server in started:
        if server.process.poll() is None:
            try:
                server.stop(timeout=30)
            except Exception as exc:  # the test already failed or hung the server: clean up anyway
                problems.append(f"master {server.process.pid} did not stop: {exc}")
                server.process.kill()
                server.process.wait(10)
        left = server.leftovers()
        if left:
            server.kill_leftovers(left)
            problems.append(f"processes left behind: {left}\n{server.output_tail()}")
    assert not problems, "\n".join(problems)

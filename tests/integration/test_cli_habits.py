"""What a uvicorn or gunicorn user types by habit, run for real on a FastAPI app, checked from a client.

Each test runs the real command and looks at what a client (or ``ps``) sees: the app
found without a kind flag, ``--host``/``--port``, ``--root-path`` in
``scope["root_path"]``, ``--factory``, ``--env-file``, ``WEB_CONCURRENCY``, the access
log on and off, ``--log-config``, ``--fd`` and systemd's ``LISTEN_FDS`` with a socket
the test opened, ``-c`` and ``--check-config``, ``--reload`` after a file edit (the
client keeps its slot), ``status --metrics``, process titles, and a master that
never imports the app unless ``--preload``.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, ServerProcess, expected_slot, free_port, wait_until

pytest.importorskip("fastapi")

CLI = [sys.executable, "-m", "sticky_server"]
LISTENING = r"listening on (\S+) with (\d+) workers \(master pid (\d+)\)"
TIMEOUT = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("STICKY_SERVER_", "LISTEN_"))}
    env.pop("WEB_CONCURRENCY", None)
    env.update(extra)
    return env


def start(start_app: StartApp, args: list[str], **kwargs: Any) -> tuple[ServerProcess, int, int]:
    """The command with ``args``; (the server, its port, its worker count) once it says it listens."""
    env = clean_env(**kwargs.pop("env", {}))
    server = start_app(command=[*CLI, *args], env=env, cwd=kwargs.pop("cwd", HERE), marker="sticky_server", **kwargs)
    match = server.wait_for(LISTENING, TIMEOUT * 2)
    return server, int(match.group(1).rsplit(":", 1)[1]), int(match.group(2))


def get(port: int, ip: str = "127.0.0.1", path: str = "/") -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT, source_address=(ip, 0))
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body[:300])
        reply: dict[str, Any] = json.loads(body)
        return reply
    finally:
        connection.close()


def test_a_fastapi_app_with_uvicorns_options_and_no_kind_flag(start_app: StartApp, tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    port = free_port()
    args = ["apps.habits_app:app", "--host", "127.0.0.1", "--port", str(port), "--root-path", "/api", "-w", "2"]
    server, listening_port, workers = start(start_app, args, env={"APP_IMPORT_DIR": str(imports)})
    assert (listening_port, workers) == (port, 2)
    for ip in CLIENT_IPS[:4]:
        reply = get(port, ip)
        assert reply["root_path"] == "/api"
        assert reply["worker"] == expected_slot(ip, 2)
    assert server.process.pid not in {int(entry.name) for entry in imports.iterdir()}, "the master imported the app"
    assert len(list(imports.iterdir())) == 2  # each worker, once


def test_preload_imports_the_app_in_the_master_too(start_app: StartApp, tmp_path: Path) -> None:
    imports = tmp_path / "imports"
    imports.mkdir()
    args = ["apps.habits_app:app", "--preload", "-w", "1", "-b", "127.0.0.1:0"]
    server, port, _ = start(start_app, args, env={"APP_IMPORT_DIR": str(imports)})
    get(port)
    assert server.process.pid in {int(entry.name) for entry in imports.iterdir()}


def test_factory_env_file_and_web_concurrency(start_app: StartApp, tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("GREETING=hello from .env\n")
    args = ["apps.habits_app:create_app", "--factory", "--env-file", str(dotenv), "-b", "127.0.0.1:0"]
    _, port, workers = start(start_app, args, env={"WEB_CONCURRENCY": "3"})
    assert workers == 3
    assert get(port)["greeting"] == "hello from .env"


def test_the_access_log_is_on_by_default_and_off_with_no_access_log(start_app: StartApp) -> None:
    for flag, expected in (([], True), (["--no-access-log"], False)):
        server, port, _ = start(start_app, ["apps.habits_app:app", "-w", "1", "-b", "127.0.0.1:0", *flag])
        get(port)
        server.wait_for(r"habits INFO served worker 0")  # the app's own INFO line either way
        time.sleep(0.2)
        assert ('"GET / HTTP/1.1" 200' in server.output) is expected, server.output_tail()
        assert server.stop(TIMEOUT) == 0


def test_log_config_sets_the_format(start_app: StartApp, tmp_path: Path) -> None:
    config = tmp_path / "logging.json"
    config.write_text(
        json.dumps(
            {
                "version": 1,
                "disable_existing_loggers": False,
                "formatters": {"custom": {"format": "CUSTOM|%(levelname)s|%(name)s|%(message)s"}},
                "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "custom"}},
                "root": {"level": "INFO", "handlers": ["out"]},
            }
        )
    )
    server, port, _ = start(
        start_app, ["apps.habits_app:app", "-w", "1", "-b", "127.0.0.1:0", "--log-config", str(config)]
    )
    get(port)
    server.wait_for(r"^CUSTOM\|INFO\|habits\|served worker 0$")
    assert any(line.startswith("CUSTOM|INFO|sticky_server") for line in server.lines)


def listening_socket() -> socket.socket:
    sock = socket.create_server(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


def test_fd_serves_a_socket_the_caller_opened(start_app: StartApp) -> None:
    with listening_socket() as sock:
        fd = sock.fileno()
        _, port, _ = start(start_app, ["apps.habits_app:app", "-w", "2", "--fd", str(fd)], pass_fds=[fd])
        assert port == sock.getsockname()[1]
        for ip in CLIENT_IPS[:4]:
            assert get(port, ip)["worker"] == expected_slot(ip, 2)


def test_systemd_socket_activation(start_app: StartApp) -> None:
    """As systemd starts a service: the socket as descriptor 3, LISTEN_FDS=1 and LISTEN_PID the service's pid."""
    with listening_socket() as sock:
        port, fd = sock.getsockname()[1], sock.fileno()
        # In the child only: the socket moves to descriptor 3, then the child becomes the command.
        become = (
            "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd);"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); os.execv(sys.argv[2], sys.argv[2:])"
        )
        command = [sys.executable, "-c", become, str(fd), *CLI, "apps.habits_app:app", "-w", "1"]
        server = start_app(command=command, env=clean_env(), cwd=HERE, marker="sticky_server", pass_fds=[fd])
        match = server.wait_for(LISTENING, TIMEOUT * 2)
        assert int(match.group(1).rsplit(":", 1)[1]) == port
        assert get(port)["worker"] == 0


def test_a_config_file_and_check_config(start_app: StartApp, tmp_path: Path) -> None:
    config = tmp_path / "sticky.toml"
    config.write_text('workers = 3\nbind = ["127.0.0.1:0"]\nroot-path = "/from-file"\n')
    check = subprocess.run(
        [*CLI, "apps.habits_app:app", "-c", str(config), "--check-config"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=HERE,
        env=clean_env(),
    )
    assert check.returncode == 0, check.stderr
    settings = dict(line.split(None, 1) for line in check.stdout.splitlines())
    assert (settings["workers"], settings["root-path"]) == ("3", "'/from-file'")
    _, port, workers = start(start_app, ["apps.habits_app:app", "-c", str(config), "-w", "2"])
    assert workers == 2  # the command line wins over the file
    assert get(port)["root_path"] == "/from-file"


def test_reload_after_a_file_edit_keeps_the_client_on_its_slot(start_app: StartApp, tmp_path: Path) -> None:
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    module = app_dir / "reloadable.py"
    shutil.copy(HERE / "apps" / "habits_app.py", module)
    args = ["reloadable:app", "--app-dir", str(app_dir), "--reload", "-w", "3", "-b", "127.0.0.1:0"]
    server, port, _ = start(start_app, args)
    server.wait_for(r"reloading the workers when a file matching \*\.py under")
    ip = CLIENT_IPS[5]
    before = get(port, ip)
    assert before["version"] == "1"
    module.write_text(module.read_text().replace('VERSION = "1"', 'VERSION = "2"'))

    def new_version() -> bool:
        try:
            return bool(get(port, ip)["version"] == "2")
        except OSError:  # a request racing the old worker's stop (left for its own issue: see the CHANGELOG)
            return False

    assert wait_until(new_version, timeout=30), server.output_tail()
    after = get(port, ip)
    assert after["worker"] == before["worker"] == expected_slot(ip, 3)
    assert after["pid"] != before["pid"]  # a new process, on the same slot


def test_status_from_the_metrics_port(start_app: StartApp) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    start(start_app, ["apps.habits_app:app", "-w", "2", "-b", "127.0.0.1:0", "--metrics", metrics])
    result = subprocess.run([*CLI, "status", "--metrics", metrics], capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert len(stats["workers"]) == 2


def test_process_titles_tell_the_master_from_the_workers(start_app: StartApp) -> None:
    pytest.importorskip("setproctitle")
    server, port, _ = start(start_app, ["apps.habits_app:app", "-w", "2", "-b", "127.0.0.1:0"])
    master = server.process.pid
    worker = get(port)["pid"]

    def title(pid: int) -> str:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()

    assert title(master) == "sticky-server: master [apps.habits_app:app]"
    assert title(worker).startswith("sticky-server: worker ") and title(worker).endswith("[apps.habits_app:app]")


GUNICORN_CONF = """
import os
import multiprocessing

bind = "127.0.0.1:0"
workers = 2
worker_class = "uvicorn.workers.UvicornWorker"
accesslog = "-"
errorlog = "-"
loglevel = "INFO"
raw_env = ["GREETING=from raw_env"]
proc_name = "shop"
timeout = 20
graceful_timeout = 5


def _say(*words):
    with open(os.environ["HOOK_LOG"], "a") as log:
        log.write(" ".join(str(word) for word in words) + "\\n")


def on_starting(server):
    _say("on_starting", server.pid)


def when_ready(server):
    server.log.info("ready with %d workers", server.num_workers)
    _say("when_ready", server.pid, server.num_workers)


def post_fork(server, worker):
    _say("post_fork", worker.age, worker.pid, worker.ppid == server.pid)


def post_worker_init(worker):
    _say("post_worker_init", worker.age, worker.pid)


def worker_exit(server, worker):
    _say("worker_exit", worker.age, worker.pid)


def on_exit(server):
    _say("on_exit", server.pid)
"""


def test_a_gunicorn_config_file_with_its_hooks_runs_as_gunicorn_would(start_app: StartApp, tmp_path: Path) -> None:
    config, hook_log = tmp_path / "gunicorn.conf.py", tmp_path / "hooks.log"
    config.write_text(GUNICORN_CONF)
    server, port, workers = start(
        start_app, ["-c", str(config), "apps.habits_app:app"], env={"HOOK_LOG": str(hook_log)}
    )
    assert workers == 2
    reply = get(port, CLIENT_IPS[0])
    assert reply["greeting"] == "from raw_env"
    server.wait_for(r'"GET / HTTP/1.1" 200')  # accesslog = "-": the access line, on standard output
    server.wait_for(r"ready with 2 workers")  # when_ready's server.log
    master = server.process.pid
    server.stop()
    lines = [line.split() for line in hook_log.read_text().splitlines()]
    by_hook: dict[str, list[list[str]]] = {}
    for line in lines:
        by_hook.setdefault(line[0], []).append(line[1:])
    assert by_hook["on_starting"] == [[str(master)]] and by_hook["on_exit"] == [[str(master)]]
    assert by_hook["when_ready"] == [[str(master), "2"]]
    assert sorted(entry[0] for entry in by_hook["post_fork"]) == ["0", "1"]
    assert all(entry[2] == "True" for entry in by_hook["post_fork"])  # run in the worker, child of the master
    worker_pids = {entry[1] for entry in by_hook["post_fork"]}
    assert {entry[1] for entry in by_hook["post_worker_init"]} == worker_pids
    assert {entry[1] for entry in by_hook["worker_exit"]} == worker_pids
    assert lines[0][0] == "on_starting" and lines[-1][0] == "on_exit"

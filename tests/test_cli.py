"""Command-line parsing without processes: binds, environment variables, precedence."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from sticky_server.cli import parse_settings
from sticky_server.listener import Bind, format_address, parse_bind


@pytest.mark.parametrize(
    ("text", "bind"),
    [
        ("127.0.0.1:3000", Bind("127.0.0.1", 3000)),
        ("[::1]:3000", Bind("::1", 3000)),
        (":3000", Bind(None, 3000)),
        ("3000", Bind(None, 3000)),
        ("0.0.0.0:0", Bind("0.0.0.0", 0)),
        ("localhost:80", Bind("localhost", 80)),
        ("unix:/run/app.sock", Bind(None, 0, "/run/app.sock")),
    ],
)
def test_bind_forms(text: str, bind: Bind) -> None:
    assert parse_bind(text) == bind


@pytest.mark.parametrize("text", ["", "localhost", "1.2.3.4:", "host:70000", "[::1]", "[::1]3000", "unix:", "a:b"])
def test_bad_binds_name_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|unix:/path"):
        parse_bind(text)


def test_unix_addresses_are_formatted_as_binds() -> None:
    assert format_address("/run/app.sock") == "unix:/run/app.sock"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    return parse_settings(argv, environ)


def test_environment_sets_defaults_and_the_command_line_wins() -> None:
    environ = {
        "STICKY_SERVER_WORKERS": "3",
        "STICKY_SERVER_BIND": "127.0.0.1:1,unix:/tmp/x.sock",
        "STICKY_SERVER_PROXY_PROTOCOL": "true",
        "STICKY_SERVER_LOG_LEVEL": "debug",
    }
    args = parse(["m:f"], environ)
    assert (args.workers, args.bind, args.proxy_protocol, args.log_level) == (
        3,
        ["127.0.0.1:1", "unix:/tmp/x.sock"],
        True,
        "debug",
    )
    args = parse(["m:f", "-w", "5", "-b", ":9"], environ)
    assert (args.workers, args.bind) == (5, [":9"])  # replaced, not added to


def test_a_bad_environment_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(["m:f"], {"STICKY_SERVER_LOG_LEVEL": "loud"})
    assert exit_info.value.code == 2
    assert "STICKY_SERVER_LOG_LEVEL='loud' is not a valid --log-level" in capsys.readouterr().err


def test_a_balancer_by_module_and_class() -> None:
    from sticky_server import RoundRobinBalancer
    from sticky_server.cli.options import UsageError
    from sticky_server.cli.run import _custom_balancer

    assert isinstance(_custom_balancer("sticky_server:RoundRobinBalancer", None), RoundRobinBalancer)
    with pytest.raises(UsageError, match=r"is a OrderedDict, not a sticky_server\.Balancer subclass"):
        _custom_balancer("collections:OrderedDict", None)
    with pytest.raises(UsageError, match="cannot create it with no arguments"):
        _custom_balancer("sticky_server.listener:Bind", None)
    with pytest.raises(UsageError, match="must be one of ip-hash"):
        _custom_balancer("fastest", None)


def test_web_concurrency_sets_the_workers_and_sticky_server_workers_wins() -> None:
    assert parse(["m:f"], {"WEB_CONCURRENCY": "6"}).workers == 6
    assert parse(["m:f"], {"WEB_CONCURRENCY": "6", "STICKY_SERVER_WORKERS": "2"}).workers == 2
    assert parse(["m:f", "-w", "3"], {"WEB_CONCURRENCY": "6"}).workers == 3


@pytest.mark.parametrize(
    ("argv", "binds"),
    [
        ([], ["127.0.0.1:8000"]),
        (["--port", "9000"], ["127.0.0.1:9000"]),
        (["--host", "0.0.0.0", "--port", "9000"], ["0.0.0.0:9000"]),
        (["--host", "::"], ["[::]:8000"]),
        (["--uds", "/run/app.sock"], ["unix:/run/app.sock"]),
        (["--fd", "3"], ["fd://3"]),
        (["-b", ":1", "--port", "2"], [":1", "127.0.0.1:2"]),
    ],
)
def test_uvicorns_and_gunicorns_ways_of_saying_where_to_listen(argv: list[str], binds: list[str]) -> None:
    assert parse(["m:f", *argv], {}).bind == binds


def test_systemd_sockets_are_the_default_binds_for_this_process_only() -> None:
    import os

    mine = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid())}
    assert parse(["m:f"], mine).bind == ["fd://3", "fd://4"]
    assert parse(["m:f"], {**mine, "LISTEN_PID": "1"}).bind == ["127.0.0.1:8000"]
    assert parse(["m:f", "--port", "5"], mine).bind == ["127.0.0.1:5"]


def test_proxy_habits_mean_the_forwarded_header_and_its_trusted_proxies() -> None:
    args = parse(["m:f", "--proxy-headers", "--forwarded-allow-ips", "10.0.0.1, 10.1.0.0/16"], {})
    assert (args.forwarded_header, args.trusted_proxy) == ("x-forwarded-for", ["10.0.0.1", "10.1.0.0/16"])
    args = parse(["m:f", "--proxy-protocol", "--forwarded-allow-ips", "*"], {})
    assert (args.proxy_protocol, args.trusted_proxy) == (True, ["*"])


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["-k", "uvicorn.workers.UvicornWorker", "m:f"], "-k does not apply to sticky-server: sticky-server picks"),
        (["m:f", "--threads", "4"], "--threads does not apply to sticky-server: the WSGI worker serves each"),
        (["m:f", "--daemon"], "--daemon does not apply to sticky-server: run it in the foreground"),
    ],
)
def test_habits_that_do_not_apply_say_why(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, {})
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err


def test_version_is_the_packages(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import sticky_server

    with pytest.raises(SystemExit) as exit_info:
        parse(["--version"], {})
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sticky-server {sticky_server.__version__}"
    assert version("sticky-server") == sticky_server.__version__


def test_a_config_file_sits_between_the_environment_and_the_command_line(tmp_path: Path) -> None:
    toml = tmp_path / "sticky.toml"
    toml.write_text('workers = 7\nbind = ["127.0.0.1:7000"]\nforwarded-header = "forwarded"\npreload = true\n')
    environ = {"STICKY_SERVER_WORKERS": "2", "STICKY_SERVER_TIMEOUT": "9"}
    args = parse(["m:f", "-c", str(toml)], environ)
    assert (args.workers, args.bind, args.forwarded_header, args.preload, args.timeout) == (
        7,
        ["127.0.0.1:7000"],
        "forwarded",
        True,
        9.0,
    )
    assert parse(["m:f", "-c", str(toml), "-w", "1"], environ).workers == 1
    python = tmp_path / "gunicorn_conf.py"
    python.write_text('import multiprocessing\nworkers = 2 * 2\npidfile = "/tmp/x.pid"\nkeepalive = 3\n')
    args = parse(["m:f", "-c", str(python)], {})
    assert (args.workers, args.pid, args.timeout_keep_alive) == (4, "/tmp/x.pid", 3.0)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("wrokers = 2\n", "wrokers: unknown setting (did you mean workers?)"),
        ("workers = 0\n", "workers = 0 in"),
        ("worker_class = 'gevent'\n", "worker_class = 'gevent': sticky-server picks the server from the app"),
    ],
)
def test_a_bad_config_file_says_which_setting(
    tmp_path: Path, text: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse(["m:f", "-c", str(path)], {})
    assert says in capsys.readouterr().err


def test_check_config_prints_the_settings_in_effect(capsys: pytest.CaptureFixture[str]) -> None:
    from sticky_server.cli import main

    assert main(["m:f", "-w", "3", "--proxy-headers", "--check-config"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["workers"] == "3" and lines["forwarded-header"] == "'x-forwarded-for'"
    assert lines["bind"] == "['127.0.0.1:8000']"


def test_loop_refusals_speak_in_options(capsys: pytest.CaptureFixture[str], mocker: MockerFixture) -> None:
    from sticky_server.cli import main

    with pytest.raises(SystemExit):
        main(["m:f", "--loop", "uvloop", "--proxy-protocol", "--check-config"])
    err = capsys.readouterr().err
    assert "--loop uvloop: behind --proxy-protocol or a forwarded header" in err
    mocker.patch("importlib.util.find_spec", return_value=None)
    with pytest.raises(SystemExit):
        main(["m:f", "--loop", "uvloop", "--check-config"])
    assert "--loop uvloop needs uvloop: pip install uvloop" in capsys.readouterr().err


GUNICORN_CONF = """
import multiprocessing

bind = "127.0.0.1:9000"
workers = 3
worker_class = "uvicorn.workers.UvicornWorker"
accesslog = "-"
errorlog = "/tmp/error.log"
loglevel = "debug"
raw_env = ["APP_MODE=production", "GREETING=a=b"]
proc_name = "myapp"
umask = 0o007
forwarded_allow_ips = "10.0.0.1"
reload_extra_files = ["templates/*.html"]


def helper():
    return 1


def when_ready(server):
    server.log.info("ready")


def post_fork(server, worker):
    worker.log.info("forked %s", worker.pid)
"""


def test_a_real_gunicorn_config_file_is_taken_with_its_hooks(tmp_path: Path) -> None:
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(GUNICORN_CONF)
    args = parse(["m:app", "-c", str(path)], {})
    assert (args.bind, args.workers, args.kind, args.access_logfile, args.error_logfile) == (
        ["127.0.0.1:9000"],
        3,
        "asgi",
        "-",
        "/tmp/error.log",
    )
    assert (args.log_level, args.name, args.umask) == ("debug", "myapp", 0o007)
    assert args.env == [["APP_MODE", "production"], ["GREETING", "a=b"]]
    assert args.trusted_proxy == ["10.0.0.1"] and args.forwarded_header == "x-forwarded-for"
    assert args.reload_include == ["templates/*.html"]
    assert sorted(args.hooks) == ["post_fork", "when_ready"]


def test_a_gunicorn_config_file_is_refused_once_with_every_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(
        "worker_class = 'eventlet'\nthreads = 4\ndaemon = True\nstatsd_host = 'x:1'\nwrokers = 2\n"
        "def pre_request(worker, req):\n    pass\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        parse(["m:app", "-c", str(path)], {})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 2, error
    for says in [
        "worker_class = 'eventlet'",
        "threads: the WSGI worker serves each connection on a thread",
        "daemon: run it in the foreground",
        "statsd_host: use --metrics",
        "wrokers: unknown setting (did you mean workers?)",
        "pre_request(): the hook does not apply",
    ]:
        assert says in error[1], (says, error)


def test_gunicorn_hooks_run_where_gunicorn_runs_them(tmp_path: Path, mocker: MockerFixture) -> None:
    from sticky_server.cli import gunicorn_hooks

    calls: list[tuple[str, object]] = []
    hooks = {"when_ready": lambda server: calls.append(("when_ready", server.num_workers))}
    args = parse(["m:app", "-w", "2"], {})
    gunicorn_hooks.run_hook(hooks, "when_ready", gunicorn_hooks.HookServer(args, 2))
    gunicorn_hooks.run_hook(hooks, "on_exit", gunicorn_hooks.HookServer(args, 2))  # not defined: nothing
    assert calls == [("when_ready", 2)]
    log = mocker.patch.object(gunicorn_hooks.logger, "exception")
    gunicorn_hooks.run_hook({"on_exit": lambda server: 1 / 0}, "on_exit", gunicorn_hooks.HookServer(args, 2))
    log.assert_called_once_with("the %s hook raised", "on_exit")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["m:app", "--wokers", "3"], "unrecognized arguments: --wokers 3 (did you mean --workers?)"),
        (["m:app", "--worker", "3"], "(did you mean --workers?)"),
        (["m:app", "--trusted-proxy", "10.0.0.1"], "add --proxy-headers (X-Forwarded-For)"),
        (["m:app", "--http2"], "--http2 does not apply to sticky-server: workers speak HTTP/1.1"),
        (["m:app", "--use-colors"], "--use-colors does not apply to sticky-server"),
        (["m:app", "--umask", "999"], "invalid umask"),
        (["m:app", "-e", "NOVALUE"], "-e 'NOVALUE' is not NAME=VALUE"),
        (["m:app", "--proxy-headers", "--proxy-protocol"], "exclude each other"),
    ],
)
def test_command_line_mistakes_are_two_lines_naming_the_fix(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv, {})
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 2 and error[0].startswith("usage: sticky-server"), error
    assert says in error[1], error


def test_habits_of_uvicorn_and_gunicorn_users_are_taken() -> None:
    args = parse(
        [
            "m:app",
            "--log-level",
            "DEBUG",
            "--access-logfile",
            "-",
            "--error-logfile",
            "-",
            "-e",
            "A=1",
            "-n",
            "shop",
            "--umask",
            "007",
            "--ssl-keyfile-password",
            "secret",
            "--reload-include",
            "*.html",
            "--reload-exclude",
            "tmp_*",
            "--interface",
            "asgi3",
        ],
        {},
    )
    assert (args.log_level, args.access_logfile, args.error_logfile, args.env, args.name) == (
        "debug",
        "-",
        "-",
        [["A", "1"]],
        "shop",
    )
    assert (args.umask, args.keyfile_password, args.reload_include, args.reload_exclude, args.interface) == (
        0o007,
        "secret",
        ["*.html"],
        ["tmp_*"],
        "asgi3",
    )


def test_proxy_headers_default_as_uvicorn_users_expect() -> None:
    tcp = parse(["m:app"], {})
    assert tcp.forwarded_header is None  # the kernel path; a worker warns if a proxy shows up (proxy_hint)
    unix = parse(["m:app", "--uds", "/run/app.sock"], {})
    assert (unix.forwarded_header, unix.forwarded_header_fallback) == ("x-forwarded-for", True)
    assert parse(["m:app", "--uds", "/run/app.sock", "--no-proxy-headers"], {}).forwarded_header is None
    assert parse(["m:app", "--uds", "/run/app.sock", "--proxy-protocol"], {}).forwarded_header is None
    allowed = parse(["m:app", "--forwarded-allow-ips", "10.0.0.1,10.0.0.2"], {})
    assert (allowed.forwarded_header, allowed.trusted_proxy) == ("x-forwarded-for", ["10.0.0.1", "10.0.0.2"])
    with pytest.raises(SystemExit):  # allowed to send headers that nobody reads
        parse(["m:app", "--forwarded-allow-ips", "*", "--no-proxy-headers"], {})


def test_check_config_shows_only_settings_in_effect(capsys: pytest.CaptureFixture[str]) -> None:
    from sticky_server.cli import main

    assert main(["m:f", "--keyfile-password", "secret", "--check-config"]) == 0
    out = capsys.readouterr().out
    names = {line.split()[0] for line in out.splitlines()}
    assert "worker-class" not in names and "threads" not in names and "http2" not in names  # refused options
    assert "user" not in names  # not set
    assert "secret" not in out and "keyfile-password" in names


def test_user_without_root_is_one_line_naming_the_fix(
    mocker: MockerFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from sticky_server.cli import main

    mocker.patch("os.geteuid", return_value=1000)
    with pytest.raises(SystemExit) as exit_info:
        main(["m:app", "-u", "nobody"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 2 and "-u/--user and -g/--group need the master to run as root" in error[1], error


@pytest.mark.parametrize(
    ("message", "said"),
    [
        (
            "trusted_proxies does nothing without proxy_protocol=True",
            "--trusted-proxy does nothing without --proxy-protocol",
        ),
        ("workers must be a whole number", "--workers must be a whole number"),
        ("the workers of slot 1 failed", "the workers of slot 1 failed"),  # prose stays prose
        ("graceful_timeout must be a number", "--graceful-timeout must be a number"),
        (
            "steering='kernel' is not possible here: x. Use steering='auto' or 'master'",
            "--steering kernel is not possible here: x. use --steering auto or master",
        ),
    ],
)
def test_library_errors_are_said_in_the_command_lines_terms(message: str, said: str) -> None:
    from sticky_server.cli.settings import in_cli_terms

    assert in_cli_terms(message) == said

"""Command-line parsing without processes: binds, environment variables, precedence."""

from __future__ import annotations

import argparse

import pytest

from sticky_server.cli import _environment_defaults, build_parser
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
    parser = build_parser()
    repeated = _environment_defaults(parser, environ)
    args = parser.parse_args(argv)
    for dest, value in repeated.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args


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
    from sticky_server.cli import _balancer, _UsageError

    assert _balancer("least-connections") == "least-connections"
    assert isinstance(_balancer("sticky_server:RoundRobinBalancer"), RoundRobinBalancer)
    with pytest.raises(_UsageError, match=r"is a OrderedDict, not a sticky_server\.Balancer subclass"):
        _balancer("collections:OrderedDict")
    with pytest.raises(_UsageError, match="cannot create it with no arguments"):
        _balancer("sticky_server.listener:Bind")
    with pytest.raises(_UsageError, match="must be one of ip-hash"):
        _balancer("fastest")

"""NaN, infinity and absurd numbers are refused before anything starts, wherever they come from."""

from __future__ import annotations

from pathlib import Path

import pytest

from sticky_server import StickyServer
from sticky_server.cli import parse_settings


@pytest.mark.parametrize(
    "settings",
    [
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"graceful_timeout": float("nan")},
        {"graceful_timeout": -1},
        {"graceful_timeout": 10**9},
        {"header_timeout": float("nan"), "forwarded_header": "x-forwarded-for"},
        {"backlog": 10**20},
        {"backlog": 0},
        {"unix_socket_mode": 0o1777},
    ],
)
def test_the_library_refuses_absurd_numbers(settings: dict[str, object]) -> None:
    name = next(iter(settings))
    with pytest.raises(ValueError, match=name):
        StickyServer(2, **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("argv", "environ", "toml"),
    [
        (["--timeout", "nan"], {}, ""),
        (["--graceful-timeout", "inf"], {}, ""),
        (["--backlog", "100000000000000"], {}, ""),
        ([], {"STICKY_SERVER_TIMEOUT": "nan"}, ""),
        ([], {"STICKY_SERVER_GRACEFUL_TIMEOUT": "1e20"}, ""),
        ([], {}, "timeout = nan\n"),
        ([], {}, "backlog = 100000000000000000000\n"),
    ],
)
def test_the_command_refuses_absurd_numbers_from_every_source(
    argv: list[str], environ: dict[str, str], toml: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if toml:
        path = tmp_path / "settings.toml"
        path.write_text(toml)
        argv = [*argv, "-c", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["m:app", *argv], environ)
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2

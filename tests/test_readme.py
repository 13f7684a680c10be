"""The README's promises that code can check: its balancer example works and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from sticky_server import Balancer, ClientInfo, WorkerSet
from sticky_server.worker import environment

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def code_block_after(marker: str) -> str:
    match = re.search(re.escape(marker) + r"\s*```python\n(.*?)```", README, re.S)
    assert match, f"no python block after {marker}"
    return match.group(1)


def test_custom_balancer_example_runs_and_does_what_it_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "_read", False)
    code = code_block_after("<!-- readme-balancer-example -->")
    assert len([line for line in code.splitlines() if line.strip()]) <= 15
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    balancer = namespace["sticky"].settings.balancer
    assert isinstance(balancer, Balancer)
    everyone = WorkerSet(4, (0, 1, 2, 3))
    assert {balancer.pick(ClientInfo(f"10.1.{n}.9", 1), everyone) for n in range(50)} == {0}
    others = {balancer.pick(ClientInfo(f"192.0.2.{n}", 1), everyone) for n in range(50)}
    assert len(others) > 1
    assert balancer.pick(ClientInfo("10.1.0.1", 1), WorkerSet(4, (1, 2, 3))) in (1, 2, 3)


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    test_command = next(command for command in commands if "pytest" in command)
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines
    assert any("example/server.py" in command and "pip install -e ." in command for command in commands)


def test_the_version_is_the_same_everywhere() -> None:
    import sticky_server

    version = sticky_server.__version__
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert re.search(r"^## (\S+)", changelog, re.M).group(1) == version  # type: ignore[union-attr]
    mentioned = set(re.findall(r"sticky-server (\d+\.\d+\.\d+)", README))
    assert mentioned == {version}, mentioned
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "sticky_server.__version__"' in pyproject


def test_the_readme_lists_every_command_line_option() -> None:
    from sticky_server.cli import build_parser

    parser = build_parser()
    documented = set(re.findall(r"`(--?[a-z][a-z0-9-]*)", README))
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings or action.dest == "help":
            continue
        assert any(flag in documented for flag in action.option_strings), action.option_strings


def test_the_readme_settings_table_has_a_row_for_every_setting_and_no_other() -> None:
    from sticky_server import ServerSettings

    table = README.split("### `StickyServer(", 1)[1].split("| member | where | meaning |", 1)[0]
    rows = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)* \|", table, re.M))
    documented = {name for row in rows for name in row if name}
    assert documented == set(ServerSettings.names()), documented ^ set(ServerSettings.names())
    signature = README.split("### `StickyServer(", 1)[1].split(")`", 1)[0]
    assert [part.split("=")[0].strip(" *") for part in signature.split(",") if "=" in part] == ServerSettings.names()
